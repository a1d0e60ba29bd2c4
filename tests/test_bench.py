"""The benchmark driver's pieces that need no accelerator: the GPU summary's target table, the shared workload,
finding the transformers 4.57 interpreter, and (slow) the whole GPU driver rehearsed with tiny shapes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import _workload  # noqa: E402
import bench_flax457  # noqa: E402
import gpu_summary  # noqa: E402


def _write(path, payload):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)


def _engine(ms=None, tok=None, first=None, peak=None):
    return dict(ms_per_step=ms, tokens_per_s=tok, first_call_s=first, compile_s=None, peak_memory_bytes=peak)


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as bench/gpu.py leaves it, with made-up figures around the issue-5 targets."""
    _write(tmp_path / "manifest.json", dict(stamp="20260101-000000Z", date_utc="2026-01-01T00:00:00+00:00",
                                            tiny=False, device=dict(jax_device_kind="NVIDIA H100 80GB HBM3",
                                                                    torch_device_name="NVIDIA H100 80GB HBM3",
                                                                    jax="0.10.2", torch="2.13.0"),
                                            steps=[dict(name="generate-bf16", status="ok", seconds=12.0,
                                                        command=["python", "bench/bench_generate.py"])]))
    cases = [("b1", "batch 1 greedy", _engine(0.5, 2_000, 4.0, 2 * 2**30), _engine(14.1, 71, 1.0, 2**30)),
             ("b32", "batch 32 greedy", _engine(0.6, 50_000, 6.0), _engine(20.1, 1_591, 1.0)),
             ("b128", "batch 128 greedy", _engine(1.4, 90_000, 4.5), _engine(17.4, 7_377, 1.0)),
             ("b32-beam4", "batch 32, 4 beams", _engine(1.0, 30_000, 5.5), _engine(26.5, 1_206, 1.0))]
    _write(tmp_path / "generate-bf16.json", dict(results=[dict(case=c, label=label, ours=o, torch=t,
                                                                identity="skipped (bfloat16)", speedup=None)
                                                           for c, label, o, t in cases]))
    _write(tmp_path / "flax457.json", dict(results=[dict(case="b1", ms_per_step=2.3, tokens_per_s=435,
                                                         first_call_s=25.0, peak_memory_bytes=None),
                                                    dict(case="b32", ms_per_step=2.52, tokens_per_s=12_684,
                                                         first_call_s=22.0, peak_memory_bytes=None)],
                                           train=dict(batch=32, source=512, target=128, median_s=0.5,
                                                      first_call_s=160.0, tflops=1.0, peak_memory_bytes=None)))
    train_env = dict(shape=dict(batch=32, source=512, target=128), parameters_encoder=10**8,
                     parameters_decoder=2 * 10**8)
    _write(tmp_path / "train-bf16.json", dict(
        environment=train_env,
        results=[dict(engine="transformers", tflops=197.0, first_call_s=3.0, median_s=0.234),
                 dict(engine="bertgen_flax", tflops=460.0, first_call_s=40.0, median_s=0.1,
                      xla_memory_bytes=dict(temp=30 * 2**30, arguments=9 * 2**30, outputs=9 * 2**30,
                                            aliased=9 * 2**30))]))
    _write(tmp_path / "train-bf16-dropout.json", dict(
        environment=train_env,
        results=[dict(engine="transformers", tflops=180.0), dict(engine="bertgen_flax", tflops=360.0)]))
    _write(tmp_path / "flax457-dropout.json", dict(results=[], train=dict(batch=32, source=512, target=128,
                                                                          dropout=0.1, median_s=0.6, tflops=1.0)))
    return str(tmp_path)


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_target_table_has_values_ratios_and_verdicts(run_dir):
    table = gpu_summary.target_table(gpu_summary.load_run(run_dir))
    # target | goal | ours | PyTorch | ours vs PyTorch | 4.57 Flax | ours vs Flax | met
    assert _row(table, "batch 1 greedy, ms per step") == ["batch 1 greedy, ms per step", "<= 0.60", "0.50", "14.10",
                                                          "28.20x", "2.30", "4.60x", "met"]
    b32 = _row(table, "batch 32 greedy, new tokens/s")
    assert b32[2:5] == ["50,000", "1,591", "31.43x"] and b32[-1] == "met"
    b128 = _row(table, "batch 128 greedy, new tokens/s")
    assert b128[2] == "90,000" and b128[5] == "-" and b128[-1] == "**not met**"
    beam = _row(table, "batch 32 beam 4, new tokens/s")
    assert beam[5] == "not comparable" and beam[-1] == "met"
    first = _row(table, "first call (compile), s, slowest generate case, cache empty")
    assert first[2] == "6.0" and first[4] == "-" and first[5] == "25.0" and first[-1] == "**not met**"
    assert _row(table, "first call, s, slowest generate case, persistent cache filled")[-1] == "not measured"
    train = _row(table, "training step, batch 32, 512/128 tokens, TFLOP/s (6 N tokens)")
    # 4.57 Flax on our parameter counts: 6 * (1e8 * 32 * 512 + 2e8 * 32 * 128) / 0.5 s = 29.5 TFLOP/s
    assert train[2:6] == ["460.0", "197.0", "2.34x", "29.5"] and train[-1] == "met"
    dropout = _row(table, "the same with dropout 0.1 (the anchors' setting), TFLOP/s")
    # 4.57 Flax with dropout, on our parameter counts: 6 * (1e8 * 32 * 512 + 2e8 * 32 * 128) / 0.6 s = 24.6
    assert dropout[2:7] == ["360.0", "180.0", "2.00x", "24.6", "14.65x"] and dropout[-1] == "**not met**"
    assert _row(table, "first call of the training step (compile), s, cache empty")[-1] == "**not met**"


