"""The CPU kernels (cpu_kernels.py): products, attention, beam reorder and candidates, argmax, packing. Exact
enough against float64 and XLA, actually used where they apply, differentiable where they must be, and optional."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bertgen_flax import cpu_kernels

from conftest import REPO


@pytest.fixture(scope="module")
def kernels():
    if cpu_kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine: the XLA fallback is what runs (tested below)")
    assert cpu_kernels.available(), "a compiler is present, so the kernels must build and register"


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


# Row counts across the streaming kernel's register blocks (1..6 rows and their remainders) and the packed kernel's
# (9 rows and up: blocks of up to 14, uneven splits), widths with and without a partial last block or panel,
# depths with and without a partial group of 8 and chunk of 128 rows.
SHAPES = [(1, 256, 256), (2, 384, 1536), (5, 1024, 4096), (6, 128, 64), (7, 100, 200), (13, 1030, 256),
          (32, 256, 1024), (3, 5, 3), (1, 8, 50358), (9, 64, 40), (100, 300, 70), (257, 1024, 96)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_nn_products_agree_with_float64_as_closely_as_xla(kernels, m, k, n):
    rng = np.random.default_rng(m * 1000 + k)
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    want = _reference(x, w)
    ours = np.asarray(jax.jit(cpu_kernels.matmul)(x, w))
    xla = np.asarray(jax.jit(jnp.dot)(x, w))
    scale = np.abs(want).max()
    assert ours.shape == want.shape
    assert np.abs(ours - want).max() <= max(2 * np.abs(xla - want).max(), 1e-6 * scale)
    assert np.abs(ours - want).max() / scale < 1e-6


@pytest.mark.parametrize("m,k,n", [(1, 256, 8000), (3, 1024, 50358), (8, 384, 380), (4, 7, 5), (2, 33, 9)])
def test_nt_products_agree_with_float64_as_closely_as_xla(kernels, m, k, n):
    rng = np.random.default_rng(m * 7 + n)
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
    want = _reference(x, w.T)
    ours = np.asarray(jax.jit(cpu_kernels.matmul_nt)(x, w))
    xla = np.asarray(jax.jit(lambda x, w: jnp.einsum("mk,nk->mn", x, w))(x, w))
    scale = np.abs(want).max()
    assert np.abs(ours - want).max() <= max(2 * np.abs(xla - want).max(), 1e-6 * scale)


def test_leading_axes_are_kept_and_rows_counted_across_them(kernels):
    x = np.random.default_rng(0).standard_normal((2, 3, 1, 64), np.float32)  # 6 rows
    w = np.random.default_rng(1).standard_normal((64, 128), np.float32)
    out = np.asarray(jax.jit(cpu_kernels.matmul)(x, w))
    np.testing.assert_allclose(out, np.einsum("abck,kn->abcn", x, w), rtol=1e-5, atol=1e-5)


def _custom_calls(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_few_rows_run_the_streaming_kernel_more_the_packed_one_and_bfloat16_xla(kernels):
    w = jnp.ones((64, 128), jnp.float32)
    small = _custom_calls(cpu_kernels.matmul, jnp.ones((cpu_kernels.MAX_ROWS, 64), jnp.float32), w)
    large = _custom_calls(cpu_kernels.matmul, jnp.ones((cpu_kernels.MAX_ROWS + 1, 64), jnp.float32), w)
    half = _custom_calls(cpu_kernels.matmul, jnp.ones((1, 64), jnp.bfloat16), w.astype(jnp.bfloat16))
    assert "bertgen_matmul_nn" in small and "bertgen_gemm_nn" not in small
    assert "bertgen_gemm_nn" in large and "bertgen_matmul_nn" not in large
    assert "bertgen_" not in half


def test_a_decode_step_of_the_model_runs_the_kernels(kernels, tmp_path):
    from conftest import seq2seq_checkpoint
    import bertgen_flax as bg
    seq2seq_checkpoint(str(tmp_path / "m"), enc=dict(hidden_size=64, intermediate_size=128),
                       dec=dict(hidden_size=64, intermediate_size=128))
    model = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "m"))
    ids = np.array([[5, 6, 7, 8]], np.int32)
    enc = model.encode(ids).last_hidden_state
    cache = model.init_cache(1, 4, 4)
    step = lambda p, c, t, e: model.module.apply({"params": p, "cache": c}, t, e, decode=True, mutable=["cache"],
                                                 method=type(model.module).decode)
    hlo = jax.jit(step).lower(model.params, cache, np.array([[2]], np.int32), enc).as_text()
    assert hlo.count("bertgen_matmul_nn") >= 4 and "bertgen_matmul_nt" in hlo and "bertgen_attend_one" in hlo


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(REPO),
                          env={**os.environ, **env})


PROBE = ("import jax, jax.numpy as jnp\nfrom bertgen_flax import cpu_kernels as ck\n"
         "print('available', ck.available())\n"
         "x, w = jnp.ones((2, 64)), jnp.ones((64, 128))\n"
         "print('calls', 'bertgen_matmul_nn' in jax.jit(ck.matmul).lower(x, w).as_text())\n"
         "print('sum', float(jax.jit(ck.matmul)(x, w).sum()))\n")


def test_turning_the_kernels_off_gives_xla_products_and_the_same_numbers():
    proc = _run(PROBE, BERTGEN_CPU_KERNELS="0")
    assert proc.returncode == 0, proc.stderr
    assert "available False" in proc.stdout and "calls False" in proc.stdout and "sum 16384.0" in proc.stdout


def test_a_failed_build_warns_names_the_compiler_error_and_falls_back(tmp_path):
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'cxx: error: no such toolchain' >&2\nexit 1\n")
    broken.chmod(0o755)
    proc = _run(PROBE, CXX=str(broken), BERTGEN_KERNEL_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert "available False" in proc.stdout and "calls False" in proc.stdout and "sum 16384.0" in proc.stdout
    assert "could not be built" in proc.stderr and "no such toolchain" in proc.stderr


def test_a_second_process_loads_the_built_library_instead_of_compiling(kernels, tmp_path):
    cache = tmp_path / "cache"
    first = _run(PROBE, BERTGEN_KERNEL_CACHE=str(cache))
    assert first.returncode == 0 and "available True" in first.stdout, first.stderr
    built = sorted(os.listdir(cache))
    assert len(built) == 1 and built[0].endswith(".so")
    stamp = os.stat(cache / built[0]).st_mtime_ns
    second = _run(PROBE, BERTGEN_KERNEL_CACHE=str(cache))
    assert "available True" in second.stdout and os.stat(cache / built[0]).st_mtime_ns == stamp
    assert sorted(os.listdir(cache)) == built


def test_gradients_through_the_kernels_are_xlas_gradients(kernels):
    rng = np.random.default_rng(3)
    x, w, wt = (rng.standard_normal(s, np.float32) for s in ((3, 128), (128, 192), (192, 128)))
    loss = lambda f, x, w: jnp.sum(jnp.sin(f(x, w)))
    for ours, xla, weight in [(cpu_kernels.matmul, jnp.dot, w),
                              (cpu_kernels.matmul_nt, lambda x, w: x @ w.T, wt)]:
        got = jax.grad(lambda x, w: loss(ours, x, w), argnums=(0, 1))(x, weight)
        want = jax.grad(lambda x, w: loss(xla, x, w), argnums=(0, 1))(x, weight)
        for g, e in zip(got, want):  # the forward products differ by float32 rounding, which sin() passes on
            assert np.abs(np.asarray(g) - np.asarray(e)).max() <= 1e-5 * np.abs(np.asarray(e)).max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("m,k,n", [(1, 256, 1024), (5, 1024, 4096), (3, 1024, 300), (32, 256, 256), (2, 6, 70),
                                   (33, 256, 256), (64, 256, 1024), (130, 1024, 300), (40, 6, 70)])
def test_quantized_products_read_the_integers_and_equal_the_widened_weights(kernels, mode, m, k, n):
    from bertgen_flax import quantization
    rng = np.random.default_rng(k + n)
    w, x = rng.standard_normal((k, n), np.float32), rng.standard_normal((m, k), np.float32)
    qk, qs = quantization.quantize_int8(w) if mode == "int8" else quantization.quantize_int4(w, 128)
    want = np.asarray(x, np.float64) @ np.asarray(quantization.dequantize_kernel(qk, qs), np.float64)
    dense = jax.jit(lambda x, a, b: quantization.quantized_dense(x, a, b, jnp.float32))
    got = np.asarray(dense(x, qk, qs))
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    kind = "gemm" if m > cpu_kernels.QUANTIZED_MAX_ROWS else "matmul"   # streamed, or widened while packed
    target = f"bertgen_{kind}_nn_{'i8' if mode == 'int8' else 'i4'}"
    assert target in dense.lower(x, qk, qs).as_text()


@pytest.mark.parametrize("rows,target", [(1, "bertgen_matmul_nt_i8"), (32, "bertgen_gemm_nt_i8"),
                                         (130, "bertgen_gemm_nt_i8")])
def test_the_int8_tied_head_reads_the_integer_table(kernels, rows, target):
    from bertgen_flax import quantization
    rng = np.random.default_rng(5)
    table, h = rng.standard_normal((8000, 256), np.float32), rng.standard_normal((rows, 1, 256), np.float32)
    q, s = quantization.quantize_int8(table, axis=-1)
    want = np.asarray(h, np.float64) @ (np.asarray(q, np.float64) * np.asarray(s, np.float64)[:, None]).T
    attend = jax.jit(lambda h, q, s: quantization.quantized_attend(h, q, s, jnp.float32))
    assert np.abs(np.asarray(attend(h, q, s)) - want).max() <= 1e-6 * np.abs(want).max()
    assert target in attend.lower(h, q, s).as_text()


def _attention_case(b: int, g: int, n: int, s: int, d: int, seed: int):
    """Random q [B, G, N, D], k and v [B, N, S, D], a key mask [B, S] and the XLA attention over them."""
    from bertgen_flax import modeling
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape, np.float32) for shape in ((b, g, n, d), (b, n, s, d), (b, n, s, d)))
    allowed = rng.random((b, s)) > 0.3
    scale = np.float32(np.sqrt(d))
    xla = lambda q, k, v, a: modeling._attention_context(
        modeling._masked_softmax(modeling._attention_scores(q, k) / scale, a[:, None, None, :], jnp.float32), v)
    return q, k, v, allowed, xla


def _check_fused_attention(q, k, v, allowed, xla):
    """The fused attention runs the kernel and gives the XLA attention's result within 2e-6 of its scale."""
    fused = jax.jit(lambda q, k, v, a: cpu_kernels.attend_one(q, k, v, a, xla))
    assert "bertgen_attend_one" in fused.lower(q, k, v, allowed).as_text()
    want, got = np.asarray(jax.jit(xla)(q, k, v, allowed)), np.asarray(fused(q, k, v, allowed))
    assert got.shape == want.shape == q.shape
    assert np.abs(got - want).max() <= 2e-6 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("b,g,n,s,d", [(3, 1, 4, 33, 64), (2, 4, 4, 64, 64), (1, 1, 16, 128, 64), (2, 1, 4, 9, 8),
                                       (2, 3, 2, 70, 32), (2, 1, 2, 5, 48)])
