"""Evaluation metrics (exact match, BLEU, ROUGE), the predictions file, and run observability (metrics log,
TensorBoard events, curve plots, progress bar). Expected numbers are worked out by hand or taken from the
reference packages called directly."""
from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np
import pytest

from bertgen_flax.training import metrics as M
from bertgen_flax.training import observe as O

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ exact match

def test_normalisation_strips_collapses_whitespace_and_joins_punctuation():
    assert M.normalize_text("  a , b .  ") == "a, b."
    assert M.normalize_text("x\t\n  y") == "x y"
    assert M.normalize_text("a . b , c ; d : e ! f ?") == "a. b, c; d: e! f?"


def test_exact_match_is_the_percentage_of_normalised_equal_pairs():
    predictions = ["a , b .", "Hello   world", "x", "is it ?"]
    references = ["a, b.", " Hello world ", "y", "is it?"]
    assert M.exact_match(predictions, references) == 75.0  # 3 of 4, counted by hand


def test_exact_match_keeps_case():
    assert M.exact_match(["Hello"], ["hello"]) == 0.0


@pytest.mark.parametrize("fn", [M.exact_match, M.bleu, M.rouge, M.generation_metrics])
def test_length_mismatch_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        fn(["a", "b"], ["a"])


@pytest.mark.parametrize("fn", [M.exact_match, M.bleu, M.rouge, M.generation_metrics])
def test_empty_input_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


# ------------------------------------------------------------------------------------------------------- BLEU

def test_bleu_of_identical_corpora_is_100():
    texts = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine ."]
    assert M.bleu(texts, texts) == pytest.approx(100.0)


def test_bleu_of_disjoint_corpora_is_0():
    assert M.bleu(["alpha beta gamma delta"], ["one two three four"]) == 0.0


def test_bleu_equals_sacrebleu_corpus_bleu():
    import sacrebleu
    predictions = ["the cat sat on the mat .", "there is a dog in the garden", "he said: hello, world!"]
    references = ["the cat is on the mat .", "a dog is in the garden", "he said : hello , world !"]
    assert M.bleu(predictions, references) == sacrebleu.corpus_bleu(predictions, [references]).score


