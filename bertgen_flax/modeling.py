"""Pure ``flax.linen`` modules for BertGeneration encoders, decoders and encoder-decoders.

Submodule names mirror the PyTorch parameter paths of transformers (``embeddings``, ``attention/self/query``,
``crossattention``, ``intermediate``, ``output``, ``lm_head``), so the checkpoint table in ``convert.py`` is a
renaming. Layers are stacked with ``nn.scan`` (one compiled layer, a leading layer axis on every parameter and
cache leaf) or unrolled as ``layer_0 .. layer_{L-1}``.

Shapes: B batch, T query length, S key length, H hidden, N heads, D head dim, L layers, V vocab.

Cache layout (``decode=True``): ``cache/cache_index`` () int32 at the model level: the next position to write;
per layer ``attention/cached_key`` and ``attention/cached_value`` [B, N, S_max, D] (head-major, so decode steps
read them without transposes) preallocated to the maximum length, and for decoders
``crossattention/cross_key``/``cross_value`` [B, N, S_src, D] written by the first call
that passes ``encoder_hidden_states`` and read by every later call that passes none. Scanned layers add a
leading [L] axis to every per-layer leaf.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.scipy.special
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from . import cpu_kernels, quantization
from .config import BertGenerationConfig, EncoderDecoderConfig

Array = jax.Array
Dtype = Any


def _gelu_tanh(x: Array) -> Array:
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3.0))))


@jax.custom_vjp
def _gelu_erf(x: Array) -> Array:
    # torch's formula, x/2 (1 + erf(x / sqrt 2)). jax.nn.gelu(approximate=False) computes the same with erfc, which
    # is 2.7x slower on the CPU (a quarter of the encoder's feed-forward time at batch 128) and further from torch.
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


def _gelu_erf_backward(x: Array, g: Array) -> tuple[Array]:
    # d/dx x Phi(x) = Phi(x) + x phi(x), recomputed from the saved input: autodiff kept four [tokens, intermediate]
    # intermediates of the forward formula for the backward pass, the largest activations of a layer.
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * xf * xf) * (1.0 / math.sqrt(2.0 * math.pi))
    return ((g.astype(xf.dtype) * (cdf + xf * pdf)).astype(x.dtype),)


_gelu_erf.defvjp(lambda x: (_gelu_erf(x), x), _gelu_erf_backward)


def _gelu_fast(x: Array) -> Array:
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


# Each entry computes what transformers' ACT2FN entry of the same name computes.
# The erf GELU is also a CPU kernel epilogue (cpu_kernels.dense fuses it into the product).
_gelu_erf = cpu_kernels.fusable(_gelu_erf, "gelu")

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_erf,  # the exact erf form, as torch.nn.functional.gelu
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "linear": lambda x: x,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "gelu_python": _gelu_erf,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_10": lambda x: jnp.clip(_gelu_erf(x), -10.0, 10.0),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "hardswish": jax.nn.hard_swish,
    "laplace": lambda x: 0.5 * (1.0 + jax.scipy.special.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
}


@struct.dataclass
class StackOutput:
    """What a BertGeneration stack returns; tuples hold one array per layer (hidden states: embeddings first)."""
    last_hidden_state: Array                      # [B, T, H]
    hidden_states: Optional[tuple] = None         # L + 1 x [B, T, H]
    attentions: Optional[tuple] = None            # L x [B, N, T, S]
    cross_attentions: Optional[tuple] = None      # L x [B, N, T, S_src]


@struct.dataclass
class Packing:
    """The real tokens of a padded batch [B, S] laid out as one row [1, T] (T >= their number; the rest filler).

    An encoder given a packing runs its projections and feed-forward blocks on those T tokens only and gathers
    them back into the padded layout for attention, so padding costs no matrix products. Every token's result
    is what the padded run computes for it.
    """
    unpack: Array   # [B, S] int32: where padded position (b, s) lies in the row (pads: any valid index)
    pack: Array     # [T] int32: the padded position b * S + s of the row's token t (filler: any valid position)


@struct.dataclass
class LMOutput:
    """Logits (and loss, cache, hidden states, attentions when asked) of an LM head."""
    logits: Array                                 # [B, T, V]
    loss: Optional[Array] = None
    past_key_values: Optional[Any] = None         # the 'cache' collection after this call (decode mode)
    last_hidden_state: Optional[Array] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None


@struct.dataclass
class Seq2SeqOutput:
    """Decoder logits and loss plus the encoder's outputs, as transformers' Seq2SeqLMOutput."""
    logits: Array                                 # [B, T, V]
    loss: Optional[Array] = None
    encoder_last_hidden_state: Optional[Array] = None
    encoder_hidden_states: Optional[tuple] = None
    encoder_attentions: Optional[tuple] = None
    decoder_hidden_states: Optional[tuple] = None
    decoder_attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None


# x [..., in] @ kernel [in, out] for Dense: a CPU kernel for few rows (a decode step), XLA's product otherwise, and
# a backward pass whose kernel gradient comes out as [in, out] without a transpose (cpu_kernels.py).
matmul = cpu_kernels.matmul


class Dense(nn.Module):
    """y = x @ kernel + bias, with ``kernel`` [in, out] as stored, or int8/int4 ``qkernel`` + ``qscale`` when the
    params were quantized (``quantization.py``): the tree says which, so one module serves both."""
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array, heads: int = 0, activation: Optional[Callable] = None) -> Array:
        """``activation(x @ kernel + bias)`` [..., out]; with ``heads``, x [B, S, in] gives [B, heads, S, out / heads]
        (head-major, as attention reads keys and values). On the CPU the bias, a fusable activation and the
        head-major layout are part of the product (``cpu_kernels.dense``)."""
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        packed = next((k for k in ("pkernel", "pqkernel") if self.has_variable("params", k)), None)
        if packed is not None:  # packed for generation (cpu_kernels.pack_kernels): float32 or integer panels
            scale = next((self.get_variable("params", k) for k in ("pqscale", "qscale")  # int4's, or int8's
                          if packed == "pqkernel" and self.has_variable("params", k)), None)
            y = cpu_kernels.packed_dense(x.astype(self.dtype), self.get_variable("params", packed),
                                         jnp.zeros((self.features,), self.dtype) if bias is None else bias,
                                         self.features, activation, heads, scale)
            if heads:
                return y                                                           # [B, N, S, D]
            activation = None
        elif not self.has_variable("params", "qkernel"):
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
            if heads and bias is not None:
                return cpu_kernels.dense_heads(x, kernel, bias, heads)             # [B, N, S, D]
            y = cpu_kernels.dense(x, kernel, bias, activation)                     # [..., out]
            activation = None
        else:
            y = quantization.quantized_dense(x, self.get_variable("params", "qkernel"),
                                             self.get_variable("params", "qscale"), self.dtype)
            y = y if bias is None else y + bias
        if activation is not None:
            y = activation(y)
        if heads:
            y = y.reshape(*y.shape[:2], heads, -1).transpose(0, 2, 1, 3)          # [B, N, S, D]
        return y


class Embed(nn.Module):
    """A [num, features] lookup table that can also be contracted with (the tied LM head); float ``embedding``
    or an int8 per-row ``qembedding`` + ``qscale`` when quantized."""
    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Callable = nn.initializers.normal(1.0)

    def setup(self) -> None:
        """The float table, unless the params hold a quantized one."""
        if not self._quantized():
            self.embedding = self.param("embedding", self.embedding_init, (self.num_embeddings, self.features),
                                        self.param_dtype)

    def _quantized(self) -> bool:
        return self.has_variable("params", "qembedding")

    def _table(self) -> Array:
        return self.embedding

    def __call__(self, ids: Array) -> Array:
        """Rows ``ids``: [..., features]."""
        if self._quantized():
            return quantization.quantized_lookup(self.get_variable("params", "qembedding"),
                                                 self.get_variable("params", "qscale"), ids, self.dtype)
        return jnp.take(self._table(), ids, axis=0).astype(self.dtype)

    def attend(self, h: Array, bias: Optional[Array] = None) -> Array:
        """h [B, T, features] @ table^T (+ bias [num]) -> [B, T, num]."""
        packed = next((k for k in ("pembedding", "pqembedding") if self.has_variable("params", k)), None)
        if packed is not None:  # packed for a generate call's steps (an int8 table with its row scales)
            return cpu_kernels.packed_dense(
                h.astype(self.dtype), self.get_variable("params", packed),
                jnp.zeros((self.num_embeddings,), self.dtype) if bias is None else bias, self.num_embeddings,
                scale=self.get_variable("params", "qscale") if packed == "pqembedding" else None)
        if self._quantized():
            logits = quantization.quantized_attend(h, self.get_variable("params", "qembedding"),
                                                   self.get_variable("params", "qscale"), self.dtype)
            return logits if bias is None else logits + bias
        # contract with the table as stored: a transposed copy per decode step costs more than the matmul
        logits = cpu_kernels.matmul_nt(h.astype(self.dtype), self._table().astype(self.dtype))
        return logits if bias is None else logits + bias


def _dense(features: int, config: BertGenerationConfig, dtype: Dtype, param_dtype: Dtype, name: str) -> Dense:
    return Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=nn.initializers.normal(config.initializer_range))


class LayerNorm(nn.Module):
    """LayerNorm over the last axis of x (or of x + residual), with ``nn.LayerNorm``'s params (``scale``,
    ``bias``) and torch's two-pass variance (flax's fast E[x^2] - E[x]^2 loses digits on large activations). On
    the CPU, float32, one kernel per call with the residual add in it (``cpu_kernels.layer_norm``)."""
    epsilon: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, residual: Optional[Array] = None) -> Array:
        n = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (n,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (n,), self.param_dtype)
        return cpu_kernels.layer_norm(x, residual, scale, bias, self.epsilon, self.dtype)


def _layer_norm(config: BertGenerationConfig, dtype: Dtype, param_dtype: Dtype, name: str) -> LayerNorm:
    return LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


class Dropout(nn.Module):
    """Inverted dropout with ``nn.Dropout``'s contract (rng collection ``"dropout"``, identity when
    ``deterministic``) that draws 16-bit uniforms: each 32-bit threefry word gives two, half the random-bit work of
    ``nn.Dropout``'s float32 uniforms (2.1x faster masks on the CPU; at rate 0.1 flax's masks took a sixth of a
    CPU training step). The kept fraction is 1 - rate rounded to a multiple of 2^-16 (within 7.7e-6) and kept
    values are scaled by its exact inverse, so the output's expectation is x. A mask depends on the key and the
    shape only, not on how the array is sharded (threefry is partitionable; the split into halves is local)."""
    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        threshold = round((1.0 - self.rate) * 65536)     # keep where the 16-bit draw < threshold
        if deterministic or threshold >= 65536:
            return x
        if threshold <= 0:
            return jnp.zeros_like(x)
        n = x.shape[-1]
        words = jax.random.bits(self.make_rng("dropout"), x.shape[:-1] + ((n + 1) // 2,), jnp.uint32)
        draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(x.shape[:-1] + (-1,))[..., :n]
        keep = draws < jnp.uint16(threshold)                                           # same shape as x
        return jnp.where(keep, x * jnp.asarray(65536 / threshold, x.dtype), jnp.zeros((), x.dtype))


class Embeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (no token types)."""
    config: BertGenerationConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        """Word and position tables, LayerNorm and dropout (PyTorch names)."""
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                                     dtype=self.dtype, param_dtype=self.param_dtype)
        self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                                            dtype=self.dtype, param_dtype=self.param_dtype)
        self.LayerNorm = _layer_norm(cfg, self.dtype, self.param_dtype, "LayerNorm")
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def __call__(self, input_ids: Optional[Array], position_ids: Array, inputs_embeds: Optional[Array] = None,
                 deterministic: bool = True) -> Array:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)                     # [B, T, H]
        x = inputs_embeds.astype(self.dtype) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)

    def attend(self, x: Array, bias: Optional[Array] = None) -> Array:
        """x @ word_embeddings^T (+ bias): the tied LM head's product."""
        return self.word_embeddings.attend(x, bias)


