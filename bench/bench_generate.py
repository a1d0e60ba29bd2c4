"""Side-by-side generate benchmark: bertgen-flax against transformers' PyTorch ``generate``, same weights, same inputs.

One run builds a random bert2bert with transformers (``EncoderDecoderModel`` of ``BertGenerationEncoder`` and
``BertGenerationDecoder``), saves it, loads it into ``bertgen_flax`` and, case by case, times both engines one
after the other (never concurrently), then checks that the generated tokens are identical (float32).

Every case forces the same amount of work on both engines: ``min_new_tokens == max_new_tokens``, so no row stops
early. Each engine gets ``--warmup`` untimed calls, then ``--runs`` timed calls; we report the median.

    ms/step   = median generate time / new tokens          (the encoder pass is included in the time)
    tokens/s  = batch * new tokens / median generate time   (one returned sequence per input)
    compile s = our first call - our median call            (tracing + XLA compilation of the program)
    speed-up  = transformers time / our time

Exit status: 0 when every checked case is identical, 1 when any float32 output differs (after printing the table),
2 on bad arguments.

    python bench/bench_generate.py                          # small preset on the CPU, all four cases
    python bench/bench_generate.py --preset l24 --dtype bfloat16 --json out/bench_l24.json   # on a GPU
"""
from __future__ import annotations

import os

# Before jax starts a GPU backend: do not grab 75% of the GPU up front, torch needs memory in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import jax
import jaxlib
import numpy as np
import torch
import transformers

import bertgen_flax
from bertgen_flax import generation

DECODER_START, PAD, EOS = 2, 0, 1
NOISY_CORES = 0.2    # warn when other processes use more than this many cores while we time
FIRST_SOURCE_ID = 5  # source ids are drawn from [5, vocab): no pad, eos or start token inside a source


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


@dataclass
class Timing:
    """Seconds of the first call, of each later untimed warm-up call and of each timed call."""

    first_s: float
    warmup_s: list[float]
    runs_s: list[float]
    other_cores: Optional[float] = None  # CPU used by other processes during the timed calls, in cores

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)


@dataclass
class EngineResult:
    engine: str
    median_s: float
    ms_per_step: float
    tokens_per_s: float
    first_call_s: float
    runs_s: list[float]
    other_cores: Optional[float]
    compile_s: Optional[float] = None  # ours only: first call minus the median call


@dataclass
class CaseResult:
    case: str
    label: str
    batch: int
    beams: int
    new_tokens: int
    torch: Optional[EngineResult]
    ours: Optional[EngineResult]
    identity: str           # "identical", "MISMATCH", "skipped (...)"
    identity_detail: str
    retraced: bool = False  # ours compiled again during the timed calls (should never happen)

    @property
    def speedup(self) -> Optional[float]:
        if self.torch is None or self.ours is None:
            return None
        return self.torch.median_s / self.ours.median_s


# ---- arguments ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="model and workload shape (default: small, sized for a CPU)")
    for field in dataclasses.fields(Shape):
        p.add_argument("--" + field.name.replace("_", "-"), type=int, default=None,
                       help=f"override the preset's {field.name}")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {', '.join(CASES)} (default: all)")
    p.add_argument("--runs", type=int, default=3, help="timed calls per engine and case; the median is reported")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls before the timed ones (>= 1; our first call includes compilation)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute and weight dtype for both engines; the identity check needs float32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA for torch and jax's default backend when available, else the CPU")
    p.add_argument("--engines", choices=("both", "torch", "ours"), default="both",
                   help="time one engine only (e.g. to check that the two do not disturb each other)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the weights; numpy seed for inputs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    shape = PRESETS[args.preset]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)
                 if getattr(args, f.name) is not None}
    args.shape = dataclasses.replace(shape, **overrides)
    args.case_keys = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.case_keys if c not in CASES]
    if unknown or not args.case_keys:
        p.error(f"unknown --cases {unknown}; choose from {', '.join(CASES)}")
    if args.runs < 1 or args.warmup < 1:
        p.error("--runs and --warmup must be >= 1")
    s = args.shape
    if s.hidden % s.heads:
        p.error(f"hidden {s.hidden} is not divisible by heads {s.heads}")
    if 1 + s.new_tokens > s.max_positions or s.source > s.max_positions:
        p.error(f"source {s.source} and 1 + new tokens {1 + s.new_tokens} must fit max positions {s.max_positions}")
    if s.source < 2:
        p.error("--source must be >= 2")
    return args


