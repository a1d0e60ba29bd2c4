"""Tokenizers for BertGeneration checkpoints that give the ids and decoded text of transformers 5.x.

* ``BertGenerationTokenizer``: a SentencePiece model (``spiece.model``) with transformers' slow-tokenizer rules:
  special tokens typed in the text are split out first, every other piece goes through SentencePiece, no special
  tokens are ever added, and decoding joins the pieces.
* ``BertTokenizer`` (WordPiece) and ``RobertaTokenizer`` (byte-level BPE): a ``tokenizers`` pipeline rebuilt from the
  vocabulary and ``tokenizer_config.json`` exactly as transformers' classes of the same name rebuild it.
* ``AutoTokenizer.from_pretrained(dir)``: picks the class from the directory's configs and files. A bare
  ``tokenizer.json`` with no declared class is used as it is, as transformers' ``TokenizersBackend`` does.

All share one calling surface (``__call__``, ``encode``, ``decode``, ``batch_decode``, special-token ids,
``save_pretrained``) and return plain dicts of lists or numpy arrays, with no ``token_type_ids``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from .fileio import write_dir_atomically

VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when the config gives none
LARGE_INTEGER = int(1e20)  # above this, model_max_length means "no limit" for padding and truncation
SPIECE_UNDERLINE = "\u2581"
SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"

Ids = Union[int, Sequence[int], np.ndarray]


class TokenizerError(ValueError):
    """A tokenizer directory, file or setting that cannot be loaded."""


@dataclass(frozen=True)
class AddedToken:
    """A token matched in raw text before the model runs, with transformers' ``AddedToken`` flags."""

    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False

    @classmethod
    def parse(cls, value: Any, special: Optional[bool] = None, where: str = "") -> "AddedToken":
        """From a string or a serialized ``AddedToken`` dict (``special`` forces the flag, as transformers does)."""
        if isinstance(value, str):
            return cls(value, special=True if special is None else special, normalized=False)
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "single_word") if k in value}
            is_special = bool(value.get("special", False)) if special is None else special
            normalized = value.get("normalized")
            return cls(value["content"], special=is_special, normalized=(not is_special) if normalized is None
                       else bool(normalized), **flags)
        raise TokenizerError(f"{where}: expected a token string or an AddedToken object, found {value!r}")

    def to_json(self) -> dict:
        """The token as tokenizer.json's ``added_tokens`` entry."""
        return {k: v for k, v in sorted(asdict(self).items())}

    def to_rust(self) -> Any:
        """The token as a ``tokenizers.AddedToken``."""
        import tokenizers
        return tokenizers.AddedToken(self.content, single_word=self.single_word, lstrip=self.lstrip,
                                     rstrip=self.rstrip, normalized=self.normalized, special=self.special)


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{what} {path} is not valid JSON: {e}") from None


def _read_json_object(path: str, what: str) -> dict:
    """The JSON object in ``path``, ``{}`` when the file is absent, an error naming the file when it is corrupt."""
    if not os.path.isfile(path):
        return {}
    data = _read_json(path, what)
    if not isinstance(data, dict):
        raise TokenizerError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drops the space a word-level decode leaves before punctuation."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _id_list(ids: Ids, what: str = "ids") -> list[int]:
    """One sequence of token ids (int, list, numpy / JAX / torch 1-D array) as Python ints."""
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        return [int(ids)]
    arr = np.asarray(ids)
    if arr.ndim == 0 and np.issubdtype(arr.dtype, np.integer):  # a 0-d array holding one id
        return [int(arr)]
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one sequence of token ids (1-D), got shape {arr.shape}; "
                         "use batch_decode for a batch")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    return [int(i) for i in arr]


def _padding_mode(padding: Union[bool, str]) -> Optional[str]:
    if padding is False or padding is None or padding == "do_not_pad":
        return None
    if padding is True or padding == "longest":
        return "longest"
    if padding == "max_length":
        return "max_length"
    raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")


def _truncation_on(truncation: Union[bool, str, None]) -> bool:
    if truncation is None or truncation is False or truncation == "do_not_truncate":
        return False
    if truncation is True or truncation in ("longest_first", "only_first"):
        return True
    raise ValueError(f"truncation must be True or False, got {truncation!r}")


def _side(value: Any, name: str) -> str:
    if value not in ("right", "left"):
        raise TokenizerError(f"{name} must be 'right' or 'left', got {value!r}")
    return value


