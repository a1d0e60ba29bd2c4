"""The Pallas attention kernel for NVIDIA GPUs (gpu_kernels.py), checked without a GPU: its program interpreted
by XLA equals XLA's attention, and inside whole models transformers' hidden states and generated tokens; it lowers
to a Triton kernel for CUDA; it is off unless asked for, and never runs on the CPU by itself."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bertgen_flax as bg
from bertgen_flax import generation, gpu_kernels
from bertgen_flax.modeling import _attention_context, _attention_scores, _masked_softmax

from conftest import seq2seq_checkpoint

HEAD16 = dict(num_attention_heads=2)  # TINY's hidden 32 over 2 heads: a head size of 16, the kernel's least


def _xla_attention(q, k, v, allowed):
    """The library's XLA attention (the reference and fallback), as modeling.Attention calls it."""
    scores = _attention_scores(q, k) / jnp.asarray(np.sqrt(q.shape[-1]), q.dtype)
    return _attention_context(_masked_softmax(scores, allowed[:, None, None, :], q.dtype), v)


def _inputs(b, g, n, s, d, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((b, g, n, d), (b, n, s, d), (b, n, s, d)))
    allowed = rng.random((b, s)) < 0.7
    allowed[:, 0] = True
    return q, k, v, jnp.asarray(allowed)


# (B, G, N, S, D): a decode step (one query, the cache longer than one key block and not a power of two), beams
# sharing a source, an encoder (queries over several query blocks), a head size of 64, keys fewer than 16
CASES = {"decode_step": (2, 1, 4, 130, 16), "beams": (3, 4, 2, 65, 32), "encoder": (2, 70, 2, 70, 16),
         "head64": (1, 1, 2, 33, 64), "few_keys": (2, 1, 2, 5, 16)}


@pytest.mark.parametrize("case", CASES)
def test_the_kernel_equals_xla_attention_in_float32(case):
    q, k, v, allowed = _inputs(*CASES[case])
    got = gpu_kernels.attend(q, k, v, allowed, interpret=True)
    want = jax.jit(_xla_attention)(q, k, v, allowed)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert float(jnp.abs(got - want).max()) <= 1e-6


def test_a_row_with_every_key_masked_averages_its_values_as_xla_does():
    q, k, v, allowed = _inputs(2, 1, 2, 40, 16)
    allowed = allowed.at[1].set(False)
    got = gpu_kernels.attend(q, k, v, allowed, interpret=True)
    np.testing.assert_allclose(got[1], jnp.broadcast_to(v[1].mean(axis=1)[None], got[1].shape), atol=1e-6)
    assert float(jnp.abs(got - jax.jit(_xla_attention)(q, k, v, allowed)).max()) <= 1e-6


def test_bfloat16_attention_is_float32_attention_rounded():
    q, k, v, allowed = _inputs(2, 4, 2, 100, 32, jnp.bfloat16)
    got = gpu_kernels.attend(q, k, v, allowed, interpret=True)
    exact = jax.jit(_xla_attention)(*(x.astype(jnp.float32) for x in (q, k, v)), allowed)
    assert got.dtype == jnp.bfloat16
    # float32 scores and softmax inside; the probabilities meet the values in bfloat16, the output is rounded once
    assert float(jnp.abs(got.astype(jnp.float32) - exact).max()) <= 2e-2 * float(jnp.abs(exact).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ["decode_step", "encoder"])
def test_the_kernel_lowers_to_a_triton_kernel_for_an_h100(case, dtype):
    # Lowered here for a GPU this machine does not have: an abstract H100 gives Pallas its compute capability.
    args = _inputs(*CASES[case], dtype=dtype)
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        text = jax.jit(gpu_kernels.attend).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("q_shape,k_shape,dtype", [((1, 1, 2, 8), (1, 2, 5, 8), jnp.float32),   # head size 8
                                                   ((1, 1, 2, 24), (1, 2, 5, 24), jnp.float32),  # not a power of 2
                                                   ((1, 1, 2, 16), (1, 2, 5, 16), jnp.int32)])
def test_shapes_the_kernel_does_not_take_are_refused_by_name(q_shape, k_shape, dtype):
    q, k = jnp.zeros(q_shape, dtype), jnp.zeros(k_shape, dtype)
    assert not gpu_kernels.supports(q, k, k)
    with pytest.raises(ValueError, match="Pallas attention takes"):
        gpu_kernels.attend(q, k, k, jnp.ones(k_shape[::2][:2], bool), interpret=True)


@pytest.mark.parametrize("k_shape,allowed_shape", [((2, 3, 5, 16), (2, 5)),    # heads differ from q's
                                                   ((2, 2, 5, 16), (2, 6))])   # the mask's keys differ