class AttentionProjections(nn.Module):
    """PyTorch's ``attention.self``: query, key, value projections (and the relative distance table)."""
    config: BertGenerationConfig
    relative: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        """The query, key and value projections."""
        cfg = self.config
        self.query = _dense(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "query")
        self.key = _dense(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "key")
        self.value = _dense(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "value")
        # the three as one product [in, 3 * out], when generation fused them (cpu_kernels.fuse_qkv); no params else
        self.qkv = _dense(3 * cfg.hidden_size, cfg, self.dtype, self.param_dtype, "qkv")
        if self.relative:
            self.distance_embedding = nn.Embed(2 * cfg.max_position_embeddings - 1, cfg.head_dim,
                                               embedding_init=nn.initializers.normal(cfg.initializer_range),
                                               dtype=self.dtype, param_dtype=self.param_dtype)

    def split_heads(self, x: Array) -> Array:
        """[B, T, H] -> [B, T, heads, head_dim]."""
        return x.reshape(x.shape[:2] + (self.config.num_attention_heads, self.config.head_dim))  # [B, T, N, D]

    def queries(self, x: Array) -> Array:
        """Projected queries, split into heads."""
        return self.split_heads(self.query(x))

    @property
    def fused(self) -> bool:
        """Whether the params hold query, key and value as one ``qkv`` kernel (``cpu_kernels.fuse_qkv``)."""
        return "qkv" in self.variables.get("params", {})

    def queries_keys_values(self, x: Array) -> tuple[Array, Array, Array]:
        """From the fused ``qkv`` kernel: queries [B, T, N, D], keys and values [B, N, T, D]."""
        h = self.config.hidden_size
        y = self.qkv(x)                                                          # [B, T, 3H]
        k, v = (self.split_heads(y[..., i * h:(i + 1) * h]).transpose(0, 2, 1, 3) for i in (1, 2))
        return self.split_heads(y[..., :h]), k, v

    def keys_values(self, x: Array) -> tuple[Array, Array]:
        """Keys and values head-major, [B, N, S, D]: the layout the cache stores and the einsums read."""
        n = self.config.num_attention_heads
        return self.key(x, heads=n), self.value(x, heads=n)

    def distances(self, query_positions: Array, key_positions: Array) -> Array:
        """Embeddings of query-minus-key distances, [T, S, D], indexed as transformers 4.57 does."""
        p = self.config.max_position_embeddings
        distance = query_positions[:, None] - key_positions[None, :] + p - 1
        return self.distance_embedding(jnp.clip(distance, 0, 2 * p - 2))


class DenseResidualNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): PyTorch's ``attention.output`` and ``output`` blocks."""
    config: BertGenerationConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
        cfg = self.config
        x = _dense(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "dense")(x)
        x = Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return _layer_norm(cfg, self.dtype, self.param_dtype, "LayerNorm")(x, residual)


def _attention_scores(q: Array, k: Array) -> Array:
    """q [B, T, N, D] . k [B, N, S, D] -> [B, N, T, S] (unscaled)."""
    if q.shape[1] == 1:
        # Written as a matvec over K's contiguous head dim: the [B, 1, N, D] form made XLA transpose the cached
        # keys to [N, D, S] on every step at batch 1 (8% of a batch-1 step).
        return jnp.einsum("bnkd,bnd->bnk", k, q[:, 0])[:, :, None, :]
    # Heads moved next to the batch first (a small copy of q): the dots are then plain batched matmuls [T, D] x
    # [D, S]. Contracting q as [B, T, N, D] made XLA pick layouts that ran the small batched dots of beam-search
    # cross-attention (beams folded into T) about 4x slower on the CPU.
    return jnp.einsum("bnqd,bnkd->bnqk", q.transpose(0, 2, 1, 3), k)


def _masked_softmax(scores: Array, allowed: Optional[Array], dtype: Dtype) -> Array:
    """Softmax over keys in float32, disallowed keys at float32's minimum (as transformers masks), in ``dtype``."""
    return _softmax(scores, allowed, jnp.dtype(dtype))


