"""Workload definitions shared by the benchmark scripts: model shapes and presets, cases, and the random ragged
inputs and training batches.

Standard library and numpy only (no jax, torch or transformers), so that ``bench_flax457.py``, which runs in the
transformers 4.57 venv, builds exactly the same inputs as ``bench_generate.py`` and ``bench_train.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

DECODER_START, PAD, EOS = 2, 0, 1
FIRST_SOURCE_ID = 5  # source ids (and labels) are drawn from [5, vocab): no pad, eos or start token inside


# ---- generation -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """Model and generation workload shape."""

    hidden: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    source: int       # source length; rows are ragged (padded on the right) below it
    new_tokens: int   # forced: min_new_tokens == max_new_tokens


PRESETS: dict[str, Shape] = {
    # the CPU anchor's shape (/work/shared/reference/anchors.md): hidden 256, 4+4 layers, vocab 8000
    "small": Shape(hidden=256, encoder_layers=4, decoder_layers=4, heads=4, intermediate=1024, vocab=8000,
                   max_positions=512, source=64, new_tokens=32),
    # the Google bert2bert L-24 checkpoints' shape; meant for a GPU
    "l24": Shape(hidden=1024, encoder_layers=24, decoder_layers=24, heads=16, intermediate=4096, vocab=50358,
                 max_positions=512, source=128, new_tokens=64),
}


@dataclass(frozen=True)
class Case:
    label: str
    batch: int
    beams: int


CASES: dict[str, Case] = {
    "b1": Case("batch 1 greedy", 1, 1),
    "b32": Case("batch 32 greedy", 32, 1),
    "b128": Case("batch 128 greedy", 128, 1),
    "b32-beam4": Case("batch 32, 4 beams", 32, 4),
}


def make_inputs(batch: int, source: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random source ids [batch, source] with ragged right padding (row i keeps source - 7i mod source/2)."""
    rng = np.random.default_rng(seed + batch)
    ids = rng.integers(FIRST_SOURCE_ID, vocab, (batch, source)).astype(np.int64)
    mask = np.ones_like(ids)
    for i in range(batch):
        keep = source - (i * 7) % max(1, source // 2)
        ids[i, keep:], mask[i, keep:] = PAD, 0
    return ids, mask


# ---- training -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainShape:
    """Model and training-batch shape."""

    hidden: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    batch: int
    source: int   # source length; rows are ragged (right-padded) below it
    target: int   # label length; rows are ragged (-100 after each row's end) below it


TRAIN_PRESETS: dict[str, TrainShape] = {
    # the CPU anchors' model shape (/work/shared/reference/anchors.md): hidden 256, 4+4 layers, vocab 8000
    "small": TrainShape(hidden=256, encoder_layers=4, decoder_layers=4, heads=4, intermediate=1024, vocab=8000,
                        max_positions=512, batch=8, source=64, target=32),
    # the anchor training step's shape: Google's L-24 bert2bert, batch 32, 512 source / 128 target tokens; a GPU
    "l24": TrainShape(hidden=1024, encoder_layers=24, decoder_layers=24, heads=16, intermediate=4096, vocab=50358,
                      max_positions=512, batch=32, source=512, target=128),
}


def make_batch(shape: TrainShape, seed: int) -> dict[str, np.ndarray]:
    """Random ids with ragged right padding: source row i keeps ``S - (7 i mod S/2)`` tokens, label row i keeps
    ``T - (5 i mod T/2)`` labels (-100 after them)."""
    rng = np.random.default_rng(seed)
    b, s, t = shape.batch, shape.source, shape.target
    ids = rng.integers(FIRST_SOURCE_ID, shape.vocab, (b, s)).astype(np.int64)
    mask = np.ones_like(ids)
    labels = rng.integers(FIRST_SOURCE_ID, shape.vocab, (b, t)).astype(np.int64)
    for i in range(b):
        keep_s = s - (7 * i) % max(1, s // 2)
        keep_t = t - (5 * i) % max(1, t // 2)
        ids[i, keep_s:], mask[i, keep_s:] = PAD, 0
        labels[i, keep_t:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- arguments ------------------------------------------------------------------------------------------------
def add_shape_args(p: argparse.ArgumentParser, shape_cls: type) -> None:
    """``--hidden``, ``--encoder-layers``, ...: one override flag per field of ``shape_cls``."""
    for field in dataclasses.fields(shape_cls):
        p.add_argument("--" + field.name.replace("_", "-"), type=int, default=None,
                       help=f"override the preset's {field.name}")


def apply_shape_args(args: argparse.Namespace, preset: Any) -> Any:
    """The preset with the given overrides applied."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(preset)
                 if getattr(args, f.name) is not None}
    return dataclasses.replace(preset, **overrides)


def dropout_rate(text: str) -> float:
    """``--dropout``'s argparse type: a probability in [0, 1) (1 would drop everything)."""
    try:
        rate = float(text)
    except ValueError:
        rate = float("nan")  # fails the range check below, with the same message
    if not 0.0 <= rate < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return rate


def shape_flags(shape: Any) -> list[str]:
    """The command-line flags that reproduce ``shape`` exactly (for a script run in a subprocess)."""
    flags = []
    for field in dataclasses.fields(shape):
        flags += ["--" + field.name.replace("_", "-"), str(getattr(shape, field.name))]
    return flags
