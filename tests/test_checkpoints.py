"""Round trips: HF -> ours -> HF is bit-identical and loads in transformers; native save/restore is exact."""
import json
import mmap
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import bertgen_flax as bg
from bertgen_flax import checkpoints

from conftest import (TINY, perturb_, run_without_torch, seq2seq_checkpoint, torch_state_dict, traced_peak,
                      wide_checkpoint)


def _seq2seq(path, untied=False, seed=0):
    return seq2seq_checkpoint(path, seed, dec=dict(tie_word_embeddings=not untied))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "ed"
    _seq2seq(path)
    return str(path)


def _inputs():
    rng = np.random.default_rng(0)
    return rng.integers(3, 99, (2, 7)), rng.integers(3, 99, (2, 5))


@pytest.mark.parametrize("untied", [False, True], ids=["tied_head", "untied_head"])
def test_hf_to_ours_to_hf_is_bit_identical(tmp_path, untied):
    _seq2seq(tmp_path / "src", untied=untied)
    model = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "src"))
    model.save_pretrained(str(tmp_path / "out"))
    before = checkpoints.load_state_dict(str(tmp_path / "src"))
    after = checkpoints.load_state_dict(str(tmp_path / "out"))
    assert set(before) <= set(after)
    # transformers 5.x never reads lm_head.bias of an untied head (it computes with lm_head.decoder.bias):
    # that dead tensor is the one thing not carried, and the load report says so.
    dead = {k for k, why in model.load_report.dropped if why.startswith("unused")}
    assert dead == ({"decoder.lm_head.bias"} if untied else set())
    for key, value in before.items():
        if key in dead:
            continue
        assert after[key].dtype == value.dtype and np.array_equal(after[key], value), key


@pytest.mark.parametrize("untied", [False, True], ids=["tied_head", "untied_head"])
def test_saved_directory_loads_in_transformers_without_missing_keys_and_same_outputs(tmp_path, untied):
    ref = _seq2seq(tmp_path / "src", untied=untied, seed=3)
    bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "src")).save_pretrained(str(tmp_path / "out"))
    back, info = transformers.EncoderDecoderModel.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    src, tgt = _inputs()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(src), decoder_input_ids=torch.tensor(tgt)).logits
        got = back.eval()(input_ids=torch.tensor(src), decoder_input_ids=torch.tensor(tgt)).logits
    assert torch.equal(want, got)


def test_save_writes_config_and_generation_config(hf_dir, tmp_path):
    bg.EncoderDecoderModel.from_pretrained(hf_dir).save_pretrained(str(tmp_path / "out"))
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert gen["decoder_start_token_id"] == 2 and gen["pad_token_id"] == 0
    assert cfg["model_type"] == "encoder-decoder" and cfg["decoder"]["add_cross_attention"] is True


def test_encoder_and_decoder_round_trip_bit_identically(tmp_path):
    torch.manual_seed(4)
    enc = transformers.BertGenerationEncoder(transformers.BertGenerationConfig(**TINY))
    dec = transformers.BertGenerationDecoder(transformers.BertGenerationConfig(**TINY, is_decoder=True))
    for model, cls, name in ((enc, bg.BertGenerationEncoder, "enc"), (dec, bg.BertGenerationDecoder, "dec")):
        perturb_(model, 4)
        model.save_pretrained(tmp_path / name)
        cls.from_pretrained(str(tmp_path / name)).save_pretrained(str(tmp_path / f"{name}_out"))
        before = checkpoints.load_state_dict(str(tmp_path / name))
        after = checkpoints.load_state_dict(str(tmp_path / f"{name}_out"))
        for key, value in before.items():
            assert np.array_equal(after[key], value), key
        reloaded, info = type(model).from_pretrained(str(tmp_path / f"{name}_out"), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]


def test_native_save_and_restore_is_exact(hf_dir, tmp_path):
    model = bg.EncoderDecoderModel.from_pretrained(hf_dir)
    model.save_native(str(tmp_path / "native"))
    assert os.path.isfile(tmp_path / "native" / "bertgen_native.json")
    again = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "native"))
    a, b = bg.convert.flatten(model.params), bg.convert.flatten(again.params)
    assert a.keys() == b.keys()
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    assert again.config == model.config