def _softmax_forward(scores: Array, allowed: Optional[Array], dtype: Any) -> tuple[Array, tuple]:
    if allowed is not None:
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
    return probs, (probs, allowed, jnp.zeros((), scores.dtype))


def _softmax_backward(dtype: Any, res: tuple, g: Array) -> tuple[Array, None]:
    # The softmax derivative from its output alone, p (g - sum(g p)) in float32; masked keys get none, as through
    # the mask's select. Autodiff kept the masked scores, the exponentials, the mask broadcast to [B, N, T, S] and
    # the probabilities: four score-sized arrays per attention where one suffices. The probabilities are kept in
    # the compute dtype, as the forward pass uses them (half the memory in bfloat16).
    probs, allowed, like = res
    p, gf = probs.astype(jnp.float32), g.astype(jnp.float32)
    ds = p * (gf - (gf * p).sum(-1, keepdims=True))
    if allowed is not None:
        ds = jnp.where(allowed, ds, 0.0)
    return ds.astype(like.dtype), None


_softmax = jax.custom_vjp(lambda scores, allowed, dtype: _softmax_forward(scores, allowed, dtype)[0],
                          nondiff_argnums=(2,))
_softmax.defvjp(_softmax_forward, _softmax_backward)


def _attention_context(probs: Array, v: Array) -> Array:
    """probs [B, N, T, S] @ v [B, N, S, D] -> [B, T, N, D]."""
    if probs.shape[2] == 1:
        return jnp.einsum("bnk,bnkd->bnd", probs[:, :, 0], v)[:, None]
    return jnp.einsum("bnqk,bnkd->bnqd", probs, v).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """The one attention: self (bidirectional or causal) or cross, full or against a cache.

    ``mask`` is boolean, True where a key may be attended: [B, S] (key padding) or [B, T, S]. Causal masking and
    the cache offset are applied here, so callers pass padding only.
    """
    config: BertGenerationConfig
    cross: bool = False
    causal: bool = False
    decode: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def relative(self) -> bool:
        """Whether positions enter the scores as relative embeddings (4.57's relative_key(_query))."""
        return not self.cross and self.config.position_embedding_type != "absolute"

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array], offset: Array, kv_states: Optional[Array] = None,
                 head_mask: Optional[Array] = None, deterministic: bool = True,
                 output_attentions: bool = False, kv_only: bool = False,
                 packing: Optional[Packing] = None) -> tuple[Array, Optional[Array]]:
        cfg = self.config
        proj = AttentionProjections(cfg, relative=self.relative, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="self")
        if self.cross and kv_states is None and not self.has_variable("cache", "cross_key"):
            return x, None  # a decoder used without an encoder: no cross-attention, as in transformers
        if kv_only:  # cross-attention when decoding: only write the keys/values of kv_states into the cache
            self._cross_keys_values(proj, kv_states)
            return x, None
        fused = not self.cross and packing is None and proj.fused
        if fused:  # one product for the three (a decode step's three smallest)
            q, k, v = proj.queries_keys_values(x)
        else:
            q = proj.queries(x)                                                  # [B, T, N, D]
        b, t = x.shape[:2]
        if packing is not None:  # x holds real tokens only, [1, T_real, H]: attention runs in the padded layout
            b, t = packing.unpack.shape                                          # [B, S]
            unpad = lambda y: y[0][packing.unpack]                               # [1, T_real, ...] -> [B, S, ...]
            q = unpad(q)
        query_positions = offset + jnp.arange(t)                                 # [T]

        if self.cross:
            k, v = self._cross_keys_values(proj, kv_states)                      # [B, N, S_src, D]
            key_positions = jnp.arange(k.shape[2])
        elif packing is not None:
            k, v = (unpad(proj.split_heads(f(x))).transpose(0, 2, 1, 3) for f in (proj.key, proj.value))
            key_positions = jnp.arange(t)
        else:
            if not fused:
                k, v = proj.keys_values(x)
            if self.decode:
                k, v = self._update_cache(k, v, offset)                         # [B, N, S_max, D]
            key_positions = jnp.arange(k.shape[2])

        groups = q.shape[0] // k.shape[0]
        if groups > 1:
            # Cross K/V shared by the `groups` beams (or samples) of each source: fold them into the query axis.
            q = q.reshape(k.shape[0], groups * t, *q.shape[2:])                  # [B_src, G * T, N, D]
        causal = self.causal or (self.decode and not self.cross)
        scale = jnp.sqrt(jnp.asarray(cfg.head_dim, q.dtype))
        step = self.decode and t == 1
        if ((step or (not causal and (mask is None or mask.ndim == 2))) and not self.relative and head_mask is None
                and not output_attentions and (deterministic or cfg.attention_probs_dropout_prob == 0.0)):
            # A decode step, or attention without a causal mask (the encoder, cross-attention): one fused attention
            # over the keys and values (a CPU kernel, else the same XLA, whose derivative training uses).
            allowed = jnp.ones((k.shape[0], k.shape[2]), bool) if mask is None else (
                mask if mask.ndim == 2 else mask[:, 0, :]).astype(bool)           # [B_kv, S]
            if causal:
                allowed = allowed & (key_positions <= query_positions[0])[None, :]
            # closes over Python values only (it is a static argument of a custom derivative)
            root, dtype = math.sqrt(cfg.head_dim), self.dtype
            xla = lambda q, k, v, allowed: _attention_context(
                _masked_softmax(_attention_scores(q, k) / jnp.asarray(root, q.dtype), allowed[:, None, None, :],
                                dtype), v)
            context = cpu_kernels.attend_one(q, k, v, allowed, xla).reshape(b, t, cfg.hidden_size)
            probs = None
        else:
            scores = _attention_scores(q, k)                                     # [B, N, T, S]
            if self.relative:
                pe = proj.distances(query_positions, key_positions).astype(q.dtype)  # [T, S, D]
                scores = scores + jnp.einsum("bqnd,qkd->bnqk", q, pe)
                if cfg.position_embedding_type == "relative_key_query":
                    scores = scores + jnp.einsum("bnkd,qkd->bnqk", k, pe)
            scores = scores / scale
            allowed = None
            if mask is not None:
                allowed = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None, :, :]
            if causal:
                within = key_positions[None, :] <= query_positions[:, None]     # [T, S]
                allowed = within[None, None] if allowed is None else jnp.logical_and(allowed, within)
            probs = _masked_softmax(scores, allowed, self.dtype)
            probs = Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
            if head_mask is not None:
                probs = probs * head_mask.astype(probs.dtype)[None, :, None, None]
            context = _attention_context(probs, v).reshape(b, t, cfg.hidden_size)
            if groups > 1 and output_attentions:
                probs = probs.reshape(k.shape[0], -1, groups, t, probs.shape[-1]).swapaxes(1, 2).reshape(
                    b, -1, t, probs.shape[-1])
        if packing is not None:  # back to the real tokens, [1, T_real, H]
            context = context.reshape(b * t, -1)[packing.pack][None]
        out = DenseResidualNorm(cfg, self.dtype, self.param_dtype, name="output")(context, x, deterministic)
        return out, (probs if output_attentions else None)

    def _update_cache(self, k: Array, v: Array, offset: Array) -> tuple[Array, Array]:
        """Writes this chunk's keys/values at ``offset`` into the preallocated cache and returns the whole cache."""
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        # the _in_dim form gives the other axes' start indices offset's own type (also under jax_enable_x64)
        cached_key.value = jax.lax.dynamic_update_slice_in_dim(cached_key.value, k.astype(cached_key.value.dtype),
                                                               offset, axis=2)
        cached_value.value = jax.lax.dynamic_update_slice_in_dim(cached_value.value,
                                                                 v.astype(cached_value.value.dtype), offset, axis=2)
        return cached_key.value, cached_value.value

    def _cross_keys_values(self, proj: AttentionProjections, kv_states: Optional[Array]) -> tuple[Array, Array]:
        """Cross K/V from the encoder states; when decoding they are computed once and then read from the cache."""
        if not self.decode:
            if kv_states is None:
                raise ValueError("cross-attention needs encoder_hidden_states")
            return proj.keys_values(kv_states)
        if kv_states is not None:
            k, v = proj.keys_values(kv_states)
            cross_key = self.variable("cache", "cross_key", jnp.zeros, k.shape, k.dtype)
            cross_value = self.variable("cache", "cross_value", jnp.zeros, v.shape, v.dtype)
            cross_key.value, cross_value.value = k, v
            return k, v
        return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")


