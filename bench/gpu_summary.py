"""Turns a ``bench/gpu.py`` run folder into SUMMARY.md: the issue-5 targets met or not, ready for BENCHMARKS.md.

    python bench/gpu_summary.py out/gpu-20261124-101500Z      # (re)writes and prints its SUMMARY.md

Reads ``manifest.json`` and the steps' JSON files (``generate-bf16.json``, ``generate-bf16-cached.json``,
``generate-fp32.json``, ``train-bf16.json``, ``train-bf16-cached.json``, ``train-bf16-dropout.json``,
``flax457.json``, ``flax457-cached.json``, ``flax457-dropout.json``, ``quant.json``); a missing file leaves its
figures "not measured". Standard library only.

Ratios are speed-ups of ours, so above 1 means ours is faster: the other engine's time / ours for ms/step, ours /
the other's for tokens/s and TFLOP/s. transformers 4.57 Flax is FlaxBert, not BertGeneration (see
``bench_flax457.py``): speed at the same shape only. Its training TFLOP/s is computed with our parameter counts
(the same 6 N tokens work as ours), when the training step of ours ran.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

# the targets of issue 5 (one H100 80GB HBM3; L-24 shape, bfloat16)
ISSUE5 = "issue 5"


@dataclass(frozen=True)
class Target:
    label: str
    goal: float
    higher_is_better: bool
    unit_spec: str          # format of the values
    speed: bool = True      # a ratio makes sense (not for first-call seconds)


TARGETS = {
    "b1": Target("batch 1 greedy, ms per step", 0.6, False, ".2f"),
    "b32": Target("batch 32 greedy, new tokens/s", 40_000, True, ",.0f"),
    "b128": Target("batch 128 greedy, new tokens/s", 100_000, True, ",.0f"),
    "b32-beam4": Target("batch 32 beam 4, new tokens/s", 25_000, True, ",.0f"),
    "first": Target("first call (compile), s, slowest generate case, cache empty", 5, False, ".1f", speed=False),
    "first_cached": Target("first call, s, slowest generate case, persistent cache filled", 5, False, ".1f",
                           speed=False),
    "train_tflops": Target("training step, batch 32, 512/128 tokens, TFLOP/s (6 N tokens)", 450, True, ".1f"),
    "train_tflops_dropout": Target("the same with dropout 0.1 (the anchors' setting), TFLOP/s", 450, True, ".1f"),
    "train_first": Target("first call of the training step (compile), s, cache empty", 30, False, ".1f",
                          speed=False),
    "train_first_cached": Target("first call of the training step, s, persistent cache filled", 30, False, ".1f",
                                 speed=False),
}


# ---- loading --------------------------------------------------------------------------------------------------
def load_json(path: str) -> Optional[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_run(run_dir: str) -> dict[str, Any]:
    """The manifest and every step's JSON (None where missing)."""
    run = {"manifest": load_json(os.path.join(run_dir, "manifest.json")) or {}}
    for name in ("generate-bf16", "generate-bf16-cached", "generate-bf16-pallas", "generate-bf16-graphs",
                 "generate-bf16-stored", "generate-fp32", "generate-fp32-cached", "generate-fp32-pallas",
                 "train-bf16", "train-bf16-cached", "train-bf16-dropout", "flax457", "flax457-cached",
                 "flax457-dropout", "quant"):
        run[name] = load_json(os.path.join(run_dir, f"{name}.json"))
    return run


def gen_case(payload: Optional[dict], case: str, engine: str) -> Optional[dict]:
    """bench_generate.py JSON: the engine's result ("torch" or "ours") of one case."""
    for r in (payload or {}).get("results", []):
        if r.get("case") == case:
            return r.get(engine)
    return None


def flax_case(payload: Optional[dict], case: str) -> Optional[dict]:
    for r in (payload or {}).get("results", []) or []:
        if r.get("case") == case:
            return r
    return None


def train_engine(payload: Optional[dict], engine: str) -> Optional[dict]:
    """bench_train.py JSON: "transformers" or "bertgen_flax"."""
    for r in (payload or {}).get("results", []):
        if r.get("engine") == engine:
            return r
    return None


