"""Decoding against the key/value cache, one token (or chunk) at a time, equals the full forward."""
import numpy as np
import pytest
import torch
import transformers

import bertgen_flax as bg

from conftest import TINY, perturb_, seq2seq_checkpoint

B, S, T = 2, 7, 6
TOL_CACHE = 1e-5


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    path = tmp_path_factory.mktemp("ed") / "ed"
    seq2seq_checkpoint(path)
    return bg.EncoderDecoderModel.from_pretrained(str(path))


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    torch.manual_seed(1)
    model = transformers.BertGenerationDecoder(transformers.BertGenerationConfig(**TINY, is_decoder=True))
    perturb_(model, 1)
    path = tmp_path_factory.mktemp("dec") / "dec"
    model.save_pretrained(path)
    return bg.BertGenerationDecoder.from_pretrained(str(path))


def _ids(seed=0, shape=(B, T)):
    return np.random.default_rng(seed).integers(3, TINY["vocab_size"], shape)


def test_decoder_one_token_at_a_time_equals_full_forward(decoder):
    ids = _ids()
    full = np.asarray(decoder(ids).logits)
    cache = decoder.init_cache(B, T)
    steps = []
    for t in range(T):
        out = decoder(ids[:, t:t + 1], past_key_values=cache)
        cache = out.past_key_values
        steps.append(np.asarray(out.logits))
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= TOL_CACHE


def test_decoder_prefill_chunk_then_steps_equals_full_forward(decoder):
    ids = _ids(1)
    full = np.asarray(decoder(ids).logits)
    first = decoder(ids[:, :4], past_key_values=decoder.init_cache(B, 16))
    rest = [np.asarray(first.logits)]
    cache = first.past_key_values
    for t in range(4, T):
        out = decoder(ids[:, t:t + 1], past_key_values=cache)
        cache = out.past_key_values
        rest.append(np.asarray(out.logits))
    assert np.abs(np.concatenate(rest, axis=1) - full).max() <= TOL_CACHE


def test_decoder_use_cache_returns_a_cache_that_continues(decoder):
    ids = _ids(2)
    full = np.asarray(decoder(ids).logits)
    out = decoder(ids[:, :3], use_cache=True, max_cache_length=T)
    nxt = decoder(ids[:, 3:], past_key_values=out.past_key_values)
    assert np.abs(np.asarray(nxt.logits) - full[:, 3:]).max() <= TOL_CACHE


def test_decoder_cache_respects_the_padding_mask(decoder):
    ids = _ids(3)
    mask = np.ones((B, T), np.int64)
    mask[1, :2] = 0  # left padding in row 1
    positions = np.tile(np.arange(T), (B, 1))
    full = np.asarray(decoder(ids, attention_mask=mask, position_ids=positions).logits)
    cache = decoder.init_cache(B, T)
    steps = []
    for t in range(T):
        out = decoder(ids[:, t:t + 1], attention_mask=mask, past_key_values=cache, position_ids=positions[:, t:t + 1])
        cache = out.past_key_values
        steps.append(np.asarray(out.logits))
    got = np.concatenate(steps, axis=1)
    assert np.abs(got - full)[mask.astype(bool)].max() <= TOL_CACHE


def test_encoder_decoder_cached_steps_equal_full_forward_with_cross_kv_computed_once(seq2seq):
    src = _ids(4, (B, S))
    src_mask = np.ones((B, S), np.int64)
    src_mask[0, 5:] = 0
    tgt = _ids(5)
    full = np.asarray(seq2seq(src, src_mask, tgt).logits)
    enc = seq2seq.encode(src, src_mask).last_hidden_state
    cache = seq2seq.init_cache(B, T, S)
    steps = []
    for t in range(T):
        # Only the first step passes the encoder states; later steps read cross K/V from the cache.
        out = seq2seq.decode(tgt[:, t:t + 1], enc if t == 0 else None, src_mask, past_key_values=cache)
        cache = out.past_key_values
        steps.append(np.asarray(out.logits))
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= TOL_CACHE


def test_cache_layout_is_preallocated_with_a_leading_layer_axis(seq2seq):
    cache = seq2seq.init_cache(B, 16, S)
    flat = {"/".join(k): v.shape for k, v in bg.convert.flatten(cache).items()}
    n, heads, hd = TINY["num_hidden_layers"], TINY["num_attention_heads"], TINY["hidden_size"] // 4
    assert flat["decoder/bert/cache_index"] == ()
    assert flat["decoder/bert/encoder/layer/attention/cached_key"] == (n, B, heads, 16, hd)
    assert flat["decoder/bert/encoder/layer/crossattention/cross_key"] == (n, B, heads, S, hd)


def test_cache_longer_than_the_positions_is_rejected(decoder):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        decoder.init_cache(1, TINY["max_position_embeddings"] + 1)
