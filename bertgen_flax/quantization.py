"""Weight-only int8 and int4 quantization for inference.

Activations, LayerNorms, biases, softmax and the caches keep the model's dtype; only the large matrices are
stored as integers and widened inside each matmul:

- ``int8``: every dense kernel [in, out] becomes int8 with one float32 scale per output column, and every word
  embedding table [V, H] becomes int8 with one scale per row (a row is a token, which is also an output column of
  the tied LM head). Symmetric: ``w ~= q * scale`` with q in [-127, 127].
- ``int4``: dense kernels become 4-bit with one scale per group of ``group_size`` input rows and output column
  (q in [-7, 7], each group clipped where its squared rounding error is smallest), two values packed per uint8
  byte; word embeddings stay int8 per row (they feed every token's first layer and the LM head, where 4 bits cost
  the most accuracy for the least memory), and so do kernels with an odd input width, which cannot pack.

A quantized parameter tree describes itself: a Dense subtree holds ``qkernel`` (int8, or uint8 for packed int4)
and ``qscale`` instead of ``kernel``; an embedding holds ``qembedding`` and ``qscale`` instead of ``embedding``.
The modules in ``modeling.py`` read whichever form they find, so no module needs to know the mode, and the
scanned and unrolled layouts both work (every function here accepts leading layer axes).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernels

Array = jax.Array

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
CLIP_RATIOS = tuple(0.5 + 0.05 * i for i in range(10))  # tried per int4 group besides 1.0


def _safe(scale: Array) -> Array:
    return jnp.where(scale == 0, 1.0, scale)


def quantize_int8(w: Array, axis: int = -2) -> tuple[Array, Array]:
    """Symmetric int8 with one scale per slice along ``axis`` reduced: (q int8, scale float32 without ``axis``)."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axis) / 127.0
    q = jnp.round(w / jnp.expand_dims(_safe(scale), axis))
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def group_size_for(in_features: int, group_size: int) -> int:
    """The int4 group actually used: ``group_size`` when it divides the input width, else the largest even divisor
    below it (the whole width for small layers)."""
    g = min(group_size, in_features)
    while g > 2 and (in_features % g or g % 2):
        g -= 1
    if in_features % g or g % 2:
        raise ValueError(f"int4 needs an even input width, got {in_features}")
    return g