def test_missing_sacrebleu_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` raise ImportError
    with pytest.raises(ImportError, match="pip install 'sacrebleu"):
        M.bleu(["a"], ["a"])


# ------------------------------------------------------------------------------------------------------ ROUGE

def test_rouge_unigram_and_bigram_f_measures_by_hand():
    scores = M.rouge(["the cat sat"], ["the cat ran"])
    assert set(scores) == {"rouge1", "rouge2", "rougeLsum"}
    assert scores["rouge1"] == pytest.approx(100 * 2 / 3)  # 2 of 3 unigrams shared: P = R = 2/3
    assert scores["rouge2"] == pytest.approx(50.0)         # "the cat" of {"the cat", "cat sat|ran"}: 1/2


def test_rouge_is_the_mean_over_examples():
    scores = M.rouge(["the cat sat", "x y"], ["the cat ran", "x y"])
    assert scores["rouge1"] == pytest.approx((100 * 2 / 3 + 100) / 2)


def test_rouge_lsum_splits_sentences():
    from rouge_score import rouge_scorer
    prediction = "The dog ran in the park. The cat sat on the mat."
    reference = "The cat sat on the mat. The dog ran in the park."
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    split = scorer.score("The cat sat on the mat.\nThe dog ran in the park.",
                         "The dog ran in the park.\nThe cat sat on the mat.")["rougeLsum"].fmeasure
    plain = scorer.score(reference, prediction)["rougeL"].fmeasure
    assert split != pytest.approx(plain)  # the example only works if sentence splitting matters
    assert M.rouge([prediction], [reference])["rougeLsum"] == pytest.approx(100 * split)


def test_rouge_needs_no_downloaded_nltk_data(monkeypatch):
    import nltk

    def no_download(*args, **kwargs):
        raise AssertionError("rouge tried to download NLTK data")

    monkeypatch.setattr(nltk, "download", no_download)
    monkeypatch.setenv("NLTK_DATA", "/nonexistent")
    assert M.rouge(["The cats were running."], ["The cat runs."])["rouge1"] > 0


def test_generation_metrics_reports_every_score():
    scores = M.generation_metrics(["a , b ."], ["a, b."])
    assert set(scores) == {"exact_match", "bleu", "rouge1", "rouge2", "rougeLsum"}
    assert all(isinstance(v, float) for v in scores.values())
    assert scores["exact_match"] == 100.0 and scores["rouge1"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------- predictions file

def test_predictions_file_round_trips(tmp_path):
    path = tmp_path / "out" / "predictions.jsonl"
    returned = M.write_predictions(path, ["s1", "s2 é"], ["a , b .", "no"], ["a, b.", "yes"])
    assert returned == str(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"source": "s1", "prediction": "a , b .", "reference": "a, b.", "exact": True},
                    {"source": "s2 é", "prediction": "no", "reference": "yes", "exact": False}]
    assert os.listdir(path.parent) == ["predictions.jsonl"]


def test_failed_predictions_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "predictions.jsonl"
    path.write_text("old\n")
    calls = []

    def failing_dumps(obj, **kwargs):
        calls.append(obj)
        if len(calls) == 2:
            raise RuntimeError("disk trouble")
        return json.JSONEncoder(**kwargs).encode(obj)

    monkeypatch.setattr(M.json, "dumps", failing_dumps)
    with pytest.raises(RuntimeError):
        M.write_predictions(path, ["s1", "s2"], ["p1", "p2"], ["r1", "r2"])
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["predictions.jsonl"]


def test_predictions_need_one_source_per_prediction(tmp_path):
    with pytest.raises(ValueError, match="1 sources but 2 predictions"):
        M.write_predictions(tmp_path / "p.jsonl", ["s"], ["a", "b"], ["a", "b"])


# ------------------------------------------------------------------------------------------------ metrics log

def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _read_events(directory):
    """(tag, step, value) of every scalar, and the steps of SessionLog START events, in the TFRecord files."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    scalars, starts = [], []
    for name in sorted(os.listdir(directory)):
        assert name.startswith("events.out.tfevents"), name
        data = open(os.path.join(directory, name), "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            offset += 8 + 4                                   # length, then its crc
            event = Event.FromString(data[offset:offset + length])
            offset += length + 4                              # payload, then its crc
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                starts.append(event.step)
        assert offset == len(data)
    return scalars, starts


def test_metrics_log_writes_one_float_record_per_call(tmp_path):
    with O.MetricsLog(tmp_path, tensorboard=False) as log:
        log.log(10, "train", {"loss": 2, "learning_rate": np.float32(0.5)})
        log.log(10, "eval", {"loss": 1.5, "bleu": 12.25})
    records = _lines(tmp_path / "metrics.jsonl")
    assert records == [{"step": 10, "split": "train", "loss": 2.0, "learning_rate": 0.5},
                       {"step": 10, "split": "eval", "loss": 1.5, "bleu": 12.25}]
    assert isinstance(records[0]["loss"], float)
    assert O.read_metrics(tmp_path / "metrics.jsonl") == records
    assert not (tmp_path / "tensorboard").exists()


def test_metrics_log_line_is_on_disk_before_close(tmp_path):
    log = O.MetricsLog(tmp_path, tensorboard=False)
    log.log(1, "train", {"loss": 3.0})
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "split": "train", "loss": 3.0}]
    log.close()


def test_metrics_log_appends_to_an_existing_file(tmp_path):
    with O.MetricsLog(tmp_path, tensorboard=False) as log:
        log.log(1, "train", {"loss": 3.0})
    with O.MetricsLog(tmp_path, tensorboard=False) as log:
        log.log(2, "train", {"loss": 2.0})
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_resume_step_drops_later_records(tmp_path):
    with O.MetricsLog(tmp_path, tensorboard=False) as log:
        for step in (10, 20, 30):
            log.log(step, "train", {"loss": 1.0 / step})
        log.log(20, "eval", {"loss": 0.5})
        log.log(30, "eval", {"loss": 0.4})
    with O.MetricsLog(tmp_path, tensorboard=False, resume_step=20) as log:
        assert [(r["step"], r["split"]) for r in _lines(log.path)] == [(10, "train"), (20, "train"), (20, "eval")]
        log.log(30, "train", {"loss": 0.1})
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [10, 20, 20, 30]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_torn_last_line_is_skipped_and_repaired(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 3.0}\n{"step": 2, "spl')
    assert O.read_metrics(path) == [{"step": 1, "split": "train", "loss": 3.0}]
    with O.MetricsLog(tmp_path, tensorboard=False) as log:
        log.log(2, "train", {"loss": 2.0})
    assert [r["step"] for r in _lines(path)] == [1, 2]


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=":2:"):
        O.read_metrics(path)


def test_metrics_log_rejects_bad_records(tmp_path):
    with O.MetricsLog(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, "train", {"step": 1.0})
        with pytest.raises(TypeError, match="'loss' is not a scalar"):
            log.log(1, "train", {"loss": np.ones(2)})
        with pytest.raises(ValueError, match="split"):
            log.log(1, "", {"loss": 1.0})
    with pytest.raises(ValueError, match="closed"):
        log.log(2, "train", {"loss": 1.0})


def test_metrics_log_writes_tensorboard_scalars(tmp_path):
    with O.MetricsLog(tmp_path) as log:
        log.log(5, "train", {"loss": 2.5, "learning_rate": 0.001})
        log.log(5, "eval", {"bleu": 30.0})
    scalars, _ = _read_events(tmp_path / "tensorboard")
    assert sorted(scalars) == sorted([("train/loss", 5, 2.5), ("train/learning_rate", 5, pytest.approx(0.001)),
                                      ("eval/bleu", 5, 30.0)])


def test_resumed_tensorboard_purges_later_steps(tmp_path):
    with O.MetricsLog(tmp_path) as log:
        log.log(1, "train", {"loss": 2.0})
    with O.MetricsLog(tmp_path, resume_step=7) as log:
        log.log(8, "train", {"loss": 1.0})
    scalars, starts = _read_events(tmp_path / "tensorboard")
    assert starts == [8]  # TensorBoard hides events at or after step 8 written before this START
    assert sorted(scalars) == [("train/loss", 1, 2.0), ("train/loss", 8, 1.0)]


# ---------------------------------------------------------------------------------------------------- plots

def _write_run(directory, losses, with_eval=True):
    with O.MetricsLog(directory, tensorboard=False) as log:
        for step, loss in enumerate(losses, start=1):
            log.log(step, "train", {"loss": loss, "learning_rate": 1e-3 * step})
            if with_eval and step % 2 == 0:
                log.log(step, "eval", {"loss": loss + 0.1, "exact_match": 10.0 * step, "bleu": 5.0 * step,
                                       "rouge1": 6.0 * step, "rouge2": 3.0 * step, "rougeLsum": 5.5 * step})
    return os.path.join(directory, "metrics.jsonl")


def _assert_png(path):
    from matplotlib.image import imread
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert float(image.std()) > 0  # something was drawn


def test_plot_curves_writes_a_png(tmp_path):
    jsonl = _write_run(tmp_path / "run", [4.0, 3.0, 2.5, 2.0, 1.8, 1.7])
    out = tmp_path / "plots" / "curves.png"
    assert O.plot_curves(jsonl, out, title="tiny run") == str(out)
    _assert_png(out)
    assert os.listdir(out.parent) == ["curves.png"]


def test_plot_curves_without_data_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "grad_norm": 1.0}\n')
    with pytest.raises(ValueError, match="nothing|no loss"):
        O.plot_curves(path, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_comparison_writes_a_png(tmp_path):
    warm = _write_run(tmp_path / "warm", [2.0, 1.5, 1.2, 1.0], with_eval=False)
    cold = _write_run(tmp_path / "cold", [6.0, 5.5, 5.0, 4.6], with_eval=False)
    out = tmp_path / "compare.png"
    O.plot_comparison({"warm start": warm, "random init": cold}, out)
    _assert_png(out)


def test_plot_comparison_names_a_run_missing_the_metric(tmp_path):
    run = _write_run(tmp_path / "run", [2.0, 1.0], with_eval=False)
    with pytest.raises(ValueError, match="'random init'"):
        O.plot_comparison({"random init": run}, tmp_path / "c.png", metric="bleu", split="eval")


# ------------------------------------------------------------------------------------------------ progress bar

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_disabled_progress_bar_prints_nothing(capsys):
    bar = O.ProgressBar(100, disable=True)
    bar.update(10, loss=1.0, lr=1e-4, tokens=500)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bar_shows_step_loss_lr_and_throughput_on_stderr(capsys):
    clock = FakeClock()
    bar = O.ProgressBar(100, clock=clock)
    clock.now += 2.0
    bar.update(10, loss=1.2345, lr=1e-4, tokens=5000)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "10/100" in captured.err
    assert "loss=1.2345" in captured.err and "lr=0.0001" in captured.err
    assert "step/s=5" in captured.err          # 10 steps in 2 s
    assert "tok/s=2.50k" in captured.err       # 5000 tokens in 2 s


def test_progress_bar_starts_at_initial_and_writes_messages(capsys):
    bar = O.ProgressBar(100, initial=40, clock=FakeClock())
    bar.write("eval bleu=12.0")
    bar.update(41)
    bar.close()
    err = capsys.readouterr().err
    assert "eval bleu=12.0\n" in err and "41/100" in err


def test_progress_bar_rejects_a_step_going_back():
    bar = O.ProgressBar(100, initial=5, disable=True)
    with pytest.raises(ValueError, match="backwards"):
        bar.update(4)
    bar.close()