# ---- devices and threads --------------------------------------------------------------------------------------
def usable_cores() -> int:
    """Cores this process may run on (XLA's CPU thread pool sizes itself by the same affinity mask)."""
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


def sync(torch_device: str) -> None:
    if torch_device == "cuda":
        torch.cuda.synchronize()


# ---- model and inputs -----------------------------------------------------------------------------------------
def build_reference(shape: Shape, seed: int) -> transformers.EncoderDecoderModel:
    """A random transformers bert2bert (float32, eval mode) with start 2, pad 0, eos 1."""
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_attention_heads=shape.heads,
                  intermediate_size=shape.intermediate, max_position_embeddings=shape.max_positions,
                  bos_token_id=DECODER_START, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    encoder = transformers.BertGenerationEncoder(
        transformers.BertGenerationConfig(**common, num_hidden_layers=shape.encoder_layers))
    decoder = transformers.BertGenerationDecoder(transformers.BertGenerationConfig(
        **common, num_hidden_layers=shape.decoder_layers, is_decoder=True, add_cross_attention=True))
    model = transformers.EncoderDecoderModel(encoder=encoder, decoder=decoder)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = DECODER_START, PAD, EOS
    return model.eval()


def make_inputs(batch: int, source: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random source ids [batch, source] with ragged right padding (row i keeps source - 7i mod source/2)."""
    rng = np.random.default_rng(seed + batch)
    ids = rng.integers(FIRST_SOURCE_ID, vocab, (batch, source)).astype(np.int64)
    mask = np.ones_like(ids)
    for i in range(batch):
        keep = source - (i * 7) % max(1, source // 2)
        ids[i, keep:], mask[i, keep:] = PAD, 0
    return ids, mask


def generate_kwargs(shape: Shape, beams: int) -> dict[str, Any]:
    """The same search settings for both engines."""
    return dict(max_new_tokens=shape.new_tokens, min_new_tokens=shape.new_tokens, num_beams=beams,
                num_return_sequences=1, do_sample=False, decoder_start_token_id=DECODER_START,
                pad_token_id=PAD, eos_token_id=EOS)


# ---- timing ---------------------------------------------------------------------------------------------------
def cpu_seconds() -> Optional[tuple[float, float]]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), or None without /proc/stat."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def other_cores(before: Optional[tuple[float, float]], after: Optional[tuple[float, float]],
                wall_s: float) -> Optional[float]:
    """Average cores that other processes (or the hypervisor: steal) kept busy over ``wall_s`` seconds."""
    if before is None or after is None or wall_s <= 0:
        return None
    machine, own = after[0] - before[0], after[1] - before[1]
    return max(0.0, machine - own) / wall_s


def time_calls(call: Callable[[], np.ndarray], warmup: int, runs: int) -> tuple[Timing, np.ndarray]:
    """Times ``call`` (which must block until its result is ready); returns the timing and the last output."""
    def timed() -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        out = call()
        return time.perf_counter() - start, out

    first, out = timed()
    warm = [timed()[0] for _ in range(warmup - 1)]
    runs_s = []
    before, start = cpu_seconds(), time.perf_counter()
    for _ in range(runs):
        seconds, out = timed()
        runs_s.append(seconds)
    others = other_cores(before, cpu_seconds(), time.perf_counter() - start)
    return Timing(first, warm, runs_s, others), out


def engine_result(name: str, timing: Timing, batch: int, new_tokens: int, with_compile: bool) -> EngineResult:
    t = timing.median_s
    return EngineResult(engine=name, median_s=t, ms_per_step=1000.0 * t / new_tokens,
                        tokens_per_s=batch * new_tokens / t, first_call_s=timing.first_s, runs_s=timing.runs_s,
                        other_cores=timing.other_cores, compile_s=timing.first_s - t if with_compile else None)


def compare(want: np.ndarray, got: np.ndarray) -> tuple[bool, str]:
    """Token-for-token comparison of two [rows, length] outputs."""
    if want.shape != got.shape:
        return False, f"shapes differ: transformers {want.shape}, ours {got.shape}"
    differ = np.flatnonzero((want != got).any(axis=1))
    if differ.size == 0:
        return True, f"{want.shape[0]}/{want.shape[0]} rows equal, length {want.shape[1]}"
    r = int(differ[0])
    c = int(np.flatnonzero(want[r] != got[r])[0])
    return False, (f"{differ.size}/{want.shape[0]} rows differ; first at row {r}, position {c}: "
                   f"transformers {want[r, c:c + 6].tolist()} vs ours {got[r, c:c + 6].tolist()}")


# ---- one case -------------------------------------------------------------------------------------------------
def run_case(key: str, args: argparse.Namespace, reference: Any, ours: Any, torch_device: str) -> CaseResult:
    case, shape = CASES[key], args.shape
    ids, mask = make_inputs(case.batch, shape.source, shape.vocab, args.seed)
    kwargs = generate_kwargs(shape, case.beams)
    torch_result = ours_result = None
    torch_out = ours_out = None

    if args.engines in ("both", "torch"):
        t_ids, t_mask = torch.from_numpy(ids).to(torch_device), torch.from_numpy(mask).to(torch_device)

        def call_torch() -> np.ndarray:
            with torch.no_grad():
                out = reference.generate(input_ids=t_ids, attention_mask=t_mask, **kwargs)
            sync(torch_device)
            return out.cpu().numpy()

        timing, torch_out = time_calls(call_torch, args.warmup, args.runs)
        torch_result = engine_result("transformers", timing, case.batch, shape.new_tokens, with_compile=False)
        if torch_device == "cuda":
            torch.cuda.empty_cache()

    retraced = False
    if args.engines in ("both", "ours"):
        def call_ours() -> np.ndarray:
            out = ours.generate(ids, mask, return_scores=False, **kwargs)
            return np.asarray(jax.block_until_ready(out))

        traces = generation.TRACE_COUNTS["seq2seq"]
        timing, ours_out = time_calls(call_ours, args.warmup, args.runs)  # the first call compiles the program
        retraced = generation.TRACE_COUNTS["seq2seq"] - traces > 1
        ours_result = engine_result("bertgen_flax", timing, case.batch, shape.new_tokens, with_compile=True)

    if torch_out is None or ours_out is None:
        identity, detail = "skipped (one engine)", ""
    elif args.dtype != "float32":
        identity, detail = f"skipped ({args.dtype})", "bf16 results legitimately differ between engines"
        detail += f"; {compare(torch_out, ours_out.astype(torch_out.dtype))[1]}"
    else:
        same, detail = compare(torch_out, ours_out.astype(torch_out.dtype))
        identity = "identical" if same else "MISMATCH"
    return CaseResult(case=key, label=case.label, batch=case.batch, beams=case.beams, new_tokens=shape.new_tokens,
                      torch=torch_result, ours=ours_result, identity=identity, identity_detail=detail,
                      retraced=retraced)


# ---- reporting ------------------------------------------------------------------------------------------------
def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: Sequence[CaseResult]) -> str:
    """A markdown table (pasteable into BENCHMARKS.md)."""
    rows = ["| case | transformers ms/step | ours ms/step | transformers tok/s | ours tok/s | ours compile s "
            "| speed-up (transformers / ours) | identical |",
            "|" + "---|" * 8]
    for r in results:
        t, o = r.torch, r.ours
        cells = [r.label, _fmt(t and t.ms_per_step, ".2f"), _fmt(o and o.ms_per_step, ".2f"),
                 _fmt(t and t.tokens_per_s, ",.0f"), _fmt(o and o.tokens_per_s, ",.0f"),
                 _fmt(o and o.compile_s, ".1f"), "-" if r.speedup is None else f"{r.speedup:.2f}x", r.identity]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def environment(args: argparse.Namespace, torch_device: str, backend: str, threads: int) -> dict[str, Any]:
    jax_device = jax.devices()[0]
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        preset=args.preset, shape=dataclasses.asdict(args.shape), dtype=args.dtype, runs=args.runs,
        warmup=args.warmup, seed=args.seed, engines=args.engines,
        versions=dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                      torch=torch.__version__, transformers=transformers.__version__,
                      numpy=np.__version__),
        cpu=cpu_name(), usable_cores=threads,
        torch_device=torch_device,
        torch_device_name=torch.cuda.get_device_name() if torch_device == "cuda" else cpu_name(),
        torch_threads=torch.get_num_threads(),
        jax_backend=backend, jax_device_kind=jax_device.device_kind,
        jax_cpu_threads=threads if backend == "cpu" else None,
        jax_matmul_precision=jax.config.jax_default_matmul_precision,
        load_average_start=os.getloadavg(),
    )


def print_environment(env: dict[str, Any]) -> None:
    s = env["shape"]
    print(f"date {env['date']}  |  {env['command']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(f"torch: {env['torch_device']} ({env['torch_device_name']}), {env['torch_threads']} threads, eval + no_grad")
    jax_threads = f", XLA CPU pool over {env['jax_cpu_threads']} cores" if env["jax_cpu_threads"] else ""
    print(f"jax:   {env['jax_backend']} ({env['jax_device_kind']}){jax_threads}, "
          f"matmul precision {env['jax_matmul_precision'] or 'default'}")
    print(f"cpu: {env['cpu']}, {env['usable_cores']} usable cores, load average {env['load_average_start']}")
    print(f"model: preset {env['preset']}, hidden {s['hidden']}, layers {s['encoder_layers']}+{s['decoder_layers']}, "
          f"heads {s['heads']}, intermediate {s['intermediate']}, vocab {s['vocab']}, max positions "
          f"{s['max_positions']}; source {s['source']} ragged, {s['new_tokens']} new tokens forced; {env['dtype']}; "
          f"median of {env['runs']} after {env['warmup']} warm-up")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch_device, backend = select_devices(args.device)
    threads = usable_cores()
    torch.set_num_threads(threads)  # the cores XLA's CPU pool uses
    if args.dtype == "float32":
        # full float32 matmuls in both engines (jax would use TF32 on recent GPUs; torch does not by default)
        jax.config.update("jax_default_matmul_precision", "highest")
    transformers.logging.set_verbosity_error()

    env = environment(args, torch_device, backend, threads)
    print_environment(env)
    print(f"building the model (transformers, seed {args.seed}) ...", flush=True)
    reference = build_reference(args.shape, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        reference.save_pretrained(tmp)
        ours = bertgen_flax.EncoderDecoderModel.from_pretrained(tmp, dtype=args.dtype, param_dtype=args.dtype)
    torch_dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    reference = reference.to(torch_device, dtype=torch_dtype)
    env["parameters"] = sum(p.numel() for p in reference.parameters())
    env["torch_attn_implementation"] = reference.config._attn_implementation
    print(f"{env['parameters']:,} parameters; transformers attention: {env['torch_attn_implementation']}")

    results = []
    for key in args.case_keys:
        print(f"- {CASES[key].label} ...", flush=True)
        result = run_case(key, args, reference, ours, torch_device)
        results.append(result)
        for r in (result.torch, result.ours):
            if r is not None:
                runs = ", ".join(f"{s:.3f}" for s in r.runs_s)
                others = "" if r.other_cores is None else f"; other processes used {r.other_cores:.2f} cores"
                print(f"    {r.engine:13s} first call {r.first_call_s:.3f} s, runs [{runs}] s{others}")
        print(f"    identity: {result.identity} {result.identity_detail}".rstrip(), flush=True)
        if result.retraced:
            print("    WARNING: our program was traced again during timed calls", flush=True)
    env["load_average_end"] = os.getloadavg()

    print()
    print(table(results))
    print(f"\nload average at start {env['load_average_start']}, at end {env['load_average_end']}")
    busiest = max((r.other_cores or 0.0 for c in results for r in (c.torch, c.ours) if r is not None), default=0.0)
    if busiest > NOISY_CORES:
        print(f"WARNING: other processes kept up to {busiest:.2f} cores busy during timed calls: these timings "
              f"are unreliable; rerun on a quiet machine", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        payload = dict(environment=env, results=[dict(dataclasses.asdict(r), speedup=r.speedup) for r in results])
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    failed = [r for r in results if r.identity == "MISMATCH"]
    if failed:
        print(f"\nFAIL: outputs differ from transformers in {len(failed)} case(s): "
              + "; ".join(f"{r.label}: {r.identity_detail}" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
