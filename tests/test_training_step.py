"""The training step: gradients equal transformers' PyTorch gradients; sharded steps equal one-device steps."""
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import bertgen_flax as bg
from bertgen_flax import convert
from bertgen_flax.training import (create_state, inverse_sqrt_schedule, linear_warmup_linear_decay,
                                   make_optimizer, make_train_step, token_loss)
from bertgen_flax.training.optim import decay_mask
from bertgen_flax.training.config import TrainConfig, TrainConfigError
from bertgen_flax.training.step import resolve_scan_unroll, seq2seq_logits

from conftest import REPO, TINY, seq2seq_checkpoint


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], (3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    labels = rng.integers(3, TINY["vocab_size"], (3, 7))
    labels[2, 5:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "ed"
    ref = seq2seq_checkpoint(path, seed=2)
    return ref, bg.EncoderDecoderModel.from_pretrained(str(path))


def _assert_transformers_gradients(ref, ours, module, batch, scanned: bool = True) -> tuple[float, float]:
    """Gradients of ``module`` (with ``ours.params``) equal transformers' PyTorch gradients on ``batch`` within
    1e-5 of their scale; returns (our loss, transformers' loss)."""
    ref.zero_grad()
    out = ref(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
              labels=torch.tensor(batch["labels"]))
    out.loss.backward()
    want = {k: p.grad.numpy() for k, p in ref.named_parameters() if p.grad is not None}
    loss, grads = jax.value_and_grad(
        lambda p: token_loss(seq2seq_logits(module, p, batch), jnp.asarray(batch["labels"]))[0])(ours.params)
    tree = jax.tree_util.tree_map(np.asarray, grads)
    got = convert.flax_to_torch(tree if scanned else convert.stack_layers(tree), convert.ENCODER_DECODER,
                                ours.config)
    assert set(want) <= set(got)
    scale = max(float(np.abs(g).max()) for g in want.values())
    worst = max(float(np.abs(got[k] - g).max()) for k, g in want.items())
    assert worst <= 1e-5 * max(1.0, scale), (worst, scale)
    return float(loss), float(out.loss.detach())


def test_gradients_equal_transformers_pytorch_gradients(pair):
    ref, ours = pair
    loss, want = _assert_transformers_gradients(ref, ours, ours.module, _batch())
    assert abs(loss - want) <= 1e-5


@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_rematerialised_layers_give_transformers_gradients_too(pair, tmp_path, remat, scan_layers):
    ref, ours = pair
    if not scan_layers:
        ours.save_pretrained(str(tmp_path / "m"))
        ours = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "m"), scan_layers=False)
    _assert_transformers_gradients(ref, ours, ours.module.clone(remat=remat), _batch(1), scanned=scan_layers)


@pytest.mark.parametrize("unroll, remat", [(2, "none"), (99, "none"), (99, "dots")])
def test_an_unrolled_scan_gives_transformers_gradients(pair, unroll, remat):
    ref, ours = pair
    module = ours.module.clone(scan_unroll=unroll, remat=remat)  # 99 >= the layer count: unrolled completely
    _assert_transformers_gradients(ref, ours, module, _batch(2))


def test_a_completely_unrolled_scan_has_no_loop_and_keeps_the_stacked_parameters(pair):
    _, ours = pair
    batch = _batch()

    def program(unroll):
        module = ours.module.clone(scan_unroll=unroll)
        loss = lambda p: token_loss(seq2seq_logits(module, p, batch), jnp.asarray(batch["labels"]))[0]
        return jax.jit(jax.grad(loss)).lower(ours.params).as_text()

    assert "while" in program(1) and "while" not in program(99)
    layer_kernel = ours.params["encoder"]["encoder"]["layer"]["intermediate"]["dense"]["kernel"]
    assert layer_kernel.shape[0] == ours.config.encoder.num_hidden_layers  # one stacked tree for every setting


def test_scan_unroll_auto_unrolls_every_layer_on_a_cpu_only():
    assert resolve_scan_unroll("auto", 12, backend="cpu") == 12
    assert resolve_scan_unroll("auto", 12, backend="gpu") == resolve_scan_unroll("auto", 12, backend="tpu") == 1
    assert resolve_scan_unroll("all", 24, backend="gpu") == 24
    assert resolve_scan_unroll(3, 24, backend="cpu") == 3


def test_a_training_config_takes_scan_unroll_as_a_number_or_a_word():
    base = ['model.pretrained="minilm"', 'data.synthetic="fusion"']
    assert TrainConfig.load(None, base).model.scan_unroll == "auto"
    assert TrainConfig.load(None, base + ["model.scan_unroll=4"]).model.scan_unroll == 4
    assert TrainConfig.load(None, base + ['model.scan_unroll="all"']).model.scan_unroll == "all"
    with pytest.raises(TrainConfigError, match="model.scan_unroll must be an integer or a string"):
        TrainConfig.load(None, base + ["model.scan_unroll=true"])


