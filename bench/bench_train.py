"""Side-by-side training-step benchmark: bertgen-flax against transformers' PyTorch, same weights, same batch.

One run builds a random transformers bert2bert (``EncoderDecoderModel`` of ``BertGenerationEncoder`` and
``BertGenerationDecoder`` with cross-attention, dropout off), saves it, loads it into ``bertgen_flax`` and trains
each engine on the same batch with the same update, one engine after the other (never concurrently):

    loss      mean token cross-entropy over labels != -100 (transformers computes it from ``labels``;
              ours is ``bertgen_flax.training.token_loss``)
    update    AdamW, lr 1e-4, betas (0.9, 0.999), eps 1e-6, weight decay 0.01 on every parameter except biases
              and LayerNorm weights, no gradient clipping (ours: ``make_optimizer("adamw", 1e-4, clip_norm=None)``;
              torch: ``torch.optim.AdamW`` with the same two parameter groups)

Step 1 of each engine is its first call (ours: tracing + XLA compilation + the step). After it the script compares
the two engines: the step-1 loss, the step-2 loss (which depends on step 1's update) and a few updated parameter
tensors. Then ``--warmup`` untimed steps (the first of them is step 2) and ``--runs`` timed steps; we report the
median. Every step uses the same batch.

    step ms         = median step time (forward + backward + optimizer update; both engines block on the result)
    tokens/s        = tokens in the batch / median step time: non-padding tokens (source + target), and padded
                      tokens (batch * (source + target))
    model TFLOP/s   = 6 * (N_encoder * batch * source + N_decoder * batch * target) / median step time
                      (padded token counts; N_* counts parameters, embeddings and the tied LM head included; the
                      formula of /work/shared/anchors/hf_flax_train.py)
    MFU             = model TFLOP/s / the GPU's dense peak for the dtype (NVIDIA data sheets, see PEAK_TFLOPS)
    compile s       = our first call - our median step
    speed-up        = transformers' median step time / ours

Exit status: 0 when the check passes (or is informational, in bfloat16), 1 when the float32 check fails (after
printing the table), 2 on bad arguments.

    python bench/bench_train.py                                         # small preset on the CPU, float32
    python bench/bench_train.py --preset l24 --dtype bfloat16 --json out/train_l24_bf16.json   # on a GPU
"""
from __future__ import annotations

import os

# Before jax starts a GPU backend: do not grab 75% of the GPU up front, torch needs memory in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import datetime
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import torch
import transformers

import bertgen_flax
from bertgen_flax import convert
from bertgen_flax.training import create_state, make_optimizer, make_train_step

DECODER_START, PAD, EOS = 2, 0, 1
FIRST_ID = 5            # source ids and labels are drawn from [5, vocab): no pad, eos or start token inside
NOISY_CORES = 0.2       # warn when other processes use more than this many cores while we time
LR, WEIGHT_DECAY, BETAS, EPS = 1e-4, 0.01, (0.9, 0.999), 1e-6
LOSS_RTOL, PARAM_ATOL = 1e-4, 1e-5   # float32 check: relative loss difference, absolute parameter difference

# Dense peak TFLOP/s per GPU and dtype (no sparsity), from NVIDIA's data sheets (H100: "NVIDIA H100 Tensor Core
# GPU" data sheet, SXM and PCIe columns, whose "with sparsity" figures are twice these; H200: "NVIDIA H200 Tensor
# Core GPU" data sheet, same compute as H100 SXM; A100: "NVIDIA A100 Tensor Core GPU" data sheet). float32 is the
# plain (non-tensor-core) FP32 rate: in float32 both engines run without TF32 here. Matched against the device
# name in this order; unknown GPUs get no MFU.
PEAK_TFLOPS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("H100", "PCIE"), {"bfloat16": 756.0, "float32": 51.0}),
    (("H100",), {"bfloat16": 989.0, "float32": 67.0}),   # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    (("H200",), {"bfloat16": 989.0, "float32": 67.0}),
    (("A100",), {"bfloat16": 312.0, "float32": 19.5}),
]

# Parameters compared after step 1: (transformers name, layer index or None); the Flax paths come from the
# conversion table in bertgen_flax/convert.py. "-1" stands for the last layer.
CHECKED = [
    ("encoder.embeddings.word_embeddings.weight", None),
    ("decoder.bert.embeddings.word_embeddings.weight", None),   # also the tied LM head
    ("encoder.encoder.layer.{i}.attention.self.value.weight", -1),
    ("decoder.bert.encoder.layer.{i}.crossattention.self.query.weight", 0),
    ("decoder.bert.encoder.layer.{i}.output.LayerNorm.weight", 0),  # no weight decay
    ("decoder.lm_head.bias", None),
]


