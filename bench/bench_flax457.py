"""transformers 4.57's Flax port as a benchmark engine: jitted generate and, optionally, a jitted training step.

The model is transformers 4.57's ``FlaxEncoderDecoderModel`` of a FlaxBert encoder and a FlaxBert causal decoder
with cross-attention (as /work/shared/anchors/hf_flax_baseline.py and hf_flax_train.py build it), randomly
initialised with the same shape as ``bench_generate.py`` / ``bench_train.py`` (``--preset small|l24`` and the same
override flags), and timed on the same ragged inputs (``_workload.make_inputs`` / ``make_batch``).

It is NOT our model and not transformers' BertGeneration: FlaxBert's LM head has an extra transform (dense, GELU,
LayerNorm) before the tied projection, the embeddings add token-type vectors, the encoder has a pooler, and the
weights are its own random initialisation. Its outputs are therefore not comparable with ours; compare speed only,
at the same shape. The decoder's LM-head transform adds hidden^2 multiply-adds per token (about 0.3% of an L-24
decode step's weights), so the work is the same to within that.

    generate  jax.jit(lambda params, ids, mask: model.generate(ids, attention_mask=mask, params=params,
              max_new_tokens=N, min_length=N + 1, num_beams=1, do_sample=False).sequences); min_length counts
              the decoder start token, so EOS is suppressed and every row runs N steps, as in bench_generate.py.
              Greedy cases only (b1, b32, b128): its beam search stops early despite min_length (anchors.md).
    train     (--train) one jitted step, params and optimizer state donated: token cross-entropy over labels !=
              -100 (decoder inputs = labels shifted right after the start token, -100 -> pad), AdamW with
              bench_train.py's settings (lr 1e-4, betas (0.9, 0.999), eps 1e-6, weight decay 0.01 except biases
              and LayerNorm); dropout off, or ``--dropout P`` (hidden and attention dropout P, a new dropout key
              per step, as the anchor trained with 0.1); bfloat16 means bf16 compute with float32 params (as the
              anchor)

    ms/step   = median generate time / new tokens;   tokens/s = batch * new tokens / median time
    first s   = the first call (tracing + XLA compilation + one call);   compile s = first call - median call
    TFLOP/s   = 6 * (N_enc * B * S + N_dec * B * T) / median step time, N_* counted on FlaxBert's own parameters

It needs transformers 4.57 with jax, flax and optax: the ``.venv-tf457`` venv after
``BERTGEN_BENCH_FLAX457=1 scripts/install.sh`` (jax 0.10.2, flax 0.12.8, optax 0.2.8 work with transformers
4.57.6), or any interpreter given by ``$BERTGEN_FLAX457_PYTHON``. ``bench_generate.py`` runs it as a subprocess
and prints its figures next to ours (``--flax457``); ``bench/gpu.py`` runs it as a step of its own.

    .venv-tf457/bin/python bench/bench_flax457.py --cases b1,b32 --json out/flax457_small_cpu.json
    .venv-tf457/bin/python bench/bench_flax457.py --preset l24 --dtype bfloat16 --train --json out/flax457_l24.json
    .venv-tf457/bin/python bench/bench_flax457.py --preset l24 --dtype bfloat16 --cases none --train --dropout 0.1
    .venv-tf457/bin/python bench/bench_flax457.py --probe      # versions and backend as one JSON line
"""
from __future__ import annotations

import os

# Before jax starts a GPU backend: take device memory as needed, not 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:  # `bertgen bench` and other scripts load this file without adding its folder
    sys.path.insert(0, _BENCH_DIR)
import _machine  # noqa: E402
import _workload  # noqa: E402
from _workload import CASES, DECODER_START, EOS, PAD, PRESETS, TRAIN_PRESETS, Shape, TrainShape  # noqa: E402

LR, WEIGHT_DECAY, BETAS, EPS = 1e-4, 0.01, (0.9, 0.999), 1e-6  # bench_train.py's AdamW
GREEDY = [k for k, c in CASES.items() if c.beams == 1]
NOT_COMPARABLE = ("note: transformers 4.57 Flax is FlaxBert (LM head with an extra dense+GELU+LayerNorm transform, "
                  "token-type embeddings, its own random weights), not BertGeneration: its outputs are not "
                  "comparable with ours; the figures compare speed only, at the same shape and on the same inputs")
