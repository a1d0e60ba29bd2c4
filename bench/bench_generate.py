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

When an interpreter with transformers 4.57 and jax is at hand (``.venv-tf457`` after
``BERTGEN_BENCH_FLAX457=1 scripts/install.sh``, or ``$BERTGEN_FLAX457_PYTHON``), the greedy cases also run
transformers 4.57's Flax port (``bench_flax457.py``) in a subprocess, and a second table puts its figures next to
ours and transformers' PyTorch (speed only: FlaxBert is not BertGeneration). Otherwise one line says why not.
On a GPU a further table gives the peak device memory per case.

Exit status: 0 when every checked case is identical, 1 when any float32 output differs (after printing the table),
2 on bad arguments.

    python bench/bench_generate.py                          # small preset on the CPU, all four cases
    python bench/bench_generate.py --preset l24 --dtype bfloat16 --json out/bench_l24.json   # on a GPU
    bash bench/gpu.sh                                       # every GPU benchmark at once (bench/gpu.py)
"""
from __future__ import annotations

import os

# Before jax starts a GPU backend: do not grab 75% of the GPU up front, torch needs memory in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:  # `bertgen bench` runs this file with runpy, which does not add its folder
    sys.path.insert(0, _BENCH_DIR)
import _machine  # noqa: E402  (bench/: machine helpers shared by the benchmark scripts)
import bench_flax457  # noqa: E402  (imports nothing heavy at module level)
from _workload import (CASES, DECODER_START, EOS, PAD, PRESETS, Shape,  # noqa: E402
                       add_shape_args, apply_shape_args, make_inputs, shape_flags)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import bertgen_flax  # noqa: E402
from bertgen_flax import generation, gpu_kernels  # noqa: E402

NOISY_CORES = _machine.NOISY_CORES  # warn when other processes use more than this many cores while we time
FLAX457_SCRIPT = os.path.join(_BENCH_DIR, "bench_flax457.py")


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
    # GPU only: torch.cuda.max_memory_allocated() over this case's calls (reset before them); for ours jax's
    # peak_bytes_in_use, which jax cannot reset: the peak of the process so far, this case included
    peak_memory_bytes: Optional[int] = None


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
    add_shape_args(p, Shape)
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
    p.add_argument("--layers", choices=("unrolled", "scanned"), default="unrolled",
                   help="how our model stores its layers: unrolled (from_pretrained(scan_layers=False), the layout "
                        "Text2TextGenerator loads for inference: generate reads it without copies) or scanned (the "
                        "from_pretrained default: each call first slices every layer out of the stack)")
    p.add_argument("--decoder", choices=("unrolled", "stored"), default="unrolled",
                   help="our decode steps with the decoder layers unrolled (default) or run as stored "
                        "(generate(unroll_decoder=False)); with --layers scanned that is under nn.scan: a shorter "
                        "compile, slower steps")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the weights; numpy seed for inputs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--flax457", default="auto", metavar="auto|off|PYTHON",
                   help="also time transformers 4.57's Flax port (bench_flax457.py) on the greedy cases, in a "
                        "subprocess run by the 4.57 venv's interpreter: auto (default) uses $BERTGEN_FLAX457_PYTHON "
                        "or .venv-tf457/bin/python when it has jax, and says why when it skips; off; or the path of "
                        "an interpreter with transformers 4.57 and jax")
    args = p.parse_args(argv)
    args.shape = apply_shape_args(args, PRESETS[args.preset])
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


# ---- devices -------------------------------------------------------------------------------------------------
select_devices = _machine.select_devices


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


def generate_kwargs(shape: Shape, beams: int) -> dict[str, Any]:
    """The same search settings for both engines."""
    return dict(max_new_tokens=shape.new_tokens, min_new_tokens=shape.new_tokens, num_beams=beams,
                num_return_sequences=1, do_sample=False, decoder_start_token_id=DECODER_START,
                pad_token_id=PAD, eos_token_id=EOS)


# ---- timing ---------------------------------------------------------------------------------------------------
def time_calls(call: Callable[[], np.ndarray], warmup: int, runs: int) -> tuple[Timing, np.ndarray]:
    """Times ``call`` (which must block until its result is ready); returns the timing and the last output."""
    def timed() -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        out = call()
        return time.perf_counter() - start, out

    first, out = timed()
    warm = [timed()[0] for _ in range(warmup - 1)]
    runs_s = []
    before, start = _machine.machine_cpu_seconds(), time.perf_counter()
    for _ in range(runs):
        seconds, out = timed()
        runs_s.append(seconds)
    others = _machine.other_cores(before, _machine.machine_cpu_seconds(), time.perf_counter() - start)
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

        _machine.torch_reset_peak(torch_device)
        timing, torch_out = time_calls(call_torch, args.warmup, args.runs)
        torch_result = engine_result("transformers", timing, case.batch, shape.new_tokens, with_compile=False)
        torch_result.peak_memory_bytes = _machine.torch_peak_bytes(torch_device)
        if torch_device == "cuda":
            torch.cuda.empty_cache()

    retraced = False
    if args.engines in ("both", "ours"):
        def call_ours() -> np.ndarray:
            out = ours.generate(ids, mask, return_scores=False, unroll_decoder=args.decoder == "unrolled", **kwargs)
            return np.asarray(jax.block_until_ready(out))

        traces = generation.TRACE_COUNTS["seq2seq"]
        timing, ours_out = time_calls(call_ours, args.warmup, args.runs)  # the first call compiles the program
        retraced = generation.TRACE_COUNTS["seq2seq"] - traces > 1
        ours_result = engine_result("bertgen_flax", timing, case.batch, shape.new_tokens, with_compile=True)
        ours_result.peak_memory_bytes = _machine.jax_peak_bytes()

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


def memory_table(results: Sequence[CaseResult]) -> str:
    """Peak device memory per case (GPU only): torch's is per case; jax's peak cannot be reset, so ours is the
    peak of the process up to and including the case."""
    def gib(r: Optional[EngineResult]) -> str:
        return "-" if r is None or r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**30:.2f}"

    rows = ["| case | transformers peak GiB (this case) | ours peak GiB (process so far) |", "|---|---|---|"]
    rows += [f"| {r.label} | {gib(r.torch)} | {gib(r.ours)} |" for r in results]
    return "\n".join(rows)


# ---- transformers 4.57's Flax port ------------------------------------------------------------------------------
def run_flax457(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """Runs bench_flax457.py on the greedy cases in the 4.57 venv's interpreter; its JSON, or {"skipped": why}
    after printing one line that says why."""
    cases = [k for k in args.case_keys if CASES[k].beams == 1]
    python, why = (None, "--flax457 off") if args.flax457 == "off" else \
        bench_flax457.find_interpreter(None if args.flax457 == "auto" else args.flax457, need_gpu=backend == "gpu")
    if python is not None and not cases:
        python, why = None, "no greedy case selected (its beam search is not comparable)"
    if python is None:
        print(f"\ntransformers 4.57 Flax: skipped ({why})", flush=True)
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="bench_flax457_") as tmp:
        out = os.path.join(tmp, "flax457.json")
        command = [python, bench_flax457.__file__, *shape_flags(args.shape), "--cases", ",".join(cases),
                   "--runs", str(args.runs), "--warmup", str(args.warmup), "--dtype", args.dtype,
                   "--device", "cpu" if backend == "cpu" else args.device, "--seed", str(args.seed), "--json", out]
        print(f"\ntransformers 4.57 Flax ({python}): {' '.join(command[1:])}", flush=True)
        rc = subprocess.run(command).returncode
        if rc != 0 or not os.path.isfile(out):
            why = f"bench_flax457.py exited with status {rc}"
            print(f"transformers 4.57 Flax: failed ({why})", flush=True)
            return {"skipped": why, "command": command}
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def flax457_table(results: Sequence[CaseResult], flax: Sequence[dict[str, Any]]) -> str:
    """Ours, transformers' PyTorch and transformers 4.57's Flax port side by side (speed only, same shape)."""
    by_case = {r["case"]: r for r in flax}
    rows = ["| case | transformers PyTorch ms/step | transformers 4.57 Flax ms/step | ours ms/step "
            "| 4.57 Flax tok/s | ours tok/s | 4.57 Flax first call s | ours first call s "
            "| speed-up ours vs 4.57 Flax | speed-up ours vs PyTorch |", "|" + "---|" * 10]
    for r in results:
        f = by_case.get(r.case)
        if f is None:
            continue
        t, o = r.torch, r.ours
        vs_flax = "-" if o is None else f"{f['median_s'] / o.median_s:.2f}x"
        cells = [r.label, _fmt(t and t.ms_per_step, ".2f"), _fmt(f["ms_per_step"], ".2f"),
                 _fmt(o and o.ms_per_step, ".2f"), _fmt(f["tokens_per_s"], ",.0f"), _fmt(o and o.tokens_per_s, ",.0f"),
                 _fmt(f["first_call_s"], ".1f"), _fmt(o and o.first_call_s, ".1f"), vs_flax,
                 "-" if r.speedup is None else f"{r.speedup:.2f}x"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def environment(args: argparse.Namespace, torch_device: str, backend: str, threads: int) -> dict[str, Any]:
    jax_device = jax.devices()[0]
    return dict(
        date=_machine.now_iso(),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        preset=args.preset, shape=dataclasses.asdict(args.shape), dtype=args.dtype, runs=args.runs,
        warmup=args.warmup, seed=args.seed, engines=args.engines, layers=args.layers, decoder=args.decoder,
        versions=_machine.versions("jax", "jaxlib", "torch", "transformers", "numpy"),
        cpu=_machine.cpu_name(), usable_cores=threads,
        torch_device=torch_device,
        torch_device_name=torch.cuda.get_device_name() if torch_device == "cuda" else _machine.cpu_name(),
        torch_threads=torch.get_num_threads(),
        jax_backend=backend, jax_device_kind=jax_device.device_kind,
        jax_cpu_threads=threads if backend == "cpu" else None,
        jax_matmul_precision=jax.config.jax_default_matmul_precision,
        pallas_attention=os.environ.get(gpu_kernels.ENV, "0"), xla_flags=os.environ.get("XLA_FLAGS", ""),
        load_average_start=os.getloadavg(),
    )


def print_environment(env: dict[str, Any]) -> None:
    s = env["shape"]
    print(f"date {env['date']}  |  {env['command']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(f"torch: {env['torch_device']} ({env['torch_device_name']}), {env['torch_threads']} threads, eval + no_grad")
    jax_threads = f", XLA CPU pool over {env['jax_cpu_threads']} cores" if env["jax_cpu_threads"] else ""
    print(f"jax:   {env['jax_backend']} ({env['jax_device_kind']}){jax_threads}, "
          f"matmul precision {env['jax_matmul_precision'] or 'default'}, Pallas attention "
          f"{env['pallas_attention']}, XLA_FLAGS {env['xla_flags'] or '-'}")
    print(f"cpu: {env['cpu']}, {env['usable_cores']} usable cores, load average {env['load_average_start']}")
    print(f"model: preset {env['preset']}, hidden {s['hidden']}, layers {s['encoder_layers']}+{s['decoder_layers']}, "
          f"heads {s['heads']}, intermediate {s['intermediate']}, vocab {s['vocab']}, max positions "
          f"{s['max_positions']}; source {s['source']} ragged, {s['new_tokens']} new tokens forced; {env['dtype']}; "
          f"median of {env['runs']} after {env['warmup']} warm-up; ours: layers {env['layers']}, decode steps "
          f"{env['decoder']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch_device, backend = select_devices(args.device)
    threads = _machine.usable_cores()
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
        ours = bertgen_flax.EncoderDecoderModel.from_pretrained(tmp, dtype=args.dtype, param_dtype=args.dtype,
                                                                scan_layers=args.layers == "scanned")
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
    if any(r.peak_memory_bytes is not None for c in results for r in (c.torch, c.ours) if r is not None):
        print()
        print(memory_table(results))
    print(f"\nload average at start {env['load_average_start']}, at end {env['load_average_end']}")
    busiest = max((r.other_cores or 0.0 for c in results for r in (c.torch, c.ours) if r is not None), default=0.0)
    _machine.warn_if_noisy(busiest)

    # transformers 4.57's Flax port, in its own interpreter, after ours and transformers have freed the device
    del reference, ours
    gc.collect()
    if torch_device == "cuda":
        torch.cuda.empty_cache()
    flax457 = run_flax457(args, backend)
    if flax457.get("results"):
        print()
        print(flax457_table(results, flax457["results"]))
        print(bench_flax457.NOT_COMPARABLE)
    if args.json:
        payload = dict(environment=env, results=[dict(dataclasses.asdict(r), speedup=r.speedup) for r in results],
                       flax457=flax457)
        _machine.write_json(args.json, payload)
        print(f"wrote {args.json}")
    failed = [r for r in results if r.identity == "MISMATCH"]
    if failed:
        print(f"\nFAIL: outputs differ from transformers in {len(failed)} case(s): "
              + "; ".join(f"{r.label}: {r.identity_detail}" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
