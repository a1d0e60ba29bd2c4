"""generate() gives token-for-token what transformers.generate gives (float32), in one compiled program."""
import numpy as np
import pytest
import torch
import transformers

import bertgen_flax as bg
from bertgen_flax import generation

from conftest import TINY, perturb_

EOS = 1


def _eos_biased(model, head, rows_ids, rows_mask, **gen):
    """Raises the EOS bias until greedy output ends some (not all) rows early, so stopping rules are exercised."""
    for boost in np.arange(0.0, 20.0, 0.5):
        with torch.no_grad():
            head.bias[EOS] += 0.5 if boost else 0.0
            out = model.generate(input_ids=torch.tensor(rows_ids), attention_mask=torch.tensor(rows_mask),
                                 max_new_tokens=12, **gen).numpy()
        finished = (out[:, 1:] == EOS).any(axis=1)
        if finished.any() and not finished.all():
            return
    raise AssertionError("could not make EOS likely")


def _source():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY["vocab_size"], (4, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    torch.manual_seed(0)
    enc = transformers.BertGenerationEncoder(transformers.BertGenerationConfig(**TINY))
    dec = transformers.BertGenerationDecoder(transformers.BertGenerationConfig(
        **TINY, is_decoder=True, add_cross_attention=True, tie_word_embeddings=False))
    ref = transformers.EncoderDecoderModel(encoder=enc, decoder=dec)
    ref.config.decoder_start_token_id, ref.config.pad_token_id = 2, 0
    perturb_(ref, 0, scale=0.3)
    ref.eval()
    ids, mask = _source()
    _eos_biased(ref, ref.decoder.lm_head.decoder, ids, mask)
    path = tmp_path_factory.mktemp("gen") / "ed"
    ref.save_pretrained(path)
    return ref, bg.EncoderDecoderModel.from_pretrained(str(path))


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    torch.manual_seed(1)
    ref = transformers.BertGenerationDecoder(transformers.BertGenerationConfig(**TINY, is_decoder=True))
    perturb_(ref, 1, scale=0.3)
    ref.eval()
    path = tmp_path_factory.mktemp("gen") / "dec"
    ref.save_pretrained(path)
    return ref, bg.BertGenerationDecoder.from_pretrained(str(path))


def _reference(ref, ids, mask, **kw):
    with torch.no_grad():
        return ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).numpy()


def _assert_same(want, got):
    got = np.asarray(got)
    assert want.shape == got.shape, (want.shape, got.shape)
    assert (want == got).all(), f"\ntransformers:\n{want}\nours:\n{got}"


SEQ2SEQ_CASES = {
    "greedy_default_length": dict(),
    "greedy_min_new_tokens": dict(max_new_tokens=12, min_new_tokens=6),
    "greedy_no_repeat_ngram": dict(max_new_tokens=12, no_repeat_ngram_size=2),
    "greedy_repetition_penalty": dict(max_new_tokens=12, repetition_penalty=1.5),
    "greedy_bad_words_forced_eos": dict(max_new_tokens=12, bad_words_ids=[[5], [7, 8]], forced_eos_token_id=EOS),
    "beam3": dict(num_beams=3, max_new_tokens=12),
    "beam4_return3_lp06": dict(num_beams=4, num_return_sequences=3, max_new_tokens=12, length_penalty=0.6),
    "beam3_early_stopping_true": dict(num_beams=3, early_stopping=True, max_new_tokens=12),
    "beam3_never_lp2": dict(num_beams=3, early_stopping="never", max_new_tokens=12, length_penalty=2.0),
    "beam5_negative_lp": dict(num_beams=5, max_new_tokens=12, length_penalty=-0.5),
    "beam2_ngram_repetition": dict(num_beams=2, max_new_tokens=12, no_repeat_ngram_size=2, repetition_penalty=1.3),
    "beam3_min_new_tokens": dict(num_beams=3, max_new_tokens=12, min_new_tokens=5),
}


@pytest.mark.parametrize("case", SEQ2SEQ_CASES)
def test_seq2seq_generation_equals_transformers(seq2seq, case):
    ref, ours = seq2seq
    ids, mask = _source()
    kw = SEQ2SEQ_CASES[case]
    _assert_same(_reference(ref, ids, mask, **kw), ours.generate(ids, mask, **kw))


def test_the_fixture_model_stops_some_rows_early(seq2seq):
    ref, _ = seq2seq
    ids, mask = _source()
    out = _reference(ref, ids, mask, max_new_tokens=12)
    finished = (out[:, 1:] == EOS).any(axis=1)
    assert finished.any() and not finished.all()


def test_beam_scores_equal_transformers(seq2seq):
    ref, ours = seq2seq
    ids, mask = _source()
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), num_beams=3,
                            num_return_sequences=2, max_new_tokens=10, output_scores=True,
                            return_dict_in_generate=True)
    seqs, scores = ours.generate(ids, mask, num_beams=3, num_return_sequences=2, max_new_tokens=10,
                                 return_scores=True)
    _assert_same(want.sequences.numpy(), seqs)
    assert np.abs(np.asarray(scores) - want.sequences_scores.numpy()).max() <= 1e-5


DECODER_CASES = {
    "greedy": dict(max_new_tokens=10),
    "beam3": dict(max_new_tokens=10, num_beams=3),
    "repetition_penalty": dict(max_new_tokens=10, repetition_penalty=1.4),
    "beam3_return2_ngram": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, no_repeat_ngram_size=2),
}


