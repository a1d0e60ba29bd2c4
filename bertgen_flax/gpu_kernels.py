"""A fused attention kernel for NVIDIA GPUs, written with Pallas (Triton backend).

One launch per attention computes scores, mask, a float32 softmax and the weighted sum of the values, reading each
key and value once: ``attend(q, k, v, allowed)`` with q [B, G, N, D] (G queries per key row: a decode step's one
token, a beam search's beams over their shared source, or an encoder's tokens), k and v [B, N, S, D] and
allowed [B, S] -> [B, G, N, D]. XLA runs the same attention as two products around a softmax fusion and a mask
(several launches per layer and step); the decode step at batch 1 is launch-bound, which is where this kernel is
meant to help.

It is opt-in (``BERTGEN_PALLAS_ATTENTION=1``) until a GPU run has timed it against XLA (``bench/gpu.sh`` runs
both); XLA's attention stays the reference and the fallback (the CPU, shapes the kernel does not take, several
devices, and the derivative for training). ``BERTGEN_PALLAS_ATTENTION=interpret`` runs the kernel's own program
through XLA on any backend, which is how the tests check it, inside whole models, without a GPU.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

ENV = "BERTGEN_PALLAS_ATTENTION"
_MIN_DOT = 16          # Triton's products need every side >= 16
KEY_BLOCK = 64         # keys per step of the online softmax
MAX_QUERY_BLOCK = 64   # queries per program (an encoder's tokens are split over programs)
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def mode() -> str:
    """``BERTGEN_PALLAS_ATTENTION``: unset or "0" (XLA's attention), "1" (the kernel on one NVIDIA GPU), or
    "interpret" (the kernel's program interpreted by XLA on any backend: slow, for checking it without a GPU)."""
    value = os.environ.get(ENV, "0").strip()
    if value in ("", "0"):
        return "off"
    if value in ("1", "interpret"):
        return "on" if value == "1" else "interpret"
    raise ValueError(f"{ENV}={value!r}: expected 0, 1 or interpret")


def _pow2_at_least(n: int, low: int) -> int:
    return max(low, 1 << max(0, n - 1).bit_length())


def supports(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Shapes and dtypes the kernel takes: a power-of-two head size of at least 16, one dtype throughout."""
    d = q.shape[-1]
    return (q.ndim == k.ndim == v.ndim == 4 and d >= _MIN_DOT and d & (d - 1) == 0 and k.shape[-1] == d
            and q.dtype == k.dtype == v.dtype and any(q.dtype == t for t in _DTYPES) and k.shape[2] > 0)


def applies(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether ``attend`` serves this attention: enabled, on one NVIDIA GPU, shapes it takes. With several devices
    the arrays may be sharded, and a kernel call is opaque to XLA's partitioner, so XLA runs there."""
    return mode() == "on" and jax.default_backend() == "gpu" and jax.device_count() == 1 and supports(q, k, v)


def _kernel(q_ref, k_ref, v_ref, allowed_ref, o_ref, *, groups: int, keys: int, block_q: int, block_k: int,
            scale: float, precision) -> None:
    b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = i * block_q + jnp.arange(block_q)                                      # [BQ] query rows of this program
    row_ok = rows < groups
    q = plgpu.load(q_ref.at[b, pl.ds(i * block_q, block_q), n, :], mask=row_ok[:, None], other=0.0)  # [BQ, D]
    d = q.shape[-1]
    lowest = jnp.finfo(jnp.float32).min  # a disallowed key, as transformers masks (all disallowed: uniform)

    def step(j, carry):
        acc, m, l = carry                                                         # [BQ, D], [BQ], [BQ]
        cols = j * block_k + jnp.arange(block_k)                                  # [BK]
        real = cols < keys
        kb = plgpu.load(k_ref.at[b, n, pl.ds(j * block_k, block_k), :], mask=real[:, None], other=0.0)
        vb = plgpu.load(v_ref.at[b, n, pl.ds(j * block_k, block_k), :], mask=real[:, None], other=0.0)
        ok = plgpu.load(allowed_ref.at[b, pl.ds(j * block_k, block_k)], mask=real, other=0)
        s = plgpu.dot(q, kb, trans_b=True, precision=precision) * scale  # [BQ, BK]
        s = jnp.where((ok != 0)[None, :], s, lowest)
        s = jnp.where(real[None, :], s, -jnp.inf)          # keys past the end count for nothing
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(vb.dtype), vb, precision=precision)
        return acc, m_new, l * alpha + p.sum(axis=1)

    init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, _, l = lax.fori_loop(0, pl.cdiv(keys, block_k), step, init)
    plgpu.store(o_ref.at[b, pl.ds(i * block_q, block_q), n, :], (acc / l[:, None]).astype(o_ref.dtype),
                mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("interpret",))
def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, interpret: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(D), keys where allowed) v, fused: q [B, G, N, D], k, v [B, N, S, D], allowed [B, S]
    -> [B, G, N, D] in q's dtype (scores, softmax and sums in float32)."""
    if not supports(q, k, v):
        raise ValueError(f"the Pallas attention takes q [B, G, N, D] and k, v [B, N, S, D] of one float dtype with "
                         f"D a power of two >= {_MIN_DOT}; got q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, "
                         f"v {v.shape} {v.dtype}")
    bsz, groups, heads, d = q.shape
    keys = k.shape[2]
    if k.shape[:2] != (bsz, heads) or v.shape != k.shape or allowed.shape != (bsz, keys):
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}, "
                         f"allowed {allowed.shape}")
    block_q = min(MAX_QUERY_BLOCK, _pow2_at_least(groups, _MIN_DOT))
    block_k = min(KEY_BLOCK, _pow2_at_least(keys, _MIN_DOT))
    # float32 products in full precision (Triton's default for float32 is TF32), to agree with XLA's to 1e-6
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, groups=groups, keys=keys, block_q=block_q, block_k=block_k,
                               scale=1.0 / math.sqrt(d), precision=precision)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(bsz, heads, pl.cdiv(groups, block_q)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="bertgen_attend",
    )(q, k, v, allowed.astype(jnp.int32))
