"""Weight-only int8 / int4 quantized generation against the float model: memory, speed, token agreement.

Each mode (float, int8, int4) runs in its own fresh process on the same weights and inputs, so peak memory is
per mode. Models hold their layers unrolled, the inference layout (``Text2TextGenerator``'s). Every worker reports: parameter bytes, peak memory (resident set on the CPU, the device's
peak_bytes_in_use on a GPU), first call and median time of forced-length greedy generation per case, and the
tokens it generated for a fixed agreement set. The parent prints the table and each mode's ratios to the float
model, and the agreement of its tokens with the float model's.

    # a trained model (the demo's export) and held-out synthetic fusions as the fixed set
    .venv/bin/python bench/bench_quant.py --model out/demo/export --agreement fusion
    # random weights at the small preset (CPU) or the L-24 shape in bfloat16 (GPU)
    .venv/bin/python bench/bench_quant.py --preset small
    .venv/bin/python bench/bench_quant.py --preset l24 --dtype bfloat16 --cases b1,b32,b128
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402
import _workload  # noqa: E402

CASES = ("b1", "b32", "b128")  # greedy cases of _workload.CASES
MODES = ("float", "int8", "int4")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an HF or native bert2bert directory (default: random weights at --preset)")
    p.add_argument("--preset", choices=sorted(_workload.PRESETS), default="small")
    _workload.add_shape_args(p, _workload.Shape)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of float,int8,int4")
    p.add_argument("--cases", default="b1,b32,b128", help="comma-separated subset of b1,b32,b128 ('' for none)")
    p.add_argument("--runs", type=int, default=3, help="timed calls per case (median reported)")
    p.add_argument("--agreement", choices=("fusion", "random", "none"), default=None,
                   help="the fixed set: held-out synthetic fusions (needs --model with its tokenizer) or random "
                        "ids (default: fusion with --model, random without)")
    p.add_argument("--agreement-examples", type=int, default=256)
    p.add_argument("--agreement-max-new-tokens", type=int, default=32)
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (input rows per scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every number here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: unknown {bad or 'empty'}; choose from {','.join(MODES)}")
    cases = [c for c in args.cases.split(",") if c]
    if any(c not in CASES for c in cases):
        p.error(f"--cases: choose from {','.join(CASES)}")
    if args.model and not os.path.isdir(args.model):
        p.error(f"--model: directory not found: {args.model}")
    args.agreement = args.agreement or ("fusion" if args.model else "random")
    if args.agreement == "fusion" and not args.model:
        p.error("--agreement fusion needs --model (a trained model with its tokenizer)")
    args.modes, args.case_list = modes, cases
    args.shape = _workload.apply_shape_args(args, _workload.PRESETS[args.preset])
    return args


# ---------------------------------------------------------------------------------------------------------------
# worker: one mode in this process
# ---------------------------------------------------------------------------------------------------------------
def _random_model(shape: "_workload.Shape", dtype, seed: int):
    import bertgen_flax as bg
    c = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_attention_heads=shape.heads,
             intermediate_size=shape.intermediate, max_position_embeddings=shape.max_positions,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    enc = bg.BertGenerationConfig.from_dict({**c, "num_hidden_layers": shape.encoder_layers})
    dec = bg.BertGenerationConfig.from_dict({**c, "num_hidden_layers": shape.decoder_layers, "is_decoder": True,
                                             "add_cross_attention": True})
    cfg = bg.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec).replace(
        decoder_start_token_id=_workload.DECODER_START, pad_token_id=_workload.PAD, eos_token_id=_workload.EOS)
    return bg.EncoderDecoderModel(cfg, dtype=dtype, param_dtype=dtype, seed=seed, scan_layers=False)


def _agreement_inputs(args, model, vocab: int, source: int):
    if args.agreement == "random":
        ids, mask = _workload.make_inputs(args.agreement_examples, source, vocab, args.seed + 1)
        return ids, mask, None
    from bertgen_flax import AutoTokenizer
    from bertgen_flax.training.data import synthetic_pairs
    tok = AutoTokenizer.from_pretrained(args.model)
    # a seed the demo's training set (seed 0, 20,000 pairs) does not share
    pairs = synthetic_pairs(args.agreement_examples, task="fusion", seed=12345)
    enc = tok([p[0] for p in pairs], padding=True)
    return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"]), (tok, [p[1] for p in pairs])


def _reset_peak_rss() -> None:
    """Restarts the kernel's peak-RSS count (VmHWM), so the peak covers generation, not loading."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory() -> dict:
    out = {"peak_rss_gb": _machine.peak_rss_mb() / 1024}
    device = _machine.jax_peak_bytes()
    if device is not None:
        out["peak_device_gb"] = device / 2**30
    return out


