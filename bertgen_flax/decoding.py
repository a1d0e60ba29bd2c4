"""Model-agnostic search: greedy, sampling and beam search over one step function, in one compiled loop.

The seam to the model is two callables (closed over parameters by the caller):

    prefill(cache, prompt [N, P]) -> (logits [N, V], cache)     # the whole prompt in one pass (or None: below)
    step(cache, tokens [N, 1])    -> (logits [N, V], cache)     # one token against the cache
    reorder(cache, rows [N])      -> cache                       # beam search: rows follow their parents

This module never imports modeling code. The semantics follow transformers' PyTorch ``generate`` (5.x) so that
float32 outputs are token-for-token identical: logits processors in the same order and with the same edge cases,
and beam search with transformers' vectorised bookkeeping (top 2K candidates, only an EOS among the top K may
finish, the same length penalty and early-stopping heuristics).

Loop: one ``lax.while_loop`` whose body runs one model step for the token(s) picked last and then picks the next
from its logits, so no forward pass runs whose logits nobody reads. A one-token prompt (a seq2seq decoder's start
token) needs no prefill: it is the loop's first step, so the model's step is traced and compiled once (tracing it
outside the loop as well doubled the decoder's share of the compile). There is no ``lax.cond`` around the model
step: a conditional forces XLA to copy the attention cache on every step instead of updating it in place. No
Python loop over steps and no host round trip per step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernels

Array = jax.Array
NEG_INF = -float("inf")
BEAM_NEG = -1.0e9  # transformers' "very large negative" for beam bookkeeping


@dataclass(frozen=True)
class GenerationConfig:
    """Knobs with transformers' ``GenerationConfig`` meaning and defaults (5.x global defaults)."""

    max_length: Optional[int] = None
    max_new_tokens: Optional[int] = None
    min_length: int = 0
    min_new_tokens: Optional[int] = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    num_return_sequences: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = 50
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    bad_words_ids: Optional[tuple] = None
    forced_eos_token_id: Optional[Union[int, tuple]] = None
    decoder_start_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, tuple]] = None
    pad_token_id: Optional[int] = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationConfig":
        """Known keys of a ``generation_config.json`` (or legacy ``config.json``) dict; others are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: _freeze(v) for k, v in data.items() if k in known and v is not None}
        return cls(**kwargs)

    def merged(self, **overrides: Any) -> "GenerationConfig":
        """A copy with the given knobs changed; an unknown knob is a TypeError."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown generation options: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: _freeze(v) for k, v in overrides.items()})

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids as a tuple (empty when none is set)."""
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)

    def validate(self) -> None:
        """Raises ValueError for settings transformers would reject."""
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ValueError("greedy search returns one sequence per input: num_return_sequences > 1 needs "
                             "num_beams > 1 or do_sample=True")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.bad_words_ids is not None:
            if not self.bad_words_ids or any(not seq for seq in self.bad_words_ids):
                raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists, got "
                                 f"{self.bad_words_ids!r}")


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class SearchSpec:
    """Everything static about one compiled search (hashable: part of the jit cache key)."""

    max_length: int          # total decoder length, prompt included
    prompt_length: int       # P: decoder prompt columns (left-padded prompts share it)
    min_length: int
    min_new_tokens: int
    num_beams: int
    num_return_sequences: int
    do_sample: bool
    length_penalty: float
    early_stopping: Union[bool, str]
    temperature: float
    top_k: int
    top_p: float
    no_repeat_ngram_size: int
    repetition_penalty: float
    bad_words_ids: tuple
    forced_eos_ids: tuple
    eos_ids: tuple
    pad_token_id: int
    beam_fill_id: int        # what transformers' beam search writes after EOS

    @classmethod
    def build(cls, config: GenerationConfig, prompt_length: int, max_positions: Optional[int] = None
              ) -> "SearchSpec":
        """Resolves lengths the way transformers does (``max_new_tokens`` wins over ``max_length``)."""
        config.validate()
        if config.max_new_tokens is not None:
            max_length = config.max_new_tokens + prompt_length
        elif config.max_length is not None:
            max_length = config.max_length
        else:  # transformers' default: 20 new tokens, capped at the positions
            max_length = 20 + prompt_length
            if max_positions is not None:
                max_length = min(max_length, max_positions)
        if max_length <= prompt_length:
            raise ValueError(f"max_length ({max_length}) leaves no room to generate after a prompt of "
                             f"{prompt_length} tokens")
        if max_positions is not None and max_length > max_positions:
            raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings={max_positions}")
        min_length = config.min_length
        if config.min_new_tokens is not None:
            min_length = config.min_new_tokens + prompt_length
        eos = config.eos_ids
        pad = config.pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
        forced = config.forced_eos_token_id
        forced = () if forced is None else (forced,) if isinstance(forced, int) else tuple(forced)
        bad = tuple(tuple(s) for s in (config.bad_words_ids or ()) if not (len(s) == 1 and s[0] in eos))
        return cls(max_length=max_length, prompt_length=prompt_length, min_length=min_length,
                   min_new_tokens=config.min_new_tokens or 0, num_beams=config.num_beams,
                   num_return_sequences=config.num_return_sequences, do_sample=config.do_sample,
                   length_penalty=float(config.length_penalty), early_stopping=config.early_stopping,
                   temperature=float(config.temperature), top_k=int(config.top_k or 0),
                   top_p=float(config.top_p), no_repeat_ngram_size=config.no_repeat_ngram_size,
                   repetition_penalty=float(config.repetition_penalty), bad_words_ids=bad, forced_eos_ids=forced,
                   eos_ids=eos, pad_token_id=pad,
                   beam_fill_id=(config.pad_token_id or (eos[0] if eos else -1)) if eos else -1)


# ---- logits processors (transformers' order) ------------------------------------------------------------------
def process_scores(spec: SearchSpec, scores: Array, sequences: Array, cur_len: Array,
                   ignore_before: Optional[Array] = None) -> Array:
    """Applies transformers' logits processors to ``scores`` [N, V] given ``sequences`` [N, L] of ``cur_len``."""
    n, v = scores.shape
    length = sequences.shape[1]
    pos = jnp.arange(length)
    filled = pos[None, :] < cur_len                                             # [1, L]
    if spec.repetition_penalty != 1.0:
        valid = filled if ignore_before is None else filled & (pos[None, :] >= ignore_before[:, None])
        seen = _token_mask(sequences, valid, v)
        p = spec.repetition_penalty
        scores = jnp.where(seen, jnp.where(scores < 0, scores * p, scores / p), scores)
    if spec.no_repeat_ngram_size > 0:
        scores = _no_repeat_ngram(scores, sequences, cur_len, spec.no_repeat_ngram_size)
    if spec.bad_words_ids:
        scores = _bad_words(scores, sequences, cur_len, spec.bad_words_ids)
    # EOS bans touch the EOS columns only (a where over all of [N, V] was a pass over the logits every step)
    eos = jnp.array([e for e in spec.eos_ids if 0 <= e < v], jnp.int32)
    if eos.size and (spec.min_length > 0 or spec.min_new_tokens > 0):
        scores = scores.at[:, eos].set(jnp.where(eos_banned(spec, cur_len), NEG_INF, scores[:, eos]))
    if spec.forced_eos_ids:
        forced = jnp.full((v,), NEG_INF).at[jnp.array(spec.forced_eos_ids)].set(0.0)
        scores = jnp.where(cur_len == spec.max_length - 1, forced[None, :], scores)
    if spec.do_sample:
        keep = _min_tokens_to_keep(spec)
        if spec.temperature != 1.0:
            scores = scores / spec.temperature
        if spec.top_k:
            k = min(max(spec.top_k, keep), v)
            kth = jax.lax.top_k(scores, k)[0][:, -1:]
            scores = jnp.where(scores < kth, NEG_INF, scores)
        if spec.top_p < 1.0:
            scores = _top_p(scores, spec.top_p, keep)
    return scores


