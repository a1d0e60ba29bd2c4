"""`bertgen demo`, the README's main command, end to end at a tiny number of steps."""
import os
import subprocess
import sys

from conftest import REPO


def test_the_demo_trains_exports_and_transformers_generates_the_same_tokens(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "bertgen_flax", "demo", "--out", str(out), "--steps", "4",
                           "--eval-examples", "8", "--quiet"], capture_output=True, text=True, timeout=900,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out fusions (8): exact match" in proc.stdout
    assert "transformers' generate gives the same tokens for all 6 inputs" in proc.stdout
    assert f"Artefacts in {out}" in proc.stdout
    for name in ("export/model.safetensors", "export/tokenizer.json", "curves.png", "metrics.jsonl",
                 "predictions/step-00000004.jsonl", "checkpoints/4"):
        assert (out / name).exists(), name


def test_the_demo_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "bertgen_flax", "demo", "--out", str(tmp_path), "--steps", "1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "not a previous demo's output folder" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