def test_a_scan_unroll_below_one_is_named(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="scan_unroll must be >= 1, got 0"):
        seq2seq_logits(ours.module.clone(scan_unroll=0), ours.params, _batch())


def test_an_unknown_remat_policy_is_named(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        seq2seq_logits(ours.module.clone(remat="some"), ours.params, _batch())


def test_numpy_int64_labels_become_decoder_inputs_without_a_dtype_warning():
    from bertgen_flax.modeling import shift_tokens_right
    labels = np.array([[5, 6, 7], [8, -100, -100]], dtype=np.int64)  # what tokenizers and numpy give
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shifted = shift_tokens_right(labels, pad_token_id=0, decoder_start_token_id=2)
    np.testing.assert_array_equal(np.asarray(shifted), [[2, 5, 6], [2, 8, 0]])


def test_label_smoothing_equals_torch_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (2, 5))
    labels[1, 3:] = -100
    want = torch.nn.functional.cross_entropy(torch.tensor(logits).reshape(-1, 11), torch.tensor(labels).reshape(-1),
                                             ignore_index=-100, label_smoothing=0.1)
    got, metrics = token_loss(jnp.asarray(logits), jnp.asarray(labels), 0.1)
    assert abs(float(got) - float(want)) <= 1e-6
    assert int(metrics["tokens"]) == 8


def test_weight_decay_skips_biases_and_layer_norms(pair):
    _, ours = pair
    mask = convert.flatten(decay_mask(ours.params))
    assert not any(v for k, v in mask.items() if k[-1] == "bias" or "LayerNorm" in k)
    assert mask[("encoder", "encoder", "layer", "attention", "self", "query", "kernel")]


def test_schedules_warm_up_and_decay():
    lin = linear_warmup_linear_decay(1e-3, 10, 110)
    assert float(lin(0)) == 0.0 and abs(float(lin(10)) - 1e-3) < 1e-9 and abs(float(lin(60)) - 5e-4) < 1e-9
    inv = inverse_sqrt_schedule(1024, 100)
    peak = float(inv(100))
    assert abs(peak - 1024 ** -0.5 * 100 ** -0.5) < 1e-9 and float(inv(50)) < peak and float(inv(400)) < peak


def test_a_step_lowers_the_loss_and_counts(pair):
    _, ours = pair
    tx = make_optimizer("adamw", 1e-3)
    state = create_state(ours.params, tx, jax.random.PRNGKey(0))
    step = make_train_step(ours.module, tx)
    batch = jax.tree_util.tree_map(jnp.asarray, _batch())
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 3 and losses[-1] < losses[0]


def test_gradient_accumulation_over_two_halves_equals_one_full_step(pair):
    _, ours = pair
    batch = _batch(3)
    batch["labels"][:, 5:] = -100  # equal token counts in every row, so half-batch means average to the full mean
    full = jax.tree_util.tree_map(jnp.asarray, batch)
    halves = [jax.tree_util.tree_map(lambda x: jnp.asarray(x[i:i + 1]), batch) for i in range(2)]
    full["input_ids"], full["attention_mask"], full["labels"] = (full[k][:2] for k in ("input_ids", "attention_mask",
                                                                                       "labels"))
    no_dropout = bg.EncoderDecoderModel(ours.config.replace(
        encoder=ours.config.encoder.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        decoder=ours.config.decoder.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        params=ours.params)
    one = make_optimizer("adam", 1e-3, clip_norm=None)
    two = make_optimizer("adam", 1e-3, clip_norm=None, accumulation_steps=2)
    s1 = make_train_step(no_dropout.module, one)(create_state(ours.params, one, jax.random.PRNGKey(0)), full)[0]
    step2 = make_train_step(no_dropout.module, two)
    s2 = create_state(ours.params, two, jax.random.PRNGKey(0))
    for half in halves:
        s2, _ = step2(s2, half)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(s1.params),
                                                          jax.tree_util.tree_leaves(s2.params)))
    # Equal up to float32 rounding: a half batch has fewer rows, so its products may run another CPU kernel (the
    # streaming one up to 8 rows, the packed one above), and Adam turns a rounding-level gradient difference on a
    # near-zero gradient into an update difference of up to a few lr * 1e-3. Averaging wrongly (summing the halves,
    # or applying each) moves parameters by about lr = 1e-3.
    assert diff <= 1e-5


SHARDED_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
import bertgen_flax as bg
from bertgen_flax.training import create_state, make_mesh, make_optimizer, make_train_step, shard_state
assert len(jax.devices()) == 8
model = bg.EncoderDecoderModel.from_pretrained(sys.argv[1])
rng = np.random.default_rng(0)
batch = {"input_ids": rng.integers(3, 99, (8, 9)), "attention_mask": np.ones((8, 9), np.int32),
         "labels": rng.integers(3, 99, (8, 7))}
