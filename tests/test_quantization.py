"""Weight-only int8 / int4 quantization: the number formats, the modules reading them, what a quantized model
keeps of the float model (real MiniLM weights, a model trained here), and the refusals."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bertgen_flax as bg
from bertgen_flax import cli, quantization as Q
from bertgen_flax.convert import flatten

from conftest import REPO, seq2seq_checkpoint, traced_peak, wide_checkpoint

sys.path.insert(0, str(REPO / "bench"))
from bench_quant import agreement  # noqa: E402  (the benchmark's own agreement measure)


def _kernel(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape) * 0.05


# ---------------------------------------------------------------------------------------------------------------
# Number formats
# ---------------------------------------------------------------------------------------------------------------
def test_int8_rounds_each_weight_to_within_half_a_step_of_its_column_scale():
    w = _kernel((3, 64, 48))  # a leading layer axis, as scanned params have
    q, scale = Q.quantize_int8(w)
    assert q.dtype == jnp.int8 and q.shape == w.shape and scale.shape == (3, 48)
    assert int(jnp.abs(q.astype(jnp.int32)).max()) == 127  # the largest weight of a column uses the full range
    err = jnp.abs(Q.dequantize_kernel(q, scale) - w)
    assert bool(jnp.all(err <= scale[:, None, :] / 2 + 1e-7))


def test_int4_packs_two_weights_per_byte_and_unpacks_them_exactly():
    levels = jax.random.randint(jax.random.PRNGKey(1), (256, 16), -7, 8)
    levels = levels.at[0].set(7)  # each column's extreme is reached, so absmax scaling is exact
    w = levels.astype(jnp.float32) * 0.01
    packed, scale = Q.quantize_int4(w, group_size=256)
    assert packed.dtype == jnp.uint8 and packed.shape == (128, 16) and scale.shape == (1, 16)
    np.testing.assert_array_equal(np.asarray(Q.unpack_int4(packed)), np.asarray(levels))
    np.testing.assert_allclose(np.asarray(Q.dequantize_kernel(packed, scale)), np.asarray(w), atol=1e-7)


def test_int4_scales_each_group_of_input_rows_separately():
    w = _kernel((256, 8)).at[:128].multiply(100.0)  # the first group is 100x larger than the second
    packed, scale = Q.quantize_int4(w, group_size=128)
    assert scale.shape == (2, 8)
    small = w[128:]
    err = Q.dequantize_kernel(packed, scale)[128:] - small
    # one shared scale would round nearly all of the small group to zero (relative error ~1)
    assert float(jnp.linalg.norm(err) / jnp.linalg.norm(small)) < 0.2


def test_int4_group_size_falls_back_to_a_divisor_of_the_input_width():
    assert Q.group_size_for(384, 128) == 128
    assert Q.group_size_for(96, 128) == 96
    assert Q.group_size_for(200, 128) == 100
    with pytest.raises(ValueError, match="even input width"):
        Q.group_size_for(7, 128)


def test_only_matrices_are_quantized_and_norms_biases_and_positions_stay_float():
    seq2seq_model = bg.EncoderDecoderModel.from_pretrained(_tiny_checkpoint())
    flat = {"/".join(k): v for k, v in flatten(Q.quantize_params(seq2seq_model.params, "int4")).items()}
    assert not any(k.endswith("/kernel") or k.endswith("word_embeddings/embedding") for k in flat)
    packed = [k for k, v in flat.items() if k.endswith("qkernel") and v.dtype == jnp.uint8]
    odd = [k for k, v in flat.items() if k.endswith("qkernel") and v.dtype == jnp.int8]
    assert packed and all("output/dense" in k for k in odd)  # intermediate 37 -> hidden: odd width, int8
    assert all(v.dtype == jnp.int8 for k, v in flat.items() if k.endswith("qembedding"))
    kept = [k for k in flat if k.endswith(("LayerNorm/scale", "bias", "position_embeddings/embedding"))]
    assert kept and all(flat[k].dtype == jnp.float32 for k in kept)


def test_unknown_modes_and_double_quantization_are_refused():
    params = {"dense": {"kernel": _kernel((8, 8)), "bias": jnp.zeros(8)}}
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        Q.quantize_params(params, "int3")
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize_params(Q.quantize_params(params, "int8"), "int8")


# ---------------------------------------------------------------------------------------------------------------
# Models reading quantized trees
# ---------------------------------------------------------------------------------------------------------------
_CHECKPOINTS = {}


def _tiny_checkpoint() -> str:
    if "tiny" not in _CHECKPOINTS:
        import tempfile
        path = tempfile.mkdtemp(prefix="bertgen-quant-")
        seq2seq_checkpoint(path)
        _CHECKPOINTS["tiny"] = path
    return _CHECKPOINTS["tiny"]


def _dequantized(tree):
    """The float tree a quantized one stands for (each qkernel / qembedding widened with its scales)."""
    out = {}
    for k, v in tree.items():
        if not isinstance(v, dict):
            out[k] = v
        elif "qkernel" in v:
            out[k] = {**{n: x for n, x in v.items() if n not in ("qkernel", "qscale")},
                      "kernel": Q.dequantize_kernel(v["qkernel"], v["qscale"])}
        elif "qembedding" in v:
            out[k] = {"embedding": v["qembedding"].astype(jnp.float32) * v["qscale"][..., None]}
        else:
            out[k] = _dequantized(v)
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_quantized_model_computes_exactly_what_its_widened_weights_compute(mode, scan_layers):
    model = bg.EncoderDecoderModel.from_pretrained(_tiny_checkpoint(), scan_layers=scan_layers)
    quantized = model.quantize(mode)
    widened = bg.EncoderDecoderModel(model.config, params=_dequantized(quantized.params), scan_layers=scan_layers)
    ids = np.random.RandomState(0).randint(5, 99, (3, 11))
    a = np.asarray(quantized(input_ids=ids, decoder_input_ids=ids[:, :7]).logits)
    b = np.asarray(widened(input_ids=ids, decoder_input_ids=ids[:, :7]).logits)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    gen_q = np.asarray(quantized.generate(ids, max_new_tokens=6, num_beams=3))
    gen_w = np.asarray(widened.generate(ids, max_new_tokens=6, num_beams=3))
    np.testing.assert_array_equal(gen_q, gen_w)


def test_int8_keeps_the_real_minilm_encoder_within_a_few_percent_of_float():
    path = cli.resolve_source("minilm")
    model = bg.BertGenerationEncoder.from_pretrained(path)
    tok = bg.AutoTokenizer.from_pretrained(path)
    enc = tok(["the quick brown fox jumps over the lazy dog.",
               "weight-only quantization should leave the encoder close to its float self."], padding=True)
    ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"]).astype(bool)
    ref = np.asarray(model(ids, mask).last_hidden_state)[mask]
    out = np.asarray(model.quantize("int8")(ids, mask).last_hidden_state)[mask]
    rel = np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    # rare word pieces can be more sensitive (one of these 32 tokens is off by 20%): a bound on most, and the mean
    assert np.mean(rel < 0.08) >= 0.9 and rel.mean() < 0.05, rel


def test_quantized_models_use_a_quarter_and_under_a_fifth_of_the_float_bytes():
    model = bg.BertGenerationEncoder.from_pretrained(cli.resolve_source("minilm"))
    full = Q.param_bytes(model.params)
    assert Q.param_bytes(model.quantize("int8").params) < 0.27 * full
    assert Q.param_bytes(model.quantize("int4").params) < 0.21 * full


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_loading_with_quantize_gives_the_weights_of_quantizing_the_loaded_model(mode, scan_layers):
    """from_pretrained quantizes each matrix as it converts it (never holding the float model whole); the result
    is the tree ``quantize`` makes from the float model, leaf for leaf."""
    want = bg.EncoderDecoderModel.from_pretrained(_tiny_checkpoint(), scan_layers=scan_layers).quantize(mode)
    got = bg.EncoderDecoderModel.from_pretrained(_tiny_checkpoint(), scan_layers=scan_layers, quantize=mode)
    assert got.quantization == mode
    want, got = flatten(want.params), flatten(got.params)
    assert set(got) == set(want)
    for path, value in want.items():
        assert got[path].dtype == value.dtype and np.array_equal(np.asarray(got[path]), np.asarray(value)), path


def test_loading_with_quantize_never_holds_the_float_weights_on_the_host(tmp_path):
    """The file is mapped and each matrix quantized once built: the host arrays allocated meanwhile stay far below
    the checkpoint's size (before: the float tree, and the file's arrays beside it, over twice its size)."""
    size = wide_checkpoint(tmp_path / "wide")
    model, peak = traced_peak(lambda: bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "wide"), quantize="int8"))
    assert Q.param_bytes(model.params) < 0.3 * size
    assert peak < 0.5 * size, (peak, size)


def test_saving_or_exporting_a_quantized_model_is_refused_naming_the_mode(tmp_path):
    quantized = bg.EncoderDecoderModel.from_pretrained(_tiny_checkpoint(), quantize="int8")
    assert quantized.quantization == "int8" and "weights int8" in repr(quantized)
    for save in (quantized.save_pretrained, quantized.save_native):
        with pytest.raises(ValueError, match="quantized to int8"):
            save(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown quantization 'int2'"):
        bg.EncoderDecoderModel.from_pretrained(_tiny_checkpoint(), quantize="int2")


# ---------------------------------------------------------------------------------------------------------------
# Agreement with the float model on a model trained here
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(fusion_tiny_run):
    """fusion_tiny.toml trained for 500 steps (conftest) and exported with its tokenizer."""
    return str(fusion_tiny_run / "export")


def _fusion_inputs(path, n=128):
    from bertgen_flax.training.data import synthetic_pairs
    tok = bg.AutoTokenizer.from_pretrained(path)
    pairs = synthetic_pairs(n, task="fusion", seed=12345)
    enc = tok([p[0] for p in pairs], padding=True)
    return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])


@pytest.mark.parametrize("mode,tokens,sequences", [("int8", 99.0, 95.0), ("int4", 90.0, 50.0)])
def test_quantized_generation_agrees_with_the_float_model_on_held_out_inputs(trained, mode, tokens, sequences):
    ids, mask = _fusion_inputs(trained)
    ref = np.asarray(bg.EncoderDecoderModel.from_pretrained(trained).generate(ids, mask, max_new_tokens=40))
    out = np.asarray(bg.EncoderDecoderModel.from_pretrained(trained, quantize=mode).generate(
        ids, mask, max_new_tokens=40))
    a = agreement(ref, out, pad=0)
    assert a["token_agreement"] >= tokens and a["sequence_agreement"] >= sequences, a


def test_bertgen_generate_quantize_writes_the_quantized_models_outputs(trained, tmp_path):
    from bertgen_flax.training.data import synthetic_pairs
    sources = [p[0] for p in synthetic_pairs(4, task="fusion", seed=7)]
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n")
    assert cli.main(["generate", "--model", trained, "--input", str(tmp_path / "in.txt"), "--output",
                     str(tmp_path / "out.txt"), "--quantize", "int8", "--quiet"]) == 0
    lines = (tmp_path / "out.txt").read_text().splitlines()
    expected = bg.Text2TextGenerator.from_pretrained(trained, quantize="int8")(sources)
    assert lines == expected and len(lines) == 4


def test_bertgen_generate_rejects_an_unknown_quantization(trained):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--model", trained, "--quantize", "int3", "hello"])
    assert e.value.code == 2


MESH_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import numpy as np, jax
import bertgen_flax as bg
from jax.sharding import Mesh
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
ids = np.random.default_rng(0).integers(5, 99, (5, 9)); mask = np.ones_like(ids); mask[2, 4:] = 0
for mode in ("int8", "int4"):
    model = bg.EncoderDecoderModel.from_pretrained(sys.argv[1], quantize=mode)
    for kw in (dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3)):
        one = np.asarray(model.generate(ids, mask, **kw))
        many = np.asarray(model.generate(ids, mask, mesh=mesh, **kw))
        assert one.shape == many.shape and (one == many).all(), (mode, kw, one, many)
print("OK")
"""


def test_quantized_generation_sharded_over_a_device_mesh_equals_one_device():
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, _tiny_checkpoint()], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