def eos_banned(spec: SearchSpec, cur_len: Array) -> Array:
    """Whether EOS is banned at ``cur_len`` (``min_length``, ``min_new_tokens``): a bool scalar."""
    banned = jnp.array(False)
    if spec.min_length > 0:
        banned = banned | (cur_len < spec.min_length)
    if spec.min_new_tokens > 0:
        banned = banned | (cur_len - spec.prompt_length < spec.min_new_tokens)
    return banned


def _only_eos_bans(spec: SearchSpec) -> bool:
    """Whether ``process_scores`` does nothing but ban EOS (so beam search's candidates can be fused)."""
    return (spec.repetition_penalty == 1.0 and spec.no_repeat_ngram_size == 0 and not spec.bad_words_ids
            and not spec.forced_eos_ids and not spec.do_sample)


def _min_tokens_to_keep(spec: SearchSpec) -> int:
    if spec.num_beams > 1:
        return len(spec.eos_ids) + 1 if spec.eos_ids else 2
    return 1


def _token_mask(sequences: Array, valid: Array, vocab: int) -> Array:
    """[N, V] True where a token occurs at a valid position of its row."""
    n = sequences.shape[0]
    ids = jnp.where(valid, jnp.clip(sequences, 0, vocab), vocab)
    return jnp.zeros((n, vocab + 1), bool).at[jnp.arange(n)[:, None], ids].set(True)[:, :vocab]