def quantize_int4(w: Array, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[Array, Array]:
    """Kernel [..., in, out] -> (packed uint8 [..., in/2, out], scale float32 [..., in/group, out]).

    Byte i holds rows 2i (low nibble) and 2i+1 (high nibble), each stored as q + 8 with q in [-7, 7].
    """
    w = jnp.asarray(w, jnp.float32)
    *lead, n_in, n_out = w.shape
    g = group_size_for(n_in, group_size)
    grouped = w.reshape(*lead, n_in // g, g, n_out)                                   # [..., G, g, out]
    absmax = jnp.max(jnp.abs(grouped), axis=-2)                                       # [..., G, out]

    def rounded(scale):
        return jnp.clip(jnp.round(grouped / _safe(scale)[..., None, :]), -7, 7)

    def error(scale):
        return jnp.sum(jnp.square(rounded(scale) * scale[..., None, :] - grouped), axis=-2)

    # Clip each group where the squared rounding error is smallest: with only 15 levels, spending them on the
    # bulk of the weights beats stretching them to the single largest one. A loop, not unrolled candidates, so
    # only one candidate's rounded copy of the kernel exists at a time.
    ratios = jnp.asarray(CLIP_RATIOS, jnp.float32)

    def try_ratio(i, carry):
        scale, best = carry
        candidate = absmax * ratios[i] / 7.0
        err = error(candidate)
        return jnp.where(err < best, candidate, scale), jnp.minimum(err, best)

    scale = absmax / 7.0
    scale, _ = jax.lax.fori_loop(0, len(CLIP_RATIOS), try_ratio, (scale, error(scale)))
    q = rounded(scale).astype(jnp.int32) + 8
    pairs = q.reshape(*lead, n_in // 2, 2, n_out)
    packed = (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).astype(jnp.uint8)          # [..., in/2, out]
    return packed, scale


def unpack_int4(packed: Array) -> Array:
    """[..., in/2, out] uint8 -> [..., in, out] int8 values in [-7, 7]."""
    p = packed.astype(jnp.int32)
    lo, hi = (p & 15) - 8, (p >> 4) - 8
    both = jnp.stack([lo, hi], axis=-2)                                               # [..., in/2, 2, out]
    return both.reshape(*packed.shape[:-2], packed.shape[-2] * 2, packed.shape[-1]).astype(jnp.int8)


def dequantize_kernel(qkernel: Array, qscale: Array, dtype: Any = jnp.float32) -> Array:
    """The float kernel [..., in, out] a quantized Dense computes with."""
    if qkernel.dtype == jnp.uint8:  # packed int4, grouped scales
        q = unpack_int4(qkernel)
        n_in, n_out = q.shape[-2:]
        groups = qscale.shape[-2]
        w = q.astype(dtype).reshape(*q.shape[:-2], groups, n_in // groups, n_out) * qscale.astype(dtype)[..., None, :]
        return w.reshape(q.shape)
    return qkernel.astype(dtype) * qscale.astype(dtype)[..., None, :]


def _tied(weights: tuple, x: Array) -> tuple:
    """``weights`` and ``x`` through one optimization barrier, so widening the weights depends on ``x``.

    In a decode loop the integer weights are loop-invariant, and XLA hoists their widening out of the loop: the
    loop then runs on float copies of every matrix (float memory and float traffic, plus the integer copies).
    Tied to the step's activations, the widening stays in the step, next to (on GPUs fused into) its matmul.
    """
    *weights, x = jax.lax.optimization_barrier((*weights, x))
    return (*weights, x)


def quantized_dense(x: Array, qkernel: Array, qscale: Array, dtype: Any) -> Array:
    """x [..., in] @ the quantized kernel -> [..., out], in ``dtype``.

    int8: the integer kernel is widened and the per-column scale applied to the (smaller) output. int4: the
    kernel is widened group by group first, which XLA fuses into the matmul's operand on GPUs. On the CPU, a
    float32 product of few rows (a decode step) runs a kernel that reads the integers themselves
    (``cpu_kernels.quantized_matmul``): a quarter (int8) or an eighth (int4) of float32's memory traffic.
    """
    def xla(x, qkernel, qscale):
        qkernel, qscale, x = _tied((qkernel, qscale), x)
        if qkernel.dtype == jnp.uint8:
            return jnp.dot(x, dequantize_kernel(qkernel, qscale, dtype))
        return jnp.dot(x, qkernel.astype(dtype)) * qscale.astype(dtype)
    return cpu_kernels.quantized_matmul(x.astype(dtype), qkernel, qscale, xla)


def quantized_lookup(qembedding: Array, qscale: Array, ids: Array, dtype: Any) -> Array:
    """Rows ``ids`` of an int8 per-row table, [..., H]."""
    # a gather reads only the rows it needs: nothing is widened that a barrier would have to keep in the loop
    return jnp.take(qembedding, ids, axis=0).astype(dtype) * jnp.take(qscale, ids, axis=0).astype(dtype)[..., None]


def quantized_attend(h: Array, qembedding: Array, qscale: Array, dtype: Any) -> Array:
    """h [B, T, H] @ table^T with an int8 per-row table [V, H]: the tied LM head's logits [B, T, V] (on the CPU
    through ``cpu_kernels.quantized_matmul_nt`` for a decode step)."""
    def xla(h, qembedding, qscale):
        qembedding, qscale, h = _tied((qembedding, qscale), h)
        return jnp.einsum("bth,vh->btv", h, qembedding.astype(dtype)) * qscale.astype(dtype)
    return cpu_kernels.quantized_matmul_nt(h.astype(dtype), qembedding, qscale, xla)


_int8 = jax.jit(quantize_int8, static_argnames="axis")
_int4 = jax.jit(quantize_int4, static_argnames="group_size")


def _per_matrix(fn: Callable, w: Any) -> tuple:
    """``fn`` over each [in, out] matrix of ``w`` [..., in, out], outputs stacked back: the same program for every
    layer (stacked or not), with the working memory of one matrix (int4's clip search keeps several copies)."""
    if w.ndim == 2:
        return fn(w)
    parts = [_per_matrix(fn, w[i]) for i in range(w.shape[0])]
    return tuple(jnp.stack(p) for p in zip(*parts))


def quantize_leaf(path: tuple[str, ...], value: Any, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """The leaves that replace the parameter at ``path`` (its names down the tree) in a ``mode`` tree: a dense
    ``kernel`` [..., in, out] becomes ``qkernel`` and ``qscale``, a ``word_embeddings/embedding`` table
    ``qembedding`` and ``qscale``; anything else stays ``{path[-1]: value}``. One rule for a whole tree
    (``quantize_params``) and for a loader that quantizes each matrix as it is read."""
    name = path[-1]
    if name == "kernel" and getattr(value, "ndim", 0) >= 2:
        if mode == "int8" or value.shape[-2] % 2:  # an odd input width cannot pack: int8 instead
            return dict(zip(("qkernel", "qscale"), _per_matrix(_int8, value)))
        return dict(zip(("qkernel", "qscale"), _per_matrix(partial(_int4, group_size=group_size), value)))
    if name == "embedding" and path[-2:-1] == ("word_embeddings",):
        return dict(zip(("qembedding", "qscale"), _int8(value, axis=-1)))
    return {name: value}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}: choose one of {', '.join(MODES)}")


def quantize_params(params: Mapping, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """A quantized copy of a float parameter tree (scanned or unrolled); see the module docstring for the form.

    Matrix by matrix (each layer's too), each in its own compiled call: the working memory is that of the largest
    matrix, not of the whole model (one program over a 0.8-billion-weight tree asked for 34 GB)."""
    check_mode(mode)
    if is_quantized(params):
        raise ValueError("these parameters are already quantized")

    def walk(node: Mapping, path: tuple[str, ...]) -> dict:
        out = {}
        for key, value in node.items():
            if isinstance(value, Mapping):
                out[key] = walk(value, path + (key,))
            else:
                out.update(quantize_leaf(path + (key,), value, mode, group_size))
        return out

    return walk(params, ())


def is_quantized(params: Mapping) -> bool:
    """Whether any subtree holds quantized weights (as quantized, or packed for the CPU kernels)."""
    def walk(node: Any) -> bool:
        if not isinstance(node, Mapping):
            return False
        return any(k in node for k in ("qkernel", "qembedding", "pqkernel")) or any(walk(v) for v in node.values())
    return walk(params)


def param_bytes(params: Any) -> int:
    """Bytes the parameter leaves occupy (packed int4 counts its real half byte per weight)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))
