"""Vocabulary trimming: a WordPiece checkpoint cut down to the tokens a corpus uses.

A BERT checkpoint spends a large share of a small model's training step on its vocabulary: MiniLM's 30,522-row
embedding tables and output layer dwarf its 6 layers when the task only ever uses a few hundred tokens. Keeping just
the rows a corpus needs (plus the special tokens) gives the same segmentation of that corpus (WordPiece takes the
longest piece in the vocabulary; every piece it took is kept and nothing longer is added) and the same embeddings,
with a much cheaper output softmax and optimizer step. Text outside the corpus may fall to ``[UNK]`` more often.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Sequence

import numpy as np

from . import checkpoints
from .fileio import write_dir_atomically

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_COPIED = ("tokenizer_config.json", "special_tokens_map.json")


def _vocab_rows(name: str) -> bool:
    """Tensors with one row per vocabulary entry: word embeddings and (for MLM checkpoints) the output layer."""
    return "word_embeddings" in name or name.endswith(("predictions.bias", "predictions.decoder.weight",
                                                       "predictions.decoder.bias"))


def trim_vocabulary(src: str, texts: Iterable[str], out_dir: str, *, keep: Sequence[str] = SPECIALS) -> int:
    """Writes ``out_dir``: the BERT-style checkpoint ``src`` (config.json, weights, vocab.txt) keeping only the
    tokens that ``texts`` tokenize to, plus ``keep``, in their original order. Returns the new vocabulary size."""
    from .tokenization import AutoTokenizer, BertTokenizer
    vocab_path = os.path.join(src, "vocab.txt")
    if not os.path.isfile(vocab_path):
        raise ValueError(f"{src} has no vocab.txt: vocabulary trimming needs a WordPiece (BERT) checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(src)
    if not isinstance(tokenizer, BertTokenizer):
        raise ValueError(f"{src}: vocabulary trimming needs a BERT WordPiece tokenizer, found "
                         f"{type(tokenizer).__name__}")
    with open(vocab_path, encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f]
    used = {i for row in tokenizer(list(texts))["input_ids"] for i in row}
    index = {t: i for i, t in enumerate(tokens)}
    used |= {index[t] for t in keep if t in index}
    rows = np.array(sorted(used), np.int64)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    old = int(config["vocab_size"])
    if rows.max() >= old:
        raise ValueError(f"{src}: the tokenizer produced id {rows.max()} but the model has {old} embeddings")
    state = checkpoints.load_state_dict(src)
    trimmed = {k: (v[rows] if _vocab_rows(k) and v.shape[:1] == (old,) else v) for k, v in state.items()}
    if all(trimmed[k] is state[k] for k in state):
        raise ValueError(f"{src}: found no word-embedding tensor with {old} rows to trim")
    config["vocab_size"] = int(len(rows))
    if config.get("pad_token_id") is not None and config["pad_token_id"] in index.values():
        config["pad_token_id"] = int(np.searchsorted(rows, config["pad_token_id"]))

    def write(tmp: str) -> None:
        checkpoints.write_safetensors(os.path.join(tmp, checkpoints.SAFE_WEIGHTS), trimmed)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("".join(tokens[i] + "\n" for i in rows))
        for name in _COPIED:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))

    write_dir_atomically(out_dir, write)
    return int(len(rows))


__all__ = ["trim_vocabulary"]
