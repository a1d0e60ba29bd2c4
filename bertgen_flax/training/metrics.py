"""Evaluation metrics for generated text (exact match, BLEU, ROUGE) and a per-example predictions file.

All scores are on a 0-100 scale. BLEU and ROUGE come from the reference implementations (``sacrebleu`` and
Google's ``rouge-score``), imported only when needed so the rest of the package works without them.
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

from ..fileio import PathLike, atomic_file

__all__ = ["normalize_text", "exact_match", "bleu", "rouge", "generation_metrics", "write_predictions",
           "split_sentences"]

_WHITESPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,;:!?])")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")


def normalize_text(text: str) -> str:
    """The form exact match compares: stripped, whitespace runs collapsed to one space, and no space before
    ``. , ; : ! ?``, so WordPiece-decoded ``"a , b ."`` equals ``"a, b."``. Case is kept."""
    collapsed = _WHITESPACE.sub(" ", text.strip())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", collapsed)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: it is split after ``.``, ``!`` or ``?`` followed by whitespace (a simple rule,
    not a trained sentence splitter, so it needs no downloaded data)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    """Both sequences as lists of strings; ValueError when they are empty or of different lengths."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; "
                         "they must pair up one to one")
    if not predictions:
        raise ValueError("no predictions to score: predictions and references are empty")
    for name, texts in (("prediction", predictions), ("reference", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name} {i} is a {type(text).__name__}, expected str")
    return predictions, references


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage (0-100) of predictions equal to their reference after ``normalize_text``."""
    predictions, references = _check_pairs(predictions, references)
    hits = sum(normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references))
    return 100.0 * hits / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with one reference per prediction, sacrebleu's defaults (13a tokenisation)."""
    predictions, references = _check_pairs(predictions, references)
    try:
        import sacrebleu
    except ImportError as e:
        raise ImportError("BLEU needs the sacrebleu package: pip install 'sacrebleu>=2.3'") from e
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def _rouge_scorer():
    """A stemming ROUGE-1/2/Lsum scorer from Google's rouge-score package."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError("ROUGE needs the rouge-score package: pip install 'rouge-score>=0.1.2'") from e
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures (0-100) over the examples.

    rougeLsum scores the longest common subsequence per sentence, with sentences given by newlines; each text
    is split with ``split_sentences`` and its sentences joined with ``"\\n"`` first (rouge-score's own
    ``split_summaries`` would need NLTK's downloaded punkt model). ROUGE-1/2 ignore the newlines.
    """
    predictions, references = _check_pairs(predictions, references)
    scorer = _rouge_scorer()
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(predictions) for key, total in totals.items()}


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match, bleu, rouge1, rouge2 and rougeLsum (all 0-100) of the predictions against the references."""
    predictions, references = _check_pairs(predictions, references)
    return {"exact_match": exact_match(predictions, references), "bleu": bleu(predictions, references),
            **rouge(predictions, references)}


def write_predictions(path: PathLike, sources: Sequence[str], predictions: Sequence[str],
                      references: Sequence[str]) -> str:
    """Writes one JSON object per example, ``{"source", "prediction", "reference", "exact"}`` (``exact``:
    equal after ``normalize_text``), to ``path`` atomically; returns the path. For reading errors by eye."""
    predictions, references = _check_pairs(predictions, references)
    sources = list(sources)
    if len(sources) != len(predictions):
        raise ValueError(f"got {len(sources)} sources but {len(predictions)} predictions; "
                         "they must pair up one to one")
    path = os.fspath(path)
    with atomic_file(path, "w", encoding="utf-8") as f:
        for source, prediction, reference in zip(sources, predictions, references):
            record = {"source": source, "prediction": prediction, "reference": reference,
                      "exact": normalize_text(prediction) == normalize_text(reference)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
