"""The training program: config -> data, model, mesh, optimizer -> resumable, observable train loop -> export.

``train(config)`` is what ``bertgen train`` runs. One code path from one CPU to many hosts:

* every process reads the same data and walks the same batch plan (same seed); each feeds its own rows of the
  global batch (``jax.make_array_from_process_local_data``), and the step runs over the whole ``data`` x ``fsdp``
  mesh with parameters and optimizer state sharded by the FSDP rule;
* checkpoints (orbax, async) hold the state (params, optimizer, step, rng) and the iterator position; a run
  restarted with the same config continues from the latest complete one and ends bit-identical to a run that
  was never interrupted;
* SIGTERM saves a checkpoint at the current step and returns cleanly; a NaN/inf loss skips the update (in the
  step), stops the run with a message, and leaves the last good checkpoint as the latest;
* process 0 writes the metrics (JSONL + TensorBoard), the predictions of each evaluation, the plot and the export.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import BertGenerationConfig, EncoderDecoderConfig
from ..fileio import atomic_file
from . import data as data_lib
from . import optim, sharding as shard_lib, step as step_lib
from .checkpointing import Checkpointer
from .config import TrainConfig, TrainConfigError

STOP_FINISHED, STOP_SIGTERM, STOP_NONFINITE = "finished", "sigterm", "nonfinite"


class TrainingError(RuntimeError):
    """The run could not continue (non-finite loss); the message says what is intact on disk."""


@dataclasses.dataclass
class TrainResult:
    """What a run did: how it ended, the step it reached, the last metrics and where its outputs are."""

    stopped: str
    step: int
    output_dir: str
    train_metrics: dict
    eval_metrics: dict
    export_dir: Optional[str] = None
    best_step: Optional[int] = None


# ---------------------------------------------------------------------------------------------------------------
# Set-up pieces
# ---------------------------------------------------------------------------------------------------------------
def init_distributed(config: TrainConfig) -> None:
    """``jax.distributed.initialize`` as the config asks (once per process; a no-op for one process)."""
    d = config.distributed
    if not d.auto and not d.coordinator:
        return
    if jax.distributed.is_initialized():
        return
    if d.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=d.coordinator, num_processes=d.num_processes,
                                   process_id=d.process_id,
                                   local_device_ids=list(d.local_device_ids) or None)


def _resolve_checkpoint(path: str) -> str:
    from ..cli import resolve_source
    resolved = resolve_source(path)
    if not os.path.isdir(resolved):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    return resolved


def load_pairs(config: TrainConfig) -> tuple[Optional[list], Optional[list]]:
    """In-memory (train, eval) pairs for the synthetic set; (None, None) when the data comes from files."""
    d = config.data
    if not d.synthetic:
        return None, None
    pairs = data_lib.synthetic_pairs(d.synthetic_train + d.synthetic_eval, task=d.synthetic, seed=d.synthetic_seed)
    return pairs[:d.synthetic_train], pairs[d.synthetic_train:]


def build_tokenizer(config: TrainConfig, train_pairs: Optional[list]) -> Any:
    """The tokenizer named by ``model.tokenizer`` (default: the checkpoint's), or a whole-word one built from
    the training data and saved under the output directory."""
    from ..tokenization import AutoTokenizer
    m = config.model
    if m.tokenizer == "word":
        if train_pairs is None:
            train_pairs = data_lib.read_pairs(list(config.data.train), format=config.data.format,
                                              source_key=config.data.source_key, target_key=config.data.target_key)
        texts = [t for pair in train_pairs for t in pair]
        return data_lib.word_tokenizer(texts, os.path.join(config.run.output_dir, "tokenizer"))
    path = m.tokenizer or (m.checkpoint if m.init == "checkpoint" else m.pretrained)
    return AutoTokenizer.from_pretrained(_resolve_checkpoint(path))


def trimmed_vocabulary(config: TrainConfig, train_pairs: Optional[list], lead: bool) -> TrainConfig:
    """The config with ``model.pretrained`` replaced by a copy trimmed to the training data's tokens (written by
    process 0 under the output directory; rebuilt identically on resume)."""
    from ..vocab import trim_vocabulary
    if train_pairs is None:
        d = config.data
        train_pairs = data_lib.read_pairs(list(d.train), format=d.format, source_key=d.source_key,
                                          target_key=d.target_key)
    out = os.path.join(os.path.abspath(config.run.output_dir), "trimmed-vocabulary")
    if lead:
        size = trim_vocabulary(_resolve_checkpoint(config.model.pretrained), [t for p in train_pairs for t in p], out)
        _say(f"trimmed the vocabulary of {config.model.pretrained} to the {size} tokens the training data uses")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("bertgen trimmed vocabulary")
    return config.replace({"model": {"pretrained": out, "trim_vocabulary": False}})


def tokenize(config: TrainConfig, tokenizer: Any, train_pairs: Optional[list], eval_pairs: Optional[list]
             ) -> tuple[data_lib.TokenizedPairs, Optional[data_lib.TokenizedPairs]]:
    """Token ids of the train and eval sets, cached on disk."""
    d = config.data
    kw = dict(max_source_length=d.max_source_length, max_target_length=d.max_target_length,
              cache_dir=config.cache_dir)
    if train_pairs is not None:
        train = data_lib.TokenizedPairs.from_pairs(train_pairs, tokenizer, **kw)
        return train, data_lib.TokenizedPairs.from_pairs(eval_pairs, tokenizer, **kw) if eval_pairs else None
    files = dict(format=d.format, source_key=d.source_key, target_key=d.target_key)
    train = data_lib.TokenizedPairs.from_files(list(d.train), tokenizer, **files, **kw)
    return train, data_lib.TokenizedPairs.from_files(list(d.eval), tokenizer, **files, **kw) if d.eval else None


def _dropout(cfg: BertGenerationConfig, p: Optional[float]) -> BertGenerationConfig:
    return cfg if p is None else cfg.replace(hidden_dropout_prob=p, attention_probs_dropout_prob=p)


def build_model(config: TrainConfig, data: data_lib.TokenizedPairs, vocab_size: int) -> Any:
    """The encoder-decoder the run starts from, per the paper's set-ups (see ``ModelSection``), with its decoder
    start / pad / eos ids set to the ones the data was built with."""
    from ..models import EncoderDecoderModel
    m = config.model
    dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    ids = dict(decoder_start_token_id=data.start_id, pad_token_id=data.pad_id, eos_token_id=data.eos_id)
    if data.start_id is None:
        raise TrainConfigError("the tokenizer has neither a bos nor a cls token to start the decoder with")
    if m.init == "checkpoint":
        model = EncoderDecoderModel.from_pretrained(_resolve_checkpoint(m.checkpoint), dtype,
                                                    param_dtype=jnp.float32, scan_layers=m.scan_layers)
        c = model.config
        for key, want in ids.items():
            have = getattr(c, key)
            if have is not None and have != want:
                raise TrainConfigError(f"{m.checkpoint} has {key}={have}, but the tokenizer's data uses {want}: "
                                       "use the checkpoint's tokenizer (model.tokenizer)")
        config_ = c.replace(encoder=_dropout(c.encoder, m.dropout), decoder=_dropout(c.decoder, m.dropout), **ids)
        return EncoderDecoderModel(config_, params=model.params, dtype=dtype, param_dtype=jnp.float32,
                                   scan_layers=m.scan_layers, generation_config=model.generation_config)
    if m.init == "rnd2rnd" and not m.pretrained:
        enc = BertGenerationConfig(**{**dict(m.config), "vocab_size": vocab_size})
        ed = EncoderDecoderConfig.from_encoder_decoder_configs(
            _dropout(enc, m.dropout), _dropout(enc, m.dropout), bos_token_id=data.start_id, **ids)
        return EncoderDecoderModel(ed, dtype=dtype, param_dtype=jnp.float32, scan_layers=m.scan_layers,
                                   seed=m.seed)
    path = _resolve_checkpoint(m.pretrained)
    warm = EncoderDecoderModel.from_encoder_decoder_pretrained(
        path, path, tie_encoder_decoder=m.init == "bertshare", dtype=dtype, param_dtype=jnp.float32,
        scan_layers=m.scan_layers, bos_token_id=data.start_id, **ids)
    c = warm.config
    config_ = c.replace(encoder=_dropout(c.encoder, m.dropout), decoder=_dropout(c.decoder, m.dropout))
    params = warm.params
    if m.init in ("bert2rnd", "rnd2rnd"):
        fresh = EncoderDecoderModel(config_, dtype=dtype, param_dtype=jnp.float32, scan_layers=m.scan_layers,
                                    seed=m.seed).params
        params = fresh if m.init == "rnd2rnd" else {**params, "decoder": fresh["decoder"]}
    return EncoderDecoderModel(config_, params=params, dtype=dtype, param_dtype=jnp.float32,
                               scan_layers=m.scan_layers)


def make_schedule(config: TrainConfig, hidden_size: int) -> Callable:
    """The learning rate per optimizer update: linear warm-up and decay, the paper's inverse square root
    (``learning_rate`` scales ``hidden^-0.5 * min(step^-0.5, step * warmup^-1.5)``), or constant."""
    o = config.optim
    updates = max(config.run.steps // o.accumulation_steps, 1)
    if o.schedule == "linear":
        return optim.linear_warmup_linear_decay(o.learning_rate, min(o.warmup_steps, updates), updates)
    if o.schedule == "inverse_sqrt":
        return optim.inverse_sqrt_schedule(hidden_size, o.warmup_steps, o.learning_rate)
    return lambda step: jnp.full((), o.learning_rate, jnp.float32)


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows of a global numpy batch as global jax arrays (each process holds the whole plan)."""
    n, i = jax.process_count(), jax.process_index()
    out = {}
    for key, value in batch.items():
        if key == "example_ids":
            continue
        rows = value.shape[0] // n
        out[key] = jax.make_array_from_process_local_data(sharding, value[i * rows:(i + 1) * rows], value.shape)
    return out