def test_fused_single_query_attention_equals_the_xla_attention(kernels, b, g, n, s, d):
    q, k, v, allowed, xla = _attention_case(b, g, n, s, d, seed=b * 100 + s)
    allowed[0] = False  # a row with every key masked: uniform weights, as the XLA path gives
    _check_fused_attention(q, k, v, allowed, xla)


def test_a_kernel_given_mismatched_shapes_names_what_it_expects(kernels):
    call = jax.ffi.ffi_call("bertgen_matmul_nn", jax.ShapeDtypeStruct((1, 3), jnp.float32))
    with pytest.raises(Exception, match=r"bertgen_matmul_nn: expects x \[M, K\] and w \[K, N\]"):
        jax.block_until_ready(jax.jit(call)(jnp.ones((1, 4)), jnp.ones((5, 3))))
    attend = jax.ffi.ffi_call("bertgen_attend_one", jax.ShapeDtypeStruct((1, 1, 2, 8), jnp.float32))
    with pytest.raises(Exception, match=r"bertgen_attend_one: expects q \[B, G, N, D\]"):
        jax.block_until_ready(jax.jit(attend)(jnp.ones((1, 1, 2, 8)), jnp.ones((1, 2, 5, 8)), jnp.ones((1, 2, 5, 8)),
                                              jnp.ones((1, 4), bool)))


