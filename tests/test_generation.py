"""generate() gives token-for-token what transformers.generate gives (float32), in one compiled program."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import bertgen_flax as bg
from bertgen_flax import generation

from conftest import TINY, perturb_, seq2seq_checkpoint

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
    ref = seq2seq_checkpoint(None, 0, scale=0.1, dec=dict(tie_word_embeddings=False))  # varied outputs
    ids, mask = _source()
    _eos_biased(ref, ref.decoder.lm_head.decoder, ids, mask)
    path = tmp_path_factory.mktemp("gen") / "ed"
    ref.save_pretrained(path)
    return ref, bg.EncoderDecoderModel.from_pretrained(str(path))


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    torch.manual_seed(1)
    ref = transformers.BertGenerationDecoder(transformers.BertGenerationConfig(**TINY, is_decoder=True))
    perturb_(ref, 1, scale=0.1)
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
    "greedy_two_eos_ids": dict(max_new_tokens=12, eos_token_id=[EOS, 7]),
    "beam3_two_eos_ids": dict(num_beams=3, max_new_tokens=12, eos_token_id=[EOS, 7]),
}


@pytest.mark.parametrize("case", SEQ2SEQ_CASES)
def test_seq2seq_generation_equals_transformers(seq2seq, case):
    ref, ours = seq2seq
    ids, mask = _source()
    kw = SEQ2SEQ_CASES[case]
    _assert_same(_reference(ref, ids, mask, **kw), ours.generate(ids, mask, **kw))


@pytest.mark.parametrize("case", ["greedy_min_new_tokens", "beam4_return3_lp06"])
def test_the_decoder_run_as_stored_not_unrolled_generates_what_transformers_does(seq2seq, decoder, case):
    ref, ours = seq2seq
    ids, mask = _source()
    kw = SEQ2SEQ_CASES[case]
    _assert_same(_reference(ref, ids, mask, **kw), ours.generate(ids, mask, unroll_decoder=False, **kw))
    ref_dec, ours_dec = decoder
    prompt = np.random.default_rng(0).integers(3, TINY["vocab_size"], (2, 5))
    _assert_same(_reference(ref_dec, prompt, np.ones_like(prompt), max_new_tokens=8),
                 ours_dec.generate(prompt, np.ones_like(prompt), max_new_tokens=8, unroll_decoder=False))


@pytest.fixture(scope="module")
def seq2seq_unrolled(seq2seq, tmp_path_factory):
    """The fixture model loaded with its layers unrolled (the inference layout Text2TextGenerator uses)."""
    path = tmp_path_factory.mktemp("gen") / "ed_unrolled"
    seq2seq[0].save_pretrained(path)
    return bg.EncoderDecoderModel.from_pretrained(str(path), scan_layers=False)


@pytest.mark.parametrize("case", ["greedy_min_new_tokens", "beam4_return3_lp06", "greedy_repetition_penalty"])
def test_a_model_with_unrolled_layers_generates_what_transformers_does(seq2seq, seq2seq_unrolled, case):
    ids, mask = _source()
    kw = SEQ2SEQ_CASES[case]
    _assert_same(_reference(seq2seq[0], ids, mask, **kw), seq2seq_unrolled.generate(ids, mask, **kw))


DECODER_PROMPT = np.array([[2, 11, 12], [2, 13, 14], [2, 15, 16], [2, 17, 18]])


@pytest.mark.parametrize("layers", ["scanned", "unrolled"])
@pytest.mark.parametrize("case", ["greedy_min_new_tokens", "beam3", "greedy_no_repeat_ngram"])
def test_generation_continues_a_multi_token_decoder_prompt_as_transformers_does(seq2seq, seq2seq_unrolled, case,
                                                                                layers):
    ref, ours = seq2seq
    ours = ours if layers == "scanned" else seq2seq_unrolled
    ids, mask = _source()
    kw = SEQ2SEQ_CASES[case]
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            decoder_input_ids=torch.tensor(DECODER_PROMPT), **kw).numpy()
    _assert_same(want, ours.generate(ids, mask, decoder_input_ids=DECODER_PROMPT, **kw))


def test_the_fixture_model_stops_some_rows_early(seq2seq):
    ref, _ = seq2seq
    ids, mask = _source()
    out = _reference(ref, ids, mask, max_new_tokens=12)
    finished = (out[:, 1:] == EOS).any(axis=1)
    assert finished.any() and not finished.all()
    assert max(len(set(row[1:])) for row in out) > 4  # varied tokens, not one repeated id


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


def test_new_inputs_inside_a_bucket_do_not_recompile_with_the_padded_encoder(seq2seq):
    _, ours = seq2seq
    rng = np.random.default_rng(5)
    ours.generate(rng.integers(3, 99, (3, 10)), max_new_tokens=7, packing_buckets=0)
    before = generation.TRACE_COUNTS["seq2seq"]
    for batch, length in ((3, 11), (4, 16), (4, 12)):  # batch bucket 4, source bucket 16
        ours.generate(rng.integers(3, 99, (batch, length)), max_new_tokens=7, packing_buckets=0)
    assert generation.TRACE_COUNTS["seq2seq"] == before


@pytest.mark.parametrize("gen", [dict(), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_a_one_token_decoder_start_traces_the_decoder_step_once(seq2seq, monkeypatch, gen):
    """The start token is the search loop's first step, not a pass of its own before the loop: the unrolled
    decoder is traced and compiled once (at L-24 a second copy made the compile ~1.6x as long)."""
    _, ours = seq2seq
    real, seen = generation.decoding.generate, []

    def counting(spec, prefill, step, *args, **kwargs):
        def counted(*a):
            seen.append("step")
            return step(*a)
        seen.extend(["prefill"] if prefill is not None else [])
        return real(spec, prefill, counted, *args, **kwargs)

    monkeypatch.setattr(generation.decoding, "generate", counting)
    generation._seq2seq_program.cache_clear()  # trace anew
    got = ours.generate(_source()[0], attention_mask=_source()[1], max_new_tokens=7, **gen)
    assert seen == ["step"]
    monkeypatch.setattr(generation.decoding, "generate", real)
    generation._seq2seq_program.cache_clear()
    assert np.array_equal(np.asarray(got), np.asarray(ours.generate(_source()[0], attention_mask=_source()[1],
                                                                    max_new_tokens=7, **gen)))


def test_a_search_without_a_prefill_pass_takes_one_prompt_token_only():
    from bertgen_flax import decoding
    spec = decoding.SearchSpec.build(decoding.GenerationConfig(max_length=4, pad_token_id=0), prompt_length=2)
    step = lambda cache, tokens: (np.zeros((2, 5), np.float32), cache)  # noqa: E731
    with pytest.raises(ValueError, match="a prompt of 2 tokens needs a prefill pass"):
        decoding.generate(spec, None, step, lambda c, r: c, {}, np.ones((2, 2), np.int32))


def test_the_packed_encoder_compiles_once_per_token_bucket(seq2seq):
    _, ours = seq2seq
    rng = np.random.default_rng(6)
    ids = rng.integers(3, 99, (4, 16))
    mask = np.ones_like(ids)
    mask[:, 12:] = 0                  # 48 of 64 positions: a row of 48 tokens (4 buckets of 16 tokens each)
    ours.generate(ids, mask, max_new_tokens=5, packing_buckets=4)
    before = generation.TRACE_COUNTS["seq2seq"]
    mask[0, 10:] = 0                  # 46 tokens: the same bucket of 48
    ours.generate(ids, mask, max_new_tokens=5, packing_buckets=4)
    assert generation.TRACE_COUNTS["seq2seq"] == before
    mask[:, 8:] = 0                   # 32 tokens: the next bucket down, compiled once
    ours.generate(ids, mask, max_new_tokens=5, packing_buckets=4)
    assert generation.TRACE_COUNTS["seq2seq"] == before + 1


def test_the_packed_encoder_gives_the_padded_encoders_tokens_and_scores(seq2seq):
    _, ours = seq2seq
    ids, mask = _source()
    for knobs in (dict(max_new_tokens=9), dict(max_new_tokens=9, num_beams=3)):
        packed, ps = ours.generate(ids, mask, return_scores=True, **knobs)
        padded, qs = ours.generate(ids, mask, return_scores=True, packing_buckets=0, **knobs)
        assert generation._packing(np.asarray(ids), np.asarray(mask), generation.PACKING_BUCKETS) is not None
        np.testing.assert_array_equal(np.asarray(packed), np.asarray(padded))
        np.testing.assert_allclose(np.asarray(ps), np.asarray(qs), rtol=1e-5, atol=1e-6)


def test_packing_lays_out_the_real_tokens_in_order():
    src = np.array([[5, 6, 0, 0], [7, 8, 9, 0]], np.int32)
    mask = (src != 0).astype(np.int32)
    ids, positions, unpack, pack = generation._packing(src, mask, buckets=4)  # units of 2 tokens: 5 -> 6
    np.testing.assert_array_equal(ids[0, :5], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(positions[0, :5], [0, 1, 0, 1, 2])             # each token's own position
    np.testing.assert_array_equal(pack[:5], [0, 1, 4, 5, 6])                    # b * S + s
    np.testing.assert_array_equal(unpack[mask == 1], [0, 1, 2, 3, 4])
    assert ids.shape == (1, 6) and generation._packing(src, np.ones_like(src), buckets=4) is None


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


MESH_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import numpy as np, jax
import bertgen_flax as bg
from jax.sharding import Mesh
model = bg.EncoderDecoderModel.from_pretrained(sys.argv[1])
rng = np.random.default_rng(0)
ids = rng.integers(3, 99, (5, 9)); mask = np.ones_like(ids); mask[2, 4:] = 0
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
assert len(jax.devices()) == 8
for kw in (dict(max_new_tokens=10), dict(max_new_tokens=10, num_beams=3, num_return_sequences=2)):
    one = np.asarray(model.generate(ids, mask, **kw))
    many = np.asarray(model.generate(ids, mask, mesh=mesh, **kw))
    assert one.shape == many.shape and (one == many).all(), (kw, one, many)
sharded = [x.sharding.spec for x in jax.tree_util.tree_leaves(model._sharded[2])]
assert any("model" in tuple(s) for s in sharded), sharded
print("OK")
"""