INSTALL_HINT = "BERTGEN_BENCH_FLAX457=1 scripts/install.sh installs jax, flax and optax into .venv-tf457"


# ---- finding an interpreter (used by bench_generate.py and gpu.py; standard library only) ----------------------
def probe(python: str, timeout_s: float = 300.0) -> tuple[Optional[dict[str, Any]], str]:
    """Runs ``python bench_flax457.py --probe``: (versions and backend, "") or (None, why it cannot run)."""
    try:
        proc = subprocess.run([python, os.path.abspath(__file__), "--probe"], capture_output=True, text=True,
                              timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{type(e).__name__}: {e}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        errors = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return None, errors[-1] if errors else f"exit status {proc.returncode}"
    return json.loads(lines[-1]), ""


def candidates(explicit: Optional[str] = None) -> list[str]:
    """``explicit``, else ``$BERTGEN_FLAX457_PYTHON`` and the checkout's ``.venv-tf457/bin/python``."""
    if explicit:
        return [explicit]
    found = [os.environ.get("BERTGEN_FLAX457_PYTHON", ""),
             os.path.join(_machine.REPO_ROOT, ".venv-tf457", "bin", "python")]
    return [p for p in found if p]


def find_interpreter(explicit: Optional[str] = None, need_gpu: bool = False
                     ) -> tuple[Optional[str], str]:
    """(an interpreter that can run this script, "") or (None, why none can). ``need_gpu``: its jax must have
    a GPU backend (an L-24 run on a GPU machine is pointless on the CPU)."""
    reasons = []
    for python in candidates(explicit):
        if not os.path.exists(python):
            reasons.append(f"{python}: not found")
            continue
        info, why = probe(python)
        if info is None:
            reasons.append(f"{python}: {why}" + (f" ({INSTALL_HINT})" if "No module named" in why else ""))
        elif need_gpu and info.get("backend") != "gpu":
            reasons.append(f"{python}: its jax {info.get('jax')} has no GPU (backend {info.get('backend')})")
        else:
            return python, ""
    return None, "; ".join(reasons) or "no interpreter to try"


def run_probe() -> int:
    """Prints versions and jax's backend as one JSON line; exit status 1 if this interpreter cannot run us."""
    import transformers
    if not transformers.__version__.startswith("4."):
        print(f"transformers {transformers.__version__} has no Flax models (needs 4.x, e.g. 4.57)", file=sys.stderr)
        return 1
    import jax
    from transformers import FlaxEncoderDecoderModel  # noqa: F401,E402  (fails without flax)
    import optax  # noqa: F401
    info = _machine.versions("transformers", "jax", "jaxlib", "flax", "optax", "numpy")
    info.update(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind, executable=sys.executable)
    print(json.dumps(info))
    return 0


# ---- arguments ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", action="store_true", help="print versions and jax's backend as JSON, then exit")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="model and workload shape, as bench_generate.py and bench_train.py (default: small)")
    _workload.add_shape_args(p, Shape)
    p.add_argument("--cases", default=",".join(GREEDY), help=f"subset of {', '.join(GREEDY)} (default: all); "
                   "'none' for the training step only")
    p.add_argument("--runs", type=int, default=3, help="timed generate calls per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before them, the compiling one included")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="generate: compute and weights; training: compute (weights and optimizer stay float32)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: jax's default backend")
    p.add_argument("--seed", type=int, default=0, help="the model's init seed; numpy seed for the inputs")
    p.add_argument("--train", action="store_true", help="also time the jitted training step")
    p.add_argument("--train-batch", type=int, help="training batch (default: bench_train.py's preset)")
    p.add_argument("--train-source", type=int, help="training source length (default: the preset's)")
    p.add_argument("--train-target", type=int, help="training target length (default: the preset's)")
    p.add_argument("--train-runs", type=int, default=5, help="timed training steps (median reported)")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed steps after the first call")
    p.add_argument("--dropout", type=_workload.dropout_rate, default=0.0,
                   help="hidden and attention dropout of the training step (default 0; generation never drops)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.probe:
        return args
    args.shape = _workload.apply_shape_args(args, PRESETS[args.preset])
    s = args.shape
    base = TRAIN_PRESETS[args.preset]
    args.train_shape = TrainShape(hidden=s.hidden, encoder_layers=s.encoder_layers, decoder_layers=s.decoder_layers,
                                  heads=s.heads, intermediate=s.intermediate, vocab=s.vocab,
                                  max_positions=s.max_positions, batch=args.train_batch or base.batch,
                                  source=args.train_source or base.source, target=args.train_target or base.target)
    args.case_keys = [] if args.cases == "none" else [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in args.case_keys if c not in GREEDY]
    if bad:
        p.error(f"--cases {bad}: choose from {', '.join(GREEDY)} (its beam search is not comparable)")
    if not args.case_keys and not args.train:
        p.error("nothing to do: give --cases or --train")
    if args.dropout and not args.train:
        p.error("--dropout applies to the training step only: give --train")
    if min(args.runs, args.warmup, args.train_runs, args.train_warmup) < 1:
        p.error("--runs, --warmup, --train-runs and --train-warmup must be >= 1")
    if s.hidden % s.heads:
        p.error(f"hidden {s.hidden} is not divisible by heads {s.heads}")
    t = args.train_shape
    if max(s.source, 1 + s.new_tokens, t.source, t.target) > s.max_positions:
        p.error(f"sources, targets and 1 + new tokens must fit max positions {s.max_positions}")
    return args


# ---- model ----------------------------------------------------------------------------------------------------
def build_model(shape: Shape, dtype: Any, seed: int, dropout: float = 0.0) -> Any:
    """A random FlaxEncoderDecoderModel (FlaxBert encoder, FlaxBert causal decoder with cross-attention), hidden
    and attention dropout ``dropout`` (it acts only in a ``train=True`` call), start 2, pad 0, eos 1; parameters
    float32."""
    from transformers import BertConfig, EncoderDecoderConfig, FlaxEncoderDecoderModel
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_attention_heads=shape.heads,
                  intermediate_size=shape.intermediate, max_position_embeddings=shape.max_positions,
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                  pad_token_id=PAD, bos_token_id=DECODER_START, eos_token_id=EOS)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**common, num_hidden_layers=shape.encoder_layers),
        BertConfig(**common, num_hidden_layers=shape.decoder_layers, is_decoder=True, add_cross_attention=True))
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = DECODER_START, PAD, EOS
    return FlaxEncoderDecoderModel(config, dtype=dtype, seed=seed)


