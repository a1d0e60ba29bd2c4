"""CPU kernels for generation, through XLA's FFI (``csrc/cpu_kernels.cc``).

XLA:CPU computes a product with a handful of rows (one per sequence in a decode step) well below the memory
bandwidth that bounds it, and the gap grows with the rows: on a 2-core Xeon a chain of [1024, 4096] products ran
at 21 GB/s with 1 row, 10 GB/s with 8 and 4.6 GB/s with 32, while PyTorch's MKL reached 28, 15 and 10.

- ``matmul(x, w)`` / ``matmul_nt(x, w)``: up to ``MAX_ROWS`` rows (``MAX_ROWS_NT`` for the tied LM head) a
  streaming kernel reads each weight once for all rows; from ``GEMM_MIN_ROWS`` rows a packed product
  (BLAS-style panels and register blocks) runs, in a decode step at batch 32 14% faster than the streaming
  kernel and at 128 rows 2% faster than XLA's. ``dense`` and ``dense_heads`` add the bias, a GELU and the
  head-major [B, heads, S, head_dim] layout of keys and values inside the product.
- ``pack_kernels`` / ``pack_for_steps`` / ``PackedWeights`` / ``packed_dense``: weights copied into the packed
  products' layout once (per model, or per generate call), so products do not copy them again.
- ``attend_one``: a decode step's attention over the caches, or an encoder's over its keys, fused (scores, mask,
  softmax and weighted sum per row and head; keys after the last allowed one are not read).
- ``reorder_rows``: beam search's cache reorder in place, over the positions written so far.
- ``argmax_rows``: the first maximum of each row of the logits in one pass.
- ``layer_norm``: LayerNorm of x + residual per row in one kernel (XLA ran it as six small thunks).
- ``beam_candidates``: beam search's log-softmax, running scores and top candidates, each row read in L1 cache
  and only the candidates written.
- ``quantized_matmul`` / ``quantized_matmul_nt``: int8 and packed int4 weights widened in registers (few rows),
  or widened while the packed product packs them (more rows); ``packed_dense`` also reads integer weights packed
  once into panels (``pack_kernels``) and widens them in registers.

They run on the CPU, for float32, when the kernels are built; otherwise, and on every other platform (through
``jax.lax.platform_dependent``), XLA's operations run. Results agree with XLA's to float32 rounding. Under
differentiation the fused layers (``dense``, ``dense_heads``, ``attend_one``) are differentiated as their XLA
reference; ``matmul``'s gradients are XLA products whose weight gradient comes out in the weight's own layout.

The shared library is compiled on first use with the host compiler (``$CXX``, else ``g++``/``c++``) for the
host's instruction set, and kept in ``$BERTGEN_KERNEL_CACHE`` (default ``~/.cache/bertgen_flax/kernels``) under a
name that hashes the source, the compiler, the CPU and the jax version, so later processes load it.
``BERTGEN_CPU_KERNELS=0`` turns them off. If no compiler is found or the build fails, a warning says why and XLA's
operations are used.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import gpu_kernels

MAX_ROWS = 8         # streaming kernels (memory-bound: a weight read once for all rows) up to this many rows
MAX_ROWS_NT = 8
QUANTIZED_MAX_ROWS = 8   # int8 / int4 streamed (widened in registers) up to here; above, widened while packed
GEMM_MIN_ROWS = MAX_ROWS + 1   # the packed (compute-bound) products from here on
# A quantized decoder's steps read integer panels from here on: the streaming kernels widen every weight for only
# a few rows of multiply-adds, which the panels' micro-kernel does faster from 2 rows ([8, 1024] x [1024, 4096]:
# int8 469 against 784 us, int4 359 against 797; at 2 rows 309 / 183 against 330 / 282).
QUANTIZED_STEPS_MIN_ROWS = 2
_NO_LIMIT = 1 << 62
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu_kernels.cc")
_TARGETS = ("bertgen_matmul_nn", "bertgen_matmul_nt", "bertgen_matmul_nn_i8", "bertgen_matmul_nt_i8",
            "bertgen_matmul_nn_i4", "bertgen_attend_one", "bertgen_gemm_nn", "bertgen_gemm_nn_bias",
            "bertgen_reorder_rows", "bertgen_gemm_packed", "bertgen_argmax_rows",
            "bertgen_pack_panels", "bertgen_beam_candidates", "bertgen_gemm_nn_i8", "bertgen_gemm_nn_i4",
            "bertgen_gemm_nt_i8", "bertgen_layer_norm", "bertgen_add_layer_norm", "bertgen_gemm_packed_i8",
            "bertgen_gemm_packed_i4")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


_PANEL = 0  # columns per packed panel of the loaded build (head-major outputs need head_dim % _PANEL == 0)
_LIB = None
SPIN_US = 50  # how long a pool thread that ran out of chunks keeps looking for the next kernel's (see set_spin_us)


def set_spin_us(us: float) -> None:
    """How long (microseconds) one of XLA's pool threads that finished its share of a kernel keeps looking for
    the next kernel's work before it returns to the pool (0: at once). A thread woken from sleep started 11-43 us
    late, as long as a batch-1 product takes; one that lingers takes its share at once."""
    if _LIB is not None:
        _LIB.bertgen_set_spin_ns(ctypes.c_int64(int(us * 1000)))


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What the -march=native build depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [l for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform
        return platform.machine() + platform.processor()


def _build(compiler: str, out: str) -> None:
    include = jax.ffi.include_dir()  # jaxlib's copy of the XLA FFI headers
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, f"-I{include}", _SOURCE, "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent process sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernels are built, loaded and registered with XLA for the CPU (builds them on first call)."""
    if os.environ.get("BERTGEN_CPU_KERNELS", "1") == "0":
        return False
    compiler = _compiler()
    if compiler is None:
        warnings.warn("bertgen_flax: no C++ compiler found ($CXX, g++, c++, clang++); decode steps on the CPU use "
                      "XLA's matrix products", RuntimeWarning, stacklevel=2)
        return False
    with open(_SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([version, " ".join(_FLAGS), _cpu_signature(), jax.__version__]).encode() + source)
    cache = os.environ.get("BERTGEN_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bertgen_flax",
                                                                    "kernels")
    path = os.path.join(cache, f"cpu_kernels-{key.hexdigest()[:16]}.so")
    try:
        if not os.path.exists(path):
            _build(compiler, path)
        lib = ctypes.cdll.LoadLibrary(path)
        for name in _TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
        global _PANEL, _LIB
        _PANEL = int(lib.bertgen_panel_width())
        _LIB = lib
        set_spin_us(SPIN_US)
    except (OSError, RuntimeError, AttributeError) as e:
        warnings.warn(f"bertgen_flax: the CPU kernels could not be built or loaded ({e}); decode steps on the CPU "
                      f"use XLA's matrix products", RuntimeWarning, stacklevel=2)
        return False
    return True