def test_generation_sharded_over_a_device_mesh_equals_one_device(seq2seq, tmp_path):
    import subprocess
    import sys
    _, ours = seq2seq
    ours.save_pretrained(str(tmp_path / "m"))
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "m")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_generation_defaults_come_from_generation_config_json(seq2seq, tmp_path):
    import json
    ref, _ = seq2seq
    path = tmp_path / "with_defaults"
    ref.save_pretrained(path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(num_beams=3, max_new_tokens=9, length_penalty=0.7, decoder_start_token_id=2)
    (path / "generation_config.json").write_text(json.dumps(gen))
    ids, mask = _source()
    want = transformers.EncoderDecoderModel.from_pretrained(path).eval()
    with torch.no_grad():
        want = want.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).numpy()
    ours = bg.EncoderDecoderModel.from_pretrained(str(path))
    assert ours.generation_defaults().num_beams == 3
    _assert_same(want, ours.generate(ids, mask))
    assert np.asarray(ours.generate(ids, mask, num_beams=1)).shape[1] == 10  # overridable per call


def test_functional_entry_point_equals_the_method(seq2seq):
    _, ours = seq2seq
    ids, mask = _source()
    config = ours.generation_defaults().merged(num_beams=2, max_new_tokens=6)
    functional = generation.seq2seq_generate(ours.module, ours.params, ids, mask, config)
    assert (np.asarray(functional) == np.asarray(ours.generate(ids, mask, num_beams=2, max_new_tokens=6))).all()