class PreTrainedTokenizer:
    """The calling surface shared by every tokenizer here; subclasses supply encoding, decoding and files.

    Padding, truncation and ``model_max_length`` follow transformers: ``truncation=True`` without ``max_length``
    truncates to ``model_max_length`` unless that is the "no limit" default, and ``padding="max_length"`` without
    ``max_length`` does the same for padding.
    """

    tokenizer_class: ClassVar[str] = ""

    def __init__(self, special_tokens: Mapping[str, Optional[str]], extra_special_tokens: Sequence[str] = (), *,
                 model_max_length: Optional[int] = None, clean_up_tokenization_spaces: bool = False,
                 padding_side: str = "right", truncation_side: str = "right", split_special_tokens: bool = False,
                 name_or_path: str = "") -> None:
        self._special = {attr: special_tokens.get(attr) for attr in SPECIAL_ATTRIBUTES}
        self._extra_special = [t for t in extra_special_tokens if t]
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.padding_side = _side(padding_side, "padding_side")
        self.truncation_side = _side(truncation_side, "truncation_side")
        self.split_special_tokens = bool(split_special_tokens)
        self.name_or_path = name_or_path

    # --- what subclasses provide -------------------------------------------------------------------------------
    def _encode_batch(self, texts: list[str], add_special_tokens: bool, max_length: Optional[int]) -> list[list[int]]:
        """Ids per text, special tokens added when asked, truncated to ``max_length`` (specials included)."""
        raise NotImplementedError

    def _decode_one(self, ids: list[int], skip_special_tokens: bool) -> str:
        """The text of one sequence, before transformers' optional clean-up."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of one token string (``None`` when it is not in the vocabulary)."""
        raise NotImplementedError

    def convert_ids_to_tokens(self, ids: Ids, skip_special_tokens: bool = False) -> list[str]:
        """The token string of each id."""
        raise NotImplementedError

    def tokenize(self, text: str) -> list[str]:
        """The token strings of ``text`` without special tokens added."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without tokens added on top of it (transformers' ``vocab_size``)."""
        raise NotImplementedError

    def __len__(self) -> int:
        """Size of the vocabulary with added tokens."""
        raise NotImplementedError

    def _write_files(self, directory: str) -> list[str]:
        raise NotImplementedError

    def _config(self) -> dict:
        """Class-specific entries of ``tokenizer_config.json``."""
        return {}

    # --- special tokens ----------------------------------------------------------------------------------------
    def _special_id(self, attr: str) -> Optional[int]:
        token = self._special[attr]
        return None if token is None else self.token_to_id(token)

    bos_token = property(lambda self: self._special["bos_token"])
    eos_token = property(lambda self: self._special["eos_token"])
    unk_token = property(lambda self: self._special["unk_token"])
    sep_token = property(lambda self: self._special["sep_token"])
    pad_token = property(lambda self: self._special["pad_token"])
    cls_token = property(lambda self: self._special["cls_token"])
    mask_token = property(lambda self: self._special["mask_token"])
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))
    sep_token_id = property(lambda self: self._special_id("sep_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    cls_token_id = property(lambda self: self._special_id("cls_token"))
    mask_token_id = property(lambda self: self._special_id("mask_token"))

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens in transformers' attribute order, then extra ones, without repeats."""
        out: list[str] = []
        for token in [*self._special.values(), *self._extra_special]:
            if token is not None and token not in out:
                out.append(token)
        return out

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every special token the tokenizer has."""
        return [i for i in (self.token_to_id(t) for t in self.all_special_tokens) if i is not None]

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]) -> Union[Optional[int], list[Optional[int]]]:
        """Id of a token (or ids of a list of tokens); None for tokens outside the vocabulary."""
        if isinstance(tokens, str):
            return self.token_to_id(tokens)
        return [self.token_to_id(t) for t in tokens]

    # --- encoding ----------------------------------------------------------------------------------------------
    def __call__(self, texts: Union[str, Sequence[str]], padding: Union[bool, str] = False,
                 truncation: Union[bool, str, None] = False, max_length: Optional[int] = None,
                 add_special_tokens: bool = True, return_tensors: Optional[str] = None) -> dict:
        """``{"input_ids", "attention_mask"}`` for one text (flat lists) or a batch (lists of lists).

        ``return_tensors="np"`` gives int64 arrays of shape (batch, length), a single text as a batch of one;
        the rows must then have one length (pad them).
        """
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, not a string")
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be None or 'np', got {return_tensors!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
                                       or max_length < 1):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        pad_mode, truncate = _padding_mode(padding), _truncation_on(truncation)
        if max_length is None:
            unlimited = self.model_max_length > LARGE_INTEGER
            if pad_mode == "max_length":
                pad_mode, max_length = (None, None) if unlimited else (pad_mode, self.model_max_length)
            if truncate:
                truncate, max_length = (False, max_length) if unlimited else (True, self.model_max_length)
        if pad_mode is not None and self.pad_token_id is None:
            raise ValueError("padding needs a pad token, and this tokenizer has none")
        rows = self._encode_batch(batch, bool(add_special_tokens), int(max_length) if truncate else None)
        masks = [[1] * len(r) for r in rows]
        if pad_mode is not None and rows:
            width = max(len(r) for r in rows) if pad_mode == "longest" else int(max_length)
            pad_id, left = self.pad_token_id, self.padding_side == "left"
            for k, row in enumerate(rows):
                gap = width - len(row)
                if gap > 0:
                    rows[k] = [pad_id] * gap + row if left else row + [pad_id] * gap
                    masks[k] = [0] * gap + masks[k] if left else masks[k] + [0] * gap
        if return_tensors == "np":
            if len({len(r) for r in rows}) > 1:
                raise ValueError("the sequences have different lengths and cannot form one array: "
                                 "pass padding=True (or truncation with max_length)")
            width = len(rows[0]) if rows else 0
            return {"input_ids": np.array(rows, np.int64).reshape(len(rows), width),
                    "attention_mask": np.array(masks, np.int64).reshape(len(rows), width)}
        if single:
            return {"input_ids": rows[0], "attention_mask": masks[0]}
        return {"input_ids": rows, "attention_mask": masks}

    def encode(self, text: str, add_special_tokens: bool = True, truncation: Union[bool, str, None] = False,
               max_length: Optional[int] = None) -> list[int]:
        """Token ids of one text."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one string, got a {type(text).__name__}")
        return self(text, truncation=truncation, max_length=max_length,
                    add_special_tokens=add_special_tokens)["input_ids"]

    # --- decoding ----------------------------------------------------------------------------------------------
    def decode(self, ids: Ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        """The text of one id sequence; special tokens are kept unless ``skip_special_tokens``."""
        text = self._decode_one(_id_list(ids), skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean and self._cleanup_allowed() else text

    def batch_decode(self, sequences: Union[Sequence[Sequence[int]], np.ndarray], skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: Optional[bool] = None) -> list[str]:
        """The text of each row of a 2-D array or each list in a list (rows may differ in length)."""
        if isinstance(sequences, (list, tuple)) and sequences and not isinstance(sequences[0], (int, np.integer)):
            rows: Iterable = sequences
        else:
            arr = np.asarray(sequences)
            if arr.ndim == 1:  # transformers decodes a flat list as a single sequence here
                return [self.decode(arr, skip_special_tokens, clean_up_tokenization_spaces)]
            if arr.ndim != 2:
                raise ValueError(f"batch_decode takes a batch of id sequences (2-D), got shape {arr.shape}")
            rows = arr
        return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in rows]

    def _cleanup_allowed(self) -> bool:
        return True

    # --- saving ------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> tuple[str, ...]:
        """Writes the vocabulary files and ``tokenizer_config.json`` that transformers 5.x loads to the same ids.

        Files are written to a temporary sibling directory first, then moved into ``directory``.
        """
        directory = os.fspath(directory)
        names: list[str] = []

        def write(tmp: str) -> None:
            names.extend(self._write_files(tmp))
            config = {attr: token for attr, token in self._special.items() if token is not None}
            config.update({
                "tokenizer_class": self.tokenizer_class,
                "model_max_length": self.model_max_length,
                "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
                "padding_side": self.padding_side,
                "truncation_side": self.truncation_side,
            })
            config.update(self._config())  # class-specific entries win (an as-is tokenizer.json says so here)
            if self._extra_special:
                config["extra_special_tokens"] = list(self._extra_special)
            if self.split_special_tokens:
                config["split_special_tokens"] = True
            with open(os.path.join(tmp, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
                f.write("\n")
            names.append(TOKENIZER_CONFIG)

        write_dir_atomically(directory, write)
        return tuple(os.path.join(directory, n) for n in names)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length}, special_tokens={self.all_special_tokens})")


# ---------------------------------------------------------------------------------------------------------------
# Reading a tokenizer directory
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Settings:
    """What transformers' ``from_pretrained`` gathers from a directory before building a tokenizer."""

    directory: str
    config: dict  # tokenizer_config.json, with special_tokens_map.json merged in (legacy layout)
    added: dict  # id -> AddedToken, from added_tokens_decoder (or the legacy added_tokens.json / tokenizer.json)

    def special_tokens(self, defaults: Mapping[str, Optional[str]]) -> tuple[dict, list[str]]:
        """Named special tokens (config value, else the class default; an explicit null means none) and extras."""
        named: dict[str, Optional[str]] = {}
        for attr in SPECIAL_ATTRIBUTES:
            value = self.config.get(attr, defaults.get(attr))
            named[attr] = None if value is None else AddedToken.parse(value, True, f"{attr} in {self.where}").content
        extras = self.config.get("extra_special_tokens", self.config.get("additional_special_tokens")) or []
        if isinstance(extras, dict):  # named model-specific tokens
            extras = list(extras.values())
        if not isinstance(extras, list):
            raise TokenizerError(f"extra_special_tokens in {self.where} must be a list, found {extras!r}")
        return named, [AddedToken.parse(t, True, f"extra_special_tokens in {self.where}").content for t in extras]

    def token_flags(self, content: str) -> AddedToken:
        """The flags a named special token gets: those listed for it, else special and not normalized."""
        for token in self.added.values():
            if token.content == content:
                return token
        return AddedToken(content)

    def common(self) -> dict:
        """Constructor arguments every class reads from tokenizer_config.json."""
        cfg = self.config
        max_len = cfg.get("model_max_length", cfg.get("max_len"))
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, (int, float))):
            raise TokenizerError(f"model_max_length in {self.where} must be a number, found {max_len!r}")
        return dict(model_max_length=None if max_len is None else int(max_len),
                    clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
                    padding_side=cfg.get("padding_side", "right"), truncation_side=cfg.get("truncation_side", "right"),
                    split_special_tokens=bool(cfg.get("split_special_tokens", False)),
                    name_or_path=self.directory)

    @property
    def where(self) -> str:
        return os.path.join(self.directory, TOKENIZER_CONFIG)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def has(self, *names: str) -> bool:
        return all(os.path.isfile(self.path(n)) for n in names)


