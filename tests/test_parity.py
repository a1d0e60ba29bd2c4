"""Our outputs equal transformers' PyTorch outputs (float32, CPU, max |difference| <= 1e-5)."""
import numpy as np
import pytest
import torch
import transformers

import bertgen_flax as bg
from bertgen_flax.config import SUPPORTED_ACTIVATIONS

from conftest import TINY, TOL, max_diff, perturb_, seq2seq_checkpoint

B, S, T = 3, 9, 6


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], (B, S))
    mask = np.ones((B, S), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    dec_ids = rng.integers(3, TINY["vocab_size"], (B, T))
    dec_mask = np.ones((B, T), np.int64)
    dec_mask[2, 4:] = 0
    labels = rng.integers(3, TINY["vocab_size"], (B, T))
    labels[2, 4:] = -100
    return ids, mask, dec_ids, dec_mask, labels


def _save(model, path):
    model.eval()
    model.save_pretrained(path)
    return str(path)


def _encoder_decoder(tmp, name, enc_kwargs=None, dec_kwargs=None, seed=0):
    return seq2seq_checkpoint(tmp / name, seed, enc=enc_kwargs, dec=dec_kwargs), str(tmp / name)


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    return _encoder_decoder(tmp_path_factory.mktemp("ed"), "ed")


def test_encoder_hidden_states_equal_transformers_with_padding(tmp_path):
    torch.manual_seed(1)
    ref = transformers.BertGenerationEncoder(transformers.BertGenerationConfig(**TINY))
    perturb_(ref, 1)
    path = _save(ref, tmp_path / "enc")
    ids, mask, *_ = _inputs()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    got = bg.BertGenerationEncoder.from_pretrained(path)(ids, attention_mask=mask).last_hidden_state
    assert max_diff(got, want, mask) <= TOL


@pytest.mark.parametrize("act", SUPPORTED_ACTIVATIONS)
def test_every_activation_equals_transformers(tmp_path, act):
    torch.manual_seed(2)
    ref = transformers.BertGenerationEncoder(transformers.BertGenerationConfig(**TINY, hidden_act=act))
    perturb_(ref, 2, scale=0.25)  # larger weights reach the non-linear ranges of every activation
    path = _save(ref, tmp_path / act)
    ids, mask, *_ = _inputs()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    got = bg.BertGenerationEncoder.from_pretrained(path)(ids, attention_mask=mask).last_hidden_state
    assert max_diff(got, want, mask) <= TOL


@pytest.mark.parametrize("tie", [True, False], ids=["tied_head", "untied_head"])
def test_standalone_decoder_logits_and_loss_equal_transformers(tmp_path, tie):
    torch.manual_seed(3)
    ref = transformers.BertGenerationDecoder(transformers.BertGenerationConfig(
        **TINY, is_decoder=True, tie_word_embeddings=tie))
    perturb_(ref, 3)
    path = _save(ref, tmp_path / "dec")
    ids, mask, _, _, _ = _inputs()
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    ours = bg.BertGenerationDecoder.from_pretrained(path)
    assert ("lm_head", "decoder", "kernel") in bg.convert.flatten(ours.params) or tie
    got = ours(ids, attention_mask=mask, labels=labels)
    assert max_diff(got.logits, want.logits, mask) <= TOL
    assert abs(float(got.loss) - float(want.loss)) <= TOL


def test_decoder_with_cross_attention_equals_transformers(tmp_path):
    torch.manual_seed(4)
    ref = transformers.BertGenerationDecoder(transformers.BertGenerationConfig(
        **TINY, is_decoder=True, add_cross_attention=True))
    perturb_(ref, 4)
    path = _save(ref, tmp_path / "dec")
    ids, mask, dec_ids, dec_mask, _ = _inputs()
    states = np.random.default_rng(0).normal(size=(B, S, TINY["hidden_size"])).astype(np.float32)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(dec_ids), attention_mask=torch.tensor(dec_mask),
                   encoder_hidden_states=torch.tensor(states), encoder_attention_mask=torch.tensor(mask)).logits
    got = bg.BertGenerationDecoder.from_pretrained(path)(dec_ids, attention_mask=dec_mask,
                                                          encoder_hidden_states=states,
                                                          encoder_attention_mask=mask).logits
    assert max_diff(got, want, dec_mask) <= TOL