def host_params(params: Any, mesh: Any) -> Any:
    """A full numpy copy of (sharded, possibly multi-host) params on every process."""
    replicated = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(params)
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), replicated)


def gather_params(params: Any, mesh: Any) -> Any:
    """A full copy of the (sharded) params on this process's first device, for generation."""
    return jax.device_put(host_params(params, mesh), jax.local_devices()[0])


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def eval_loss(eval_step: Callable, params: Any, data: data_lib.TokenizedPairs, config: TrainConfig,
              sharding: NamedSharding) -> dict:
    """Token-weighted loss, perplexity and accuracy over the whole eval set (filler rows count nothing)."""
    it = data_lib.BatchIterator(data, config.data.eval_batch_size, shuffle=False, repeat=False,
                                drop_remainder=False)
    total = correct = tokens = 0.0
    for batch in it:
        m = jax.device_get(eval_step(params, global_batch(batch, sharding)))
        n = float(m["tokens"])
        total += float(m["loss"]) * n
        correct += float(m["accuracy"]) * n
        tokens += n
    loss = total / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_accuracy": correct / max(tokens, 1.0)}


def generate_eval(model: Any, params: Any, data: data_lib.TokenizedPairs, tokenizer: Any, config: TrainConfig
                  ) -> tuple[list[str], list[str], list[str]]:
    """(sources, predictions, references) of the first ``eval.max_examples`` eval examples, decoded without
    special tokens. References are the tokenized targets decoded the same way (what the model can produce: an
    uncased tokenizer lowercases, a cut target stays cut)."""
    from ..decoding import GenerationConfig
    from ..generation import seq2seq_generate
    e, d = config.eval, config.data
    n = len(data) if not e.max_examples else min(e.max_examples, len(data))
    order = sorted(range(n), key=lambda i: len(data.source(i)))  # similar lengths share a batch
    c = model.config
    gen = GenerationConfig(max_new_tokens=e.max_new_tokens or d.max_target_length, num_beams=e.num_beams,
                           decoder_start_token_id=c.decoder_start_token_id, eos_token_id=c.eos_token_id,
                           pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id)
    out: dict[int, list[int]] = {}
    B = d.eval_batch_size
    for lo in range(0, n, B):
        rows = order[lo:lo + B]
        width = max(len(data.source(i)) for i in rows)
        ids = np.full((len(rows), width), data.pad_id, np.int32)
        mask = np.zeros_like(ids)
        for r, i in enumerate(rows):
            src = data.source(i)
            ids[r, :len(src)], mask[r, :len(src)] = src, 1
        seqs = seq2seq_generate(model.module, params, ids, mask, gen,
                                max_positions=c.decoder.max_position_embeddings,
                                source_limit=c.encoder.max_position_embeddings)
        for r, i in enumerate(rows):
            out[i] = [int(t) for t in np.asarray(seqs[r])]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    sources = [decode(data.source(i).tolist()) for i in range(n)]
    predictions = [decode(out[i]) for i in range(n)]
    references = [decode(data.target(i).tolist()) for i in range(n)]
    return sources, predictions, references


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
class _SigtermFlag:
    """Records SIGTERM instead of dying, so the loop can save and return; restores the old handler on exit."""

    def __init__(self) -> None:
        self.raised = False
        self._old = None

    def __enter__(self) -> "_SigtermFlag":
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def train(config: TrainConfig, *, progress: Optional[bool] = None) -> TrainResult:
    """Runs (or resumes) the training described by ``config``; see the module docstring."""
    from .metrics import generation_metrics, write_predictions
    from .observe import MetricsLog, ProgressBar, plot_curves

    init_distributed(config)
    r, o = config.run, config.optim
    lead = jax.process_index() == 0
    out = os.path.abspath(r.output_dir)
    os.makedirs(out, exist_ok=True)
    if lead:
        with atomic_file(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2)

    # data and model
    train_pairs, eval_pairs = load_pairs(config)
    if config.model.trim_vocabulary:
        config = trimmed_vocabulary(config, train_pairs, lead)
    tokenizer = build_tokenizer(config, train_pairs)
    train_data, eval_data = tokenize(config, tokenizer, train_pairs, eval_pairs)
    if train_data.truncated_sources or train_data.truncated_targets:
        _say(f"note: truncated {train_data.truncated_sources} sources and {train_data.truncated_targets} targets "
             f"to data.max_source_length / max_target_length")
    model = build_model(config, train_data, len(tokenizer))
    for name, stack in (("encoder", model.config.encoder), ("decoder", model.config.decoder)):
        longest = config.data.max_source_length if name == "encoder" else config.data.max_target_length
        if longest > stack.max_position_embeddings:
            raise TrainConfigError(f"data.max_{'source' if name == 'encoder' else 'target'}_length ({longest}) "
                                   f"exceeds the {name}'s max_position_embeddings ({stack.max_position_embeddings})")
    if len(tokenizer) > model.config.encoder.vocab_size:
        raise TrainConfigError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary "
                               f"({model.config.encoder.vocab_size})")

    # mesh, optimizer, state
    mesh = shard_lib.make_mesh(r.mesh_data, r.mesh_fsdp)
    n_dev = mesh.devices.size
    if config.data.batch_size % n_dev:
        raise TrainConfigError(f"data.batch_size ({config.data.batch_size}) must be a multiple of the number of "
                               f"devices ({n_dev})")
    if config.data.eval_batch_size % n_dev:
        raise TrainConfigError(f"data.eval_batch_size ({config.data.eval_batch_size}) must be a multiple of the "
                               f"number of devices ({n_dev})")
    schedule = make_schedule(config, model.config.decoder.hidden_size)
    tx = optim.make_optimizer(o.name, schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                              clip_norm=o.clip_norm, accumulation_steps=o.accumulation_steps)
    state = step_lib.create_state(model.params, tx, jax.random.PRNGKey(r.seed))
    model.params = None  # the state owns the parameters from here on
    state, state_shardings = step_lib.shard_state(state, mesh)
    batch_sharding = shard_lib.batch_sharding(mesh)
    layers = max(model.config.encoder.num_hidden_layers, model.config.decoder.num_hidden_layers)
    unroll = step_lib.resolve_scan_unroll(config.model.scan_unroll, layers)
    train_step = step_lib.make_train_step(model.module.clone(remat=config.model.remat, scan_unroll=unroll), tx,
                                          label_smoothing=o.label_smoothing, mesh=mesh,
                                          state_shardings=state_shardings, schedule=schedule,
                                          accumulation_steps=o.accumulation_steps)
    eval_step = step_lib.make_eval_step(model.module, mesh)
    it = data_lib.BatchIterator(train_data, config.data.batch_size, seed=config.data.seed,
                                bucket_boundaries=config.data.bucket_boundaries or None,
                                target_bucket_boundaries=config.data.target_bucket_boundaries or None)

    # resume
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=r.keep, async_save=r.async_checkpoints)
    best = Checkpointer(os.path.join(out, "best"), max_to_keep=1, best_metric=config.eval.best_metric,
                        best_mode=config.best_mode, async_save=r.async_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          state, state_shardings)
        state, data_state = ckpt.restore(start, abstract)
        it.restore(data_state)
        _say(f"resumed from {ckpt.directory} at step {start}")
    log = MetricsLog(out, tensorboard=r.tensorboard, resume_step=start) if lead else None
    show = r.progress if progress is None else progress
    bar = ProgressBar(r.steps, initial=start, disable=not (show and lead))

    stopped, step = STOP_FINISHED, start
    window: dict[str, float] = {}
    last_train: dict = {}
    last_eval: dict = {}
    t0 = time.perf_counter()

    def evaluate(at: int) -> dict:
        params = state.params
        metrics = {}
        if eval_data is not None:
            metrics.update(eval_loss(eval_step, params, eval_data, config, batch_sharding))
            if config.eval.generate:
                local = gather_params(params, mesh)
                sources, preds, refs = generate_eval(model, local, eval_data, tokenizer, config)
                metrics.update(generation_metrics(preds, refs))
                if lead:
                    write_predictions(os.path.join(out, "predictions", f"step-{at:08d}.jsonl"), sources, preds, refs)
        if metrics and log is not None:
            log.log(at, "eval", metrics)
        if metrics:
            bar.write(f"step {at}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    try:
        with _SigtermFlag() as sigterm:
            for step in range(start, r.steps):
                batch = next(it)
                state, metrics = train_step(state, global_batch(batch, batch_sharding))
                m = jax.device_get(metrics)
                if not bool(m["finite"]):
                    ckpt.wait()
                    stopped, good = STOP_NONFINITE, ckpt.latest_step()
                    where = (f"the last good checkpoint is step {good} in {ckpt.directory}" if good is not None
                             else "no checkpoint was written yet")
                    raise TrainingError(f"non-finite loss ({float(m['loss'])}) or gradient norm "
                                        f"({float(m['grad_norm'])}) at step {step + 1}: stopping; {where}. "
                                        "Lower optim.learning_rate, or check the data of this step.")
                done = step = step + 1
                for key in ("loss", "nll", "accuracy", "grad_norm"):
                    window[key] = window.get(key, 0.0) + float(m[key])
                window["tokens"] = window.get("tokens", 0.0) + float(m["tokens"])
                window["n"] = window.get("n", 0.0) + 1
                bar.update(done, loss=float(m["loss"]), lr=float(m["learning_rate"]), tokens=int(m["tokens"]))
                if done % r.log_every == 0 or done == r.steps:
                    elapsed = time.perf_counter() - t0
                    n = window.pop("n")
                    last_train = {k: v / n for k, v in window.items() if k != "tokens"}
                    last_train.update(learning_rate=float(m["learning_rate"]), tokens_per_second=
                                      window["tokens"] / max(elapsed, 1e-9), steps_per_second=n / max(elapsed, 1e-9))
                    last_train["perplexity"] = math.exp(min(last_train["nll"], 50.0))
                    if log is not None:
                        log.log(done, "train", last_train)
                    window, t0 = {}, time.perf_counter()
                if (r.eval_every and done % r.eval_every == 0) or done == r.steps:
                    last_eval = evaluate(done)
                    if last_eval:
                        best.save(done, {"params": state.params}, {"step": done},
                                  metrics={config.eval.best_metric: last_eval[config.eval.best_metric]},
                                  force=True)
                if done % r.save_every == 0 or done == r.steps or sigterm.raised:
                    ckpt.save(done, state, it.state(), force=True)
                if sigterm.raised:
                    stopped = STOP_SIGTERM
                    bar.write(f"SIGTERM: saved step {done} to {ckpt.directory}; run the same command to resume")
                    break
        ckpt.wait()
        best.wait()
        bar.close()

        export_dir = None
        best_step = best.best_step()
        if stopped == STOP_FINISHED:
            if start >= r.steps:
                _say(f"nothing to do: {ckpt.directory} already holds step {start} of {r.steps}")
                last_eval = _last_eval(os.path.join(out, "metrics.jsonl"))
            if r.plot and lead and os.path.exists(os.path.join(out, "metrics.jsonl")):
                plot_curves(os.path.join(out, "metrics.jsonl"), os.path.join(out, "curves.png"))
            if r.export:
                export_dir = export_best(model, state, best, tokenizer, os.path.join(out, "export"), mesh, lead)
        return TrainResult(stopped=stopped, step=step, output_dir=out, train_metrics=last_train,
                           eval_metrics=last_eval, export_dir=export_dir, best_step=best_step)
    finally:
        bar.close()
        if log is not None:
            log.close()
        ckpt.close()
        best.close()


def _last_eval(path: str) -> dict:
    """The metrics of the last evaluation a finished run logged (for a rerun that has nothing left to do)."""
    from .observe import read_metrics
    if not os.path.exists(path):
        return {}
    evals = [r for r in read_metrics(path) if r.get("split") == "eval"]
    return {k: v for k, v in evals[-1].items() if k not in ("step", "split")} if evals else {}


def export_best(model: Any, state: Any, best: Checkpointer, tokenizer: Any, directory: str, mesh: Any,
                lead: bool) -> str:
    """Writes the best checkpoint's parameters (the final ones when there was no evaluation) as an HF directory
    with the tokenizer, which transformers' ``EncoderDecoderModel`` and our ``from_pretrained`` both load."""
    from ..models import EncoderDecoderModel
    params = state.params
    step = best.best_step()
    if step is not None:
        abstract = {"params": jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)}
        params = best.restore(step, abstract)[0]["params"]
    host = host_params(params, mesh)
    if lead:
        final = EncoderDecoderModel(model.config, params=host, param_dtype=jnp.float32,
                                    scan_layers=model.scan_layers, generation_config=model.generation_config)
        final.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        _say(f"exported {'best (step %d)' % step if step is not None else 'final'} model to {directory}")
    return directory


__all__ = ["TrainResult", "TrainingError", "train", "build_model", "build_tokenizer", "tokenize", "load_pairs",
           "make_schedule", "init_distributed", "eval_loss", "generate_eval", "export_best", "global_batch",
           "gather_params"]
