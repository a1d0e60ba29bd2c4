"""Bad input to the library gives an error of a documented type whose message names the problem."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import bertgen_flax as bg
from bertgen_flax import checkpoints

from conftest import TINY, run_without_torch, torch_state_dict

V, P = TINY["vocab_size"], TINY["max_position_embeddings"]


@pytest.fixture(scope="module")
def encoder():
    return bg.BertGenerationEncoder(bg.BertGenerationConfig(**TINY))


@pytest.fixture(scope="module")
def decoder():
    return bg.BertGenerationDecoder(bg.BertGenerationConfig(**TINY, is_decoder=True))


def _ed_config(**kwargs):
    return bg.EncoderDecoderConfig(encoder=bg.BertGenerationConfig(**TINY),
                                   decoder=bg.BertGenerationConfig(**TINY, is_decoder=True, add_cross_attention=True),
                                   **kwargs)


@pytest.fixture(scope="module")
def seq2seq():
    return bg.EncoderDecoderModel(_ed_config(decoder_start_token_id=2, pad_token_id=0))


def _ids(length=5, batch=2, seed=0):
    return np.random.default_rng(seed).integers(3, V, (batch, length))


# ---- inputs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [V, V + 1000], ids=["vocab_size", "far_beyond"])
def test_input_id_outside_the_vocabulary_is_refused(encoder, bad):
    ids = _ids()
    ids[1, 2] = bad
    with pytest.raises(ValueError, match=rf"input_ids holds id {bad}, outside the vocabulary \[0, {V}\)"):
        encoder(ids)


def test_negative_input_id_is_refused(encoder):
    ids = _ids()
    ids[0, 0] = -1
    with pytest.raises(ValueError, match=r"input_ids holds id -1, outside the vocabulary"):
        encoder(ids)


def test_input_longer_than_max_position_embeddings_is_refused(encoder):
    with pytest.raises(ValueError, match=rf"input_ids has length {P + 1}, longer than max_position_embeddings={P}"):
        encoder(_ids(P + 1))


def test_input_of_exactly_max_position_embeddings_is_accepted(encoder):
    assert encoder(_ids(P)).last_hidden_state.shape == (2, P, TINY["hidden_size"])


def test_decoder_input_longer_than_max_position_embeddings_is_refused(seq2seq):
    with pytest.raises(ValueError, match=r"decoder_input_ids has length .* max_position_embeddings"):
        seq2seq(_ids(), decoder_input_ids=_ids(P + 1))


def test_attention_mask_of_the_wrong_shape_is_refused(encoder):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\), expected \(2, 5\)"):
        encoder(_ids(5), attention_mask=np.ones((2, 4), np.int64))


def test_decoder_attention_mask_of_the_wrong_shape_is_refused(seq2seq):
    with pytest.raises(ValueError, match=r"decoder_attention_mask has shape \(2, 3\), expected \(2, 4\)"):
        seq2seq(_ids(), decoder_input_ids=_ids(4), decoder_attention_mask=np.ones((2, 3), np.int64))


def test_float_input_ids_are_refused(encoder):
    with pytest.raises(ValueError, match=r"input_ids must hold integer token ids, got dtype float"):
        encoder(_ids().astype(np.float32))


def test_one_dimensional_input_ids_are_refused(encoder):
    with pytest.raises(ValueError, match=r"input_ids must be 2-D \[batch, length\], got shape \(5,\)"):
        encoder(_ids()[0])


def test_training_without_a_dropout_rng_is_refused(encoder):
    with pytest.raises(ValueError, match="train=True needs dropout_rng"):
        encoder(_ids(), train=True)


@pytest.mark.parametrize("bad", [V, -3], ids=["too_large", "negative"])
def test_encoder_decoder_labels_outside_the_vocabulary_are_refused(seq2seq, bad):
    labels = _ids(4)
    labels[1, 1] = bad
    with pytest.raises(ValueError, match=rf"labels hold id {bad}, outside the vocabulary \[0, {V}\) and not -100"):
        seq2seq(_ids(), labels=labels)


@pytest.mark.parametrize("bad", [V, -3], ids=["too_large", "negative"])
def test_decoder_labels_outside_the_vocabulary_are_refused(decoder, bad):
    # transformers' CrossEntropyLoss raises for such a target; a silent nan (or a wrong loss for negative ids)
    # would only surface as a diverged training run
    ids = _ids(4)
    labels = ids.copy()
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=rf"labels.*{bad}.*vocabulary"):
        decoder(ids, labels=labels)


def test_decoder_labels_of_another_shape_than_the_inputs_are_refused(decoder):
    with pytest.raises(ValueError, match=r"labels.*shape"):
        decoder(_ids(4), labels=_ids(5))


def test_labels_without_decoder_start_token_id_are_refused():
    model = bg.EncoderDecoderModel(_ed_config(pad_token_id=0))
    assert model.config.decoder_start_token_id is None and model.config.decoder.decoder_start_token_id is None
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        model(_ids(), labels=_ids(4))


# ---- configs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=30), r"hidden_size \(30\) is not a multiple of num_attention_heads \(4\)"),
    (dict(hidden_act="gelu_fancy"), r"unknown activation hidden_act='gelu_fancy'"),
    (dict(position_embedding_type="rotary"), r"unknown position_embedding_type='rotary'"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer, got 0"),
    (dict(num_hidden_layers=-1), r"num_hidden_layers must be a positive integer, got -1"),
    (dict(num_attention_heads=0), r"num_attention_heads must be a positive integer, got 0"),
    (dict(intermediate_size=-37), r"intermediate_size must be a positive integer, got -37"),
    (dict(vocab_size=0), r"vocab_size must be a positive integer, got 0"),
    (dict(max_position_embeddings=0), r"max_position_embeddings must be a positive integer, got 0"),
    (dict(hidden_size=32.0), r"hidden_size must be a positive integer, got 32.0"),
], ids=["heads_do_not_divide", "unknown_activation", "unknown_position_type", "zero_hidden", "negative_layers",
        "zero_heads", "negative_intermediate", "zero_vocab", "zero_positions", "float_size"])
def test_invalid_config_is_refused(changes, message):
    with pytest.raises(bg.ConfigError, match=message):
        bg.BertGenerationConfig(**{**TINY, **changes})


def test_encoder_decoder_directory_is_refused_by_the_encoder(tmp_path):
    _ed_config(decoder_start_token_id=2, pad_token_id=0).save_pretrained(str(tmp_path))
    with pytest.raises(bg.ConfigError, match=r"EncoderDecoderConfig.*BertGenerationEncoder"):
        bg.BertGenerationEncoder.from_pretrained(str(tmp_path))


# ---- checkpoint directories ------------------------------------------------------------------------------------
@pytest.mark.parametrize("load", [
    bg.BertGenerationEncoder.from_pretrained, bg.BertGenerationDecoder.from_pretrained,
    bg.EncoderDecoderModel.from_pretrained,
    lambda path: bg.EncoderDecoderModel.from_encoder_decoder_pretrained(path, path),
], ids=["encoder", "decoder", "encoder_decoder", "warm_start"])
def test_missing_directory_raises_file_not_found_naming_it(tmp_path, load):
    path = str(tmp_path / "no_such_checkpoint")
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        load(path)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, encoder):
    path = tmp_path_factory.mktemp("enc") / "encoder"
    encoder.save_pretrained(str(path))
    return str(path)


def _variant(encoder_dir, tmp_path, edit):
    """A copy of the encoder checkpoint whose state dict ``edit`` changed."""
    path = tmp_path / "variant"
    shutil.copytree(encoder_dir, path)
    state = checkpoints.load_state_dict(encoder_dir)
    edit(state)
    checkpoints.write_safetensors(str(path / "model.safetensors"), state)
    return str(path)


def test_unknown_key_in_a_checkpoint_is_named(encoder_dir, tmp_path):
    def add(state):
        state["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(bg.ConversionError, match=r"unexpected keys \(1\): encoder\.layer\.0\.attention\.self\.rotary"):
        bg.BertGenerationEncoder.from_pretrained(_variant(encoder_dir, tmp_path, add))


def test_missing_keys_in_a_checkpoint_are_named(encoder_dir, tmp_path):
    gone = ("encoder.layer.1.output.dense.weight", "embeddings.LayerNorm.bias")

    def remove(state):
        for key in gone:
            del state[key]
    with pytest.raises(bg.ConversionError, match=r"missing keys \(2\)") as info:
        bg.BertGenerationEncoder.from_pretrained(_variant(encoder_dir, tmp_path, remove))
    assert all(key in str(info.value) for key in gone)


def test_tensor_of_the_wrong_shape_is_named(encoder_dir, tmp_path):
    def shrink(state):
        state["encoder.layer.0.intermediate.dense.weight"] = state["encoder.layer.0.intermediate.dense.weight"][:-1]
    with pytest.raises(bg.ConversionError, match=r"shape mismatches.*intermediate\.dense\.weight"):
        bg.BertGenerationEncoder.from_pretrained(_variant(encoder_dir, tmp_path, shrink))


def test_truncated_safetensors_file_is_named(encoder_dir, tmp_path):
    path = tmp_path / "cut"
    shutil.copytree(encoder_dir, path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(bg.CheckpointError, match=r"model\.safetensors.*truncated"):
        bg.BertGenerationEncoder.from_pretrained(str(path))


@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
def test_read_safetensors_names_a_truncated_file_and_a_header_that_is_not_an_object(tmp_path, mapped):
    path = tmp_path / "x.safetensors"
    checkpoints.write_safetensors(str(path), {"w": np.ones((4, 4), np.float32)})
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(bg.CheckpointError, match=r"x\.safetensors is truncated or corrupt: tensor 'w'"):
        checkpoints.read_safetensors(str(path), mapped=mapped)
    header = b"[1, 2]"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(bg.CheckpointError, match=r"x\.safetensors has a corrupt safetensors header: not a JSON"):
        checkpoints.read_safetensors(str(path), mapped=mapped)


def _bin_dir(encoder_dir, tmp_path):
    path = tmp_path / "bin"
    os.makedirs(path)
    shutil.copy(os.path.join(encoder_dir, "config.json"), path / "config.json")
    return path


def test_pytorch_model_bin_that_is_not_a_pickle_is_named(encoder_dir, tmp_path):
    path = _bin_dir(encoder_dir, tmp_path)
    (path / "pytorch_model.bin").write_bytes(b"this is not a pickle\n" * 8)
    with pytest.raises(bg.CheckpointError, match=r"cannot read .*pytorch_model\.bin as a PyTorch checkpoint"):
        bg.BertGenerationEncoder.from_pretrained(str(path))


class _RunsCode:
    """Unpickling this calls os.mkdir: what a malicious checkpoint would do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_pickle_that_would_run_code_is_refused_without_running_it(encoder_dir, tmp_path):
    path = _bin_dir(encoder_dir, tmp_path)
    target = tmp_path / "pwned"
    state = torch_state_dict(encoder_dir)
    torch.save({**state, "payload": _RunsCode(str(target))}, path / "pytorch_model.bin")
    with pytest.raises(bg.CheckpointError, match=r"pytorch_model\.bin") as info:
        bg.BertGenerationEncoder.from_pretrained(str(path))
    assert "mkdir" in str(info.value)  # weights_only named the global it refused to call
    assert not target.exists()


