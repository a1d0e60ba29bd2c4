"""The training data pipeline: reading pairs (and its errors), the synthetic fusion/split set, tokenization with its
disk cache, and the bucketed, seeded, resumable batch iterator."""
from __future__ import annotations

import collections
import json
import os
import re

import numpy as np
import pytest

from bertgen_flax.training.data import (IGNORE_INDEX, BatchIterator, DataError, TokenizedPairs, read_pairs,
                                        synthetic_pairs, word_tokenizer, write_jsonl)

PAIRS = [("Anna plays chess. She loves it.", "Anna plays chess and loves it."),
         ("Tom was tired. However, he kept working.", "Tom was tired; however, he kept working."),
         ("Ünïcödé source ✓", "target with \"quotes\" and \\ backslash")]


def _write(path, text: str | bytes) -> str:
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(path, mode, **({} if isinstance(text, bytes) else {"encoding": "utf-8"})) as f:
        f.write(text)
    return str(path)


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def test_read_jsonl_tsv_and_globs_in_sorted_order(tmp_path):
    _write(tmp_path / "b.jsonl", _jsonl([{"source": s, "target": t, "id": k} for k, (s, t) in enumerate(PAIRS)]))
    _write(tmp_path / "a.tsv", "source\ttarget\nx1\ty1\n\n  \nx2\ty2\r\n")  # header, blank lines, CRLF
    _write(tmp_path / "c.json", "\ufeff" + _jsonl([{"source": "s", "target": "t"}]))  # BOM, .json is JSONL
    assert read_pairs(tmp_path / "b.jsonl") == PAIRS
    assert read_pairs(str(tmp_path / "a.tsv")) == [("x1", "y1"), ("x2", "y2")]
    everything = read_pairs(str(tmp_path / "*"))  # a glob: sorted file names, then line order
    assert everything == [("x1", "y1"), ("x2", "y2"), *PAIRS, ("s", "t")]
    assert read_pairs([tmp_path / "c.json", str(tmp_path / "a.*")]) == [("s", "t"), ("x1", "y1"), ("x2", "y2")]


def test_read_custom_keys_format_override_and_write_jsonl_round_trip(tmp_path):
    _write(tmp_path / "d.txt", _jsonl([{"complex": "a b", "simple": "c"}]))
    assert read_pairs(tmp_path / "d.txt", format="jsonl", source_key="complex", target_key="simple") == [("a b", "c")]
    _write(tmp_path / "e.data", "p\tq\n")
    assert read_pairs(tmp_path / "e.data", format="tsv") == [("p", "q")]
    out = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl(PAIRS, out) == len(PAIRS)
    assert read_pairs(out) == PAIRS
    assert write_jsonl(PAIRS[:1], out) == 1 and read_pairs(out) == PAIRS[:1]  # replaced whole
    assert os.listdir(out.parent) == ["out.jsonl"]  # no temporary file left behind


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"source": "a", "target": "b"}\n{"source": "a", "target": \n', r"bad\.jsonl:2: malformed JSON"),
    ("key.jsonl", '\n{"source": "a"}\n', r"key\.jsonl:2: missing key 'target' \(keys present: 'source'\)"),
    ("int.jsonl", '{"source": 3, "target": "b"}\n', r"int\.jsonl:1: 'source' must be a string, found int 3"),
    ("null.jsonl", '{"source": "a", "target": null}\n', r"null\.jsonl:1: 'target' must be a string, found NoneType"),
    ("list.jsonl", '["a", "b"]\n', r"list\.jsonl:1: expected a JSON object"),
    ("cols.tsv", "a\tb\nc\n", r"cols\.tsv:2: expected 2 tab-separated columns \(source, target\), found 1"),
    ("three.tsv", "a\tb\nc\td\te\n", r"three\.tsv:2: expected 2 tab-separated columns .*found 3"),
    ("empty.jsonl", "", r"no pairs found in .*empty\.jsonl: the data set is empty"),
    ("blank.tsv", "\n  \n\n", r"no pairs found in .*blank\.tsv"),
    ("latin.tsv", b"ok\tfine\ncaf\xe9\tx\n", r"latin\.tsv:2: not valid UTF-8"),
    ("data.csv", "a,b\n", r"data\.csv: cannot tell the format from the extension '\.csv'"),
])
def test_read_errors_name_the_file_and_line(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        read_pairs(path)


def test_missing_files_globs_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        read_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"no file matches the pattern .*\*\.tsv"):
        read_pairs(str(tmp_path / "*.tsv"))
    with pytest.raises(DataError, match="is a directory"):
        read_pairs(tmp_path)
    with pytest.raises(DataError, match="no data files given"):
        read_pairs([])
    _write(tmp_path / "a.jsonl", _jsonl([{"source": "a", "target": "b"}]))
    with pytest.raises(DataError, match="format must be"):
        read_pairs(tmp_path / "a.jsonl", format="csv")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------------------------