# ---- the packed products' epilogues ----------------------------------------------------------------------------
def _gelu64(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


@pytest.mark.parametrize("m,k,n", [(9, 64, 40), (64, 256, 1024), (130, 200, 96)])
def test_a_dense_layer_with_its_bias_and_gelu_in_the_product_equals_float64(kernels, m, k, n):
    from bertgen_flax import modeling
    rng = np.random.default_rng(m + n)
    x, w, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32) / 8, \
        rng.standard_normal(n).astype(np.float32)
    fused = jax.jit(lambda x, w, b: cpu_kernels.dense(x, w, b, modeling.ACTIVATIONS["gelu"]))
    assert "bertgen_gemm_nn_bias" in fused.lower(x, w, b).as_text()
    z = np.asarray(x, np.float64) @ w + b
    got, want = np.asarray(fused(x, w, b)), _gelu64(z)
    xla = np.asarray(jax.jit(lambda x, w, b: modeling.ACTIVATIONS["gelu"](jnp.dot(x, w) + b))(x, w, b))
    assert np.abs(got - want).max() <= max(2 * np.abs(xla - want).max(), 1e-6 * np.abs(want).max())
    plain = np.asarray(jax.jit(lambda x, w, b: cpu_kernels.dense(x, w, b))(x, w, b))
    assert np.abs(plain - z).max() <= 1e-6 * np.abs(z).max()


def test_the_kernels_gelu_is_within_5e7_of_the_exact_one_everywhere(kernels):
    from bertgen_flax import modeling
    x = np.linspace(-12, 12, 48001, dtype=np.float32).reshape(-1, 1)   # x @ [[1]] + 0: the GELU of x itself
    got = np.asarray(jax.jit(lambda x: cpu_kernels.dense(x, jnp.ones((1, 1)), jnp.zeros(1),
                                                         modeling.ACTIVATIONS["gelu"]))(jnp.tile(x, (1, 1))))
    assert np.abs(got - _gelu64(x.astype(np.float64))).max() <= 5e-7


@pytest.mark.parametrize("heads,d", [(4, 64), (2, 32), (3, 20)])
def test_keys_and_values_come_out_head_major_as_attention_reads_them(kernels, heads, d):
    rng = np.random.default_rng(heads * d)
    x, w, b = rng.standard_normal((3, 17, 48), np.float32), rng.standard_normal((48, heads * d), np.float32), \
        rng.standard_normal(heads * d).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, w, b: cpu_kernels.dense_heads(x, w, b, heads))(x, w, b))
    want = (np.asarray(x, np.float64) @ w + b).reshape(3, 17, heads, d).transpose(0, 2, 1, 3)
    assert got.shape == (3, heads, 17, d)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    direct = "bertgen_gemm_nn_bias" in jax.jit(lambda x, w, b: cpu_kernels.dense_heads(x, w, b, heads)).lower(
        x, w, b).as_text()
    assert direct == (d % cpu_kernels._PANEL == 0)  # other head sizes: the product, then XLA's transpose


def test_gradients_through_the_fused_layers_are_the_reference_gradients(kernels):
    from bertgen_flax import modeling
    rng = np.random.default_rng(8)
    x, w, b = rng.standard_normal((2, 12, 32), np.float32), rng.standard_normal((32, 64), np.float32) / 6, \
        rng.standard_normal(64).astype(np.float32)
    gelu = modeling.ACTIVATIONS["gelu"]
    cases = [(lambda x, w, b: cpu_kernels.dense(x, w, b, gelu), lambda x, w, b: gelu(x @ w + b)),
             (lambda x, w, b: cpu_kernels.dense_heads(x, w, b, 2),
              lambda x, w, b: (x @ w + b).reshape(2, 12, 2, 32).transpose(0, 2, 1, 3))]
    for ours, ref in cases:
        loss = lambda f: (lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b))))
        got = jax.grad(loss(ours), argnums=(0, 1, 2))(x, w, b)
        want = jax.grad(loss(ref), argnums=(0, 1, 2))(x, w, b)
        for g, e in zip(got, want):
            assert np.abs(np.asarray(g) - np.asarray(e)).max() <= 1e-5 * np.abs(np.asarray(e)).max()


# ---- attention over many queries, beam reorder, argmax ---------------------------------------------------------
@pytest.mark.parametrize("b,g,n,s,d", [(2, 64, 4, 64, 64), (3, 9, 2, 20, 32), (1, 40, 3, 7, 16)])
def test_attention_of_many_queries_equals_the_xla_attention_and_differentiates_as_it(kernels, b, g, n, s, d):
    q, k, v, allowed, xla = _attention_case(b, g, n, s, d, seed=b * g + s)
    allowed[:, 0] = True
    _check_fused_attention(q, k, v, allowed, xla)
    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, allowed))))
    got_g = jax.grad(loss(lambda *a: cpu_kernels.attend_one(*a, xla)), argnums=(0, 1, 2))(q, k, v)
    want_g = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for a, e in zip(got_g, want_g):
        assert np.abs(np.asarray(a) - np.asarray(e)).max() <= 1e-5 * np.abs(np.asarray(e)).max()