def _max(values: list[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def planned_bytes(m: dict) -> int:
    """Bytes XLA planned for a compiled program from its ``memory_analysis()`` sizes (keys temp, arguments, outputs,
    aliased): temporaries + arguments + outputs, less the donated (aliased) buffers counted in both. bench_train.py
    prints the same figure."""
    return m["temp"] + m["arguments"] + m["outputs"] - m["aliased"]


def _get(d: Optional[dict], key: str) -> Optional[float]:
    return None if d is None else d.get(key)


# ---- the figures ----------------------------------------------------------------------------------------------
def figures(run: dict[str, Any]) -> dict[str, tuple[Optional[float], Optional[float], Optional[float]]]:
    """target key -> (ours, transformers PyTorch, transformers 4.57 Flax)."""
    gen, gen_c = run["generate-bf16"], run["generate-bf16-cached"]
    flax, flax_c = run["flax457"], run["flax457-cached"]
    out: dict[str, tuple[Optional[float], Optional[float], Optional[float]]] = {}
    out["b1"] = (_get(gen_case(gen, "b1", "ours"), "ms_per_step"), _get(gen_case(gen, "b1", "torch"), "ms_per_step"),
                 _get(flax_case(flax, "b1"), "ms_per_step"))
    for case in ("b32", "b128", "b32-beam4"):
        out[case] = (_get(gen_case(gen, case, "ours"), "tokens_per_s"),
                     _get(gen_case(gen, case, "torch"), "tokens_per_s"),
                     _get(flax_case(flax, case), "tokens_per_s"))  # no beam case for Flax: None

    def slowest_first(payload: Optional[dict], engine: str) -> Optional[float]:
        return _max([_get(r.get(engine), "first_call_s") for r in (payload or {}).get("results", [])])

    def slowest_flax(payload: Optional[dict]) -> Optional[float]:
        return _max([r.get("first_call_s") for r in (payload or {}).get("results", []) or []])

    out["first"] = (slowest_first(gen, "ours"), slowest_first(gen, "torch"), slowest_flax(flax))
    out["first_cached"] = (slowest_first(gen_c, "ours"), None, slowest_flax(flax_c))

    train, train_c = run["train-bf16"], run["train-bf16-cached"]
    ours_t, torch_t = train_engine(train, "bertgen_flax"), train_engine(train, "transformers")
    flax_t, flax_tc = (flax or {}).get("train"), (flax_c or {}).get("train")
    out["train_tflops"] = (_get(ours_t, "tflops"), _get(torch_t, "tflops"), flax_tflops(train, flax_t))
    drop = run.get("train-bf16-dropout")
    out["train_tflops_dropout"] = (_get(train_engine(drop, "bertgen_flax"), "tflops"),
                                   _get(train_engine(drop, "transformers"), "tflops"),
                                   flax_tflops(drop, (run.get("flax457-dropout") or {}).get("train")))
    out["train_first"] = (_get(ours_t, "first_call_s"), _get(torch_t, "first_call_s"), _get(flax_t, "first_call_s"))
    out["train_first_cached"] = (_get(train_engine(train_c, "bertgen_flax"), "first_call_s"), None,
                                 _get(flax_tc, "first_call_s"))
    return out


def flax_tflops(train: Optional[dict], flax_train: Optional[dict]) -> Optional[float]:
    """4.57 Flax's training TFLOP/s on our parameter counts (same work as ours) when ours ran at the same shape,
    else on its own counts."""
    if not flax_train:
        return None
    env = (train or {}).get("environment", {})
    shape = env.get("shape", {})
    same = all(shape.get(k) == flax_train.get(k) for k in ("batch", "source", "target")) and shape
    if same and env.get("parameters_encoder") and env.get("parameters_decoder"):
        b, s, t = flax_train["batch"], flax_train["source"], flax_train["target"]
        flops = 6 * (env["parameters_encoder"] * b * s + env["parameters_decoder"] * b * t)
        return flops / flax_train["median_s"] / 1e12
    return flax_train.get("tflops")


def ratio(target: Target, ours: Optional[float], other: Optional[float]) -> str:
    if not target.speed or ours is None or other is None or ours == 0 or other == 0:
        return "-"
    return f"{(ours / other if target.higher_is_better else other / ours):.2f}x"


def verdict(target: Target, ours: Optional[float]) -> str:
    if ours is None:
        return "not measured"
    met = ours >= target.goal if target.higher_is_better else ours <= target.goal
    return "met" if met else "**not met**"


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def target_table(run: dict[str, Any]) -> str:
    figs = figures(run)
    lines = ["| target | goal | ours | transformers PyTorch | ours vs PyTorch | transformers 4.57 Flax "
             "| ours vs 4.57 Flax | met |", "|" + "---|" * 8]
    for key, target in TARGETS.items():
        ours, tf, fx = figs[key]
        goal = ("<= " if not target.higher_is_better else ">= ") + format(target.goal, target.unit_spec)
        flax_cell = "not comparable" if key == "b32-beam4" else fmt(fx, target.unit_spec)
        lines.append(f"| {target.label} | {goal} | {fmt(ours, target.unit_spec)} | {fmt(tf, target.unit_spec)} | "
                     f"{ratio(target, ours, tf)} | {flax_cell} | {ratio(target, ours, fx)} | "
                     f"{verdict(target, ours)} |")
    return "\n".join(lines)


# ---- the other tables -----------------------------------------------------------------------------------------
def gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def generate_table(payload: Optional[dict], flax: Optional[dict]) -> str:
    lines = ["| case | transformers ms/step | ours ms/step | 4.57 Flax ms/step | transformers tok/s | ours tok/s "
             "| 4.57 Flax tok/s | ours first call s | ours compile s | speed-up vs transformers | identical |",
             "|" + "---|" * 11]
    for r in (payload or {}).get("results", []):
        t, o, f = r.get("torch"), r.get("ours"), flax_case(flax, r.get("case"))
        speed = r.get("speedup")
        lines.append(f"| {r.get('label')} | {fmt(_get(t, 'ms_per_step'), '.2f')} | {fmt(_get(o, 'ms_per_step'), '.2f')}"
                     f" | {fmt(_get(f, 'ms_per_step'), '.2f')} | {fmt(_get(t, 'tokens_per_s'), ',.0f')} | "
                     f"{fmt(_get(o, 'tokens_per_s'), ',.0f')} | {fmt(_get(f, 'tokens_per_s'), ',.0f')} | "
                     f"{fmt(_get(o, 'first_call_s'), '.1f')} | {fmt(_get(o, 'compile_s'), '.1f')} | "
                     f"{'-' if speed is None else f'{speed:.2f}x'} | {r.get('identity', '-')} |")
    return "\n".join(lines)


def stored_table(run: dict[str, Any]) -> str:
    """Our layers unrolled (the inference layout, the default) against stored scanned and run under nn.scan in the
    decode steps (``--layers scanned --decoder stored``)."""
    unrolled, stored = run["generate-bf16"], run["generate-bf16-stored"]
    if stored is None:
        return "not measured."
    lines = ["| case | unrolled ms/step | scanned ms/step | unrolled first call s | scanned first call s |",
             "|---|---|---|---|---|"]
    for r in (stored or {}).get("results", []):
        u, st = gen_case(unrolled, r.get("case"), "ours"), r.get("ours")
        lines.append(f"| {r.get('label')} | {fmt(_get(u, 'ms_per_step'), '.2f')} | {fmt(_get(st, 'ms_per_step'), '.2f')}"
                     f" | {fmt(_get(u, 'first_call_s'), '.1f')} | {fmt(_get(st, 'first_call_s'), '.1f')} |")
    return "\n".join(lines)


def variants_table(run: dict[str, Any]) -> str:
    """Our decode steps with the cache filled: XLA's attention (``generate-bf16-cached``) against the Pallas kernel
    and against XLA's command buffers for every command type; speed-ups above 1 favour the variant."""
    base, pallas, graphs = run["generate-bf16-cached"], run["generate-bf16-pallas"], run["generate-bf16-graphs"]
    if pallas is None and graphs is None:
        return "not measured."
    lines = ["| case | XLA attention ms/step | Pallas attention ms/step | speed-up | command buffers ms/step "
             "| speed-up | Pallas first call s |", "|---|---|---|---|---|---|---|"]
    for r in (base or pallas or graphs or {}).get("results", []):
        case = r.get("case")
        b, p, g = (_get(gen_case(x, case, "ours"), "ms_per_step") for x in (base, pallas, graphs))
        up = lambda other: "-" if b is None or not other else f"{b / other:.2f}x"
        lines.append(f"| {r.get('label')} | {fmt(b, '.2f')} | {fmt(p, '.2f')} | {up(p)} | {fmt(g, '.2f')} | {up(g)} "
                     f"| {fmt(_get(gen_case(pallas, case, 'ours'), 'first_call_s'), '.1f')} |")
    return "\n".join(lines)


def memory_table(run: dict[str, Any]) -> str:
    gen, flax = run["generate-bf16"], run["flax457"]
    lines = ["| case | ours peak GiB (process so far) | transformers peak GiB (this case) "
             "| 4.57 Flax peak GiB (process so far) |", "|---|---|---|---|"]
    for r in (gen or {}).get("results", []):
        lines.append(f"| generate, {r.get('label')} | {gib(_get(r.get('ours'), 'peak_memory_bytes'))} | "
                     f"{gib(_get(r.get('torch'), 'peak_memory_bytes'))} | "
                     f"{gib(_get(flax_case(flax, r.get('case')), 'peak_memory_bytes'))} |")
    train = run["train-bf16"]
    lines.append(f"| training step | {gib(_get(train_engine(train, 'bertgen_flax'), 'peak_memory_bytes'))} | "
                 f"{gib(_get(train_engine(train, 'transformers'), 'peak_memory_bytes'))} | "
                 f"{gib(_get((flax or {}).get('train'), 'peak_memory_bytes'))} |")
    plan = _get(train_engine(train, "bertgen_flax"), "xla_memory_bytes")
    if plan:  # what XLA planned for our compiled step; bench_train.py's row of the same name
        planned = planned_bytes(plan)
        lines.append(f"| training step, XLA's plan of ours (temporaries + arguments + outputs - aliased) | "
                     f"{gib(planned)} | - | - |")
    return "\n".join(lines)


def compile_table(run: dict[str, Any]) -> str:
    gen, gen_c, fp, fp_c = (run["generate-bf16"], run["generate-bf16-cached"], run["generate-fp32"],
                            run["generate-fp32-cached"])
    flax, flax_c = run["flax457"], run["flax457-cached"]
    lines = ["| program | ours first call s, cache empty | ours, cache filled | 4.57 Flax, cache empty "
             "| 4.57 Flax, cache filled |", "|---|---|---|---|---|"]
    for label, cold, warm, with_flax in (("bfloat16", gen, gen_c, True), ("float32", fp, fp_c, False)):
        for r in (cold or {}).get("results", []):
            case = r.get("case")
            w = gen_case(warm, case, "ours")
            fc, fw = (flax_case(flax, case), flax_case(flax_c, case)) if with_flax else (None, None)
            lines.append(f"| generate {label}, {r.get('label')} | {fmt(_get(r.get('ours'), 'first_call_s'), '.1f')} "
                         f"| {fmt(_get(w, 'first_call_s'), '.1f')} | {fmt(_get(fc, 'first_call_s'), '.1f')} | "
                         f"{fmt(_get(fw, 'first_call_s'), '.1f')} |")
    lines.append(f"| training step bfloat16 | "
                 f"{fmt(_get(train_engine(run['train-bf16'], 'bertgen_flax'), 'first_call_s'), '.1f')} | "
                 f"{fmt(_get(train_engine(run['train-bf16-cached'], 'bertgen_flax'), 'first_call_s'), '.1f')} | "
                 f"{fmt(_get((flax or {}).get('train'), 'first_call_s'), '.1f')} | "
                 f"{fmt(_get((flax_c or {}).get('train'), 'first_call_s'), '.1f')} |")
    return "\n".join(lines)


def train_table(run: dict[str, Any]) -> str:
    train, flax = run["train-bf16"], run["flax457"]
    t, o, f = train_engine(train, "transformers"), train_engine(train, "bertgen_flax"), (flax or {}).get("train")
    rows: list[tuple[str, Callable[[Optional[dict]], Optional[float]], str]] = [
        ("step ms (median)", lambda r: None if r is None or r.get("median_s") is None else 1e3 * r["median_s"], ".1f"),
        ("tokens/s, non-padding", lambda r: _get(r, "tokens_per_s"), ",.0f"),
        ("model TFLOP/s (6 N tokens)", lambda r: _get(r, "tflops"), ".1f"),
        ("MFU", lambda r: _get(r, "mfu"), ".1%"),
        ("first call s", lambda r: _get(r, "first_call_s"), ".1f"),
        ("peak device memory GiB", lambda r: None if _get(r, "peak_memory_bytes") is None
         else r["peak_memory_bytes"] / 2**30, ".2f"),
    ]
    lines = ["| | transformers PyTorch | ours | transformers 4.57 Flax |", "|---|---|---|---|"]
    for label, get, spec in rows:
        fx = flax_tflops(train, f) if label.startswith("model TFLOP/s") else get(f)
        lines.append(f"| {label} | {fmt(get(t), spec)} | {fmt(get(o), spec)} | {fmt(fx, spec)} |")
    check = (train or {}).get("check", {}).get("verdict")
    if check:
        lines.append(f"\nCheck of the two engines' step 1 and 2 (bfloat16: informational): {check}.")
    return "\n".join(lines)


def identity_line(payload: Optional[dict]) -> str:
    results = (payload or {}).get("results", [])
    if not results:
        return "float32 identity check: not measured."
    parts = [f"{r.get('label')}: {r.get('identity')} ({r.get('identity_detail', '')})" for r in results]
    return "float32 identity check against transformers: " + "; ".join(parts) + "."


def quant_table(payload: Any) -> str:
    """bench_quant.py's JSON: one row per mode and case when it has the layout ``results: {mode: {cases: {case:
    {...}}, ...}}``; otherwise its JSON, shortened (the script is young and its layout may change)."""
    if payload is None:
        return "not measured."
    modes = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(modes, dict) or not all(isinstance(m, dict) and isinstance(m.get("cases"), dict)
                                              for m in modes.values()):
        return "```json\n" + json.dumps(payload, indent=1)[:4000] + "\n```"
    float_ms = {case: c.get("ms_per_step") for case, c in (modes.get("float") or {}).get("cases", {}).items()}
    lines = ["| mode | case | ms/step | tok/s | first call s | speed vs float | weights MB | program GB | peak "
             "| token agreement % | sequence agreement % |", "|" + "---|" * 11]
    for mode, m in modes.items():
        peaks = [(k, v) for k, v in m.items() if k.startswith("peak") and isinstance(v, (int, float))]
        peak = "-" if not peaks else f"{peaks[0][1]:.2f} ({peaks[0][0]})"
        weights = "-" if m.get("param_bytes") is None else f"{m['param_bytes'] / 1e6:,.1f}"
        for case, c in m["cases"].items():
            base, ms = float_ms.get(case), c.get("ms_per_step")
            speed = "-" if not base or not ms else f"{base / ms:.2f}x"
            lines.append(f"| {mode} | {case} | {fmt(ms, '.2f')} | {fmt(c.get('tokens_per_s'), ',.0f')} | "
                         f"{fmt(c.get('first_call_s'), '.1f')} | {speed} | {weights} | "
                         f"{fmt(c.get('program_total_gb'), '.2f')} | {peak} | "
                         f"{fmt(m.get('token_agreement'), '.1f')} | {fmt(m.get('sequence_agreement'), '.1f')} |")
    return "\n".join(lines)


# ---- the summary ----------------------------------------------------------------------------------------------
def summary(run_dir: str) -> str:
    run = load_run(run_dir)
    m = run["manifest"]
    dev = m.get("device", {})
    steps = m.get("steps", [])
    gen_env = (run["generate-bf16"] or {}).get("environment", {})
    flax_env = (run["flax457"] or {}).get("environment", {})
    title = f"## GPU run {m.get('stamp', os.path.basename(run_dir))}"
    if m.get("tiny"):
        title += " (TINY REHEARSAL: tiny shapes, not a measurement)"
    out = [title, ""]
    if m.get("tiny"):
        out += ["> BERTGEN_GPU_BENCH_TINY=1: every step ran with tiny shapes (hidden 64, 1+1 layers) and one timed "
                "call, to check the driver end to end. None of these figures is a benchmark result.", ""]
    versions = ", ".join(f"{k} {dev.get(k)}" for k in ("python", "jax", "jaxlib", "flax", "optax", "torch",
                                                        "transformers", "numpy") if dev.get(k))
    out += [f"- Date (UTC): {m.get('date_utc', '?')}",
            f"- Device: jax `{dev.get('jax_device_kind')}` ({dev.get('jax_backend')}, {dev.get('jax_device_count')} "
            f"device(s)); torch `{dev.get('torch_device_name')}`; nvidia-smi: `{dev.get('nvidia_smi')}`",
            f"- Versions: {versions}; CUDA (torch) {dev.get('torch_cuda')}, cuDNN {dev.get('cudnn')}",
            "- transformers 4.57 Flax: " + (
                ", ".join(f"{k} {v}" for k, v in (flax_env.get("versions") or {}).items()) + f" (jax backend "
                f"{flax_env.get('jax_backend')}, {flax_env.get('jax_device_kind')})" if flax_env else
                f"skipped ({(m.get('flax457') or {}).get('skipped') or 'no result'})"),
            f"- Shape: {gen_env.get('shape', 'see the commands')}; cases forced to the full length "
            f"(min_new_tokens == max_new_tokens)",
            "- Driver: " + ", then ".join(f"`{c}`" for c in (m.get("invocations") or [m.get("command", "?")]))
            + "; JAX persistent compilation cache "
            f"`{(m.get('env') or {}).get('JAX_COMPILATION_CACHE_DIR')}`, empty when the run folder was created",
            "", f"### Targets of {ISSUE5} (bfloat16)", "", target_table(run), "",
            "Ratios are speed-ups of ours (above 1: ours is faster). transformers 4.57 Flax is FlaxBert (an extra "
            "LM-head transform, its own weights): same shape and inputs, speed only. Its training TFLOP/s uses our "
            "parameter counts. First calls: the slowest case's first call in a fresh process (tracing, compiling "
            "and one call); for transformers PyTorch there is nothing to compile.", "",
            "### Generation, bfloat16", "", generate_table(run["generate-bf16"], run["flax457"]), "",
            identity_line(run["generate-fp32"]), "",
            "### Variants of our decode steps (cache filled)", "", variants_table(run), "",
            "Pallas attention (`BERTGEN_PALLAS_ATTENTION=1`): scores, mask, softmax and the weighted sum in one "
            "Triton kernel per attention. Command buffers: `XLA_FLAGS` in the steps table. With the Pallas "
            "kernel, " + identity_line(run["generate-fp32-pallas"]), "",
            "### Training step, bfloat16 compute, float32 weights", "", train_table(run), "",
            "### First call and the persistent compilation cache", "", compile_table(run), "",
            "### Layers stored unrolled (the inference layout), or stored scanned and run under nn.scan", "",
            "The scanned run uses the compilation cache the steps before it filled with other programs, so its "
            "first call is a cold compile of its own programs.", "", stored_table(run), "",
            "### Peak device memory", "", memory_table(run), "",
            "jax cannot reset its peak, so ours and 4.57 Flax show the peak of the process up to that case (cases "
            "run in the order listed); transformers' is reset per case.", "",
            "### Quantized generation (bench_quant.py)", "", quant_table(run["quant"]), "",
            "### Steps", "", "| step | status | seconds | command |", "|---|---|---|---|"]
    for s in steps:
        command = " ".join([f"{k}={v}" for k, v in (s.get("env") or {}).items()] + (s.get("command") or []))
        seconds = "-" if s.get("seconds") is None else f"{s['seconds']:.0f}"
        out.append(f"| {s.get('name')} | {s.get('status')} | {seconds} | `{command}` |")
    return "\n".join(out) + "\n"


def write_summary(run_dir: str) -> str:
    text = summary(run_dir)
    with open(os.path.join(run_dir, "SUMMARY.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/gpu_summary.py RUN_DIR")
    print(write_summary(sys.argv[1]))