def _read_settings(directory: Union[str, os.PathLike], read_tokenizer_json: bool = True) -> _Settings:
    """tokenizer_config.json plus, when it lists no ``added_tokens_decoder``, the legacy files transformers also
    reads: special_tokens_map.json (its values win), added_tokens.json and tokenizer.json's ``added_tokens``."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory not found: {directory}" if not os.path.exists(directory)
                                else f"tokenizer path is not a directory: {directory}")
    config = _read_json_object(os.path.join(directory, TOKENIZER_CONFIG), "tokenizer config")
    added: dict[int, AddedToken] = {}
    where = os.path.join(directory, TOKENIZER_CONFIG)
    if "added_tokens_decoder" in config:
        listed = config["added_tokens_decoder"]
        if not isinstance(listed, dict):
            raise TokenizerError(f"added_tokens_decoder in {where} must be an object, found {listed!r}")
        for key, value in listed.items():
            try:
                index = int(key)
            except ValueError:
                raise TokenizerError(f"added_tokens_decoder in {where} has a non-integer id {key!r}") from None
            added[index] = AddedToken.parse(value, where=f"added_tokens_decoder[{key}] in {where}")
    else:
        stm = _read_json_object(os.path.join(directory, "special_tokens_map.json"), "special tokens map")
        config.update({k: v for k, v in stm.items() if k in SPECIAL_ATTRIBUTES
                       or k in ("extra_special_tokens", "additional_special_tokens")})
        legacy = os.path.join(directory, "added_tokens.json")
        if os.path.isfile(legacy):
            encoder = _read_json(legacy, "added tokens file")
            if not isinstance(encoder, dict):
                raise TokenizerError(f"added tokens file {legacy} must map token strings to ids")
            named = {AddedToken.parse(config[a]).content for a in SPECIAL_ATTRIBUTES if config.get(a)}
            for content, index in encoder.items():
                added[int(index)] = AddedToken(content, special=content in named, normalized=content not in named)
        path = os.path.join(directory, TOKENIZER_JSON)
        if read_tokenizer_json and os.path.isfile(path):
            data = _read_json(path, "tokenizer file")
            for entry in (data.get("added_tokens") or []) if isinstance(data, dict) else []:
                if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
                    raise TokenizerError(f"{path}: added token {entry!r} has no integer id")
                added[entry["id"]] = AddedToken.parse(entry, where=f"added_tokens in {path}")
    return _Settings(directory, config, dict(sorted(added.items())))


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece: BertGeneration
# ---------------------------------------------------------------------------------------------------------------
class BertGenerationTokenizer(PreTrainedTokenizer):
    """transformers' ``BertGenerationTokenizer``: SentencePiece with ``<s>`` ``</s>`` ``<unk>`` ``<pad>`` ``<::::>``.

    It never adds special tokens (``add_special_tokens`` has no effect). Special tokens typed in the text are cut
    out first, each remaining fragment is encoded by SentencePiece on its own (so each gets the leading "▁"), and
    the pieces map to ids through the added-token table first, then the model. Decoding joins the pieces, turns "▁"
    into spaces and strips the ends, as transformers' slow tokenizer does (not ``SentencePieceProcessor.decode``).
    Special tokens missing from the model are appended after it (ids from ``vocab_size`` on), as transformers does.
    Added tokens listed in ``tokenizer_config.json`` keep their ids and lstrip / rstrip / single_word flags.
    """

    tokenizer_class = "BertGenerationTokenizer"
    vocab_file_name = "spiece.model"
    DEFAULTS: ClassVar[dict] = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                    sep_token="<::::>")

    def __init__(self, vocab_file: Union[str, os.PathLike], *, bos_token: Optional[str] = "<s>",
                 eos_token: Optional[str] = "</s>", unk_token: Optional[str] = "<unk>",
                 pad_token: Optional[str] = "<pad>", sep_token: Optional[str] = "<::::>",
                 cls_token: Optional[str] = None, mask_token: Optional[str] = None,
                 extra_special_tokens: Sequence[str] = (), added_tokens: Optional[Mapping[int, AddedToken]] = None,
                 sp_model_kwargs: Optional[Mapping[str, Any]] = None, **common: Any) -> None:
        import sentencepiece as spm
        vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"SentencePiece model not found: {vocab_file}")
        with open(vocab_file, "rb") as f:
            self._model_bytes = f.read()
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self._sp = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        try:
            self._sp.LoadFromSerializedProto(self._model_bytes)
        except (RuntimeError, OSError, TypeError) as e:
            raise TokenizerError(f"{vocab_file} is not a valid SentencePiece model: {e}") from None
        special = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                       sep_token=sep_token, cls_token=cls_token, mask_token=mask_token)
        super().__init__(special, extra_special_tokens, **common)
        self.vocab_file = vocab_file
        self._n_pieces = self._sp.get_piece_size()
        # Listed added tokens keep their ids verbatim (transformers reads added_tokens_decoder as is); special
        # tokens not listed take their id in the model, or the next id after the vocabulary.
        self._added_by_id: dict[int, AddedToken] = dict(added_tokens or {})
        self._added_ids: dict[str, int] = {t.content: i for i, t in self._added_by_id.items()}
        for content in self.all_special_tokens:
            if content in self._added_ids:
                continue
            index = self._sp.piece_to_id(content)
            if self._sp.id_to_piece(index) != content:
                index = self._n_pieces + sum(1 for i in self._added_by_id if i >= self._n_pieces)
            self._added_by_id[index] = AddedToken(content)
            self._added_ids[content] = index
        # Longest first, so at one position the longest added token wins (transformers' Trie.split).
        contents = sorted(self._added_ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(c) for c in contents) + ")") if contents else None

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "BertGenerationTokenizer":
        """Reads ``spiece.model`` and the optional ``tokenizer_config.json`` of a transformers directory."""
        s = _read_settings(directory, read_tokenizer_json=False)
        if not s.has(cls.vocab_file_name):
            raise TokenizerError(f"{s.directory} has no {cls.vocab_file_name}: a BertGenerationTokenizer needs its "
                                 "SentencePiece model")
        if s.config.get("legacy", True) is False:
            raise TokenizerError(f"{s.where} sets legacy=false (SentencePiece without the dummy prefix), which is "
                                 "not supported")
        kwargs = s.config.get("sp_model_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise TokenizerError(f"sp_model_kwargs in {s.where} must be an object, found {kwargs!r}")
        named, extras = s.special_tokens(cls.DEFAULTS)
        return cls(s.path(cls.vocab_file_name), **named,
                   extra_special_tokens=extras, added_tokens=s.added, sp_model_kwargs=kwargs, **s.common())

    @property
    def vocab_size(self) -> int:
        """Size of the SentencePiece vocabulary."""
        return self._n_pieces

    def __len__(self) -> int:
        """Pieces plus added tokens that are not pieces (transformers counts the keys of its vocabulary)."""
        return self._n_pieces + sum(1 for c in self._added_ids if self._sp.id_to_piece(self._sp.piece_to_id(c)) != c)

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a piece (the unknown id for pieces outside the vocabulary)."""
        if token in self._added_ids:
            return self._added_ids[token]
        return self._sp.piece_to_id(token)  # an unknown piece gives the model's unk id, as in transformers

    def _fragments(self, text: str) -> list[tuple[str, bool]]:
        """``text`` cut at added tokens: (fragment, is_added_token), with transformers' slow-tokenizer handling of
        the lstrip / rstrip / single_word flags (a single-word token touching a word becomes part of that text)."""
        if self._split_re is None or self.split_special_tokens:
            return [(text, False)]
        # Like transformers' Trie.split, no empty fragments between adjacent tokens (they would be neighbours).
        parts = [[p, k % 2 == 1] for k, p in enumerate(self._split_re.split(text)) if p]
        for k, (part, is_added) in enumerate(parts):
            if not is_added:
                continue
            flags = self._added_by_id[self._added_ids[part]]
            left = parts[k - 1][0] if k > 0 else ""
            right = parts[k + 1][0] if k + 1 < len(parts) else ""
            if flags.rstrip and right:
                parts[k + 1][0] = right.lstrip()
            if flags.lstrip and left:
                parts[k - 1][0] = left.rstrip()
            # A merged fragment is an added token only if its whole text is one (transformers compares strings).
            if flags.single_word and left and left[-1] != " ":
                merged = parts[k - 1][0] + part
                parts[k - 1], parts[k] = [merged, merged in self._added_ids], ["", False]
            elif flags.single_word and right and right[0] != " ":
                merged = part + parts[k + 1][0]
                parts[k + 1], parts[k] = [merged, merged in self._added_ids], ["", False]
        return [(p, a) for p, a in parts if p]

    def _tokenize_batch(self, texts: list[str]) -> list[list[str]]:
        cut = [self._fragments(t) for t in texts]
        plain = [p for frags in cut for p, added in frags if not added]
        encoded = iter(self._sp.encode(plain, out_type=str) if plain else [])
        return [[piece for p, added in frags for piece in ([p] if added else next(encoded))] for frags in cut]

    def tokenize(self, text: str) -> list[str]:
        """The SentencePiece pieces of ``text``."""
        return self._tokenize_batch([text])[0]

    def _encode_batch(self, texts: list[str], add_special_tokens: bool, max_length: Optional[int]) -> list[list[int]]:
        rows = []
        for pieces in self._tokenize_batch(texts):
            ids = [self.token_to_id(p) for p in pieces]
            if max_length is not None and len(ids) > max_length:
                ids = ids[:max_length] if self.truncation_side == "right" else ids[len(ids) - max_length:]
            rows.append(ids)
        return rows

    def convert_ids_to_tokens(self, ids: Ids, skip_special_tokens: bool = False) -> list[str]:
        """Pieces of ``ids`` (optionally without special tokens)."""
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        out = []
        for i in _id_list(ids):
            if i in skip:
                continue
            if i in self._added_by_id:
                out.append(self._added_by_id[i].content)
            elif 0 <= i < self._n_pieces:
                out.append(self._sp.id_to_piece(i))
            else:  # transformers raises SentencePiece's IndexError here too
                raise IndexError(f"token id {i} is outside the vocabulary (ids 0..{self._n_pieces - 1} and "
                                 f"added {sorted(i for i in self._added_by_id if i >= self._n_pieces)})")
        return out

    def _decode_one(self, ids: list[int], skip_special_tokens: bool) -> str:
        return "".join(self.convert_ids_to_tokens(ids, skip_special_tokens)).replace(SPIECE_UNDERLINE, " ").strip()

    def _write_files(self, directory: str) -> list[str]:
        with open(os.path.join(directory, self.vocab_file_name), "wb") as f:
            f.write(self._model_bytes)
        return [self.vocab_file_name]

    def _config(self) -> dict:
        return {"added_tokens_decoder": {str(i): t.to_json() for i, t in sorted(self._added_by_id.items())},
                "backend": "sentencepiece", "sp_model_kwargs": self.sp_model_kwargs}