def test_the_beam_reorder_moves_the_written_positions_of_the_rows_that_change(kernels):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 2, 10, 16)).astype(np.float32)
    rows = np.array([0, 0, 1, 5, 3, 3], np.int32)      # a beam search's parents: repeats, self-continuations
    got = np.asarray(jax.jit(cpu_kernels.reorder_rows)(x, rows, np.int32(4)))
    np.testing.assert_array_equal(got[:, :, :4], x[rows][:, :, :4])
    np.testing.assert_array_equal(got[:, :, 4:], x[:, :, 4:])   # not written yet: left as they were
    assert "bertgen_reorder_rows" in jax.jit(cpu_kernels.reorder_rows).lower(x, rows, np.int32(4)).as_text()
    with pytest.raises(Exception, match="bertgen_reorder_rows: a row index is out of range"):
        jax.block_until_ready(jax.jit(cpu_kernels.reorder_rows)(x, np.array([0, 1, 2, 3, 4, 6], np.int32), 4))


def test_argmax_picks_the_first_maximum_or_the_first_nan_as_jnp_argmax(kernels):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[0, 7] = x[0, 900] = 50.0                         # a tie: the first wins
    x[1, 300], x[1, 600] = np.nan, np.nan               # NaN: the first NaN
    x[2] = -np.inf                                      # nothing but -inf: index 0
    x[3, 999] = 60.0                                    # in the tail past the last whole vector
    x[4, :3] = np.nan
    from bertgen_flax import decoding
    argmax = jax.jit(decoding.first_argmax)
    assert "bertgen_argmax_rows" in argmax.lower(x).as_text()
    np.testing.assert_array_equal(np.asarray(argmax(x)), np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    odd = rng.standard_normal((3, 37)).astype(np.float32)  # a width that is no multiple of the vector
    np.testing.assert_array_equal(np.asarray(argmax(odd)), np.argmax(odd, axis=-1))


@pytest.mark.parametrize("spin_us", [0, 50])
def test_products_from_several_threads_at_once_are_each_right_whether_pool_threads_linger_or_not(kernels, spin_us):
    import threading
    rng = np.random.default_rng(12)
    cases = [(rng.standard_normal((m, 256)).astype(np.float32), rng.standard_normal((256, 384)).astype(np.float32))
             for m in (1, 8, 64, 200)]
    products = [jax.jit(cpu_kernels.matmul) for _ in cases]
    want = [x.astype(np.float64) @ w.astype(np.float64) for x, w in cases]
    errors = []

    def work(i):
        for _ in range(30):
            got = np.asarray(products[i](*cases[i]))
            if np.abs(got - want[i]).max() > 1e-3:
                errors.append((i, np.abs(got - want[i]).max()))

    cpu_kernels.set_spin_us(spin_us)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        cpu_kernels.set_spin_us(cpu_kernels.SPIN_US)
    assert not errors


def _beam_scores_then_top_k(x, running, eos, ban, count):
    """The XLA path of beam search: log_softmax, EOS banned, + running scores, jax.lax.top_k over k * V."""
    b, k, v = x.shape
    log_probs = jax.nn.log_softmax(x, axis=-1)
    log_probs = jnp.where(ban & jnp.isin(jnp.arange(v), eos), -jnp.inf, log_probs)
    return tuple(jax.lax.top_k((log_probs + running[:, :, None]).reshape(b, k * v), count))


@pytest.mark.parametrize("b,k,v,count", [(32, 4, 8000, 8), (3, 2, 37, 4), (2, 3, 5, 15), (1, 1, 16, 1)])
@pytest.mark.parametrize("ban", [False, True])
def test_beam_candidates_are_the_top_k_of_the_log_softmax_plus_the_running_scores(kernels, b, k, v, count, ban):
    rng = np.random.default_rng(11)
    x = 3 * rng.standard_normal((b, k, v)).astype(np.float32)
    x[0, 0, min(2, v - 1)] = x[0, 0, v - 1] = 40.0     # a tie: the lower index first
    running = rng.standard_normal((b, k)).astype(np.float32)
    running[:, 1:] = -1e9                               # the first step: only beam 0 is live
    eos, flag = jnp.array([1, 3, v + 5], jnp.int32), jnp.array(ban)  # an id past the vocabulary is ignored
    fused = jax.jit(lambda *a: cpu_kernels.beam_candidates(*a, count, lambda *o: _beam_scores_then_top_k(*o, count)))
    assert "bertgen_beam_candidates" in fused.lower(x, running, eos, flag).as_text()
    values, indices = (np.asarray(a) for a in fused(x, running, eos, flag))
    want_values, want_indices = (np.asarray(a) for a in _beam_scores_then_top_k(x, running, eos, flag, count))
    np.testing.assert_array_equal(indices, want_indices)
    ulp = np.finfo(np.float32).eps * np.abs(x).max()   # the log-sum-exp's rounding: ulps of the largest logit
    np.testing.assert_allclose(values, want_values, rtol=0, atol=4 * ulp)
    assert values.dtype == np.float32 and indices.dtype == np.int32
    if ban:  # banned candidates are -inf: chosen only when fewer than `count` others exist
        assert np.isneginf(values[np.isin(indices % v, [1, 3])]).all()


def test_a_nan_logit_makes_its_rows_candidates_nan_ranked_first_as_torch_log_softmax(kernels):
    x = np.zeros((2, 2, 6), np.float32)
    x[0, 1, 4] = np.nan                                 # input 0, beam 1
    running = np.zeros((2, 2), np.float32)
    values, indices = cpu_kernels.beam_candidates(jnp.asarray(x), jnp.asarray(running), jnp.array([0], jnp.int32),
                                                  jnp.array(True), 3,
                                                  lambda *o: _beam_scores_then_top_k(*o, 3))
    np.testing.assert_array_equal(np.asarray(indices)[0], [7, 8, 9])   # beam 1's first columns; EOS (6) banned
    assert np.isnan(np.asarray(values)[0]).all() and np.isfinite(np.asarray(values)[1]).all()


def test_beam_search_fuses_its_candidates_unless_a_processor_needs_the_scores(kernels):
    from bertgen_flax import decoding
    base = decoding.GenerationConfig(num_beams=4, max_length=8, min_new_tokens=2, eos_token_id=1)
    spec = decoding.SearchSpec.build(base, prompt_length=1)
    assert decoding._only_eos_bans(spec)
    for change in (dict(repetition_penalty=1.2), dict(no_repeat_ngram_size=2), dict(bad_words_ids=((5,),)),
                   dict(forced_eos_token_id=1), dict(do_sample=True)):
        spec = decoding.SearchSpec.build(base.merged(**change), prompt_length=1)
        assert not decoding._only_eos_bans(spec), change


def test_training_products_run_xla_forward_and_backward(kernels):
    # a training step runs XLA's products forward and backward (the kernel forward measured neutral there)
    x, w = jnp.ones((64, 48)), jnp.ones((48, 40))
    loss = lambda x, w: (cpu_kernels.matmul(x, w) ** 2).sum() + (cpu_kernels.matmul_nt(x, w.T) ** 2).sum()
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    assert "bertgen_" not in hlo
    assert "bertgen_gemm_nn" in jax.jit(cpu_kernels.matmul).lower(x, w).as_text()   # inference keeps the kernel


# ---- weights packed beforehand (per generate call, or per model) ---------------------------------------------------
def test_packed_weights_give_the_products_of_the_weights_as_stored(kernels):
    from bertgen_flax import modeling
    rng = np.random.default_rng(11)
    x, w, table, b = (rng.standard_normal(shape).astype(np.float32) for shape in ((16, 48), (48, 70), (70, 48), (70,)))
    panel = cpu_kernels._PANEL
    packed = np.asarray(jax.jit(cpu_kernels.pack_kernel)(w))
    assert packed.shape == (-(-70 // panel), 48, panel)
    np.testing.assert_array_equal(packed.transpose(1, 0, 2).reshape(48, -1)[:, :70], w)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.pack_table)(table)),  # a table is w^T
                                  np.asarray(jax.jit(cpu_kernels.pack_kernel)(table.T)))
    gelu = modeling.ACTIVATIONS["gelu"]
    got = np.asarray(jax.jit(lambda x, p, b: cpu_kernels.packed_dense(x, p, b, 70, gelu))(x, packed, b))
    want = _gelu64(np.asarray(x, np.float64) @ w + b)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    assert "bertgen_gemm_packed" in jax.jit(lambda x, p, b: cpu_kernels.packed_dense(x, p, b, 70)).lower(
        x, packed, b).as_text()