def timed_calls(call: Callable[[], Any], warmup: int, runs: int) -> tuple[float, list[float], Optional[float], Any]:
    """(first call s, timed calls s, cores other processes used meanwhile, last output); ``call`` blocks."""
    def once() -> tuple[float, Any]:
        start = time.perf_counter()
        out = call()
        return time.perf_counter() - start, out

    first, out = once()
    for _ in range(warmup - 1):
        once()
    runs_s = []
    before, start = _machine.machine_cpu_seconds(), time.perf_counter()
    for _ in range(runs):
        seconds, out = once()
        runs_s.append(seconds)
    others = _machine.other_cores(before, _machine.machine_cpu_seconds(), time.perf_counter() - start)
    return first, runs_s, others, out


# ---- generate -------------------------------------------------------------------------------------------------
def bench_generate(model: Any, params: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax
    import numpy as np
    shape, n = args.shape, args.shape.new_tokens
    kwargs = dict(max_new_tokens=n, min_length=n + 1, num_beams=1, do_sample=False,
                  decoder_start_token_id=DECODER_START, pad_token_id=PAD, eos_token_id=EOS)
    results = []
    for key in args.case_keys:
        case = CASES[key]
        ids, mask = _workload.make_inputs(case.batch, shape.source, shape.vocab, args.seed)
        ids, mask = jax.device_put(ids.astype(np.int32)), jax.device_put(mask.astype(np.int32))
        # a fresh jit per case, as the anchor: the first call traces and compiles this case's program
        generate = jax.jit(lambda p, i, m: model.generate(i, attention_mask=m, params=p, **kwargs).sequences)

        def call() -> Any:
            return np.asarray(jax.block_until_ready(generate(params, ids, mask)))

        print(f"- {case.label} ...", flush=True)
        first, runs_s, others, out = timed_calls(call, args.warmup, args.runs)
        t = statistics.median(runs_s)
        eos_rows = int((out[:, 1:] == EOS).any(axis=1).sum())
        r = dict(case=key, label=case.label, batch=case.batch, beams=1, new_tokens=n, first_call_s=first,
                 runs_s=runs_s, median_s=t, ms_per_step=1e3 * t / n, tokens_per_s=case.batch * n / t,
                 compile_s=first - t, out_shape=list(out.shape), rows_with_eos=eos_rows, other_cores=others,
                 peak_memory_bytes=_machine.jax_peak_bytes())
        results.append(r)
        print(f"    first call {first:.3f} s, runs [{', '.join(f'{x:.3f}' for x in runs_s)}] s"
              + ("" if others is None else f"; other processes used {others:.2f} cores"), flush=True)
        if list(out.shape) != [case.batch, n + 1] or eos_rows:
            print(f"    WARNING: output {list(out.shape)} with {eos_rows} rows holding EOS: expected "
                  f"[{case.batch}, {n + 1}] without EOS (the forced length did not hold)", flush=True)
    return results


# ---- training step --------------------------------------------------------------------------------------------
def bench_train(model: Any, params: Any, args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    shape = args.train_shape
    batch = _workload.make_batch(shape, args.seed)
    labels = batch["labels"]
    dec_in = np.concatenate([np.full((shape.batch, 1), DECODER_START), np.where(labels < 0, PAD, labels)[:, :-1]], 1)
    ids, mask, dec_in, labels = (jax.device_put(jnp.asarray(x, jnp.int32))
                                 for x in (batch["input_ids"], batch["attention_mask"], dec_in, labels))

    def decays(path: tuple, _: Any) -> bool:  # no weight decay on biases and LayerNorm parameters
        names = [str(getattr(k, "key", k)) for k in path]
        return names[-1] != "bias" and not any("LayerNorm" in name for name in names)

    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY,
                     mask=lambda p: jax.tree_util.tree_map_with_path(decays, p))
    opt_state = tx.init(params)

    dropping = args.dropout > 0

    def loss_fn(p: Any, rng: Any) -> Any:
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in, params=p, train=dropping,
                       dropout_rng=rng if dropping else None).logits
        valid = labels != -100
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                 jnp.where(valid, labels, 0))
        return (losses * valid).sum() / valid.sum()

    def step(p: Any, o: Any, n: Any) -> tuple[Any, Any, Any]:
        # dropout key of step n, derived inside the program: no host-side key work between steps
        loss, grads = jax.value_and_grad(loss_fn)(p, jax.random.fold_in(jax.random.PRNGKey(args.seed), n))
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    n_all = sum(x.size for x in jax.tree_util.tree_leaves(params))
    n_enc = sum(x.size for x in jax.tree_util.tree_leaves(params["encoder"]))
    n_dec = n_all - n_enc
    state = [params, opt_state]
    losses: list[float] = []

    def call() -> float:
        state[0], state[1], loss = step(state[0], state[1], np.int32(len(losses)))
        losses.append(float(jax.block_until_ready(loss)))
        return losses[-1]

    print(f"- training step: batch {shape.batch}, source {shape.source} / target {shape.target}, ragged, dropout "
          f"{args.dropout:g} ...", flush=True)
    first, runs_s, others, _ = timed_calls(call, args.train_warmup + 1, args.train_runs)
    t = statistics.median(runs_s)
    b = shape.batch
    tokens = int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
    r = dict(batch=b, source=shape.source, target=shape.target, dropout=args.dropout, first_call_s=first,
             runs_s=runs_s, median_s=t, compile_s=first - t, losses=losses, parameters=n_all,
             parameters_encoder=n_enc, parameters_decoder=n_dec,
             tokens_per_s=tokens / t, padded_tokens_per_s=b * (shape.source + shape.target) / t,
             tflops=6 * (n_enc * b * shape.source + n_dec * b * shape.target) / t / 1e12,
             other_cores=others, peak_memory_bytes=_machine.jax_peak_bytes())
    print(f"    first call {first:.2f} s, runs [{', '.join(f'{x:.3f}' for x in runs_s)}] s, losses "
          f"{', '.join(f'{x:.5f}' for x in losses[:3])} ...", flush=True)
    return r


