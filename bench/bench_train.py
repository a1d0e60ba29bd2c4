"""Side-by-side training-step benchmark: bertgen-flax against transformers' PyTorch, same weights, same batch.

One run builds a random transformers bert2bert (``EncoderDecoderModel`` of ``BertGenerationEncoder`` and
``BertGenerationDecoder`` with cross-attention, dropout off unless ``--dropout``), saves it, loads it into
``bertgen_flax`` and trains each engine on the same batch with the same update, one engine after the other (never
concurrently):

    loss      mean token cross-entropy over labels != -100 (transformers computes it from ``labels``;
              ours is ``bertgen_flax.training.token_loss``)
    update    AdamW, lr 1e-4, betas (0.9, 0.999), eps 1e-6, weight decay 0.01 on every parameter except biases
              and LayerNorm weights, no gradient clipping (ours: ``make_optimizer("adamw", 1e-4, clip_norm=None)``;
              torch: ``torch.optim.AdamW`` with the same two parameter groups)

Step 1 of each engine is its first call (ours: tracing + XLA compilation + the step). After it the script compares
the two engines: the step-1 loss, the step-2 loss (which depends on step 1's update) and a few updated parameter
tensors. Then ``--warmup`` untimed steps (the first of them is step 2) and ``--runs`` timed steps; we report the
median. Every step uses the same batch. With ``--dropout P`` (0.1 is the configs' default and the anchors'
setting) both engines train with dropout; they draw different masks, so the check is skipped and the run
measures time only.

    step ms         = median step time (forward + backward + optimizer update; both engines block on the result)
    tokens/s        = tokens in the batch / median step time: non-padding tokens (source + target), and padded
                      tokens (batch * (source + target))
    model TFLOP/s   = 6 * (N_encoder * batch * source + N_decoder * batch * target) / median step time
                      (padded token counts; N_* counts parameters, embeddings and the tied LM head included; the
                      formula of /work/shared/anchors/hf_flax_train.py)
    MFU             = model TFLOP/s / the GPU's dense peak for the dtype (NVIDIA data sheets, see PEAK_TFLOPS)
    compile s       = our first call - our median step
    XLA's plan      = ours only: the compiled step's memory as XLA accounts it (temporaries + arguments + outputs,
                      less the donated buffers counted twice); a figure on the CPU too, where no peak is read
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
import gc
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:  # `bertgen bench` runs this file with runpy, which does not add its folder
    sys.path.insert(0, _BENCH_DIR)
import _machine  # noqa: E402  (bench/: machine helpers shared by the benchmark scripts)
from _workload import DECODER_START, EOS, PAD, add_shape_args, apply_shape_args, make_batch  # noqa: E402,F401
from _workload import dropout_rate  # noqa: E402
from gpu_summary import planned_bytes  # noqa: E402  (standard library only: also the GPU run's summary)
from _workload import FIRST_SOURCE_ID as FIRST_ID  # noqa: E402
from _workload import TRAIN_PRESETS as PRESETS  # noqa: E402
from _workload import TrainShape as Shape  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import bertgen_flax  # noqa: E402
from bertgen_flax import convert  # noqa: E402
from bertgen_flax.training import create_state, make_optimizer, make_train_step  # noqa: E402
from bertgen_flax.training.step import resolve_scan_unroll  # noqa: E402

NOISY_CORES = _machine.NOISY_CORES  # warn when other processes use more than this many cores while we time
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
    xla_memory_bytes: Optional[dict] = None  # ours only: XLA's accounting of the compiled step (temp, arguments,
    #                                          outputs, aliased): what the program plans, also where no peak is read


# ---- arguments ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="model and batch shape (default: small, sized for a CPU)")
    add_shape_args(p, Shape)
    p.add_argument("--runs", type=int, default=5, help="timed steps per engine; the median is reported")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps after the first call (>= 1; the first of them is the checked step 2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; weights and optimizer state stay float32 (torch: autocast; ours: "
                        "dtype=bfloat16, param_dtype=float32). The check fails the run only in float32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA for torch and jax's default backend when available, else the CPU")
    p.add_argument("--engines", choices=("both", "torch", "ours"), default="both",
                   help="time one engine only (the check needs both), e.g. ours again with a filled compilation "
                        "cache")
    p.add_argument("--layers", choices=("scanned", "unrolled"), default="scanned",
                   help="our layer stacks under nn.scan (the default everywhere: one compiled layer) or unrolled "
                        "(model.scan_layers=false in a training config: longer compiles, a faster step on a CPU)")
    p.add_argument("--scan-unroll", default="auto",
                   help="layers per scan iteration of our scanned stacks (model.scan_unroll in a training config): "
                        "'auto' (as bertgen train: every layer on a CPU, else 1), 'all', or a number")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                   help="our layers' activations recomputed in the backward pass (model.remat in a training "
                        "config): less memory, more compute")
    p.add_argument("--dropout", type=dropout_rate, default=0.0,
                   help="hidden and attention dropout of both engines (default 0: the check compares the steps)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the weights; numpy seed for the batch")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.shape = apply_shape_args(args, PRESETS[args.preset])
    s = args.shape
    if args.scan_unroll not in ("auto", "all"):
        if not args.scan_unroll.isdigit() or int(args.scan_unroll) < 1:
            p.error(f"--scan-unroll must be 'auto', 'all' or a number >= 1, got {args.scan_unroll!r}")
        args.scan_unroll = int(args.scan_unroll)
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


# ---- devices --------------------------------------------------------------------------------------------------
select_devices = _machine.select_devices


def peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    name = device_name.upper()
    for keys, peaks in PEAK_TFLOPS:
        if all(k in name for k in keys):
            return peaks.get(dtype)
    return None


# ---- model and batch ------------------------------------------------------------------------------------------
def build_reference(shape: Shape, seed: int, dropout: float = 0.0) -> transformers.EncoderDecoderModel:
    """A random float32 transformers bert2bert, dropout ``dropout`` (default off), start 2, pad 0, eos 1."""
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_attention_heads=shape.heads,
                  intermediate_size=shape.intermediate, max_position_embeddings=shape.max_positions,
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
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
    """transformers' EncoderDecoderModel in train mode (dropout as configured), AdamW, optional autocast."""

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
        return _machine.torch_peak_bytes(self.device)