# ---------------------------------------------------------------------------------------------------------------
# tokenizers-library pipelines: WordPiece (BERT), byte-level BPE (RoBERTa), or any tokenizer.json as it is
# ---------------------------------------------------------------------------------------------------------------
class _RustTokenizer(PreTrainedTokenizer):
    """A ``tokenizers.Tokenizer`` behind the shared surface, set up like transformers' ``TokenizersBackend``.

    Listed added tokens and then the named special tokens are added to the backend (special ones as special, not
    normalized unless listed otherwise); encoding and decoding are the backend's, so special tokens typed in the
    text match as they do in transformers, and ``skip_special_tokens`` drops the tokens the backend marks special.
    """

    tokenizer_class = "TokenizersBackend"

    def _setup(self, backend: Any, settings_added: Mapping[int, AddedToken], flags: Callable[[str], AddedToken],
               as_is: bool) -> None:
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = self.split_special_tokens
        self._tok = backend
        self._as_is = as_is
        for token in [*settings_added.values(), *(flags(t) for t in self.all_special_tokens)]:
            (backend.add_special_tokens if token.special else backend.add_tokens)([token.to_rust()])

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def _encode_batch(self, texts: list[str], add_special_tokens: bool, max_length: Optional[int]) -> list[list[int]]:
        n_special = self._tok.num_special_tokens_to_add(False) if add_special_tokens else 0
        if max_length is not None and max_length < n_special:
            # Surprising but matched: transformers (the tokenizers backend) then does not truncate at all.
            max_length = None
        rows = []
        for enc in self._tok.encode_batch(texts, add_special_tokens=False):
            # The backend's own truncation: the text is cut so that it fits with the special tokens.
            if max_length is not None and len(enc.ids) > max_length - n_special:
                enc.truncate(max_length - n_special, direction=self.truncation_side)
            if add_special_tokens:
                enc = self._tok.post_process(enc, None, True)
            rows.append(list(enc.ids))
        return rows

    def convert_ids_to_tokens(self, ids: Ids, skip_special_tokens: bool = False) -> list[str]:
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        tokens = (self._tok.id_to_token(i) for i in _id_list(ids) if i not in skip)
        return [t for t in tokens if t is not None]

    def _decode_one(self, ids: list[int], skip_special_tokens: bool) -> str:
        if any(i < 0 for i in ids):
            raise ValueError(f"token ids must be >= 0, got {min(ids)}")
        # Ids past the vocabulary are dropped, as the backend (and so transformers) does.
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _cleanup_allowed(self) -> bool:
        # transformers 5.x ignores clean_up_tokenization_spaces for BPE models (it would eat real spaces).
        return type(self._tok.model).__name__ != "BPE"

    def _write_files(self, directory: str) -> list[str]:
        self._tok.save(os.path.join(directory, TOKENIZER_JSON))
        return [TOKENIZER_JSON]

    def _config(self) -> dict:
        added = {str(i): AddedToken(t.content, special=t.special, lstrip=t.lstrip, rstrip=t.rstrip,
                                    single_word=t.single_word, normalized=t.normalized).to_json()
                 for i, t in sorted(self._tok.get_added_tokens_decoder().items())}
        return {"backend": "tokenizers", "added_tokens_decoder": added,
                **({"tokenizer_class": "TokenizersBackend"} if self._as_is else {})}