@pytest.mark.parametrize("case", DECODER_CASES)
def test_decoder_only_generation_with_ragged_prompts_equals_transformers(decoder, case):
    ref, ours = decoder
    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY["vocab_size"], (3, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids[mask == 0] = 0
    kw = DECODER_CASES[case]
    _assert_same(_reference(ref, ids, mask, **kw), ours.generate(ids, mask, **kw))


def test_a_row_alone_equals_the_row_inside_a_padded_batch(seq2seq):
    _, ours = seq2seq
    ids, mask = _source()
    batch = np.asarray(ours.generate(ids, mask, num_beams=3, max_new_tokens=12))
    alone = np.asarray(ours.generate(ids[3:4, :2], mask[3:4, :2], num_beams=3, max_new_tokens=12))
    width = alone.shape[1]
    assert (batch[3, :width] == alone[0]).all()
    assert (batch[3, width:] == EOS).all() or batch.shape[1] == width  # beam rows are filled after EOS


def test_new_inputs_inside_a_bucket_do_not_recompile(seq2seq):
    _, ours = seq2seq
    rng = np.random.default_rng(5)
    ours.generate(rng.integers(3, 99, (3, 10)), max_new_tokens=7)
    before = generation.TRACE_COUNTS["seq2seq"]
    for batch, length in ((3, 11), (4, 16), (4, 12)):  # batch bucket 4, source bucket 16
        ours.generate(rng.integers(3, 99, (batch, length)), max_new_tokens=7)
    assert generation.TRACE_COUNTS["seq2seq"] == before


def test_sampling_with_top_k_1_equals_greedy(seq2seq):
    _, ours = seq2seq
    ids, mask = _source()
    greedy = np.asarray(ours.generate(ids, mask, max_new_tokens=12))
    sampled = np.asarray(ours.generate(ids, mask, max_new_tokens=12, do_sample=True, top_k=1, seed=3))
    assert (greedy == sampled).all()


def test_sampling_with_a_fixed_seed_reproduces_and_another_seed_differs(seq2seq):
    _, ours = seq2seq
    ids, mask = _source()
    kw = dict(max_new_tokens=12, do_sample=True, top_k=0, num_return_sequences=3)
    a = np.asarray(ours.generate(ids, mask, seed=11, **kw))
    b = np.asarray(ours.generate(ids, mask, seed=11, **kw))
    c = np.asarray(ours.generate(ids, mask, seed=12, **kw))
    assert a.shape[0] == 12 and (a == b).all() and not (a.shape == c.shape and (a == c).all())


@pytest.mark.parametrize("filters", [dict(top_k=5), dict(top_p=0.7, top_k=0), dict(temperature=0.7, top_k=10)])
def test_sampled_first_tokens_follow_the_filtered_softmax(seq2seq, filters):
    """Chi-square test: 4096 first tokens sampled by us vs transformers' own warpers on transformers' logits."""
    from scipy import stats
    from transformers.generation import logits_process as lp
    ref, ours = seq2seq
    ids, mask = _source()
    src, src_mask = np.repeat(ids[:1], 4096, axis=0), np.repeat(mask[:1], 4096, axis=0)
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(ids[:1]), attention_mask=torch.tensor(mask[:1]),
                     decoder_input_ids=torch.tensor([[2]])).logits[:, -1].float()
    warpers = lp.LogitsProcessorList()
    if filters.get("temperature", 1.0) != 1.0:
        warpers.append(lp.TemperatureLogitsWarper(filters["temperature"]))
    if filters.get("top_k", 50):
        warpers.append(lp.TopKLogitsWarper(filters.get("top_k", 50)))
    if filters.get("top_p", 1.0) < 1.0:
        warpers.append(lp.TopPLogitsWarper(filters["top_p"]))
    probs = torch.softmax(warpers(torch.tensor([[2]]), logits), dim=-1)[0].numpy().astype(np.float64)
    first = np.asarray(ours.generate(src, src_mask, max_new_tokens=1, do_sample=True, seed=0, **filters))[:, 1]
    support = probs > 0
    assert support[first].all(), "sampled a token the filters remove"
    counts = np.bincount(first, minlength=probs.size)[support]
    expected = probs[support] / probs[support].sum() * len(first)
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_cross_attention_with_shared_kv_equals_per_beam_copies(seq2seq):
    _, ours = seq2seq
    ids, mask = _source()
    enc = np.asarray(ours.encode(ids, mask).last_hidden_state)
    tokens = np.random.default_rng(0).integers(3, 99, (8, 1))  # two copies (beams) of each of the 4 sources
    shared = ours.decode(tokens, enc, mask, past_key_values=ours.init_cache(8, 4, 9, encoder_batch_size=4))
    copied = ours.decode(tokens, np.repeat(enc, 2, axis=0), np.repeat(mask, 2, axis=0),
                         past_key_values=ours.init_cache(8, 4, 9))
    cross = bg.convert.flatten(shared.past_key_values)[("decoder", "bert", "encoder", "layer", "crossattention",
                                                         "cross_key")]
    assert cross.shape[1] == 4  # one copy of the cross K/V per source, not per beam
    assert np.abs(np.asarray(shared.logits) - np.asarray(copied.logits)).max() <= 1e-5