CONNECTIVES = [" and ", ", and ", "; however, ", ", but ", " because ", "Although ", ", so ", "After ", ", who ",
               ", which ", ", while "]


def test_synthetic_is_deterministic_unique_and_varied():
    for task in ("fusion", "split"):
        pairs = synthetic_pairs(3000, task=task, seed=1)
        assert pairs == synthetic_pairs(3000, task=task, seed=1)
        assert pairs[:500] == synthetic_pairs(500, task=task, seed=1)  # a prefix of a longer draw
        assert len(pairs) == 3000 and len({s for s, _ in pairs}) == 3000
        assert len(set(pairs) & set(synthetic_pairs(3000, task=task, seed=2))) < 30  # seeds differ
        words = collections.Counter(w for s, t in pairs for w in re.findall(r"[A-Za-z]+", s + " " + t))
        assert len(words) >= 250, len(words)
        for s, t in pairs:
            for side in (s, t):
                assert 5 <= len(side.split()) <= 24, side
                assert side[0].isupper() and side.endswith("."), side
        fused = [t if task == "fusion" else s for s, t in pairs]
        split = [s if task == "fusion" else t for s, t in pairs]
        assert all(x.count(".") == 1 for x in fused) and all(x.count(".") == 2 for x in split)
        for c in CONNECTIVES:
            assert sum(c in x for x in fused) > 50, c
    assert synthetic_pairs(0) == []
    with pytest.raises(ValueError, match="task must be one of"):
        synthetic_pairs(3, task="paraphrase")


def test_synthetic_target_is_a_function_of_the_source():
    for task in ("fusion", "split"):
        seen: dict[str, str] = {}
        for seed in range(3):
            for s, t in synthetic_pairs(4000, task=task, seed=seed):
                assert seen.setdefault(s, t) == t, (s, t, seen[s])


def test_synthetic_fusion_rewrites_pronouns_and_split_restores_them():
    fusion = synthetic_pairs(2000, seed=0)
    rewritten = [(s, t) for s, t in fusion if re.match(r"^[^.]*\. (She|He|They) ", s) and ". " not in t]
    assert len(rewritten) > 50
    for s, t in rewritten:  # "Anna plays chess. She loves it." -> "Anna plays chess and loves it."
        first, second = s[:-1].split(". ")
        assert t == f"{first} and {second.split(' ', 1)[1]}."
    split = dict(synthetic_pairs(2000, task="split", seed=0))
    women = [(s, t) for s, t in split.items() if re.match(r"^(Anna|Maria|Lucy|Emma) [^,;]* and ", s)]
    assert women and all(". She " in t for _, t in women)


