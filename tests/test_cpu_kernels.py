"""The CPU kernels for products of few rows (cpu_kernels.py): exact enough, actually used, and optional."""
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


# Row counts across the register blocks (1..6 rows and their remainders), widths with and without a partial last
# block of 64 columns, depths with and without a partial group of 8 and chunk of 128 rows.
SHAPES = [(1, 256, 256), (2, 384, 1536), (5, 1024, 4096), (6, 128, 64), (7, 100, 200), (13, 1030, 256),
          (32, 256, 1024), (3, 5, 3), (1, 8, 50358)]


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


def test_products_of_few_rows_run_the_kernels_and_larger_ones_run_xla(kernels):
    w = jnp.ones((64, 128), jnp.float32)
    small = _custom_calls(cpu_kernels.matmul, jnp.ones((cpu_kernels.MAX_ROWS, 64), jnp.float32), w)
    large = _custom_calls(cpu_kernels.matmul, jnp.ones((cpu_kernels.MAX_ROWS + 1, 64), jnp.float32), w)
    half = _custom_calls(cpu_kernels.matmul, jnp.ones((1, 64), jnp.bfloat16), w.astype(jnp.bfloat16))
    assert "bertgen_matmul_nn" in small
    assert "bertgen_matmul_nn" not in large and "bertgen_matmul_nn" not in half


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
@pytest.mark.parametrize("m,k,n", [(1, 256, 1024), (5, 1024, 4096), (3, 1024, 300), (32, 256, 256), (2, 6, 70)])
def test_quantized_products_read_the_integers_and_equal_the_widened_weights(kernels, mode, m, k, n):
    from bertgen_flax import quantization
    rng = np.random.default_rng(k + n)
    w, x = rng.standard_normal((k, n), np.float32), rng.standard_normal((m, k), np.float32)
    qk, qs = quantization.quantize_int8(w) if mode == "int8" else quantization.quantize_int4(w, 128)
    want = np.asarray(x, np.float64) @ np.asarray(quantization.dequantize_kernel(qk, qs), np.float64)
    dense = jax.jit(lambda x, a, b: quantization.quantized_dense(x, a, b, jnp.float32))
    got = np.asarray(dense(x, qk, qs))
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    target = "bertgen_matmul_nn_i8" if mode == "int8" else "bertgen_matmul_nn_i4"
    assert target in dense.lower(x, qk, qs).as_text()


def test_the_int8_tied_head_reads_the_integer_table(kernels):
    from bertgen_flax import quantization
    rng = np.random.default_rng(5)
    table, h = rng.standard_normal((8000, 256), np.float32), rng.standard_normal((1, 1, 256), np.float32)
    q, s = quantization.quantize_int8(table, axis=-1)
    want = np.asarray(h, np.float64) @ (np.asarray(q, np.float64) * np.asarray(s, np.float64)[:, None]).T
    attend = jax.jit(lambda h, q, s: quantization.quantized_attend(h, q, s, jnp.float32))
    assert np.abs(np.asarray(attend(h, q, s)) - want).max() <= 1e-6 * np.abs(want).max()
    assert "bertgen_matmul_nt_i8" in attend.lower(h, q, s).as_text()


@pytest.mark.parametrize("b,g,n,s,d", [(3, 1, 4, 33, 64), (2, 4, 4, 64, 64), (1, 1, 16, 128, 64), (2, 1, 4, 9, 8),
                                       (2, 3, 2, 70, 32), (2, 1, 2, 5, 48)])
def test_fused_single_query_attention_equals_the_xla_attention(kernels, b, g, n, s, d):
    from bertgen_flax import modeling
    rng = np.random.default_rng(b * 100 + s)
    q, k, v = (rng.standard_normal(shape, np.float32) for shape in ((b, g, n, d), (b, n, s, d), (b, n, s, d)))
    allowed = rng.random((b, s)) > 0.3
    allowed[0] = False  # a row with every key masked: uniform weights, as the XLA path gives
    scale = np.float32(np.sqrt(d))
    xla = lambda q, k, v, a: modeling._attention_context(
        modeling._masked_softmax(modeling._attention_scores(q, k) / scale, a[:, None, None, :], jnp.float32), v)
    fused = jax.jit(lambda q, k, v, a: cpu_kernels.attend_one(q, k, v, a, xla))
    assert "bertgen_attend_one" in fused.lower(q, k, v, allowed).as_text()
    want, got = np.asarray(jax.jit(xla)(q, k, v, allowed)), np.asarray(fused(q, k, v, allowed))
    assert got.shape == want.shape == (b, g, n, d)
    assert np.abs(got - want).max() <= 2e-6 * max(1.0, np.abs(want).max())


def test_a_kernel_given_mismatched_shapes_names_what_it_expects(kernels):
    call = jax.ffi.ffi_call("bertgen_matmul_nn", jax.ShapeDtypeStruct((1, 3), jnp.float32))
    with pytest.raises(Exception, match=r"bertgen_matmul_nn: expects x \[M, K\] and w \[K, N\]"):
        jax.block_until_ready(jax.jit(call)(jnp.ones((1, 4)), jnp.ones((5, 3))))
    attend = jax.ffi.ffi_call("bertgen_attend_one", jax.ShapeDtypeStruct((1, 1, 2, 8), jnp.float32))
    with pytest.raises(Exception, match=r"bertgen_attend_one: expects q \[B, G, N, D\]"):
        jax.block_until_ready(jax.jit(attend)(jnp.ones((1, 1, 2, 8)), jnp.ones((1, 2, 5, 8)), jnp.ones((1, 2, 5, 8)),
                                              jnp.ones((1, 4), bool)))
