"""The training run's configuration: frozen dataclasses read from TOML or JSON, with ``section.key=value`` overrides.

A config file has up to six tables, each optional (defaults below)::

    [model]  how the weights start: init mode, checkpoint paths, tokenizer, compute dtype
    [data]   training / evaluation pairs (files or the synthetic set), lengths, batch sizes
    [optim]  optimizer, learning-rate schedule, clipping, accumulation, label smoothing
    [run]    output directory, number of steps, logging / evaluation / checkpoint cadence, mesh
    [eval]   generation settings and which metric picks the best checkpoint
    [distributed]  multi-host initialisation (jax.distributed)

Every key is checked: an unknown section or key, a value of the wrong type, or an impossible combination raises
``TrainConfigError`` naming it. Relative paths in a file are taken relative to that file's directory.
"""
from __future__ import annotations

import dataclasses
import json
from collections import abc
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

INIT_MODES = ("checkpoint", "bert2bert", "bertshare", "bert2rnd", "rnd2rnd")
OPTIMIZERS = ("adamw", "adam", "adafactor")
SCHEDULES = ("linear", "inverse_sqrt", "constant")
DTYPES = ("float32", "bfloat16")
SYNTHETIC_TASKS = ("fusion", "split")
METRICS = ("eval_loss", "exact_match", "bleu", "rouge1", "rouge2", "rougeLsum")


class TrainConfigError(ValueError):
    """A training config that cannot run; the message names the key."""


@dataclass(frozen=True)
class ModelSection:
    """``init``: ``checkpoint`` (continue an encoder-decoder checkpoint, HF or native, at ``checkpoint``);
    ``bert2bert`` / ``bertshare`` (encoder and decoder warm-started from the BERT, RoBERTa or BertGeneration
    checkpoint at ``pretrained``; ``bertshare`` ties them, ``tie_encoder_decoder``); ``bert2rnd`` (encoder from
    ``pretrained``, decoder random); ``rnd2rnd`` (both random, shaped like ``pretrained`` or by ``config``).
    ``tokenizer``: a tokenizer directory, ``"word"`` (a whole-word vocabulary built from the training data, for
    models trained from scratch), or empty for the checkpoint's own directory."""

    init: str = "bert2bert"
    pretrained: str = ""
    checkpoint: str = ""
    tokenizer: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)  # BertGenerationConfig fields for rnd2rnd from scratch
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    scan_layers: bool = True
    remat: str = "none"  # recompute layer activations in the backward pass: "none", "full" or "dots"
    scan_unroll: Union[int, str] = "auto"  # layers per scan iteration in training: "auto" (all on a CPU, else 1),
    #                                        "all", or a number; parameters stay stacked either way
    dropout: Optional[float] = None  # overrides hidden and attention dropout when set
    seed: int = 0  # random init of fresh weights (cross-attention, random stacks)
    trim_vocabulary: bool = False  # keep only the pretrained vocabulary's tokens the training data uses


@dataclass(frozen=True)
class DataSection:
    """Pairs come from ``train``/``eval`` files (JSONL or TSV; paths or globs) or, when ``synthetic`` names a task,
    from the built-in generator (``synthetic_train`` + ``synthetic_eval`` distinct pairs)."""

    train: Sequence[str] = ()
    eval: Sequence[str] = ()
    format: str = "auto"
    source_key: str = "source"
    target_key: str = "target"
    synthetic: str = ""
    synthetic_train: int = 20000
    synthetic_eval: int = 500
    synthetic_seed: int = 0
    max_source_length: int = 128
    max_target_length: int = 128
    batch_size: int = 32  # global, over all devices and hosts
    eval_batch_size: int = 64
    seed: int = 0  # shuffling
    cache_dir: str = ""  # default: <output_dir>/cache
    bucket_boundaries: Sequence[int] = ()  # source widths batches are padded to (default: powers of two)
    target_bucket_boundaries: Sequence[int] = ()  # each distinct (source, target) width compiles the step once


@dataclass(frozen=True)
class OptimSection:
    """Optimizer, learning-rate schedule, clipping, accumulation and label smoothing."""
    name: str = "adamw"
    learning_rate: float = 5e-5  # peak rate (linear, constant), or the scale of the inverse_sqrt schedule
    schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    clip_norm: Optional[float] = 1.0
    accumulation_steps: int = 1
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class RunSection:
    """Output directory, length of the run, cadences of logging / evaluation / checkpoints, mesh and outputs."""
    output_dir: str = "out/train"
    steps: int = 1000  # optimizer updates
    seed: int = 0  # dropout rng
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 500
    keep: int = 3
    mesh_data: int = -1  # -1: all devices not used by fsdp
    mesh_fsdp: int = 1
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    export: bool = True  # write the best checkpoint as an HF directory at the end
    async_checkpoints: bool = True