@pytest.mark.parametrize("knobs, message", [
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "greedy"),
    (dict(early_stopping="sometimes", num_beams=2), "early_stopping"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=1.5, do_sample=True), "top_p"),
    (dict(max_new_tokens=100), "max_position_embeddings"),
    (dict(bad_words_ids=[[]]), "bad_words_ids"),
    (dict(beams=3), "unknown generation options"),
])
def test_bad_generation_options_raise_clear_errors(seq2seq, knobs, message):
    _, ours = seq2seq
    ids, mask = _source()
    with pytest.raises((ValueError, TypeError), match=message):
        ours.generate(ids, mask, **knobs)


def test_generation_rejects_ids_outside_the_vocabulary(seq2seq):
    _, ours = seq2seq
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.generate(np.array([[5, 500]]))


def test_decoder_only_generation_rejects_right_padded_prompts(decoder):
    _, ours = decoder
    with pytest.raises(ValueError, match="left-padded"):
        ours.generate(np.array([[5, 6, 0]]), np.array([[1, 1, 0]]))


def test_greedy_scores_sum_the_log_probs_of_the_chosen_tokens(seq2seq):
    ref, ours = seq2seq
    ids, mask = _source()
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=10,
                            output_scores=True, return_dict_in_generate=True)
    seqs, scores = ours.generate(ids, mask, max_new_tokens=10, return_scores=True)
    _assert_same(want.sequences.numpy(), seqs)
    # without scores the program skips the per-step log-softmax; the tokens must not change
    _assert_same(want.sequences.numpy(), ours.generate(ids, mask, max_new_tokens=10))
    chosen = want.sequences[:, 1:]
    logp = torch.log_softmax(torch.stack(want.scores, dim=1), dim=-1).gather(-1, chosen[..., None])[..., 0]
    ended = torch.cumsum((chosen == EOS).int(), dim=1)
    running = (ended == 0) | ((ended == 1) & (chosen == EOS))  # up to and including the first EOS
    expected = torch.where(running, logp, 0.0).sum(dim=1).numpy()
    assert np.abs(np.asarray(scores) - expected).max() <= 1e-4