def test_pickle_with_a_non_tensor_entry_is_refused(encoder_dir, tmp_path):
    path = _bin_dir(encoder_dir, tmp_path)
    state = torch_state_dict(encoder_dir)
    torch.save({**state, "step": 1000}, path / "pytorch_model.bin")
    with pytest.raises(bg.CheckpointError, match=r"pytorch_model\.bin: entry 'step' is not a tensor"):
        bg.BertGenerationEncoder.from_pretrained(str(path))


def test_pickle_that_is_not_a_state_dict_is_refused(encoder_dir, tmp_path):
    path = _bin_dir(encoder_dir, tmp_path)
    torch.save([torch.zeros(3)], path / "pytorch_model.bin")
    with pytest.raises(bg.CheckpointError, match=r"pytorch_model\.bin does not hold a state dict"):
        bg.BertGenerationEncoder.from_pretrained(str(path))


def test_plain_pickle_of_code_is_refused_without_running_it(encoder_dir, tmp_path):
    path = _bin_dir(encoder_dir, tmp_path)
    target = tmp_path / "pwned_plain"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _RunsCode(str(target))}, protocol=2))
    with pytest.raises(bg.CheckpointError, match=r"pytorch_model\.bin"):
        bg.BertGenerationEncoder.from_pretrained(str(path))
    assert not target.exists()