def test_summary_is_written_with_memory_and_steps(run_dir):
    text = gpu_summary.write_summary(run_dir)
    assert os.path.isfile(os.path.join(run_dir, "SUMMARY.md"))
    assert "NVIDIA H100 80GB HBM3" in text and "TINY" not in text
    assert "| generate, batch 1 greedy | 2.00 | 1.00 | - |" in text
    assert "| training step, XLA's plan of ours (temporaries + arguments + outputs - aliased) | 39.00 | - | - |" in text
    assert "| generate-bf16 | ok | 12 | `python bench/bench_generate.py` |" in text
    assert "Quantized generation" in text and "not measured." in text


def test_shared_inputs_are_ragged_and_reproducible():
    ids, mask = _workload.make_inputs(4, 16, 500, seed=0)
    assert mask.sum(axis=1).tolist() == [16, 9, 10, 11]  # row i keeps 16 - (7 i mod 8)
    assert (ids[mask == 0] == _workload.PAD).all() and (ids[mask == 1] >= _workload.FIRST_SOURCE_ID).all()
    again, _ = _workload.make_inputs(4, 16, 500, seed=0)
    np.testing.assert_array_equal(ids, again)
    flags = _workload.shape_flags(_workload.PRESETS["l24"])
    assert flags[:2] == ["--hidden", "1024"] and "--new-tokens" in flags


def test_flax457_interpreter_search_says_why_it_skips(tmp_path):
    python, why = bench_flax457.find_interpreter(str(tmp_path / "no-such-python"))
    assert python is None and "not found" in why


def test_gpu_driver_budget_cuts_a_step_to_the_deadline_and_skips_when_too_little_is_left():
    import gpu
    assert gpu.step_budget(5400.0, None, 1000.0) == 5400.0
    assert gpu.step_budget(5400.0, 600.0, 100.0) == 600.0 - 100.0 - gpu.RESERVE_S
    assert gpu.step_budget(120.0, 600.0, 100.0) == 120.0
    assert gpu.step_budget(5400.0, 600.0, 600.0 - gpu.RESERVE_S - gpu.MIN_STEP_S + 1) is None


def test_gpu_driver_runs_steps_in_the_order_given_and_skips_those_past_the_deadline(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, BERTGEN_GPU_BENCH_TINY="1")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "gpu.py"), "--out", str(out),
                           "--steps", "train-bf16,generate-bf16", "--deadline", "20"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.index("=== train-bf16:") < proc.stdout.index("=== generate-bf16:")
    steps = {s["name"]: s["status"] for s in json.loads((out / "manifest.json").read_text())["steps"]}
    assert set(steps) == {"train-bf16", "generate-bf16"}
    assert all(status.startswith("skipped (out of time: --deadline 20 s") for status in steps.values())


def test_gpu_driver_names_a_deadline_too_short_for_its_summary(capsys):
    import gpu
    with pytest.raises(SystemExit) as exit_info:
        gpu.parse_args(["--deadline", "10"])
    assert exit_info.value.code == 2 and "--deadline" in capsys.readouterr().err