def _on_cpu() -> bool:
    # Built only where the CPU is the default backend: a GPU or TPU process never compiles them. With several
    # devices (simulated CPU devices, or processes joined by jax.distributed) arrays may be sharded, and a custom
    # call is opaque to XLA's partitioner (it would gather every operand onto every device), so XLA runs there.
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


def _rows(x: jax.Array) -> int:
    return x.size // x.shape[-1] if x.shape[-1] else 0


def _usable(x: jax.Array, w: jax.Array, max_rows: int, weight_dtypes: tuple = (jnp.float32,),
            min_rows: int = 1) -> bool:
    return (min_rows <= _rows(x) <= max_rows and x.dtype == jnp.float32 and w.dtype in weight_dtypes
            and w.ndim == 2 and _on_cpu())


def _call(target: str, x: jax.Array, operands: tuple, n: int, **attrs: Any) -> jax.Array:
    x2 = x.reshape(-1, x.shape[-1])                                               # [M, K]
    out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                           vmap_method="sequential")(x2, *operands, **attrs)
    return out.reshape(*x.shape[:-1], n)


def _kernel_or(cpu: Callable, xla: Callable, x: jax.Array, operands: tuple, max_rows: int,
               weight_dtypes: tuple = (jnp.float32,), min_rows: int = 1) -> jax.Array:
    """``cpu(x, *operands)`` (a kernel) on the CPU when it applies, else, and on other platforms, ``xla(...)``."""
    if not _usable(x, operands[0], max_rows, weight_dtypes, min_rows):
        return xla(x, *operands)
    return jax.lax.platform_dependent(x, *operands, cpu=cpu, default=xla)


def _nn(x: jax.Array, w: jax.Array) -> jax.Array:
    if _rows(x) >= GEMM_MIN_ROWS:
        return _kernel_or(lambda x, w: _call("bertgen_gemm_nn", x, (w,), w.shape[1]), jnp.dot, x, (w,),
                          _NO_LIMIT, min_rows=GEMM_MIN_ROWS)
    return _kernel_or(lambda x, w: _call("bertgen_matmul_nn", x, (w,), w.shape[1]), jnp.dot, x, (w,), MAX_ROWS)


def _xla_nt(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...k,nk->...n", x, w)


def _nt(x: jax.Array, w: jax.Array) -> jax.Array:
    return _kernel_or(lambda x, w: _call("bertgen_matmul_nt", x, (w,), w.shape[0]), _xla_nt, x, (w,), MAX_ROWS_NT)


def quantized_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, xla: Callable) -> jax.Array:
    """x [..., K] @ a weight-only quantized kernel in quantization.py's forms: int8 q [K, N] with column scales
    [N], or packed int4 q [K/2, N] with group scales [K/g, N]; ``xla(x, q, scale)`` elsewhere. Up to
    ``QUANTIZED_MAX_ROWS`` rows the streaming kernels widen in registers; above, the packed product widens the
    weight while packing its panels (generation packs them once instead: ``pack_kernels``)."""
    kind = "i4" if q.dtype == jnp.uint8 else "i8"
    packed = _rows(x) > QUANTIZED_MAX_ROWS
    target = f"bertgen_{'gemm' if packed else 'matmul'}_nn_{kind}"
    if kind == "i4":
        cpu = lambda x, q, s: _call(target, x, (q, s), q.shape[1])
    else:
        cpu = lambda x, q, s: _call(target, x, (q,), q.shape[1]) * s
    low, high = (QUANTIZED_MAX_ROWS + 1, _NO_LIMIT) if packed else (1, QUANTIZED_MAX_ROWS)
    return _kernel_or(cpu, xla, x, (q, scale), high, (jnp.int8, jnp.uint8), low)