@pytest.mark.parametrize("m,k,n", [(300, 64, 40), (1000, 256, 96), (2000, 1024, 64), (70, 48, 33)])
def test_packed_products_with_more_rows_than_columns_split_the_rows_and_agree(kernels, m, k, n):
    rng = np.random.default_rng(m + n)
    x, w, b = (rng.standard_normal(shape).astype(np.float32) for shape in ((m, k), (k, n), (n,)))
    got = np.asarray(jax.jit(lambda x, w, b: cpu_kernels.packed_dense(x, cpu_kernels.pack_kernel(w), b, n))(x, w, b))
    want = np.asarray(x, np.float64) @ w + b
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_packing_a_decoder_for_its_steps_keeps_its_logits(kernels, tmp_path):
    from conftest import seq2seq_checkpoint
    import bertgen_flax as bg
    seq2seq_checkpoint(str(tmp_path / "m"), enc=dict(hidden_size=64, intermediate_size=128),
                       dec=dict(hidden_size=64, intermediate_size=128))
    model = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "m"), scan_layers=False)
    ids = np.random.default_rng(12).integers(5, 90, (12, 6)).astype(np.int32)
    enc = model.encode(ids).last_hidden_state
    tokens = np.full((12, 1), 2, np.int32)
    step = lambda p, c: model.module.apply({"params": p, "cache": c}, tokens, enc, decode=True, mutable=["cache"],
                                           method=type(model.module).decode)[0].logits
    packed = dict(model.params, decoder=cpu_kernels.pack_for_steps(model.params["decoder"], True))
    leaves = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(packed)}
    assert any(p.endswith("query/pkernel") for p in leaves) and not any("decoder" in p and p.endswith("/kernel")
                                                                      for p in leaves)
    assert any(p.endswith("word_embeddings/pembedding") for p in leaves)
    cache = model.init_cache(12, 4, 6)
    hlo = jax.jit(step).lower(packed, cache).as_text()
    assert "bertgen_gemm_packed" in hlo
    want, got = np.asarray(jax.jit(step)(model.params, cache)), np.asarray(jax.jit(step)(packed, cache))
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_packed_products_write_keys_and_values_head_major(kernels):
    rng = np.random.default_rng(31)
    panel = cpu_kernels._PANEL
    heads, dh = 3, panel
    x = rng.standard_normal((2, 11, 40), np.float32)
    w, b = rng.standard_normal((40, heads * dh), np.float32), rng.standard_normal(heads * dh).astype(np.float32)
    fn = jax.jit(lambda x, p, b: cpu_kernels.packed_dense(x, p, b, heads * dh, heads=heads))
    packed = jax.jit(cpu_kernels.pack_kernel)(w)
    got = np.asarray(fn(x, packed, b))                                          # [B, N, S, D]
    want = (np.asarray(x, np.float64) @ w + b).reshape(2, 11, heads, dh).transpose(0, 2, 1, 3)
    assert got.shape == (2, heads, 11, dh)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    hlo = fn.lower(x, packed, b).as_text()
    assert "bertgen_gemm_packed" in hlo and "transpose" not in hlo


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("m,k,n", [(9, 64, 40), (32, 256, 256), (33, 256, 300), (130, 1024, 300), (2000, 256, 64),
                                   (12, 6, 70)])