def _capture_programs() -> dict:
    """Makes the generate programs remember their last arguments, so their compiled memory can be read."""
    from bertgen_flax import generation
    last: dict = {}
    build = generation._seq2seq_program

    def capturing(*a, **k):
        program = build(*a, **k)

        def call(*args):
            last["lower"] = lambda: program.lower(*args)
            return program(*args)
        return call
    generation._seq2seq_program = capturing
    return last


def _program_memory(last: dict) -> dict:
    """XLA's own accounting for the last generate program: parameters and inputs, temporaries, outputs (GB)."""
    m = last["lower"]().compile().memory_analysis()
    if m is None:
        return {}
    gb = lambda n: n / 2**30
    return {"program_arguments_gb": gb(m.argument_size_in_bytes), "program_temps_gb": gb(m.temp_size_in_bytes),
            "program_outputs_gb": gb(m.output_size_in_bytes),
            "program_total_gb": gb(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                                   - m.alias_size_in_bytes)}


def worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    from bertgen_flax.quantization import param_bytes
    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    shape = args.shape
    # Built (and quantized) in host memory, then moved: the device only ever holds this mode's weights.
    with jax.default_device(jax.devices("cpu")[0]):
        if args.model:
            import bertgen_flax as bg
            model = bg.EncoderDecoderModel.from_pretrained(args.model, dtype, param_dtype=dtype, scan_layers=False)
        else:
            model = _random_model(shape, dtype, args.seed)
        if args.worker != "float":
            model = model.quantize(args.worker, group_size=args.group_size)
    model.params = jax.block_until_ready(jax.device_put(model.params, jax.devices()[0]))
    import gc
    gc.collect()
    _reset_peak_rss()
    enc_cfg = model.config.encoder
    vocab, source = enc_cfg.vocab_size, min(shape.source, enc_cfg.max_position_embeddings)
    new = shape.new_tokens
    result = {"mode": args.worker, "param_bytes": param_bytes(model.params), "device": jax.devices()[0].device_kind,
              "cases": {}}
    last = _capture_programs()
    for case in args.case_list:
        batch = _workload.CASES[case].batch
        ids, mask = _workload.make_inputs(batch, source, vocab, args.seed)
        run = lambda: np.asarray(jax.block_until_ready(model.generate(ids, mask, max_new_tokens=new,
                                                                     min_new_tokens=new)))
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        times, before = [], _machine.machine_cpu_seconds()
        for _ in range(args.runs):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        busy = _machine.other_cores(before, _machine.machine_cpu_seconds(), sum(times))
        med = float(np.median(times))
        result["cases"][case] = {"batch": batch, "new_tokens": new, "first_call_s": first, "median_s": med,
                                 "ms_per_step": 1e3 * med / new, "tokens_per_s": batch * new / med,
                                 "other_cores": busy, **_program_memory(last)}
    if args.agreement != "none":
        ids, mask, extra = _agreement_inputs(args, model, vocab, source)
        seqs = []
        for i in range(0, len(ids), 64):
            seqs.append(np.asarray(model.generate(ids[i:i + 64], mask[i:i + 64],
                                                  max_new_tokens=args.agreement_max_new_tokens)))
        width = max(s.shape[1] for s in seqs)
        pad = model.generation_defaults().pad_token_id or 0
        seqs = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1])), constant_values=pad) for s in seqs])
        result["sequences"] = seqs.tolist()
        result["pad_id"] = int(pad)
        if extra is not None:
            from bertgen_flax.training.metrics import exact_match
            tok, refs = extra
            texts = tok.batch_decode(seqs.tolist(), skip_special_tokens=True)
            # references pass through the tokenizer too (an uncased vocabulary lowercases), as the trainer's do
            refs = tok.batch_decode(tok(refs)["input_ids"], skip_special_tokens=True)
            result["exact_match"] = exact_match(texts, refs)
    result.update(_peak_memory())
    return result