def _no_repeat_ngram(scores: Array, sequences: Array, cur_len: Array, n: int) -> Array:
    """Bans every token that would complete an n-gram already present in the row."""
    rows, length = sequences.shape
    starts = jnp.arange(length - n + 1)                                          # window starts
    windows = jnp.stack([sequences[:, i:length - n + 1 + i] for i in range(n)], axis=-1)  # [N, W, n]
    prefix = jax.lax.dynamic_slice_in_dim(jnp.pad(sequences, ((0, 0), (n, 0))), cur_len + 1, n - 1, axis=1)
    match = jnp.all(windows[:, :, :-1] == prefix[:, None, :], axis=-1)          # [N, W]
    match &= (starts[None, :] + n <= cur_len) & (cur_len >= n)
    banned = _token_mask(windows[:, :, -1], match, scores.shape[1])
    return jnp.where(banned, NEG_INF, scores)


def _bad_words(scores: Array, sequences: Array, cur_len: Array, bad_words: tuple) -> Array:
    v = scores.shape[1]
    single = [s[0] for s in bad_words if len(s) == 1 and s[0] < v]
    if single:
        scores = scores.at[:, jnp.array(single)].set(NEG_INF)
    padded = jnp.pad(sequences, ((0, 0), (max((len(s) for s in bad_words), default=1), 0)))
    width = padded.shape[1] - sequences.shape[1]
    for seq in bad_words:
        if len(seq) == 1 or seq[-1] >= v:
            continue
        m = len(seq) - 1
        tail = jax.lax.dynamic_slice_in_dim(padded, cur_len + width - m, m, axis=1)       # last m tokens
        hit = jnp.all(tail == jnp.array(seq[:-1])[None, :], axis=1) & (m <= cur_len)
        scores = scores.at[:, seq[-1]].set(jnp.where(hit, NEG_INF, scores[:, seq[-1]]))
    return scores


def _top_p(scores: Array, top_p: float, keep: int) -> Array:
    order = jnp.argsort(scores, axis=-1)                                         # ascending, as transformers
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted = remove_sorted.at[:, -keep:].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(scores.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, scores)


def first_argmax(x: Array) -> Array:
    """``jnp.argmax(x, -1)`` (the first maximum; the first NaN if any) for x [N, V].

    XLA lowers ``argmax`` on the CPU to one variadic (value, index) reduce that it does not vectorise: 14% of a
    greedy step at batch 128 with an 8,000-token vocabulary. A max, then the smallest index holding it, is about
    8x faster and picks the same index; a CPU kernel (``cpu_kernels.argmax_rows``) does it in one pass.
    """
    def two_reductions(x):
        best = jnp.max(x, axis=-1, keepdims=True)
        hit = (x == best) | jnp.isnan(x)
        index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
        return jnp.min(jnp.where(hit, index, x.shape[-1] - 1), axis=-1)
    return cpu_kernels.argmax_rows(x, two_reductions)