def test_quantized_weights_packed_once_are_widened_in_registers_with_bias_and_gelu(kernels, mode, m, k, n):
    from bertgen_flax import modeling, quantization
    rng = np.random.default_rng(m + k + n)
    w, x, b = (rng.standard_normal(shape).astype(np.float32) for shape in ((k, n), (m, k), (n,)))
    q, s = quantization.quantize_int8(w) if mode == "int8" else quantization.quantize_int4(w, 128)
    dense = cpu_kernels.pack_kernels({"d": {"qkernel": q, "qscale": s, "bias": b}}, False)["d"]
    assert "qkernel" not in dense and dense["pqkernel"].dtype == q.dtype                # the integers, in panels
    assert dense["pqkernel"].shape == (-(-n // cpu_kernels._PANEL), q.shape[0], cpu_kernels._PANEL)
    scale = dense["pqscale"] if mode == "int4" else dense["qscale"]
    y = np.asarray(x, np.float64) @ np.asarray(quantization.dequantize_kernel(q, s), np.float64) + b
    for act, want in ((None, y), (modeling.ACTIVATIONS["gelu"], _gelu64(y))):
        fn = jax.jit(lambda x, p, s, b: cpu_kernels.packed_dense(x, p, b, n, act, scale=s))
        assert f"bertgen_gemm_packed_{'i8' if mode == 'int8' else 'i4'}" in fn.lower(
            x, dense["pqkernel"], scale, b).as_text()
        got = np.asarray(fn(x, dense["pqkernel"], scale, b))
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("in_panels", [True, False])   # a head of 20 values: XLA widens and transposes instead
def test_packed_quantized_keys_and_values_come_out_head_major(kernels, mode, in_panels):
    from bertgen_flax import quantization
    rng = np.random.default_rng(32)
    heads, dh = 3, cpu_kernels._PANEL if in_panels else 20
    x = rng.standard_normal((2, 11, 40), np.float32)
    w, b = rng.standard_normal((40, heads * dh), np.float32), rng.standard_normal(heads * dh).astype(np.float32)
    q, s = quantization.quantize_int8(w) if mode == "int8" else quantization.quantize_int4(w, 20)
    dense = cpu_kernels.pack_kernels({"d": {"qkernel": q, "qscale": s, "bias": b}}, False)["d"]
    scale = dense.get("pqscale", dense["qscale"])
    fn = jax.jit(lambda x, p, s, b: cpu_kernels.packed_dense(x, p, b, heads * dh, heads=heads, scale=s))
    got = np.asarray(fn(x, dense["pqkernel"], scale, b))                                # [B, N, S, D]
    flat = np.asarray(x, np.float64) @ np.asarray(quantization.dequantize_kernel(q, s), np.float64) + b
    want = flat.reshape(2, 11, heads, dh).transpose(0, 2, 1, 3)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    hlo = fn.lower(x, dense["pqkernel"], scale, b).as_text()
    assert (f"bertgen_gemm_packed_{'i8' if mode == 'int8' else 'i4'}" in hlo) == in_panels
    assert ("transpose" not in hlo) == in_panels


def test_packed_panels_given_the_wrong_scales_say_what_they_need(kernels):
    x, wp, b = jnp.ones((9, 4)), jnp.ones((1, 4, cpu_kernels._PANEL), jnp.int8), jnp.ones(5)
    with pytest.raises(ValueError, match=r"int8 panels need scales"):
        cpu_kernels.packed_dense(x, wp, b, 5)
    with pytest.raises(ValueError, match=r"float32 panels take no scales"):
        cpu_kernels.packed_dense(x, wp.astype(jnp.float32), b, 5, scale=jnp.ones(5))
    with pytest.raises(ValueError, match=r"int16 panels are not a packed form"):
        cpu_kernels.packed_dense(x, wp.astype(jnp.int16), b, 5)


def test_an_int8_table_packed_for_the_tied_head_gives_its_logits(kernels):
    from bertgen_flax import quantization
    rng = np.random.default_rng(6)
    table, h, bias = (rng.standard_normal(shape).astype(np.float32) for shape in ((8000, 256), (32, 1, 256), (8000,)))
    q, s = quantization.quantize_int8(table, axis=-1)
    tree = cpu_kernels.pack_kernels({"word_embeddings": {"qembedding": q, "qscale": s}}, True)["word_embeddings"]
    assert tree["qembedding"] is q and tree["pqembedding"].dtype == jnp.int8            # lookups keep the table
    fn = jax.jit(lambda h, p, s, b: cpu_kernels.packed_dense(h, p, b, 8000, scale=s))
    want = np.asarray(h, np.float64) @ (np.asarray(q, np.float64) * np.asarray(s, np.float64)[:, None]).T + bias
    got = np.asarray(fn(h, tree["pqembedding"], s, bias))
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    assert "bertgen_gemm_packed_i8" in fn.lower(h, tree["pqembedding"], s, bias).as_text()


@pytest.mark.parametrize("mode,batch", [("int8", 12), ("int4", 12), ("int8", 2)])
def test_a_quantized_model_packs_its_integer_weights_once_and_keeps_the_tokens(kernels, tmp_path, mode, batch):
    from conftest import seq2seq_checkpoint
    import bertgen_flax as bg
    seq2seq_checkpoint(str(tmp_path / "m"), enc=dict(hidden_size=64, intermediate_size=128),
                       dec=dict(hidden_size=64, intermediate_size=128))
    model = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "m"), scan_layers=False).quantize(mode)
    # the decoder's steps read integer panels too: from 2 rows (float32 weights: from 9)
    assert cpu_kernels.packing_pays(batch, quantized=True) and not cpu_kernels.packing_pays(2)
    assert not cpu_kernels.packing_pays(1, quantized=True)
    ids, mask = _generate_inputs(batch)
    kw = dict(max_new_tokens=6, min_new_tokens=6)
    first = np.asarray(model.generate(ids, mask, **kw))
    tree = model._packed._trees[(True, True, True, False)]
    leaves = {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    assert not any(p.endswith("/qkernel") for p in leaves)                            # every product packed
    assert leaves["encoder/encoder/layer_0/intermediate/dense/pqkernel"].dtype == (
        jnp.int8 if mode == "int8" else jnp.uint8)
    assert leaves["decoder/bert/embeddings/word_embeddings/pqembedding"].dtype == jnp.int8
    np.testing.assert_array_equal(first, np.asarray(model.generate(ids, mask, pack_weights=False, **kw)))


def _generate_inputs(batch: int):
    rng = np.random.default_rng(batch)
    ids = rng.integers(5, 90, (batch, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    return ids, mask


def _unpacked_generate(model, ids, mask, **kw) -> np.ndarray:
    """The pure entry point without a ``PackedWeights``: weights packed inside the call, as before."""
    from bertgen_flax.generation import seq2seq_generate
    config = model.generation_defaults().merged(**kw)
    return np.asarray(seq2seq_generate(model.module, model.params, ids, mask, config,
                                       max_positions=model.config.decoder.max_position_embeddings))


def _kernel_leaves(tree) -> dict:
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if str(path[-1].key) in ("kernel", "pkernel", "pembedding")}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_generate_packs_the_weights_once_per_params_tree_and_keeps_the_tokens(kernels, tmp_path, scan_layers):
    from conftest import seq2seq_checkpoint
    import bertgen_flax as bg
    seq2seq_checkpoint(str(tmp_path / "m"), enc=dict(hidden_size=64, intermediate_size=128),
                       dec=dict(hidden_size=64, intermediate_size=128))
    model = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "m"), scan_layers=scan_layers)
    for batch, steps in ((1, False), (12, True)):   # 12 rows: the decoder's steps read packed weights too
        ids, mask = _generate_inputs(batch)
        kw = dict(max_new_tokens=6, min_new_tokens=6)
        first = np.asarray(model.generate(ids, mask, **kw))
        tree = model._packed._trees[(steps, True, True, scan_layers)]
        packed = _kernel_leaves(tree)
        assert all(p.endswith("/pkernel") for p in packed if p.startswith("encoder/"))
        cross = [p for p in packed if "crossattention" in p and ("/key/" in p or "/value/" in p)]
        assert cross and all(p.endswith("/pkernel") for p in cross)
        step = [p for p in packed if p.startswith("decoder/") and "/intermediate/" in p]
        assert all(p.endswith("/pkernel" if steps else "/kernel") for p in step)
        assert any(p.endswith("pembedding") for p in packed) == steps
        own = [p for p in packed if p.startswith("decoder/") and "/attention/self/" in p]
        assert own and all("/self/qkv/" in p for p in own)                    # one product for q, k and v
        # a scanned model's decoder comes unstacked (its steps run unrolled); the encoder stays as stored
        assert not any(p.startswith("decoder/") and "/layer/" in p for p in packed)
        assert any(p.startswith("encoder/") and "/layer/" in p for p in packed) == scan_layers
        again = np.asarray(model.generate(ids, mask, **kw))
        assert model._packed._trees[(steps, True, True, scan_layers)] is tree  # packed once, not per call
        unpacked = _unpacked_generate(model, ids, mask, **kw)
        np.testing.assert_array_equal(first, unpacked)
        np.testing.assert_array_equal(again, unpacked)
    if not scan_layers:  # the steps' tree shares the encoder's packed copy with the batch-1 tree
        a, b = (_kernel_leaves(model._packed._trees[(s, True, True, False)]) for s in (False, True))
        key = "encoder/encoder/layer_0/intermediate/dense/pkernel"
        assert a[key] is b[key]
    without = np.asarray(model.generate(ids, mask, pack_weights=False, **kw))   # no copy kept, the same tokens
    assert model._packed._trees == {}
    np.testing.assert_array_equal(without, unpacked)


