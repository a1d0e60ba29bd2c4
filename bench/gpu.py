"""The GPU benchmarks of issue 5 in one command: every step, its JSON and log in one folder, and a SUMMARY.md.

    bash bench/gpu.sh                 # or: bertgen bench gpu, or: python bench/gpu.py
    BERTGEN_GPU_BENCH_TINY=1 bash bench/gpu.sh      # the same steps with tiny shapes: a rehearsal on any CPU

It writes ``out/gpu-<UTC date-time>/``: ``manifest.json`` (device, versions, each step's command, status and
time), ``<step>.json`` and ``<step>.log`` per step, the persistent compilation cache ``xla-cache/``, and
``SUMMARY.md`` (``bench/gpu_summary.py``): the issue-5 target table with our value, transformers' value, the
ratio and met / not met, peak device memory per case, and every step's command, ready to paste into
BENCHMARKS.md.

Steps (in this order; one failing does not stop the others):

    generate-bf16         bench_generate.py --preset l24 --dtype bfloat16 (all four cases, ours and transformers)
    generate-bf16-cached  the same, ours only, with the compilation cache the step before filled
    generate-bf16-pallas  the same, ours only, attention through the Pallas kernel (BERTGEN_PALLAS_ATTENTION=1)
    generate-bf16-graphs  the same, ours only, batch 1 and 32, XLA's command buffers for every command type
                          (XLA_FLAGS, GRAPH_FLAGS below)
    generate-bf16-stored  the same, ours only, layers stored scanned and the decode steps run under nn.scan
    generate-fp32         bench_generate.py --preset l24 --cases b1,b32 (float32: the identity check)
    generate-fp32-cached  the same, ours only, cache filled
    generate-fp32-pallas  the identity check at batch 1 with the Pallas attention
    train-bf16            bench_train.py --preset l24 --dtype bfloat16 (batch 32, 512 source / 128 target tokens)
    train-bf16-cached     the same, ours only, cache filled
    train-bf16-dropout    the same with dropout 0.1 in both engines, as the anchors trained (time only: the
                          engines draw different masks)
    flax457               bench_flax457.py --preset l24 --dtype bfloat16 --train (transformers 4.57 Flax), when an
                          interpreter with transformers 4.57 and a GPU jax is found
    flax457-cached        the same again, cache filled
    flax457-dropout       its training step only, with dropout 0.1 (the anchor's setting; a program of its
                          own, so its first call compiles)
    quant                 bench_quant.py --preset l24 --dtype bfloat16 --modes float,int8,int4 --cases b1,b32,b128

Nothing is installed: the repository goes on PYTHONPATH, and the interpreter is this one (``bench/gpu.sh`` picks
``$PYTHON``, else ``.venv/bin/python`` or ``python3``, whichever has a GPU jax). The machine may be offline.
Every child process gets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` and JAX's persistent compilation cache in
``<run>/xla-cache`` (every program cached, however quick its compile), which starts empty, so a step's first
calls show the cold compile time and its ``-cached`` twin shows the time with the cache filled.

``--steps a,b`` runs those steps in the order given. ``--deadline SECONDS`` fits the run into a time-boxed lease:
each step may run only for what is left (less 15 s for the summary), a step is not started with under 45 s left
(its status says "skipped (out of time ...)"), and SUMMARY.md covers whatever finished. Put the steps that matter
most first, e.g. ``--steps generate-bf16,train-bf16,generate-bf16-cached,train-bf16-cached --deadline 560``.

The tiny mode (``BERTGEN_GPU_BENCH_TINY=1`` or ``--tiny``) appends shape overrides (hidden 64, 1+1 layers,
vocab 500, ...) and ``--runs 1`` to the very same commands, and lifts the GPU requirement; its SUMMARY.md says
it is a rehearsal.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:  # `bertgen bench gpu` runs this file with runpy, which does not add its folder
    sys.path.insert(0, _BENCH_DIR)
import _machine  # noqa: E402
import bench_flax457  # noqa: E402  (standard library only at import time)
import gpu_summary  # noqa: E402

REPO = _machine.REPO_ROOT
TINY_ENV = "BERTGEN_GPU_BENCH_TINY"
TIMEOUT_ENV = "BERTGEN_GPU_BENCH_STEP_TIMEOUT"  # seconds per step (default 5400)
RESERVE_S = 15.0    # --deadline: kept back for the manifest and SUMMARY.md
MIN_STEP_S = 45.0   # --deadline: no step is started with less left (a model load alone takes longer)

PALLAS_ENV = "BERTGEN_PALLAS_ATTENTION"  # bertgen_flax.gpu_kernels.ENV (this process does not import jax)
# generate-bf16-graphs: XLA's command buffers (CUDA graphs) for every command type, loops and conditionals
# included, and for the smallest graphs: a decode step launches a few hundred small kernels.
GRAPH_FLAGS = ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
               "--xla_gpu_graph_min_graph_size=1")

# The tiny rehearsal: appended to the real commands (argparse keeps the last value of a flag).
TINY_MODEL = ["--hidden", "64", "--encoder-layers", "1", "--decoder-layers", "1", "--heads", "2",
              "--intermediate", "128", "--vocab", "500"]
TINY = {
    "generate": TINY_MODEL + ["--source", "16", "--new-tokens", "4", "--runs", "1"],
    "train": TINY_MODEL + ["--batch", "4", "--source", "16", "--target", "8", "--runs", "1", "--warmup", "1"],
    "flax457": TINY_MODEL + ["--source", "16", "--new-tokens", "4", "--runs", "1", "--train-batch", "4",
                             "--train-source", "16", "--train-target", "8", "--train-runs", "1",
                             "--train-warmup", "1"],
    "quant": TINY_MODEL + ["--source", "16", "--new-tokens", "4", "--runs", "1", "--agreement-examples", "8",
                           "--agreement-max-new-tokens", "4"],
}


@dataclass
class Step:
    name: str
    kind: str                 # generate | train | flax457 | quant: which TINY overrides apply
    script: str               # under bench/
    args: list[str]
    python: Optional[str] = None   # None: this interpreter
    skip: Optional[str] = None     # a reason not to run it
    env: dict[str, str] = field(default_factory=dict)  # set for this step's process (over the run's environment)
    command: list[str] = field(default_factory=list)
    status: str = "pending"   # ok | failed (exit N) | timed out | skipped (...)
    rc: Optional[int] = None
    seconds: Optional[float] = None
    json: Optional[str] = None
    log: Optional[str] = None


def steps_for(flax_python: Optional[str], flax_why: str) -> list[Step]:
    """The run, in order. ``--json`` paths are filled in by ``run`` (``<step>.json`` in the run folder)."""
    gen_bf16 = ["--preset", "l24", "--dtype", "bfloat16", "--flax457", "off"]
    fp32 = ["--preset", "l24", "--dtype", "float32", "--flax457", "off"]
    gen_fp32 = fp32 + ["--cases", "b1,b32"]
    train = ["--preset", "l24", "--dtype", "bfloat16"]
    flax = ["--preset", "l24", "--dtype", "bfloat16", "--train"]
    quant = ["--preset", "l24", "--dtype", "bfloat16", "--modes", "float,int8,int4", "--cases", "b1,b32,b128"]
    flax_skip = None if flax_python else f"no transformers 4.57 interpreter with a usable jax: {flax_why}"
    pallas = {PALLAS_ENV: "1"}
    graphs = {"XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *GRAPH_FLAGS]))}
    return [
        Step("generate-bf16", "generate", "bench_generate.py", gen_bf16),
        Step("generate-bf16-cached", "generate", "bench_generate.py", gen_bf16 + ["--engines", "ours"]),
        Step("generate-bf16-pallas", "generate", "bench_generate.py", gen_bf16 + ["--engines", "ours"], env=pallas),
        Step("generate-bf16-graphs", "generate", "bench_generate.py",
             gen_bf16 + ["--engines", "ours", "--cases", "b1,b32"], env=graphs),
        Step("generate-bf16-stored", "generate", "bench_generate.py",
             gen_bf16 + ["--engines", "ours", "--layers", "scanned", "--decoder", "stored"]),
        Step("generate-fp32", "generate", "bench_generate.py", gen_fp32),
        Step("generate-fp32-cached", "generate", "bench_generate.py", gen_fp32 + ["--engines", "ours"]),
        Step("generate-fp32-pallas", "generate", "bench_generate.py", fp32 + ["--cases", "b1"], env=pallas),
        Step("train-bf16", "train", "bench_train.py", train),
        Step("train-bf16-cached", "train", "bench_train.py", train + ["--engines", "ours"]),
        Step("train-bf16-dropout", "train", "bench_train.py", train + ["--dropout", "0.1"]),
        Step("flax457", "flax457", "bench_flax457.py", flax, python=flax_python, skip=flax_skip),
        Step("flax457-cached", "flax457", "bench_flax457.py", flax, python=flax_python, skip=flax_skip),
        Step("flax457-dropout", "flax457", "bench_flax457.py", flax + ["--cases", "none", "--dropout", "0.1"],
             python=flax_python, skip=flax_skip),
        Step("quant", "quant", "bench_quant.py", quant),
    ]


# ---- the device, probed in a child process (this process never touches the GPU) --------------------------------
def probe_device() -> int:
    """``--probe-device``: versions, jax's backend and device, torch's CUDA device, as one JSON line."""
    info: dict[str, Any] = dict(python=sys.version.split()[0], executable=sys.executable)
    try:
        import jax
        import jaxlib
        devices = jax.devices()
        info.update(jax=jax.__version__, jaxlib=jaxlib.__version__, jax_backend=jax.default_backend(),
                    jax_device_kind=devices[0].device_kind, jax_device_count=len(devices))
    except Exception as e:  # noqa: BLE001 - reported, not fatal here
        info["jax_error"] = f"{type(e).__name__}: {e}"
    try:
        import torch
        cuda = torch.cuda.is_available()
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, torch_cuda_available=cuda,
                    torch_device_name=torch.cuda.get_device_name() if cuda else None,
                    cudnn=torch.backends.cudnn.version() if cuda else None)
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = f"{type(e).__name__}: {e}"
    for name in ("flax", "optax", "transformers", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            info[name] = None
    try:
        import bertgen_flax
        info["bertgen_flax"] = os.path.dirname(bertgen_flax.__file__)
    except Exception as e:  # noqa: BLE001
        info["bertgen_flax_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(info))
    return 0


def nvidia_smi() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi: not found"
    try:
        proc = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
        return proc.stdout.strip() or proc.stderr.strip() or f"nvidia-smi exited with {proc.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi: {e}"


def child_env(run_dir: str) -> dict[str, str]:
    """The environment of every step: the checkout on PYTHONPATH, no preallocation, the compilation cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(run_dir, "xla-cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def device_info(env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe-device"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    info = json.loads(lines[-1]) if lines else {"probe_error": proc.stderr.strip()[-2000:]}
    info["nvidia_smi"] = nvidia_smi()
    return info


# ---- running the steps ----------------------------------------------------------------------------------------
def run_step(step: Step, run_dir: str, env: dict[str, str], tiny: bool, timeout_s: float) -> None:
    step.json = f"{step.name}.json"
    step.log = f"{step.name}.log"
    python = step.python or sys.executable
    extra = TINY[step.kind] if tiny else []
    json_path = os.path.join(run_dir, step.json)
    if json_path.startswith(REPO + os.sep):
        json_path = os.path.relpath(json_path, REPO)  # steps run in the checkout: shorter commands to read
    step.command = [python, os.path.join("bench", step.script), *step.args, *extra, "--json", json_path]
    if tiny and step.env.get(PALLAS_ENV) == "1":  # no GPU: the kernel's program interpreted, still checked
        step.env = {**step.env, PALLAS_ENV: "interpret"}
    shown = " ".join([f"{k}={shlex.quote(v)}" for k, v in step.env.items()] + [shlex.quote(c) for c in step.command])
    print(f"\n=== {step.name}: {shown}", flush=True)
    log_path = os.path.join(run_dir, step.log)
    if step.skip:
        step.status = f"skipped ({step.skip})"
        with open(log_path, "w", encoding="utf-8") as f:
            f.write(step.status + "\n")
        print(f"=== {step.name}: {step.status}", flush=True)
        return
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shown + "\n")
        log.flush()
        proc = subprocess.Popen(step.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**env, **step.env}, cwd=REPO,
                                text=True, errors="replace", bufsize=1)
        watchdog = threading.Timer(timeout_s, proc.kill)  # a hung step must not hold up the others
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            step.rc = proc.wait()
        finally:
            watchdog.cancel()
        if time.perf_counter() - start >= timeout_s:
            step.status = f"timed out after {timeout_s:.0f} s (killed)"
            log.write(f"\n{step.status}\n")
        else:
            step.status = "ok" if step.rc == 0 else f"failed (exit {step.rc})"
    step.seconds = time.perf_counter() - start
    if not os.path.isfile(os.path.join(run_dir, step.json)):
        step.json = None
    print(f"=== {step.name}: {step.status} in {step.seconds:.0f} s", flush=True)