def test_encoder_decoder_logits_and_loss_equal_transformers(seq2seq):
    ref, path = seq2seq
    ids, mask, dec_ids, dec_mask, labels = _inputs()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   decoder_input_ids=torch.tensor(dec_ids), decoder_attention_mask=torch.tensor(dec_mask))
    got = bg.EncoderDecoderModel.from_pretrained(path)(ids, mask, dec_ids, dec_mask)
    assert max_diff(got.logits, want.logits, dec_mask) <= TOL
    assert max_diff(got.encoder_last_hidden_state, want.encoder_last_hidden_state, mask) <= TOL


def test_encoder_decoder_loss_from_labels_equals_transformers(seq2seq):
    ref, path = seq2seq
    ids, mask, _, _, labels = _inputs()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    got = bg.EncoderDecoderModel.from_pretrained(path)(ids, mask, labels=labels)
    assert abs(float(got.loss) - float(want.loss)) <= TOL
    assert max_diff(got.logits, want.logits, labels != -100) <= TOL


def test_untied_decoder_head_in_encoder_decoder_equals_transformers(tmp_path):
    ref, path = _encoder_decoder(tmp_path, "untied", dec_kwargs=dict(tie_word_embeddings=False), seed=5)
    ids, mask, _, _, labels = _inputs(1)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    got = bg.EncoderDecoderModel.from_pretrained(path)(ids, mask, labels=labels)
    assert abs(float(got.loss) - float(want.loss)) <= TOL
    assert max_diff(got.logits, want.logits, labels != -100) <= TOL


def test_enc_to_dec_proj_equals_transformers_when_hidden_sizes_differ(tmp_path):
    ref, path = _encoder_decoder(tmp_path, "proj", enc_kwargs=dict(hidden_size=48, intermediate_size=50), seed=6)
    assert "enc_to_dec_proj.weight" in dict(ref.named_parameters())
    ids, mask, _, _, labels = _inputs(2)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    ours = bg.EncoderDecoderModel.from_pretrained(path)
    assert "enc_to_dec_proj" in ours.params
    got = ours(ids, mask, labels=labels)
    assert abs(float(got.loss) - float(want.loss)) <= TOL
    assert max_diff(got.logits, want.logits, labels != -100) <= TOL


def test_attentions_and_hidden_states_equal_transformers(seq2seq):
    ref, path = seq2seq
    ids, mask, dec_ids, dec_mask, _ = _inputs()
    ref.config._attn_implementation = "eager"
    for sub in (ref.encoder, ref.decoder):
        sub.config._attn_implementation = "eager"
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   decoder_input_ids=torch.tensor(dec_ids), decoder_attention_mask=torch.tensor(dec_mask),
                   output_attentions=True, output_hidden_states=True)
    got = bg.EncoderDecoderModel.from_pretrained(path)(ids, mask, dec_ids, dec_mask, output_attentions=True,
                                                       output_hidden_states=True)
    n = TINY["num_hidden_layers"]
    assert len(got.encoder_hidden_states) == len(want.encoder_hidden_states) == n + 1
    assert len(got.decoder_attentions) == len(got.cross_attentions) == n
    for ours, theirs in zip(got.encoder_hidden_states, want.encoder_hidden_states):
        assert max_diff(ours, theirs, mask) <= TOL
    for ours, theirs in zip(got.decoder_hidden_states, want.decoder_hidden_states):
        assert max_diff(ours, theirs, dec_mask) <= TOL
    rows = mask.astype(bool)  # attention rows of real source tokens
    for ours, theirs in zip(got.encoder_attentions, want.encoder_attentions):
        assert max_diff(np.asarray(ours).transpose(0, 2, 1, 3)[rows], theirs.numpy().transpose(0, 2, 1, 3)[rows]) <= TOL
    drows = dec_mask.astype(bool)
    for name in ("decoder_attentions", "cross_attentions"):
        for ours, theirs in zip(getattr(got, name), getattr(want, name)):
            a, b = np.asarray(ours).transpose(0, 2, 1, 3)[drows], theirs.numpy().transpose(0, 2, 1, 3)[drows]
            assert max_diff(a, b) <= TOL, name