def quantized_matmul_nt(x: jax.Array, q: jax.Array, scale: jax.Array, xla: Callable) -> jax.Array:
    """x [..., K] @ (int8 q [N, K] scaled per row by scale [N])^T: the tied LM head of an int8 table (streamed up
    to ``MAX_ROWS_NT`` rows, a packed product widening the table while packing it above)."""
    packed = _rows(x) > MAX_ROWS_NT
    target = "bertgen_gemm_nt_i8" if packed else "bertgen_matmul_nt_i8"
    cpu = lambda x, q, s: _call(target, x, (q,), q.shape[0]) * s
    low, high = (MAX_ROWS_NT + 1, _NO_LIMIT) if packed else (1, MAX_ROWS_NT)
    return _kernel_or(cpu, xla, x, (q, scale), high, (jnp.int8,), low)


def _attend_kernel(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, xla: Callable) -> jax.Array:
    if gpu_kernels.mode() == "interpret" and gpu_kernels.supports(q, k, v):
        return gpu_kernels.attend(q, k, v, allowed, interpret=True)
    kernels = {}
    if q.dtype == k.dtype == v.dtype == jnp.float32 and _on_cpu():
        kernels["cpu"] = lambda q, k, v, a: jax.ffi.ffi_call(
            "bertgen_attend_one", jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")(q, k, v, a)
    if gpu_kernels.applies(q, k, v):
        kernels["cuda"] = gpu_kernels.attend
    if not kernels:
        return xla(q, k, v, allowed)
    return jax.lax.platform_dependent(q, k, v, allowed, default=xla, **kernels)


_attend = None  # set below, once _fused is defined


def attend_one(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, xla: Callable) -> jax.Array:
    """Attention of q [B, G, N, D] (G queries per key row: a decode step's beams, or an encoder's tokens) over k
    and v [B, N, S, D] where allowed [B, S] -> [B, G, N, D]: scores, mask, softmax and the weighted sum fused on
    the CPU (float32) and, where enabled, on one NVIDIA GPU (``gpu_kernels``); ``xla(q, k, v, allowed)``
    elsewhere, and its derivative under differentiation."""
    return _attend(q, k, v, allowed, xla)


def _with_xla_gradients(forward: Callable, w_rows_are_outputs: bool) -> Callable:
    """``forward(x, w)`` (maybe an FFI call, which has no derivative) with XLA products as its gradients.

    The weight gradient comes out in w's own layout, one product contracting the token axis: JAX's transpose of
    a plain ``jnp.dot`` computes a [out, in] gradient and then transposes it, and on a CPU those weight-sized
    transposes were 12% of a training step.
    """
    def bwd(res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
        x, w = res
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])              # [M, K], [M, N]
        if w_rows_are_outputs:                                                        # w [N, K]
            dx, dw = jnp.einsum("...n,nk->...k", dy, w), jnp.einsum("mn,mk->nk", dy2, x2)
        else:                                                                         # w [K, N]
            dx, dw = jnp.einsum("...n,kn->...k", dy, w), jnp.einsum("mk,mn->kn", x2, dy2)
        return dx.astype(x.dtype), dw.astype(w.dtype)

    # Under differentiation (training) the forward product is XLA's too, so a training step runs one product family
    # forward and backward. The kernel forward measured neutral there (1.004) and is correct in that setting too
    # (largest |kernel - XLA| over the first 20 steps of the demo: 1.4e-6 of the products' scale); it once looked
    # guilty because the demo's old recipe sat on a knife edge where float32 rounding alone decided whether the
    # decoder learned to read the source (BENCHMARKS.md, 2026-12-07).
    xla = _xla_nt if w_rows_are_outputs else jnp.dot
    f = jax.custom_vjp(forward)
    f.defvjp(lambda x, w: (xla(x, w), (x, w)), bwd)
    return f


matmul = _with_xla_gradients(_nn, w_rows_are_outputs=False)
matmul.__doc__ = "x [..., K] @ w [K, N] (w as a Dense stores it, [in, out]); differentiable."
matmul_nt = _with_xla_gradients(_nt, w_rows_are_outputs=True)
matmul_nt.__doc__ = "x [..., K] @ w [N, K]^T (w as stored, e.g. an embedding table); differentiable."


# ---- fused epilogues: bias, GELU, head-major outputs ------------------------------------------------------------
# The packed products can finish their output tile in registers: add the bias, apply GELU, or write keys/values
# straight into the head-major [B, heads, S, head_dim] layout the attention reads. XLA would make each of those
# a separate pass over the output (GELU over the encoder's [1024, 1024] intermediate alone was 1.2 ms on 2 cores;
# the transposes of the cross-attention keys/values, about 5 ms of a batch-32 call).
#
# The kernel is the primal (inference); under differentiation ``jax.vjp`` of the reference (``matmul`` and XLA
# operations, the same numbers to float32 rounding) gives the forward and backward passes, so training is as before.
KERNEL_ACTIVATIONS = {"gelu": 1}  # activation name -> the kernel's epilogue code (the erf GELU, as torch's)


