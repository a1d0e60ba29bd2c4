"""Configs that read and write Hugging Face ``config.json`` files unchanged.

``BertGenerationConfig`` holds every field of transformers 4.57's ``BertGenerationConfig``; fields we do not model
are kept in ``extra`` so a read/write round trip loses nothing. ``EncoderDecoderConfig`` wraps an encoder and a
decoder config like transformers' ``EncoderDecoderConfig``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .fileio import atomic_file

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"

# Activations transformers' ACT2FN offers that we implement exactly (see modeling.ACTIVATIONS).
SUPPORTED_ACTIVATIONS = (
    "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "relu6", "silu", "swish",
    "tanh", "sigmoid", "mish", "linear", "leaky_relu", "gelu_python", "gelu_python_tanh", "gelu_accurate",
    "gelu_10", "relu2", "hardswish", "laplace",
)
POSITION_EMBEDDING_TYPES = ("absolute", "relative_key", "relative_key_query")


class ConfigError(ValueError):
    """A config that cannot describe a valid model."""


def _write_json_atomic(path: str, data: Mapping[str, Any]) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str, what: str = "config") -> dict:
    """Reads a JSON object, raising an error that names the file when it is missing or corrupt."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a JSON object, found {type(data).__name__}")
    return data


class _ConfigFile:
    """config.json reading and writing shared by both config classes (they supply from_dict/to_dict)."""

    @classmethod
    def from_json_file(cls, path: str):
        try:
            return cls.from_dict(read_json(path))
        except TypeError as e:  # a field of the wrong kind
            raise ConfigError(f"invalid config in {path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str):
        """Reads ``config.json`` from a directory (or the file itself)."""
        return cls.from_json_file(os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path)

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        _write_json_atomic(os.path.join(directory, CONFIG_NAME), self.to_dict())


@dataclass(frozen=True)
class BertGenerationConfig(_ConfigFile):
    """Hyper-parameters of one BertGeneration stack (encoder, or decoder with ``is_decoder=True``)."""

    vocab_size: int = 50358
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = 2
    eos_token_id: Optional[int] = 1
    position_embedding_type: str = "absolute"
    use_cache: bool = True
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    tie_encoder_decoder: bool = False
    decoder_start_token_id: Optional[int] = None
    cross_attention_hidden_size: Optional[int] = None
    # Fields transformers writes that we carry unchanged (architectures, transformers_version, ...).
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    model_type = "bert-generation"

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raises ``ConfigError`` for values no model can have."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                f"({self.num_attention_heads})")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"unknown activation hidden_act={self.hidden_act!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ConfigError(
                f"unknown position_embedding_type={self.position_embedding_type!r}; "
                f"supported: {', '.join(POSITION_EMBEDDING_TYPES)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
            for i in ids:
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_size:
                    raise ConfigError(f"{name}={value!r} is not a token id in [0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        """Size of one attention head (hidden_size / num_attention_heads)."""
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> "BertGenerationConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # ---- HF dict I/O ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BertGenerationConfig":
        """Builds a config from a HF dict: ``bert-generation``, or ``bert``/``roberta`` for warm starts."""
        data = dict(data)
        model_type = data.get("model_type", cls.model_type)
        if model_type not in ("bert-generation", "bert", "roberta"):
            raise ConfigError(
                f"model_type {model_type!r} cannot be read as a BertGeneration config "
                "(expected 'bert-generation', 'bert' or 'roberta')")
        if model_type == "roberta":
            # RoBERTa positions start at padding_idx + 1; the converter drops those leading rows.
            offset = int(data.get("pad_token_id", 1)) + 1
            data["max_position_embeddings"] = int(data.get("max_position_embeddings", 514)) - offset
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        if model_type != cls.model_type:
            data["_source_model_type"] = model_type
        data.pop("model_type", None)
        return cls(**kwargs, extra=data)

    def to_dict(self) -> dict:
        """The HF ``config.json`` dict (model_type ``bert-generation``), extras included."""
        out = {k: v for k, v in self.extra.items() if not k.startswith("_")}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["model_type"] = self.model_type
        return out



@dataclass(frozen=True)
class EncoderDecoderConfig(_ConfigFile):
    """An encoder and a decoder config, plus the ids generation and the loss need (HF ``encoder-decoder``)."""

    encoder: BertGenerationConfig
    decoder: BertGenerationConfig
    tie_encoder_decoder: bool = False
    decoder_start_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    tie_word_embeddings: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    model_type = "encoder-decoder"

    def __post_init__(self) -> None:
        if not self.decoder.is_decoder or not self.decoder.add_cross_attention:
            raise ConfigError("the decoder config of an encoder-decoder model needs is_decoder=True and "
                              "add_cross_attention=True")
        if self.encoder.is_decoder:
            raise ConfigError("the encoder config of an encoder-decoder model must have is_decoder=False")
        if self.tie_encoder_decoder:
            enc, dec = self.encoder, self.decoder
            for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "max_position_embeddings", "position_embedding_type", "hidden_act"):
                if getattr(enc, name) != getattr(dec, name):
                    raise ConfigError(
                        f"tie_encoder_decoder needs identical encoder and decoder shapes, but {name} differs: "
                        f"{getattr(enc, name)!r} vs {getattr(dec, name)!r}")

    @property
    def needs_projection(self) -> bool:
        """True when ``enc_to_dec_proj`` maps encoder states to the decoder's width (as transformers decides)."""
        return (self.encoder.hidden_size != self.decoder.hidden_size
                and self.decoder.cross_attention_hidden_size is None)

    def replace(self, **changes: Any) -> "EncoderDecoderConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_encoder_decoder_configs(cls, encoder: BertGenerationConfig, decoder: BertGenerationConfig,
                                     **kwargs: Any) -> "EncoderDecoderConfig":
        """Joins two configs, turning the second into a decoder with cross-attention (as transformers does)."""
        encoder = encoder.replace(is_decoder=False, add_cross_attention=False)
        decoder = decoder.replace(is_decoder=True, add_cross_attention=True)
        return cls(encoder=encoder, decoder=decoder, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EncoderDecoderConfig":
        """Reads an HF ``encoder-decoder`` config dict; unknown keys are kept in ``extra``."""
        data = dict(data)
        if data.get("model_type") != cls.model_type:
            raise ConfigError(f"model_type {data.get('model_type')!r} is not 'encoder-decoder'")
        if "encoder" not in data or "decoder" not in data:
            raise ConfigError("an encoder-decoder config needs both 'encoder' and 'decoder' entries")
        encoder = BertGenerationConfig.from_dict(data.pop("encoder"))
        decoder = BertGenerationConfig.from_dict(data.pop("decoder"))
        data.pop("model_type")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "encoder", "decoder"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        return cls(encoder=encoder, decoder=decoder, **kwargs, extra=data)

    def to_dict(self) -> dict:
        """The HF ``config.json`` dict, with the fields read from it unchanged."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "encoder", "decoder"):
                out[f.name] = getattr(self, f.name)
        out["encoder"] = self.encoder.to_dict()
        out["decoder"] = self.decoder.to_dict()
        out["model_type"] = self.model_type
        out["is_encoder_decoder"] = True
        return out



def load_config(path: str) -> BertGenerationConfig | EncoderDecoderConfig:
    """Reads any supported ``config.json`` (a file or a directory holding one)."""
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    data = read_json(file)
    try:
        if data.get("model_type") == EncoderDecoderConfig.model_type:
            return EncoderDecoderConfig.from_dict(data)
        return BertGenerationConfig.from_dict(data)
    except TypeError as e:
        raise ConfigError(f"invalid config in {file}: {e}") from None