@dataclass(frozen=True)
class EvalSection:
    """Generation settings of the evaluation and the metric that picks the best checkpoint."""
    generate: bool = True  # generation metrics (exact match, BLEU, ROUGE) besides the loss
    max_examples: int = 0  # 0: the whole eval set
    num_beams: int = 1
    max_new_tokens: int = 0  # 0: max_target_length
    best_metric: str = "eval_loss"
    best_mode: str = ""  # "min" or "max"; default by metric


@dataclass(frozen=True)
class DistributedSection:
    """``auto``: ``jax.distributed.initialize()`` with no arguments (TPU pods, SLURM, Open MPI fill them in);
    otherwise a ``coordinator`` address ("host:port") with ``num_processes`` and ``process_id``."""

    auto: bool = False
    coordinator: str = ""
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: Sequence[int] = ()


SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "run": RunSection,
            "eval": EvalSection, "distributed": DistributedSection}


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run: the six sections, validated together."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    eval: EvalSection = field(default_factory=EvalSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str = "") -> "TrainConfig":
        """Builds and validates a config from nested dicts; relative paths resolve against ``base_dir``."""
        if not isinstance(data, Mapping):
            raise TrainConfigError(f"a config must be a table of sections, got {type(data).__name__}")
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise TrainConfigError(f"unknown config section(s) {sorted(unknown)}; sections are {list(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = data.get(name, {})
            if not isinstance(values, Mapping):
                raise TrainConfigError(f"[{name}] must be a table of keys, got {type(values).__name__}")
            sections[name] = _build_section(name, section_cls, values, base_dir)
        config = cls(**sections)
        config.validate()
        return config

    @classmethod
    def load(cls, path: Optional[str], overrides: Sequence[str] = ()) -> "TrainConfig":
        """Reads a ``.toml`` or ``.json`` file (or starts from the defaults when ``path`` is None) and applies
        ``section.key=value`` overrides; a value is parsed as JSON when it can be (numbers, booleans, lists),
        else taken as a string. Override paths resolve against the working directory."""
        data: dict = {}
        base = ""
        if path is not None:
            data, base = read_config_file(path), os.path.dirname(os.path.abspath(path))
        data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
        for item in overrides:
            section, key, value = parse_override(item)
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise TrainConfigError(f"[{section}] must be a table of keys")
            if (section, key) in PATH_KEYS:  # typed on the command line: relative to the working directory
                value = _resolve(value, os.getcwd())
            data[section][key] = value
        config = cls.from_dict(data, base)
        return config

    def replace(self, changes: Mapping[str, Mapping[str, Any]]) -> "TrainConfig":
        """A copy with ``{section: {key: value}}`` changed, checked like a file's values."""
        data = self.to_dict()
        for section, values in changes.items():
            data.setdefault(section, {}).update(values)
        return TrainConfig.from_dict(data)

    def to_dict(self) -> dict:
        """Plain nested dicts (lists for sequences), as a JSON config file holds them."""
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}

    # ---- checks -----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raises ``TrainConfigError`` naming the first key that cannot work."""
        m, d, o, r, e, dist = self.model, self.data, self.optim, self.run, self.eval, self.distributed
        _choice("model.init", m.init, INIT_MODES)
        _choice("model.dtype", m.dtype, DTYPES)
        if m.init == "checkpoint" and not m.checkpoint:
            raise TrainConfigError("model.init = 'checkpoint' needs model.checkpoint (an encoder-decoder directory)")
        if m.init in ("bert2bert", "bertshare", "bert2rnd") and not m.pretrained:
            raise TrainConfigError(f"model.init = {m.init!r} needs model.pretrained (a BERT, RoBERTa or "
                                   "BertGeneration checkpoint directory, or 'minilm')")
        if m.init == "rnd2rnd" and not m.pretrained and not m.config:
            raise TrainConfigError("model.init = 'rnd2rnd' needs model.pretrained (for its shape and vocabulary) "
                                   "or model.config (hidden_size, num_hidden_layers, ...)")
        if m.init == "rnd2rnd" and not m.pretrained and not m.tokenizer:
            raise TrainConfigError("model.init = 'rnd2rnd' without model.pretrained needs model.tokenizer "
                                   "(a tokenizer directory, or 'word' to build one from the training data)")
        if m.config and m.init != "rnd2rnd":
            raise TrainConfigError("model.config only shapes models trained from scratch (model.init = 'rnd2rnd')")
        if m.trim_vocabulary and (not m.pretrained or m.tokenizer):
            raise TrainConfigError("model.trim_vocabulary trims the vocabulary of model.pretrained (a WordPiece "
                                   "checkpoint) and uses its tokenizer: set model.pretrained and leave "
                                   "model.tokenizer empty")
        if m.dropout is not None and not 0.0 <= m.dropout < 1.0:
            raise TrainConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
        if m.remat not in ("none", "full", "dots"):
            raise TrainConfigError(f"model.remat must be 'none', 'full' or 'dots', got {m.remat!r}")
        if m.scan_unroll not in ("auto", "all") and not (isinstance(m.scan_unroll, int) and m.scan_unroll >= 1):
            raise TrainConfigError(f"model.scan_unroll must be 'auto', 'all' or a number >= 1, got {m.scan_unroll!r}")
        if d.synthetic:
            _choice("data.synthetic", d.synthetic, SYNTHETIC_TASKS)
            if d.train or d.eval:
                raise TrainConfigError("give data.synthetic or data.train/data.eval files, not both")
            _positive("data.synthetic_train", d.synthetic_train)
            _positive("data.synthetic_eval", d.synthetic_eval)
        elif not d.train:
            raise TrainConfigError("no training data: set data.train (JSONL/TSV files or globs) or "
                                   "data.synthetic = 'fusion' | 'split'")
        _choice("data.format", d.format, ("auto", "jsonl", "tsv"))
        for key in ("max_source_length", "max_target_length", "batch_size", "eval_batch_size"):
            _positive(f"data.{key}", getattr(d, key))
        if d.max_target_length < 2:
            raise TrainConfigError("data.max_target_length must be >= 2 (one token plus the end token)")
        if not r.output_dir:
            raise TrainConfigError("run.output_dir must be set")
        _positive("run.steps", r.steps)
        _choice("optim.name", o.name, OPTIMIZERS)
        _choice("optim.schedule", o.schedule, SCHEDULES)
        if not o.learning_rate > 0:
            raise TrainConfigError(f"optim.learning_rate must be > 0, got {o.learning_rate}")
        if o.warmup_steps < 0:  # a linear warm-up longer than the run is cut at run.steps
            raise TrainConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        if o.schedule == "inverse_sqrt" and o.warmup_steps <= 0:
            raise TrainConfigError("optim.schedule = 'inverse_sqrt' needs optim.warmup_steps > 0")
        if o.clip_norm is not None and not o.clip_norm > 0:
            raise TrainConfigError(f"optim.clip_norm must be > 0 (or omitted), got {o.clip_norm}")
        _positive("optim.accumulation_steps", o.accumulation_steps)
        if not 0.0 <= o.label_smoothing < 1.0:
            raise TrainConfigError(f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
        _positive("run.log_every", r.log_every)
        _positive("run.save_every", r.save_every)
        _positive("run.keep", r.keep)
        for key in ("eval_every",):
            if getattr(r, key) < 0:
                raise TrainConfigError(f"run.{key} must be >= 0, got {getattr(r, key)}")
        if r.mesh_fsdp < 1 or (r.mesh_data < 1 and r.mesh_data != -1):
            raise TrainConfigError(f"run.mesh_data ({r.mesh_data}) must be -1 or >= 1 and run.mesh_fsdp "
                                   f"({r.mesh_fsdp}) >= 1")
        _choice("eval.best_metric", e.best_metric, METRICS)
        if e.best_mode:
            _choice("eval.best_mode", e.best_mode, ("min", "max"))
        if e.best_metric != "eval_loss" and not e.generate:
            raise TrainConfigError(f"eval.best_metric = {e.best_metric!r} needs eval.generate = true")
        _positive("eval.num_beams", e.num_beams)
        if e.max_examples < 0 or e.max_new_tokens < 0:
            raise TrainConfigError("eval.max_examples and eval.max_new_tokens must be >= 0")
        if dist.coordinator and dist.auto:
            raise TrainConfigError("give distributed.auto or distributed.coordinator, not both")
        if dist.coordinator and not 0 <= dist.process_id < dist.num_processes:
            raise TrainConfigError(f"distributed.process_id ({dist.process_id}) must be in "
                                   f"[0, num_processes={dist.num_processes})")

    @property
    def best_mode(self) -> str:
        """``min`` for the eval loss, ``max`` for generation metrics, unless ``eval.best_mode`` says."""
        return self.eval.best_mode or ("min" if self.eval.best_metric == "eval_loss" else "max")

    @property
    def cache_dir(self) -> str:
        """Where tokenized data is cached (``data.cache_dir`` or ``<output_dir>/cache``)."""
        return self.data.cache_dir or os.path.join(self.run.output_dir, "cache")


# keys holding paths: resolved against the config file's directory
PATH_KEYS = {("model", "pretrained"), ("model", "checkpoint"), ("model", "tokenizer"), ("data", "train"),
             ("data", "eval"), ("data", "cache_dir"), ("run", "output_dir")}
_NOT_PATHS = {"", "word", "minilm"}  # names with a meaning of their own


def _resolve(value: Any, base: str) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_resolve(v, base) for v in value)
    if not isinstance(value, str) or value in _NOT_PATHS or os.path.isabs(value) or not base:
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _build_section(name: str, section_cls: type, values: Mapping[str, Any], base_dir: str) -> Any:
    hints = typing.get_type_hints(section_cls)
    known = [f.name for f in dataclasses.fields(section_cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise TrainConfigError(f"unknown key {name}.{key}; [{name}] keys are {', '.join(known)}")
        value = _coerce(f"{name}.{key}", hints[key], value)
        if (name, key) in PATH_KEYS:
            value = _resolve(value, base_dir)
        kwargs[key] = value
    return section_cls(**kwargs)


def _coerce(where: str, hint: Any, value: Any) -> Any:
    """``value`` checked against the field's type (ints widen to floats; a string path becomes a 1-tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X], or one of several types (the first that takes the value)
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:
            return _coerce(where, options[0], value)
        for option in options:
            try:
                return _coerce(where, option, value)
            except TrainConfigError:
                pass
        names = " or ".join({int: "an integer", str: "a string", float: "a number"}.get(o, str(o)) for o in options)
        raise TrainConfigError(f"{where} must be {names}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TrainConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TrainConfigError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TrainConfigError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TrainConfigError(f"{where} must be a string, got {value!r}")
    if origin is abc.Sequence:
        items = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
        if not isinstance(items, (list, tuple)):
            raise TrainConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(where, args[0], v) for v in items)
    if origin is abc.Mapping:
        if not isinstance(value, Mapping):
            raise TrainConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    return value


def _choice(where: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        raise TrainConfigError(f"{where} must be one of {', '.join(map(repr, options))}; got {value!r}")


def _positive(where: str, value: int) -> None:
    if value < 1:
        raise TrainConfigError(f"{where} must be >= 1, got {value}")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_config_file(path: str) -> dict:
    """A ``.toml`` or ``.json`` training config as nested dicts, with errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training config not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            import tomllib
            with open(path, "rb") as f:
                return tomllib.load(f)
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise TrainConfigError(f"{path} must hold a JSON object of sections")
            return data
    except (ValueError, UnicodeDecodeError) as e:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        if isinstance(e, TrainConfigError):
            raise
        raise TrainConfigError(f"{path} is not valid {ext[1:].upper()}: {e}") from None
    raise TrainConfigError(f"{path}: a training config must be a .toml or .json file")


def parse_override(item: str) -> tuple[str, str, Any]:
    """``"optim.learning_rate=1e-4"`` -> ``("optim", "learning_rate", 1e-4)``."""
    if "=" not in item:
        raise TrainConfigError(f"override {item!r} must look like section.key=value")
    name, text = item.split("=", 1)
    if name.count(".") != 1 or not all(name.split(".")):
        raise TrainConfigError(f"override {item!r}: the key must be section.key (e.g. optim.learning_rate)")
    section, key = name.strip().split(".")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return section, key, value


__all__ = ["TrainConfig", "TrainConfigError", "ModelSection", "DataSection", "OptimSection", "RunSection",
           "EvalSection", "DistributedSection", "INIT_MODES", "parse_override", "read_config_file"]