def test_pytorch_zip_with_a_storage_shorter_than_announced_is_named(encoder_dir, tmp_path):
    import zipfile
    path = _bin_dir(encoder_dir, tmp_path)
    state = torch_state_dict(encoder_dir)
    torch.save(state, tmp_path / "good.bin")
    with zipfile.ZipFile(tmp_path / "good.bin") as src, \
            zipfile.ZipFile(path / "pytorch_model.bin", "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:-4] if info.filename.endswith("/data/0") else data)
    with pytest.raises(bg.CheckpointError, match=r"pytorch_model\.bin is truncated or corrupt: storage '0'"):
        bg.BertGenerationEncoder.from_pretrained(str(path))


def test_pytorch_zip_that_would_run_code_is_refused_without_torch_naming_the_global(encoder_dir, tmp_path):
    path = _bin_dir(encoder_dir, tmp_path)
    target = tmp_path / "pwned"
    state = torch_state_dict(encoder_dir)
    torch.save({**state, "payload": _RunsCode(str(target))}, path / "pytorch_model.bin")
    proc = run_without_torch(f"import bertgen_flax as bg\nbg.BertGenerationEncoder.from_pretrained({str(path)!r})")
    assert proc.returncode != 0 and "CheckpointError" in proc.stderr
    assert "mkdir" in proc.stderr and "needs torch" in proc.stderr
    assert not target.exists()


def test_pre_zip_pytorch_pickle_without_torch_says_torch_is_needed(encoder_dir, tmp_path):
    path = _bin_dir(encoder_dir, tmp_path)
    state = torch_state_dict(encoder_dir)
    torch.save(state, path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert bg.BertGenerationEncoder.from_pretrained(str(path)).params  # torch reads it
    proc = run_without_torch(f"import bertgen_flax as bg\nbg.BertGenerationEncoder.from_pretrained({str(path)!r})")
    assert proc.returncode != 0
    assert "pytorch_model.bin is a PyTorch pickle that needs torch to read" in proc.stderr


def test_a_truncated_pytorch_zip_is_named(encoder_dir, tmp_path):
    path = _bin_dir(encoder_dir, tmp_path)
    torch.save(torch_state_dict(encoder_dir), tmp_path / "whole.bin")
    data = (tmp_path / "whole.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(bg.CheckpointError, match=r"cannot read .*pytorch_model\.bin as a PyTorch checkpoint"):
        bg.BertGenerationEncoder.from_pretrained(str(path))