@pytest.mark.slow
def test_variants_table_compares_our_decode_steps_with_the_cache_filled(run_dir):
    base = [("b1", "batch 1 greedy", 0.8), ("b32", "batch 32 greedy", 1.2)]
    for name, ms in (("generate-bf16-cached", (0.8, 1.2)), ("generate-bf16-pallas", (0.5, 1.5)),
                     ("generate-bf16-graphs", (0.4, None))):
        _write(os.path.join(run_dir, f"{name}.json"), dict(results=[
            dict(case=c, label=label, ours=_engine(m, None, 3.0)) for (c, label, _), m in zip(base, ms)]))
    table = gpu_summary.variants_table(gpu_summary.load_run(run_dir))
    # case | XLA attention | Pallas | speed-up | command buffers | speed-up | Pallas first call
    assert _row(table, "batch 1 greedy") == ["batch 1 greedy", "0.80", "0.50", "1.60x", "0.40", "2.00x", "3.0"]
    assert _row(table, "batch 32 greedy") == ["batch 32 greedy", "1.20", "1.50", "0.80x", "-", "-", "3.0"]


def test_a_steps_own_environment_is_shown_with_its_command(run_dir):
    manifest = gpu_summary.load_json(os.path.join(run_dir, "manifest.json"))
    manifest["steps"].append(dict(name="generate-bf16-pallas", status="ok", seconds=9.0,
                                  env={"BERTGEN_PALLAS_ATTENTION": "1"}, command=["python", "bench.py"]))
    _write(os.path.join(run_dir, "manifest.json"), manifest)
    text = gpu_summary.write_summary(run_dir)
    assert "| generate-bf16-pallas | ok | 9 | `BERTGEN_PALLAS_ATTENTION=1 python bench.py` |" in text
    assert "### Variants of our decode steps (cache filled)" in text


def test_gpu_driver_rehearses_every_step_with_tiny_shapes(tmp_path):
    """The whole one-command GPU run with BERTGEN_GPU_BENCH_TINY=1 on the CPU (a few minutes)."""
    out = tmp_path / "run"
    env = dict(os.environ, BERTGEN_GPU_BENCH_TINY="1")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "gpu.py"), "--out", str(out),
                           "--steps", "generate-bf16,generate-bf16-cached,train-bf16"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "SUMMARY.md").read_text()
    assert "TINY REHEARSAL" in summary
    for name in ("generate-bf16", "generate-bf16-cached", "train-bf16"):
        assert (out / f"{name}.json").is_file() and (out / f"{name}.log").is_file()
        assert f"| {name} | ok |" in summary


