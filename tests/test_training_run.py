"""The training program end to end (`bertgen train`): outputs, export, resuming after SIGTERM and SIGKILL,
non-finite losses, two processes through jax.distributed, and bad configs and data."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import FUSION_TINY_STEPS, REPO, TOL, free_port, max_diff

TINY_RUN = """
[model]
init = "rnd2rnd"
tokenizer = "word"
config = { hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 2, intermediate_size = 64, max_position_embeddings = 64, hidden_dropout_prob = 0.1, attention_probs_dropout_prob = 0.1 }

[data]
synthetic = "fusion"
synthetic_train = 256
synthetic_eval = 16
max_source_length = 48
max_target_length = 48
batch_size = 16
eval_batch_size = 16

[optim]
learning_rate = 1e-3
warmup_steps = 2

[run]
steps = 8
log_every = 1
save_every = 2
eval_every = 4

[eval]
max_new_tokens = 12
"""


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.pop("JAX_PLATFORMS", None)
    return env


def _write_config(tmp_path, text: str = TINY_RUN, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _train_cmd(config: str, *overrides: str) -> list:
    return [sys.executable, "-m", "bertgen_flax", "train", "--config", config, "--quiet", *overrides]


def _train(config: str, *overrides: str, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_train_cmd(config, *overrides), capture_output=True, text=True, timeout=timeout,
                          env=_env(devices), cwd=REPO)


def _records(out_dir, split="train"):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    config = _write_config(tmp)
    out = str(tmp / "out")
    proc = _train(config, f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, out, proc


# ---------------------------------------------------------------------------------------------------------------
# What a run leaves behind
# ---------------------------------------------------------------------------------------------------------------
def test_a_run_logs_every_step_and_each_evaluation_as_jsonl(finished_run):
    _, out, _ = finished_run
    train = _records(out, "train")
    evals = _records(out, "eval")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert {"loss", "accuracy", "learning_rate", "tokens_per_second", "perplexity"} <= set(train[0])
    assert [r["step"] for r in evals] == [4, 8]
    assert {"eval_loss", "exact_match", "bleu", "rouge1", "rouge2", "rougeLsum"} <= set(evals[0])


def test_a_run_writes_tensorboard_events_a_png_plot_and_predictions(finished_run):
    _, out, _ = finished_run
    events = os.listdir(os.path.join(out, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "predictions", "step-00000008.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 16 and {"source", "prediction", "reference", "exact"} <= set(rows[0])


def test_the_export_loads_in_transformers_and_gives_the_same_outputs(finished_run):
    import torch
    import transformers
    import bertgen_flax as bg
    _, out, _ = finished_run
    export = os.path.join(out, "export")
    ref = transformers.EncoderDecoderModel.from_pretrained(export).eval()
    ours = bg.EncoderDecoderModel.from_pretrained(export)
    tok = bg.AutoTokenizer.from_pretrained(export)
    enc = tok(["Anna played chess. She loved it.", "Tom met Lucy. Lucy was tired."], padding=True)
    ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
    dec = np.full((2, 1), ours.config.decoder_start_token_id)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   decoder_input_ids=torch.tensor(dec)).logits
        want_gen = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=10,
                                do_sample=False, num_beams=1)
    got = ours(ids, mask, dec).logits
    assert max_diff(got, want) <= TOL
    np.testing.assert_array_equal(np.asarray(ours.generate(ids, mask, max_new_tokens=10)), want_gen.numpy())


def test_the_best_checkpoint_by_the_chosen_metric_is_the_one_exported(finished_run):
    _, out, proc = finished_run
    evals = {r["step"]: r["eval_loss"] for r in _records(out, "eval")}
    best = min(evals, key=evals.get)
    assert os.listdir(os.path.join(out, "best")) == [str(best)]
    assert f"exported best (step {best})" in proc.stderr


def test_rerunning_a_finished_run_does_nothing_more(finished_run):
    config, out, _ = finished_run
    before = len(_records(out))
    proc = _train(config, f"run.output_dir={out}", "run.export=false", "run.plot=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to do" in proc.stderr
    assert len(_records(out)) == before


# ---------------------------------------------------------------------------------------------------------------
# Interruptions
# ---------------------------------------------------------------------------------------------------------------
def _final_params(out_dir):
    from bertgen_flax.checkpoints import load_state_dict
    return load_state_dict(os.path.join(out_dir, "export"))


def _interrupted(config, out, sig, at_step, *overrides):
    """Starts a run, sends ``sig`` once the metrics show ``at_step``, waits for the process to end."""
    proc = subprocess.Popen(_train_cmd(config, f"run.output_dir={out}", *overrides), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
            if steps and max(steps) >= at_step:
                proc.send_signal(sig)
                break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


RESUME = ["run.steps=30", "run.save_every=5", "run.eval_every=0", "eval.generate=false", "run.plot=false",
          "data.synthetic_train=128"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    config = _write_config(tmp)
    out = str(tmp / "out")
    proc = _train(config, f"run.output_dir={out}", *RESUME)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _final_params(out), _records(out)


def test_sigterm_saves_and_exits_cleanly_and_the_resumed_run_is_bit_identical(tmp_path, uninterrupted):
    config = _write_config(tmp_path)
    out = str(tmp_path / "out")
    code, stdout, stderr = _interrupted(config, out, signal.SIGTERM, 7, *RESUME)
    assert code == 0, stderr[-3000:]
    assert "stopped=sigterm" in stdout
    stopped_at = int(stdout.split("step=")[1].split()[0])
    assert 7 <= stopped_at < 30
    assert str(stopped_at) in os.listdir(os.path.join(out, "checkpoints"))  # saved at the step it stopped
    proc = _train(config, f"run.output_dir={out}", *RESUME)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {stopped_at}" in proc.stderr
    want, want_records = uninterrupted
    got = _final_params(out)
    assert set(got) == set(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert [r["loss"] for r in _records(out)] == [r["loss"] for r in want_records]


def test_sigkill_resumes_from_the_last_checkpoint_and_ends_bit_identical(tmp_path, uninterrupted):
    config = _write_config(tmp_path)
    out = str(tmp_path / "out")
    code, _, _ = _interrupted(config, out, signal.SIGKILL, 12, *RESUME)
    assert code == -signal.SIGKILL
    saved = sorted(int(s) for s in os.listdir(os.path.join(out, "checkpoints")) if s.isdigit())
    assert saved and saved[-1] < 30
    proc = _train(config, f"run.output_dir={out}", *RESUME)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    want, want_records = uninterrupted
    got = _final_params(out)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    # the log has each step once, as in the uninterrupted run
    assert [r["step"] for r in _records(out)] == [r["step"] for r in want_records]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _write_config(tmp_path)
    out = str(tmp_path / "out")
    proc = _train(config, f"run.output_dir={out}", "optim.learning_rate=1e30", "optim.schedule=\"constant\"",
                  "optim.clip_norm=null", "run.save_every=1", "run.eval_every=0")
    assert proc.returncode == 1
    assert "non-finite loss" in proc.stderr and "last good checkpoint is step" in proc.stderr
    good = int(proc.stderr.split("last good checkpoint is step ")[1].split()[0])
    assert sorted(int(s) for s in os.listdir(os.path.join(out, "checkpoints")))[-1] == good
    import jax
    import orbax.checkpoint as ocp
    restored = ocp.StandardCheckpointer().restore(os.path.join(out, "checkpoints", str(good), "state"))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored["params"]))
    assert not os.path.exists(os.path.join(out, "export"))


# ---------------------------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------------------------
def test_two_processes_through_jax_distributed_train_like_one(tmp_path):
    config = _write_config(tmp_path)
    common = ["run.steps=4", "run.eval_every=0", "eval.generate=false", "run.plot=false", "run.export=false",
              "model.config={\"hidden_size\": 32, \"num_hidden_layers\": 1, \"num_attention_heads\": 2, "
              "\"intermediate_size\": 64, \"max_position_embeddings\": 64, \"hidden_dropout_prob\": 0.0, "
              "\"attention_probs_dropout_prob\": 0.0}"]
    single = str(tmp_path / "single")
    proc = _train(config, f"run.output_dir={single}", *common, devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = str(tmp_path / "multi")
    port = free_port()
    procs = [subprocess.Popen(_train_cmd(config, f"run.output_dir={multi}", *common,
                                         f"distributed.coordinator=localhost:{port}", "distributed.num_processes=2",
                                         f"distributed.process_id={i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(1), cwd=REPO)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    one, two = _records(single), _records(multi)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad configs and data fail fast with a clear message
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["model.initt=rnd2rnd"], "unknown key model.initt"),
    (["optimizer.name=adam"], "unknown config section"),
    (["optim.name=sgd"], "optim.name must be one of"),
    (["run.steps=-3"], "run.steps must be >= 1"),
    (["data.batch_size=\"big\""], "data.batch_size must be an integer"),
    (["model.init=bert2bert"], "needs model.pretrained"),
    (["model.remat=\"some\""], "model.remat must be 'none', 'full' or 'dots'"),
    (["model.scan_unroll=\"some\""], "model.scan_unroll must be 'auto', 'all' or a number >= 1"),
    (["model.scan_unroll=0"], "model.scan_unroll must be 'auto', 'all' or a number >= 1"),
    (["model.init=checkpoint", "model.checkpoint=/no/such/dir", "model.config={}", "model.tokenizer="],
     "checkpoint directory not found"),
])
def test_bad_config_values_fail_fast_naming_the_key(tmp_path, overrides, message):
    proc = _train(_write_config(tmp_path), f"run.output_dir={tmp_path / 'out'}", *overrides, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_a_missing_config_file_is_named(tmp_path):
    proc = _train(str(tmp_path / "nope.toml"), timeout=120)
    assert proc.returncode == 2 and "training config not found" in proc.stderr


def test_a_malformed_config_file_is_named(tmp_path):
    proc = _train(_write_config(tmp_path, "[model\ninit = 1"), timeout=120)
    assert proc.returncode == 2 and "is not valid TOML" in proc.stderr


def _file_data_overrides(tmp_path, train_text: str) -> list:
    path = tmp_path / "train.jsonl"
    path.write_text(train_text)
    return ["data.synthetic=", f"data.train={path}", f"run.output_dir={tmp_path / 'out'}"]


def test_a_missing_data_file_is_named(tmp_path):
    proc = _train(_write_config(tmp_path), "data.synthetic=", f"data.train={tmp_path / 'absent.jsonl'}",
                  f"run.output_dir={tmp_path / 'out'}", timeout=120)
    assert proc.returncode == 2 and "data file not found" in proc.stderr and "absent.jsonl" in proc.stderr


def test_a_malformed_data_line_is_named_with_its_line_number(tmp_path):
    text = '{"source": "a b", "target": "a"}\n{"source": "c d", "target": \n'
    proc = _train(_write_config(tmp_path), *_file_data_overrides(tmp_path, text), timeout=120)
    assert proc.returncode == 2 and "train.jsonl:2: malformed JSON" in proc.stderr, proc.stderr[-2000:]


def test_an_empty_data_set_is_an_error(tmp_path):
    proc = _train(_write_config(tmp_path), *_file_data_overrides(tmp_path, "\n\n"), timeout=120)
    assert proc.returncode == 2 and "empty" in proc.stderr, proc.stderr[-2000:]


def test_a_batch_size_that_the_devices_do_not_divide_is_an_error(tmp_path):
    proc = _train(_write_config(tmp_path), f"run.output_dir={tmp_path / 'out'}", "data.batch_size=9",
                  devices=2, timeout=120)
    assert proc.returncode == 2 and "multiple of the number of devices" in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------------
def test_a_tiny_model_from_scratch_reaches_90_percent_exact_match_on_synthetic_fusion(fusion_tiny_run):
    """The shipped recipe, shortened to 500 steps (conftest): trained from random weights on 20,000 synthetic
    fusions, evaluated by greedy generation on 500 held-out ones."""
    final = _records(fusion_tiny_run, "eval")[-1]
    assert final["step"] == FUSION_TINY_STEPS
    assert final["exact_match"] >= 90.0, final


WARM_VS_RANDOM = ["run.steps=30", "run.log_every=5", "run.eval_every=0", "eval.generate=false",
                  "eval.best_metric=eval_loss", "run.export=false", "run.plot=false", "run.save_every=1000",
                  "data.synthetic_train=2000", "data.synthetic_eval=32", "data.batch_size=16",
                  "optim.warmup_steps=5", "optim.learning_rate=1e-4", "model.dropout=0.0"]


def test_warm_starting_from_the_real_minilm_bert_reaches_a_lower_loss_than_random_init(tmp_path):
    """BERT2BERT from MiniLM-L6-H384 against Rnd2Rnd of the same shape and vocabulary, same data and steps;
    both curves are drawn into one PNG (kept in the test's tmp directory)."""
    from bertgen_flax.training import plot_comparison
    config = str(REPO / "train" / "fusion_minilm.toml")
    curves = {}
    for init in ("bert2bert", "rnd2rnd"):
        out = tmp_path / init
        proc = _train(config, f"model.init={init}", f"run.output_dir={out}", *WARM_VS_RANDOM)
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[init] = [r["loss"] for r in _records(out)]
    png = plot_comparison({k: str(tmp_path / k / "metrics.jsonl") for k in curves}, tmp_path / "warm_vs_random.png")
    print("loss every 5 steps:", curves)
    assert len(curves["bert2bert"]) == len(curves["rnd2rnd"]) == 6
    assert np.mean(curves["bert2bert"][-2:]) < np.mean(curves["rnd2rnd"][-2:]) - 0.5
    assert all(w < r for w, r in zip(curves["bert2bert"], curves["rnd2rnd"]))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
