"""Observing a training run: a metrics log (JSONL plus TensorBoard), curve plots, and a progress bar.

The JSONL file is the durable record (one flushed line per call, so a killed run keeps what it logged);
TensorBoard and the PNG plots are views of the same numbers.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from tqdm import tqdm

from ..fileio import PathLike, atomic_file

__all__ = ["MetricsLog", "read_metrics", "plot_curves", "plot_comparison", "ProgressBar", "METRICS_FILE",
           "TENSORBOARD_DIR"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
GENERATION_KEYS = ("exact_match", "bleu", "rouge1", "rouge2", "rougeLsum")
LEARNING_RATE_KEYS = ("learning_rate", "lr")
_RESERVED = ("step", "split")


# ----------------------------------------------------------------------------------------------------- reading

def _parse_lines(text: str, path: str) -> list[dict]:
    """Records of a JSONL text. A final line without its newline that does not parse is a write cut short by a
    killed run and is dropped; any other bad line is an error."""
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # the torn tail: no newline after it
                break
            raise ValueError(f"{path}:{number}: not valid JSON: {e}") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def read_metrics(path: PathLike) -> list[dict]:
    """The records of a metrics JSONL file, in file order (a torn final line is skipped)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        return _parse_lines(f.read(), path)


def _write_records(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Replaces ``path`` atomically with ``records``, one JSON object a line."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _prepare_existing(path: str, resume_step: Optional[int]) -> None:
    """Makes an existing log ready to append to: drops records after ``resume_step`` (a resumed run logs those
    steps again) and a torn final line; rewrites the file only when something must go."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    torn = bool(text) and not text.endswith("\n")
    if resume_step is None and not torn:
        return
    records = _parse_lines(text, path)
    if resume_step is not None:
        records = [r for r in records if r.get("step", -1) <= resume_step]
    _write_records(path, records)


# ----------------------------------------------------------------------------------------------------- logging

def _scalar(name: str, value: Any) -> float:
    """``value`` as a Python float (accepts numbers, numpy and JAX scalars); TypeError otherwise."""
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {name!r} is not a scalar number: {value!r}") from e


class MetricsLog:
    """Appends ``{"step", "split", **metrics}`` lines to ``directory/metrics.jsonl`` and, with ``tensorboard``,
    the same numbers as scalars ``split/name`` to ``directory/tensorboard/``.

    An existing log is continued, not replaced. With ``resume_step`` the records with a later step are dropped
    first (and TensorBoard is told to purge its events after that step), so a resumed run leaves no duplicates.
    """

    def __init__(self, directory: PathLike, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, METRICS_FILE)
        os.makedirs(self.directory, exist_ok=True)
        _prepare_existing(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            self._writer = self._summary_writer(None if resume_step is None else resume_step + 1)

    def _summary_writer(self, purge_step: Optional[int]):
        """A tensorboardX writer for ``directory/tensorboard``; events at or after ``purge_step`` are hidden."""
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            self._file.close()
            raise ImportError("TensorBoard logging needs the tensorboardX package: pip install "
                              "'tensorboardX>=2.6' (or pass tensorboard=False)") from e
        # tensorboardX names event files by the second and opens them with "wb": a second writer in the same
        # second would truncate the first one's file. A nanosecond suffix keeps names unique and in time order
        # (TensorBoard reads the files sorted by name, and the purge must come after the events it hides).
        suffix = f".{time.time_ns():020d}.{os.getpid()}"
        return SummaryWriter(logdir=os.path.join(self.directory, TENSORBOARD_DIR), purge_step=purge_step,
                             filename_suffix=suffix)

    def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict:
        """Records ``metrics`` (scalars, stored as floats) for ``step`` of ``split`` (``"train"`` or
        ``"eval"``); the JSONL line is flushed at once. Returns the record written."""
        if self._file.closed:
            raise ValueError(f"MetricsLog for {self.path} is closed")
        if not isinstance(split, str) or not split or "/" in split:
            raise ValueError(f"split must be a non-empty name without '/', e.g. 'train' or 'eval'; got {split!r}")
        clash = [k for k in metrics if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the record's own fields")
        values = {name: _scalar(name, value) for name, value in metrics.items()}
        record = {"step": int(step), "split": split, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{split}/{name}", value, int(step))
            self._writer.flush()
        return record

    def close(self) -> None:
        """Flushes and closes the JSONL file and the TensorBoard writer; closing twice is harmless."""
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------- plotting

def _series(records: Sequence[Mapping[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` in the ``split`` records that have it, in step order."""
    points = sorted((r["step"], r[key]) for r in records if r.get("split") == split and key in r)
    return [s for s, _ in points], [v for _, v in points]


def _learning_rate_key(records: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """The name the training records use for the learning rate, if they log one."""
    for key in LEARNING_RATE_KEYS:
        if any(r.get("split") == "train" and key in r for r in records):
            return key
    return None


def _panels(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The panels to draw as ``(y label, [(legend label, split, key), ...])``, only those with data."""
    panels = []
    loss = [(f"{split} loss", split, "loss") for split in ("train", "eval") if _series(records, split, "loss")[0]]
    if loss:
        panels.append(("loss", loss))
    generation = [(key, "eval", key) for key in GENERATION_KEYS if _series(records, "eval", key)[0]]
    if generation:
        panels.append(("eval score (0-100)", generation))
    lr_key = _learning_rate_key(records)
    if lr_key is not None:
        panels.append(("learning rate", [("learning rate", "train", lr_key)]))
    return panels


def _new_figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, png_path: PathLike) -> str:
    """Renders ``figure`` to ``png_path`` through a temporary sibling file, so readers never see half a PNG."""
    png_path = os.fspath(png_path)
    with atomic_file(png_path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    return png_path


def plot_curves(jsonl_path: PathLike, png_path: PathLike, title: Optional[str] = None) -> str:
    """Draws one run's curves from its metrics JSONL: loss (train, and eval if logged), the eval generation
    scores and the learning rate, each against the step, in stacked panels. Returns the PNG path."""
    records = read_metrics(jsonl_path)
    panels = _panels(records)
    if not panels:
        raise ValueError(f"{os.fspath(jsonl_path)}: no loss, generation score or learning rate to plot")
    figure = _new_figure(7.0, 2.8 * len(panels))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, lines) in zip(axes, panels):
        for label, split, key in lines:
            steps, values = _series(records, split, key)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    if title:
        figure.suptitle(title)
    return _save_png(figure, png_path)


def plot_comparison(curves: Mapping[str, PathLike], png_path: PathLike, metric: str = "loss",
                    split: str = "train", title: Optional[str] = None) -> str:
    """Draws ``metric`` of ``split`` against the step for several runs on one axes, one line per label (e.g.
    warm-started vs randomly initialised). Returns the PNG path."""
    if not curves:
        raise ValueError("no runs to compare")
    figure = _new_figure(7.0, 4.0)
    ax = figure.subplots()
    for label, path in curves.items():
        steps, values = _series(read_metrics(path), split, metric)
        if not steps:
            raise ValueError(f"run {label!r} ({os.fspath(path)}) logged no {split} {metric!r}")
        ax.plot(steps, values, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{split} {metric}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or f"{split} {metric}")
    return _save_png(figure, png_path)


# ---------------------------------------------------------------------------------------------------- progress

class ProgressBar:
    """A tqdm bar on stderr showing step/total, loss, learning rate, steps/s and target tokens/s.

    Rates are measured over the interval since the previous ``update``. ``disable`` hides the bar; ``write``
    still prints its messages. ``clock`` (seconds) can be replaced in tests.
    """

    _FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"

    def __init__(self, total: Optional[int], initial: int = 0, disable: bool = False, *,
                 clock: Callable[[], float] = time.monotonic):
        self._file = sys.stderr
        self._clock = clock
        self._step = initial
        self._time = clock()
        self._bar = tqdm(total=total, initial=initial, disable=disable, file=self._file, unit="step",
                         dynamic_ncols=True, bar_format=self._FORMAT)

    def update(self, step: int, loss: Optional[float] = None, lr: Optional[float] = None,
               tokens: Optional[int] = None) -> None:
        """Moves the bar to ``step``; ``tokens`` is the number of target tokens processed since the last
        update, for the tokens/s figure."""
        step = int(step)
        if step < self._step:
            raise ValueError(f"step went backwards: {step} after {self._step}")
        now = self._clock()
        elapsed, steps = now - self._time, step - self._step
        self._time, self._step = now, step
        self._bar.set_postfix_str(_postfix(loss, lr, steps, tokens, elapsed), refresh=False)
        if steps:
            self._bar.update(steps)
        else:
            self._bar.refresh()

    def write(self, message: str) -> None:
        """Prints ``message`` on its own line above the bar."""
        tqdm.write(message, file=self._file)

    def close(self) -> None:
        """Draws the final state and releases the bar."""
        self._bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _postfix(loss: Optional[float], lr: Optional[float], steps: int, tokens: Optional[int],
             elapsed: float) -> str:
    """The bar's right-hand text: ``loss=…, lr=…, step/s=…, tok/s=…`` for the figures that are known."""
    parts = []
    if loss is not None:
        parts.append(f"loss={float(loss):.4f}")
    if lr is not None:
        parts.append(f"lr={float(lr):.3g}")
    if elapsed > 0 and math.isfinite(elapsed):
        parts.append(f"step/s={steps / elapsed:.3g}")
        if tokens is not None:
            parts.append(f"tok/s={tqdm.format_sizeof(float(tokens) / elapsed)}")
    return ", ".join(parts)