def test_first_argmax_picks_what_argmax_picks():
    import jax.numpy as jnp
    from bertgen_flax.decoding import first_argmax
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((6, 50)), rng.integers(0, 3, (40, 7)).astype(float),  # many ties
            np.full((2, 5), -np.inf), np.array([[1.0, np.nan, 3.0, np.nan], [-np.inf, 2.0, 2.0, -np.inf]])]
    for x in rows:
        x = jnp.asarray(x, jnp.float32)
        assert (np.asarray(first_argmax(x)) == np.asarray(jnp.argmax(x, axis=-1))).all(), x


def test_chunked_top_k_picks_what_lax_top_k_picks():
    import jax
    import jax.numpy as jnp
    from bertgen_flax.decoding import top_k
    rng = np.random.default_rng(0)
    ties = rng.integers(0, 4, (5, 3000)).astype(float)                      # many ties, across chunks too
    sparse = np.full((3, 1000), -np.inf)
    sparse[:, [7, 500, 999]] = 1.0                                           # fewer finite values than k
    rows = [rng.standard_normal((6, 32000)), ties, sparse, rng.standard_normal((4, 70)),  # 70: padded chunk
            np.round(rng.standard_normal((3, 4001)), 1)]
    nan = rng.standard_normal((3, 3000))
    nan[0, 5], nan[1, [100, 2000]], nan[2, :] = np.nan, np.nan, np.nan        # top_k ranks NaN first
    rows.append(nan)
    for x in rows:
        x = jnp.asarray(x, jnp.float32)
        for k in (1, 8, 12):
            want, got = jax.lax.top_k(x, k), jax.jit(top_k, static_argnums=1)(x, k)
            assert np.array_equal(np.asarray(got[0]), np.asarray(want[0]), equal_nan=True)
            assert np.array_equal(np.asarray(got[1]), np.asarray(want[1]))


CACHE_SCRIPT = r"""
import json, os, sys
import numpy as np
import bertgen_flax as bg
path = bg.enable_compilation_cache(sys.argv[2])
model = bg.EncoderDecoderModel.from_pretrained(sys.argv[1])
out = np.asarray(model.generate(np.array([[5, 6, 7, 8]]), max_new_tokens=5))
print("RESULT " + json.dumps(dict(files=sorted(os.listdir(path)), out=out.tolist())))
"""


def test_the_compilation_cache_is_written_and_reused_by_a_second_process(seq2seq, tmp_path):
    import json
    import subprocess
    import sys
    _, ours = seq2seq
    ours.save_pretrained(str(tmp_path / "m"))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(tmp_path / "m"), str(tmp_path / "xla")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
    first, second = runs
    assert first["files"] and second["files"] == first["files"]  # the second process compiled nothing new
    assert first["out"] == second["out"]