# ---------------------------------------------------------------------------------------------------------------
# Tokenization and its cache
# ---------------------------------------------------------------------------------------------------------------
class Counting:
    """A tokenizer wrapper that counts encoding calls."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.tok.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def fusion():
    return synthetic_pairs(600, seed=3)


@pytest.fixture(scope="module")
def tok(tmp_path_factory, fusion):
    return word_tokenizer([t for p in fusion for t in p] + [t for p in PAIRS for t in p],
                          tmp_path_factory.mktemp("wordtok"))


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory, fusion):
    sentencepiece = pytest.importorskip("sentencepiece")
    from bertgen_flax import AutoTokenizer
    d = tmp_path_factory.mktemp("spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([t for p in fusion for t in p]), model_prefix=str(d / "spiece"), vocab_size=300,
        minloglevel=2, pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    return AutoTokenizer.from_pretrained(d)


def test_word_tokenizer_gives_one_token_per_word(tok, fusion):
    source = fusion[0][0]
    ids = tok.encode(source, add_special_tokens=False)
    assert tok.unk_token_id not in ids and len(ids) == len(re.findall(r"\w+|[^\w\s]", source))
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 2, 3)
    assert tok.decode(ids).replace(" ;", ";") == source


def test_bert_rule_sources_keep_cls_sep_targets_end_with_sep(tok, fusion):
    data = TokenizedPairs.from_pairs(fusion, tok)
    assert len(data) == len(fusion) and data.source_ids.dtype == np.int32
    assert (data.pad_id, data.eos_id, data.start_id) == (0, 3, 2)
    for i, (s, t) in enumerate(fusion[:50]):
        assert list(data.source(i)) == tok(s)["input_ids"]  # default special tokens: [CLS] s [SEP]
        assert list(data.target(i)) == tok(t, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    short = TokenizedPairs.from_pairs(fusion, tok, max_source_length=6, max_target_length=5)
    assert short.source_lengths.max() == 6 and short.target_lengths.max() == 5
    assert all(short.source(i)[-1] == tok.sep_token_id and short.target(i)[-1] == 3 for i in range(len(short)))
    assert list(short.source(0)[:5]) == list(data.source(0)[:5])
    assert short.truncated_sources == int((data.source_lengths > 6).sum()) > 0
    assert short.truncated_targets == int((data.target_lengths > 5).sum()) > 0


def test_sentencepiece_rule_appends_eos(spm_tok, fusion):
    data = TokenizedPairs.from_pairs(fusion[:20], spm_tok, max_source_length=64, max_target_length=64)
    assert (data.eos_id, data.start_id, data.pad_id) == (spm_tok.eos_token_id, spm_tok.bos_token_id, 0)
    for i, (s, t) in enumerate(fusion[:20]):
        assert list(data.source(i)) == spm_tok.encode(s)  # BertGeneration adds no special tokens
        assert list(data.target(i)) == spm_tok.encode(t) + [spm_tok.eos_token_id]


def test_cache_hit_skips_the_tokenizer_and_changes_invalidate_it(tmp_path, tok, fusion):
    path = tmp_path / "train.jsonl"
    write_jsonl(fusion, path)
    cache = tmp_path / "cache"
    counting = Counting(tok)
    first = TokenizedPairs.from_files(path, counting, cache_dir=cache, max_source_length=32)
    assert counting.calls > 0 and not first.from_cache
    assert [n for n in os.listdir(cache)] == [os.path.basename(first.cache_path)]  # atomic: no temp left
    counting.calls = 0
    again = TokenizedPairs.from_files(str(path), counting, cache_dir=cache, max_source_length=32)
    assert counting.calls == 0 and again.from_cache and again == first
    np.testing.assert_array_equal(again.target_ids, first.target_ids)

    TokenizedPairs.from_files(path, counting, cache_dir=cache, max_source_length=16)  # another length: a miss
    assert counting.calls > 0
    counting.calls = 0
    write_jsonl(fusion[:-1] + [("A new source.", "A new target.")], path)  # the file changes: a miss
    changed = TokenizedPairs.from_files(path, counting, cache_dir=cache, max_source_length=32)
    assert counting.calls > 0 and not changed.from_cache and changed != first
    assert len(os.listdir(cache)) == 3

    counting.calls = 0
    with open(changed.cache_path, "wb") as f:  # a damaged cache file is rebuilt, not an error
        f.write(b"not a zip")
    rebuilt = TokenizedPairs.from_files(path, counting, cache_dir=cache, max_source_length=32)
    assert counting.calls > 0 and rebuilt == changed
    counting.calls = 0
    assert TokenizedPairs.from_pairs(fusion, counting, cache_dir=cache).from_cache is False
    assert TokenizedPairs.from_pairs(fusion, counting, cache_dir=cache).from_cache is True


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tok, fusion):
    return TokenizedPairs.from_pairs(fusion, tok)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_are_deterministic_by_seed_and_differ_across_seeds(data):
    n = 2 * BatchIterator(data, 16, seed=0).batches_per_epoch + 3  # across two epoch boundaries
    a = _take(BatchIterator(data, 16, seed=7), n)
    _same(a, _take(BatchIterator(data, 16, seed=7), n))
    b = _take(BatchIterator(data, 16, seed=8), n)
    assert any(not np.array_equal(x["example_ids"], y["example_ids"]) for x, y in zip(a, b))
    it = BatchIterator(data, 16, seed=7)
    epoch0 = [x["example_ids"] for x in _take(it, it.batches_per_epoch)]
    epoch1 = [x["example_ids"] for x in _take(it, it.batches_per_epoch)]
    assert it.epoch == 1 and not all(np.array_equal(x, y) for x, y in zip(epoch0, epoch1))  # reshuffled


@pytest.mark.parametrize("stop", [0, 5, 37, 38, 40])  # 37 is one epoch (600 // 16): the boundary
def test_resume_yields_exactly_what_an_uninterrupted_run_yields(data, stop):
    full = _take(BatchIterator(data, 16, seed=3), stop + 12)
    it = BatchIterator(data, 16, seed=3)
    _take(it, stop)
    state = json.loads(json.dumps(it.state()))
    assert {"seed", "epoch", "position"} <= state.keys()
    resumed = BatchIterator(data, 16, seed=999).restore(state)  # the state's seed wins
    _same(_take(resumed, 12), full[stop:])


def test_restore_rejects_other_settings(data):
    state = BatchIterator(data, 16, seed=0).state()
    with pytest.raises(DataError, match="batch_size=16, this iterator has 8"):
        BatchIterator(data, 8, seed=0).restore(state)
    with pytest.raises(DataError, match="shuffle=True, this iterator has False"):
        BatchIterator(data, 16, seed=0, shuffle=False).restore(state)
    with pytest.raises(DataError, match="out of range"):
        BatchIterator(data, 16, seed=0).restore({**state, "position": 10_000})
    with pytest.raises(DataError, match="not an iterator state"):
        BatchIterator(data, 16, seed=0).restore({"epoch": 1})


def test_batch_contents_shapes_and_padding(data):
    it = BatchIterator(data, 16, seed=0)
    batches = _take(it, it.batches_per_epoch)
    shapes = {(b["input_ids"].shape, b["labels"].shape) for b in batches}
    assert len(shapes) <= 6, shapes  # few shapes: few jit compilations
    for b in batches:
        (B, S), (_, T) = b["input_ids"].shape, b["labels"].shape
        assert B == 16 and S in it.bucket_boundaries and T in it.target_bucket_boundaries
        for k in ("input_ids", "attention_mask", "labels", "decoder_attention_mask", "example_ids"):
            assert b[k].dtype == np.int32, k
        src_len, tgt_len = data.source_lengths[b["example_ids"]], data.target_lengths[b["example_ids"]]
        assert S == min(x for x in it.bucket_boundaries if x >= src_len.max())  # the smallest bucket that fits
        assert T == min(x for x in it.target_bucket_boundaries if x >= tgt_len.max())
        for row, i in enumerate(b["example_ids"]):
            n, m = src_len[row], tgt_len[row]
            np.testing.assert_array_equal(b["input_ids"][row, :n], data.source(i))
            assert (b["input_ids"][row, n:] == data.pad_id).all()
            np.testing.assert_array_equal(b["attention_mask"][row], np.arange(S) < n)
            np.testing.assert_array_equal(b["labels"][row, :m], data.target(i))
            assert (b["labels"][row, m:] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(b["decoder_attention_mask"], b["labels"] != IGNORE_INDEX)
    padding = sum((b["attention_mask"] == 0).sum() for b in batches) / sum(b["attention_mask"].size for b in batches)
    assert padding < 0.45, padding


def test_every_example_once_per_epoch(data):
    N = len(data)
    it = BatchIterator(data, 64, seed=1, drop_remainder=False)
    assert it.batches_per_epoch == -(-N // 64)
    for epoch in range(2):
        ids = np.concatenate([b["example_ids"] for b in _take(it, it.batches_per_epoch)])
        assert it.epoch == epoch
        assert sorted(ids[ids >= 0]) == list(range(N)) and (ids < 0).sum() == -N % 64
    dropped = BatchIterator(data, 64, seed=1)  # drop_remainder: each example at most once, N // 64 full batches
    ids = np.concatenate([b["example_ids"] for b in _take(dropped, dropped.batches_per_epoch)])
    assert len(ids) == N // 64 * 64 == len(set(ids.tolist())) and ids.min() >= 0


def test_one_pass_without_shuffle_for_evaluation(data):
    it = BatchIterator(data, 50, shuffle=False, repeat=False, drop_remainder=False)
    batches = list(it)
    assert len(batches) == it.batches_per_epoch and list(it) == []  # one pass, then exhausted
    filler = batches[-1]["example_ids"] < 0
    assert filler.sum() == -len(data) % 50
    assert (batches[-1]["attention_mask"][filler] == 0).all() and (batches[-1]["labels"][filler] == -100).all()
    ids = np.concatenate([b["example_ids"] for b in batches])
    ids = ids[ids >= 0]
    buckets = np.searchsorted(it.bucket_boundaries, data.source_lengths[ids])
    assert (np.diff(buckets) >= 0).all()  # bucket order, data order inside (leftovers move one bucket up)
    assert sorted(ids.tolist()) == list(range(len(data)))
    _same(batches, list(BatchIterator(data, 50, seed=5, shuffle=False, repeat=False, drop_remainder=False)))


def test_explicit_boundaries_and_bad_settings(data):
    it = BatchIterator(data, 16, seed=0, bucket_boundaries=[10, 14], target_bucket_boundaries=[32])
    assert it.bucket_boundaries[:2] == [10, 14] and it.bucket_boundaries[-1] >= data.source_lengths.max()
    assert {next(it)["labels"].shape[1] for _ in range(20)} == {32}
    with pytest.raises(DataError, match="increasing positive integers"):
        BatchIterator(data, 16, seed=0, bucket_boundaries=[16, 8])
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        BatchIterator(data, 0, seed=0)
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchIterator(data, 10_000, seed=0)