class Intermediate(nn.Module):
    """The feed-forward expansion: dense to intermediate_size, then the activation."""
    config: BertGenerationConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        return _dense(cfg.intermediate_size, cfg, self.dtype, self.param_dtype, "dense")(
            x, activation=ACTIVATIONS[cfg.hidden_act])                                # [B, T, I]


class Layer(nn.Module):
    """One post-LN block: self-attention, cross-attention (decoders), feed-forward.

    Signature ``(carry, per_layer_inputs) -> (carry, per_layer_outputs)`` so the same module scans or unrolls.
    """
    config: BertGenerationConfig
    causal: bool = False
    decode: bool = False
    deterministic: bool = True
    output_attentions: bool = False
    output_hidden_states: bool = False
    cross_only: bool = False  # decode mode: only write the cross-attention keys/values into the cache
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: Array, mask: Optional[Array], offset: Array, encoder_states: Optional[Array],
                 encoder_mask: Optional[Array], packing: Optional[Packing], head_mask: Optional[Array]):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.cross_only:
            Attention(cfg, cross=True, decode=True, name="crossattention", **kw)(
                h, None, offset, kv_states=encoder_states, kv_only=True)
            return h, (None, None, None)
        h, self_probs = Attention(cfg, causal=self.causal, decode=self.decode, name="attention", **kw)(
            h, mask, offset, head_mask=head_mask, deterministic=self.deterministic,
            output_attentions=self.output_attentions, packing=packing)
        cross_probs = None
        # With a filled cache the decoder attends to cached cross K/V, so encoder states are not needed here.
        if cfg.add_cross_attention and (encoder_states is not None or self.decode):
            h, cross_probs = Attention(cfg, cross=True, decode=self.decode, name="crossattention", **kw)(
                h, encoder_mask, offset, kv_states=encoder_states, head_mask=head_mask,
                deterministic=self.deterministic, output_attentions=self.output_attentions)
        ff = Intermediate(cfg, name="intermediate", **kw)(h)
        h = DenseResidualNorm(cfg, name="output", **kw)(ff, h, self.deterministic)
        return h, (h if self.output_hidden_states else None, self_probs, cross_probs)


REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # keep every activation for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input; recompute the rest
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the weight matmuls' outputs
}


class LayerStack(nn.Module):
    """PyTorch's ``encoder``: L layers, scanned (``layer`` with a leading [L] axis) or unrolled (``layer_i``).

    ``remat`` (``REMAT_POLICIES``) trades compute for memory in training: the layers' activations are recomputed
    in the backward pass instead of kept. ``scan_unroll`` layers run per iteration of the scan; from the layer
    count on, the scan is unrolled completely while the parameters stay stacked (a longer compile; on a CPU a
    faster training step: no zero-filled stacked buffers, no per-layer slices). Neither changes a parameter or
    a result."""
    config: BertGenerationConfig
    scan_layers: bool = True
    remat: str = "none"
    scan_unroll: int = 1
    causal: bool = False
    decode: bool = False
    deterministic: bool = True
    output_attentions: bool = False
    output_hidden_states: bool = False
    cross_only: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: Array, mask: Optional[Array], offset: Array, encoder_states: Optional[Array],
                 encoder_mask: Optional[Array], head_mask: Optional[Array], packing: Optional[Packing] = None):
        kw = dict(config=self.config, causal=self.causal, decode=self.decode, deterministic=self.deterministic,
                  output_attentions=self.output_attentions, output_hidden_states=self.output_hidden_states,
                  cross_only=self.cross_only, dtype=self.dtype, param_dtype=self.param_dtype)
        n = self.config.num_hidden_layers
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
        if self.scan_unroll < 1:
            raise ValueError(f"scan_unroll must be >= 1, got {self.scan_unroll}")
        unrolled = not self.scan_layers or self.scan_unroll > 1
        layer = Layer if self.remat == "none" else nn.remat(Layer, policy=REMAT_POLICIES[self.remat],
                                                             prevent_cse=unrolled)
        if self.scan_layers:
            scanned = nn.scan(layer, variable_axes={"params": 0, "cache": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * 5 + (0,), length=n,
                              unroll=True if self.scan_unroll >= n else self.scan_unroll)
            h, (hs, attn, cross) = scanned(name="layer", **kw)(h, mask, offset, encoder_states, encoder_mask,
                                                                 packing, head_mask)
            unstack = lambda x: None if x is None else tuple(x[i] for i in range(n))
            return h, unstack(hs), unstack(attn), unstack(cross)
        outs = []
        for i in range(n):
            h, out = layer(name=f"layer_{i}", **kw)(h, mask, offset, encoder_states, encoder_mask, packing,
                                                    None if head_mask is None else head_mask[i])
            outs.append(out)
        collect = lambda j: None if outs[0][j] is None else tuple(o[j] for o in outs)
        return h, collect(0), collect(1), collect(2)


class BertGenerationModule(nn.Module):
    """Embeddings + layer stack: transformers' ``BertGenerationEncoder`` (and the decoder's ``bert``)."""
    config: BertGenerationConfig
    scan_layers: bool = True
    remat: str = "none"
    scan_unroll: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        """Embeddings and the layer stack."""
        self.embeddings = Embeddings(self.config, dtype=self.dtype, param_dtype=self.param_dtype)

    def attend_word_embeddings(self, h: Array, bias: Optional[Array] = None) -> Array:
        """h [B, T, H] @ word_embeddings^T [H, V] (+ bias [V]): the product of a tied LM head."""
        return self.embeddings.attend(h, bias)

    @nn.compact
    def __call__(self, input_ids: Optional[Array] = None, attention_mask: Optional[Array] = None,
                 position_ids: Optional[Array] = None, head_mask: Optional[Array] = None,
                 inputs_embeds: Optional[Array] = None, encoder_hidden_states: Optional[Array] = None,
                 encoder_attention_mask: Optional[Array] = None, *, causal: Optional[bool] = None,
                 decode: bool = False, deterministic: bool = True, output_attentions: bool = False,
                 output_hidden_states: bool = False, cross_only: bool = False,
                 packing: Optional[Packing] = None) -> StackOutput:
        """The stack's states; with ``packing``, input_ids and position_ids are the packed row [1, T] and
        attention_mask the padded batch's [B, S] (see ``Packing``)."""
        cfg = self.config
        if cross_only:  # decode mode: write every layer's cross-attention keys/values of encoder_hidden_states
            states = encoder_hidden_states.astype(self.dtype)
            h = jnp.zeros((states.shape[0], 1, cfg.hidden_size), self.dtype)
            LayerStack(cfg, scan_layers=self.scan_layers, decode=True, cross_only=True, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="encoder")(h, None, jnp.array(0, jnp.int32), states, None,
                                                                     None)
            return StackOutput(last_hidden_state=h)
        causal = cfg.is_decoder if causal is None else causal
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        b, t = (input_ids if input_ids is not None else inputs_embeds).shape[:2]

        if decode:
            index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            offset = index.value
            index.value = offset + t
        else:
            offset = jnp.array(0, jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(offset + jnp.arange(t), (b, t))

        mask = None if attention_mask is None else attention_mask.astype(bool)
        encoder_mask = None if encoder_attention_mask is None else encoder_attention_mask.astype(bool)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.astype(self.dtype)
        if head_mask is not None:
            head_mask = jnp.asarray(head_mask, self.dtype)
            if head_mask.ndim == 1:
                head_mask = jnp.broadcast_to(head_mask, (cfg.num_hidden_layers, cfg.num_attention_heads))

        h = self.embeddings(input_ids, position_ids, inputs_embeds, deterministic=deterministic)  # [B, T, H]
        stack = LayerStack(cfg, scan_layers=self.scan_layers, remat=self.remat, scan_unroll=self.scan_unroll,
                           causal=causal, decode=decode,
                           deterministic=deterministic, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="encoder")
        last, hs, attn, cross = stack(h, mask, offset, encoder_hidden_states, encoder_mask, head_mask, packing)
        if hs is not None:
            hs = (h,) + hs
        return StackOutput(last_hidden_state=last, hidden_states=hs, attentions=attn,
                           cross_attentions=cross if encoder_hidden_states is not None or decode else None)


class LMHead(nn.Module):
    """logits = h @ E^T + bias (tied), or h @ W + bias with its own ``decoder`` kernel (untied)."""
    config: BertGenerationConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: Array, attend_word_embeddings: Callable[[Array], Array]) -> Array:
        cfg = self.config
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), self.param_dtype)
        h = h.astype(self.dtype)
        if cfg.tie_word_embeddings:
            return attend_word_embeddings(h, bias.astype(self.dtype))                          # [B, T, V]
        decoder = Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.normal(cfg.initializer_range), name="decoder")
        return decoder(h) + bias.astype(self.dtype)


