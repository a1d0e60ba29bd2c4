"""The Colab notebook (colab/bertgen_flax.ipynb) runs top to bottom in a Jupyter kernel on this interpreter, with
CI-sized parameters injected after its ``parameters`` cell, as papermill would do; any cell that raises fails."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colab" / "bertgen_flax.ipynb"
KERNEL_NAME = "bertgen-colab-test"
CELL_TIMEOUT = 600  # seconds per cell; the whole notebook takes a few minutes on 2 CPU cores

# The notebook's defaults are already CI-sized; the test restates the ones it relies on and moves OUT.
CI_PARAMETERS = dict(TRAIN_STEPS=30, SYNTHETIC_TRAIN=2000, SYNTHETIC_EVAL=16, BATCH_SIZE=16, LEARNING_RATE=6e-4,
                     DROPOUT=0.0, MAX_NEW_TOKENS=12, TIMING_BATCH=8, ONLINE=False)


def _read() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_index(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def _inject(nb: nbformat.NotebookNode, values: dict) -> None:
    """Inserts a cell assigning ``values`` right after the parameters cell (papermill's 'injected-parameters')."""
    source = "# injected by tests/test_colab.py\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(_parameters_index(nb) + 1, cell)


def _kernel_spec(jupyter_path: Path) -> None:
    """A kernelspec that starts ipykernel with this interpreter (the dev venv's python), found via JUPYTER_PATH."""
    spec_dir = jupyter_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"bertgen test ({sys.executable})", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")


def _text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_the_stored_notebook_is_valid_and_has_no_outputs():
    nb = _read()
    nbformat.validate(nb)
    params = nb.cells[_parameters_index(nb)]
    assert params.cell_type == "code"
    defined = {line.split("=")[0].strip() for line in params.source.splitlines() if "=" in line}
    assert set(CI_PARAMETERS) | {"OUT"} <= defined, defined
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "commit the notebook without outputs"


def test_the_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    jupyter_path, work, out = tmp_path / "jupyter", tmp_path / "work", tmp_path / "work" / "colab_out"
    work.mkdir()
    _kernel_spec(jupyter_path)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # other test modules simulate 8 CPU devices; the notebook sees what a user sees
    env.pop("BERTGEN_REPO", None)  # the package is installed: the install cell must not reinstall it
    env["MPLBACKEND"] = "Agg"

    nb = _read()
    _inject(nb, {**CI_PARAMETERS, "OUT": str(out)})
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT, allow_errors=False,
                            resources={"metadata": {"path": str(work)}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell, when any cell raises

    text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert f"python at {sys.executable}" in text  # the kernel runs this interpreter
    assert "accelerator: " in text
    assert "pip install" not in text, "the install cell installed something although everything is there"
    assert "max |param difference| = 0.0" in text
    assert "parity OK" in text
    assert "ratio" in text and "transformers (PyTorch CPU)" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the loss curve was not displayed"
    for path in ("bert2bert-hf/model.safetensors", "bert2bert-native/bertgen_native.json", "train/curves.png",
                 "train/metrics.jsonl", "train/export/config.json"):
        assert (out / path).exists(), path
    losses = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in losses if r["split"] == "train"]
    assert len(train_losses) >= 2 and train_losses[-1] < train_losses[0], train_losses
    predictions = [json.loads(line) for f in sorted((out / "train" / "predictions").iterdir())
                   for line in f.read_text(encoding="utf-8").splitlines()]
    assert any(p["prediction"].strip() for p in predictions), "30 steps should already produce some words"
    shutil.rmtree(out)  # about 1 GB of checkpoints; kept only when the test fails
