"""Training checkpoints: exact restore, keep-N, keep-best, and half-written checkpoints ignored."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from bertgen_flax.training import create_state, make_optimizer
from bertgen_flax.training.checkpointing import Checkpointer


def _state(seed=0):
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}}
    return create_state(params, make_optimizer("adamw", 1e-3), jax.random.PRNGKey(seed))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_restore_gives_back_the_exact_state_and_data_position(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    state = _state(1)
    ckpt.save(7, state, {"epoch": 2, "position": 31, "seed": 5})
    ckpt.wait()
    restored, data = ckpt.restore(ckpt.latest_step(), _state(0))
    assert ckpt.latest_step() == 7 and data == {"epoch": 2, "position": 31, "seed": 5}
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(state), _leaves(restored)))
    ckpt.close()


def test_only_the_last_n_checkpoints_are_kept(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"position": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()


def test_the_best_checkpoint_by_a_metric_is_kept(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=1, best_metric="eval_loss")
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
        ckpt.save(step, _state(step), {"position": step}, metrics={"eval_loss": loss})
    ckpt.wait()
    assert ckpt.best_step() == 2
    ckpt.close()


def test_a_half_written_checkpoint_is_never_the_latest(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, _state(1), {"position": 1})
    ckpt.close()
    # what a process killed mid-save leaves: orbax's temporary directory for step 2
    os.makedirs(tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-123" / "state")
    again = Checkpointer(str(tmp_path / "ckpt"))
    assert again.latest_step() == 1
    again.close()
