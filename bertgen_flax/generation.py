"""Glue between the linen modules and ``decoding``: step functions, cache handling, buckets and compiled programs.

One compiled program per (batch bucket, source-length bucket, search spec): the encoder runs once (in chunks of
about ``ENCODER_CHUNK_TOKENS`` tokens), cross-attention keys/values are computed once per source (shared by its
beams or samples: the decoder folds the copies into the query axis), the self-attention cache is preallocated, the
decoder runs with its layers unrolled, and the whole search runs inside that program.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernels, decoding
from .quantization import is_quantized
from .decoding import GenerationConfig, SearchSpec

TRACE_COUNTS: dict[str, int] = {"seq2seq": 0, "causal": 0}  # incremented when a program is traced (compiled)

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket(n: int, limit: Optional[int] = None, minimum: int = 1) -> int:
    """Smallest bucket >= n: powers of two up to 128, then multiples of 64 (capped at ``limit``)."""
    n = max(n, minimum)
    for b in _SIZE_BUCKETS:
        if b >= n:
            out = b
            break
    else:
        out = -(-n // 64) * 64
    return min(out, limit) if limit is not None and n <= limit else out


def enable_compilation_cache(path: Optional[str] = None, min_compile_time_s: float = 0.0) -> str:
    """Keeps compiled programs on disk in ``path`` (JAX's persistent compilation cache), so a later process
    loads each generate program instead of compiling it again.

    ``path`` defaults to ``~/.cache/bertgen_flax/xla``. Programs that took at least ``min_compile_time_s`` to
    compile are written (0: all of them). This sets process-wide JAX options (``jax_compilation_cache_dir`` and
    the thresholds), which is why importing the package does not call it; setting ``JAX_COMPILATION_CACHE_DIR``
    in the environment before starting Python has much the same effect (with JAX's 1 s threshold). Returns the
    path.
    """
    path = path or os.path.join(os.path.expanduser("~"), ".cache", "bertgen_flax", "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def reorder_cache(cache: Any, rows: jax.Array) -> Any:
    """Beam reordering: self-attention K/V rows follow their parents; cross K/V and indices stay.

    Only the positions already written (before the cache's ``cache_index``) have to follow: on the CPU an unrolled
    layer's cache is reordered in place, those positions only (``cpu_kernels.reorder_rows``)."""
    named = lambda path, name: getattr(path[-1], "key", None) == name
    indices = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(cache) if named(path, "cache_index")]
    length = indices[0] if indices else jnp.array(2 ** 30, jnp.int32)

    def fix(path, leaf):
        if named(path, "cached_key") or named(path, "cached_value"):
            if leaf.ndim == 4:
                return cpu_kernels.reorder_rows(leaf, rows, length)
            return jnp.take(leaf, rows, axis=leaf.ndim - 4)  # a leading layer axis when layers are scanned
        return leaf
    return jax.tree_util.tree_map_with_path(fix, cache)


def _expand(spec: SearchSpec) -> int:
    return spec.num_beams if spec.num_beams > 1 else spec.num_return_sequences


def _unrolled(module: Any, params: Any) -> tuple[Any, Any]:
    """The module with its layers unrolled, and the params to match (inside a program: static slices, once).

    Decode steps run the unrolled form. Under ``nn.scan`` every step would copy each layer's weights out of the
    stacked params (a dynamic slice per weight, per layer, per step) and write the whole stacked self-attention
    cache back as the scan's output. Unrolled, the weights are sliced once per program call and each step
    updates only the new cache column, in place.
    """
    if not getattr(module, "scan_layers", False):
        return module, params
    from .convert import unstack_layers
    return module.clone(scan_layers=False), unstack_layers(params)


def _matrices_in(dtype: Any, tree: Any) -> Any:
    """``tree`` with its float weight matrices (``kernel`` and ``embedding`` leaves) cast to the compute ``dtype``
    where that is narrower, for the decode loop: once per call instead of once per step.

    A model loaded with ``dtype=bfloat16`` keeps float32 params, and its modules cast each matrix when they use it.
    Inside the loop that cast is loop-invariant, so XLA may hoist it (XLA:CPU does) or not; done here, the loop
    reads bfloat16 matrices whatever the compiler does: half the bytes of a bandwidth-bound step. The numbers do
    not change (the modules cast the same matrices to the same dtype; casting commutes with the lookups).
    Vectors (biases, LayerNorm) keep their dtype, as do the CPU kernels' packed leaves and integer weights.
    """
    dtype = jnp.dtype(dtype)

    def cast(path: tuple, x: Any) -> Any:
        name = getattr(path[-1], "key", None) if path else None
        if (name in ("kernel", "embedding") and getattr(x, "ndim", 0) >= 2 and jnp.issubdtype(x.dtype, jnp.floating)
                and jnp.dtype(x.dtype).itemsize > dtype.itemsize):
            return x.astype(dtype)
        return x
    return jax.tree_util.tree_map_with_path(cast, tree)


def _has_stacked_layers(tree: Any) -> bool:
    """Whether a params subtree holds layers stacked for ``nn.scan`` (a ``layer`` subtree)."""
    return isinstance(tree, dict) and any(k == "layer" or _has_stacked_layers(v) for k, v in tree.items())


def _in_step_layout(cache: Any, unstack: bool) -> Any:
    """A cache the decoder wrote with its layers as stored, in the layout of the unrolled steps when they differ
    (``unstack``: stacked ``layer`` leaves sliced per layer, a copy of the cache once per call)."""
    if not unstack:
        return cache
    from .convert import unstack_layers
    return unstack_layers(cache)


def _prefill(run_stored: Callable, unstack: bool) -> Callable:
    """The prompt pass through the decoder as stored (scanned layers: one layer traced, not L), its cache then in
    the steps' layout.

    The prompt pass runs once per call, so the per-layer weight slices of a scan cost little there, while tracing
    the unrolled decoder a second time, only for it, roughly doubled the decode program's compile time.
    """
    def prefill(cache, tokens):
        logits, cache = run_stored(cache, tokens)
        return logits, _in_step_layout(cache, unstack)
    return prefill


def _merge(base: dict, update: dict) -> dict:
    """``base`` with the leaves of ``update`` put in (nested dicts, same layout)."""
    return {k: (_merge(v, update[k]) if isinstance(v, dict) else update[k]) if k in update else v
            for k, v in base.items()}


ENCODER_CHUNK_TOKENS = 1024


def encoder_rows(batch: int, src_len: int, tokens: int = ENCODER_CHUNK_TOKENS) -> int:
    """Sequences per encoder chunk: the largest divisor of ``batch`` whose chunk holds at most ``tokens`` tokens.

    One encoder pass over 8,192 tokens (batch 128 x 64) streams [8192, 1024] feed-forward activations (34 MB)
    through memory; chunks of about 1,024 tokens keep them in the caches, which made the encoder ~13% faster at
    batch 128 on a 2-core CPU. Rows are independent, so chunking does not change any result.
    """
    rows = max(1, min(batch, tokens // max(src_len, 1)))
    while batch % rows:
        rows -= 1
    return rows


@functools.lru_cache(maxsize=64)
def _seq2seq_program(module: Any, spec: SearchSpec, batch: int, src_len: int, scores: bool, rows: int,
                     unroll: bool = True) -> Callable:
    """The whole generate call for one bucket: ``rows`` sequences per encoder chunk, sequence scores or not, the
    decoder unrolled (``unroll``) or run as stored."""
    from .modeling import EncoderDecoderModule, Packing, empty_cache
    copies = _expand(spec)

    def program(params, src, src_mask, prompt, rng, packing):
        TRACE_COUNTS["seq2seq"] += 1

        def encode(chunk):  # the encoder runs once, as stored (scanned layers compile faster)
            ids, mask = chunk
            return module.apply({"params": params}, ids, mask, method=EncoderDecoderModule.encode).last_hidden_state

        if packing is not None:  # the real tokens only, as one row; then back into the padded layout
            flat_ids, flat_pos, unpack, pack = packing
            states = module.apply({"params": params}, flat_ids, src_mask, flat_pos,
                                  packing=Packing(unpack, pack), method=EncoderDecoderModule.encode)
            enc = states.last_hidden_state[0][unpack]                             # [B, S, H]
        elif rows < batch:  # in chunks of `rows` sequences, one after the other
            chunks = batch // rows
            enc = jax.lax.map(encode, (src.reshape(chunks, rows, -1), src_mask.reshape(chunks, rows, -1)))
            enc = enc.reshape(batch, *enc.shape[2:])
        else:
            enc = encode((src, src_mask))
        unrolled, dec_params = _unrolled(module, params) if unroll else (module, params)
        # The decoder's once-per-call passes run as stored, or unrolled when a scanned model's decoder came
        # unstacked already (PackedWeights).
        stored = unrolled if unrolled is not module and not _has_stacked_layers(params["decoder"]) else module
        n = batch * copies
        if unroll and cpu_kernels.packing_pays(n, is_quantized(params), module.dtype):  # the steps' weights, once
            dec_params = dict(dec_params, decoder=cpu_kernels.pack_for_steps(
                dec_params["decoder"], module.config.decoder.tie_word_embeddings))
        dec_params = _matrices_in(module.dtype, dec_params)

        def run(mod, p, cache, tokens, states):
            out, variables = mod.apply({"params": p, "cache": cache}, tokens, states, src_mask, decode=True,
                                       method=EncoderDecoderModule.decode, mutable=["cache"])
            return out.logits[:, -1].astype(jnp.float32), variables["cache"]

        step = lambda cache, tokens: run(unrolled, dec_params, cache, tokens, None)
        if prompt.shape[1] == 1:
            # One start token: write the cross-attention keys/values first, then the prompt is a plain step.
            cache = empty_cache(unrolled, (n, spec.max_length), enc, method=EncoderDecoderModule.decode)
            _, primed = stored.apply({"params": params}, enc, method=EncoderDecoderModule.prime_cross_attention,
                                     mutable=["cache"])
            cache = _merge(cache, _in_step_layout(primed["cache"], unrolled is not stored))
            prefill = None  # the loop's first step (the decoder is traced once, inside the loop)
        else:
            # The prompt pass runs the decoder as `stored` and hands the steps its cache in their layout.
            cache = empty_cache(stored, (n, spec.max_length), enc, method=EncoderDecoderModule.decode)
            prefill = _prefill(lambda cache, tokens: run(stored, params, cache, tokens, enc), unrolled is not stored)
        return decoding.generate(spec, prefill, step, reorder_cache, cache,
                                 jnp.repeat(prompt, copies, axis=0), rng, scores=scores)

    return jax.jit(program)


@functools.lru_cache(maxsize=64)
def _causal_program(module: Any, spec: SearchSpec, batch: int, scores: bool, unroll: bool = True) -> Callable:
    from .modeling import empty_cache
    copies = _expand(spec)
    scanned = module

    def program(params, prompt, prompt_mask, rng):
        TRACE_COUNTS["causal"] += 1
        stored, stored_params = scanned, params
        module, params = _unrolled(scanned, params) if unroll else (scanned, params)
        n = batch * copies
        if unroll and cpu_kernels.packing_pays(n, is_quantized(params), scanned.dtype):  # the steps' weights, once
            params = cpu_kernels.pack_for_steps(params, scanned.config.tie_word_embeddings)
        params = _matrices_in(scanned.dtype, params)
        prompt = jnp.repeat(prompt, copies, axis=0)
        prompt_mask = jnp.repeat(prompt_mask, copies, axis=0)
        p = prompt.shape[1]
        full_mask = jnp.concatenate([prompt_mask, jnp.ones((n, spec.max_length - p), prompt_mask.dtype)], axis=1)
        # transformers derives positions from the mask: left padding does not shift the real tokens' positions
        pad_before = p - prompt_mask.sum(axis=1)                                  # [N]
        prompt_positions = jnp.clip(jnp.cumsum(prompt_mask, axis=1) - 1, 0, None)
        prompt_positions = jnp.where(prompt_mask == 1, prompt_positions, 1)
        cache = empty_cache(stored, (n, spec.max_length))

        def run(mod, p, cache, tokens, positions):
            out, variables = mod.apply({"params": p, "cache": cache}, tokens, full_mask, positions,
                                       decode=True, mutable=["cache"])
            return out.logits[:, -1].astype(jnp.float32), variables["cache"]

        def step(cache, tokens):
            index = cache["bert"]["cache_index"]
            return run(module, params, cache, tokens, (index - pad_before)[:, None])

        prefill = _prefill(lambda cache, tokens: run(stored, stored_params, cache, tokens, prompt_positions),
                           module is not stored)
        ignore = jnp.argmax(prompt_mask != 0, axis=1)  # repetition penalty skips left padding, as transformers
        return decoding.generate(spec, prefill, step, reorder_cache, cache, prompt, rng, ignore_before=ignore,
                                 scores=scores)

    return jax.jit(program)


# ---- sharding over a device mesh ------------------------------------------------------------------------------
DATA_AXIS, MODEL_AXIS = "data", "model"


def shard_params(params: Any, mesh: jax.sharding.Mesh) -> Any:
    """Places parameters on ``mesh``: matrices split along their last axis over ``model`` when it divides them,
    everything else replicated (the JAX counterpart of ``device_map="auto"`` for inference)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    model = mesh.shape.get(MODEL_AXIS, 1)

    def place(x):
        spec = P()
        if model > 1 and x.ndim >= 2 and x.shape[-1] % model == 0:
            spec = P(*([None] * (x.ndim - 1)), MODEL_AXIS)
        return jax.device_put(x, NamedSharding(mesh, spec))
    return jax.tree_util.tree_map(place, params)


def _shard_batch(mesh: Optional[jax.sharding.Mesh], *arrays: np.ndarray) -> tuple:
    if mesh is None:
        return arrays
    from jax.sharding import NamedSharding, PartitionSpec as P
    return tuple(jax.device_put(a, NamedSharding(mesh, P(DATA_AXIS))) for a in arrays)


def _batch_bucket(b: int, mesh: Optional[jax.sharding.Mesh]) -> int:
    bb = bucket(b)
    if mesh is not None:
        data = mesh.shape.get(DATA_AXIS, 1)
        bb = -(-max(bb, data) // data) * data
    return bb


def _check_mesh(mesh: Optional[jax.sharding.Mesh]) -> None:
    if mesh is not None and DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"the generation mesh needs a '{DATA_AXIS}' axis (and optionally '{MODEL_AXIS}'), got "
                         f"axes {mesh.axis_names}")


def _pad_rows(x: np.ndarray, rows: int, value: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    pad = np.full((rows - x.shape[0],) + x.shape[1:], value, x.dtype)
    return np.concatenate([x, pad], axis=0)


def _pad_cols(x: np.ndarray, cols: int, value: int) -> np.ndarray:
    if x.shape[1] == cols:
        return x
    return np.pad(x, ((0, 0), (0, cols - x.shape[1])), constant_values=value)


# Sizes of the encoder's packed token row per (batch, source) bucket: more sizes, less padding computed, more
# programs compiled (on 2 CPU cores at the small model, 16 sizes ran 1.5-2% faster than 8 at batch 32 and 128).
PACKING_BUCKETS = 16


def _packing(src: np.ndarray, mask: np.ndarray, buckets: int) -> Optional[tuple]:
    """The real source tokens as one row for the encoder (``modeling.Packing``), or None when packing saves
    nothing. The row's length is rounded up to a multiple of 1 / ``buckets`` of the padded batch, so a batch
    and source bucket compiles at most ``buckets`` encoder variants."""
    if buckets <= 0:
        return None
    b, s = mask.shape
    real = np.flatnonzero(mask.reshape(-1) != 0)                                  # padded positions, in order
    unit = -(-b * s // buckets)
    length = max(1, -(-len(real) // unit)) * unit
    if length >= b * s:
        return None
    pack = np.zeros(length, np.int32)
    pack[:len(real)] = real
    unpack = np.zeros(b * s, np.int32)
    unpack[real] = np.arange(len(real), dtype=np.int32)
    return (src.reshape(-1)[pack][None].astype(np.int32), (pack % s)[None].astype(np.int32),
            unpack.reshape(b, s), pack)


def _rng(seed: Optional[int], rng: Optional[jax.Array]) -> jax.Array:
    if rng is not None:
        return rng
    return _seed_key(0 if seed is None else seed)


@functools.lru_cache(maxsize=16)
def _seed_key(seed: int) -> jax.Array:
    """``PRNGKey(seed)``, made once per seed: building it is a device computation of its own (0.2-0.5 ms), which
    mattered for batch-1 calls of a few milliseconds. Keys are immutable, so sharing one is safe."""
    return jax.random.PRNGKey(seed)


def _finish(spec: SearchSpec, sequences, scores, lengths, batch: int, return_scores: bool):
    """Drops bucket rows and trims to the longest real row, as transformers lays out its output. Copies to the
    host only what it needs (greedy search and sampling read their lengths off the sequences)."""
    rows = batch * spec.num_return_sequences
    sequences = np.asarray(sequences)[:rows]
    lengths = _greedy_lengths(spec, sequences) if spec.num_beams == 1 else np.asarray(lengths)[:rows]
    out = jnp.asarray(decoding.trim(sequences, lengths))
    return (out, jnp.asarray(np.asarray(scores)[:rows])) if return_scores else out


def _greedy_lengths(spec: SearchSpec, sequences: np.ndarray) -> np.ndarray:
    """Where each row stopped: after its first EOS past the prompt, else at max_length."""
    p = spec.prompt_length
    if not spec.eos_ids:
        return np.full(len(sequences), spec.max_length)
    is_eos = (sequences[:, p:, None] == np.asarray(spec.eos_ids)).any(axis=-1)  # (np.isin: 10x the time here)
    first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, spec.max_length - p)
    return p + first


def seq2seq_generate(module: Any, params: Any, input_ids: np.ndarray, attention_mask: Optional[np.ndarray],
                     config: GenerationConfig, *, decoder_input_ids: Optional[np.ndarray] = None,
                     rng: Optional[jax.Array] = None, seed: Optional[int] = None, return_scores: bool = False,
                     max_positions: Optional[int] = None, source_limit: Optional[int] = None,
                     mesh: Optional[jax.sharding.Mesh] = None, unroll_decoder: bool = True,
                     packing_buckets: Optional[int] = None,
                     packed_weights: Optional[cpu_kernels.PackedWeights] = None):
    """The pure functional entry point: (module, params, inputs, config) -> sequences [B * R, length].

    The encoder runs on the real source tokens only (``_packing``), their count rounded up to one of
    ``packing_buckets`` sizes (when None: ``PACKING_BUCKETS`` on the CPU, 0 elsewhere; 0: the padded batch, one
    program per bucket).

    ``unroll_decoder=False`` runs the decoder's layers as stored (under ``nn.scan`` for scanned params): a shorter
    compile for deep decoders, slower steps (each step slices every layer's weights); the same tokens.

    With ``mesh`` (axes ``data`` and optionally ``model``) the batch is split over ``data`` and ``params`` should
    come from ``shard_params``; outputs equal the single-device ones.

    ``packed_weights`` (a ``cpu_kernels.PackedWeights`` kept with the params) packs the float32 weights for the
    CPU kernels once instead of on every call; the same tokens.
    """
    _check_mesh(mesh)
    input_ids = np.asarray(input_ids, np.int32)
    b, s = input_ids.shape
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if decoder_input_ids is None:
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
        if start is None:
            raise ValueError("decoder_start_token_id (or bos_token_id) has to be defined for encoder-decoder "
                             "generation: set it in the config or pass decoder_start_token_id=...")
        decoder_input_ids = np.full((b, 1), start, np.int32)
    prompt = np.asarray(decoder_input_ids, np.int32)
    spec = SearchSpec.build(config, prompt.shape[1], max_positions)
    bb, sb = _batch_bucket(b, mesh), bucket(s, source_limit, minimum=8)
    pad = spec.pad_token_id
    src = _pad_cols(_pad_rows(input_ids, bb, pad), sb, pad)
    src_mask = _pad_cols(_pad_rows(mask, bb, 0), sb, 0)
    src_mask[b:, 0] = 1  # a bucket's filler rows: one token, so that their attention has a key
    prompt = _pad_rows(prompt, bb, prompt[0, 0] if prompt.size else 0)
    program = _seq2seq_program(module, spec, bb, sb, return_scores, encoder_rows(bb, sb) if mesh is None else bb,
                               unroll_decoder)
    if packed_weights is not None and mesh is None and cpu_kernels.packs_weights(module.dtype):
        steps = unroll_decoder and cpu_kernels.packing_pays(bb * _expand(spec), is_quantized(params), module.dtype)
        params = packed_weights.get(params, steps, module.config.decoder.tie_word_embeddings,
                                    unstack=unroll_decoder and getattr(module, "scan_layers", False))
    # by default on the CPU only: elsewhere each packed size is another compile of seconds, for a smaller gain
    default = PACKING_BUCKETS if jax.default_backend() == "cpu" else 0
    buckets = default if packing_buckets is None else packing_buckets
    packing = _packing(src, src_mask, buckets) if mesh is None else None
    src, src_mask, prompt = _shard_batch(mesh, src, src_mask, prompt)
    sequences, scores, lengths = program(params, src, src_mask, prompt, _rng(seed, rng), packing)
    return _finish(spec, sequences, scores, lengths, b, return_scores)


def causal_generate(module: Any, params: Any, input_ids: np.ndarray, attention_mask: Optional[np.ndarray],
                    config: GenerationConfig, *, rng: Optional[jax.Array] = None, seed: Optional[int] = None,
                    return_scores: bool = False, max_positions: Optional[int] = None,
                    mesh: Optional[jax.sharding.Mesh] = None, unroll_decoder: bool = True):
    """Decoder-only generation continuing left-padded prompts (prefilled in one pass); ``unroll_decoder`` as in
    ``seq2seq_generate``."""
    _check_mesh(mesh)
    input_ids = np.asarray(input_ids, np.int32)
    b, p = input_ids.shape
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, expected {input_ids.shape}")
    if (mask[:, -1] == 0).any():
        raise ValueError("decoder-only generation needs left-padded prompts (the last column of attention_mask "
                         "must be 1 in every row)")
    spec = SearchSpec.build(config, p, max_positions)
    bb = _batch_bucket(b, mesh)
    prompt = _pad_rows(input_ids, bb, spec.pad_token_id)
    prompt_mask = _pad_rows(mask, bb, 1)
    program = _causal_program(module, spec, bb, return_scores, unroll_decoder)
    prompt, prompt_mask = _shard_batch(mesh, prompt, prompt_mask)
    sequences, scores, lengths = program(params, prompt, prompt_mask, _rng(seed, rng))
    return _finish(spec, sequences, scores, lengths, b, return_scores)