def write_manifest(path: str, manifest: dict[str, Any]) -> None:
    _machine.write_json(path, manifest)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="DIR", help="run folder (default: out/gpu-<UTC date-time>, tiny-... in tiny "
                                                 "mode)")
    p.add_argument("--tiny", action="store_true", help=f"tiny shapes, runs 1, no GPU needed (or {TINY_ENV}=1)")
    p.add_argument("--steps", help="comma-separated step names, run in the order given (default: all, in the "
                                   "order above; a -cached step belongs after its cold twin)")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="wall-clock budget of the whole run: a step gets at most what is left (less "
                        f"{RESERVE_S:.0f} s for the summary) and is skipped when under {MIN_STEP_S:.0f} s are left")
    p.add_argument("--summarise", metavar="RUN_DIR", help="only (re)write RUN_DIR/SUMMARY.md and print it")
    p.add_argument("--probe-device", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.deadline is not None and args.deadline <= RESERVE_S:
        p.error(f"--deadline must be more than {RESERVE_S:.0f} s, got {args.deadline:g}")
    return args


def step_budget(timeout_s: float, deadline_s: Optional[float], elapsed_s: float) -> Optional[float]:
    """Seconds a step may run: the per-step timeout, cut to what ``deadline_s`` leaves after ``elapsed_s`` (less
    the summary's reserve); None when that is under ``MIN_STEP_S``, so the step is not started."""
    if deadline_s is None:
        return timeout_s
    left = deadline_s - elapsed_s - RESERVE_S
    return None if left < MIN_STEP_S else min(timeout_s, left)


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.probe_device:
        return probe_device()
    if args.summarise:
        print(gpu_summary.write_summary(args.summarise))
        return 0
    tiny = args.tiny or os.environ.get(TINY_ENV, "0") not in ("", "0")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%SZ")
    run_dir = os.path.abspath(args.out or os.path.join(REPO, "out", f"{'tiny-' if tiny else ''}gpu-{stamp}"))
    env = child_env(run_dir)
    timeout_s = float(os.environ.get(TIMEOUT_ENV, "900" if tiny else "5400"))

    print(f"GPU benchmarks{' (TINY rehearsal)' if tiny else ''} -> {run_dir}", flush=True)
    device = device_info(env)
    print(f"interpreter: {sys.executable} (python {device.get('python')})")
    print(f"jax: {device.get('jax')} / jaxlib {device.get('jaxlib')}, backend {device.get('jax_backend')}, device "
          f"{device.get('jax_device_kind')} x{device.get('jax_device_count')}"
          + (f"  [{device['jax_error']}]" if "jax_error" in device else ""))
    print(f"torch: {device.get('torch')} (CUDA {device.get('torch_cuda')}), device {device.get('torch_device_name')}"
          + (f"  [{device['torch_error']}]" if "torch_error" in device else ""))
    print(f"nvidia-smi: {device['nvidia_smi']}")
    print(f"flax {device.get('flax')}, optax {device.get('optax')}, transformers {device.get('transformers')}",
          flush=True)
    if "bertgen_flax_error" in device:
        print(f"cannot import bertgen_flax from {REPO}: {device['bertgen_flax_error']}", file=sys.stderr)
        return 2
    if not tiny and (device.get("jax_backend") != "gpu" or not device.get("torch_cuda_available")):
        print(f"no GPU for both engines (jax backend {device.get('jax_backend')}, torch CUDA "
              f"{device.get('torch_cuda_available')}): pick an interpreter with CUDA jax and torch (PYTHON=... bash "
              f"bench/gpu.sh), or rehearse with {TINY_ENV}=1", file=sys.stderr)
        return 2
    if not device.get("transformers"):
        print("WARNING: this python has no transformers: the generate and train steps build their model with it "
              "and will fail (install any transformers 5.x or 4.57 beside torch)", file=sys.stderr)
    os.makedirs(run_dir, exist_ok=True)

    flax_python, flax_why = bench_flax457.find_interpreter(need_gpu=not tiny)
    if flax_python is None and not tiny:
        # a GPU machine's own python may carry transformers 4.57 with its CUDA jax
        flax_python, why = bench_flax457.find_interpreter(sys.executable, need_gpu=True)
        flax_why = f"{flax_why}; {why}" if flax_python is None else ""
    flax_info = bench_flax457.probe(flax_python)[0] if flax_python else None
    print(f"transformers 4.57 Flax: {flax_python} ({flax_info})" if flax_python else
          f"transformers 4.57 Flax: skipped ({flax_why})", flush=True)

    steps = steps_for(flax_python, flax_why)
    if args.steps:
        wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            print(f"unknown --steps {unknown}; choose from {', '.join(s.name for s in steps)}", file=sys.stderr)
            return 2
        by_name = {s.name: s for s in steps}
        steps = [by_name[name] for name in dict.fromkeys(wanted)]  # the order given, each step once
    manifest = dict(stamp=stamp, date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    tiny=tiny, run_dir=run_dir, repo=REPO, command=" ".join([sys.executable] + sys.argv),
                    device=device, flax457=dict(python=flax_python, info=flax_info, skipped=flax_why or None),
                    env={k: env[k] for k in ("PYTHONPATH", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                             "JAX_COMPILATION_CACHE_DIR",
                                             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")},
                    steps=[])
    manifest_path = os.path.join(run_dir, "manifest.json")
    # an existing run folder (--out DIR again): keep its other steps' records, so that a machine with a per-command
    # time limit can run the steps in several calls and still get one SUMMARY.md
    previous = gpu_summary.load_json(manifest_path) or {}
    kept = [s for s in previous.get("steps", []) if s.get("name") not in {step.name for step in steps}]
    if previous:
        manifest.update(stamp=previous.get("stamp", stamp), date_utc=previous.get("date_utc", manifest["date_utc"]))
    manifest["invocations"] = previous.get("invocations", []) + [manifest["command"]]
    order = [s.name for s in steps_for(flax_python, flax_why)]

    def records() -> list[dict[str, Any]]:
        done = kept + [asdict(s) for s in steps if s.status != "pending"]
        return sorted(done, key=lambda r: order.index(r["name"]) if r.get("name") in order else len(order))

    for step in steps:
        budget = step_budget(timeout_s, args.deadline, time.perf_counter() - started)
        if budget is None and not step.skip:
            step.skip = (f"out of time: --deadline {args.deadline:g} s, "
                         f"{time.perf_counter() - started:.0f} s spent before it")
        try:
            run_step(step, run_dir, env, tiny, budget or timeout_s)
        except Exception as e:  # noqa: BLE001 - one step's trouble must not stop the others
            step.status = f"failed to start ({type(e).__name__}: {e})"
            print(f"=== {step.name}: {step.status}", flush=True)
        manifest["steps"] = records()
        write_manifest(manifest_path, manifest)

    summary = gpu_summary.write_summary(run_dir)
    print("\n" + summary)
    print(f"\nwrote {os.path.join(run_dir, 'SUMMARY.md')}")
    failed = [s.name for s in steps if s.status not in ("ok",) and not s.status.startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
