"""Parity with transformers 4.57, the only reference for features 5.x removed: relative position embeddings,
``head_mask`` and shared (``tie_encoder_decoder``) encoder-decoders.

4.57 runs in its own virtual environment (``conftest.run_tf457``). One module-scoped subprocess builds every
reference model, perturbs its weights, saves it with ``save_pretrained`` and writes its outputs on fixed inputs to
``<name>.npz``; the tests load the same directories with bertgen_flax and compare (max |difference| <= TOL, on
positions that padding leaves meaningful).
"""
import json
import os
import shutil

import numpy as np
import pytest

import bertgen_flax as bg

from conftest import TINY, TOL, max_diff, run_tf457

pytestmark = pytest.mark.tf457

B, S, T = 3, 9, 6  # batch, source length, target length
L, N, H = TINY["num_hidden_layers"], TINY["num_attention_heads"], TINY["hidden_size"]
RELATIVE = ("relative_key", "relative_key_query")

# ---- transformers 4.57 side --------------------------------------------------------------------------------------
# argv: output directory (holding inputs.npz), TINY as JSON. Writes <name>/ (save_pretrained) and <name>.npz.
REFERENCE_SCRIPT = r'''
import json, os, sys
import numpy as np
import torch
import transformers as tf

out, tiny = sys.argv[1], json.loads(sys.argv[2])
inp = np.load(os.path.join(out, "inputs.npz"))
x = {k: torch.from_numpy(inp[k]) for k in inp.files}
assert tf.__version__.startswith("4.57"), tf.__version__


def config(**kwargs):
    return tf.BertGenerationConfig(**tiny, **kwargs)


def perturb_and_save(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    model.save_pretrained(os.path.join(out, name))
    return model


def dump(name, **arrays):
    flat = {}
    for key, value in arrays.items():
        if isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                flat[f"{key}.{i}"] = item.detach().numpy()
        else:
            flat[key] = value.detach().numpy()
    np.savez(os.path.join(out, name + ".npz"), **flat)


def seq2seq(encoder_config, decoder_config, **kwargs):
    cfg = tf.EncoderDecoderConfig.from_encoder_decoder_configs(encoder_config, decoder_config, **kwargs)
    cfg.decoder_start_token_id, cfg.pad_token_id = 2, 0
    return tf.EncoderDecoderModel(config=cfg)


torch.set_grad_enabled(False)
seed = 100
for pe in ("relative_key", "relative_key_query"):
    seed += 1
    torch.manual_seed(seed)
    enc = perturb_and_save(tf.BertGenerationEncoder(config(position_embedding_type=pe)), f"enc_{pe}", seed)
    o = enc(input_ids=x["ids"], attention_mask=x["mask"], output_attentions=True, output_hidden_states=True)
    dump(f"enc_{pe}", last=o.last_hidden_state, hidden=o.hidden_states, attn=o.attentions)

    seed += 1
    torch.manual_seed(seed)
    dec = perturb_and_save(tf.BertGenerationDecoder(config(position_embedding_type=pe, is_decoder=True)),
                           f"dec_{pe}", seed)
    o = dec(input_ids=x["dec_ids"], attention_mask=x["dec_mask"], labels=x["labels"], use_cache=False,
            output_attentions=True, output_hidden_states=True)
    dump(f"dec_{pe}", logits=o.logits, loss=o.loss, hidden=o.hidden_states, attn=o.attentions)

    seed += 1
    torch.manual_seed(seed)
    ed = perturb_and_save(seq2seq(config(position_embedding_type=pe), config(position_embedding_type=pe)),
                          f"ed_{pe}", seed)
    o = ed(input_ids=x["ids"], attention_mask=x["mask"], decoder_input_ids=x["dec_ids"],
           decoder_attention_mask=x["dec_mask"], labels=x["labels"], use_cache=False, output_attentions=True,
           output_hidden_states=True)
    dump(f"ed_{pe}", logits=o.logits, loss=o.loss, enc_last=o.encoder_last_hidden_state,
         enc_hidden=o.encoder_hidden_states, enc_attn=o.encoder_attentions, dec_hidden=o.decoder_hidden_states,
         dec_attn=o.decoder_attentions, cross_attn=o.cross_attentions)

# head_mask, on absolute positions so that it is the only 4.57-only feature in play
torch.manual_seed(200)
enc = perturb_and_save(tf.BertGenerationEncoder(config()), "enc_abs", 200)
dump("enc_abs",
     heads=enc(input_ids=x["ids"], attention_mask=x["mask"], head_mask=x["head_mask"]).last_hidden_state,
     layers_heads=enc(input_ids=x["ids"], attention_mask=x["mask"],
                      head_mask=x["layer_head_mask"]).last_hidden_state)

torch.manual_seed(201)
dec = perturb_and_save(tf.BertGenerationDecoder(config(is_decoder=True, add_cross_attention=True)), "dec_cross", 201)
o = dec(input_ids=x["dec_ids"], attention_mask=x["dec_mask"], encoder_hidden_states=x["enc_states"],
        encoder_attention_mask=x["mask"], head_mask=x["decoder_head_mask"], use_cache=False)
dump("dec_cross", logits=o.logits)

torch.manual_seed(202)
ed = perturb_and_save(seq2seq(config(), config()), "ed_abs", 202)
o = ed(input_ids=x["ids"], attention_mask=x["mask"], decoder_input_ids=x["dec_ids"],
       decoder_attention_mask=x["dec_mask"], labels=x["labels"], head_mask=x["layer_head_mask"],
       decoder_head_mask=x["decoder_head_mask"], use_cache=False)
dump("ed_abs", logits=o.logits, loss=o.loss)

# a shared encoder-decoder (BERTShare): one set of weights, the encoder is the decoder's `bert`
torch.manual_seed(300)
ed = seq2seq(config(), config(), tie_encoder_decoder=True)
assert ed.encoder.embeddings.word_embeddings.weight is ed.decoder.bert.embeddings.word_embeddings.weight
perturb_and_save(ed, "ed_tied", 300)
o = ed(input_ids=x["ids"], attention_mask=x["mask"], decoder_input_ids=x["dec_ids"],
       decoder_attention_mask=x["dec_mask"], labels=x["labels"], use_cache=False)
dump("ed_tied", logits=o.logits, loss=o.loss)
from safetensors import safe_open
with safe_open(os.path.join(out, "ed_tied", "model.safetensors"), "pt") as f:
    keys = sorted(f.keys())
with open(os.path.join(out, "ed_tied_keys.json"), "w") as f:
    json.dump(keys, f)
'''