def _fused(kernel: Callable, reference: Callable, nondiff: tuple = ()) -> Callable:
    """``kernel`` as the primal, differentiated as ``reference`` (the arguments at ``nondiff`` are static)."""
    f = jax.custom_vjp(kernel, nondiff_argnums=nondiff)

    def fwd(*args):
        def ref(*diff):
            it = iter(diff)
            return reference(*[a if i in nondiff else next(it) for i, a in enumerate(args)])
        return jax.vjp(ref, *[a for i, a in enumerate(args) if i not in nondiff])

    f.defvjp(fwd, lambda *args: args[-2](args[-1]))  # bwd(*static, vjp, cotangent)
    return f


def _dense_reference(x: jax.Array, w: jax.Array, b: jax.Array, act: Optional[Callable]) -> jax.Array:
    y = matmul(x, w) + b
    return y if act is None else act(y)


def _dense_kernel(x: jax.Array, w: jax.Array, b: jax.Array, act: Optional[Callable]) -> jax.Array:
    code = 0 if act is None else getattr(act, "kernel_code", None)
    if code is None or b.dtype != jnp.float32 or not _usable(x, w, _NO_LIMIT, min_rows=GEMM_MIN_ROWS):
        return _dense_reference(x, w, b, act)
    cpu = lambda x, w, b: _call("bertgen_gemm_nn_bias", x, (w, b), w.shape[1], act=np.int64(code))
    return jax.lax.platform_dependent(x, w, b, cpu=cpu, default=lambda x, w, b: _dense_reference(x, w, b, act))


_dense = _fused(_dense_kernel, _dense_reference, nondiff=(3,))
_attend = _fused(_attend_kernel, lambda q, k, v, allowed, xla: xla(q, k, v, allowed), nondiff=(4,))


def dense(x: jax.Array, w: jax.Array, b: Optional[jax.Array] = None, activation: Optional[Callable] = None
          ) -> jax.Array:
    """``activation(x @ w + b)`` (w [in, out] as stored); differentiable. On the CPU, from ``GEMM_MIN_ROWS`` rows,
    the bias and an activation that carries a ``kernel_code`` (see ``fusable``) are applied inside the product."""
    if b is None:
        y = matmul(x, w)
        return y if activation is None else activation(y)
    return _dense(x, w, b, activation)


def fusable(fn: Callable, name: str) -> Callable:
    """``fn`` marked as computing the kernel epilogue ``KERNEL_ACTIVATIONS[name]`` (so ``dense`` may fuse it)."""
    fn.kernel_code = KERNEL_ACTIVATIONS[name]
    return fn


def _heads_reference(x: jax.Array, w: jax.Array, b: jax.Array, heads: int) -> jax.Array:
    y = matmul(x, w) + b                                                          # [B, S, N * D]
    return y.reshape(*y.shape[:2], heads, -1).transpose(0, 2, 1, 3)             # [B, N, S, D]