class JsonTokenizer(_RustTokenizer):
    """A ``tokenizer.json`` of another model type than WordPiece or BPE, used as it is (see ``load_tokenizer_json``)."""

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "_RustTokenizer":
        """Loads ``tokenizer.json`` (and its config) from a directory, used as it is."""
        return load_tokenizer_json(directory)


def load_tokenizer_json(directory: Union[str, os.PathLike]) -> _RustTokenizer:
    """The directory's ``tokenizer.json`` used as it is, with ``tokenizer_config.json``'s settings when present.

    This is what transformers' ``TokenizersBackend`` does, the ``AutoTokenizer`` choice for a directory that names
    no tokenizer class: normalizer, pre-tokenizer, post-processor and decoder all come from the file (a WordPiece
    file gives a ``BertTokenizer``, a BPE file a ``RobertaTokenizer``, others a ``JsonTokenizer``). The file's
    padding and truncation presets are dropped, as transformers drops them on each call, and only the tokens the
    config names (or the padding preset's pad token) count as named special tokens.
    """
    import tokenizers
    s = _read_settings(directory)
    if not s.has(TOKENIZER_JSON):
        raise TokenizerError(f"{s.directory} has no {TOKENIZER_JSON}")
    try:
        backend = tokenizers.Tokenizer.from_file(s.path(TOKENIZER_JSON))
    except Exception as e:  # the Rust loader raises a bare Exception
        raise TokenizerError(f"{s.path(TOKENIZER_JSON)} is not a valid tokenizers file: {e}") from None
    target = {"WordPiece": BertTokenizer, "BPE": RobertaTokenizer}.get(type(backend.model).__name__, JsonTokenizer)
    self = target.__new__(target)
    named, extras = s.special_tokens({"pad_token": backend.padding["pad_token"]} if backend.padding else {})
    PreTrainedTokenizer.__init__(self, named, extras, **s.common())
    self._setup(backend, s.added, s.token_flags, as_is=True)
    return self