def empty_cache(module: nn.Module, ids_shape: tuple[int, int], *args: Any, method: Any = None,
                **kwargs: Any) -> dict:
    """A zero cache shaped as ``module.init(..., decode=True)`` creates it (shapes only: nothing is computed)."""
    ids = jnp.zeros(ids_shape, jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, *args, decode=True, method=method,
                                                **kwargs)["cache"])
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cross_entropy(logits: Array, labels: Array, ignore_index: int = -100) -> Array:
    """Mean token cross-entropy over labels != ignore_index (torch's CrossEntropyLoss, computed in float32)."""
    logits = logits.astype(jnp.float32)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, log_z - picked, 0.0)
    return nll.sum() / valid.sum()


def shift_tokens_right(labels: Array, pad_token_id: int, decoder_start_token_id: int) -> Array:
    """Decoder inputs from labels: start token first, labels shifted right, -100 replaced by pad."""
    labels = jnp.asarray(labels)  # numpy int64 labels become jax's int32 here, quietly (x64 off)
    shifted = jnp.concatenate(
        [jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


class BertGenerationDecoderModule(nn.Module):
    """``bert`` + ``lm_head``: transformers' ``BertGenerationDecoder`` (causal LM, cross-attention optional)."""
    config: BertGenerationConfig
    scan_layers: bool = True
    remat: str = "none"
    scan_unroll: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        """The stack (named ``bert``, as in PyTorch) and the LM head."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.bert = BertGenerationModule(self.config, scan_layers=self.scan_layers, remat=self.remat,
                                         scan_unroll=self.scan_unroll, **kw)
        self.lm_head = LMHead(self.config, **kw)

    def __call__(self, input_ids: Optional[Array] = None, attention_mask: Optional[Array] = None,
                 position_ids: Optional[Array] = None, head_mask: Optional[Array] = None,
                 inputs_embeds: Optional[Array] = None, encoder_hidden_states: Optional[Array] = None,
                 encoder_attention_mask: Optional[Array] = None, labels: Optional[Array] = None, *,
                 decode: bool = False, deterministic: bool = True, output_attentions: bool = False,
                 output_hidden_states: bool = False) -> LMOutput:
        out = self.bert(input_ids, attention_mask, position_ids, head_mask, inputs_embeds, encoder_hidden_states,
                        encoder_attention_mask, causal=True, decode=decode, deterministic=deterministic,
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        logits = self.lm_head(out.last_hidden_state, self.bert.attend_word_embeddings)  # [B, T, V]
        loss = None
        if labels is not None:  # causal-LM loss: position t predicts label t + 1
            loss = cross_entropy(logits[:, :-1], labels[:, 1:])
        return LMOutput(logits=logits, loss=loss, last_hidden_state=out.last_hidden_state,
                        hidden_states=out.hidden_states, attentions=out.attentions,
                        cross_attentions=out.cross_attentions)


class EncoderDecoderModule(nn.Module):
    """transformers' ``EncoderDecoderModel`` with BertGeneration on both sides.

    With ``tie_encoder_decoder`` there is no ``encoder`` subtree: the encoder runs the decoder's ``bert``
    parameters bidirectionally without cross-attention, as transformers 4.x shares them.
    """
    config: EncoderDecoderConfig
    scan_layers: bool = True
    remat: str = "none"
    scan_unroll: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        """Encoder (absent when tied), optional enc_to_dec_proj, and the decoder."""
        cfg, kw = self.config, dict(scan_layers=self.scan_layers, remat=self.remat, scan_unroll=self.scan_unroll,
                                    dtype=self.dtype, param_dtype=self.param_dtype)
        self.decoder = BertGenerationDecoderModule(cfg.decoder, **kw)
        if not cfg.tie_encoder_decoder:
            self.encoder = BertGenerationModule(cfg.encoder, **kw)
        if cfg.needs_projection:
            self.enc_to_dec_proj = _dense(cfg.decoder.hidden_size, cfg.decoder, self.dtype, self.param_dtype,
                                          "enc_to_dec_proj")

    def encode(self, input_ids: Optional[Array] = None, attention_mask: Optional[Array] = None,
               position_ids: Optional[Array] = None, head_mask: Optional[Array] = None,
               inputs_embeds: Optional[Array] = None, *, deterministic: bool = True,
               output_attentions: bool = False, output_hidden_states: bool = False,
               packing: Optional[Packing] = None) -> StackOutput:
        """Encoder states of the source [B, S, H] (the decoder's stack runs them when tied); with ``packing``,
        of the packed row [1, T, H]."""
        encoder = self.decoder.bert if self.config.tie_encoder_decoder else self.encoder
        return encoder(input_ids, attention_mask, position_ids, head_mask, inputs_embeds, causal=False,
                       deterministic=deterministic, output_attentions=output_attentions,
                       output_hidden_states=output_hidden_states, packing=packing)

    def project(self, encoder_hidden_states: Array) -> Array:
        """Encoder states in the decoder's width (``enc_to_dec_proj`` when the hidden sizes differ)."""
        if self.config.needs_projection:
            return self.enc_to_dec_proj(encoder_hidden_states)
        return encoder_hidden_states

    def prime_cross_attention(self, encoder_hidden_states: Array) -> None:
        """Decode mode: writes every decoder layer's cross-attention keys/values for ``encoder_hidden_states`` into
        the cache and computes nothing else. Afterwards a decode step needs no encoder states, so a one-token
        prompt runs as a plain step (generation compiles one decoder, not a prompt pass beside it)."""
        self.decoder.bert(encoder_hidden_states=self.project(encoder_hidden_states), decode=True, cross_only=True)

    def decode(self, decoder_input_ids: Optional[Array], encoder_hidden_states: Optional[Array],
               encoder_attention_mask: Optional[Array] = None, decoder_attention_mask: Optional[Array] = None,
               decoder_position_ids: Optional[Array] = None, decoder_inputs_embeds: Optional[Array] = None,
               decoder_head_mask: Optional[Array] = None, *, decode: bool = False, deterministic: bool = True,
               output_attentions: bool = False, output_hidden_states: bool = False) -> LMOutput:
        """Decoder logits given (unprojected) encoder states; with ``decode`` and a filled cache they may be None."""
        if encoder_hidden_states is not None:
            encoder_hidden_states = self.project(encoder_hidden_states)
        return self.decoder(decoder_input_ids, decoder_attention_mask, decoder_position_ids, decoder_head_mask,
                            decoder_inputs_embeds, encoder_hidden_states, encoder_attention_mask,
                            decode=decode, deterministic=deterministic, output_attentions=output_attentions,
                            output_hidden_states=output_hidden_states)

    def __call__(self, input_ids: Optional[Array] = None, attention_mask: Optional[Array] = None,
                 decoder_input_ids: Optional[Array] = None, decoder_attention_mask: Optional[Array] = None,
                 labels: Optional[Array] = None, *, inputs_embeds: Optional[Array] = None,
                 decoder_inputs_embeds: Optional[Array] = None, position_ids: Optional[Array] = None,
                 decoder_position_ids: Optional[Array] = None, head_mask: Optional[Array] = None,
                 decoder_head_mask: Optional[Array] = None, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False) -> Seq2SeqOutput:
        enc = self.encode(input_ids, attention_mask, position_ids, head_mask, inputs_embeds,
                          deterministic=deterministic, output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids, decoder_inputs_embeds or labels")
            pad, start = resolve_start_and_pad(self.config)
            decoder_input_ids = shift_tokens_right(labels, pad, start)
            if decoder_attention_mask is None:  # as transformers: mask the pad positions of the shifted labels
                decoder_attention_mask = decoder_input_ids != pad
        dec = self.decode(decoder_input_ids, enc.last_hidden_state, attention_mask, decoder_attention_mask,
                          decoder_position_ids, decoder_inputs_embeds, decoder_head_mask,
                          deterministic=deterministic, output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states)
        loss = None if labels is None else cross_entropy(dec.logits, labels)
        return Seq2SeqOutput(logits=dec.logits, loss=loss, encoder_last_hidden_state=enc.last_hidden_state,
                             encoder_hidden_states=enc.hidden_states, encoder_attentions=enc.attentions,
                             decoder_hidden_states=dec.hidden_states, decoder_attentions=dec.attentions,
                             cross_attentions=dec.cross_attentions)


def resolve_start_and_pad(cfg: EncoderDecoderConfig) -> tuple[int, int]:
    """(pad_token_id, decoder_start_token_id) from the top-level config, falling back to the decoder's."""
    start = cfg.decoder_start_token_id
    if start is None:
        start = cfg.decoder.decoder_start_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.decoder.pad_token_id
    if start is None:
        raise ValueError("decoder_start_token_id is not set in the config: set config.decoder_start_token_id "
                         "(bert2bert checkpoints usually use the [CLS] / <s> id) to build decoder inputs from labels")
    if pad is None:
        raise ValueError("pad_token_id is not set in the config: it is needed to replace -100 in shifted labels")
    return pad, start