def test_native_checkpoint_loads_unrolled_with_the_same_outputs(hf_dir, tmp_path):
    model = bg.EncoderDecoderModel.from_pretrained(hf_dir)
    model.save_native(str(tmp_path / "native"))
    unrolled = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "native"), scan_layers=False)
    src, tgt = _inputs()
    assert np.allclose(np.asarray(model(src, decoder_input_ids=tgt).logits),
                       np.asarray(unrolled(src, decoder_input_ids=tgt).logits), atol=1e-6)


def test_an_unrolled_model_saves_the_native_checkpoint_a_stacked_one_saves(hf_dir, tmp_path):
    stacked = bg.EncoderDecoderModel.from_pretrained(hf_dir)
    bg.EncoderDecoderModel.from_pretrained(hf_dir, scan_layers=False).save_native(str(tmp_path / "native"))
    again = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "native"))
    a, b = bg.convert.flatten(stacked.params), bg.convert.flatten(again.params)
    assert a.keys() == b.keys()
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _arrays_left_by(load) -> list:
    """The shapes of the jax arrays that the model ``load()`` returns leaves behind once dropped, with the cyclic
    garbage collector off (what a reference cycle would keep alive)."""
    import gc
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    gc.disable()
    try:
        model = load()
        assert bg.quantization.param_bytes(model.params) > 0
        del model
        return [a.shape for a in jax.live_arrays() if id(a) not in before]
    finally:
        gc.enable()


def test_a_model_loaded_from_a_native_checkpoint_frees_its_weights_as_soon_as_it_is_dropped(hf_dir, tmp_path):
    """Nothing from the restore keeps the weights alive through a reference cycle (numpy views of orbax's arrays
    did: a quantized load kept the float model resident until the cyclic collector ran)."""
    bg.EncoderDecoderModel.from_pretrained(hf_dir).save_native(str(tmp_path / "native"))
    for quantize in (None, "int8"):
        assert _arrays_left_by(lambda: bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "native"),
                                                                            quantize=quantize)) == []


@pytest.mark.parametrize("scan_layers", [True, False], ids=["stacked", "unrolled"])
def test_a_warm_started_model_frees_its_weights_as_soon_as_it_is_dropped(tmp_path, scan_layers):
    """The encoder and decoder loaded for a warm start hand their device arrays on, not numpy views of them
    (an array made from such a view is freed only by the cyclic collector: 185 MB of MiniLM bert2bert stayed)."""
    torch.manual_seed(3)
    transformers.BertGenerationEncoder(transformers.BertGenerationConfig(**TINY)).save_pretrained(tmp_path / "enc")
    enc = str(tmp_path / "enc")
    assert _arrays_left_by(lambda: bg.EncoderDecoderModel.from_encoder_decoder_pretrained(
        enc, enc, scan_layers=scan_layers)) == []


def test_native_checkpoint_of_another_kind_is_rejected(hf_dir, tmp_path):
    bg.EncoderDecoderModel.from_pretrained(hf_dir).save_native(str(tmp_path / "native"))
    with pytest.raises(bg.ConfigError, match="encoder-decoder"):
        bg.BertGenerationEncoder.from_pretrained(str(tmp_path / "native"))


def test_unrolled_model_saves_the_same_checkpoint(hf_dir, tmp_path):
    bg.EncoderDecoderModel.from_pretrained(hf_dir, scan_layers=False).save_pretrained(str(tmp_path / "out"))
    before, after = checkpoints.load_state_dict(hf_dir), checkpoints.load_state_dict(str(tmp_path / "out"))
    assert all(np.array_equal(after[k], v) for k, v in before.items())


def test_bfloat16_checkpoint_is_read_and_cast_to_float32_params(hf_dir, tmp_path):
    state = checkpoints.load_state_dict(hf_dir)
    os.makedirs(tmp_path / "bf16")
    checkpoints.write_safetensors(str(tmp_path / "bf16" / "model.safetensors"),
                                  {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()})
    (tmp_path / "bf16" / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    ref = transformers.EncoderDecoderModel.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32)
    ours = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "bf16"))
    assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(ours.params))
    src, tgt = _inputs()
    with torch.no_grad():
        want = ref.eval()(input_ids=torch.tensor(src), decoder_input_ids=torch.tensor(tgt)).logits
    assert np.abs(np.asarray(ours(src, decoder_input_ids=tgt).logits) - want.numpy()).max() <= 1e-5