class BertTokenizer(_RustTokenizer):
    """transformers' ``BertTokenizer``: WordPiece, ``[CLS] text [SEP]`` by default, from ``vocab.txt`` or
    ``tokenizer.json``.

    As in transformers 5.x the pipeline is rebuilt from the vocabulary and the config: ``BertNormalizer``
    (``do_lower_case``, default True; ``strip_accents``; ``tokenize_chinese_chars``), ``BertPreTokenizer``,
    WordPiece with at most 100 characters a word, and the WordPiece decoder (whose clean-up of spaces before
    punctuation is always on). Surprising but matched: the normalizer written in ``tokenizer.json`` is ignored
    when the class is declared, so a ``tokenizer.json`` saying ``lowercase: false`` still lowercases unless
    ``tokenizer_config.json`` says ``do_lower_case: false``.
    """

    tokenizer_class = "BertTokenizer"
    DEFAULTS: ClassVar[dict] = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                                    mask_token="[MASK]")

    def __init__(self, vocab: Union[str, os.PathLike, Mapping[str, int]], *, do_lower_case: bool = True,
                 strip_accents: Optional[bool] = None, tokenize_chinese_chars: bool = True,
                 unk_token: Optional[str] = "[UNK]", sep_token: Optional[str] = "[SEP]",
                 pad_token: Optional[str] = "[PAD]", cls_token: Optional[str] = "[CLS]",
                 mask_token: Optional[str] = "[MASK]", bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, extra_special_tokens: Sequence[str] = (),
                 added_tokens: Optional[Mapping[int, AddedToken]] = None,
                 token_flags: Optional[Callable[[str], AddedToken]] = None, **common: Any) -> None:
        from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece
        vocab = os.fspath(vocab) if isinstance(vocab, (str, os.PathLike)) else dict(vocab)
        special = dict(unk_token=unk_token, sep_token=sep_token, pad_token=pad_token, cls_token=cls_token,
                       mask_token=mask_token, bos_token=bos_token, eos_token=eos_token)
        super().__init__(special, extra_special_tokens, **common)
        self.do_lower_case, self.strip_accents = bool(do_lower_case), strip_accents
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        try:  # a path is read by tokenizers itself, as transformers passes it
            backend = Tokenizer(WordPiece(vocab, unk_token=str(unk_token)))
        except Exception as e:
            raise TokenizerError(f"cannot read the WordPiece vocabulary {vocab if isinstance(vocab, str) else ''}: "
                                 f"{e}") from None
        backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
                                                        strip_accents=strip_accents, lowercase=do_lower_case)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        self._setup(backend, added_tokens or {}, token_flags or AddedToken, as_is=False)
        cls_id = self.cls_token_id if self.cls_token_id is not None else 2
        sep_id = self.sep_token_id if self.sep_token_id is not None else 3
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_token}:0 $A:0 {sep_token}:0", pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
            special_tokens=[(str(cls_token), cls_id), (str(sep_token), sep_id)])

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "BertTokenizer":
        """From ``tokenizer.json`` (its vocabulary only) or ``vocab.txt``, and ``tokenizer_config.json``."""
        s = _read_settings(directory)
        if s.has(TOKENIZER_JSON):
            vocab: Any = _json_model(s.path(TOKENIZER_JSON), "WordPiece").get("vocab")
            if not isinstance(vocab, dict):
                raise TokenizerError(f"{s.path(TOKENIZER_JSON)} holds no WordPiece vocabulary")
        elif s.has("vocab.txt"):
            vocab = s.path("vocab.txt")
        else:
            raise TokenizerError(f"{s.directory} has no vocab.txt or {TOKENIZER_JSON}: a BertTokenizer needs its "
                                 "WordPiece vocabulary")
        cfg = s.config
        named, extras = s.special_tokens(cls.DEFAULTS)
        return cls(vocab, do_lower_case=cfg.get("do_lower_case", True), strip_accents=cfg.get("strip_accents"),
                   tokenize_chinese_chars=cfg.get("tokenize_chinese_chars", True),
                   **named, extra_special_tokens=extras,
                   added_tokens=s.added, token_flags=s.token_flags, **s.common())

    def _config(self) -> dict:
        if self._as_is:
            return super()._config()
        return {**super()._config(), "do_lower_case": self.do_lower_case, "strip_accents": self.strip_accents,
                "tokenize_chinese_chars": self.tokenize_chinese_chars}