def _heads_kernel(x: jax.Array, w: jax.Array, b: jax.Array, heads: int) -> jax.Array:
    n = w.shape[1]
    if (x.ndim != 3 or b.dtype != jnp.float32 or n % heads or not _usable(x, w, _NO_LIMIT, min_rows=GEMM_MIN_ROWS)
            or (n // heads) % _PANEL):
        return _heads_reference(x, w, b, heads)
    bsz, seq = x.shape[:2]
    shape = jax.ShapeDtypeStruct((bsz, heads, seq, n // heads), jnp.float32)
    cpu = lambda x, w, b: jax.ffi.ffi_call("bertgen_gemm_nn_bias", shape, vmap_method="sequential")(
        x.reshape(-1, x.shape[-1]), w, b, act=np.int64(0))
    return jax.lax.platform_dependent(x, w, b, cpu=cpu, default=lambda x, w, b: _heads_reference(x, w, b, heads))


_dense_heads = _fused(_heads_kernel, _heads_reference, nondiff=(3,))


def dense_heads(x: jax.Array, w: jax.Array, b: jax.Array, heads: int) -> jax.Array:
    """x [B, S, in] @ w + b split into ``heads`` and laid out head-major, [B, heads, S, out / heads]; on the CPU
    written in that layout by the product itself (no transpose pass). Differentiable."""
    return _dense_heads(x, w, b, heads)


# ---- LayerNorm ----------------------------------------------------------------------------------------------
def _norm_reference(x: jax.Array, residual: Optional[jax.Array], scale: jax.Array, bias: jax.Array, eps: float,
                    dtype: Any) -> jax.Array:
    """flax's ``nn.LayerNorm`` (two-pass variance, float32 statistics) of x + residual, in ``dtype``."""
    if residual is not None:
        x = x + residual
    return _layer_norm_xla(x, scale, bias, eps, dtype)


def _layer_norm_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype: Any
                        ) -> tuple[jax.Array, tuple]:
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(-1, keepdims=True)                                              # [..., 1]
    var = jnp.maximum(0.0, jnp.square(xf - mean).mean(-1, keepdims=True))
    rstd = jax.lax.rsqrt(var + eps)                                                 # [..., 1]
    return ((x - mean) * (rstd * scale) + bias).astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_backward(eps: float, dtype: Any, res: tuple, g: jax.Array) -> tuple:
    # The textbook LayerNorm derivative from the one saved input and two per-row statistics. Autodiff of the
    # forward kept four input-sized intermediates per LayerNorm for the backward pass (with layers under nn.scan,
    # each stacked and zero-filled per step); recomputing x_hat here is one cheap elementwise pass.
    x, mean, rstd, scale, bias = res
    f32 = jnp.promote_types(x.dtype, jnp.float32)
    gf = g.astype(f32)
    x_hat = (x.astype(f32) - mean) * rstd
    lead = tuple(range(g.ndim - 1))
    d_hat = gf * scale.astype(f32)
    dx = rstd * (d_hat - d_hat.mean(-1, keepdims=True) - x_hat * (d_hat * x_hat).mean(-1, keepdims=True))
    return dx.astype(x.dtype), (gf * x_hat).sum(lead).astype(scale.dtype), gf.sum(lead).astype(bias.dtype)


_layer_norm_xla = jax.custom_vjp(lambda x, scale, bias, eps, dtype: _layer_norm_forward(x, scale, bias, eps,
                                                                                         dtype)[0],
                                 nondiff_argnums=(3, 4))
_layer_norm_xla.defvjp(_layer_norm_forward, _layer_norm_backward)


def _norm_kernel(x: jax.Array, residual: Optional[jax.Array], scale: jax.Array, bias: jax.Array, eps: float,
                 dtype: Any) -> jax.Array:
    n = x.shape[-1] if x.ndim else 0
    operands = (x,) + (() if residual is None else (residual,)) + (scale, bias)
    if not (n > 0 and all(o.dtype == jnp.float32 for o in operands) and jnp.dtype(dtype) == jnp.float32
            and scale.shape == bias.shape == (n,) and (residual is None or residual.shape == x.shape)
            and _on_cpu()):
        return _norm_reference(x, residual, scale, bias, eps, dtype)
    target = "bertgen_layer_norm" if residual is None else "bertgen_add_layer_norm"
    out = jax.ShapeDtypeStruct((x.size // n, n), jnp.float32)

    def cpu(*ops):
        rows = [o.reshape(-1, n) for o in ops[:-2]]
        return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*rows, *ops[-2:], eps=np.float32(eps)
                                                                       ).reshape(x.shape)
    reference = lambda *ops: _norm_reference(ops[0], ops[1] if residual is not None else None, *ops[-2:], eps,
                                             dtype)
    return jax.lax.platform_dependent(*operands, cpu=cpu, default=reference)


_norm_add = _fused(_norm_kernel, _norm_reference, nondiff=(4, 5))
_norm = _fused(lambda x, s, b, eps, dtype: _norm_kernel(x, None, s, b, eps, dtype),
               lambda x, s, b, eps, dtype: _norm_reference(x, None, s, b, eps, dtype), nondiff=(3, 4))


def layer_norm(x: jax.Array, residual: Optional[jax.Array], scale: jax.Array, bias: jax.Array, eps: float,
               dtype: Any = jnp.float32) -> jax.Array:
    """LayerNorm over the last axis of x + residual (or x): mean, two-pass variance, ``scale`` and ``bias``, in
    ``dtype``. On the CPU (float32) one kernel pass per row, the residual add included; XLA elsewhere, and its
    derivative under differentiation."""
    if residual is None:
        return _norm(x, scale, bias, float(eps), dtype)
    return _norm_add(x, residual, scale, bias, float(eps), dtype)


def reorder_rows(x: jax.Array, rows: jax.Array, length: jax.Array) -> jax.Array:
    """Beam search's cache reorder: x [B, N, S, D] with row b taken from row ``rows[b]`` at the positions before
    ``length`` (those after it are not written yet and may keep other values). On the CPU in place, copying only
    those positions of the rows that change; ``jnp.take`` elsewhere. Inference only."""
    xla = lambda x, rows, length: jnp.take(x, rows, axis=0)
    if not (x.dtype == jnp.float32 and x.ndim == 4 and _on_cpu()):
        return xla(x, rows, length)
    cpu = lambda x, rows, length: jax.ffi.ffi_call(
        "bertgen_reorder_rows", jax.ShapeDtypeStruct(x.shape, x.dtype), input_output_aliases={0: 0})(
        x, rows.astype(jnp.int32), jnp.asarray(length, jnp.int32))
    return jax.lax.platform_dependent(x, rows, length, cpu=cpu, default=xla)


# ---- weights packed beforehand --------------------------------------------------------------------------------
# The packed products copy each weight into panels of the build's panel width on every call. ``pack_kernels``
# does that copy once, into ``pkernel`` [P, in, width] leaves (stacked [L, P, in, width] under ``nn.scan``) and
# ``pembedding`` for a tied LM head (the table transposed into the same layout), which ``Dense`` and
# ``Embed.attend`` then hand to ``bertgen_gemm_packed`` as they are:
# - ``pack_for_steps``, in the generate program before its loop: a decode step with 9 or more rows would copy
#   every decoder weight once per step (6% of a batch-32 step);
# - ``PackedWeights``, once per model: the products that run once per call over all source tokens (the
#   encoder's, the cross-attention keys and values) and, for steps of 9 rows and more, the decoder's. At batch 1
#   the encoder's own packing was a tenth of a call (0.33 of 2.98 ms for the small preset's encoder).
def packing_pays(rows: int, quantized: bool = False, dtype: Any = jnp.float32) -> bool:
    """Whether steps of ``rows`` rows computing in ``dtype`` run the packed products on this process's CPU kernels:
    float32 weights from ``GEMM_MIN_ROWS`` rows, a quantized model's from ``QUANTIZED_STEPS_MIN_ROWS``."""
    return rows >= (QUANTIZED_STEPS_MIN_ROWS if quantized else GEMM_MIN_ROWS) and packs_weights(dtype)


def packs_weights(dtype: Any = jnp.float32) -> bool:
    """Whether this process's products, computing in ``dtype``, read weights packed beforehand (``pack_kernels``):
    the kernels take float32 activations only (in bfloat16 a packed copy would only be read back by XLA)."""
    return jnp.dtype(dtype) == jnp.float32 and _on_cpu() and _PANEL > 0


def _pack(w: jax.Array, transposed: bool, fill: int = 0) -> jax.Array:
    """w [in, out] (``transposed``: [out, in]; either stacked [L, ...]) as panels [P, in, width], columns past
    ``out`` set to ``fill``. float32 through the pack kernel; integer weights (packed once per model) and other
    dtypes through XLA's pad and transpose."""
    if not available():  # the panel width is the built library's
        raise RuntimeError("packing weights needs the CPU kernels, which are not available in this process "
                           "(BERTGEN_CPU_KERNELS=0, no compiler, or a failed build: see the warning)")
    return _pack_compiled(w, transposed, fill)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack_compiled(w: jax.Array, transposed: bool, fill: int) -> jax.Array:
    """``_pack``, compiled once per shape: run op by op, packing an L-24 model's weights on its first generate
    call took ~10 s of dispatch for ~3 GB; compiled, a [1024, 4096] kernel packs in 1.1 ms instead of 6.0."""
    if w.ndim == 3:  # stacked layers (nn.scan): each packed, in one program
        return jax.lax.map(lambda layer: _pack_compiled(layer, transposed, fill), w)
    k, n = w.shape[::-1] if transposed else w.shape
    p = -(-n // _PANEL)

    def xla(w):
        wt = w.T if transposed else w                                               # [in, out]
        return jnp.pad(wt, ((0, 0), (0, p * _PANEL - n)), constant_values=fill).reshape(k, p, _PANEL).transpose(
            1, 0, 2)
    if w.dtype != jnp.float32 or fill != 0:
        return xla(w)
    cpu = lambda w: jax.ffi.ffi_call("bertgen_pack_panels", jax.ShapeDtypeStruct((p, k, _PANEL), jnp.float32))(
        w, transposed=np.int64(int(transposed)))
    return jax.lax.platform_dependent(w, cpu=cpu, default=xla)


def pack_kernel(w: jax.Array) -> jax.Array:
    """A Dense kernel [in, out] (or stacked [L, in, out]) as panels [P, in, width] (columns past ``out`` zero)."""
    return _pack(w, transposed=False)


def pack_table(e: jax.Array) -> jax.Array:
    """A table [num, features] used as x @ table^T, as panels [P, features, width] of its rows."""
    return _pack(e, transposed=True)


_INT4_ZERO = 0x88  # a packed int4 byte holding two zeros (each nibble stores q + 8)


def _pack_quantized(node: dict) -> dict:
    """A quantized Dense subtree with its ``qkernel`` replaced by panels ``pqkernel`` (int8 [P, in, width], or
    packed int4 [P, in / 2, width] with its group scales as ``pqscale`` [P, in / g, width])."""
    out = {k: v for k, v in node.items() if k != "qkernel"}
    q = node["qkernel"]
    if q.dtype == jnp.uint8:
        out["pqkernel"], out["pqscale"] = _pack(q, False, _INT4_ZERO), pack_kernel(node["qscale"])
    else:
        out["pqkernel"] = pack_kernel(q)
    return out


def pack_kernels(tree: Any, tied_table: bool, select: Callable[[tuple], bool] = lambda path: True,
                 path: tuple = ()) -> Any:
    """``tree`` with every float32 Dense ``kernel`` (2-D, or stacked 3-D) under a module path that ``select``
    accepts replaced by its ``pkernel``, and every quantized one (``qkernel``) by its ``pqkernel`` (see
    ``_pack_quantized``); with ``tied_table``, a selected ``word_embeddings`` table also gets a ``pembedding``
    (float) or ``pqembedding`` (int8): the tied LM head's layout. Leaves already packed are kept."""
    if not isinstance(tree, dict):
        return tree
    if (getattr(tree.get("qkernel"), "ndim", 0) in (2, 3) and tree["qkernel"].dtype in (jnp.int8, jnp.uint8)
            and select(path)):
        return _pack_quantized(tree)
    out = {}
    for key, value in tree.items():
        if (key == "kernel" and getattr(value, "ndim", 0) in (2, 3) and value.dtype == jnp.float32
                and select(path)):
            out["pkernel"] = pack_kernel(value)
        elif isinstance(value, dict):
            out[key] = pack_kernels(value, tied_table, select, path + (key,))
            if key == "word_embeddings" and tied_table and select(path + (key,)):
                if ("pembedding" not in value and getattr(value.get("embedding"), "dtype", None) == jnp.float32):
                    out[key] = dict(out[key], pembedding=pack_table(value["embedding"]))
                elif "pqembedding" not in value and getattr(value.get("qembedding"), "dtype", None) == jnp.int8:
                    out[key] = dict(out[key], pqembedding=pack_table(value["qembedding"]))
        else:
            out[key] = value
    return out


def pack_for_steps(tree: Any, tied_table: bool) -> Any:
    """``tree`` (a decoder's params) with every float32 Dense ``kernel`` replaced by its ``pkernel`` and, when the
    LM head is tied (``tied_table``), a ``pembedding`` beside the word embeddings' table."""
    return pack_kernels(tree, tied_table)


def _once_per_call(path: tuple) -> bool:
    """Products of an encoder-decoder's generate call that run once, over every source token: all but the
    decoder's, and the decoder's cross-attention keys and values."""
    return path[:1] != ("decoder",) or (path[-3:-1] == ("crossattention", "self") and path[-1] in ("key", "value"))


def fuse_qkv(tree: Any) -> Any:
    """``tree`` with each self-attention's float32 ``query``, ``key`` and ``value`` (all with bias) replaced by
    one ``qkv`` Dense ([in, 3 * out], stacked or not): a decode step then runs one product for the three, 8-10 us
    less per layer at batch 1 on 2 cores (three [256, 256] products against one [256, 768])."""
    if not isinstance(tree, dict):
        return tree
    parts = [tree.get(name) for name in ("query", "key", "value")]
    if all(isinstance(p, dict) and set(p) == {"kernel", "bias"} and p["kernel"].dtype == jnp.float32
           for p in parts):
        rest = {k: v for k, v in tree.items() if k not in ("query", "key", "value")}
        return dict(rest, qkv={"kernel": jnp.concatenate([p["kernel"] for p in parts], axis=-1),
                               "bias": jnp.concatenate([p["bias"] for p in parts], axis=-1)})
    return {k: fuse_qkv(v) if k != "crossattention" else v for k, v in tree.items()}


FUSE_QKV = True  # whether PackedWeights fuses the decoder's self-attention projections (fuse_qkv)


def _packed_tree(params: dict, steps: bool, tied_table: bool, fuse: bool, unstack: bool) -> dict:
    # leaf by leaf, outside jit: the leaves not packed stay the very arrays of ``params`` (no copy)
    if unstack:  # a scanned model's decoder, its layers sliced out once here instead of in every call
        from .convert import unstack_layers
        params = dict(params, decoder=unstack_layers(params["decoder"]))
    tree = pack_kernels(params, False, _once_per_call)
    if fuse:
        tree = dict(tree, decoder=fuse_qkv(tree["decoder"]))
    if steps:
        tree = dict(tree, decoder=pack_kernels(tree["decoder"], tied_table))
    return tree


class PackedWeights:
    """An encoder-decoder's float32 (or int8 / int4) weights packed for the CPU kernels once, not on every generate
    call.

    ``get(params, steps, tied_table, unstack)`` returns ``params`` with the products that run once per call
    (the encoder's, the cross-attention keys and values) packed, the decoder's self-attention projections fused
    (``fuse_qkv``, unless ``FUSE_QKV`` is off) and, with ``steps``, the decoder's products packed too, as
    ``pack_kernels`` lays them out. With ``unstack`` (a scanned model whose decode steps run unrolled) the
    decoder's layers come unstacked (``layer_0`` ...), so calls stop slicing them out of the stack. The packed
    trees are kept while ``params`` holds the same leaves (checked on every call, so a tree edited in place is
    packed again). They cost a second copy of the weights they cover.
    """

    def __init__(self) -> None:
        self._leaves: Optional[list] = None
        self._trees: dict = {}

    def clear(self) -> None:
        """Drops the packed copies (and the references to the params they came from)."""
        self._leaves, self._trees = None, {}

    def get(self, params: dict, steps: bool, tied_table: bool, unstack: bool = False) -> dict:
        leaves = jax.tree_util.tree_leaves(params)
        if self._leaves is None or len(leaves) != len(self._leaves) or any(
                a is not b for a, b in zip(leaves, self._leaves)):
            self.clear()
            self._leaves = leaves
        key = (steps, tied_table, FUSE_QKV, unstack)
        if key not in self._trees:
            # the steps' tree reuses the other's packed leaves when it has them (one copy of the encoder's)
            base = self._trees.get((not steps, tied_table, FUSE_QKV, unstack), params) if steps else params
            self._trees[key] = _packed_tree(base, steps, tied_table, FUSE_QKV, unstack)
        return self._trees[key]


_PACKED_TARGETS = {"float32": "bertgen_gemm_packed", "int8": "bertgen_gemm_packed_i8",
                   "uint8": "bertgen_gemm_packed_i4"}


def packed_dense(x: jax.Array, wp: jax.Array, b: jax.Array, n: int, activation: Optional[Callable] = None,
                 heads: int = 0, scale: Optional[jax.Array] = None) -> jax.Array:
    """``activation(x @ w + b)`` [..., n] from w packed by ``pack_kernels`` (or ``pack_kernel`` / ``pack_table``):
    float32 panels [P, in, width]; int8 panels with column scales ``scale`` [n]; or packed int4 panels
    [P, in / 2, width] with group scales ``scale`` [P, in / g, width]. Integers are widened in registers and the
    scales, bias and activation applied in the product's epilogue. With ``heads``, x [B, S, in] gives
    [B, heads, S, n / heads] (head-major, written so by the product). Inference only."""
    code = 0 if activation is None else getattr(activation, "kernel_code", None)
    kind = jnp.dtype(wp.dtype).name
    if kind not in _PACKED_TARGETS:
        raise ValueError(f"packed_dense: {kind} panels are not a packed form (float32, int8, or packed int4 as uint8)")
    if (scale is None) != (kind == "float32"):
        raise ValueError(f"packed_dense: {kind} panels {'need' if scale is None else 'take no'} scales (float32 "
                         f"panels take none; int8 and packed int4 panels need theirs)")
    weights = (wp,) if scale is None else (wp, scale)

    def xla(x, wp, *rest):
        *scales, b = rest
        w = wp
        if kind == "uint8":  # int4 panels [P, in / 2, width] -> [P, in, width], times each group's scales
            from .quantization import unpack_int4
            q, s = unpack_int4(wp).astype(x.dtype), scales[0]
            w = (q.reshape(q.shape[0], s.shape[1], -1, q.shape[-1]) * s[:, :, None, :]).reshape(q.shape)
        y = jnp.einsum("...k,pkj->...pj", x, w.astype(x.dtype)).reshape(*x.shape[:-1], -1)[..., :n]
        y = (y * scales[0] if kind == "int8" else y) + b
        y = y if activation is None else activation(y)
        return y.reshape(*y.shape[:2], heads, -1).transpose(0, 2, 1, 3) if heads else y
    weight_dtypes = (jnp.float32,) if scale is None else (jnp.int8, jnp.uint8)
    floats = (x, b) if scale is None else (x, b, scale)
    if code is None or not (all(f.dtype == jnp.float32 for f in floats) and wp.shape[-1] == _PANEL
                            and _usable(x, wp[0], _NO_LIMIT, weight_dtypes)) or (
            heads and (x.ndim != 3 or n % heads or (n // heads) % _PANEL)):
        return xla(x, *weights, b)
    target = _PACKED_TARGETS[kind]
    if heads:
        shape = jax.ShapeDtypeStruct((x.shape[0], heads, x.shape[1], n // heads), jnp.float32)
        cpu = lambda x, *ops: jax.ffi.ffi_call(target, shape, vmap_method="sequential")(
            x.reshape(-1, x.shape[-1]), *ops, act=np.int64(code))
    else:
        cpu = lambda x, *ops: _call(target, x, ops, n, act=np.int64(code))
    return jax.lax.platform_dependent(x, *weights, b, cpu=cpu, default=xla)


def argmax_rows(x: jax.Array, xla: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """The first maximum's index of each row of x [N, V] (the first NaN's, if any), int32 [N]: one pass on the CPU
    (float32); ``xla(x)`` elsewhere."""
    if not (x.dtype == jnp.float32 and x.ndim == 2 and x.shape[1] > 0 and _on_cpu()):
        return xla(x)
    cpu = lambda x: jax.ffi.ffi_call("bertgen_argmax_rows", jax.ShapeDtypeStruct(x.shape[:1], jnp.int32))(x)
    return jax.lax.platform_dependent(x, cpu=cpu, default=xla)


def beam_candidates(x: jax.Array, running: jax.Array, eos: jax.Array, ban: jax.Array, count: int,
                    xla: Callable) -> tuple[jax.Array, jax.Array]:
    """Beam search's candidates: the top ``count`` of ``log_softmax(x[b, k]) + running[b, k]`` over j = k * V + v
    per input b, for logits x [B, K, V], running scores [B, K], EOS ids ``eos`` [E] whose log-probabilities are
    -inf when ``ban`` (a bool scalar) holds. Returns (values [B, count] descending, indices [B, count] int32), as
    ``jax.lax.top_k`` orders them. One pass per row on the CPU (float32); ``xla(x, running, eos, ban)`` elsewhere."""
    b, k, v = x.shape
    reference = lambda *operands: tuple(xla(*operands))
    if not (x.dtype == running.dtype == jnp.float32 and v > 0 and 1 <= count <= k * v and _on_cpu()):
        return reference(x, running, eos, ban)
    out = (jax.ShapeDtypeStruct((b, count), jnp.float32), jax.ShapeDtypeStruct((b, count), jnp.int32))
    cpu = lambda x, r, e, f: tuple(jax.ffi.ffi_call("bertgen_beam_candidates", out)(x, r, e, f.astype(jnp.int32)))
    return jax.lax.platform_dependent(x, running, eos, ban, cpu=cpu, default=reference)