def test_a_failed_save_leaves_no_output_directory(hf_dir, tmp_path, monkeypatch):
    model = bg.EncoderDecoderModel.from_pretrained(hf_dir)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_safetensors_writer_round_trips_every_dtype(tmp_path):
    tensors = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "f16": np.ones(3, np.float16),
               "bf16": np.array([1.5, -2.0], ml_dtypes.bfloat16), "i64": np.array([1, 2], np.int64)}
    checkpoints.write_safetensors(str(tmp_path / "x.safetensors"), tensors)
    back = checkpoints.read_safetensors(str(tmp_path / "x.safetensors"))
    assert all(back[k].dtype == v.dtype and np.array_equal(back[k], v) for k, v in tensors.items())
    from safetensors.numpy import load_file
    assert np.array_equal(load_file(str(tmp_path / "x.safetensors"))["f32"], tensors["f32"])


def test_writing_and_reading_safetensors_build_no_whole_file_buffer(tmp_path):
    """The writer streams each tensor to the file and the reader fills each array straight from it, so neither
    holds a second copy of the weights."""
    rng = np.random.default_rng(0)
    tensors = {f"w{i}": rng.standard_normal((512, 1024), np.float32) for i in range(8)}  # 16 MiB
    size = sum(a.nbytes for a in tensors.values())
    path = str(tmp_path / "x.safetensors")
    _, written = traced_peak(lambda: checkpoints.write_safetensors(path, tensors))
    back, read = traced_peak(lambda: checkpoints.read_safetensors(path))
    assert all(np.array_equal(back[k], v) for k, v in tensors.items())
    assert written < 0.1 * size, written
    assert read < 1.1 * size, read


def test_mapped_reading_gives_the_arrays_of_reading(tmp_path):
    tensors = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "bf16": np.array([1.5, -2.0], ml_dtypes.bfloat16),
               "empty": np.zeros((0, 4), np.float32), "scalar": np.array(3, np.int64)}
    path = str(tmp_path / "x.safetensors")
    checkpoints.write_safetensors(path, tensors)
    mapped = checkpoints.read_safetensors(path, mapped=True)
    assert all(mapped[k].dtype == v.dtype and mapped[k].shape == v.shape and np.array_equal(mapped[k], v)
               for k, v in tensors.items())


def test_mapped_reading_holds_one_file_descriptor_however_many_tensors(tmp_path):
    """One map per file: a checkpoint of thousands of tensors must not run into the open-files limit."""
    path = str(tmp_path / "many.safetensors")
    checkpoints.write_safetensors(path, {f"t{i}": np.full(3, i, np.float32) for i in range(3000)})
    before = len(os.listdir("/proc/self/fd"))
    mapped = checkpoints.read_safetensors(path, mapped=True)
    assert len(os.listdir("/proc/self/fd")) - before <= 1
    assert all(mapped[f"t{i}"][0] == i for i in (0, 1234, 2999))


def test_a_loaded_model_keeps_its_weights_when_the_file_is_overwritten_in_place(hf_dir, tmp_path):
    """Loading maps the file, but the parameters are copies: writing over the file afterwards changes nothing."""
    import shutil
    shutil.copytree(hf_dir, tmp_path / "m")
    model = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "m"))
    before = jax.tree_util.tree_map(np.array, model.params)
    path = tmp_path / "m" / checkpoints.SAFE_WEIGHTS
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        (header_len,) = np.frombuffer(f.read(8), "<u8")
        f.seek(8 + int(header_len))
        f.write(b"\x7f" * (size - 8 - int(header_len)))  # every weight becomes a NaN
    after = jax.tree_util.tree_map(np.array, model.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                   jax.tree_util.tree_leaves(after)))


def test_loading_a_checkpoint_holds_about_one_host_copy_of_the_weights(tmp_path):
    """Reading, renaming and stacking the layers drop each checkpoint array once it is stacked: the host never
    holds the file's arrays and the stacked tree whole at the same time."""
    size = wide_checkpoint(tmp_path / "wide")
    model, peak = traced_peak(lambda: bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "wide")))
    assert bg.quantization.param_bytes(model.params) > 0.95 * size
    assert peak < 1.5 * size, (peak, size)  # 2.1x before (the file's arrays and the stacked tree together)