class RobertaTokenizer(_RustTokenizer):
    """transformers' ``RobertaTokenizer``: byte-level BPE, ``<s> text </s>`` by default, from ``vocab.json`` +
    ``merges.txt`` or ``tokenizer.json``.

    Rebuilt as transformers 5.x does: BPE without dropout, unknown token or fused unknowns, the ``ByteLevel``
    pre-tokenizer (``add_prefix_space`` from the config, default False) and decoder, and ``RobertaProcessing``.
    """

    tokenizer_class = "RobertaTokenizer"
    DEFAULTS: ClassVar[dict] = dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                    unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")

    def __init__(self, vocab: Union[str, os.PathLike, Mapping[str, int]],
                 merges: Union[str, os.PathLike, Sequence[tuple[str, str]]], *, add_prefix_space: bool = False,
                 trim_offsets: bool = True, bos_token: Optional[str] = "<s>", eos_token: Optional[str] = "</s>",
                 sep_token: Optional[str] = "</s>", cls_token: Optional[str] = "<s>",
                 unk_token: Optional[str] = "<unk>", pad_token: Optional[str] = "<pad>",
                 mask_token: Optional[str] = "<mask>", extra_special_tokens: Sequence[str] = (),
                 added_tokens: Optional[Mapping[int, AddedToken]] = None,
                 token_flags: Optional[Callable[[str], AddedToken]] = None, **common: Any) -> None:
        from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import BPE
        vocab = os.fspath(vocab) if isinstance(vocab, (str, os.PathLike)) else dict(vocab)
        merges = os.fspath(merges) if isinstance(merges, (str, os.PathLike)) else [tuple(m) for m in merges]
        special = dict(bos_token=bos_token, eos_token=eos_token, sep_token=sep_token, cls_token=cls_token,
                       unk_token=unk_token, pad_token=pad_token, mask_token=mask_token)
        super().__init__(special, extra_special_tokens, **common)
        self.add_prefix_space, self.trim_offsets = bool(add_prefix_space), bool(trim_offsets)
        try:
            backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                    end_of_word_suffix="", fuse_unk=False))
        except Exception as e:
            raise TokenizerError(f"cannot read the BPE vocabulary / merges: {e}") from None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        backend.decoder = decoders.ByteLevel()
        self._setup(backend, added_tokens or {}, token_flags or AddedToken, as_is=False)
        backend.post_processor = processors.RobertaProcessing((str(sep_token), self.sep_token_id),
                                                              (str(cls_token), self.cls_token_id),
                                                              trim_offsets, add_prefix_space)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "RobertaTokenizer":
        """From ``tokenizer.json`` (vocabulary and merges only) or ``vocab.json`` + ``merges.txt``."""
        s = _read_settings(directory)
        if s.has(TOKENIZER_JSON):
            model = _json_model(s.path(TOKENIZER_JSON), "BPE")
            vocab: Any = model.get("vocab")
            merges: Any = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        elif s.has("vocab.json", "merges.txt"):
            vocab, merges = s.path("vocab.json"), s.path("merges.txt")
            _read_json(vocab, "BPE vocabulary")  # a clear error for a corrupt file
        else:
            raise TokenizerError(f"{s.directory} has neither vocab.json + merges.txt nor {TOKENIZER_JSON}: a "
                                 "RobertaTokenizer needs its byte-level BPE vocabulary and merges")
        cfg = s.config
        named, extras = s.special_tokens(cls.DEFAULTS)
        return cls(vocab, merges, add_prefix_space=cfg.get("add_prefix_space", False),
                   trim_offsets=cfg.get("trim_offsets", True),
                   **named, extra_special_tokens=extras,
                   added_tokens=s.added, token_flags=s.token_flags, **s.common())

    def _config(self) -> dict:
        if self._as_is:
            return super()._config()
        return {**super()._config(), "add_prefix_space": self.add_prefix_space, "trim_offsets": self.trim_offsets,
                "errors": "replace"}