def test_a_params_tree_edited_in_place_or_replaced_is_packed_again(kernels, tmp_path):
    from conftest import seq2seq_checkpoint
    import bertgen_flax as bg
    seq2seq_checkpoint(str(tmp_path / "m"), enc=dict(hidden_size=64, intermediate_size=128),
                       dec=dict(hidden_size=64, intermediate_size=128))
    model = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "m"), scan_layers=False)
    ids, mask = _generate_inputs(1)
    kw = dict(max_new_tokens=5, min_new_tokens=5)
    before = np.asarray(model.generate(ids, mask, **kw))
    ffn = model.params["encoder"]["encoder"]["layer_0"]["intermediate"]["dense"]
    ffn["kernel"] = ffn["kernel"] * 3.0                                          # edited in place
    edited = np.asarray(model.generate(ids, mask, **kw))
    np.testing.assert_array_equal(edited, _unpacked_generate(model, ids, mask, **kw))
    assert not np.array_equal(edited, before)   # the edit changes the tokens, so a stale copy would be caught
    replaced = jax.tree_util.tree_map(lambda x: x * 0.5, model.params)
    model.params = replaced
    assert model._packed._trees == {}                                            # dropped on assignment
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, **kw)),
                                  _unpacked_generate(model, ids, mask, **kw))


# ---- LayerNorm ----------------------------------------------------------------------------------------------
def _flax_layer_norm(x, scale, bias, eps):
    import flax.linen as nn
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False).apply({"params": {"scale": scale, "bias": bias}}, x)


@pytest.mark.parametrize("shape", [(1, 256), (3, 7, 100), (64, 1024), (5, 1), (2048, 256)])
def test_layer_norm_of_a_residual_sum_agrees_with_flax_two_pass_layer_norm(kernels, shape):
    rng = np.random.default_rng(shape[-1])
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    r = rng.standard_normal(shape).astype(np.float32)
    g, b = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    want = np.asarray(_flax_layer_norm(x + r, g, b, 1e-12), np.float64)
    with_residual = jax.jit(lambda x, r, g, b: cpu_kernels.layer_norm(x, r, g, b, 1e-12))
    alone = jax.jit(lambda x, g, b: cpu_kernels.layer_norm(x, None, g, b, 1e-12))
    for got in (with_residual(x, r, g, b), alone(x + r, g, b)):
        assert got.shape == shape and got.dtype == jnp.float32
        assert np.abs(np.asarray(got) - want).max() <= 1e-6 * max(1.0, np.abs(want).max())
    assert "bertgen_add_layer_norm" in with_residual.lower(x, r, g, b).as_text()
    assert "bertgen_layer_norm" in alone.lower(x + r, g, b).as_text()


