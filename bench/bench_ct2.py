"""Three engines, one process each: bertgen_flax, transformers (PyTorch) and CTranslate2 on the same bert2bert.

The parent builds a random bert2bert of ``bench_generate.py``'s shape (``--preset small``, the default; or
``--preset l24``: the L-24 model with the CPU anchors' source 64 and 32 new tokens; the shape flags override any
field), with the same seed, weights and ragged inputs. It saves it for transformers and bertgen_flax, converts it to
CTranslate2 (float32 weights; the int8 rows quantise them when the model loads), and then starts one fresh Python
process per (engine, case). A worker imports only its own engine (torch and CTranslate2 each bundle an OpenMP
runtime and slow each other down in one process), loads the model, makes the first call (for us: tracing and
compiling), ``--warmup - 1`` more untimed calls and ``--runs`` timed calls, and reports the median, the first
call, its peak resident memory and how much CPU other processes used meanwhile.

CTranslate2 chooses its CPU GEMM backend by itself: Intel MKL on an Intel processor, oneDNN elsewhere. The two
differ a lot on some machines (on a 2-core Intel Xeon, MKL with 2 threads was 10x slower than oneDNN at batch 1),
so ``ct2-float32`` is CTranslate2 as a user gets it, and ``ct2-float32-dnnl`` / ``ct2-float32-mkl`` force one
backend (``CT2_USE_MKL=0`` / ``1``). ``--ct2-threads 2,1`` times each CTranslate2 engine with each thread count.
Our ratio is taken against the fastest CTranslate2 float32 configuration of the case, whichever it is.

    ms/step     = median call / new tokens              (encoder pass included, as in bench_generate.py)
    first s     = the first call in a fresh process     (ours: tracing + compiling, unless the cache has it)
    peak MB     = peak resident memory of the worker (VmHWM: model, inputs, runtime and the calls together);
                  in brackets the peak after loading the model, before the first call
    ours/CT2    = our ms/step / the fastest CTranslate2 float32 ms/step  (below 1: we are faster)
    ours/tf     = our ms/step / transformers' ms/step                    (below 1: we are faster)

Identity: transformers' tokens are the reference. Ours must equal them in every case (exit status 1 otherwise).
CTranslate2 float32 must equal them in the greedy cases (exit status 1 otherwise). With beams and a forced length
CTranslate2 applies the min-length EOS mask before its log-softmax and transformers after it, so beam outputs may
legitimately differ; int8 outputs (CTranslate2's, and ours with the optional ``ours-int8`` / ``ours-int4``, our
weight-only quantized modes) differ by design. Both are reported, not enforced; our quantized rows are compared
with the fastest CTranslate2 int8 configuration.

``ours`` loads our model as ``Text2TextGenerator`` does for inference, with its layers unrolled
(``scan_layers=False``); the optional ``ours-scanned`` loads the ``from_pretrained`` default, stacked layers, which
each generate call first slices apart.

With ``--compilation-cache DIR`` two more processes per case run ours against JAX's persistent compilation
cache in DIR (emptied first): the first fills it, the second starts with it filled, which is what a user's second
run sees.

    .venv/bin/python bench/bench_ct2.py                                   # small preset, default engines and cases
    .venv/bin/python bench/bench_ct2.py --preset l24 --runs 3             # L-24, batch 1 and 8
    .venv/bin/python bench/bench_ct2.py --cases b1,b32 --engines ours,ct2-float32-dnnl --ct2-threads 2,1
    .venv/bin/python bench/bench_ct2.py --engines ours --compilation-cache /tmp/bertgen_xla_cache
    .venv/bin/python bench/bench_ct2.py --engines ours,ct2-float32-dnnl --rounds 3   # interleaved, paired ratios
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:  # `bertgen bench` runs this file with runpy, which does not add its folder
    sys.path.insert(0, _BENCH_DIR)
import _machine  # noqa: E402  (bench/: machine helpers shared by the benchmark scripts)

from _workload import PRESETS, add_shape_args, apply_shape_args  # noqa: E402

ENGINES = ("ours", "transformers", "ct2-float32", "ct2-float32-dnnl", "ct2-int8")
OPTIONAL_ENGINES = ("ours-scanned", "ours-int8", "ours-int4", "ct2-float32-mkl", "ct2-int8-dnnl", "ct2-int8-mkl")
QUANTIZED = {"ours-int8": "int8", "ours-int4": "int4"}  # our weight-only modes (quantization.py), quantized as loaded
# CTranslate2 picks its CPU GEMM backend itself (Intel MKL on Intel processors, oneDNN elsewhere); the suffixes
# force one through its CT2_USE_MKL switch, so that we compare with its fastest configuration on this machine.
CT2_BACKENDS = {"dnnl": "0", "mkl": "1"}
CASES = {"b1": (1, 1), "b8": (8, 1), "b32": (32, 1), "b128": (128, 1), "b32-beam4": (32, 4)}  # key: (batch, beams)
DEFAULT_CASES = {"small": "b1,b32,b128,b32-beam4", "l24": "b1,b8"}
# The CPU anchors' L-24 workload (ct2_baseline.py bench-l24): source 64 ragged, 32 new tokens, not the GPU preset's
L24_CPU = dict(source=64, new_tokens=32)
NOISY_CORES = _machine.NOISY_CORES


def vocabulary(size: int) -> list[str]:
    """CTranslate2 speaks tokens, not ids: token i is "t<i>", with the special ids kept apart for readability."""
    names = {0: "<pad>", 1: "</s>", 2: "<s>", 3: "<unk>"}
    return [names.get(i, f"t{i}") for i in range(size)]


# ---- the worker: one engine, one case, one fresh process ---------------------------------------------------------
def _ours(job: dict[str, Any], ids: np.ndarray, mask: np.ndarray):
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_default_matmul_precision", "highest")  # as bench_generate.py; a no-op on the CPU
    import bertgen_flax
    if job.get("compilation_cache"):
        bertgen_flax.enable_compilation_cache(job["compilation_cache"])
    model = bertgen_flax.EncoderDecoderModel.from_pretrained(job["hf_dir"],
                                                             scan_layers=job["engine"] == "ours-scanned",
                                                             quantize=QUANTIZED.get(job["engine"]))
    kwargs = job["kwargs"]

    def call() -> np.ndarray:
        return np.asarray(jax.block_until_ready(model.generate(ids, mask, **kwargs)))
    return call, dict(jax=jax.__version__)


def _transformers(job: dict[str, Any], ids: np.ndarray, mask: np.ndarray):
    import torch
    import transformers
    torch.set_num_threads(job["threads"])
    transformers.logging.set_verbosity_error()
    model = transformers.EncoderDecoderModel.from_pretrained(job["hf_dir"]).eval()
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    kwargs = job["kwargs"]

    def call() -> np.ndarray:
        with torch.no_grad():
            return model.generate(input_ids=t_ids, attention_mask=t_mask, **kwargs).numpy()
    return call, dict(torch=torch.__version__, transformers=transformers.__version__,
                      attention=model.config.decoder._attn_implementation)


def _ctranslate2(job: dict[str, Any], ids: np.ndarray, mask: np.ndarray):
    import ctranslate2
    compute_type = job["engine"].split("-")[1]
    translator = ctranslate2.Translator(job["ct2_dir"], device="cpu", compute_type=compute_type, inter_threads=1,
                                        intra_threads=job["threads"])
    names = vocabulary(job["vocab"])
    index = {name: i for i, name in enumerate(names)}
    sources = [[names[t] for t in row[:n]] for row, n in zip(ids.tolist(), mask.sum(axis=1).tolist())]
    new, beams, start = job["new_tokens"], job["beams"], job["start_id"]

    def call() -> np.ndarray:
        results = translator.translate_batch(sources, beam_size=beams, max_decoding_length=new,
                                             min_decoding_length=new, length_penalty=1.0, max_input_length=0)
        # transformers' layout: the start token, then the new tokens
        return np.array([[start] + [index[t] for t in r.hypotheses[0]] for r in results], np.int64)
    return call, dict(ctranslate2=ctranslate2.__version__)


def worker(job_path: str, out_path: str) -> None:
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    inputs = np.load(job["inputs"])
    ids, mask = inputs["ids"], inputs["mask"]
    t0 = time.perf_counter()
    engine = job["engine"]
    make = _ours if engine.startswith("ours") else _transformers if engine == "transformers" else _ctranslate2
    call, versions = make(job, ids, mask)
    load_s = time.perf_counter() - t0
    rss_loaded = _machine.peak_rss_mb()

    start = time.perf_counter()
    out = call()
    first_s = time.perf_counter() - start
    for _ in range(job["warmup"] - 1):
        call()
    runs = []
    before, wall0 = _machine.machine_cpu_seconds(), time.perf_counter()
    for _ in range(job["runs"]):
        start = time.perf_counter()
        out = call()
        runs.append(time.perf_counter() - start)
    others = _machine.other_cores(before, _machine.machine_cpu_seconds(), time.perf_counter() - wall0)
    result = dict(engine=job["engine"], case=job["case"], load_s=load_s, first_s=first_s, runs_s=runs,
                  median_s=statistics.median(runs), other_cores=others, peak_rss_mb=_machine.peak_rss_mb(),
                  rss_after_load_mb=rss_loaded, versions=versions, tokens=out.tolist())
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


# ---- the parent ------------------------------------------------------------------------------------------------
def convert_to_ct2(model: Any, out_dir: str) -> None:
    """Maps a transformers bert2bert (BertGeneration encoder and decoder) onto CTranslate2's Transformer spec.

    BertGeneration is a post-LayerNorm BERT: LayerNorm(word + position) embeddings without scaling or token
    types, exact (erf) GELU, eps from the config, a tied LM head with its own bias.
    """
    from ctranslate2.specs import common_spec, transformer_spec

    weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    enc_cfg, dec_cfg = model.config.encoder, model.config.decoder
    if enc_cfg.hidden_act != "gelu" or dec_cfg.hidden_act != "gelu":
        raise SystemExit("only the exact GELU maps onto CTranslate2's Activation.GELU")

    def linear(spec: Any, *names: str) -> None:  # several names: one fused projection, rows stacked
        spec.weight = np.concatenate([weights[n + ".weight"] for n in names])
        spec.bias = np.concatenate([weights[n + ".bias"] for n in names])

    def norm(spec: Any, name: str) -> None:
        spec.gamma, spec.beta = weights[name + ".weight"], weights[name + ".bias"]

    def embeddings(spec: Any, prefix: str) -> None:
        table = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
        table.weight = weights[prefix + "word_embeddings.weight"]
        spec.position_encodings.encodings = weights[prefix + "position_embeddings.weight"]
        spec.scale_embeddings = False
        norm(spec.layernorm_embedding, prefix + "LayerNorm")

    spec = transformer_spec.TransformerSpec.from_config(
        (enc_cfg.num_hidden_layers, dec_cfg.num_hidden_layers), enc_cfg.num_attention_heads, pre_norm=False,
        activation=common_spec.Activation.GELU, layernorm_embedding=True)
    embeddings(spec.encoder, "encoder.embeddings.")
    for i, layer in enumerate(spec.encoder.layer):
        p = f"encoder.encoder.layer.{i}."
        linear(layer.self_attention.linear[0], p + "attention.self.query", p + "attention.self.key",
               p + "attention.self.value")
        linear(layer.self_attention.linear[1], p + "attention.output.dense")
        norm(layer.self_attention.layer_norm, p + "attention.output.LayerNorm")
        linear(layer.ffn.linear_0, p + "intermediate.dense")
        linear(layer.ffn.linear_1, p + "output.dense")
        norm(layer.ffn.layer_norm, p + "output.LayerNorm")
    embeddings(spec.decoder, "decoder.bert.embeddings.")
    for i, layer in enumerate(spec.decoder.layer):
        p = f"decoder.bert.encoder.layer.{i}."
        linear(layer.self_attention.linear[0], p + "attention.self.query", p + "attention.self.key",
               p + "attention.self.value")
        linear(layer.self_attention.linear[1], p + "attention.output.dense")
        norm(layer.self_attention.layer_norm, p + "attention.output.LayerNorm")
        linear(layer.attention.linear[0], p + "crossattention.self.query")        # from the decoder state
        linear(layer.attention.linear[1], p + "crossattention.self.key", p + "crossattention.self.value")
        linear(layer.attention.linear[2], p + "crossattention.output.dense")
        norm(layer.attention.layer_norm, p + "crossattention.output.LayerNorm")
        linear(layer.ffn.linear_0, p + "intermediate.dense")
        linear(layer.ffn.linear_1, p + "output.dense")
        norm(layer.ffn.layer_norm, p + "output.LayerNorm")
    linear(spec.decoder.projection, "decoder.lm_head.decoder")

    cfg = spec.config
    cfg.layer_norm_epsilon = float(enc_cfg.layer_norm_eps)  # CTranslate2 would assume 1e-5
    cfg.bos_token, cfg.eos_token, cfg.unk_token, cfg.decoder_start_token = "<s>", "</s>", "<unk>", "<s>"
    cfg.add_source_bos = cfg.add_source_eos = False
    names = vocabulary(enc_cfg.vocab_size)
    spec.register_source_vocabulary(names)
    spec.register_target_vocabulary(names)
    spec.validate()
    spec.optimize(quantization=None)  # float32 on disk; int8 is chosen with compute_type at load time
    os.makedirs(out_dir, exist_ok=True)
    spec.save(out_dir)


def run_worker(job: dict[str, Any], workdir: str, tag: str) -> dict[str, Any]:
    job_path, out_path = os.path.join(workdir, tag + ".job.json"), os.path.join(workdir, tag + ".out.json")
    with open(job_path, "w", encoding="utf-8") as f:
        json.dump(job, f)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")  # numpy's BLAS pool is idle here; keep it from spinning
    backend = job["engine"].split("-")[2] if job["engine"].startswith("ct2-") and job["engine"].count("-") == 2 \
        else None
    if backend:
        env["CT2_USE_MKL"] = CT2_BACKENDS[backend]
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", job_path, out_path], check=True, env=env)
    with open(out_path, encoding="utf-8") as f:
        return json.load(f)


def same_rows(want: list, got: list) -> str:
    a, b = np.asarray(want), np.asarray(got)
    if a.shape != b.shape:
        return f"shape {b.shape} vs {a.shape}"
    return f"{int((a == b).all(axis=1).sum())}/{a.shape[0]}"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(DEFAULT_CASES), default="small",
                   help="small (default) or l24: the L-24 model with the CPU anchors' source 64 / 32 new tokens")
    add_shape_args(p, type(PRESETS["small"]))
    p.add_argument("--cases", help=f"subset of {', '.join(CASES)} (default: {DEFAULT_CASES['small']} for small, "
                                   f"{DEFAULT_CASES['l24']} for l24)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"from {', '.join(ENGINES + OPTIONAL_ENGINES)} (default: {', '.join(ENGINES)})")
    p.add_argument("--runs", type=int, default=5, help="timed calls per process (median reported)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every engine of a case this many times, interleaved (A B A B ...): each figure is "
                        "the median over the rounds, and a ratio the median of the rounds' own ratios, which "
                        "the machine's drift between processes moves far less")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls, the first included (>= 1)")
    p.add_argument("--threads", type=int, default=2, help="torch and CTranslate2 threads (XLA: the affinity mask)")
    p.add_argument("--ct2-threads", default=None, metavar="N,M",
                   help="CTranslate2 intra_threads settings to time, each in its own process (default: --threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compilation-cache", metavar="DIR",
                   help="also time our first call in two fresh processes sharing JAX's compilation cache in DIR")
    p.add_argument("--json", metavar="PATH", help="also write every number as JSON")
    p.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    preset = PRESETS[args.preset]
    if args.preset == "l24":
        preset = dataclasses.replace(preset, **L24_CPU)
    args.shape = apply_shape_args(args, preset)
    args.case_keys = [c for c in (args.cases or DEFAULT_CASES[args.preset]).split(",") if c]
    args.engine_keys = [e for e in args.engines.split(",") if e]
    if any(c not in CASES for c in args.case_keys) or any(e not in ENGINES + OPTIONAL_ENGINES
                                                           for e in args.engine_keys):
        p.error(f"--cases from {', '.join(CASES)}; --engines from {', '.join(ENGINES + OPTIONAL_ENGINES)}")
    if args.runs < 1 or args.warmup < 1 or args.rounds < 1:
        p.error("--runs, --warmup and --rounds must be >= 1")
    if args.rounds > 1 and args.compilation_cache:
        p.error("--compilation-cache times first calls against an emptied cache: use it with one round")
    try:
        args.ct2_thread_counts = [int(t) for t in (args.ct2_threads or str(args.threads)).split(",") if t]
    except ValueError:
        p.error(f"--ct2-threads takes comma-separated integers, got {args.ct2_threads!r}")
    if not args.ct2_thread_counts or min(args.ct2_thread_counts) < 1:
        p.error("--ct2-threads needs at least one count >= 1")
    return args


def engine_runs(args: argparse.Namespace, job: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, job) per process: each engine once, CTranslate2 once per thread count (labelled " tN" where N
    differs from --threads), and ours twice more against the compilation cache when asked."""
    runs = []
    for engine in args.engine_keys:
        if engine.startswith("ct2"):
            for n in args.ct2_thread_counts:
                runs.append((engine if n == args.threads else f"{engine} t{n}", dict(job, engine=engine, threads=n)))
        else:
            runs.append((engine, dict(job, engine=engine)))
    if args.compilation_cache and "ours" in args.engine_keys:
        shutil.rmtree(args.compilation_cache, ignore_errors=True)
        cached = dict(job, engine="ours", compilation_cache=args.compilation_cache)
        runs += [("ours, cache empty", cached), ("ours, cache filled", cached)]
    return runs


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    import bench_generate as bg  # the model builder and the ragged inputs

    shape = args.shape
    print(f"{datetime.date.today()}  {_machine.cpu_name('unknown')}, {os.cpu_count()} cores, threads {args.threads}; "
          f"load average {os.getloadavg()}", flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_ct2_") as work:
        model = bg.build_reference(shape, args.seed)
        hf_dir, ct2_dir = os.path.join(work, "hf"), os.path.join(work, "ct2")
        model.save_pretrained(hf_dir)
        if any(e.startswith("ct2") for e in args.engine_keys):
            convert_to_ct2(model, ct2_dir)
        params = sum(p.numel() for p in model.parameters())
        del model
        print(f"{args.preset} preset: {params:,} parameters, hidden {shape.hidden}, {shape.encoder_layers}+"
              f"{shape.decoder_layers} layers, vocab {shape.vocab}, source {shape.source} ragged, "
              f"{shape.new_tokens} new tokens forced, float32", flush=True)
        for case in args.case_keys:
            batch, beams = CASES[case]
            ids, mask = bg.make_inputs(batch, shape.source, shape.vocab, args.seed)
            inputs = os.path.join(work, f"{case}.npz")
            np.savez(inputs, ids=ids, mask=mask)
            job = dict(case=case, inputs=inputs, hf_dir=hf_dir, ct2_dir=ct2_dir, threads=args.threads,
                       runs=args.runs, warmup=args.warmup, vocab=shape.vocab, new_tokens=shape.new_tokens,
                       beams=beams, start_id=bg.DECODER_START, kwargs=bg.generate_kwargs(shape, beams))
            for label, j in [(label, j) for k in range(args.rounds) for label, j in engine_runs(args, job)]:
                r = run_worker(j, work, f"{case}_{len(results)}")
                r["label"], r["batch"], r["beams"] = label, batch, beams
                r["round"] = sum(1 for q in results if q["case"] == case and q["label"] == label)
                results.append(r)
                others = "" if r["other_cores"] is None else f", other processes {r['other_cores']:.2f} cores"
                print(f"  {case:10s} {label:24s} {1000 * r['median_s'] / shape.new_tokens:8.2f} ms/step  first "
                      f"{r['first_s']:6.2f} s  peak {r['peak_rss_mb']:7.0f} MB  runs "
                      f"[{', '.join(f'{t:.3f}' for t in r['runs_s'])}]{others}", flush=True)
    return report(args, shape, results)


def _rounds_merged(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per engine label: medians over its rounds (time, first call), the largest peak memory."""
    out: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in results):
        rs = [r for r in results if r["label"] == label]
        out[label] = dict(rs[0], median_s=statistics.median(r["median_s"] for r in rs),
                          first_s=statistics.median(r["first_s"] for r in rs),
                          peak_rss_mb=max(r["peak_rss_mb"] for r in rs),
                          rss_after_load_mb=max(r["rss_after_load_mb"] for r in rs))
    return out


def best_ct2(ms: dict[str, float], compute_type: str = "float32") -> Optional[str]:
    """The label of the fastest CTranslate2 configuration of ``compute_type`` timed (any backend, any thread
    count)."""
    ct2 = [k for k in ms if k.startswith(f"ct2-{compute_type}")]
    return min(ct2, key=ms.get) if ct2 else None


def _ours_kind(label: str) -> str:
    """The CTranslate2 compute type our row is compared with: int8 for our quantized modes, else float32."""
    return "int8" if label.split(",")[0] in QUANTIZED else "float32"


def report(args: argparse.Namespace, shape: Any, results: list[dict[str, Any]]) -> int:
    n = shape.new_tokens
    failed = []
    lines = ["| case | engine | ms/step | tok/s | first call s | peak RSS MB (after load) "
             "| same tokens as transformers | ours / fastest CT2 (float32; int8 for ours-int8 / -int4) "
             "| ours/transformers |", "|" + "---|" * 9]
    for case in args.case_keys:
        rows = _rounds_merged([r for r in results if r["case"] == case])
        ref = rows.get("transformers")
        ms = {k: 1000 * r["median_s"] / n for k, r in rows.items()}
        per_round = lambda label, other: [a["median_s"] / b["median_s"] for a in results for b in results
                                          if a["case"] == b["case"] == case and a["label"] == label
                                          and b["label"] == other and a["round"] == b["round"]]
        for label, r in rows.items():
            same = "-"
            if ref is not None and label != "transformers":
                same = same_rows(ref["tokens"], r["tokens"])
                exact = same == f"{len(ref['tokens'])}/{len(ref['tokens'])}"
                enforced = (label.startswith("ours") and _ours_kind(label) == "float32") or (
                    label.startswith("ct2-float32") and r["beams"] == 1)
                if enforced and not exact:
                    failed.append(f"{case} {label}: {same}")
            ratio_ct2 = ratio_tf = "-"
            if label.startswith("ours"):
                best = best_ct2(ms, _ours_kind(label))
                if best is not None:
                    ratios = per_round(label, best)
                    ratio_ct2 = f"{statistics.median(ratios):.2f} ({best})"
                    if len(ratios) > 1:
                        ratio_ct2 += " [" + ", ".join(f"{x:.2f}" for x in ratios) + "]"
                if "transformers" in ms:
                    ratio_tf = f"{statistics.median(per_round(label, 'transformers')):.2f}"
            lines.append(f"| {case} | {label} | {ms[label]:.2f} | {r['batch'] * n / r['median_s']:,.0f} | "
                         f"{r['first_s']:.2f} | {r['peak_rss_mb']:.0f} ({r['rss_after_load_mb']:.0f}) | {same} | "
                         f"{ratio_ct2} | {ratio_tf} |")
    print()
    print("\n".join(lines))
    busiest = max((r["other_cores"] or 0.0 for r in results), default=0.0)
    print(f"\nother processes used at most {busiest:.2f} cores during the timed calls; load average "
          f"{os.getloadavg()}")
    if busiest > NOISY_CORES:
        print("WARNING: the machine was busy; these timings are unreliable", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        slim = [{k: v for k, v in r.items() if k != "tokens"} for r in results]
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           cpu=_machine.cpu_name("unknown"), command=" ".join(sys.argv), threads=args.threads,
                           preset=args.preset, shape=shape.__dict__, results=slim), f, indent=2)
    if failed:
        print("FAIL: tokens differ from transformers: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