def _json_model(path: str, kind: str) -> dict:
    """The ``model`` section of a tokenizer.json, checked to be of ``kind``."""
    data = _read_json(path, "tokenizer file")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise TokenizerError(f"{path} has no model section")
    if model.get("type", kind) != kind:
        raise TokenizerError(f"{path} holds a {model.get('type')} model, expected {kind}")
    return model


# ---------------------------------------------------------------------------------------------------------------
# AutoTokenizer
# ---------------------------------------------------------------------------------------------------------------
_CLASSES: dict[str, type] = {
    "BertGenerationTokenizer": BertGenerationTokenizer,
    "BertTokenizer": BertTokenizer,
    "RobertaTokenizer": RobertaTokenizer,
}
_AS_IS_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast", "PreTrainedTokenizer")
_MODEL_TYPES = {"bert-generation": BertGenerationTokenizer, "bert_generation": BertGenerationTokenizer,
                "bert": BertTokenizer, "roberta": RobertaTokenizer}
_EXPECTED = ("spiece.model (BertGeneration), vocab.txt or tokenizer.json (BERT WordPiece), "
             "vocab.json + merges.txt or tokenizer.json (RoBERTa byte-level BPE)")


class AutoTokenizer:
    """Picks and loads the tokenizer of a directory, as transformers' ``AutoTokenizer`` would.

    Order: ``tokenizer_class`` in tokenizer_config.json, then in config.json, then config.json's ``model_type``
    (an encoder-decoder config uses its encoder's), then the files: spiece.model, then a bare tokenizer.json
    (used as it is), then vocab.json + merges.txt, then vocab.txt. Where transformers would fail for lack of a
    config (a lone vocab.txt or vocab.json + merges.txt), the class those files belong to is used.
    """

    @staticmethod
    def from_pretrained(directory: Union[str, os.PathLike]) -> PreTrainedTokenizer:
        """The tokenizer of ``directory``, chosen as described in the class docstring."""
        directory = os.fspath(directory)
        settings = _read_settings(directory, read_tokenizer_json=False)  # checks the directory and the config
        model_config = _read_json_object(os.path.join(directory, "config.json"), "model config")
        declared = settings.config.get("tokenizer_class") or model_config.get("tokenizer_class")
        if declared is not None:
            name = str(declared)
            name = name[:-4] if name.endswith("Fast") and name != "PreTrainedTokenizerFast" else name
            if name in _AS_IS_CLASSES:
                return load_tokenizer_json(directory)
            if name not in _CLASSES:
                raise TokenizerError(f"{directory} declares tokenizer_class {declared!r}, which is not supported "
                                     f"(supported: {', '.join(_CLASSES)})")
            return _CLASSES[name].from_pretrained(directory)
        model_type = model_config.get("model_type")
        if model_type == "encoder-decoder" and isinstance(model_config.get("encoder"), dict):
            model_type = model_config["encoder"].get("model_type")
        by_type = _MODEL_TYPES.get(model_type)
        if by_type is not None and _has_files_for(by_type, settings):
            return by_type.from_pretrained(directory)
        if settings.has("spiece.model"):
            return BertGenerationTokenizer.from_pretrained(directory)
        if settings.has(TOKENIZER_JSON):
            return load_tokenizer_json(directory)
        if settings.has("vocab.json", "merges.txt"):
            return RobertaTokenizer.from_pretrained(directory)
        if settings.has("vocab.txt"):
            return BertTokenizer.from_pretrained(directory)
        raise TokenizerError(f"no tokenizer files in {directory}: expected {_EXPECTED}")


def _has_files_for(cls: type, s: _Settings) -> bool:
    if cls is BertGenerationTokenizer:
        return s.has("spiece.model")
    if cls is BertTokenizer:
        return s.has(TOKENIZER_JSON) or s.has("vocab.txt")
    return s.has(TOKENIZER_JSON) or s.has("vocab.json", "merges.txt")


__all__ = ["AddedToken", "AutoTokenizer", "BertGenerationTokenizer", "BertTokenizer", "JsonTokenizer",
           "PreTrainedTokenizer", "RobertaTokenizer", "TokenizerError", "clean_up_tokenization",
           "load_tokenizer_json"]