def test_tied_warm_start_has_one_shared_tree_and_the_encoder_equals_the_checkpoint(tmp_path):
    torch.manual_seed(7)
    ref = transformers.BertGenerationEncoder(transformers.BertGenerationConfig(**TINY))
    perturb_(ref, 7)
    ref.eval().save_pretrained(tmp_path / "enc")
    model = bg.EncoderDecoderModel.from_encoder_decoder_pretrained(str(tmp_path / "enc"), str(tmp_path / "enc"),
                                                                   tie_encoder_decoder=True)
    assert set(model.params) == {"decoder"} and model.config.tie_encoder_decoder
    assert any(k.startswith("decoder.bert.encoder.layer.0.crossattention") for k in model.load_report.initialised)
    src = np.random.default_rng(0).integers(3, 99, (2, 7))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(src)).last_hidden_state
    got = model.encode(src).last_hidden_state
    assert np.abs(np.asarray(got) - want.numpy()).max() <= 1e-5


@pytest.mark.parametrize("scan_layers", [True, False], ids=["stacked", "unrolled"])
def test_saving_holds_one_tensor_at_a_time_not_a_copy_of_the_model(tmp_path, scan_layers):
    """save_pretrained cuts each PyTorch tensor from the parameters as it is written (stacked or unrolled
    layers alike): the host never holds the whole state dict. Before, it built it whole first (1.02x)."""
    size = wide_checkpoint(tmp_path / "wide")
    model = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "wide"), scan_layers=scan_layers)
    _, peak = traced_peak(lambda: model.save_pretrained(str(tmp_path / "out")))
    assert peak < 0.1 * size, (peak, size)
    source = checkpoints.read_safetensors(str(tmp_path / "wide" / checkpoints.SAFE_WEIGHTS))
    saved = checkpoints.read_safetensors(str(tmp_path / "out" / checkpoints.SAFE_WEIGHTS))
    assert set(source) <= set(saved), set(source) - set(saved)
    assert all(saved[k].dtype == v.dtype and np.array_equal(saved[k], v) for k, v in source.items())


def test_a_lazy_tensor_that_makes_other_than_it_promised_is_an_error_and_leaves_no_file(tmp_path):
    wrong = checkpoints.LazyTensor((2, 3), np.dtype(np.float32), lambda: np.zeros((3, 2), np.float32))
    path = tmp_path / "x.safetensors"
    with pytest.raises(checkpoints.CheckpointError, match=r"promised float32\[2, 3\] and made float32\[3, 2\]"):
        checkpoints.write_safetensors(str(path), {"ok": np.ones(4, np.float32), "wrong": wrong})
    assert not path.exists() and not list(tmp_path.iterdir())


def _torch_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def _odd_state_dict() -> dict:
    """Every case a torch zip file can hold for a state dict: dtypes, views (transposed, sliced), a storage shared
    by several tensors, scalars, empty tensors, a Parameter, OrderedDict metadata."""
    import collections
    base = torch.arange(12.0).reshape(3, 4)
    lin = torch.nn.Linear(3, 2)
    state = collections.OrderedDict(
        f32=base, transposed=base.T, sliced=base[1:, 2:], shared=base, scalar=torch.tensor(3),
        empty=torch.zeros(0, 4), bf16=base.bfloat16(), f16=base.half(), f64=base.double(),
        bools=torch.tensor([True, False]), i64=torch.arange(5), i32=torch.arange(3, dtype=torch.int32),
        i8=torch.tensor([-1, 2], dtype=torch.int8), u8=torch.tensor([255, 1], dtype=torch.uint8),
        parameter=lin.weight)
    state._metadata = {"": {"version": 1}}
    return state


@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
def test_pytorch_zip_files_are_read_as_torch_load_reads_them(tmp_path, mapped):
    state = _odd_state_dict()
    torch.save(state, tmp_path / "odd.bin")
    got = checkpoints.read_torch_bin(str(tmp_path / "odd.bin"), mapped=mapped)
    want = torch.load(tmp_path / "odd.bin", weights_only=True)
    assert list(got) == list(want)
    for k, v in want.items():
        w = _torch_numpy(v)
        assert got[k].dtype == w.dtype and got[k].shape == w.shape and np.array_equal(got[k], w), k
    assert mapped or all(v.flags.writeable for v in got.values())


