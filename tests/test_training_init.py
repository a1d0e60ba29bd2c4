"""Model initialisation for training, per the paper's set-ups: BERT2BERT, BERTShare, BERT2Rnd, Rnd2Rnd and
continuing an encoder-decoder checkpoint; and the training config's parsing rules."""
import json

import numpy as np
import pytest

from bertgen_flax.training import TokenizedPairs, TrainConfig, TrainConfigError, synthetic_pairs
from bertgen_flax.training.trainer import build_model, build_tokenizer, make_schedule

from conftest import TINY

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "and", "she", "he", "it", "the", "was", "a"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A random transformers BertModel with a small WordPiece vocabulary, saved like a real BERT checkpoint."""
    import torch
    import transformers
    path = tmp_path_factory.mktemp("bert")
    vocab = WORDS + [f"w{i}" for i in range(TINY["vocab_size"] - len(WORDS))]
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY), add_pooling_layer=False)
    model.save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return path, model


def _config(bert_dir, tmp_path, init):
    path, _ = bert_dir
    return TrainConfig.from_dict({"model": {"init": init, "pretrained": str(path)},
                                  "data": {"synthetic": "fusion", "synthetic_train": 8, "synthetic_eval": 2},
                                  "run": {"output_dir": str(tmp_path)}})


def _build(bert_dir, tmp_path, init):
    config = _config(bert_dir, tmp_path, init)
    tok = build_tokenizer(config, None)
    data = TokenizedPairs.from_pairs(synthetic_pairs(4), tok)
    return build_model(config, data, len(tok)), data


def _bert_word_embeddings(bert_dir):
    return bert_dir[1].embeddings.word_embeddings.weight.detach().numpy()


def _word_embeddings(tree):
    return np.asarray(tree["embeddings"]["word_embeddings"]["embedding"])


def test_bert2bert_warm_starts_encoder_and_decoder_from_bert(bert_dir, tmp_path):
    model, data = _build(bert_dir, tmp_path, "bert2bert")
    bert = _bert_word_embeddings(bert_dir)
    np.testing.assert_array_equal(_word_embeddings(model.params["encoder"]), bert)
    np.testing.assert_array_equal(_word_embeddings(model.params["decoder"]["bert"]), bert)
    assert "crossattention" in model.params["decoder"]["bert"]["encoder"]["layer"]
    assert not model.config.tie_encoder_decoder


def test_the_ids_of_a_warm_start_come_from_the_data_tokenizer(bert_dir, tmp_path):
    model, data = _build(bert_dir, tmp_path, "bert2bert")
    assert (model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id) == \
        (WORDS.index("[CLS]"), WORDS.index("[PAD]"), WORDS.index("[SEP]")) == (data.start_id, data.pad_id,
                                                                             data.eos_id)


def test_bertshare_ties_encoder_and_decoder_into_one_set_of_weights(bert_dir, tmp_path):
    model, _ = _build(bert_dir, tmp_path, "bertshare")
    assert model.config.tie_encoder_decoder
    assert "encoder" not in model.params
    np.testing.assert_array_equal(_word_embeddings(model.params["decoder"]["bert"]), _bert_word_embeddings(bert_dir))


def test_bert2rnd_keeps_the_bert_encoder_and_draws_a_random_decoder(bert_dir, tmp_path):
    model, _ = _build(bert_dir, tmp_path, "bert2rnd")
    bert = _bert_word_embeddings(bert_dir)
    np.testing.assert_array_equal(_word_embeddings(model.params["encoder"]), bert)
    decoder = _word_embeddings(model.params["decoder"]["bert"])
    assert decoder.shape == bert.shape and not np.allclose(decoder, bert)
    # transformers' initialisation: normal(0, initializer_range)
    assert abs(decoder.std() - model.config.decoder.initializer_range) < 0.005


def test_rnd2rnd_takes_the_shape_and_vocabulary_of_bert_but_none_of_its_weights(bert_dir, tmp_path):
    model, _ = _build(bert_dir, tmp_path, "rnd2rnd")
    bert = _bert_word_embeddings(bert_dir)
    for tree in (model.params["encoder"], model.params["decoder"]["bert"]):
        assert _word_embeddings(tree).shape == bert.shape and not np.allclose(_word_embeddings(tree), bert)
    assert model.config.encoder.num_hidden_layers == TINY["num_hidden_layers"]


def test_rnd2rnd_from_a_config_and_a_word_vocabulary(tmp_path):
    config = TrainConfig.from_dict({
        "model": {"init": "rnd2rnd", "tokenizer": "word", "config": {"hidden_size": 24, "num_hidden_layers": 1,
                                                                      "num_attention_heads": 2,
                                                                      "intermediate_size": 30}},
        "data": {"synthetic": "fusion", "synthetic_train": 50, "synthetic_eval": 2},
        "run": {"output_dir": str(tmp_path)}})
    pairs = synthetic_pairs(50)
    tok = build_tokenizer(config, pairs)
    model = build_model(config, TokenizedPairs.from_pairs(pairs, tok), len(tok))
    assert model.config.encoder.vocab_size == len(tok)
    assert _word_embeddings(model.params["encoder"]).shape == (len(tok), 24)


def test_continuing_a_checkpoint_with_other_special_ids_is_refused(bert_dir, tmp_path):
    from conftest import seq2seq_checkpoint
    ckpt = tmp_path / "ed"
    seq2seq_checkpoint(ckpt)  # decoder start 2, pad 0: the BERT vocabulary above has [CLS] = 2 but [SEP] = 3
    import transformers
    cfg = transformers.EncoderDecoderConfig.from_pretrained(ckpt)
    cfg.eos_token_id = 7
    cfg.save_pretrained(ckpt)
    config = TrainConfig.from_dict({"model": {"init": "checkpoint", "checkpoint": str(ckpt),
                                              "tokenizer": str(bert_dir[0])},
                                    "data": {"synthetic": "fusion"}, "run": {"output_dir": str(tmp_path)}})
    tok = build_tokenizer(config, None)
    with pytest.raises(TrainConfigError, match="eos_token_id=7"):
        build_model(config, TokenizedPairs.from_pairs(synthetic_pairs(4), tok), len(tok))


# ---------------------------------------------------------------------------------------------------------------
# The config file
# ---------------------------------------------------------------------------------------------------------------
def test_paper_schedule_is_warmup_then_inverse_sqrt_scaled_by_hidden_size(tmp_path):
    config = TrainConfig.from_dict({"optim": {"schedule": "inverse_sqrt", "learning_rate": 0.05,
                                              "warmup_steps": 100},
                                    "data": {"synthetic": "fusion"}, "run": {"output_dir": str(tmp_path)},
                                    "model": {"pretrained": "x"}})
    schedule = make_schedule(config, 1024)
    for step in (1, 50, 100, 400, 10000):
        want = 0.05 / 1024 ** 0.5 * min(step ** -0.5, step / 100 ** 1.5)
        assert float(schedule(step)) == pytest.approx(want, rel=1e-6)


def test_relative_paths_in_a_file_resolve_against_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.json"
    path.write_text(json.dumps({"model": {"pretrained": "ckpt"}, "data": {"train": ["d/*.jsonl"]},
                                "run": {"output_dir": "../out"}}))
    config = TrainConfig.load(str(path))
    assert config.model.pretrained == str(tmp_path / "sub" / "ckpt")
    assert config.data.train == (str(tmp_path / "sub" / "d" / "*.jsonl"),)
    assert config.run.output_dir == str(tmp_path / "out")


def test_overrides_parse_json_values_and_keep_other_text_as_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = TrainConfig.load(None, ["model.pretrained=minilm", "optim.learning_rate=3e-4", "run.plot=false",
                                     "data.train=[\"a.jsonl\", \"b.tsv\"]", "optim.clip_norm=null"])
    assert config.model.pretrained == "minilm"  # a name, not a path
    assert config.optim.learning_rate == 3e-4 and config.run.plot is False and config.optim.clip_norm is None
    assert config.data.train == (str(tmp_path / "a.jsonl"), str(tmp_path / "b.tsv"))


def test_an_override_without_a_section_is_an_error():
    with pytest.raises(TrainConfigError, match="section.key"):
        TrainConfig.load(None, ["steps=10"])


def test_the_resolved_config_round_trips_through_its_dict(tmp_path):
    config = TrainConfig.load(None, ["model.pretrained=minilm", "data.synthetic=split", "run.steps=7",
                                     f"run.output_dir={tmp_path}"])
    assert TrainConfig.from_dict(config.to_dict()) == config