def test_inputs_embeds_and_position_ids_equal_transformers(seq2seq):
    ref, path = seq2seq
    ids, mask, *_ = _inputs()
    positions = np.tile(np.arange(S)[::-1].copy(), (B, 1))
    with torch.no_grad():
        embeds = ref.encoder.embeddings.word_embeddings(torch.tensor(ids))
        want = ref.encoder(inputs_embeds=embeds, attention_mask=torch.tensor(mask),
                           position_ids=torch.tensor(positions)).last_hidden_state
    ours = bg.EncoderDecoderModel.from_pretrained(path)
    enc = bg.BertGenerationEncoder(ours.config.encoder, params=ours.params["encoder"])
    got = enc(inputs_embeds=embeds.numpy(), attention_mask=mask, position_ids=positions).last_hidden_state
    assert max_diff(got, want, mask) <= TOL


def test_scanned_and_unrolled_layers_give_the_same_outputs(seq2seq):
    _, path = seq2seq
    ids, mask, dec_ids, dec_mask, labels = _inputs()
    scanned = bg.EncoderDecoderModel.from_pretrained(path, scan_layers=True)
    unrolled = bg.EncoderDecoderModel.from_pretrained(path, scan_layers=False)
    assert "layer_1" in unrolled.params["encoder"]["encoder"] and "layer" in scanned.params["encoder"]["encoder"]
    a = scanned(ids, mask, labels=labels)
    b = unrolled(ids, mask, labels=labels)
    assert np.abs(np.asarray(a.logits) - np.asarray(b.logits)).max() <= 1e-6


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_compute_stays_close_to_float32(seq2seq, dtype):
    _, path = seq2seq
    ids, mask, dec_ids, dec_mask, _ = _inputs()
    full = bg.EncoderDecoderModel.from_pretrained(path)(ids, mask, dec_ids, dec_mask).logits
    half_model = bg.EncoderDecoderModel.from_pretrained(path, dtype=dtype)
    half = half_model(ids, mask, dec_ids, dec_mask).logits
    assert half.dtype == np.dtype(dtype)
    assert all(p.dtype == np.float32 for p in __import__("jax").tree_util.tree_leaves(half_model.params))
    scale = float(np.abs(np.asarray(full)).max())
    assert np.abs(np.asarray(half, np.float32) - np.asarray(full))[dec_mask.astype(bool)].max() <= 0.05 * scale


def test_dropout_runs_only_when_training_with_an_explicit_rng(seq2seq):
    import jax
    _, path = seq2seq
    ids, mask, _, _, labels = _inputs()
    model = bg.EncoderDecoderModel.from_pretrained(path)
    model = bg.EncoderDecoderModel(model.config.replace(
        encoder=model.config.encoder.replace(hidden_dropout_prob=0.3),
        decoder=model.config.decoder.replace(hidden_dropout_prob=0.3)), params=model.params)
    eval_a = model(ids, mask, labels=labels).loss
    eval_b = model(ids, mask, labels=labels).loss
    key = jax.random.PRNGKey(0)
    train_a = model(ids, mask, labels=labels, train=True, dropout_rng=key).loss
    train_b = model(ids, mask, labels=labels, train=True, dropout_rng=key).loss
    train_c = model(ids, mask, labels=labels, train=True, dropout_rng=jax.random.PRNGKey(1)).loss
    assert float(eval_a) == float(eval_b) and float(train_a) == float(train_b)
    assert float(train_a) != float(eval_a) and float(train_c) != float(train_a)
