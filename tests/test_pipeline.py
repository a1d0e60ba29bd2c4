"""Text in, text out: Text2TextGenerator and `bertgen generate` keep order and line count and equal transformers."""
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece
import torch
import transformers

import bertgen_flax as bg
from bertgen_flax import cli
from bertgen_flax.pipeline import InputTooLongError, Text2TextGenerator

from conftest import REPO, TINY, seq2seq_checkpoint

WORDS = ("the model reads a source and writes a summary of news about sport weather markets cities rivers "
         "people music films science history travel food").split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random bert2bert (vocab 99) with a SentencePiece tokenizer of the same size, saved together."""
    root = tmp_path_factory.mktemp("t2t")
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    extra = ["".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(300)]  # enough distinct pieces
    corpus = [" ".join(rng.choice(WORDS + extra, 12)) for _ in range(600)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(root / "spiece"), vocab_size=TINY["vocab_size"],
        model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    path = root / "model"
    ref = seq2seq_checkpoint(path, seed=3, scale=0.1)  # varied outputs
    bg.BertGenerationTokenizer(str(root / "spiece.model")).save_pretrained(str(path))
    return str(path), ref


TEXTS = ["the model reads news", "", "music and films about history and travel in cities", "sport",
         "weather markets rivers people"]


def _transformers_outputs(path, ref, texts, **kw):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    out = []
    for text in texts:
        if not text:
            out.append("")
            continue
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            seq = ref.generate(input_ids=ids, **kw)
        out.append(tok.decode(seq[0], skip_special_tokens=True))
    return out


def test_text_in_text_out_equals_transformers_row_by_row(model_dir):
    path, ref = model_dir
    gen = Text2TextGenerator.from_pretrained(path, batch_size=2)
    assert gen(TEXTS, max_new_tokens=8) == _transformers_outputs(path, ref, TEXTS, max_new_tokens=8)


def test_batching_by_length_keeps_the_input_order(model_dir):
    path, _ = model_dir
    gen = Text2TextGenerator.from_pretrained(path)
    one_by_one = [gen([t], max_new_tokens=6)[0] for t in TEXTS]
    assert gen(TEXTS, batch_size=2, max_new_tokens=6) == one_by_one
    assert gen(TEXTS, batch_size=64, max_new_tokens=6, num_beams=2) == gen(TEXTS, batch_size=1, max_new_tokens=6,
                                                                             num_beams=2)


def test_empty_input_gives_empty_output(model_dir):
    path, _ = model_dir
    assert Text2TextGenerator.from_pretrained(path)(["", "   "], max_new_tokens=4) == ["", ""]


def test_over_long_input_is_truncated_with_a_warning_or_rejected(model_dir):
    path, _ = model_dir
    gen = Text2TextGenerator.from_pretrained(path)
    long = " ".join(["history"] * 200)
    with pytest.warns(UserWarning, match="truncated to 64"):
        out = gen([long, "sport"], max_new_tokens=4)
    assert len(out) == 2
    with pytest.raises(InputTooLongError, match="input 2 has"):
        gen(["sport", long], truncate=False)


def test_several_return_sequences_give_a_list_per_input(model_dir):
    path, _ = model_dir
    out = Text2TextGenerator.from_pretrained(path)(["sport", ""], num_beams=3, num_return_sequences=2,
                                                    max_new_tokens=5)
    assert len(out) == 2 and len(out[0]) == 2 and out[1] == ["", ""]


def test_cli_keeps_order_and_line_count_on_a_file_with_empty_and_over_long_lines(model_dir, tmp_path, capsys):
    path, _ = model_dir
    lines = ["the model reads news", "", " ".join(["history"] * 200), "sport", ""]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = cli.main(["generate", "--model", path, "--input", str(tmp_path / "in.txt"), "--output",
                     str(tmp_path / "out.txt"), "--max-new-tokens", "5", "--batch-size", "2"])
    assert code == 0
    written = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(written) == len(lines) and written[1] == "" and written[4] == ""
    with pytest.warns(UserWarning):
        expected = Text2TextGenerator.from_pretrained(path)(lines, max_new_tokens=5)
    assert written == expected
    assert "5/5" in capsys.readouterr().err  # the progress bar


def test_cli_rejects_an_over_long_line_with_no_truncate(model_dir, tmp_path, capsys):
    path, _ = model_dir
    (tmp_path / "in.txt").write_text("sport\n" + " ".join(["history"] * 200) + "\n")
    code = cli.main(["generate", "--model", path, "--input", str(tmp_path / "in.txt"), "--no-truncate",
                     "--output", str(tmp_path / "out.txt")])
    assert code == 2 and "input 2 has" in capsys.readouterr().err
    assert not (tmp_path / "out.txt").exists()


def test_cli_rejects_undecodable_input(model_dir, tmp_path, capsys):
    path, _ = model_dir
    (tmp_path / "in.txt").write_bytes(b"sport\n\xff\xfe broken\n")
    assert cli.main(["generate", "--model", path, "--input", str(tmp_path / "in.txt")]) == 2
    assert "line 2 is not valid UTF-8" in capsys.readouterr().err


def test_cli_reads_stdin_and_arguments(model_dir):
    path, _ = model_dir
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    piped = subprocess.run([sys.executable, "-m", "bertgen_flax", "generate", "--model", path, "--max-new-tokens",
                            "4"], input="sport\n\nthe model reads news\n", capture_output=True, text=True, env=env,
                           timeout=300)
    assert piped.returncode == 0, piped.stderr[-2000:]
    lines = piped.stdout.split("\n")[:-1]
    assert len(lines) == 3 and lines[1] == ""
    direct = Text2TextGenerator.from_pretrained(path)(["sport", "", "the model reads news"], max_new_tokens=4)
    assert lines == direct
    args = subprocess.run([sys.executable, "-m", "bertgen_flax", "generate", "--model", path, "--max-new-tokens",
                           "4", "sport", "the model reads news"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert args.returncode == 0 and args.stdout.split("\n")[:-1] == [direct[0], direct[2]]


def test_cli_reports_a_missing_model_directory(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nope"), "sport"]) == 2
    assert "model directory not found" in capsys.readouterr().err