def test_layer_norm_is_differentiated_as_flax_layer_norm(kernels):
    rng = np.random.default_rng(3)
    args = [rng.standard_normal(s).astype(np.float32) for s in ((4, 32), (4, 32), (32,), (32,))]
    ours = lambda x, r, g, b: (cpu_kernels.layer_norm(x, r, g, b, 1e-5) ** 3).sum()
    ref = lambda x, r, g, b: (_flax_layer_norm(x + r, g, b, 1e-5) ** 3).sum()
    for a, b in zip(jax.grad(ours, argnums=(0, 1, 2, 3))(*args), jax.grad(ref, argnums=(0, 1, 2, 3))(*args)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_layer_norm_names_what_it_expects_when_shapes_mismatch(kernels):
    norm = jax.ffi.ffi_call("bertgen_add_layer_norm", jax.ShapeDtypeStruct((2, 4), jnp.float32))
    with pytest.raises(Exception, match=r"bertgen_add_layer_norm: expects x and residual of one shape"):
        jax.block_until_ready(jax.jit(lambda *a: norm(*a, eps=np.float32(1e-5)))(
            jnp.ones((2, 4)), jnp.ones((2, 3)), jnp.ones(4), jnp.ones(4)))
    plain = jax.ffi.ffi_call("bertgen_layer_norm", jax.ShapeDtypeStruct((2, 4), jnp.float32))
    with pytest.raises(Exception, match=r"bertgen_layer_norm: expects x \[M, N\] with N > 0, scale \[N\]"):
        jax.block_until_ready(jax.jit(lambda *a: plain(*a, eps=np.float32(1e-5)))(
            jnp.ones((2, 4)), jnp.ones(3), jnp.ones(4)))


def test_the_new_kernels_name_what_they_expect_when_shapes_mismatch(kernels):
    packed = jax.ffi.ffi_call("bertgen_gemm_packed", jax.ShapeDtypeStruct((2, 5), jnp.float32))
    with pytest.raises(Exception, match=r"bertgen_gemm_packed: expects x \[M, K\], packed w \[P, K"):
        jax.block_until_ready(jax.jit(lambda *a: packed(*a, act=np.int64(0)))(
            jnp.ones((2, 4)), jnp.ones((1, 3, cpu_kernels._PANEL)), jnp.ones(5)))
    bias = jax.ffi.ffi_call("bertgen_gemm_nn_bias", jax.ShapeDtypeStruct((2, 3), jnp.float32))
    with pytest.raises(Exception, match=r"bertgen_gemm_nn_bias: expects a bias \[N\] for w \[K, N\]"):
        jax.block_until_ready(jax.jit(lambda *a: bias(*a, act=np.int64(0)))(jnp.ones((2, 4)), jnp.ones((4, 3)),
                                                                             jnp.ones(2)))
    int8 = jax.ffi.ffi_call("bertgen_gemm_nn_i8", jax.ShapeDtypeStruct((20, 3), jnp.float32))
    with pytest.raises(Exception, match=r"bertgen_gemm_nn_i8: expects x \[M, K\], q \[K, N\] int8"):
        jax.block_until_ready(jax.jit(int8)(jnp.ones((20, 6)), jnp.ones((5, 3), jnp.int8)))
    table = jax.ffi.ffi_call("bertgen_gemm_nt_i8", jax.ShapeDtypeStruct((20, 3), jnp.float32))
    with pytest.raises(Exception, match=r"bertgen_gemm_nt_i8: expects x \[M, K\], q \[N, K\] int8"):
        jax.block_until_ready(jax.jit(table)(jnp.ones((20, 6)), jnp.ones((3, 5), jnp.int8)))
    out = (jax.ShapeDtypeStruct((2, 9), jnp.float32), jax.ShapeDtypeStruct((2, 9), jnp.int32))
    candidates = jax.ffi.ffi_call("bertgen_beam_candidates", out)   # 9 candidates of 2 x 4 values: too many
    with pytest.raises(Exception, match=r"bertgen_beam_candidates: expects x \[B, K, V\].*1 <= C <= K \* V"):
        jax.block_until_ready(jax.jit(candidates)(jnp.ones((2, 2, 4)), jnp.ones((2, 2)), jnp.ones(1, jnp.int32),
                                                  jnp.zeros((), jnp.int32)))
    panel = cpu_kernels._PANEL
    for target, wp, scale, message in (
            ("bertgen_gemm_packed_i8", jnp.ones((1, 4, panel), jnp.int8), jnp.ones(4),
             r"bertgen_gemm_packed_i8: expects x \[M, K\], int8 panels \[P, K, panel width"),
            ("bertgen_gemm_packed_i4", jnp.ones((1, 2, panel), jnp.uint8), jnp.ones((1, 3, panel)),
             r"bertgen_gemm_packed_i4: expects x \[M, K\], int4 panels \[P, K / 2, panel width.*even g")):
        fn = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((2, 5), jnp.float32))
        with pytest.raises(Exception, match=message):   # scales of 4 columns for a bias of 5 / 3 groups of K = 4
            jax.block_until_ready(jax.jit(lambda *a: fn(*a, act=np.int64(0)))(jnp.ones((2, 4)), wp, scale,
                                                                                jnp.ones(5)))
    int4 = jax.ffi.ffi_call("bertgen_gemm_nn_i4", jax.ShapeDtypeStruct((20, 3), jnp.float32))
    with pytest.raises(Exception, match=r"bertgen_gemm_nn_i4: expects x \[M, K\], packed q \[K/2, N\]"):
        jax.block_until_ready(jax.jit(int4)(jnp.ones((20, 6)), jnp.ones((2, 3), jnp.uint8), jnp.ones((1, 3))))


def test_packing_without_the_kernels_says_why(tmp_path):
    code = ("from bertgen_flax import cpu_kernels as ck\nimport jax.numpy as jnp\n"
            "try:\n    ck.pack_kernel(jnp.ones((4, 4)))\nexcept RuntimeError as e:\n    print('refused', e)\n")
    proc = _run(code, BERTGEN_CPU_KERNELS="0")
    assert proc.returncode == 0, proc.stderr
    assert "refused packing weights needs the CPU kernels" in proc.stdout