batch["attention_mask"][3, 5:] = 0; batch["labels"][2, 4:] = -100
batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
tx = make_optimizer("adamw", 1e-3)

def run(module, steps):
    # (losses, final params) of `steps` steps on one device, then on a data x fsdp mesh of all 8
    results = []
    for mesh in (None, make_mesh(data=2, fsdp=4)):
        state = create_state(model.params, tx, jax.random.PRNGKey(0))
        if mesh is None:
            step = make_train_step(module, tx)
        else:
            state, shardings = shard_state(state, mesh, min_size=0)  # the tiny model's leaves are small
            step = make_train_step(module, tx, mesh=mesh, state_shardings=shardings)
            specs = [s.spec for s in jax.tree_util.tree_leaves(shardings)]
            assert any("fsdp" in tuple(x) for x in specs), "nothing was sharded over fsdp"
        losses = []
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results.append((losses, [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]))
    return results

(l1, p1), (l8, p8) = run(model.module, 2)
worst = max(float(np.abs(a - b).max()) for a, b in zip(p1, p8))
assert max(abs(a - b) for a, b in zip(l1, l8)) <= 1e-5 and worst <= 1e-5, (l1, l8, worst)
# with dropout on, the masks are the same however the batch is sharded (and dropout does act)
cfg = model.config
drop = dict(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
dropped = bg.EncoderDecoderModel(cfg.replace(encoder=cfg.encoder.replace(**drop), decoder=cfg.decoder.replace(**drop)),
                                 params=model.params)
(d1, _), (d8, _) = run(dropped.module, 1)
assert abs(d1[0] - d8[0]) <= 1e-5 and abs(d1[0] - l1[0]) > 1e-3, (d1, d8, l1)
print("OK", l1, l8, worst)
"""


def test_a_step_on_8_devices_with_data_and_fsdp_sharding_equals_one_device_dropout_included(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(str(tmp_path / "m"))
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path / "m")], capture_output=True,
                          text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("call, message", [
    (lambda: make_optimizer("sgd"), "unknown optimizer 'sgd'"),
    (lambda: make_optimizer("adamw", accumulation_steps=0), "accumulation_steps"),
    (lambda: linear_warmup_linear_decay(1e-3, 20, 10), "warmup_steps"),
    (lambda: inverse_sqrt_schedule(1024, 0), "warmup_steps must be positive"),
])
def test_bad_training_options_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_mesh_that_does_not_fit_the_devices_is_rejected():
    from bertgen_flax.training import make_mesh
    with pytest.raises(ValueError, match="does not match"):
        make_mesh(data=3, fsdp=5)


def test_a_checkpointer_rejects_an_unknown_best_mode(tmp_path):
    from bertgen_flax.training import Checkpointer
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(str(tmp_path / "c"), best_mode="largest")


def test_shared_cross_kv_needs_an_encoder_batch_that_divides_the_batch(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="does not divide"):
        ours.init_cache(6, 4, 9, encoder_batch_size=4)


def test_bfloat16_compute_keeps_float32_master_weights_and_a_close_loss(pair):
    _, ours = pair
    bf16 = bg.EncoderDecoderModel(ours.config, params=ours.params, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    tx = make_optimizer("adamw", 1e-3)
    batch = jax.tree_util.tree_map(jnp.asarray, _batch())
    f32_loss = float(make_train_step(ours.module, tx)(create_state(ours.params, tx, jax.random.PRNGKey(0)),
                                                       batch)[1]["nll"])
    state, metrics = make_train_step(bf16.module, tx)(create_state(ours.params, tx, jax.random.PRNGKey(0)), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim)
    assert metrics["loss"].dtype == jnp.float32
    assert abs(float(metrics["nll"]) - f32_loss) < 0.05 * f32_loss


def test_a_non_finite_loss_leaves_params_and_optimizer_state_unchanged(pair):
    _, ours = pair
    tx = make_optimizer("adamw", 1e-3)
    state = create_state(ours.params, tx, jax.random.PRNGKey(0))
    poisoned = state.replace(params={**state.params, "decoder": jax.tree_util.tree_map(
        lambda x: x * np.float32("nan") if x.ndim == 2 and x.shape[0] == TINY["vocab_size"] else x,
        state.params["decoder"])})
    poisoned_before = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves((poisoned.params,
                                                                                poisoned.opt_state))]
    after, metrics = make_train_step(ours.module, tx)(poisoned, jax.tree_util.tree_map(jnp.asarray, _batch()))
    assert not bool(metrics["finite"])
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves((after.params, after.opt_state))]
    assert len(leaves) == len(poisoned_before)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(leaves, poisoned_before))
