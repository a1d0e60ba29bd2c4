"""Training checkpoints with orbax: state (params, optimizer, step, rng) plus the data iterator's position.

Orbax writes each step into a temporary directory and renames it when complete, so a half-written checkpoint is
never listed, let alone taken as the latest. Saves are asynchronous; ``wait`` blocks until they are on disk.

With several processes (``jax.distributed``) every save meets at coordination-service barriers named by the step.
Two managers saving the same step (the trainer's ``checkpoints`` and ``best`` at an evaluation step) would meet
at the same barrier names and fail or hang ("Barrier _async_write_complete.4 is already ongoing"), so each manager
names its barriers after its directory.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp


def barrier_prefix(directory: str) -> str:
    """The prefix of a checkpoint directory's barrier names: its last component, which every process agrees on
    even where hosts mount the storage at different paths (two managers at once need different last components,
    as the trainer's ``checkpoints`` and ``best`` have)."""
    return os.path.basename(os.path.normpath(os.path.abspath(directory))) or "root"


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints (and, with ``best_metric``, the best by that metric)."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, best_metric: Optional[str] = None,
                 best_mode: str = "min", async_save: bool = True) -> None:
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=barrier_prefix(self.directory)),
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
            best_mode=best_mode, keep_checkpoints_without_metrics=False if best_metric else True)
        self.best_metric = best_metric
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, data_state: Mapping[str, Any],
             metrics: Optional[Mapping[str, float]] = None, force: bool = False) -> bool:
        """Starts saving ``state`` and the iterator position at ``step`` (returns whether a save started)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)))
        clean = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self._manager.save(step, args=args, metrics=clean, force=force)

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The best checkpoint's step by ``best_metric`` (the latest without one), or None."""
        return self._manager.best_step() if self.best_metric else self.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint kept."""
        return list(self._manager.all_steps())

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state at ``step`` laid out like ``abstract_state`` (arrays or ShapeDtypeStructs with shardings)."""
        target = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["data"])

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