@dataclass(frozen=True)
class Shape:
    """Model and workload shape."""

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


PRESETS: dict[str, Shape] = {
    # the CPU anchors' model shape (/work/shared/reference/anchors.md): hidden 256, 4+4 layers, vocab 8000
    "small": Shape(hidden=256, encoder_layers=4, decoder_layers=4, heads=4, intermediate=1024, vocab=8000,
                   max_positions=512, batch=8, source=64, target=32),
    # the anchor training step's shape: Google's L-24 bert2bert, batch 32, 512 source / 128 target tokens; a GPU
    "l24": Shape(hidden=1024, encoder_layers=24, decoder_layers=24, heads=16, intermediate=4096, vocab=50358,
                 max_positions=512, batch=32, source=512, target=128),
}


@dataclass
class EngineResult:
    engine: str
    first_call_s: float
    warmup_s: list[float]
    runs_s: list[float]
    losses: list[float]                 # step 1, step 2, ... (every step, timed or not)
    other_cores: Optional[float]        # CPU used by other processes during the timed steps, in cores
    peak_memory_bytes: Optional[int]
    median_s: float = 0.0
    tokens_per_s: float = 0.0           # non-padding source + target tokens
    padded_tokens_per_s: float = 0.0
    tflops: float = 0.0                 # 6 * (N_enc * B * S + N_dec * B * T) / t
    tflops_6n_all_tokens: float = 0.0   # 6 * N * B * (S + T) / t, an upper bound that overcounts (see the doc)
    mfu: Optional[float] = None
    compile_s: Optional[float] = None   # ours only: first call minus the median step
    compiled_programs: Optional[int] = None  # ours only: programs in the jit cache after all steps (should be 1)


# ---- arguments ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="model and batch shape (default: small, sized for a CPU)")
    for field in dataclasses.fields(Shape):
        p.add_argument("--" + field.name.replace("_", "-"), type=int, default=None,
                       help=f"override the preset's {field.name}")
    p.add_argument("--runs", type=int, default=5, help="timed steps per engine; the median is reported")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps after the first call (>= 1; the first of them is the checked step 2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; weights and optimizer state stay float32 (torch: autocast; ours: "
                        "dtype=bfloat16, param_dtype=float32). The check fails the run only in float32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA for torch and jax's default backend when available, else the CPU")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the weights; numpy seed for the batch")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Shape) if getattr(args, f.name) is not None}
    args.shape = dataclasses.replace(PRESETS[args.preset], **overrides)
    s = args.shape
    if args.runs < 1 or args.warmup < 1:
        p.error("--runs and --warmup must be >= 1")
    if min(dataclasses.astuple(s)) < 1:
        p.error("every shape field must be >= 1")
    if s.hidden % s.heads:
        p.error(f"hidden {s.hidden} is not divisible by heads {s.heads}")
    if s.source > s.max_positions or s.target > s.max_positions:
        p.error(f"source {s.source} and target {s.target} must fit max positions {s.max_positions}")
    if s.source < 2 or s.target < 2:
        p.error("--source and --target must be >= 2")
    if s.vocab <= FIRST_ID:
        p.error(f"--vocab must be > {FIRST_ID}")
    return args


# ---- devices, threads, machine load ---------------------------------------------------------------------------
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def select_devices(choice: str) -> tuple[str, str]:
    """(torch device, jax backend). Must run before jax initialises a backend."""
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if choice == "cpu":
        jax.config.update("jax_platforms", "cpu")
    torch_device = "cuda" if choice == "cuda" or (choice == "auto" and cuda) else "cpu"
    backend = jax.default_backend()
    if choice == "cuda" and backend != "gpu":
        raise SystemExit(f"--device cuda: jax's default backend is {backend!r}, not 'gpu'")
    return torch_device, backend


def peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    name = device_name.upper()
    for keys, peaks in PEAK_TFLOPS:
        if all(k in name for k in keys):
            return peaks.get(dtype)
    return None


def machine_cpu_seconds() -> Optional[tuple[float, float]]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), or None without /proc/stat."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), time.process_time()