def test_ct2_bench_takes_the_l24_cpu_workload_and_names_bad_options(capsys):
    import bench_ct2
    args = bench_ct2.parse_args(["--preset", "l24", "--ct2-threads", "2,1"])
    assert (args.shape.hidden, args.shape.decoder_layers, args.shape.source, args.shape.new_tokens) == (1024, 24, 64, 32)
    assert args.case_keys == ["b1", "b8"] and args.ct2_thread_counts == [2, 1]
    labels = [label for label, _ in bench_ct2.engine_runs(args, {})]
    assert "ct2-float32-dnnl t1" in labels and "ct2-float32-dnnl" in labels and labels.count("ours") == 1
    assert bench_ct2.best_ct2({"ours": 1.0, "ct2-float32": 5.0, "ct2-float32-dnnl t1": 2.0}) == \
        "ct2-float32-dnnl t1"
    timed = {"ours-int8": 1.0, "ct2-float32-dnnl": 0.5, "ct2-int8": 4.0, "ct2-int8-dnnl": 3.0}
    assert bench_ct2.best_ct2(timed, bench_ct2._ours_kind("ours-int8")) == "ct2-int8-dnnl"   # like with like
    assert bench_ct2._ours_kind("ours") == bench_ct2._ours_kind("ours, cache filled") == "float32"
    quantized = bench_ct2.parse_args(["--engines", "ours,ours-int8,ours-int4,ct2-int8-dnnl"])
    assert [label for label, _ in bench_ct2.engine_runs(quantized, {})] == ["ours", "ours-int8", "ours-int4",
                                                                           "ct2-int8-dnnl"]
    for bad, message in [(["--ct2-threads", "x"], "--ct2-threads"), (["--cases", "b3"], "--cases"),
                         (["--engines", "ours,ct2-bf16"], "--engines")]:
        with pytest.raises(SystemExit) as e:
            bench_ct2.parse_args(bad)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_ab_bench_times_two_settings_in_one_process_and_checks_their_tokens():
    cmd = [sys.executable, os.path.join(BENCH, "bench_ab.py"), "b1", "generation.PACKING_BUCKETS = 0",
           "generation.PACKING_BUCKETS = 16", "--runs", "1", "--new-tokens", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "B / A, median of paired ratios:" in proc.stdout and "same tokens: True" in proc.stdout
    bad = subprocess.run(cmd[:2] + ["b1", "1 +", "pass"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode == 2 and "setting A is not a Python statement" in bad.stderr


def test_the_ab_bench_times_a_quantized_model_when_asked():
    cmd = [sys.executable, os.path.join(BENCH, "bench_ab.py"), "b32", "cpu_kernels.QUANTIZED_MAX_ROWS = 32",
           "cpu_kernels.QUANTIZED_MAX_ROWS = 8", "--runs", "1", "--new-tokens", "2", "--quantize", "int4",
           "--batch", "12"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "b32 (small, batch 12):" in proc.stdout and "same tokens: True" in proc.stdout
    bad = subprocess.run(cmd[:-3] + ["int3"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode == 2 and "--quantize: invalid choice: 'int3'" in bad.stderr
    bad = subprocess.run(cmd[:-1] + ["0"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode == 2 and "--batch must be at least 1, got 0" in bad.stderr
    bad = subprocess.run(cmd + ["--preset", "l99"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode == 2 and "--preset: invalid choice: 'l99'" in bad.stderr


def test_the_training_bench_checks_a_tiny_step_and_reports_xla_plan_of_our_memory(tmp_path, capsys):
    import bench_train
    out = tmp_path / "train.json"
    code = bench_train.main(["--hidden", "64", "--encoder-layers", "1", "--decoder-layers", "2", "--heads", "2",
                             "--intermediate", "128", "--vocab", "500", "--batch", "4", "--source", "16",
                             "--target", "8", "--runs", "1", "--warmup", "1", "--scan-unroll", "all",
                             "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "PASS" in printed and "scan_unroll all" in printed
    ours = next(r for r in json.loads(out.read_text())["results"] if r["engine"] == "bertgen_flax")
    plan = ours["xla_memory_bytes"]
    assert plan["temp"] > 0 and plan["arguments"] > 0 and plan["aliased"] > 0  # the state is donated
    planned = (plan["temp"] + plan["arguments"] + plan["outputs"] - plan["aliased"]) / 2**30
    assert f"| XLA's plan of the step GiB (temporaries + arguments + outputs - aliased) | - | {planned:.2f} |" in printed


def test_the_training_bench_names_a_bad_scan_unroll():
    import bench_train
    with pytest.raises(SystemExit) as exit_info:
        bench_train.parse_args(["--scan-unroll", "0"])
    assert exit_info.value.code == 2


def test_the_training_bench_times_both_engines_with_dropout_and_skips_the_check(capsys):
    import bench_train
    code = bench_train.main(["--hidden", "64", "--encoder-layers", "1", "--decoder-layers", "1", "--heads", "2",
                             "--intermediate", "128", "--vocab", "500", "--batch", "4", "--source", "16",
                             "--target", "8", "--runs", "1", "--warmup", "1", "--dropout", "0.1"])
    printed = capsys.readouterr().out
    assert code == 0 and "dropout 0.1;" in printed
    assert "check: skipped (dropout" in printed and "| step ms (median of 1) |" in printed


@pytest.mark.parametrize("argv", [["--dropout", "1.0"], ["--dropout", "-0.1"], ["--dropout", "ten"]])
def test_the_training_bench_names_a_bad_dropout_option(argv, capsys):
    import bench_train
    with pytest.raises(SystemExit) as exit_info:
        bench_train.parse_args(argv)
    assert exit_info.value.code == 2 and "--dropout: must be a number in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--train", "--dropout", "1.0"], ["--train", "--dropout", "-0.1"],
                                  ["--train", "--dropout", "ten"], ["--dropout", "0.1"]])
def test_the_flax457_bench_names_a_bad_dropout_option(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_flax457.parse_args(argv)
    assert exit_info.value.code == 2 and "--dropout" in capsys.readouterr().err