# ---- main -----------------------------------------------------------------------------------------------------
def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.probe:
        return run_probe()
    backend = _machine.select_jax_backend(args.device)
    import jax
    import jax.numpy as jnp
    import transformers
    if not transformers.__version__.startswith("4."):
        raise SystemExit(f"transformers {transformers.__version__} has no Flax models: run this script with the "
                         f"transformers 4.57 venv (.venv-tf457/bin/python)")
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")  # the CPU cannot donate
    warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")  # as bench_generate.py: no TF32 on a GPU
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    s = args.shape
    env = dict(date=_machine.now_iso(), command=" ".join([os.path.basename(sys.executable)] + sys.argv),
               preset=args.preset, shape=dataclasses.asdict(s), dtype=args.dtype,
               runs=args.runs, warmup=args.warmup, seed=args.seed,
               versions=_machine.versions("transformers", "jax", "jaxlib", "flax", "optax", "numpy"),
               jax_backend=backend, jax_device_kind=jax.devices()[0].device_kind, cpu=_machine.cpu_name(),
               usable_cores=_machine.usable_cores(), jax_matmul_precision=jax.config.jax_default_matmul_precision,
               load_average_start=os.getloadavg())
    if args.train:
        env.update(train_shape=dataclasses.asdict(args.train_shape), dropout=args.dropout)
    print(f"transformers 4.57 Flax engine | {env['command']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(f"jax: {backend} ({env['jax_device_kind']}), {args.dtype}; model: FlaxBert encoder-decoder, hidden "
          f"{s.hidden}, layers {s.encoder_layers}+{s.decoder_layers}, heads {s.heads}, intermediate {s.intermediate}, "
          f"vocab {s.vocab}; source {s.source} ragged, {s.new_tokens} new tokens forced", flush=True)
    model = build_model(s, dtype, args.seed, args.dropout)
    params32 = model.params
    env["parameters"] = sum(x.size for x in jax.tree_util.tree_leaves(params32))
    print(f"{env['parameters']:,} parameters (FlaxBert counts token-type embeddings, the pooler and the LM-head "
          f"transform)", flush=True)

    results: list[dict[str, Any]] = []
    if args.case_keys:
        params = model.to_bf16(params32) if args.dtype == "bfloat16" else params32
        results = bench_generate(model, params, args)
        del params
    train = None
    if args.train:
        train = bench_train(model, params32, args)  # params32 is donated: the model's own copy is gone after
    env["load_average_end"] = os.getloadavg()

    if results:
        print("\n| case | 4.57 Flax ms/step | 4.57 Flax tok/s | first call s | compile s | peak GiB |")
        print("|---|---|---|---|---|---|")
        for r in results:
            peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**30
            print(f"| {r['label']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:,.0f} | {r['first_call_s']:.1f} | "
                  f"{r['compile_s']:.1f} | {_fmt(peak, '.2f')} |")
    if train:
        peak = None if train["peak_memory_bytes"] is None else train["peak_memory_bytes"] / 2**30
        print(f"\ntraining step (dropout {args.dropout:g}): {1e3 * train['median_s']:.1f} ms, "
              f"{train['tokens_per_s']:,.0f} tokens/s "
              f"(non-padding), {train['tflops']:.3f} TFLOP/s (6 N tokens on FlaxBert's N), first call "
              f"{train['first_call_s']:.1f} s, peak {_fmt(peak, '.2f')} GiB")
    print(NOT_COMPARABLE)
    busiest = max([r["other_cores"] or 0.0 for r in results] + [(train or {}).get("other_cores") or 0.0])
    _machine.warn_if_noisy(busiest)
    if args.json:
        _machine.write_json(args.json, dict(environment=env, results=results, train=train, note=NOT_COMPARABLE))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