def cores_used_by_others(before, after, wall_s: float) -> Optional[float]:
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall_s


# ---- model and batch ------------------------------------------------------------------------------------------
def build_reference(shape: Shape, seed: int) -> transformers.EncoderDecoderModel:
    """A random float32 transformers bert2bert, dropout off, start 2, pad 0, eos 1."""
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_attention_heads=shape.heads,
                  intermediate_size=shape.intermediate, max_position_embeddings=shape.max_positions,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  bos_token_id=DECODER_START, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    encoder = transformers.BertGenerationEncoder(
        transformers.BertGenerationConfig(**common, num_hidden_layers=shape.encoder_layers))
    decoder = transformers.BertGenerationDecoder(transformers.BertGenerationConfig(
        **common, num_hidden_layers=shape.decoder_layers, is_decoder=True, add_cross_attention=True))
    model = transformers.EncoderDecoderModel(encoder=encoder, decoder=decoder)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = DECODER_START, PAD, EOS
    return model


def make_batch(shape: Shape, seed: int) -> dict[str, np.ndarray]:
    """Random ids with ragged right padding: source row i keeps ``S - (7 i mod S/2)`` tokens, label row i keeps
    ``T - (5 i mod T/2)`` labels (-100 after them)."""
    rng = np.random.default_rng(seed)
    b, s, t = shape.batch, shape.source, shape.target
    ids = rng.integers(FIRST_ID, shape.vocab, (b, s)).astype(np.int64)
    mask = np.ones_like(ids)
    labels = rng.integers(FIRST_ID, shape.vocab, (b, t)).astype(np.int64)
    for i in range(b):
        keep_s = s - (7 * i) % max(1, s // 2)
        keep_t = t - (5 * i) % max(1, t // 2)
        ids[i, keep_s:], mask[i, keep_s:] = PAD, 0
        labels[i, keep_t:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def flax_paths(config: Any) -> dict[str, tuple[tuple[str, ...], bool]]:
    """transformers name (with ``{i}``) -> (path in our stacked param tree, transposed?) from the conversion table."""
    return {e.torch_key: (e.flax_path, e.transpose)
            for e in convert.model_entries(convert.ENCODER_DECODER, config)}


def pick(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def checked_torch(model: torch.nn.Module, layers: dict[str, int]) -> dict[str, np.ndarray]:
    """Copies of the CHECKED tensors of the torch model, float32 numpy."""
    named = dict(model.named_parameters())
    out = {}
    for key, layer in CHECKED:
        name = key if layer is None else key.replace("{i}", str(layer % layers[key.split(".")[0]]))
        out[name] = named[name].detach().float().cpu().numpy().copy()
    return out


def checked_ours(params: Any, layers: dict[str, int], config: Any) -> dict[str, np.ndarray]:
    """The same tensors from our stacked params, in transformers' layout (kernels transposed), float32 numpy."""
    paths = flax_paths(config)
    out = {}
    for key, layer in CHECKED:
        path, transpose = paths[key]
        value = pick(params, path)
        if layer is not None:
            layer = layer % layers[key.split(".")[0]]
            value = value[layer]
        value = np.array(value, dtype=np.float32, copy=True)
        out[key if layer is None else key.replace("{i}", str(layer))] = value.T if transpose else value
    return out


# ---- the two engines ------------------------------------------------------------------------------------------
class TorchEngine:
    """transformers' EncoderDecoderModel in train mode (dropout probabilities are 0), AdamW, optional autocast."""

    def __init__(self, model: transformers.EncoderDecoderModel, batch: dict[str, np.ndarray], device: str,
                 dtype: str) -> None:
        self.device = device
        self.model = model.to(device).train()
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)
        self.batch = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        self.autocast = dtype == "bfloat16"

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    def peak_memory(self) -> Optional[int]:
        return torch.cuda.max_memory_allocated() if self.device == "cuda" else None


class OurEngine:
    """bertgen_flax's jitted ``make_train_step`` (donates the state) with ``make_optimizer('adamw', ...)``."""

    def __init__(self, model: bertgen_flax.EncoderDecoderModel, batch: dict[str, np.ndarray]) -> None:
        self.tx = make_optimizer("adamw", LR, weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                                 clip_norm=None)
        self.state = create_state(model.params, self.tx, jax.random.PRNGKey(0))
        self.train_step = make_train_step(model.module, self.tx)
        self.batch = {k: jax.device_put(jnp.asarray(v, jnp.int32)) for k, v in batch.items()}

    def step(self) -> float:
        self.state, metrics = self.train_step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return float(metrics["loss"])

    def peak_memory(self) -> Optional[int]:
        stats = jax.devices()[0].memory_stats()
        return None if not stats else stats.get("peak_bytes_in_use")

    def compiled_programs(self) -> Optional[int]:
        size = getattr(self.train_step, "_cache_size", None)
        return size() if callable(size) else None


def measure(engine: Any, name: str, warmup: int, runs: int, snapshot: Callable[[], dict[str, np.ndarray]]
            ) -> tuple[EngineResult, dict[str, np.ndarray]]:
    """First call (step 1), a snapshot of the checked parameters, ``warmup`` untimed and ``runs`` timed steps."""
    losses: list[float] = []

    def timed() -> float:
        start = time.perf_counter()
        losses.append(engine.step())
        return time.perf_counter() - start

    first = timed()
    after_step1 = snapshot()
    warm = [timed() for _ in range(warmup)]
    before, start = machine_cpu_seconds(), time.perf_counter()
    runs_s = [timed() for _ in range(runs)]
    others = cores_used_by_others(before, machine_cpu_seconds(), time.perf_counter() - start)
    return EngineResult(engine=name, first_call_s=first, warmup_s=warm, runs_s=runs_s, losses=losses,
                        other_cores=others, peak_memory_bytes=engine.peak_memory()), after_step1


def fill_rates(r: EngineResult, shape: Shape, n_enc: int, n_dec: int, tokens: int, peak: Optional[float]) -> None:
    t = statistics.median(r.runs_s)
    b = shape.batch
    r.median_s = t
    r.tokens_per_s = tokens / t
    r.padded_tokens_per_s = b * (shape.source + shape.target) / t
    r.tflops = 6 * (n_enc * b * shape.source + n_dec * b * shape.target) / t / 1e12
    r.tflops_6n_all_tokens = 6 * (n_enc + n_dec) * b * (shape.source + shape.target) / t / 1e12
    r.mfu = None if peak is None else r.tflops / peak


# ---- the check ------------------------------------------------------------------------------------------------
def check(torch_r: EngineResult, ours_r: EngineResult, want: dict[str, np.ndarray], got: dict[str, np.ndarray]
          ) -> dict[str, Any]:
    """Step-1 and step-2 losses (relative difference) and the updated parameters after step 1 (max abs diff).
    A NaN anywhere fails the check (NaN compares False)."""
    loss_rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(torch_r.losses[:2], ours_r.losses[:2])]
    param_diff = {k: float(np.abs(want[k].astype(np.float64) - got[k]).max()) for k in want}
    return dict(loss_step1=(torch_r.losses[0], ours_r.losses[0]), loss_step2=(torch_r.losses[1], ours_r.losses[1]),
                loss_rel_diff=loss_rel, param_max_abs_diff=param_diff,
                passed=all(d <= LOSS_RTOL for d in loss_rel) and all(d <= PARAM_ATOL for d in param_diff.values()))


# ---- reporting ------------------------------------------------------------------------------------------------
def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(t: EngineResult, o: EngineResult, runs: int) -> str:
    """A markdown table (pasteable into BENCHMARKS.md); the last column is transformers / ours for times and
    ours / transformers for rates, so > 1 means ours is faster."""
    def gb(x: Optional[int]) -> Optional[float]:
        return None if x is None else x / 2**30

    rows = [("step ms (median of %d)" % runs, 1e3 * t.median_s, 1e3 * o.median_s, ".1f", t.median_s / o.median_s),
            ("first call s (ours: + compile)", t.first_call_s, o.first_call_s, ".2f", None),
            ("tokens/s, non-padding source + target", t.tokens_per_s, o.tokens_per_s, ",.0f",
             o.tokens_per_s / t.tokens_per_s),
            ("tokens/s, padded source + target", t.padded_tokens_per_s, o.padded_tokens_per_s, ",.0f",
             o.padded_tokens_per_s / t.padded_tokens_per_s),
            ("model TFLOP/s, 6 (N_enc B S + N_dec B T) / t", t.tflops, o.tflops, ".3f", o.tflops / t.tflops),
            ("MFU", t.mfu, o.mfu, ".1%", None),
            ("peak device memory GiB", gb(t.peak_memory_bytes), gb(o.peak_memory_bytes), ".2f", None)]
    lines = ["| | transformers (PyTorch) | ours (bertgen_flax) | speed-up, ours vs transformers |", "|---|---|---|---|"]
    for label, a, b, spec, ratio in rows:
        lines.append(f"| {label} | {_fmt(a, spec)} | {_fmt(b, spec)} | "
                     f"{'-' if ratio is None else format(ratio, '.2f') + 'x'} |")
    return "\n".join(lines)


def environment(args: argparse.Namespace, torch_device: str, backend: str, threads: int) -> dict[str, Any]:
    jax_device = jax.devices()[0]
    gpu_name = torch.cuda.get_device_name() if torch_device == "cuda" else None
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        preset=args.preset, shape=dataclasses.asdict(args.shape), dtype=args.dtype, runs=args.runs,
        warmup=args.warmup, seed=args.seed,
        optimizer=dict(name="AdamW", lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                       no_decay="biases and LayerNorm weights", clip_norm=None),
        versions=dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                      flax=flax.__version__, optax=optax.__version__, torch=torch.__version__,
                      transformers=transformers.__version__, numpy=np.__version__),
        cpu=cpu_name(), usable_cores=threads, torch_device=torch_device,
        torch_device_name=gpu_name or cpu_name(), torch_threads=torch.get_num_threads(),
        jax_backend=backend, jax_device_kind=jax_device.device_kind,
        jax_matmul_precision=jax.config.jax_default_matmul_precision,
        peak_tflops=peak_tflops(gpu_name, args.dtype) if gpu_name else None,
        load_average_start=os.getloadavg(),
    )