# argv: a checkpoint directory, the inputs .npz, the output .npz. Loads with 4.57 and runs the shared model.
LOAD_SCRIPT = r'''
import json, sys
import numpy as np
import torch
import transformers as tf

path, inputs, out = sys.argv[1:4]
x = {k: torch.from_numpy(v) for k, v in np.load(inputs).items()}
model, info = tf.EncoderDecoderModel.from_pretrained(path, output_loading_info=True)
model.eval()
assert model.config.tie_encoder_decoder
assert model.encoder.embeddings.word_embeddings.weight is model.decoder.bert.embeddings.word_embeddings.weight
with torch.no_grad():
    o = model(input_ids=x["ids"], attention_mask=x["mask"], decoder_input_ids=x["dec_ids"],
              decoder_attention_mask=x["dec_mask"], labels=x["labels"], use_cache=False)
np.savez(out, logits=o.logits.numpy(), loss=o.loss.numpy())
print(json.dumps({"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"])}))
'''


def _inputs() -> dict:
    rng = np.random.default_rng(0)
    v = TINY["vocab_size"]
    mask = np.ones((B, S), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    dec_mask = np.ones((B, T), np.int64)
    dec_mask[2, 4:] = 0
    labels = rng.integers(3, v, (B, T))
    labels[dec_mask == 0] = -100
    return dict(
        ids=rng.integers(3, v, (B, S)), mask=mask, dec_ids=rng.integers(3, v, (B, T)), dec_mask=dec_mask,
        labels=labels, enc_states=rng.normal(size=(B, S, H)).astype(np.float32),
        # fractions as well as zeros: 4.57 multiplies the attention probabilities by the mask
        head_mask=np.resize(np.array([1.0, 0.0, 0.5, 1.0], np.float32), (N,)),
        layer_head_mask=np.resize(np.array([1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.25, 1.0], np.float32), (L, N)),
        decoder_head_mask=np.resize(np.array([0.5, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.75], np.float32), (L, N)),
    )


class Reference:
    """The 4.57 artifacts: checkpoint directories and their outputs on ``self.x``."""

    def __init__(self, root, x):
        self.root, self.x = str(root), x

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def out(self, name: str) -> dict:
        with np.load(self.path(name + ".npz")) as f:
            return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf457")
    x = _inputs()
    np.savez(root / "inputs.npz", **x)
    run_tf457(REFERENCE_SCRIPT, str(root), json.dumps(TINY))
    return Reference(root, x)


def _seq(out: dict, key: str) -> tuple:
    """``key.0 .. key.n`` from a dump: a tuple of per-layer arrays."""
    n = sum(1 for k in out if k.startswith(key + "."))
    return tuple(out[f"{key}.{i}"] for i in range(n))


def _query_rows(mask: np.ndarray, shape: tuple) -> np.ndarray:
    """[B, T] padding mask -> the rows of a [B, N, T, S] attention tensor that belong to real queries."""
    return np.broadcast_to(np.asarray(mask, bool)[:, None, :, None], shape)


def _assert_tuples_equal(got, want, mask, attention: bool):
    assert got is not None and len(got) == len(want), (None if got is None else len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        m = _query_rows(mask, w.shape) if attention else mask
        assert max_diff(g, w, m) <= TOL, f"entry {i}"


# ---- 1. relative positions: outputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("pe", RELATIVE)
def test_relative_encoder_last_hidden_state_equals_4_57(ref, pe):
    x = ref.x
    got = bg.BertGenerationEncoder.from_pretrained(ref.path(f"enc_{pe}"))(x["ids"], attention_mask=x["mask"])
    assert max_diff(got.last_hidden_state, ref.out(f"enc_{pe}")["last"], x["mask"]) <= TOL


@pytest.mark.parametrize("pe", RELATIVE)
def test_relative_decoder_logits_and_loss_equal_4_57(ref, pe):
    x, want = ref.x, ref.out(f"dec_{pe}")
    dec = bg.BertGenerationDecoder.from_pretrained(ref.path(f"dec_{pe}"))
    got = dec(x["dec_ids"], attention_mask=x["dec_mask"], labels=x["labels"])
    assert max_diff(got.logits, want["logits"], x["dec_mask"]) <= TOL
    assert abs(float(got.loss) - float(want["loss"])) <= TOL


@pytest.mark.parametrize("pe", RELATIVE)
def test_relative_encoder_decoder_logits_and_loss_equal_4_57(ref, pe):
    x, want = ref.x, ref.out(f"ed_{pe}")
    m = bg.EncoderDecoderModel.from_pretrained(ref.path(f"ed_{pe}"))
    got = m(x["ids"], x["mask"], x["dec_ids"], x["dec_mask"], x["labels"])
    assert max_diff(got.encoder_last_hidden_state, want["enc_last"], x["mask"]) <= TOL
    assert max_diff(got.logits, want["logits"], x["dec_mask"]) <= TOL
    assert abs(float(got.loss) - float(want["loss"])) <= TOL


# ---- 2. relative positions against the cache ----------------------------------------------------------------------
@pytest.mark.parametrize("pe", RELATIVE)
def test_relative_decoder_one_token_at_a_time_equals_4_57_full_forward(ref, pe):
    x = ref.x
    dec = bg.BertGenerationDecoder.from_pretrained(ref.path(f"dec_{pe}"))
    cache = dec.init_cache(B, T)
    steps = []
    for t in range(T):
        out = dec(x["dec_ids"][:, t:t + 1], attention_mask=x["dec_mask"], past_key_values=cache)
        cache = out.past_key_values
        steps.append(np.asarray(out.logits))
    assert max_diff(np.concatenate(steps, axis=1), ref.out(f"dec_{pe}")["logits"], x["dec_mask"]) <= TOL


@pytest.mark.parametrize("pe", RELATIVE)
def test_relative_encoder_decoder_cached_steps_equal_4_57_full_forward(ref, pe):
    x = ref.x
    m = bg.EncoderDecoderModel.from_pretrained(ref.path(f"ed_{pe}"))
    enc = m.encode(x["ids"], x["mask"]).last_hidden_state
    cache = m.init_cache(B, T, S)
    steps = []
    for t in range(T):
        out = m.decode(x["dec_ids"][:, t:t + 1], enc if t == 0 else None, x["mask"], x["dec_mask"],
                       past_key_values=cache)
        cache = out.past_key_values
        steps.append(np.asarray(out.logits))
    assert max_diff(np.concatenate(steps, axis=1), ref.out(f"ed_{pe}")["logits"], x["dec_mask"]) <= TOL


# ---- 5. attentions and hidden states with relative positions ------------------------------------------------------
@pytest.mark.parametrize("pe", RELATIVE)
def test_relative_encoder_attentions_and_hidden_states_equal_4_57(ref, pe):
    x, want = ref.x, ref.out(f"enc_{pe}")
    enc = bg.BertGenerationEncoder.from_pretrained(ref.path(f"enc_{pe}"))
    got = enc(x["ids"], attention_mask=x["mask"], output_attentions=True, output_hidden_states=True)
    assert len(_seq(want, "hidden")) == L + 1 and len(_seq(want, "attn")) == L
    _assert_tuples_equal(got.hidden_states, _seq(want, "hidden"), x["mask"], attention=False)
    _assert_tuples_equal(got.attentions, _seq(want, "attn"), x["mask"], attention=True)


@pytest.mark.parametrize("pe", RELATIVE)
def test_relative_decoder_attentions_and_hidden_states_equal_4_57(ref, pe):
    x, want = ref.x, ref.out(f"dec_{pe}")
    dec = bg.BertGenerationDecoder.from_pretrained(ref.path(f"dec_{pe}"))
    got = dec(x["dec_ids"], attention_mask=x["dec_mask"], output_attentions=True, output_hidden_states=True)
    _assert_tuples_equal(got.hidden_states, _seq(want, "hidden"), x["dec_mask"], attention=False)
    _assert_tuples_equal(got.attentions, _seq(want, "attn"), x["dec_mask"], attention=True)


@pytest.mark.parametrize("pe", RELATIVE)
def test_relative_encoder_decoder_attentions_and_hidden_states_equal_4_57(ref, pe):
    x, want = ref.x, ref.out(f"ed_{pe}")
    m = bg.EncoderDecoderModel.from_pretrained(ref.path(f"ed_{pe}"))
    got = m(x["ids"], x["mask"], x["dec_ids"], x["dec_mask"], output_attentions=True, output_hidden_states=True)
    _assert_tuples_equal(got.encoder_hidden_states, _seq(want, "enc_hidden"), x["mask"], attention=False)
    _assert_tuples_equal(got.encoder_attentions, _seq(want, "enc_attn"), x["mask"], attention=True)
    _assert_tuples_equal(got.decoder_hidden_states, _seq(want, "dec_hidden"), x["dec_mask"], attention=False)
    _assert_tuples_equal(got.decoder_attentions, _seq(want, "dec_attn"), x["dec_mask"], attention=True)
    _assert_tuples_equal(got.cross_attentions, _seq(want, "cross_attn"), x["dec_mask"], attention=True)


# ---- 4. head_mask -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["heads", "layers_heads"])
def test_encoder_head_mask_equals_4_57(ref, which):
    x = ref.x
    head_mask = x["head_mask"] if which == "heads" else x["layer_head_mask"]
    enc = bg.BertGenerationEncoder.from_pretrained(ref.path("enc_abs"))
    got = enc(x["ids"], attention_mask=x["mask"], head_mask=head_mask).last_hidden_state
    assert max_diff(got, ref.out("enc_abs")[which], x["mask"]) <= TOL


def test_decoder_head_mask_masks_self_and_cross_attention_as_4_57(ref):
    x = ref.x
    dec = bg.BertGenerationDecoder.from_pretrained(ref.path("dec_cross"))
    got = dec(x["dec_ids"], attention_mask=x["dec_mask"], encoder_hidden_states=x["enc_states"],
              encoder_attention_mask=x["mask"], head_mask=x["decoder_head_mask"])
    assert max_diff(got.logits, ref.out("dec_cross")["logits"], x["dec_mask"]) <= TOL


def test_encoder_decoder_head_mask_and_decoder_head_mask_equal_4_57(ref):
    x, want = ref.x, ref.out("ed_abs")
    m = bg.EncoderDecoderModel.from_pretrained(ref.path("ed_abs"))
    got = m(x["ids"], x["mask"], x["dec_ids"], x["dec_mask"], x["labels"], head_mask=x["layer_head_mask"],
            decoder_head_mask=x["decoder_head_mask"])
    assert max_diff(got.logits, want["logits"], x["dec_mask"]) <= TOL
    assert abs(float(got.loss) - float(want["loss"])) <= TOL


# ---- 3. tie_encoder_decoder (BERTShare) -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tied(ref):
    return bg.EncoderDecoderModel.from_pretrained(ref.path("ed_tied"))


@pytest.fixture(scope="module")
def tied_resaved(tied, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tied") / "ours")
    tied.save_pretrained(out)
    return out


def test_4_57_saves_a_tied_encoder_decoder_as_decoder_keys_only(ref):
    # Documents the input format: the shared weights are written once, under decoder.* (encoder.* are aliases).
    with open(ref.path("ed_tied_keys.json")) as f:
        keys = json.load(f)
    assert keys and all(k.startswith("decoder.") for k in keys), [k for k in keys if not k.startswith("decoder.")]


def test_tied_checkpoint_loads_as_one_shared_tree(tied):
    assert tied.config.tie_encoder_decoder
    assert "encoder" not in tied.params
    assert "decoder" in tied.params


def test_tied_checkpoint_logits_and_loss_equal_4_57(ref, tied):
    x, want = ref.x, ref.out("ed_tied")
    got = tied(x["ids"], x["mask"], x["dec_ids"], x["dec_mask"], x["labels"])
    assert max_diff(got.logits, want["logits"], x["dec_mask"]) <= TOL
    assert abs(float(got.loss) - float(want["loss"])) <= TOL


def test_saved_tied_model_loads_in_4_57_with_identical_logits(ref, tied_resaved, tmp_path):
    x, want = ref.x, ref.out("ed_tied")
    result = tmp_path / "loaded.npz"
    info = json.loads(run_tf457(LOAD_SCRIPT, tied_resaved, ref.path("inputs.npz"), str(result)).splitlines()[-1])
    assert info["missing"] == [], info
    with np.load(result) as got:
        assert max_diff(got["logits"], want["logits"], x["dec_mask"]) <= TOL
        assert abs(float(got["loss"]) - float(want["loss"])) <= TOL


@pytest.mark.filterwarnings("ignore:Version v4.12.0 introduces:FutureWarning")
def test_saved_tied_model_loads_in_transformers_5_with_the_4_57_logits(ref, tied_resaved):
    # 5.x does not share the stacks: it needs the encoder.* copies we write to run the right encoder weights.
    torch = pytest.importorskip("torch")
    import transformers
    assert int(transformers.__version__.split(".")[0]) >= 5
    x, want = ref.x, ref.out("ed_tied")
    model = transformers.EncoderDecoderModel.from_pretrained(tied_resaved)
    model.eval()
    t = {k: torch.from_numpy(x[k]) for k in ("ids", "mask", "dec_ids", "dec_mask", "labels")}
    with torch.no_grad():
        got = model(input_ids=t["ids"], attention_mask=t["mask"], decoder_input_ids=t["dec_ids"],
                    decoder_attention_mask=t["dec_mask"], labels=t["labels"], use_cache=False)
    assert max_diff(got.logits, want["logits"], x["dec_mask"]) <= TOL
    assert abs(float(got.loss) - float(want["loss"])) <= TOL


def test_tied_config_over_separate_encoder_weights_raises(ref, tmp_path):
    # An untied checkpoint (encoder.* differ from decoder.bert.*) whose config claims tie_encoder_decoder.
    path = tmp_path / "mislabelled"
    shutil.copytree(ref.path("ed_abs"), path)
    with open(path / "config.json") as f:
        config = json.load(f)
    config["tie_encoder_decoder"] = True
    with open(path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(bg.ConversionError, match="tie_encoder_decoder"):
        bg.EncoderDecoderModel.from_pretrained(str(path))