def test_attention_shapes_that_disagree_are_refused_by_name(k_shape, allowed_shape):
    q, k = jnp.zeros((2, 1, 2, 16)), jnp.zeros(k_shape)
    with pytest.raises(ValueError, match="attention shapes disagree"):
        gpu_kernels.attend(q, k, k, jnp.ones(allowed_shape, bool), interpret=True)


def test_the_switch_names_a_bad_value(monkeypatch):
    for value, mode in (("0", "off"), ("", "off"), ("1", "on"), ("interpret", "interpret")):
        monkeypatch.setenv(gpu_kernels.ENV, value)
        assert gpu_kernels.mode() == mode
    monkeypatch.setenv(gpu_kernels.ENV, "yes")
    with pytest.raises(ValueError, match="BERTGEN_PALLAS_ATTENTION='yes'"):
        gpu_kernels.mode()


def test_switched_on_the_kernel_stays_off_the_cpu(monkeypatch):
    monkeypatch.setenv(gpu_kernels.ENV, "1")
    q, k, v, allowed = _inputs(*CASES["decode_step"])
    assert not gpu_kernels.applies(q, k, v)  # this process's backend is the CPU
    from bertgen_flax import cpu_kernels
    text = jax.jit(lambda *a: cpu_kernels.attend_one(*a, _xla_attention)).lower(q, k, v, allowed).as_text()
    assert "triton" not in text


@pytest.fixture()
def interpreted(monkeypatch):
    """Every attention the kernel takes runs its interpreted program; counts the kernel's traces. Programs traced
    before or during the test are dropped, so no other test reuses one with (or without) the kernel."""
    traced = []
    attend = gpu_kernels.attend

    def counting(q, k, v, allowed, interpret=False):
        traced.append((q.shape, k.shape))
        return attend(q, k, v, allowed, interpret=interpret)

    generation._seq2seq_program.cache_clear()
    jax.clear_caches()
    monkeypatch.setenv(gpu_kernels.ENV, "interpret")
    monkeypatch.setattr(gpu_kernels, "attend", counting)
    yield traced
    generation._seq2seq_program.cache_clear()
    jax.clear_caches()


@pytest.fixture(scope="module")
def head16(tmp_path_factory):
    path = tmp_path_factory.mktemp("head16") / "ed"
    ref = seq2seq_checkpoint(path, seed=3, scale=0.1, enc=HEAD16, dec=dict(HEAD16, tie_word_embeddings=False))
    return ref, str(path)


def _source():
    rng = np.random.default_rng(5)
    ids = rng.integers(3, 99, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


def test_with_the_kernel_encoder_and_logits_equal_transformers(head16, interpreted):
    ref, path = head16
    ids, mask = _source()
    dec_ids = np.random.default_rng(6).integers(3, 99, (3, 5))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   decoder_input_ids=torch.tensor(dec_ids))
    got = bg.EncoderDecoderModel.from_pretrained(path)(ids, mask, dec_ids)
    assert interpreted, "the kernel was not traced"
    real = mask.astype(bool)
    assert np.abs(np.asarray(got.encoder_last_hidden_state)[real] -
                  want.encoder_last_hidden_state.numpy()[real]).max() <= 1e-5
    assert np.abs(np.asarray(got.logits) - want.logits.numpy()).max() <= 1e-5


@pytest.mark.parametrize("kw", [dict(max_new_tokens=10, min_new_tokens=10), dict(num_beams=3, max_new_tokens=10)],
                         ids=["greedy", "beam3"])
def test_with_the_kernel_generation_equals_transformers(head16, interpreted, kw):
    ref, path = head16
    ids, mask = _source()
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).numpy()
    got = np.asarray(bg.EncoderDecoderModel.from_pretrained(path).generate(ids, mask, **kw))
    queries = {q for q, _ in interpreted}
    assert any(q[1] == 1 for q in queries), f"no decode step ran the kernel: {queries}"
    assert want.shape == got.shape and (want == got).all(), f"\ntransformers:\n{want}\nours:\n{got}"


def test_with_the_kernel_on_training_gradients_are_xlas(head16, interpreted):
    _, path = head16
    model = bg.EncoderDecoderModel.from_pretrained(path)
    ids, mask = _source()
    labels = np.random.default_rng(7).integers(3, 99, (3, 6))

    def loss(params):
        return model.module.apply({"params": params}, ids, mask, labels=labels).loss

    with_kernel = jax.grad(loss)(model.params)
    assert interpreted
    generation._seq2seq_program.cache_clear()
    jax.clear_caches()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gpu_kernels.ENV, "0")
        without = jax.grad(loss)(model.params)
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), with_kernel, without)
    assert max(jax.tree_util.tree_leaves(diff)) <= 1e-5