class OurEngine:
    """bertgen_flax's jitted ``make_train_step`` (donates the state) with ``make_optimizer('adamw', ...)``."""

    def __init__(self, model: bertgen_flax.EncoderDecoderModel, batch: dict[str, np.ndarray], remat: str,
                 scan_unroll: int) -> None:
        self.tx = make_optimizer("adamw", LR, weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                                 clip_norm=None)
        self.state = create_state(model.params, self.tx, jax.random.PRNGKey(0))
        self.train_step = make_train_step(model.module.clone(remat=remat, scan_unroll=scan_unroll), self.tx)
        self.batch = {k: jax.device_put(jnp.asarray(v, jnp.int32)) for k, v in batch.items()}

    def step(self) -> float:
        self.state, metrics = self.train_step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return float(metrics["loss"])

    def peak_memory(self) -> Optional[int]:
        return _machine.jax_peak_bytes()

    def xla_memory(self) -> Optional[dict]:
        """XLA's memory accounting of the compiled step. After the first call this lowers to the cached program:
        no second compile."""
        try:
            m = self.train_step.lower(self.state, self.batch).compile().memory_analysis()
        except Exception:  # noqa: BLE001  (a backend without the analysis: report nothing)
            return None
        if m is None:
            return None
        return dict(temp=m.temp_size_in_bytes, arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                    aliased=m.alias_size_in_bytes)

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
    before, start = _machine.machine_cpu_seconds(), time.perf_counter()
    runs_s = [timed() for _ in range(runs)]
    others = _machine.other_cores(before, _machine.machine_cpu_seconds(), time.perf_counter() - start)
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


def _planned(r: Optional[EngineResult]) -> Optional[int]:
    """Bytes XLA planned for our compiled step: temporaries + arguments + outputs, less the donated (aliased)
    buffers counted in both."""
    m = None if r is None else r.xla_memory_bytes
    return None if m is None else planned_bytes(m)


