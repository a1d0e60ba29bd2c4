"""The training step: loss with optional label smoothing, metrics, optimizer update; jitted with shardings.

Batches are dicts of numpy/jax arrays: ``input_ids`` [B, S], ``attention_mask`` [B, S], ``labels`` [B, T] (-100
at padding) and optionally ``decoder_attention_mask`` [B, T]. Decoder inputs are the labels shifted right behind
``decoder_start_token_id`` exactly as ``EncoderDecoderModel`` builds them.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..modeling import EncoderDecoderModule, resolve_start_and_pad, shift_tokens_right
from . import sharding as shard_lib


@struct.dataclass
class TrainState:
    """Everything a training step changes: step count, params, optimizer state and dropout rng."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def create_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state owning a copy of ``params`` (the train step donates its input state's buffers)."""
    params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
    return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def token_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
    """Mean token cross-entropy over labels != -100 (float32), with optional label smoothing, and metrics."""
    valid = labels != -100
    safe = jnp.where(valid, labels, 0)
    nll, mean_logp = _cross_entropy(logits, safe, float(label_smoothing))          # [B, T] each
    per_token = nll
    if label_smoothing:
        per_token = (1.0 - label_smoothing) * nll - label_smoothing * mean_logp
    count = valid.sum()
    denom = jnp.maximum(count, 1)
    loss = jnp.where(valid, per_token, 0.0).sum() / denom
    correct = jnp.where(valid, jnp.argmax(logits, axis=-1) == labels, False).sum()
    return loss, {"loss": loss, "nll": jnp.where(valid, nll, 0.0).sum() / denom,
                  "accuracy": correct / denom, "tokens": count}


def _cross_entropy_forward(logits: jax.Array, labels: jax.Array, smoothing: float) -> tuple[tuple, tuple]:
    z = logits.astype(jnp.float32)                                                   # [B, T, V]
    top = jax.lax.stop_gradient(z.max(-1, keepdims=True))
    lse = top[..., 0] + jnp.log(jnp.exp(z - top).sum(-1))                          # [B, T]
    nll = lse - jnp.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
    mean_logp = z.mean(-1) - lse if smoothing else jnp.zeros_like(nll)
    return (nll, mean_logp), (logits, labels, lse)


def _cross_entropy_backward(smoothing: float, res: tuple, g: tuple) -> tuple:
    # d nll / dz = softmax - onehot(label), d mean(log softmax) / dz = 1/V - softmax: one pass over the logits
    # writes their gradient. Autodiff of log_softmax and take_along_axis kept the [B, T, V] log-probabilities,
    # filled a zero [B, T, V] array to scatter the label's cotangent into, and made several passes to combine them.
    logits, labels, lse = res
    g_nll, g_mean = g                                                                 # [B, T] each
    z = logits.astype(jnp.float32)
    probs = jnp.exp(z - lse[..., None])
    onehot = jax.lax.broadcasted_iota(labels.dtype, z.shape, z.ndim - 1) == labels[..., None]
    dz = probs * (g_nll - g_mean)[..., None] - jnp.where(onehot, g_nll[..., None], 0.0)
    if smoothing:
        dz = dz + (g_mean / z.shape[-1])[..., None]
    return dz.astype(logits.dtype), None


# (nll, mean log-probability) per token of logits [B, T, V] at labels [B, T] (all in range), float32; the second
# is zeros unless smoothing. Its derivative is written out: one pass over the logits.
_cross_entropy = jax.custom_vjp(lambda logits, labels, smoothing: _cross_entropy_forward(logits, labels,
                                                                                          smoothing)[0],
                                nondiff_argnums=(2,))
_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def seq2seq_logits(module: EncoderDecoderModule, params: Any, batch: Mapping[str, jax.Array],
                   dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Decoder logits for ``batch['labels']`` (shifted right), dropout on when ``dropout_rng`` is given."""
    pad, start = resolve_start_and_pad(module.config)
    labels = batch["labels"]
    decoder_input_ids = shift_tokens_right(labels, pad, start)
    decoder_mask = batch.get("decoder_attention_mask")
    if decoder_mask is None:  # as transformers: mask the pad positions of the shifted labels
        decoder_mask = decoder_input_ids != pad
    out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], decoder_input_ids,
                       decoder_mask, deterministic=dropout_rng is None,
                       rngs=None if dropout_rng is None else {"dropout": dropout_rng})
    return out.logits


def resolve_scan_unroll(setting: Any, layers: int, backend: Optional[str] = None) -> int:
    """``model.scan_unroll`` as the modules take it: ``"auto"`` is every layer on a CPU (XLA:CPU's scan zero-fills,
    copies and slices the stacked activations: a 7% slower step at 4+4 layers) and 1 elsewhere (one compiled layer
    however deep the model); ``"all"`` is every layer; a number is that many layers per iteration."""
    if setting == "auto":
        setting = "all" if (backend or jax.default_backend()) == "cpu" else 1
    return max(1, layers) if setting == "all" else int(setting)


def make_train_step(module: EncoderDecoderModule, tx: optax.GradientTransformation, *,
                    label_smoothing: float = 0.0, mesh: Optional[Mesh] = None,
                    state_shardings: Any = None, schedule: Optional[Callable] = None,
                    accumulation_steps: int = 1) -> Callable:
    """A jitted ``(state, batch) -> (state, metrics)``; with ``mesh`` the batch is split over every device and
    the state follows ``state_shardings`` (see ``shard_state``). The input state's buffers are donated.

    Metrics: loss, nll, accuracy, tokens, grad_norm, finite (False when the loss or gradient was NaN/inf: the
    update was then skipped) and, with ``schedule``, the learning rate of this step (the optimizer advances once
    every ``accumulation_steps`` calls)."""

    def step(state: TrainState, batch: Mapping[str, jax.Array]):
        rng, dropout = jax.random.split(state.rng)

        def loss_fn(params):
            logits = seq2seq_logits(module, params, batch, dropout)
            return token_loss(logits, batch["labels"], label_smoothing)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient leaves params and optimizer state as they were (the input buffers are
        # donated, so this is the only place the last good values still exist); the caller sees finite=False.
        # A conditional, not a select: selecting between new and old values costs an extra pass over every
        # parameter and optimizer buffer (10% of a CPU step), while the conditional updates them in place.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands):
            grads, params, opt_state = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(finite, update, lambda operands: operands[1:],
                                         (grads, state.params, state.opt_state))
        metrics = dict(metrics, grad_norm=grad_norm, finite=finite)
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step // accumulation_steps)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_shardings, shard_lib.batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(module: EncoderDecoderModule, mesh: Optional[Mesh] = None) -> Callable:
    """A jitted ``(params, batch) -> metrics`` without dropout (loss, accuracy, token count)."""
    def step(params, batch):
        return token_loss(seq2seq_logits(module, params, batch), batch["labels"])[1]
    if mesh is None:
        return jax.jit(step)
    return jax.jit(step, in_shardings=(None, shard_lib.batch_sharding(mesh)))


def shard_state(state: TrainState, mesh: Mesh, min_size: int = shard_lib.MIN_SHARD_SIZE
                ) -> tuple[TrainState, Any]:
    """Places ``state`` on ``mesh`` by the FSDP rule; returns it with the shardings to jit the step with."""
    shardings = shard_lib.tree_shardings(state, mesh, min_size)
    return jax.device_put(state, shardings), shardings
