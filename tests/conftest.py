"""Shared fixtures: tiny random transformers checkpoints (PyTorch, float32) and the 4.57 reference venv."""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # the parity tolerance the project promises (float32, CPU)

# One JAX compilation cache for this test run, shared by the suite and every process it starts (the training program,
# the demo, bench scripts): a program one process compiled is loaded by the next instead of compiled again (a tiny
# training run: 39 s cold, 15 s warm). It is new for each run, so no run depends on an earlier one; set before any
# test module imports jax, which reads it then. Tests about the cache itself pass their own directory.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="bertgen-tests-xla-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
atexit.register(shutil.rmtree, _COMPILATION_CACHE, True)

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)


def free_port() -> int:
    """A localhost port free right now (for a jax.distributed coordinator in tests)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def perturb_(model, seed: int = 0, scale: float = 0.1) -> None:
    """Adds noise to every parameter so biases and LayerNorms are not at their trivial init values."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def max_diff(a, b, mask=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b.detach().numpy() if hasattr(b, "detach") else b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.abs(a - b)
    if mask is not None:
        d = d[np.asarray(mask, bool)]
    return float(d.max())


def tf457_python() -> str:
    """Path of the transformers 4.57 venv's python; skips (locally) or fails (CI) when it is absent."""
    path = os.environ.get("BERTGEN_TF457_PYTHON", str(REPO / ".venv-tf457" / "bin" / "python"))
    if not os.path.exists(path):
        msg = f"transformers 4.57 venv not found at {path} (scripts/install.sh builds it)"
        if os.environ.get("BERTGEN_REQUIRE_TF457") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def run_tf457(script: str, *args: str) -> str:
    """Runs a script under transformers 4.57 and returns its stdout; its failure fails the test."""
    proc = subprocess.run([tf457_python(), "-c", script, *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"transformers 4.57 script failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


@pytest.fixture(scope="session")
def tiny():
    return dict(TINY)


def seq2seq_checkpoint(path, seed: int = 0, scale: float = 0.1, enc: dict | None = None, dec: dict | None = None):
    """A perturbed random transformers bert2bert (start id 2, pad 0) saved at ``path``; returns it in eval mode."""
    import torch
    import transformers
    torch.manual_seed(seed)
    encoder = transformers.BertGenerationEncoder(transformers.BertGenerationConfig(**{**TINY, **(enc or {})}))
    decoder = transformers.BertGenerationDecoder(transformers.BertGenerationConfig(
        **{**TINY, **(dec or {})}, is_decoder=True, add_cross_attention=True))
    model = transformers.EncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id, model.config.pad_token_id = 2, 0
    perturb_(model, seed, scale)
    model.eval()
    if path is not None:
        model.save_pretrained(path)
    return model


def traced_peak(fn):
    """``fn()`` and the peak of the memory Python and numpy allocated meanwhile (tracemalloc sees numpy's arrays,
    not XLA's buffers nor mapped file pages)."""
    import tracemalloc
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def wide_checkpoint(path) -> int:
    """A bert2bert whose layers outweigh its embeddings (hidden 256, 4+4 layers, ~30 MB) saved at ``path``, for
    memory measurements; returns the size of its weight file."""
    wide = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    seq2seq_checkpoint(path, enc=wide, dec=wide)
    return os.path.getsize(os.path.join(path, "model.safetensors"))


def torch_state_dict(directory) -> dict:
    """The weights of an HF checkpoint directory as a PyTorch state dict (to write a ``pytorch_model.bin``)."""
    import torch
    from bertgen_flax import checkpoints
    return {k: torch.from_numpy(v) for k, v in checkpoints.load_state_dict(str(directory)).items()}


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a user's environment where any import of torch fails."""
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
                          capture_output=True, text=True, env=user_env())


def user_env() -> dict:
    """The environment a user's shell would give a subprocess: no simulated devices from other test modules."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    return env


FUSION_TINY_STEPS = 500


@pytest.fixture(scope="session")
def fusion_tiny_run(tmp_path_factory) -> Path:
    """The shipped recipe train/fusion_tiny.toml (Rnd2Rnd, hidden 128, 2+2 layers) shortened to 500 steps and run
    by `bertgen train` as a user runs it: evaluated once at the end on its 500 held-out fusions, exported with its
    tokenizer. Returns the output directory. Shared: training it takes about a minute on a 2-core CPU."""
    out = tmp_path_factory.mktemp("fusion-tiny") / "run"
    proc = subprocess.run([sys.executable, "-m", "bertgen_flax", "train", "--config",
                           str(REPO / "train" / "fusion_tiny.toml"), "--quiet", f"run.output_dir={out}",
                           f"run.steps={FUSION_TINY_STEPS}", "run.eval_every=0", "run.log_every=50",
                           f"run.save_every={FUSION_TINY_STEPS}", "run.plot=false"],
                          capture_output=True, text=True, timeout=900, env=user_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