def table(t: Optional[EngineResult], o: Optional[EngineResult], runs: int) -> str:
    """A markdown table (pasteable into BENCHMARKS.md); the last column is transformers / ours for times and
    ours / transformers for rates, so > 1 means ours is faster. An engine that did not run shows "-"."""
    def gb(x: Optional[int]) -> Optional[float]:
        return None if x is None else x / 2**30

    def get(r: Optional[EngineResult], name: str, scale: float = 1.0) -> Optional[float]:
        value = None if r is None else getattr(r, name)
        return None if value is None else scale * value

    def ratio(name: str, faster_is_higher: bool) -> Optional[float]:
        a, b = get(t, name), get(o, name)
        if a is None or b is None:
            return None
        return b / a if faster_is_higher else a / b

    rows = [("step ms (median of %d)" % runs, get(t, "median_s", 1e3), get(o, "median_s", 1e3), ".1f",
             ratio("median_s", False)),
            ("first call s (ours: + compile)", get(t, "first_call_s"), get(o, "first_call_s"), ".2f", None),
            ("tokens/s, non-padding source + target", get(t, "tokens_per_s"), get(o, "tokens_per_s"), ",.0f",
             ratio("tokens_per_s", True)),
            ("tokens/s, padded source + target", get(t, "padded_tokens_per_s"), get(o, "padded_tokens_per_s"),
             ",.0f", ratio("padded_tokens_per_s", True)),
            ("model TFLOP/s, 6 (N_enc B S + N_dec B T) / t", get(t, "tflops"), get(o, "tflops"), ".3f",
             ratio("tflops", True)),
            ("MFU", get(t, "mfu"), get(o, "mfu"), ".1%", None),
            ("peak device memory GiB", gb(get(t, "peak_memory_bytes")), gb(get(o, "peak_memory_bytes")), ".2f",
             None),
            ("XLA's plan of the step GiB (temporaries + arguments + outputs - aliased)", None,
             gb(_planned(o)), ".2f", None)]
    lines = ["| | transformers (PyTorch) | ours (bertgen_flax) | speed-up, ours vs transformers |", "|---|---|---|---|"]
    for label, a, b, spec, r in rows:
        lines.append(f"| {label} | {_fmt(a, spec)} | {_fmt(b, spec)} | "
                     f"{'-' if r is None else format(r, '.2f') + 'x'} |")
    return "\n".join(lines)


