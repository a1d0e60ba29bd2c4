"""Text in, text out: ``Text2TextGenerator`` batches inputs by length, generates, decodes, and keeps the order."""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from .models import EncoderDecoderModel


class InputTooLongError(ValueError):
    """An input longer than the encoder accepts, with truncation turned off."""


class Text2TextGenerator:
    """List of strings in, list of strings out (the counterpart of transformers' text2text pipeline).

    Inputs are sorted by token length and cut into batches so each batch carries little padding; results are put
    back in input order (a list of strings per input when ``num_return_sequences`` > 1). Empty inputs give empty
    outputs without running the model. Inputs longer than the
    encoder's ``max_position_embeddings`` are truncated with a warning, or rejected with ``truncate=False``.
    """

    def __init__(self, model: EncoderDecoderModel, tokenizer: Any, *, batch_size: int = 32,
                 max_source_length: Optional[int] = None, **generation_kwargs: Any) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        limit = model.config.encoder.max_position_embeddings
        self.max_source_length = min(max_source_length or limit, limit)
        self.generation_kwargs = generation_kwargs

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Any = None, batch_size: int = 32, quantize: Optional[str] = None,
                        **generation_kwargs: Any) -> "Text2TextGenerator":
        """Model and tokenizer from one directory (HF or native checkpoint with tokenizer files beside it);
        ``quantize="int8"``/``"int4"`` generates with weight-only quantized matrices.

        The model is loaded with its layers unrolled (``scan_layers=False``), the layout generation reads without
        copying: with stacked layers every call first slices each layer's weights out of the stack."""
        from .tokenization import AutoTokenizer
        model = EncoderDecoderModel.from_pretrained(path, dtype, quantize=quantize, scan_layers=False)
        return cls(model, AutoTokenizer.from_pretrained(path), batch_size=batch_size, **generation_kwargs)

    def encode(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids per text (truncated to the encoder's limit, or an error naming the input)."""
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"input {i} is a {type(text).__name__}, not a string")
            ids = list(self.tokenizer.encode(text)) if text.strip() else []
            if len(ids) > self.max_source_length:
                if not truncate:
                    raise InputTooLongError(f"input {i + 1} has {len(ids)} tokens, more than the model accepts "
                                            f"({self.max_source_length})")
                warnings.warn(f"input {i + 1} has {len(ids)} tokens; truncated to {self.max_source_length}")
                ids = ids[: self.max_source_length]
            out.append(ids)
        return out

    def __call__(self, texts: Sequence[str], *, batch_size: Optional[int] = None, truncate: bool = True,
                 progress: Optional[Callable[[int, int], None]] = None, **generation_kwargs: Any) -> list[str]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.encode(texts, truncate)
        knobs = {**self.generation_kwargs, **generation_kwargs}
        size = batch_size or self.batch_size
        copies = knobs.get("num_return_sequences", 1)
        results: list = ["" if copies == 1 else [""] * copies for _ in texts]
        todo = sorted((i for i, ids in enumerate(encoded) if ids), key=lambda i: len(encoded[i]))
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        done = len(texts) - len(todo)
        if progress:
            progress(done, len(texts))
        for start in range(0, len(todo), size):
            rows = todo[start:start + size]
            width = max(len(encoded[i]) for i in rows)
            ids = np.full((len(rows), width), pad, np.int32)
            mask = np.zeros((len(rows), width), np.int32)
            for r, i in enumerate(rows):
                ids[r, :len(encoded[i])] = encoded[i]
                mask[r, :len(encoded[i])] = 1
            sequences = np.asarray(self.model.generate(ids, mask, **knobs))
            per_input = sequences.shape[0] // len(rows)
            decoded = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
            for r, i in enumerate(rows):
                outs = decoded[r * per_input:(r + 1) * per_input]
                results[i] = outs[0] if per_input == 1 else outs
            done += len(rows)
            if progress:
                progress(done, len(texts))
        return results


def stderr_progress(label: str = "generate") -> Callable[[int, int], None]:
    """A plain progress bar on stderr (no dependency): ``generate [#####     ] 120/240``."""
    def show(done: int, total: int) -> None:
        width = 30
        filled = width if total == 0 else int(width * done / total)
        sys.stderr.write(f"\r{label} [{'#' * filled}{' ' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def read_lines(stream: Iterable[bytes], name: str) -> list[str]:
    """Input lines (UTF-8, newline stripped); undecodable bytes are an error naming the line."""
    lines = []
    for n, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: line {n} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        lines.append(line.rstrip("\r\n") if line.endswith(("\n", "\r")) else line)
    return lines
