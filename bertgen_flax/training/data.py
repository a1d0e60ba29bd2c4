"""The data side of training: reading source/target pairs, a synthetic fusion/split set, tokenizing with a disk
cache, and a resumable length-bucketed batch iterator.

* ``read_pairs``: JSONL (one object per line) or TSV (two columns) files, paths or globs, with errors that name
  the file and line.
* ``synthetic_pairs``: DiscoFuse / WikiSplit style sentence fusion and splitting, generated from a grammar of a few
  hundred words. The target is a function of the source (every rewrite is signalled in the input), so a small
  model can learn the task exactly; ``word_tokenizer`` builds a whole-word BERT tokenizer for it.
* ``TokenizedPairs``: token ids of every pair, computed once and cached on disk under a key made of the data's
  contents, the tokenizer's files and the length limits.
* ``BatchIterator``: numpy batches grouped by source length and padded to bucket boundaries (few shapes, so few
  jit compilations), shuffled deterministically by (seed, epoch), with a JSON-serialisable ``state()`` to resume
  exactly where a run stopped.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from ..fileio import atomic_file

PathLike = Union[str, os.PathLike]
Pair = tuple[str, str]
IGNORE_INDEX = -100  # label value the loss skips (torch's CrossEntropyLoss default, used by transformers)
CACHE_VERSION = 1  # bump when the tokenization rule or the cache layout changes
STATE_VERSION = 1


class DataError(ValueError):
    """A data file, line or setting that cannot be used; the message names the file and line where there is one."""


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing pairs
# ---------------------------------------------------------------------------------------------------------------
def expand_paths(paths: Union[PathLike, Sequence[PathLike]]) -> list[str]:
    """The files named by ``paths``: each entry is a path or a glob pattern (``*``, ``?``, ``[``), whose matches
    are taken in sorted order. Entries keep their given order. A missing file or a pattern matching nothing is an
    error, so a typo cannot silently shrink the data."""
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not entries:
        raise DataError("no data files given")
    files: list[str] = []
    for entry in entries:
        entry = os.fspath(entry)
        if glob.has_magic(entry):
            matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"no file matches the pattern {entry}")
            files.extend(matches)
        elif os.path.isdir(entry):
            raise DataError(f"{entry} is a directory, not a data file (use a glob such as {entry}/*.jsonl)")
        elif not os.path.isfile(entry):
            raise DataError(f"data file not found: {entry}")
        else:
            files.append(entry)
    return files


def _file_format(path: str, format: str) -> str:
    if format in ("jsonl", "tsv"):
        return format
    if format != "auto":
        raise DataError(f"format must be 'auto', 'jsonl' or 'tsv', got {format!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        return "jsonl"
    if ext == ".tsv":
        return "tsv"
    raise DataError(f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; "
                    "use .jsonl/.json or .tsv, or pass format='jsonl' or format='tsv'")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line, decoded as UTF-8 (a leading BOM is dropped)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if line.strip():
            yield number, line


def _read_file(path: str, format: str, source_key: str, target_key: str) -> list[Pair]:
    pairs: list[Pair] = []
    if _file_format(path, format) == "jsonl":
        for number, line in _lines(path):
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with {source_key!r} and {target_key!r}, "
                                f"found {type(obj).__name__}")
            values = []
            for key in (source_key, target_key):
                if key not in obj:
                    present = ", ".join(map(repr, obj)) or "none"
                    raise DataError(f"{where}: missing key {key!r} (keys present: {present})")
                if not isinstance(obj[key], str):
                    raise DataError(f"{where}: {key!r} must be a string, found {type(obj[key]).__name__} "
                                    f"{json.dumps(obj[key])[:40]}")
                values.append(obj[key])
            pairs.append((values[0], values[1]))
    else:
        for number, line in _lines(path):
            columns = line.rstrip("\r\n").split("\t")
            if len(columns) != 2:
                raise DataError(f"{path}:{number}: expected 2 tab-separated columns (source, target), "
                                f"found {len(columns)}")
            if number == 1 and columns == [source_key, target_key]:
                continue  # a header line naming the columns
            pairs.append((columns[0], columns[1]))
    return pairs


def read_pairs(paths: Union[PathLike, Sequence[PathLike]], *, format: str = "auto", source_key: str = "source",
               target_key: str = "target") -> list[Pair]:
    """All (source, target) pairs of the given files, in file order then line order.

    ``format``: ``"jsonl"`` (one JSON object per line with string values under ``source_key`` and ``target_key``;
    other keys are ignored), ``"tsv"`` (exactly two tab-separated columns; a first line equal to the two key names
    is taken as a header and skipped; texts cannot hold tabs or newlines), or ``"auto"``: by extension, ``.jsonl``
    and ``.json`` are JSONL, ``.tsv`` is TSV. Blank lines are skipped. Any unreadable line raises ``DataError``
    naming the file and line, as does a data set with no pairs at all.
    """
    return _read_files(expand_paths(paths), format, source_key, target_key)


def _read_files(files: Sequence[str], format: str, source_key: str, target_key: str) -> list[Pair]:
    pairs: list[Pair] = []
    for path in files:
        pairs.extend(_read_file(path, format, source_key, target_key))
    if not pairs:
        raise DataError(f"no pairs found in {', '.join(files)}: the data set is empty")
    return pairs


def _atomic_write_bytes(path: PathLike, write: Any) -> None:
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it over ``path``."""
    with atomic_file(path, "wb") as f:
        write(f)


def write_jsonl(pairs: Iterable[Pair], path: PathLike, *, source_key: str = "source",
                target_key: str = "target") -> int:
    """Writes pairs as JSONL (UTF-8, one ``{"source": ..., "target": ...}`` object per line), atomically;
    returns the number of pairs written."""
    buf = io.StringIO()
    count = 0
    for source, target in pairs:
        buf.write(json.dumps({source_key: source, target_key: target}, ensure_ascii=False) + "\n")
        count += 1
    _atomic_write_bytes(path, lambda f: f.write(buf.getvalue().encode("utf-8")))
    return count


# ---------------------------------------------------------------------------------------------------------------
# Synthetic sentence fusion / splitting
# ---------------------------------------------------------------------------------------------------------------
FEMALE = ("Anna", "Maria", "Lucy", "Emma", "Sofia", "Clara", "Julia", "Nora", "Alice", "Laura", "Hannah", "Eva",
          "Mia", "Olivia", "Grace", "Rosa", "Ines", "Lena", "Sara", "Helen", "Irene", "Paula", "Vera", "Zoe")
MALE = ("Tom", "David", "Peter", "Lucas", "Marco", "Daniel", "Omar", "Felix", "Hugo", "Leo", "Samuel", "Victor",
        "Oscar", "Adam", "Ivan", "Paul", "Martin", "Carlos", "Jonas", "Simon", "Noah", "Theo", "Karl", "Ben")
GROUPS = ("the twins", "my parents", "the students", "our neighbours", "the players", "the tourists",
          "his cousins", "her friends", "the children", "the workers")
CITIES = ("Paris", "Rome", "Lisbon", "Berlin", "Madrid", "Vienna", "Prague", "Oslo", "Dublin", "Athens", "Cairo",
          "Tokyo", "Lima", "Quito", "Boston", "Denver", "Chicago", "Toronto", "Sydney", "Seoul", "Milan", "Porto",
          "Geneva", "Krakow", "Nairobi", "Mumbai", "Bergen", "Naples")
PLACES = ("the library", "the market", "the station", "the beach", "the museum", "the harbour", "the office",
          "the school", "the hospital", "the bakery", "the garden", "the stadium", "the airport", "the park",
          "the theatre", "the bridge", "the farm", "the castle")
THINGS = ("lamp", "bicycle", "guitar", "umbrella", "camera", "clock", "table", "jacket", "painting", "phone",
          "kettle", "ladder", "radio", "suitcase", "mirror", "blanket", "hammer", "violin", "basket", "carpet",
          "engine", "oven", "helmet", "wallet", "sofa", "boat", "tent", "backpack", "printer", "statue")
THING_ADJS = ("red", "blue", "green", "small", "large", "old", "new", "wooden", "yellow", "black", "white",
              "cheap", "ancient", "modern", "orange")
THING_VERBS = ("bought", "sold", "painted", "repaired", "found", "lost", "borrowed", "cleaned", "carried",
               "ordered", "built", "broke", "wanted", "moved", "stole", "returned", "measured", "photographed")
PERSON_VERBS = ("visited", "called", "met", "helped", "invited", "thanked", "hugged", "followed", "trusted",
                "admired", "warned", "interviewed", "greeted", "phoned", "missed", "forgave")
CITY_VERBS = ("lived in", "worked in", "studied in", "stayed in", "arrived in", "travelled to", "moved to",
              "flew to", "grew up in", "taught in")
PLACE_VERBS = ("walked to", "waited at", "stayed at", "ran to", "cycled to", "worked at", "slept at", "ate at",
               "drove to", "looked around")
ACTIVITIES = ("played chess", "played tennis", "played football", "played cards", "played the piano",
              "played the violin", "cooked dinner", "baked bread", "wrote a letter", "sang a song", "watched a film",
              "read a novel", "drank coffee", "drank tea", "painted a portrait", "planted tomatoes",
              "fed the cats", "washed the dishes", "learned Spanish", "learned German", "studied physics",
              "studied history", "fixed the roof", "climbed a hill", "caught a fish", "told a joke",
              "ate an apple", "took a nap", "took a photo", "wrote a poem", "knitted a scarf", "swam far")
ADJS = ("tired", "happy", "hungry", "nervous", "busy", "sick", "late", "angry", "proud", "calm", "lonely",
        "bored", "curious", "famous", "cheerful", "worried", "sleepy", "brave", "polite", "quiet")
PROFESSIONS = ("doctor", "teacher", "baker", "pilot", "nurse", "lawyer", "farmer", "painter", "singer", "chef",
               "writer", "dentist", "tailor", "carpenter", "judge", "student", "engineer", "architect", "musician",
               "librarian", "mechanic", "journalist", "sailor", "scientist", "actor", "artist", "plumber", "poet")
TIMES = ("yesterday", "on Monday", "on Friday", "last week", "last year", "in the morning", "at night",
         "in winter", "in the summer", "after lunch", "every day", "twice", "again", "today", "at noon")
IT_VERBS = ("loved it", "hated it", "sold it", "kept it", "lost it", "fixed it", "painted it", "hid it",
            "washed it", "gave it away")
THING_PREDICATES = ("was cheap", "was expensive", "was broken", "was heavy", "was light", "was beautiful",
                    "was dirty", "was useful", "was tiny", "was huge", "was very old", "looked new")
RELATIONS = ("and_vp", "and", "however", "but", "because", "although", "so", "after", "who", "which",
             "apposition", "while")
TASKS = ("fusion", "split")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _article(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


@dataclass(frozen=True)
class _Subject:
    text: str  # lowercase article for groups ("the twins"), a name otherwise
    pronoun: str  # "she", "he", "they"

    @property
    def plural(self) -> bool:
        return self.pronoun == "they"


@dataclass(frozen=True)
class _Clause:
    subject: _Subject
    vp: str
    thing: Optional[str] = None  # head noun of a thing object ("lamp"), for "it" and "which"
    person: Optional[str] = None  # name of a person object, for "who"

    def text(self) -> str:  # without the final full stop, subject as in mid-sentence
        return f"{self.subject.text} {self.vp}"


class _Grammar:
    """Draws the clauses of one example; every choice is visible in the rendered source sentences."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, options: Sequence[str]) -> str:
        return options[self.rng.randrange(len(options))]

    def name(self) -> _Subject:
        female = self.rng.random() < 0.5
        return _Subject(self.pick(FEMALE if female else MALE), "she" if female else "he")

    def subject(self, avoid: Sequence[str] = ()) -> _Subject:
        while True:
            s = _Subject(self.pick(GROUPS), "they") if self.rng.random() < 0.2 else self.name()
            if s.text not in avoid:
                return s

    def time(self, p: float = 0.3) -> str:
        return " " + self.pick(TIMES) if self.rng.random() < p else ""

    def thing_object(self) -> tuple[str, str]:
        noun = self.pick(THINGS)
        phrase = f"{self.pick(THING_ADJS)} {noun}" if self.rng.random() < 0.4 else noun
        return _article(phrase), noun

    def vp(self, subject: _Subject, *, kind: Optional[str] = None, time: bool = True,
           avoid_person: Sequence[str] = (), profession: bool = True) -> _Clause:
        """A past-tense verb phrase for ``subject``; ``kind`` forces one of thing/person/city/place/activity/
        adjective/profession."""
        kinds = ["thing", "thing", "person", "city", "place", "activity", "activity", "adjective"]
        if profession and not subject.plural:
            kinds.append("profession")
        kind = kind or self.pick(kinds)
        be = "were" if subject.plural else "was"
        thing = person = None
        if kind == "thing":
            obj, thing = self.thing_object()
            vp = f"{self.pick(THING_VERBS)} {obj}"
        elif kind == "person":
            while True:
                person = self.name().text
                if person != subject.text and person not in avoid_person:
                    break
            vp = f"{self.pick(PERSON_VERBS)} {person}"
        elif kind == "city":
            vp = f"{self.pick(CITY_VERBS)} {self.pick(CITIES)}"
        elif kind == "place":
            vp = f"{self.pick(PLACE_VERBS)} {self.pick(PLACES)}"
        elif kind == "activity":
            vp = self.pick(ACTIVITIES)
        elif kind == "adjective":
            vp = f"{be} {self.pick(ADJS)}"
        else:
            vp = f"{be} {_article(self.pick(PROFESSIONS))}"
        return _Clause(subject, vp + (self.time() if time and kind not in ("profession",) else ""), thing, person)

    def second_vp(self, subject: _Subject, first: _Clause) -> str:
        """The second clause's verb phrase; refers back to the first clause's thing with "it" when it has one."""
        if first.thing is not None and self.rng.random() < 0.4:
            return self.pick(IT_VERBS) + self.time(0.2)
        return self.vp(subject, avoid_person=(first.subject.text,)).vp


def _fusion_example(g: _Grammar) -> Pair:
    """(two sentences, one fused sentence) for one randomly drawn relation.

    The relation is always recoverable from the two sentences: a pronoun subject coreferent with the first subject
    means "and" + verb phrase; a new subject means ", and"; a cue word maps to one connective ("However," ->
    "; however,", "But" -> ", but", "This was because" -> "because", "Even so," -> "Although ...",
    "As a result," -> ", so", "Afterwards," -> "After ...", ", on the other hand," -> ", while"); repeating the
    first sentence's object name or thing as subject gives a relative clause ("who" / "which"); repeating the
    subject after "X was a <profession>." gives an apposition.
    """
    rel = RELATIONS[g.rng.randrange(len(RELATIONS))]
    subj = g.subject()
    if rel == "apposition":
        subj = g.name()
        first = g.vp(subj, kind="profession")
        vp2 = g.vp(subj, avoid_person=(subj.text,), profession=False).vp  # not "Anna, a doctor, was a pilot."
        profession = first.vp[len("was "):]
        return f"{_cap(first.text())}. {subj.text} {vp2}.", f"{_cap(subj.text)}, {profession}, {vp2}."
    if rel == "who":
        first = g.vp(subj, kind="person", time=False)
        other = _Subject(first.person, "")  # singular: the name as subject
        vp2 = g.vp(other, avoid_person=(first.person, subj.text)).vp
        return f"{_cap(first.text())}. {first.person} {vp2}.", f"{_cap(first.text())}, who {vp2}."
    if rel == "which":
        first = g.vp(subj, kind="thing", time=False)
        pred = g.pick(THING_PREDICATES)
        return f"{_cap(first.text())}. The {first.thing} {pred}.", f"{_cap(first.text())}, which {pred}."
    first = g.vp(subj)
    s1 = _cap(first.text())
    if rel == "and_vp":
        vp2 = g.second_vp(subj, first)
        return f"{s1}. {_cap(subj.pronoun)} {vp2}.", f"{s1} and {vp2}."
    if rel in ("and", "while"):
        other = g.subject(avoid=(subj.text, first.person or ""))
        vp2 = g.second_vp(other, first)
        if rel == "and":
            return f"{s1}. {_cap(other.text)} {vp2}.", f"{s1}, and {other.text} {vp2}."
        return f"{s1}. {_cap(other.text)}, on the other hand, {vp2}.", f"{s1}, while {other.text} {vp2}."
    # cue-marked relations: the second subject is the first one's pronoun or another subject
    other = _Subject(subj.pronoun, subj.pronoun) if g.rng.random() < 0.6 else g.subject(avoid=(subj.text,))
    clause2 = f"{other.text} {g.second_vp(other, first)}"
    if rel == "however":
        return f"{s1}. However, {clause2}.", f"{s1}; however, {clause2}."
    if rel == "but":
        return f"{s1}. But {clause2}.", f"{s1}, but {clause2}."
    if rel == "because":
        return f"{s1}. This was because {clause2}.", f"{s1} because {clause2}."
    if rel == "so":
        return f"{s1}. As a result, {clause2}.", f"{s1}, so {clause2}."
    if rel == "although":
        return f"{s1}. Even so, {clause2}.", f"Although {first.text()}, {clause2}."
    assert rel == "after"
    return f"{s1}. Afterwards, {clause2}.", f"After {first.text()}, {clause2}."


def synthetic_pairs(n: int, *, task: str = "fusion", seed: int = 0) -> list[Pair]:
    """``n`` distinct synthetic (source, target) pairs for demos and tests, the same for the same arguments.

    ``task="fusion"`` (DiscoFuse style): two short sentences -> one sentence joined with a connective (", and",
    "; however,", ", but", "because", "Although", ", so", "After", ", while", relative clauses with "who" and
    "which", appositions), with a pronoun subject dropped where the verb phrases are coordinated
    ("Anna played chess. She loved it." -> "Anna played chess and loved it."). ``task="split"`` (WikiSplit
    style): the reverse, with the pronoun restored from the name. Each side has about 6 to 20 words drawn from a
    vocabulary of a few hundred (names, cities, places, objects, verbs, adjectives, professions).

    The mapping is deterministic given the source (each relation is signalled by the source's words, see
    ``_fusion_example``), so exact match is reachable. Sources are unique within one call.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    g = _Grammar(random.Random(f"bertgen-synthetic:{task}:{seed}"))
    pairs: list[Pair] = []
    seen: set[str] = set()
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise ValueError(f"could not draw {n} distinct examples: the grammar is too small for that many")
        source, target = _fusion_example(g)
        if task == "split":
            source, target = target, source
        if source not in seen:
            seen.add(source)
            pairs.append((source, target))
    return pairs


def word_tokenizer(texts: Iterable[str], directory: PathLike) -> Any:
    """A case-sensitive BERT (WordPiece) tokenizer whose vocabulary is every word and punctuation mark of
    ``texts`` (as BERT's pre-tokenizer splits them), saved to ``directory`` and loaded back with
    ``AutoTokenizer``: one token per word, for training small models from scratch on synthetic data.

    Ids: 0 ``[PAD]``, 1 ``[UNK]``, 2 ``[CLS]``, 3 ``[SEP]``, 4 ``[MASK]``, then the words sorted. Decoding joins
    tokens with spaces and removes the space before "." and "," (but not before ";"), so compare decoded text
    after normalising spaces, or compare ids.
    """
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from ..tokenization import AutoTokenizer, BertTokenizer

    split = BertPreTokenizer()
    words = sorted({w for text in texts for w, _ in split.pre_tokenize_str(text)})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    BertTokenizer(vocab, do_lower_case=False).save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


# ---------------------------------------------------------------------------------------------------------------
# Tokenization with a disk cache
# ---------------------------------------------------------------------------------------------------------------
def _digest_files(files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(b"\0file\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the files ``tokenizer.save_pretrained`` writes (vocabulary, model, config): equal for
    tokenizers that encode alike, whichever directory they were loaded from."""
    h = hashlib.sha256(b"tokenizer\0")
    with tempfile.TemporaryDirectory(prefix="bertgen-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        for root, _, names in sorted(os.walk(tmp)):
            for name in sorted(names):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, tmp).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def target_eos_id(tokenizer: Any) -> int:
    """The id every target ends with: ``eos_token_id`` (``</s>`` for SentencePiece and RoBERTa), else
    ``sep_token_id`` (``[SEP]`` for BERT, whose tokenizer has no EOS)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = tokenizer.sep_token_id
    if eos is None:
        raise DataError(f"{type(tokenizer).__name__} has neither an eos nor a sep token: targets need an end token")
    return int(eos)


def decoder_start_id(tokenizer: Any) -> Optional[int]:
    """The decoder start token that goes with these targets: ``bos_token_id`` (``<s>``), else ``cls_token_id``
    (``[CLS]``), as bert2bert checkpoints set ``decoder_start_token_id``; ``None`` when the tokenizer has neither."""
    start = tokenizer.bos_token_id
    if start is None:
        start = tokenizer.cls_token_id
    return None if start is None else int(start)


def _flatten(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((i for r in rows for i in r), np.int32, int(offsets[-1]))
    return flat, offsets


@dataclass(frozen=True, eq=False)
class TokenizedPairs:
    """Token ids of every pair, stored flat (``*_ids`` concatenated, row ``i`` is
    ``ids[offsets[i]:offsets[i + 1]]``), int32.

    The rule, the same for every tokenizer family:

    * source: ``tokenizer(text)`` with the tokenizer's default special tokens (BERT ``[CLS] x [SEP]``, RoBERTa
      ``<s> x </s>``, BertGeneration SentencePiece ``x``: it adds none), truncated by the tokenizer to
      ``max_source_length`` (so BERT keeps its final ``[SEP]``).
    * target: ``tokenizer(text, add_special_tokens=False)`` cut to ``max_target_length - 1`` tokens, then the EOS
      the model must emit (``target_eos_id``: ``eos_token_id``, else BERT's ``[SEP]``) appended. No leading
      ``[CLS]`` / ``<s>``: the decoder start token (``decoder_start_id``) is put in front by the train step when it
      shifts the labels right, as ``EncoderDecoderModel`` does, so generation yields ``start text EOS``.
    """

    source_ids: np.ndarray
    source_offsets: np.ndarray
    target_ids: np.ndarray
    target_offsets: np.ndarray
    pad_id: int
    eos_id: int
    start_id: Optional[int]
    truncated_sources: int = 0
    truncated_targets: int = 0
    cache_path: Optional[str] = None
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.source_offsets) - 1

    def __eq__(self, other: object) -> bool:
        """Same ids and special ids (where they came from, cache or tokenizer, does not matter)."""
        if not isinstance(other, TokenizedPairs):
            return NotImplemented
        names = ("source_ids", "source_offsets", "target_ids", "target_offsets")
        return all(np.array_equal(getattr(self, k), getattr(other, k)) for k in names) and \
            (self.pad_id, self.eos_id, self.start_id, self.truncated_sources, self.truncated_targets) == \
            (other.pad_id, other.eos_id, other.start_id, other.truncated_sources, other.truncated_targets)

    __hash__ = None  # type: ignore[assignment]

    @property
    def source_lengths(self) -> np.ndarray:
        """Token count of every source."""
        return np.diff(self.source_offsets)

    @property
    def target_lengths(self) -> np.ndarray:
        """Token count of every target (EOS included)."""
        return np.diff(self.target_offsets)

    def source(self, i: int) -> np.ndarray:
        """Source ids of example ``i``."""
        return self.source_ids[self.source_offsets[i]:self.source_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        """Target ids of example ``i`` (ending with EOS)."""
        return self.target_ids[self.target_offsets[i]:self.target_offsets[i + 1]]

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pairs(cls, pairs: Sequence[Pair], tokenizer: Any, *, max_source_length: int = 128,
                   max_target_length: int = 128, cache_dir: Optional[PathLike] = None) -> "TokenizedPairs":
        """Tokenizes in-memory pairs; with ``cache_dir`` the result is cached under a key that hashes the pairs
        themselves (plus tokenizer files and lengths)."""
        pairs = list(pairs)
        h = hashlib.sha256(b"pairs\0")
        for source, target in pairs:
            h.update(json.dumps([source, target], ensure_ascii=False).encode("utf-8") + b"\n")
        return cls._build(lambda: pairs, h.hexdigest(), tokenizer, max_source_length, max_target_length, cache_dir)

    @classmethod
    def from_files(cls, paths: Union[PathLike, Sequence[PathLike]], tokenizer: Any, *, format: str = "auto",
                   source_key: str = "source", target_key: str = "target", max_source_length: int = 128,
                   max_target_length: int = 128, cache_dir: Optional[PathLike] = None) -> "TokenizedPairs":
        """Reads (``read_pairs``) and tokenizes data files; with ``cache_dir`` a second call on unchanged files
        loads the ids without parsing or tokenizing. The key hashes the files' bytes in order (not their names),
        the format settings, the tokenizer's files and the lengths, so any change re-tokenizes."""
        files = expand_paths(paths)
        formats = [_file_format(p, format) for p in files]
        h = hashlib.sha256(json.dumps(["files", formats, source_key, target_key]).encode())
        h.update(_digest_files(files).encode())
        return cls._build(lambda: _read_files(files, format, source_key, target_key), h.hexdigest(), tokenizer,
                          max_source_length, max_target_length, cache_dir)

    @classmethod
    def _build(cls, load: Any, data_key: str, tokenizer: Any, max_source_length: int, max_target_length: int,
               cache_dir: Optional[PathLike]) -> "TokenizedPairs":
        for name, value, low in (("max_source_length", max_source_length, 1),
                                 ("max_target_length", max_target_length, 2)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
        path = None
        if cache_dir is not None:
            key = hashlib.sha256(json.dumps([CACHE_VERSION, data_key, tokenizer_fingerprint(tokenizer),
                                             int(max_source_length), int(max_target_length)]).encode()).hexdigest()
            path = os.path.join(os.fspath(cache_dir), f"tokenized-{key[:32]}.npz")
            cached = cls._load(path)
            if cached is not None:
                return cached
        pairs = load()
        if not pairs:
            raise DataError("no pairs to tokenize: the data set is empty")
        data = cls._tokenize(pairs, tokenizer, int(max_source_length), int(max_target_length), path)
        if path is not None:
            data._save(path)
        return data

    @classmethod
    def _tokenize(cls, pairs: Sequence[Pair], tokenizer: Any, max_source_length: int, max_target_length: int,
                  path: Optional[str], chunk: int = 8192) -> "TokenizedPairs":
        pad = tokenizer.pad_token_id
        if pad is None:
            raise DataError(f"{type(tokenizer).__name__} has no pad token: batches need one")
        eos, start = target_eos_id(tokenizer), decoder_start_id(tokenizer)
        sources: list[list[int]] = []
        targets: list[list[int]] = []
        cut_sources = cut_targets = 0
        for lo in range(0, len(pairs), chunk):
            part = pairs[lo:lo + chunk]
            src = [list(r) for r in tokenizer([s for s, _ in part])["input_ids"]]
            long = [k for k, r in enumerate(src) if len(r) > max_source_length]
            if long:  # only these go through the tokenizer's truncation, which keeps the special tokens
                cut = tokenizer([part[k][0] for k in long], truncation=True, max_length=max_source_length)
                for k, row in zip(long, cut["input_ids"]):
                    src[k] = list(row)[:max_source_length]
                cut_sources += len(long)
            for row in tokenizer([t for _, t in part], add_special_tokens=False)["input_ids"]:
                row = list(row)
                if len(row) > max_target_length - 1:
                    row = row[:max_target_length - 1]
                    cut_targets += 1
                targets.append(row + [eos])
            sources.extend(src)
        (src_ids, src_off), (tgt_ids, tgt_off) = _flatten(sources), _flatten(targets)
        return cls(src_ids, src_off, tgt_ids, tgt_off, int(pad), eos, start, cut_sources, cut_targets, path, False)

    # --- cache --------------------------------------------------------------------------------------------------
    def _save(self, path: str) -> None:
        meta = json.dumps({"version": CACHE_VERSION, "pad_id": self.pad_id, "eos_id": self.eos_id,
                           "start_id": self.start_id, "truncated_sources": self.truncated_sources,
                           "truncated_targets": self.truncated_targets})
        arrays = dict(source_ids=self.source_ids, source_offsets=self.source_offsets, target_ids=self.target_ids,
                      target_offsets=self.target_offsets, meta=np.frombuffer(meta.encode(), np.uint8))
        _atomic_write_bytes(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def _load(cls, path: str) -> Optional["TokenizedPairs"]:
        """The cached data, or ``None`` when the file is absent or unreadable (it is then rebuilt)."""
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("version") != CACHE_VERSION:
                    return None
                arrays = {k: z[k] for k in ("source_ids", "source_offsets", "target_ids", "target_offsets")}
        except Exception:  # a damaged cache file is not an error: it is rebuilt
            return None
        return cls(**arrays, pad_id=meta["pad_id"], eos_id=meta["eos_id"], start_id=meta["start_id"],
                   truncated_sources=meta["truncated_sources"], truncated_targets=meta["truncated_targets"],
                   cache_path=path, from_cache=True)


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------
def default_boundaries(max_length: int, smallest: int = 8) -> list[int]:
    """Powers of two from ``smallest``, the last replaced by ``max_length`` rounded up to a multiple of 8: few
    shapes, at most twice the padding of the longest example in a bucket."""
    top = -(-int(max_length) // 8) * 8
    out, b = [], smallest
    while b < top:
        out.append(b)
        b *= 2
    out.append(top)
    return out


def _boundaries(given: Optional[Sequence[int]], longest: int, name: str) -> list[int]:
    if given is None:
        return default_boundaries(longest)
    values = [int(b) for b in given]
    if not values or any(b < 1 for b in values) or values != sorted(set(values)):
        raise DataError(f"{name} must be increasing positive integers, got {list(given)!r}")
    if values[-1] < longest:  # longer examples go in one more bucket, padded to their own length
        values.append(-(-longest // 8) * 8)
    return values


def _pad_width(boundaries: Sequence[int], length: int) -> int:
    return boundaries[int(np.searchsorted(boundaries, length))]


class BatchIterator:
    """Length-bucketed, shuffled, resumable batches of a ``TokenizedPairs``, as numpy dicts.

    Each batch (``B = batch_size``, widths ``S`` and ``T`` from the bucket boundaries)::

        input_ids              [B, S] int32  source ids, pad_id after the end
        attention_mask         [B, S] int32  1 on tokens, 0 on padding
        labels                 [B, T] int32  target ids ending with EOS, -100 on padding
        decoder_attention_mask [B, T] int32  1 where labels != -100: the mask of the decoder inputs
                                             (labels shifted right behind the start token)
        example_ids            [B]    int32  index of each row in the data, -1 for a filler row

    Batching of one epoch: examples are grouped by source length into buckets (each source length goes to the
    first boundary >= it); each bucket is shuffled and cut into full batches, and the few examples left over join
    the next bucket's pool (padded to its width), so at most ``batch_size - 1`` examples an epoch are left out.
    What remains at the very end is dropped (``drop_remainder=True``) or made into one last batch filled up to
    ``batch_size`` with filler rows (all padding, labels -100, ``example_ids`` -1), so the batch size never
    changes. The order of the batches is then shuffled. ``S`` is the first source boundary >= the longest source
    in the batch, ``T`` likewise with ``target_bucket_boundaries``. Everything random comes from
    ``numpy.random.default_rng([seed, epoch])``: the same seed gives the same batches.

    ``repeat=True`` runs over epochs forever (``epoch`` counts them); ``repeat=False`` stops after one pass
    (evaluation; use ``shuffle=False`` to keep bucket then data order). ``state()`` / ``restore(state)`` resume
    exactly: after ``restore`` the iterator yields the batches an uninterrupted one would have yielded next.
    """

    def __init__(self, data: TokenizedPairs, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 repeat: bool = True, drop_remainder: bool = True, bucket_boundaries: Optional[Sequence[int]] = None,
                 target_bucket_boundaries: Optional[Sequence[int]] = None, pad_id: Optional[int] = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        if len(data) == 0:
            raise DataError("the data set is empty")
        self.data = data
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle, self.repeat, self.drop_remainder = bool(shuffle), bool(repeat), bool(drop_remainder)
        self.pad_id = int(data.pad_id if pad_id is None else pad_id)
        self._src_len = data.source_lengths
        self._tgt_len = data.target_lengths
        self.bucket_boundaries = _boundaries(bucket_boundaries, int(self._src_len.max()), "bucket_boundaries")
        self.target_bucket_boundaries = _boundaries(target_bucket_boundaries, int(self._tgt_len.max()),
                                                    "target_bucket_boundaries")
        if self.drop_remainder and len(data) < self.batch_size:
            raise DataError(f"the data set has {len(data)} examples, fewer than one batch of {self.batch_size}: "
                            "lower batch_size or pass drop_remainder=False")
        self._bucket_of = np.searchsorted(self.bucket_boundaries, self._src_len)
        self.epoch = 0
        self.position = 0  # batches already yielded in this epoch
        self._plan_epoch: Optional[int] = None
        self._plan: list[np.ndarray] = []

    # --- the plan of one epoch ------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> list[np.ndarray]:
        """The example indices of every batch of ``epoch``, in order (filler rows not included)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        batches: list[np.ndarray] = []
        carry = np.zeros(0, np.int64)
        B = self.batch_size
        for bucket in range(len(self.bucket_boundaries)):
            members = np.flatnonzero(self._bucket_of == bucket)
            if self.shuffle:
                members = rng.permutation(members)
            pool = np.concatenate([carry, members])
            full = len(pool) // B * B
            batches.extend(pool[k:k + B] for k in range(0, full, B))
            carry = pool[full:]
        if len(carry) and not self.drop_remainder:
            batches.append(carry)
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return batches

    def _current_plan(self) -> list[np.ndarray]:
        if self._plan_epoch != self.epoch:
            self._plan, self._plan_epoch = self.plan(self.epoch), self.epoch
        return self._plan

    @property
    def batches_per_epoch(self) -> int:
        """Batches one epoch yields (the last partial one only without drop_remainder)."""
        full, rest = divmod(len(self.data), self.batch_size)
        return full + (1 if rest and not self.drop_remainder else 0)

    # --- iteration ------------------------------------------------------------------------------------------------
    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self._current_plan()
        if self.position >= len(plan):
            if not self.repeat:
                raise StopIteration
            self.epoch, self.position = self.epoch + 1, 0
            plan = self._current_plan()
        batch = self.make_batch(plan[self.position])
        self.position += 1
        return batch

    def make_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The padded arrays of the examples ``indices`` (at most ``batch_size``; filler rows make up the rest)."""
        indices = np.asarray(indices, np.int64)
        B, d = self.batch_size, self.data
        S = _pad_width(self.bucket_boundaries, int(self._src_len[indices].max()))
        T = _pad_width(self.target_bucket_boundaries, int(self._tgt_len[indices].max()))
        input_ids = np.full((B, S), self.pad_id, np.int32)
        attention_mask = np.zeros((B, S), np.int32)
        labels = np.full((B, T), IGNORE_INDEX, np.int32)
        example_ids = np.full((B,), -1, np.int32)
        for row, i in enumerate(indices):
            src, tgt = d.source(i), d.target(i)
            input_ids[row, :len(src)] = src
            attention_mask[row, :len(src)] = 1
            labels[row, :len(tgt)] = tgt
            example_ids[row] = i
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "decoder_attention_mask": (labels != IGNORE_INDEX).astype(np.int32), "example_ids": example_ids}

    # --- resuming -------------------------------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {"batch_size": self.batch_size, "num_examples": len(self.data), "shuffle": self.shuffle,
                "drop_remainder": self.drop_remainder, "bucket_boundaries": list(self.bucket_boundaries),
                "target_bucket_boundaries": list(self.target_bucket_boundaries)}

    def state(self) -> dict:
        """Where the iterator stands, as a JSON-serialisable dict: seed, epoch, batches yielded in this epoch,
        and the settings that shape the batches (checked by ``restore``)."""
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "position": self.position,
                **self._settings()}

    def restore(self, state: Mapping[str, Any]) -> "BatchIterator":
        """Continues from ``state`` (from ``state()``, possibly through JSON): the next batch is the one an
        uninterrupted iterator would have yielded next. The data and settings must be the ones the state was
        taken with; a mismatch raises ``DataError``. Returns ``self``."""
        try:
            version, seed = state["version"], int(state["seed"])
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not an iterator state: {e!r} in {dict(state)!r}") from None
        if version != STATE_VERSION:
            raise DataError(f"iterator state version {version!r} is not supported (expected {STATE_VERSION})")
        for key, value in self._settings().items():
            if key in state and state[key] != value:
                raise DataError(f"iterator state was taken with {key}={state[key]!r}, this iterator has {value!r}")
        if seed < 0 or epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise DataError(f"iterator state out of range: seed {seed}, epoch {epoch}, position {position} "
                            f"(an epoch has {self.batches_per_epoch} batches)")
        self.seed, self.epoch, self.position = seed, epoch, position
        self._plan_epoch = None
        return self


__all__ = ["BatchIterator", "DataError", "IGNORE_INDEX", "TokenizedPairs", "decoder_start_id", "default_boundaries",
           "expand_paths", "read_pairs", "synthetic_pairs", "target_eos_id", "tokenizer_fingerprint",
           "word_tokenizer", "write_jsonl"]