def environment(args: argparse.Namespace, torch_device: str, backend: str, threads: int) -> dict[str, Any]:
    jax_device = jax.devices()[0]
    gpu_name = torch.cuda.get_device_name() if torch_device == "cuda" else None
    return dict(
        date=_machine.now_iso(),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        preset=args.preset, shape=dataclasses.asdict(args.shape), dtype=args.dtype, runs=args.runs,
        warmup=args.warmup, seed=args.seed, engines=args.engines, layers=args.layers, remat=args.remat,
        scan_unroll=args.scan_unroll, dropout=args.dropout,
        optimizer=dict(name="AdamW", lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                       no_decay="biases and LayerNorm weights", clip_norm=None),
        versions=_machine.versions("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"),
        cpu=_machine.cpu_name(), usable_cores=threads, torch_device=torch_device,
        torch_device_name=gpu_name or _machine.cpu_name(), torch_threads=torch.get_num_threads(),
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
          f"{s['source']} / target {s['target']} tokens, ragged; dropout {env['dropout']:g}; AdamW lr {LR}, "
          f"wd {WEIGHT_DECAY}, eps {EPS}, no clipping; median of {env['runs']} after first call + "
          f"{env['warmup']} warm-up")
    print(f"ours:  layers {env['layers']}, scan_unroll {env['scan_unroll']}, remat {env['remat']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch_device, backend = select_devices(args.device)
    threads = _machine.usable_cores()
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
    reference = build_reference(shape, args.seed, args.dropout)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        reference.save_pretrained(tmp)
        ours = bertgen_flax.EncoderDecoderModel.from_pretrained(tmp, dtype=args.dtype,  # param_dtype: float32
                                                               scan_layers=args.layers == "scanned")
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
    torch_r = ours_r = None
    want = got = None
    if args.engines in ("both", "torch"):
        print("- transformers ...", flush=True)
        _machine.torch_reset_peak(torch_device)
        engine_t = TorchEngine(reference, batch, torch_device, args.dtype)
        torch_r, want = measure(engine_t, "transformers", args.warmup, args.runs,
                                lambda e=engine_t: checked_torch(e.model, layers))
        del engine_t
    del reference
    gc.collect()
    if torch_device == "cuda":
        torch.cuda.empty_cache()

    if args.engines in ("both", "ours"):
        print("- ours ...", flush=True)
        unroll = resolve_scan_unroll(args.scan_unroll, max(shape.encoder_layers, shape.decoder_layers))
        engine_o = OurEngine(ours, batch, args.remat, unroll)
        ours.params = None  # the state holds its own copy; drop the model's to free device memory
        ours_r, got = measure(engine_o, "bertgen_flax", args.warmup, args.runs,
                              lambda: checked_ours(engine_o.state.params if args.layers == "scanned"
                                                   else convert.stack_layers(engine_o.state.params), layers,
                                                   ours.config))
        ours_r.compiled_programs = engine_o.compiled_programs()
        ours_r.xla_memory_bytes = engine_o.xla_memory()

    peak = env["peak_tflops"]
    measured = [r for r in (torch_r, ours_r) if r is not None]
    for r in measured:
        fill_rates(r, shape, n_enc, n_dec, tokens, peak)
        runs = ", ".join(f"{s:.3f}" for s in r.runs_s)
        others = "" if r.other_cores is None else f"; other processes used {r.other_cores:.2f} cores"
        print(f"    {r.engine:13s} first call {r.first_call_s:.2f} s, runs [{runs}] s{others}")
        print(f"    {'':13s} losses {', '.join(f'{x:.6f}' for x in r.losses)}")
    if ours_r is not None:
        ours_r.compile_s = ours_r.first_call_s - ours_r.median_s
        if ours_r.compiled_programs not in (None, 1):
            print(f"WARNING: our train step was compiled {ours_r.compiled_programs} times", file=sys.stderr)

    if args.dropout:
        result, verdict = dict(passed=True), "skipped (dropout: the engines draw different masks; time only)"
        print(f"\ncheck: {verdict}")
    elif torch_r is not None and ours_r is not None:
        result = check(torch_r, ours_r, want, got)
        verdict = "PASS" if result["passed"] else ("FAIL" if args.dtype == "float32" else "informational (bfloat16)")
        print(f"\ncheck ({args.dtype}; limits: loss relative {LOSS_RTOL:g}, parameters absolute {PARAM_ATOL:g}): "
              f"{verdict}")
        for i, key in enumerate(("loss_step1", "loss_step2")):
            a, b = result[key]
            print(f"    {key}: transformers {a:.7f}, ours {b:.7f}, relative difference "
                  f"{result['loss_rel_diff'][i]:.2e}")
        for k, d in result["param_max_abs_diff"].items():
            print(f"    after step 1, max |difference| {d:.2e}  {k}")
    else:
        result, verdict = dict(passed=True), "skipped (one engine)"
        print(f"\ncheck: {verdict}")
    env["load_average_end"] = os.getloadavg()

    print()
    print(table(torch_r, ours_r, args.runs))
    if ours_r is not None:
        print(f"\nours compile s (first call - median step): {ours_r.compile_s:.2f}")
    all_tokens = " / ".join(f"{r.tflops_6n_all_tokens:.3f} ({'ours' if r is ours_r else 'transformers'})"
                            for r in measured)
    print(f"model TFLOP/s = 6 * (N_enc {n_enc:,} * {shape.batch} * {shape.source} + N_dec {n_dec:,} * "
          f"{shape.batch} * {shape.target}) / step time (padded tokens); 6 * N * all tokens would give {all_tokens}")
    if peak is not None:
        print(f"MFU against {peak:g} TFLOP/s dense {args.dtype} for {env['torch_device_name']} (NVIDIA data sheet)")
    print(f"load average at start {env['load_average_start']}, at end {env['load_average_end']}")
    _machine.warn_if_noisy(max(r.other_cores or 0.0 for r in measured), "timed steps")
    if args.json:
        payload = dict(environment=env, check=dict(result, verdict=verdict),
                       results=[dataclasses.asdict(r) for r in measured],
                       speedup=torch_r.median_s / ours_r.median_s if torch_r and ours_r else None)
        _machine.write_json(args.json, payload)
        print(f"wrote {args.json}")
    if not result["passed"] and args.dtype == "float32":
        print("\nFAIL: the training steps of the two engines differ in float32", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
