"""Configs read and write Hugging Face config.json files unchanged and reject invalid values."""
import json

import pytest
import transformers

import bertgen_flax as bg
from bertgen_flax.config import SUPPORTED_ACTIVATIONS, load_config

from conftest import TINY


def test_bert_generation_config_round_trips_through_transformers(tmp_path):
    hf = transformers.BertGenerationConfig(**TINY, is_decoder=True, add_cross_attention=True,
                                           tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf")
    ours = bg.BertGenerationConfig.from_pretrained(str(tmp_path / "hf"))
    assert ours.is_decoder and ours.add_cross_attention and not ours.tie_word_embeddings
    assert ours.hidden_size == TINY["hidden_size"] and ours.layer_norm_eps == 1e-12
    ours.save_pretrained(str(tmp_path / "ours"))
    back = transformers.BertGenerationConfig.from_pretrained(tmp_path / "ours")
    for key, value in hf.to_dict().items():
        if key not in ("transformers_version",):
            assert getattr(back, key) == value, key


def test_unknown_fields_survive_a_round_trip(tmp_path):
    data = {**TINY, "model_type": "bert-generation", "my_custom_field": {"a": [1, 2]}, "architectures": ["X"]}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = bg.BertGenerationConfig.from_pretrained(str(tmp_path))
    cfg.save_pretrained(str(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["my_custom_field"] == {"a": [1, 2]} and written["architectures"] == ["X"]


def test_encoder_decoder_config_round_trips_through_transformers(tmp_path):
    enc = transformers.BertGenerationConfig(**TINY)
    dec = transformers.BertGenerationConfig(**TINY, is_decoder=True, add_cross_attention=True)
    hf = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec, decoder_start_token_id=2,
                                                                         pad_token_id=0)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_config(str(tmp_path / "hf"))
    assert isinstance(ours, bg.EncoderDecoderConfig)
    assert ours.decoder_start_token_id == 2 and ours.pad_token_id == 0 and ours.decoder.add_cross_attention
    ours.save_pretrained(str(tmp_path / "ours"))
    back = transformers.EncoderDecoderConfig.from_pretrained(tmp_path / "ours")
    assert back.decoder_start_token_id == 2 and back.decoder.is_decoder and not back.encoder.is_decoder


def test_every_field_of_the_457_config_is_modelled():
    fields = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
              "initializer_range", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
              "position_embedding_type", "use_cache", "is_decoder", "add_cross_attention", "tie_word_embeddings",
              "tie_encoder_decoder", "decoder_start_token_id"}
    assert fields <= set(bg.BertGenerationConfig.__dataclass_fields__)


def test_bert_and_roberta_configs_are_read_for_warm_starts(tmp_path):
    transformers.BertConfig(**TINY).save_pretrained(tmp_path / "bert")
    transformers.RobertaConfig(**{**TINY, "max_position_embeddings": 66}, pad_token_id=1,
                               layer_norm_eps=1e-5).save_pretrained(tmp_path / "roberta")
    bert = bg.BertGenerationConfig.from_pretrained(str(tmp_path / "bert"))
    roberta = bg.BertGenerationConfig.from_pretrained(str(tmp_path / "roberta"))
    assert bert.hidden_size == TINY["hidden_size"] and bert.extra["_source_model_type"] == "bert"
    assert roberta.max_position_embeddings == 64 and roberta.layer_norm_eps == 1e-5


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=30), "not a multiple of num_attention_heads"),
    (dict(hidden_act="gelu_nonsense"), "unknown activation"),
    (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(position_embedding_type="rotary"), "unknown position_embedding_type"),
    (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (dict(pad_token_id=500), "pad_token_id=500"),
])
def test_invalid_config_raises_a_clear_error(changes, message):
    with pytest.raises(bg.ConfigError, match=message):
        bg.BertGenerationConfig(**{**TINY, **changes})


def test_corrupt_config_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(bg.ConfigError, match="config.json"):
        bg.BertGenerationConfig.from_pretrained(str(tmp_path))


def test_config_with_wrong_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(bg.ConfigError, match="gpt2"):
        load_config(str(tmp_path))


def test_tied_encoder_decoder_needs_identical_shapes():
    enc = bg.BertGenerationConfig(**TINY)
    dec = bg.BertGenerationConfig(**{**TINY, "intermediate_size": 40}, is_decoder=True, add_cross_attention=True)
    with pytest.raises(bg.ConfigError, match="intermediate_size"):
        bg.EncoderDecoderConfig(encoder=enc, decoder=dec, tie_encoder_decoder=True)


def test_every_supported_activation_is_a_transformers_activation():
    from transformers.activations import ACT2CLS
    assert set(SUPPORTED_ACTIVATIONS) <= set(ACT2CLS)