# ---------------------------------------------------------------------------------------------------------------
# parent: one process per mode, then the comparison
# ---------------------------------------------------------------------------------------------------------------
def agreement(reference: np.ndarray, other: np.ndarray, pad: int) -> dict:
    """Token agreement with the float model's outputs: the share of the float model's real (non-pad) tokens that
    the other model put at the same position, and the share of sequences that are identical."""
    width = max(reference.shape[1], other.shape[1])
    ref = np.pad(reference, ((0, 0), (0, width - reference.shape[1])), constant_values=pad)
    oth = np.pad(other, ((0, 0), (0, width - other.shape[1])), constant_values=pad)
    real = ref != pad
    real[:, 0] = False  # the decoder start token is given, not generated
    return {"token_agreement": 100.0 * float((ref == oth)[real].mean()),
            "sequence_agreement": 100.0 * float((ref == oth).all(axis=1).mean())}


def _run_worker(mode: str, argv: list) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--worker", mode,
                               "--worker-out", out], text=True, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the {mode} worker failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(args)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    import jax
    print(f"bench_quant: {args.model or 'random weights, preset ' + args.preset}, dtype {args.dtype}, "
          f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{_machine.usable_cores()} usable cores; each mode in its own process", flush=True)
    results = {}
    for mode in args.modes:
        results[mode] = _run_worker(mode, argv)
        print(f"  {mode}: done", flush=True)
    base = results.get("float")
    print("\n| mode | params MB | peak mem GB | " + " | ".join(f"{c} ms/step (first call s; program MB)" for c in args.case_list)
          + " | token agreement % | sequences identical % | exact match % |")
    print("|---" * (4 + len(args.case_list) + 2) + "|")
    for mode, r in results.items():
        mem = r.get("peak_device_gb", r["peak_rss_gb"])
        cells = [f"{r['cases'][c]['ms_per_step']:.2f} ({r['cases'][c]['first_call_s']:.1f}; "
                 f"{1024 * r['cases'][c].get('program_total_gb', float('nan')):.0f} MB)" for c in args.case_list]
        agree = {}
        if base is not None and "sequences" in r and mode != "float":
            agree = agreement(np.asarray(base["sequences"]), np.asarray(r["sequences"]), base["pad_id"])
            r.update(agree)
        fmt = lambda v: "-" if v is None else f"{v:.1f}"
        print(f"| {mode} | {r['param_bytes'] / 2**20:.1f} | {mem:.2f} | " + " | ".join(cells)
              + f" | {fmt(agree.get('token_agreement'))} | {fmt(agree.get('sequence_agreement'))}"
              f" | {fmt(r.get('exact_match'))} |")
    noisy = [c["other_cores"] for r in results.values() for c in r["cases"].values() if c.get("other_cores")]
    if noisy:
        _machine.warn_if_noisy(max(noisy))
    if base is not None:
        print("\nratios to float (memory: parameter bytes; speed: float time / mode time, > 1 is faster):")
        for mode, r in results.items():
            if mode == "float":
                continue
            speed = ", ".join(f"{c} {base['cases'][c]['median_s'] / r['cases'][c]['median_s']:.2f}x"
                              for c in args.case_list)
            print(f"  {mode}: params {r['param_bytes'] / base['param_bytes']:.3f}x; speed {speed or '-'}")
    if args.json:
        for r in results.values():
            r.pop("sequences", None)
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out", "shape")},
                       "shape": dataclasses.asdict(args.shape),
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
