"""Optimisers and learning-rate schedules for fine-tuning (optax).

AdamW skips weight decay on biases and LayerNorm parameters (BERT's recipe); Adafactor is offered for memory;
gradients are clipped by global norm and optionally accumulated over several micro-batches.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


def linear_warmup_linear_decay(peak: float, warmup_steps: int, total_steps: int) -> Schedule:
    """0 -> ``peak`` over ``warmup_steps``, then linearly to 0 at ``total_steps``."""
    if warmup_steps < 0 or total_steps <= 0 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total > 0")
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
         optax.linear_schedule(peak, 0.0, max(total_steps - warmup_steps, 1))], [warmup_steps])


def inverse_sqrt_schedule(hidden_size: int, warmup_steps: int, scale: float = 1.0) -> Schedule:
    """The paper's schedule (Transformer's): ``scale * hidden^-0.5 * min(step^-0.5, step * warmup^-1.5)``."""
    if warmup_steps <= 0:
        raise ValueError(f"warmup_steps must be positive, got {warmup_steps}")

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
        return scale * hidden_size ** -0.5 * jnp.minimum(step ** -0.5, step * warmup_steps ** -1.5)
    return schedule


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: not biases, not LayerNorm scales/biases."""
    def keep(path, _):
        names = [getattr(p, "key", "") for p in path]
        return not (names[-1] == "bias" or "LayerNorm" in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(name: str = "adamw", learning_rate: float | Schedule = 5e-5, *, weight_decay: float = 0.01,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, clip_norm: Optional[float] = 1.0,
                   accumulation_steps: int = 1) -> optax.GradientTransformation:
    """``adam``, ``adamw`` or ``adafactor``, with clipping and gradient accumulation."""
    if name == "adamw":
        core = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    elif name == "adam":
        core = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    elif name == "adafactor":
        core = optax.adafactor(learning_rate)
    else:
        raise ValueError(f"unknown optimizer {name!r}; use adam, adamw or adafactor")
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    tx = optax.chain(*chain, core)
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
    return optax.MultiSteps(tx, accumulation_steps) if accumulation_steps > 1 else tx