def _bin_copy(hf_dir, path) -> None:
    """``hf_dir`` again at ``path``, its weights as a pytorch_model.bin (torch's zip layout)."""
    os.makedirs(path)
    torch.save(torch_state_dict(hf_dir), path / checkpoints.TORCH_WEIGHTS)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(hf_dir, name), path / name)


def test_pytorch_zip_files_are_read_without_importing_torch(hf_dir, tmp_path):
    """torch is for conversion and parity only: a pytorch_model.bin (torch's zip layout) loads without it."""
    _bin_copy(hf_dir, tmp_path / "bin")
    code = ("import numpy as np, jax, bertgen_flax as bg\n"
            f"a = bg.EncoderDecoderModel.from_pretrained({str(tmp_path / 'bin')!r})\n"
            f"b = bg.EncoderDecoderModel.from_pretrained({hf_dir!r})\n"
            "same = jax.tree_util.tree_map(lambda x, y: bool(np.array_equal(x, y)), a.params, b.params)\n"
            "print(all(jax.tree_util.tree_leaves(same)))\n")
    proc = run_without_torch(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"


def test_mapped_pytorch_zip_reading_allocates_no_copy_of_the_weights(tmp_path):
    rng = np.random.default_rng(0)
    torch.save({f"w{i}": torch.from_numpy(rng.standard_normal((512, 1024), np.float32)) for i in range(8)},
               tmp_path / "x.bin")
    size = os.path.getsize(tmp_path / "x.bin")
    mapped, peak = traced_peak(lambda: checkpoints.read_torch_bin(str(tmp_path / "x.bin"), mapped=True))
    assert peak < 0.05 * size, (peak, size)
    assert not any(v.flags.writeable for v in mapped.values())


def test_a_model_loaded_from_pytorch_model_bin_keeps_its_weights_when_the_file_is_overwritten(hf_dir, tmp_path):
    import zipfile
    _bin_copy(hf_dir, tmp_path / "bin")
    model = bg.EncoderDecoderModel.from_pretrained(str(tmp_path / "bin"))
    before = [np.array(x) for x in jax.tree_util.tree_leaves(model.params)]
    path = tmp_path / "bin" / checkpoints.TORCH_WEIGHTS
    with zipfile.ZipFile(path) as z:
        regions = [(i.header_offset, i.file_size) for i in z.infolist() if "/data/" in i.filename]
    with open(path, "r+b") as f:
        for offset, size in regions:  # the local header (30 bytes + name + extra) stays; the data becomes NaNs
            f.seek(offset + 26)
            name_len, extra_len = np.frombuffer(f.read(4), "<u2")
            f.seek(offset + 30 + int(name_len) + int(extra_len))
            f.write(b"\x7f" * size)
    after = [np.array(x) for x in jax.tree_util.tree_leaves(model.params)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_mapped_arrays_let_their_file_pages_go_as_soon_as_they_are_dropped(tmp_path, fmt):
    """The pages of a mapped tensor are handed back when its last array goes, without waiting for the cyclic
    garbage collector: nothing the reader leaves behind may keep the arrays' buffers alive (a reference cycle
    that held every storage kept a whole L-24 .bin resident: 4.5 GB after an int8 load instead of 1.3)."""
    import gc
    import weakref
    tensors = {f"w{i}": np.full((64, 64), i, np.float32) for i in range(4)}
    path = str(tmp_path / f"x.{fmt}")
    if fmt == "bin":
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
    else:
        checkpoints.write_safetensors(path, tensors)
    read = checkpoints.read_torch_bin if fmt == "bin" else checkpoints.read_safetensors

    def buffer_owner(a: np.ndarray) -> np.ndarray:
        """The last array down the ``base`` chain: the flat one over the map, whose end hands the pages back."""
        owner = a
        while getattr(a, "base", None) is not None:
            a = a.base
            owner = a if isinstance(a, np.ndarray) else owner
        return owner

    gc.collect()
    gc.disable()
    try:
        state = read(path, mapped=True)
        owners = [weakref.ref(buffer_owner(v)) for v in state.values()]
        assert all(isinstance(r().base.obj, mmap.mmap) for r in owners)  # mapped, not read
        del state
        assert all(r() is None for r in owners)
    finally:
        gc.enable()
