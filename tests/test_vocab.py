"""Vocabulary trimming keeps the segmentation and the model's outputs on the corpus it was trimmed for."""
import json

import numpy as np
import pytest

import bertgen_flax as bg
from bertgen_flax.cli import resolve_source
from bertgen_flax.training import synthetic_pairs
from bertgen_flax.vocab import trim_vocabulary

from conftest import TOL, max_diff


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory):
    corpus = [t for pair in synthetic_pairs(300) for t in pair]
    out = tmp_path_factory.mktemp("trim") / "minilm-trimmed"
    size = trim_vocabulary(resolve_source("minilm"), corpus, str(out))
    return corpus, str(out), size


def test_the_trimmed_vocabulary_keeps_the_specials_and_only_the_used_tokens(trimmed):
    corpus, out, size = trimmed
    full = bg.AutoTokenizer.from_pretrained(resolve_source("minilm"))
    used = {i for row in full(corpus)["input_ids"] for i in row}
    tokens = open(f"{out}/vocab.txt", encoding="utf-8").read().split("\n")[:-1]
    assert len(tokens) == size == len(used | {full.convert_tokens_to_ids(t) for t in
                                              ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")})
    assert tokens[:1] == ["[PAD]"] and json.load(open(f"{out}/config.json"))["vocab_size"] == size


def test_the_corpus_is_segmented_into_the_same_tokens(trimmed):
    corpus, out, _ = trimmed
    full = bg.AutoTokenizer.from_pretrained(resolve_source("minilm"))
    small = bg.AutoTokenizer.from_pretrained(out)
    for text in corpus[:200]:
        assert small.convert_ids_to_tokens(small(text)["input_ids"]) == \
            full.convert_ids_to_tokens(full(text)["input_ids"])


def test_the_trimmed_encoder_computes_what_the_full_one_computes_on_the_corpus(trimmed):
    corpus, out, _ = trimmed
    texts = corpus[:4]
    full_tok, small_tok = bg.AutoTokenizer.from_pretrained(resolve_source("minilm")), bg.AutoTokenizer.from_pretrained(out)
    full = bg.BertGenerationEncoder.from_pretrained(resolve_source("minilm"))
    small = bg.BertGenerationEncoder.from_pretrained(out)
    a, b = full_tok(texts, padding=True), small_tok(texts, padding=True)
    want = full(np.asarray(a["input_ids"]), np.asarray(a["attention_mask"])).last_hidden_state
    got = small(np.asarray(b["input_ids"]), np.asarray(b["attention_mask"])).last_hidden_state
    assert max_diff(got, want, np.asarray(a["attention_mask"])) <= TOL


def test_a_checkpoint_without_a_wordpiece_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no vocab.txt"):
        trim_vocabulary(str(tmp_path), ["a"], str(tmp_path / "out"))