def print_environment(env: dict[str, Any]) -> None:
    s = env["shape"]
    print(f"date {env['date']}  |  {env['command']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(f"torch: {env['torch_device']} ({env['torch_device_name']}), {env['torch_threads']} threads, train mode, "
          f"{'autocast bfloat16, ' if env['dtype'] == 'bfloat16' else ''}float32 weights")
    print(f"jax:   {env['jax_backend']} ({env['jax_device_kind']}), compute {env['dtype']}, float32 params, "
          f"matmul precision {env['jax_matmul_precision'] or 'default'}")
    print(f"cpu: {env['cpu']}, {env['usable_cores']} usable cores, load average {env['load_average_start']}")
    print(f"model: preset {env['preset']}, hidden {s['hidden']}, layers {s['encoder_layers']}+{s['decoder_layers']}, "
          f"heads {s['heads']}, intermediate {s['intermediate']}, vocab {s['vocab']}; batch {s['batch']}, source "
          f"{s['source']} / target {s['target']} tokens, ragged; dropout 0; AdamW lr {LR}, wd {WEIGHT_DECAY}, eps "
          f"{EPS}, no clipping; median of {env['runs']} after first call + {env['warmup']} warm-up")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch_device, backend = select_devices(args.device)
    threads = usable_cores()
    torch.set_num_threads(threads)  # the cores XLA's CPU pool uses
    if args.dtype == "float32":
        # full float32 matmuls in both engines (jax would use TF32 on recent GPUs; torch does not by default)
        jax.config.update("jax_default_matmul_precision", "highest")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")  # the CPU cannot donate
    warnings.filterwarnings("ignore", message="Version v4.12.0 introduces", category=FutureWarning)

    env = environment(args, torch_device, backend, threads)
    print_environment(env)
    shape = args.shape
    print(f"building the model (transformers, seed {args.seed}) ...", flush=True)
    reference = build_reference(shape, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        reference.save_pretrained(tmp)
        ours = bertgen_flax.EncoderDecoderModel.from_pretrained(tmp, dtype=args.dtype)  # param_dtype: float32
    param_dtypes = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(ours.params)})
    n_enc = sum(x.size for x in jax.tree_util.tree_leaves(ours.params["encoder"]))
    n_all = sum(x.size for x in jax.tree_util.tree_leaves(ours.params))
    n_dec = n_all - n_enc
    n_torch = sum(p.numel() for p in reference.parameters())
    env.update(parameters=n_all, parameters_encoder=n_enc, parameters_decoder=n_dec, parameters_torch=n_torch,
               our_param_dtypes=param_dtypes, torch_attn_implementation=reference.config._attn_implementation)
    print(f"{n_all:,} parameters (encoder {n_enc:,}, decoder {n_dec:,}; transformers counts {n_torch:,}); our "
          f"params {'/'.join(param_dtypes)}; transformers attention: {env['torch_attn_implementation']}")
    batch = make_batch(shape, args.seed)
    tokens = int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
    padded = shape.batch * (shape.source + shape.target)
    env.update(tokens_non_padding=tokens, tokens_padded=padded)
    print(f"batch: {tokens:,} non-padding tokens of {padded:,} ({tokens / padded:.0%})")
    layers = {"encoder": shape.encoder_layers, "decoder": shape.decoder_layers}

    # transformers first; its model and optimizer are freed before ours starts (the two never share the device)
    print("- transformers ...", flush=True)
    if torch_device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine_t = TorchEngine(reference, batch, torch_device, args.dtype)
    torch_r, want = measure(engine_t, "transformers", args.warmup, args.runs,
                            lambda e=engine_t: checked_torch(e.model, layers))
    del engine_t, reference
    gc.collect()
    if torch_device == "cuda":
        torch.cuda.empty_cache()

    print("- ours ...", flush=True)
    engine_o = OurEngine(ours, batch)
    ours.params = None  # the state holds its own copy; drop the model's to free device memory
    ours_r, got = measure(engine_o, "bertgen_flax", args.warmup, args.runs,
                          lambda: checked_ours(engine_o.state.params, layers, ours.config))
    ours_r.compiled_programs = engine_o.compiled_programs()

    peak = env["peak_tflops"]
    for r in (torch_r, ours_r):
        fill_rates(r, shape, n_enc, n_dec, tokens, peak)
        runs = ", ".join(f"{s:.3f}" for s in r.runs_s)
        others = "" if r.other_cores is None else f"; other processes used {r.other_cores:.2f} cores"
        print(f"    {r.engine:13s} first call {r.first_call_s:.2f} s, runs [{runs}] s{others}")
        print(f"    {'':13s} losses {', '.join(f'{x:.6f}' for x in r.losses)}")
    ours_r.compile_s = ours_r.first_call_s - ours_r.median_s
    if ours_r.compiled_programs not in (None, 1):
        print(f"WARNING: our train step was compiled {ours_r.compiled_programs} times", file=sys.stderr)

    result = check(torch_r, ours_r, want, got)
    verdict = "PASS" if result["passed"] else ("FAIL" if args.dtype == "float32" else "informational (bfloat16)")
    print(f"\ncheck ({args.dtype}; limits: loss relative {LOSS_RTOL:g}, parameters absolute {PARAM_ATOL:g}): "
          f"{verdict}")
    for i, key in enumerate(("loss_step1", "loss_step2")):
        a, b = result[key]
        print(f"    {key}: transformers {a:.7f}, ours {b:.7f}, relative difference {result['loss_rel_diff'][i]:.2e}")
    for k, d in result["param_max_abs_diff"].items():
        print(f"    after step 1, max |difference| {d:.2e}  {k}")
    env["load_average_end"] = os.getloadavg()

    print()
    print(table(torch_r, ours_r, args.runs))
    print(f"\nours compile s (first call - median step): {ours_r.compile_s:.2f}")
    print(f"model TFLOP/s = 6 * (N_enc {n_enc:,} * {shape.batch} * {shape.source} + N_dec {n_dec:,} * "
          f"{shape.batch} * {shape.target}) / step time (padded tokens); 6 * N * all tokens would give "
          f"{torch_r.tflops_6n_all_tokens:.3f} (transformers) / {ours_r.tflops_6n_all_tokens:.3f} (ours)")
    if peak is not None:
        print(f"MFU against {peak:g} TFLOP/s dense {args.dtype} for {env['torch_device_name']} (NVIDIA data sheet)")
    print(f"load average at start {env['load_average_start']}, at end {env['load_average_end']}")
    busiest = max(r.other_cores or 0.0 for r in (torch_r, ours_r))
    if busiest > NOISY_CORES:
        print(f"WARNING: other processes kept up to {busiest:.2f} cores busy during timed steps: these timings "
              f"are unreliable; rerun on a quiet machine", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        payload = dict(environment=env, check=dict(result, verdict=verdict),
                       results=[dataclasses.asdict(torch_r), dataclasses.asdict(ours_r)],
                       speedup=torch_r.median_s / ours_r.median_s)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    if not result["passed"] and args.dtype == "float32":
        print("\nFAIL: the training steps of the two engines differ in float32", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
