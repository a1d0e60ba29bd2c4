"""Training checkpoints: exact restore, keep-N, keep-best, and half-written checkpoints ignored."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from bertgen_flax.training import create_state, make_optimizer
from bertgen_flax.training.checkpointing import Checkpointer

from conftest import free_port


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


# Each process: two checkpoint managers (the trainer's ``checkpoints`` and ``best``) save the same steps of one array
# sharded over both processes, as the trainer does at an evaluation step.
_TWO_MANAGERS = """
import os, sys
import jax, numpy as np
coordinator, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator, num_processes=2, process_id=pid)
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from bertgen_flax.training.checkpointing import Checkpointer
sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
x = jax.make_array_from_process_local_data(sharding, np.full((2, 8), pid, np.float32))
ckpt = Checkpointer(os.path.join(out, "checkpoints"))
best = Checkpointer(os.path.join(out, "best"), max_to_keep=1, best_metric="loss")
for step in range(1, 7):
    best.save(step, {"x": x}, {"step": step}, metrics={"loss": 1.0 / step}, force=True)
    ckpt.save(step, {"x": x}, {"step": step}, force=True)
ckpt.close(); best.close()
print("steps", ckpt.all_steps(), best.all_steps())
"""


def test_two_managers_saving_the_same_step_across_processes_do_not_share_barriers(tmp_path):
    # Without a barrier prefix per directory this failed or hung in 6 of 6 runs ("Barrier _async_write_complete.1
    # is already ongoing"), and the two-process training run in about 1 of 3.
    import subprocess
    import sys
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("JAX_PLATFORMS", None)
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_MANAGERS, f"localhost:{port}", str(i), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError("two processes saving two checkpoint directories hung for 120 s")
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "steps [4, 5, 6] [6]" in out, out