X64_SCRIPT = r"""
import json, sys
import jax
import jax.extend
jax.config.update("jax_enable_x64", True)
import numpy as np
import bertgen_flax as bg
seq2seq = bg.EncoderDecoderModel.from_pretrained(sys.argv[1])
decoder = bg.BertGenerationDecoder.from_pretrained(sys.argv[2])
ids, mask = np.array(json.loads(sys.argv[3])), np.array(json.loads(sys.argv[4]))
out = {name: np.asarray(seq2seq.generate(ids, mask, **kw)).tolist() for name, kw in json.loads(sys.argv[5]).items()}
out["decoder"] = np.asarray(decoder.generate(ids[:, :5], max_new_tokens=6)).tolist()
print(json.dumps(out))
"""


def test_generation_works_with_jax_enable_x64(seq2seq, decoder, tmp_path):
    """A process that turns on 64-bit JAX types generates the same tokens (index types stay consistent)."""
    import json
    import subprocess
    import sys
    (ref, ours), (dec_ref, dec_ours) = seq2seq, decoder
    ours.save_pretrained(str(tmp_path / "s2s"))
    dec_ours.save_pretrained(str(tmp_path / "dec"))
    ids, mask = _source()
    cases = {"greedy": dict(max_new_tokens=12), "beam3": SEQ2SEQ_CASES["beam3"],
             "sample": dict(max_new_tokens=12, do_sample=True, top_k=5, seed=3)}
    proc = subprocess.run([sys.executable, "-c", X64_SCRIPT, str(tmp_path / "s2s"), str(tmp_path / "dec"),
                           json.dumps(ids.tolist()), json.dumps(mask.tolist()), json.dumps(cases)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("greedy", "beam3"):
        _assert_same(_reference(ref, ids, mask, **cases[name]), got[name])
    _assert_same(np.asarray(ours.generate(ids, mask, **cases["sample"])), got["sample"])
    _assert_same(_reference(dec_ref, ids[:, :5], np.ones_like(ids[:, :5]), max_new_tokens=6, do_sample=False),
                 got["decoder"])


def _loop_weight_casts(jaxpr, dtype) -> list:
    """Casts to ``dtype`` of float32 matrices that a while loop's body takes from outside the loop (its consts),
    found in every while loop of ``jaxpr``: work that repeats in every decode step unless the compiler hoists it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            body = eqn.params["body_jaxpr"].jaxpr
            consts = set(body.invars[:eqn.params["body_nconsts"]])
            found += [e.invars[0].aval.shape for e in body.eqns
                      if e.primitive.name == "convert_element_type" and e.invars[0] in consts
                      and e.params["new_dtype"] == dtype and e.invars[0].aval.dtype == np.float32
                      and e.invars[0].aval.ndim >= 2]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _loop_weight_casts(sub, dtype)
    return found


def test_bfloat16_compute_with_float32_params_casts_the_matrices_once_before_the_loop(seq2seq, tmp_path,
                                                                                      monkeypatch):
    """A model loaded with dtype=bfloat16 keeps float32 params. The decode loop must read bfloat16 matrices,
    whether or not the compiler hoists the casts out of the loop (on a GPU a step is bound by the bytes it reads),
    and the tokens and scores must be those of the casts inside the loop."""
    ref, _ = seq2seq
    ref.save_pretrained(tmp_path / "ed")
    ids, mask = _source()
    kw = dict(num_beams=3, max_new_tokens=8, return_scores=True)
    real_program, seen = generation._seq2seq_program, []

    def spy(*args, **kwargs):
        program = real_program(*args, **kwargs)

        def call(*a):
            seen.append(_loop_weight_casts(program.trace(*a).jaxpr, jnp.bfloat16))
            return program(*a)
        return call

    def run():
        model = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "ed"), dtype="bfloat16")
        assert jax.tree_util.tree_leaves(model.params)[0].dtype == np.float32
        real_program.cache_clear()
        return [np.asarray(x) for x in model.generate(ids, mask, **kw)]

    monkeypatch.setattr(generation, "_seq2seq_program", spy)
    seqs, scores = run()
    assert seen[-1] == [], f"matrices cast inside the loop: {seen[-1]}"
    monkeypatch.setattr(generation, "_matrices_in", lambda dtype, tree: tree)  # the casts left to the modules
    want_seqs, want_scores = run()
    assert len(seen[-1]) >= 6, "the check must see the per-step casts when nothing casts before the loop"
    assert np.array_equal(seqs, want_seqs) and np.array_equal(scores, want_scores)
    real_program.cache_clear()