def top_k(x: Array, k: int, chunk: int = 64) -> tuple[Array, Array]:
    """``jax.lax.top_k(x, k)`` over the last axis of ``x`` [N, M], ties included, much faster for k << M.

    XLA's CPU ``TopK`` sorts every row (1.8 ms for beam search's [32, 4 x 8000] scores, ~6% of a step). Here the
    row is cut into chunks of ``chunk`` values: the k best values lie in the k chunks with the largest maxima
    (ties between chunk maxima go to the earlier chunk, as ``top_k`` prefers the earlier index), so ``top_k``
    runs over k chunk maxima and then over those k chunks, taken in index order. Same values and indices. (A
    one-pass CPU kernel keeping the k best was as fast in a beam-search step, and was dropped.)
    """
    n, m = x.shape
    chunks = -(-m // chunk)
    if chunks <= k:
        return jax.lax.top_k(x, k)
    if chunks * chunk != m:  # pad with -inf after the last index: a pad never wins a tie against a real value
        x = jnp.pad(x, ((0, 0), (0, chunks * chunk - m)), constant_values=NEG_INF)
    blocks = x.reshape(n, chunks, chunk)
    # top_k ranks NaN above everything; the CPU's max reduction may skip a NaN, so chunks holding one say so
    peak = jnp.where(jnp.any(jnp.isnan(blocks), axis=-1), jnp.nan, jnp.max(blocks, axis=-1))
    best = jnp.sort(jax.lax.top_k(peak, k)[1], axis=-1)                         # [N, k] chunk ids, ascending
    candidates = jnp.take_along_axis(blocks, best[:, :, None], axis=1).reshape(n, k * chunk)
    values, j = jax.lax.top_k(candidates, k)
    return values, jnp.take_along_axis(best, j // chunk, axis=1) * chunk + j % chunk


# ---- the loop -------------------------------------------------------------------------------------------------
def _run_loop(state: dict, select: Callable[[dict, Array], dict], advance: Callable[[dict], tuple[Array, Any]],
              done: Callable[[dict], Array], prompt_pass: Optional[Callable[[dict], tuple[Array, Any]]]) -> dict:
    """Generates until ``done``: every iteration runs one forward pass (``advance``: (logits, cache) for the
    token(s) picked last) and then picks the next token(s) from its logits (``select(s, logits)``, which advances
    ``cur_len`` and leaves ``cache`` alone).

    ``prompt_pass`` runs a whole prompt before the loop and its logits pick the first token there. Without one the
    prompt is a single token and the loop's first forward pass is the prompt's own: the step is then traced (and
    compiled) once, not a second time outside the loop. Either way no forward pass runs for the last token picked.
    """
    def forward_then_select(s: dict, forward: Callable[[dict], tuple[Array, Any]]) -> dict:
        logits, cache = forward(s)
        return select(dict(s, cache=cache), logits.astype(jnp.float32))

    if prompt_pass is not None:
        picked = forward_then_select(state, prompt_pass)
        due = ~done(state)  # no room for a new token (max_length reached by the prompt): keep the state as it is
        state = {k: (v if k == "cache" else jax.tree_util.tree_map(lambda new, old: jnp.where(due, new, old),
                                                                  v, state[k]))
                 for k, v in picked.items()}
    return jax.lax.while_loop(lambda s: ~done(s), lambda s: forward_then_select(s, advance), state)


def generate(spec: SearchSpec, prefill: Optional[Callable], step: Callable, reorder: Callable, cache: Any,
             prompt: Array, rng: Optional[Array] = None, ignore_before: Optional[Array] = None,
             scores: bool = True) -> tuple[Array, Array, Array]:
    """Runs one search. ``prompt`` [N, P] already holds ``num_beams`` (or ``num_return_sequences``) copies of
    each input, grouped by input. Returns (sequences [B * R, max_length], scores [B * R], lengths [B * R]).

    ``prefill=None``: the prompt is one token and ``step`` runs it, as the loop's first step (a seq2seq decoder's
    start token); the model's step is then compiled once.

    Sequences are padded to ``max_length``; ``lengths`` gives the row lengths transformers would return before
    its batch-wide trim (the caller trims to the longest). With ``scores=False`` greedy search and sampling skip
    the per-step log-softmax of the sequence score and return zeros (beam search always needs it).
    """
    if prefill is None and prompt.shape[1] != 1:
        raise ValueError(f"a prompt of {prompt.shape[1]} tokens needs a prefill pass (only one token runs as a step)")
    prompt_pass = None if prefill is None else (lambda s: prefill(s["cache"], prompt))
    if spec.num_beams > 1:
        return _beam_search(spec, prompt_pass, step, reorder, cache, prompt, rng, ignore_before)
    return _sample_or_greedy(spec, prompt_pass, step, cache, prompt, rng, ignore_before, scores)


def _sample_or_greedy(spec, prompt_pass, step, cache, prompt, rng, ignore_before, scores=True):
    n, p = prompt.shape
    length = spec.max_length
    sequences = jnp.full((n, length), spec.pad_token_id, jnp.int32).at[:, :p].set(prompt)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    eos = jnp.array(spec.eos_ids or (-1,), jnp.int32)
    state = dict(cur_len=jnp.array(p, jnp.int32), sequences=sequences, unfinished=jnp.ones((n,), bool),
                 cache=cache, rng=rng, score=jnp.zeros((n,), jnp.float32),
                 tokens=jnp.asarray(prompt[:, -1], jnp.int32))                  # what the next step reads

    def select(s, logits):
        processed = process_scores(spec, logits, s["sequences"], s["cur_len"], ignore_before)
        rng, key = jax.random.split(s["rng"])
        if spec.do_sample:
            tokens = jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
        else:
            tokens = first_argmax(processed)
        if spec.eos_ids:
            tokens = jnp.where(s["unfinished"], tokens, spec.pad_token_id)
        score = s["score"]
        if scores:  # the sequence score costs a log-softmax over [N, V] per step: only when it is returned
            logp = jax.nn.log_softmax(processed, axis=-1)
            score = score + jnp.where(s["unfinished"], jnp.take_along_axis(logp, tokens[:, None], 1)[:, 0], 0.0)
        seqs = jax.lax.dynamic_update_slice_in_dim(s["sequences"], tokens[:, None], s["cur_len"], axis=1)
        unfinished = s["unfinished"] & ~jnp.isin(tokens, eos)
        return dict(s, cur_len=s["cur_len"] + 1, sequences=seqs, unfinished=unfinished, rng=rng, score=score,
                    tokens=tokens)

    state = _run_loop(state, select, lambda s: step(s["cache"], s["tokens"][:, None]),
                      lambda s: _greedy_done(s, length), prompt_pass)
    final_len = jnp.full((n,), state["cur_len"])
    return state["sequences"], state["score"], final_len


def _greedy_done(s, length):
    return (s["cur_len"] >= length) | ~jnp.any(s["unfinished"])


def _beam_search(spec, prompt_pass, step, reorder, cache, prompt, rng, ignore_before):
    """transformers' vectorised beam search (``GenerationMixin._beam_search``), with fixed shapes."""
    k = spec.num_beams
    n, p = prompt.shape
    b = n // k
    length = spec.max_length
    v_keep = max(2, 1 + len(spec.eos_ids)) * k                                  # beams_to_keep
    top_k_mask = jnp.arange(v_keep) < k
    fill = spec.beam_fill_id
    running = jnp.full((b, k, length), fill, jnp.int32).at[:, :, :p].set(prompt.reshape(b, k, p))
    eos = jnp.array(spec.eos_ids or (-1,), jnp.int32)
    state = dict(
        cur_len=jnp.array(p, jnp.int32), running=running, running_scores=jnp.zeros((b, k)).at[:, 1:].set(BEAM_NEG),
        sequences=running, beam_scores=jnp.full((b, k), BEAM_NEG), finished=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b, 1), bool), stop=jnp.array(False),
        gen_len=jnp.zeros((b, k), jnp.int32), running_gen_len=jnp.zeros((b, k), jnp.int32),
        cache=cache, rng=jax.random.PRNGKey(0) if rng is None else rng,
        src_rows=jnp.arange(n, dtype=jnp.int32))  # the rows the next step's cache comes from: each its own first
    rows = jnp.arange(b)[:, None]
    # length ** length_penalty as transformers computes it: a Python float, then used as a float32 scalar
    penalty = jnp.asarray(np.array([max(n, 1) ** spec.length_penalty for n in range(length + 1)], np.float32))

    def select(s, logits):
        cur_len = s["cur_len"]
        flat_running = s["running"].reshape(n, length)
        vocab = logits.shape[-1]

        def scored(logits, running_scores):  # log_softmax, the processors, + the beams' scores: [B, K * V]
            log_probs = jax.nn.log_softmax(logits.reshape(n, vocab), axis=-1)
            log_probs = process_scores(spec, log_probs, flat_running, cur_len, ignore_before)
            return (log_probs.reshape(b, k, vocab) + running_scores[:, :, None]).reshape(b, k * vocab)

        rng, key = jax.random.split(s["rng"])
        if spec.do_sample:  # sampling without replacement from softmax(acc): Gumbel top-k
            acc = scored(logits, s["running_scores"])
            gumbel = -jnp.log(-jnp.log(jax.random.uniform(key, acc.shape, minval=1e-20, maxval=1.0)))
            idx = top_k(jnp.where(jnp.isfinite(acc), acc + gumbel, NEG_INF), v_keep)[1]
            top_lp = jnp.take_along_axis(acc, idx, axis=1)
        elif _only_eos_bans(spec):  # one pass per row on the CPU: the [B, K * V] scores are never written
            top_lp, idx = cpu_kernels.beam_candidates(
                logits.reshape(b, k, vocab), s["running_scores"], eos, eos_banned(spec, cur_len), v_keep,
                lambda x, r, e, f: top_k(scored(x, r), v_keep))                   # [B, 2K]
        else:
            top_lp, idx = top_k(scored(logits, s["running_scores"]), v_keep)  # [B, 2K]
        parent = idx // vocab
        token = (idx % vocab).astype(jnp.int32)
        top_seqs = s["running"][rows, parent]                                    # [B, 2K, L]
        top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, token[:, :, None], cur_len, axis=2)
        top_gen_len = s["running_gen_len"][rows, parent] + 1
        hits = jnp.isin(token, eos) | (cur_len + 1 >= length)                   # EOS or max length
        # running beams for the next step: the best K that did not stop
        top_running_lp = top_lp + hits.astype(jnp.float32) * BEAM_NEG
        nxt = jax.lax.top_k(top_running_lp, k)[1]
        running = top_seqs[rows, nxt]
        running_scores = jnp.take_along_axis(top_running_lp, nxt, axis=1)
        running_gen_len = jnp.take_along_axis(top_gen_len, nxt, axis=1)
        beam_parent = jnp.take_along_axis(parent, nxt, axis=1)                  # [B, K]
        # finished hypotheses: only an EOS among the top K candidates may enter
        just_finished = hits & top_k_mask[None, :]
        fin_lp = top_lp / penalty[cur_len + 1 - p]
        full = jnp.all(s["finished"], axis=-1, keepdims=True) & (spec.early_stopping is True)
        fin_lp = fin_lp + full.astype(jnp.float32) * BEAM_NEG
        fin_lp = fin_lp + (~s["improvable"]).astype(jnp.float32) * BEAM_NEG
        fin_lp = fin_lp + (~just_finished).astype(jnp.float32) * BEAM_NEG
        merged_seqs = jnp.concatenate([s["sequences"], top_seqs], axis=1)
        merged_scores = jnp.concatenate([s["beam_scores"], fin_lp], axis=1)
        merged_fin = jnp.concatenate([s["finished"], just_finished], axis=1)
        merged_len = jnp.concatenate([s["gen_len"], top_gen_len], axis=1)
        keep = jax.lax.top_k(merged_scores, k)[1]
        sequences = merged_seqs[rows, keep]
        beam_scores = jnp.take_along_axis(merged_scores, keep, axis=1)
        finished = jnp.take_along_axis(merged_fin, keep, axis=1)
        gen_len = jnp.take_along_axis(merged_len, keep, axis=1)
        cur_len = cur_len + 1
        # early-stopping heuristic and the loop's stopping rule
        if spec.early_stopping == "never" and spec.length_penalty > 0.0:
            best_len = length - p
        else:
            best_len = cur_len - p
        best_running = running_scores[:, :1] / penalty[best_len]
        worst_finished = jnp.where(finished, jnp.min(beam_scores, axis=1, keepdims=True), BEAM_NEG)
        improvable = s["improvable"] & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        open_beam = ~(jnp.all(finished) & (spec.early_stopping is True))
        stop = ~(jnp.any(improvable) & open_beam & ~jnp.all(hits))
        src_rows = (beam_parent + jnp.arange(b)[:, None] * k).reshape(n).astype(jnp.int32)  # the carry's type
        return dict(s, cur_len=cur_len, running=running, running_scores=running_scores, sequences=sequences,
                    beam_scores=beam_scores, finished=finished, improvable=improvable, stop=stop, gen_len=gen_len,
                    running_gen_len=running_gen_len, rng=rng, src_rows=src_rows)

    def advance(s):
        tokens = jax.lax.dynamic_index_in_dim(s["running"], s["cur_len"] - 1, axis=2, keepdims=False)  # [B, K]
        return step(reorder(s["cache"], s["src_rows"]), tokens.reshape(n, 1))

    def done(s):
        return s["stop"] | (s["cur_len"] >= length)

    state = _run_loop(state, select, advance, done, prompt_pass)
    r = spec.num_return_sequences
    sequences = state["sequences"][:, :r].reshape(b * r, length)
    scores = state["beam_scores"][:, :r].reshape(b * r)
    lengths = (p + state["gen_len"][:, :r]).reshape(b * r)
    return sequences, scores, lengths


def trim(sequences: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """transformers' batch-wide trim: every row cut to the longest row's length."""
    return sequences[:, : int(np.max(lengths))]

