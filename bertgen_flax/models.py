"""User-facing models: (config, module, params) with from_pretrained, save_pretrained and a jitted __call__.

``m.module`` is the pure linen module and ``m.params`` its parameter tree, so everything here is a thin, checked
convenience over ``m.module.apply({'params': m.params}, ...)``.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoints, convert, cpu_kernels, quantization
from .fileio import write_dir_atomically
from .config import (GENERATION_CONFIG_NAME, BertGenerationConfig, ConfigError, EncoderDecoderConfig,
                     load_config, read_json)
from .modeling import (BertGenerationDecoderModule, BertGenerationModule, EncoderDecoderModule, LMOutput, empty_cache,
                       Seq2SeqOutput, StackOutput)

if TYPE_CHECKING:
    from .decoding import GenerationConfig

NATIVE_MARKER = "bertgen_native.json"
NATIVE_PARAMS = "params"
NATIVE_FORMAT_VERSION = 1

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> Any:
    """None -> float32; names or jnp dtypes -> a jnp dtype; anything else is an error."""
    if dtype is None:
        return jnp.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _DTYPES.values()]:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return dtype


def is_native_checkpoint(path: str) -> bool:
    """Whether ``path`` is a native bertgen checkpoint (it holds the marker file)."""
    return os.path.isfile(os.path.join(path, NATIVE_MARKER))


def _ids(x: Any, name: str, vocab_size: int, max_length: Optional[int] = None) -> Optional[np.ndarray]:
    """Checks token ids on the host: 2-D integers inside the vocabulary and not longer than the positions."""
    if x is None:
        return None
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, length], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr.min() if arr.min() < 0 else arr.max()
        raise ValueError(f"{name} holds id {int(bad)}, outside the vocabulary [0, {vocab_size})")
    if max_length is not None and arr.shape[1] > max_length:
        raise ValueError(f"{name} has length {arr.shape[1]}, longer than max_position_embeddings={max_length}")
    return arr.astype(np.int32)


def _mask(x: Any, name: str, shape: tuple[int, ...]) -> Optional[np.ndarray]:
    if x is None:
        return None
    arr = np.asarray(x)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape}, expected {tuple(shape)}")
    return arr


def _labels(x: Any, vocab_size: int, shape: Optional[tuple[int, ...]]) -> Optional[np.ndarray]:
    """Checks labels: 2-D integers, ids in the vocabulary or -100 (ignored), the inputs' shape when given."""
    if x is None:
        return None
    arr = np.asarray(x)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be 2-D integer ids [batch, length], got shape {arr.shape} dtype {arr.dtype}")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"labels have shape {arr.shape}, expected the inputs' shape {tuple(shape)}")
    bad = arr[(arr != -100) & ((arr < 0) | (arr >= vocab_size))]
    if bad.size:
        raise ValueError(f"labels hold id {int(bad[0])}, outside the vocabulary [0, {vocab_size}) and not -100")
    return arr.astype(np.int32)


class PretrainedModel:
    """Shared machinery: config + linen module + params, checkpoint I/O, jitted calls."""

    kind: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any, params: Optional[Mapping] = None, *, dtype: Any = None,
                 param_dtype: Any = None, scan_layers: bool = True, seed: int = 0,
                 generation_config: Optional[Mapping] = None) -> None:
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                              f"got {type(config).__name__}")
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.param_dtype = resolve_dtype(param_dtype)
        self.scan_layers = scan_layers
        self.module = self._make_module(scan_layers)
        self.generation_config = dict(generation_config or {})
        self.quantization: Optional[str] = None  # "int8" / "int4" once ``quantize`` has run
        self._jitted: dict = {}
        self._packed = cpu_kernels.PackedWeights()  # generate's packed weights on the CPU (see ``params``)
        self.params = self.init_params(jax.random.PRNGKey(seed)) if params is None else params

    @property
    def params(self) -> Any:
        """The parameter tree. Assigning a new tree drops what was derived from the old one (the weights packed
        for the CPU kernels); a tree edited in place is noticed too, on the next generate call."""
        return self._params

    @params.setter
    def params(self, value: Any) -> None:
        self._params = value
        self._packed.clear()

    # ---- construction -------------------------------------------------------------------------------------
    def _make_module(self, scan_layers: bool):
        raise NotImplementedError

    def _init_args(self) -> tuple[tuple, dict]:
        """Dummy inputs that touch every parameter (cross-attention included)."""
        raise NotImplementedError

    def _init_fn(self, module: Any) -> Callable[[jax.Array], dict]:
        args, kwargs = self._init_args()
        return lambda rng: module.init(rng, *args, **kwargs)["params"]

    def init_params(self, rng: jax.Array) -> dict:
        """Fresh random parameters (transformers' initialisation: normal(initializer_range), zero biases)."""
        return jax.jit(self._init_fn(self.module))(rng)

    def _expected_shapes(self) -> Mapping:
        """Shapes of the canonical (stacked) tree, without computing anything."""
        return jax.eval_shape(self._init_fn(self._make_module(True)), jax.random.PRNGKey(0))

    def _canonical_init(self, rng: jax.Array) -> dict:
        return jax.jit(self._init_fn(self._make_module(True)))(rng)

    def quantize(self, mode: str, group_size: int = quantization.DEFAULT_GROUP_SIZE) -> "PretrainedModel":
        """A copy of this model with weight-only ``int8`` or ``int4`` matrices, for inference (see quantization.py).

        The copy shares config and generation defaults; the float params are not kept. Quantized models generate
        and run forward passes but cannot be saved or trained: quantize a float model after loading it instead.
        """
        if self.quantization is not None:
            raise ValueError(f"this model is already quantized ({self.quantization})")
        model = type(self)(self.config, params={}, dtype=self.dtype, param_dtype=self.param_dtype,
                           scan_layers=self.scan_layers, generation_config=self.generation_config)
        model.params = quantization.quantize_params(self.params, mode, group_size)
        model.quantization = mode
        return model

    def _refuse_if_quantized(self, what: str) -> None:
        if self.quantization is not None:
            raise ValueError(f"cannot {what} a model quantized to {self.quantization}: its weights are rounded "
                             "approximations; save or train the float model it was quantized from")

    def canonical_params(self) -> dict:
        """Parameters with layers stacked on a leading axis (the checkpoint form), as numpy arrays."""
        self._refuse_if_quantized("export the parameters of")
        return jax.tree_util.tree_map(convert.host_array, self._stacked_params())

    def _stacked_params(self) -> dict:
        """The params with layers stacked (the checkpoint form) as jax arrays on their device. For use inside the
        library instead of ``canonical_params``: a jax array made from a numpy view of another (``jnp.asarray``
        aliases it) is freed only by the cyclic garbage collector, so views handed back to the device would keep
        a second model's weights alive."""
        return dict(self.params) if self.scan_layers else convert.stack_layers(self.params, stack=jnp.stack)

    def _from_canonical(self, tree: dict) -> dict:
        """The canonical (stacked, host) tree as device arrays in this model's layout. ``tree`` is emptied on the
        way: each host array is dropped once it is on the device, so loading holds one copy of the weights plus
        the largest array, not two copies (or three, unstacked)."""
        return _to_device(tree, self.param_dtype, unstack=not self.scan_layers)

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def _read_config(cls, path: str, overrides: Mapping[str, Any]) -> Any:
        config = load_config(path)
        if not isinstance(config, cls.config_class):
            raise ConfigError(f"{path} holds a {type(config).__name__} ({config.model_type}); "
                              f"{cls.__name__} needs a {cls.config_class.__name__}")
        return config.replace(**overrides) if overrides else config

    @classmethod
    def from_pretrained(cls, path: str, dtype: Any = None, *, param_dtype: Any = None, scan_layers: bool = True,
                        fold_token_type_embeddings: Optional[bool] = None, verbose: bool = False,
                        quantize: Optional[str] = None, **config_overrides: Any):
        """Loads an HF directory (config.json + safetensors/.bin/shards) or a native bertgen checkpoint.

        ``fold_token_type_embeddings``: for BERT checkpoints, add the type-0 token-type row to the position
        embeddings so the encoder computes what ``BertModel`` computed (transformers drops it: default False);
        RoBERTa checkpoints fold by default. ``quantize``: ``"int8"`` or ``"int4"`` returns the weight-only
        quantized model (``PretrainedModel.quantize``). ``config_overrides`` replace config fields (e.g.
        ``is_decoder``).
        """
        if quantize is None:
            return cls._load(path, dtype, param_dtype, scan_layers, fold_token_type_embeddings, verbose,
                             config_overrides)
        quantization.check_mode(quantize)
        # The float weights live (and are quantized) in host memory: only the quantized ones reach the device.
        with jax.default_device(jax.devices("cpu")[0]):
            model = cls._load(path, dtype, param_dtype, scan_layers, fold_token_type_embeddings, verbose,
                              config_overrides, quantize)
        model.params = jax.device_put(model.params, jax.devices()[0])
        return model

    @classmethod
    def _load(cls, path: str, dtype: Any, param_dtype: Any, scan_layers: bool,
              fold_token_type_embeddings: Optional[bool], verbose: bool, config_overrides: Mapping[str, Any],
              quantize: Optional[str] = None):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        if is_native_checkpoint(path):
            model = cls._from_native(path, dtype, param_dtype, scan_layers, config_overrides)
            return model.quantize(quantize) if quantize else model
        config = cls._prepare_config(cls._read_config(path, config_overrides))
        # Mapped, not read: the conversion drops each file array once its leaf is built (stacked, cast, and with
        # ``quantize`` quantized), so the whole float model is never in memory at once, nor twice.
        state = checkpoints.load_state_dict(path, mapped=True)
        model = cls(config, params={}, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                    generation_config=_read_generation_config(path))
        transform = None
        if quantize:
            def transform(flax_path: tuple[str, ...], value: np.ndarray) -> dict:
                return quantization.quantize_leaf(flax_path, jnp.asarray(value, model.param_dtype), quantize)
        tree, report = convert.torch_to_flax(state, cls.kind, config, model._expected_shapes(),
                                             init_params=lambda: model._canonical_init(jax.random.PRNGKey(0)),
                                             fold_token_type_embeddings=fold_token_type_embeddings, release=True,
                                             transform=transform)
        model.params = model._from_canonical(tree)
        model.quantization = quantize
        model.load_report = report
        if verbose:
            print(report.summary())
        return model

    @classmethod
    def _prepare_config(cls, config: Any) -> Any:
        return config

    @classmethod
    def _from_native(cls, path: str, dtype: Any, param_dtype: Any, scan_layers: bool,
                     overrides: Mapping[str, Any]):
        meta = read_json(os.path.join(path, NATIVE_MARKER), "native checkpoint marker")
        if meta.get("kind") != cls.kind:
            raise ConfigError(f"{path} is a native {meta.get('kind')!r} checkpoint; {cls.__name__} loads "
                              f"{cls.kind!r} checkpoints")
        config = cls._read_config(path, overrides)
        model = cls(config, params={}, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                    generation_config=_read_generation_config(path))
        tree = restore_native_params(os.path.join(path, NATIVE_PARAMS), model._expected_shapes())
        model.load_report = convert.Report(mapped=["/".join(k) for k in convert.flatten(tree)])
        model.params = model._from_canonical(tree)
        return model

    # ---- saving -------------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str) -> None:
        """Writes an HF directory (config.json, model.safetensors, generation_config.json) transformers loads.

        The tensors are cut from the parameters one at a time as they are written (``flax_to_torch(lazy=True)``),
        so saving needs about one layer's matrix of host memory beyond the model, not a copy of it."""
        self._refuse_if_quantized("save")
        state = convert.flax_to_torch(self.params, self.kind, self.config, lazy=True)

        def write(tmp: str) -> None:
            checkpoints.write_safetensors(os.path.join(tmp, checkpoints.SAFE_WEIGHTS), state)
            self._config_for_saving().save_pretrained(tmp)
            gen = self._generation_config_for_saving()
            if gen:
                with open(os.path.join(tmp, GENERATION_CONFIG_NAME), "w", encoding="utf-8") as f:
                    json.dump(gen, f, indent=2, sort_keys=True)

        write_dir_atomically(out_dir, write)

    def save_native(self, out_dir: str) -> None:
        """Writes a native checkpoint: config.json, the marker file and an orbax tree of stacked params.

        The model's own (device) arrays are written, stacked on the device first when its layers are unrolled: no
        host copy of the whole model is made (saving L-24 peaked at 2.5x the model's size with one)."""
        self._refuse_if_quantized("save")
        tree = self._stacked_params()

        def write(tmp: str) -> None:
            save_native_params(os.path.join(tmp, NATIVE_PARAMS), tree)
            self.config.save_pretrained(tmp)
            gen = self._generation_config_for_saving()
            if gen:
                with open(os.path.join(tmp, GENERATION_CONFIG_NAME), "w", encoding="utf-8") as f:
                    json.dump(gen, f, indent=2, sort_keys=True)
            with open(os.path.join(tmp, NATIVE_MARKER), "w", encoding="utf-8") as f:
                json.dump({"format": "bertgen-flax", "version": NATIVE_FORMAT_VERSION, "kind": self.kind,
                           "layers": "stacked"}, f, indent=2)

        write_dir_atomically(out_dir, write)

    def _config_for_saving(self) -> Any:
        return self.config

    def _generation_config_for_saving(self) -> dict:
        gen = dict(self.generation_config)
        cfg = self.config
        for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(cfg, key, None)
            if value is not None:
                gen.setdefault(key, value)
        return gen if self.kind != convert.ENCODER else {}

    # ---- generation defaults --------------------------------------------------------------------------------
    def generation_defaults(self) -> "GenerationConfig":
        """Defaults for ``generate``: ``generation_config.json``, else legacy keys of config.json, plus ids."""
        from .decoding import GenerationConfig
        cfg = self.config
        ids = {}
        for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(cfg, key, None)
            if value is None and isinstance(cfg, EncoderDecoderConfig):
                value = getattr(cfg.decoder, key, None) if key != "decoder_start_token_id" else None
            if value is not None:
                ids[key] = value
        legacy = {k: v for k, v in getattr(cfg, "extra", {}).items()}
        return GenerationConfig.from_dict({**legacy, **ids, **self.generation_config})

    def _params_for(self, mesh: Optional[jax.sharding.Mesh]) -> Any:
        """The params, placed on ``mesh`` once per mesh (cached) when one is given."""
        if mesh is None:
            return self.params
        cached = getattr(self, "_sharded", None)
        if cached is None or cached[0] is not mesh or cached[1] is not self.params:
            from .generation import shard_params
            self._sharded = (mesh, self.params, shard_params(self.params, mesh))
        return self._sharded[2]

    # ---- calling ------------------------------------------------------------------------------------------
    def _apply(self, method: str, args: tuple, kwargs: Mapping[str, Any], static: Mapping[str, Any],
               train: bool, dropout_rng: Optional[jax.Array], cache: Optional[Mapping] = None):
        """Runs ``module.<method>`` under a jit cached per static flags."""
        if train and dropout_rng is None:
            raise ValueError("train=True needs dropout_rng (a jax.random key): dropout never draws hidden "
                             "randomness")
        key = (method, tuple(sorted(static.items())), train, cache is not None)
        fn = self._jitted.get(key)
        if fn is None:
            module = self.module

            def run(params, cache, rng, args, kwargs):
                variables = {"params": params}
                if cache is not None:
                    variables["cache"] = cache
                rngs = {"dropout": rng} if train else None
                return module.apply(variables, *args, **kwargs, **static, deterministic=not train,
                                    method=getattr(type(module), method), rngs=rngs,
                                    mutable=["cache"] if cache is not None else False)

            fn = self._jitted[key] = jax.jit(run)
        return fn(self.params, cache, dropout_rng, args, dict(kwargs))

    def __repr__(self) -> str:
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))
        quant = f", weights {self.quantization}" if self.quantization else ""
        return f"{type(self).__name__}({n:,} parameters, dtype={jnp.dtype(self.dtype).name}{quant})"


def _to_device(tree: dict, dtype: Any, unstack: bool) -> dict:
    """Moves ``tree``'s leaves to the device one at a time, popping each from ``tree``; with ``unstack``, stacked
    ``layer`` subtrees become ``layer_0 .. layer_{L-1}`` (sliced on the host, where slices are views). Float leaves
    are cast to ``dtype``, except quantized weights' scales, which stay float32 (integer leaves keep theirs)."""
    def cast(name: str, value: Any) -> jax.Array:
        keep = name == "qscale" or not jnp.issubdtype(value.dtype, jnp.floating)
        return jnp.asarray(value, None if keep else dtype)

    out: dict = {}
    for key in list(tree):
        value = tree.pop(key)
        if not isinstance(value, Mapping):
            out[key] = cast(key, value)
        elif unstack and key == "layer":
            value = dict(value)
            for path in list(convert.flatten(value)):
                stacked = convert.pop_path(value, path)
                for i in range(stacked.shape[0]):
                    convert.set_path(out.setdefault(f"layer_{i}", {}), path, cast(path[-1], stacked[i]))
                del stacked
        else:
            out[key] = _to_device(value if isinstance(value, dict) else dict(value), dtype, unstack)
        del value
    return out


def _read_generation_config(path: str) -> dict:
    file = os.path.join(path, GENERATION_CONFIG_NAME)
    return read_json(file, "generation config") if os.path.isfile(file) else {}


def save_native_params(path: str, tree: Mapping) -> None:
    """Stacked params (jax or numpy arrays) -> an orbax checkpoint directory at ``path`` (which must not exist).

    Written synchronously with at most 1 GB in flight: orbax's asynchronous checkpointer first copies every array
    it is given (it must not change while written), and tensorstore then holds up to 96 GB of writes at once by
    default. At L-24 (3.2 GB) that peaked 5.6 GB above the loaded model; this way 0.8 GB, in a third of the time."""
    import orbax.checkpoint as ocp
    with ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=1)) as ckptr:
        ckptr.save(os.path.abspath(path), args=ocp.args.StandardSave(dict(tree)))


def restore_native_params(path: str, expected: Mapping) -> dict:
    """Restores stacked params (jax arrays), checking every path and shape against the config's.

    The arrays orbax made are returned as they are: numpy views of them (what this returned before) kept them
    alive through a reference cycle, so a model's float weights outlived it until the cyclic garbage collector
    ran (an L-24 native checkpoint loaded with ``quantize="int8"`` kept 4.2 GB resident instead of 1.5)."""
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise checkpoints.CheckpointError(f"native checkpoint is missing its params directory: {path}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(path)
            tree_meta = getattr(meta, "item_metadata", meta)
            got = {k: tuple(v.shape) for k, v in convert.flatten(dict(tree_meta)).items()}
            want = {k: tuple(v.shape) for k, v in convert.flatten(dict(expected)).items()}
            if got != want:
                diff = sorted(set(got.items()) ^ set(want.items()))[:10]
                raise convert.ConversionError(f"native params at {path} do not fit the config: differing "
                                              f"(path, shape) entries {diff}")
            target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32), expected)
            restored = ckptr.restore(path, target)
    except (convert.ConversionError, checkpoints.CheckpointError):
        raise
    except Exception as e:
        raise checkpoints.CheckpointError(f"cannot restore native params from {path}: {type(e).__name__}: {e}"
                                          ) from None
    return dict(restored)


class BertGenerationEncoder(PretrainedModel):
    """transformers' ``BertGenerationEncoder``: ``enc(ids, attention_mask=mask).last_hidden_state``."""

    kind = convert.ENCODER
    config_class = BertGenerationConfig

    def _make_module(self, scan_layers: bool):
        return BertGenerationModule(self.config, scan_layers=scan_layers, dtype=self.dtype,
                                    param_dtype=self.param_dtype)

    def _init_args(self):
        return (jnp.zeros((1, 2), jnp.int32),), {}

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                 head_mask: Any = None, inputs_embeds: Any = None, *, output_attentions: bool = False,
                 output_hidden_states: bool = False, train: bool = False,
                 dropout_rng: Optional[jax.Array] = None) -> StackOutput:
        cfg = self.config
        ids = _ids(input_ids, "input_ids", cfg.vocab_size, cfg.max_position_embeddings)
        shape = ids.shape if ids is not None else np.shape(inputs_embeds)[:2]
        if inputs_embeds is not None and np.shape(inputs_embeds)[1] > cfg.max_position_embeddings:
            raise ValueError(f"inputs_embeds has length {shape[1]}, longer than max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        return self._apply("__call__", (ids, _mask(attention_mask, "attention_mask", shape), position_ids,
                                        head_mask, inputs_embeds), {},
                           dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states),
                           train, dropout_rng)


class BertGenerationDecoder(PretrainedModel):
    """transformers' ``BertGenerationDecoder``: a causal LM, with cross-attention when configured.

    Loading a checkpoint whose config lacks ``is_decoder`` (BERT, an encoder) sets it, as a decoder needs it.
    """

    kind = convert.DECODER
    config_class = BertGenerationConfig

    @classmethod
    def _prepare_config(cls, config: BertGenerationConfig) -> BertGenerationConfig:
        return config if config.is_decoder else config.replace(is_decoder=True)

    def _make_module(self, scan_layers: bool):
        return BertGenerationDecoderModule(self.config, scan_layers=scan_layers, dtype=self.dtype,
                                           param_dtype=self.param_dtype)

    def _init_args(self):
        enc = None
        if self.config.add_cross_attention:
            enc = jnp.zeros((1, 2, self.config.hidden_size), self.dtype)
        return (jnp.zeros((1, 2), jnp.int32),), {"encoder_hidden_states": enc}

    def init_cache(self, batch_size: int, max_length: int, encoder_length: Optional[int] = None) -> dict:
        """An empty cache: self K/V preallocated to ``max_length``; cross K/V for ``encoder_length`` sources."""
        if max_length > self.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        enc = None
        if encoder_length is not None:
            enc = jnp.zeros((batch_size, encoder_length, self.config.hidden_size), self.dtype)
        return empty_cache(self.module, (batch_size, max_length), encoder_hidden_states=enc)

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                 head_mask: Any = None, inputs_embeds: Any = None, encoder_hidden_states: Any = None,
                 encoder_attention_mask: Any = None, labels: Any = None, *, past_key_values: Optional[dict] = None,
                 use_cache: bool = False, max_cache_length: Optional[int] = None, output_attentions: bool = False,
                 output_hidden_states: bool = False, train: bool = False,
                 dropout_rng: Optional[jax.Array] = None) -> LMOutput:
        """Logits (and the shifted causal-LM loss with ``labels``).

        With ``past_key_values`` (from ``init_cache`` or a previous call) or ``use_cache=True`` the call runs
        against the key/value cache and returns the updated one in ``.past_key_values``; ``attention_mask``
        then covers the whole cache length (shorter masks are right-padded).
        """
        cfg = self.config
        ids = _ids(input_ids, "input_ids", cfg.vocab_size, cfg.max_position_embeddings)
        shape = ids.shape if ids is not None else np.shape(inputs_embeds)[:2]
        if use_cache and past_key_values is None:
            enc_len = None if encoder_hidden_states is None else np.shape(encoder_hidden_states)[1]
            past_key_values = self.init_cache(shape[0], max_cache_length or cfg.max_position_embeddings, enc_len)
        if past_key_values is not None:
            cache_len = _cache_length(past_key_values)
            if attention_mask is not None:
                attention_mask = np.asarray(attention_mask)
                if attention_mask.shape[1] > cache_len:
                    raise ValueError(f"attention_mask has length {attention_mask.shape[1]}, longer than the cache "
                                     f"({cache_len})")
                attention_mask = np.pad(attention_mask, ((0, 0), (0, cache_len - attention_mask.shape[1])))
            mask = attention_mask
        else:
            mask = _mask(attention_mask, "attention_mask", shape)
        if encoder_hidden_states is not None:
            encoder_attention_mask = _mask(encoder_attention_mask, "encoder_attention_mask",
                                           np.shape(encoder_hidden_states)[:2])
        labels = _labels(labels, cfg.vocab_size, shape)
        result = self._apply(
            "__call__", (ids, mask, position_ids, head_mask, inputs_embeds, encoder_hidden_states,
                         encoder_attention_mask, labels), {},
            dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                 decode=past_key_values is not None), train, dropout_rng, cache=past_key_values)
        if past_key_values is None:
            return result
        out, variables = result
        return out.replace(past_key_values=variables["cache"])


    def generate(self, input_ids: Any, attention_mask: Any = None, *, seed: Optional[int] = None,
                 rng: Optional[jax.Array] = None, return_scores: bool = False,
                 mesh: Optional[jax.sharding.Mesh] = None, unroll_decoder: bool = True, **knobs: Any):
        """Continues left-padded prompts as a causal LM (``transformers`` ``generate`` semantics).

        Returns sequences [batch * num_return_sequences, length], prompt included, and the sequence scores
        with ``return_scores=True``. Knobs are ``GenerationConfig`` fields; defaults come from the checkpoint.
        ``unroll_decoder=False``: a shorter compile, slower steps (see ``generation.seq2seq_generate``).
        """
        from .generation import causal_generate
        cfg = self.config
        ids = _ids(input_ids, "input_ids", cfg.vocab_size, cfg.max_position_embeddings)
        gen = self.generation_defaults().merged(**knobs)
        return causal_generate(self.module, self._params_for(mesh), ids, attention_mask, gen, rng=rng, seed=seed,
                               return_scores=return_scores, max_positions=cfg.max_position_embeddings, mesh=mesh,
                               unroll_decoder=unroll_decoder)


def _cache_length(cache: Mapping) -> int:
    for path, leaf in convert.flatten(cache).items():
        if path[-1] == "cached_key":
            return leaf.shape[-2]  # [..., B, N, S_max, D]
    raise ValueError("past_key_values is not a bertgen cache (no cached_key entries)")


def _vocab_ids(directory: str, tokens: tuple[str, ...]) -> dict[str, int]:
    """Ids of ``tokens`` in a ``vocab.txt`` or ``tokenizer.json`` beside a checkpoint (empty when absent)."""
    vocab: dict[str, int] = {}
    txt, tok = os.path.join(directory, "vocab.txt"), os.path.join(directory, "tokenizer.json")
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    elif os.path.isfile(tok):
        model = read_json(tok, "tokenizer").get("model", {})
        vocab = model.get("vocab", {}) if isinstance(model.get("vocab"), dict) else {}
    return {t: vocab[t] for t in tokens if t in vocab}


def _warm_start_ids(path: str, config: BertGenerationConfig) -> dict[str, Any]:
    """Decoder start / pad / eos / bos ids for a bert2bert warm-started from ``path``."""
    if config.extra.get("_source_model_type") == "bert":
        # BERT configs carry no usable bos/eos ids (our defaults 2/1 would be [unused1]/[unused0]).
        found = _vocab_ids(path, ("[CLS]", "[SEP]", "[PAD]"))
        start, eos = found.get("[CLS]"), found.get("[SEP]")
        pad = found.get("[PAD]", config.pad_token_id)
        return dict(decoder_start_token_id=start, bos_token_id=start, eos_token_id=eos, pad_token_id=pad)
    return dict(decoder_start_token_id=config.bos_token_id, bos_token_id=config.bos_token_id,
                eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)


class EncoderDecoderModel(PretrainedModel):
    """transformers' ``EncoderDecoderModel`` with BertGeneration encoder and decoder (bert2bert, BERTShare)."""

    kind = convert.ENCODER_DECODER
    config_class = EncoderDecoderConfig

    def _make_module(self, scan_layers: bool):
        return EncoderDecoderModule(self.config, scan_layers=scan_layers, dtype=self.dtype,
                                    param_dtype=self.param_dtype)

    def _init_args(self):
        ids = jnp.zeros((1, 2), jnp.int32)
        return (ids, None, ids), {}

    @classmethod
    def from_encoder_decoder_pretrained(cls, encoder_path: str, decoder_path: str, *,
                                        tie_encoder_decoder: bool = False, dtype: Any = None,
                                        param_dtype: Any = None, scan_layers: bool = True,
                                        fold_token_type_embeddings: Optional[bool] = None, verbose: bool = False,
                                        **config_kwargs: Any) -> "EncoderDecoderModel":
        """Warm-starts a bert2bert (or BERTShare with ``tie_encoder_decoder``) from two checkpoints.

        The decoder gets causal self-attention and freshly initialised cross-attention, as in transformers.
        ``decoder_start_token_id``, ``pad_token_id`` and ``eos_token_id`` default to the checkpoint's own ids:
        ``[CLS]``/``[PAD]``/``[SEP]`` from the vocabulary for BERT (whose configs carry no bos/eos ids), the
        config's ``bos``/``pad``/``eos`` otherwise (transformers leaves them unset, which breaks training: see the
        README). Pass them to override; a checkpoint where they cannot be found is an error.
        """
        enc = None  # a tied encoder runs the decoder's weights: only its config is read
        if not tie_encoder_decoder:
            enc = BertGenerationEncoder.from_pretrained(encoder_path, dtype, param_dtype=param_dtype,
                                                        fold_token_type_embeddings=fold_token_type_embeddings)
        enc_config = enc.config if enc is not None else BertGenerationEncoder._read_config(encoder_path, {})
        dec = BertGenerationDecoder.from_pretrained(decoder_path, dtype, param_dtype=param_dtype,
                                                    fold_token_type_embeddings=fold_token_type_embeddings,
                                                    add_cross_attention=True)
        ids = {**_warm_start_ids(decoder_path, dec.config), **config_kwargs}
        if ids.get("decoder_start_token_id") is None or ids.get("pad_token_id") is None:
            raise ConfigError(
                f"cannot tell the decoder start and pad ids of {decoder_path} (no bos/pad ids in its config and no "
                "[CLS]/[PAD] in a vocab.txt or tokenizer.json beside it): pass decoder_start_token_id=..., "
                "pad_token_id=... and eos_token_id=...")
        token_ids = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if ids.get(k) is not None}
        d = dec.config.replace(**token_ids)
        enc_config = enc_config.replace(**token_ids)
        config = EncoderDecoderConfig.from_encoder_decoder_configs(
            enc_config, d, tie_encoder_decoder=tie_encoder_decoder, **ids)
        model = cls(config, params={}, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
        tree = {"decoder": dec._stacked_params()}
        dr = dec.load_report
        report = convert.Report(mapped=["decoder." + k for k in dr.mapped],
                                dropped=[("decoder." + k, why) for k, why in dr.dropped],
                                initialised=["decoder." + k for k in dr.initialised])
        if not tie_encoder_decoder:
            tree["encoder"] = enc._stacked_params()
            report.mapped += ["encoder." + k for k in enc.load_report.mapped]
            report.dropped += [("encoder." + k, why) for k, why in enc.load_report.dropped]
        else:
            report.dropped.append((encoder_path, "encoder weights: the tied encoder uses the decoder's"))
        if config.needs_projection:
            tree["enc_to_dec_proj"] = model._canonical_init(jax.random.PRNGKey(0))["enc_to_dec_proj"]
            report.initialised.append("enc_to_dec_proj")
        model.params = model._from_canonical(tree)
        model.load_report = report
        if verbose:
            print(report.summary())
        return model

    def init_cache(self, batch_size: int, max_length: int, encoder_length: int,
                   encoder_batch_size: Optional[int] = None) -> dict:
        """An empty decoder cache for ``batch_size`` sequences of ``encoder_length`` source tokens.

        With ``encoder_batch_size`` (a divisor of ``batch_size``) the cross K/V hold one copy per source, shared
        by the ``batch_size // encoder_batch_size`` adjacent rows (beams) that decode it.
        """
        dec = self.config.decoder
        if max_length > dec.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds max_position_embeddings={dec.max_position_embeddings}")
        sources = batch_size if encoder_batch_size is None else encoder_batch_size
        if batch_size % sources:
            raise ValueError(f"encoder_batch_size {sources} does not divide batch_size {batch_size}")
        enc = jnp.zeros((sources, encoder_length, self.config.encoder.hidden_size), self.dtype)
        return empty_cache(self.module, (batch_size, max_length), enc, method=EncoderDecoderModule.decode)

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, decoder_input_ids: Any = None,
                 decoder_attention_mask: Any = None, labels: Any = None, *, inputs_embeds: Any = None,
                 decoder_inputs_embeds: Any = None, position_ids: Any = None, decoder_position_ids: Any = None,
                 head_mask: Any = None, decoder_head_mask: Any = None, output_attentions: bool = False,
                 output_hidden_states: bool = False, train: bool = False,
                 dropout_rng: Optional[jax.Array] = None) -> Seq2SeqOutput:
        """Logits for ``decoder_input_ids`` (or for ``labels`` shifted right) and the loss when given labels."""
        enc_cfg, dec_cfg = self.config.encoder, self.config.decoder
        ids = _ids(input_ids, "input_ids", enc_cfg.vocab_size, enc_cfg.max_position_embeddings)
        dec_ids = _ids(decoder_input_ids, "decoder_input_ids", dec_cfg.vocab_size, dec_cfg.max_position_embeddings)
        if labels is not None:
            want = dec_ids.shape if dec_ids is not None else None
            labels = _labels(labels, dec_cfg.vocab_size, want)
            if labels.shape[1] > dec_cfg.max_position_embeddings:
                raise ValueError(f"labels have length {labels.shape[1]}, longer than max_position_embeddings="
                                 f"{dec_cfg.max_position_embeddings}")
        src_shape = ids.shape if ids is not None else np.shape(inputs_embeds)[:2]
        tgt_shape = (dec_ids.shape if dec_ids is not None else np.shape(decoder_inputs_embeds)[:2]
                     if decoder_inputs_embeds is not None else None if labels is None else labels.shape)
        if tgt_shape is None:
            raise ValueError("pass decoder_input_ids, decoder_inputs_embeds or labels")
        return self._apply(
            "__call__", (ids, _mask(attention_mask, "attention_mask", src_shape), dec_ids,
                         _mask(decoder_attention_mask, "decoder_attention_mask", tgt_shape), labels),
            dict(inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds,
                 position_ids=position_ids, decoder_position_ids=decoder_position_ids, head_mask=head_mask,
                 decoder_head_mask=decoder_head_mask),
            dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states),
            train, dropout_rng)

    def generate(self, input_ids: Any, attention_mask: Any = None, *, decoder_input_ids: Any = None,
                 seed: Optional[int] = None, rng: Optional[jax.Array] = None, return_scores: bool = False,
                 mesh: Optional[jax.sharding.Mesh] = None, unroll_decoder: bool = True,
                 packing_buckets: Optional[int] = None, pack_weights: bool = True, **knobs: Any):
        """Batch generation in one compiled program (``transformers`` ``generate`` semantics).

        Returns sequences [batch * num_return_sequences, length] starting with the decoder start token, padded
        after EOS, and the sequence scores with ``return_scores=True``. Knobs are ``GenerationConfig`` fields
        (``max_new_tokens``, ``num_beams``, ``do_sample``, ...); defaults come from the checkpoint. With ``mesh``
        (axes ``data`` and optionally ``model``) the batch and parameters are sharded over its devices.
        ``unroll_decoder=False`` runs the decoder layers as stored: a shorter compile for deep decoders, slower
        steps, the same tokens. On the CPU the encoder runs on the sources' real tokens only (padding skipped),
        their number rounded up to one of ``packing_buckets`` sizes per batch and source bucket (default
        ``generation.PACKING_BUCKETS``, 16, on the CPU and 0 elsewhere; each size compiles once; 0 runs the
        padded batch). There, too, float32 and quantized weights are kept packed for the CPU kernels between calls
        (``cpu_kernels.PackedWeights``: a second copy of the encoder's, the cross-attention keys' and values' and
        the decoder's self-attention projections, of all the decoder's once a call has 9 or more sequences, and
        of a scanned model's decoder unstacked);
        ``pack_weights=False`` drops that copy and packs per call instead (slower, the same tokens).
        """
        from .generation import seq2seq_generate
        enc, dec = self.config.encoder, self.config.decoder
        ids = _ids(input_ids, "input_ids", enc.vocab_size, enc.max_position_embeddings)
        if attention_mask is not None:
            _mask(attention_mask, "attention_mask", ids.shape)
        prompt = _ids(decoder_input_ids, "decoder_input_ids", dec.vocab_size, dec.max_position_embeddings)
        gen = self.generation_defaults().merged(**knobs)
        if not pack_weights:
            self._packed.clear()
        return seq2seq_generate(self.module, self._params_for(mesh), ids, attention_mask, gen,
                                decoder_input_ids=prompt, rng=rng, seed=seed, return_scores=return_scores,
                                max_positions=dec.max_position_embeddings,
                                source_limit=enc.max_position_embeddings, mesh=mesh, unroll_decoder=unroll_decoder,
                                packing_buckets=packing_buckets,
                                packed_weights=self._packed if pack_weights else None)

    def encode(self, input_ids: Any, attention_mask: Any = None) -> StackOutput:
        """Encoder states of the source (``last_hidden_state`` [B, S, H])."""
        cfg = self.config.encoder
        ids = _ids(input_ids, "input_ids", cfg.vocab_size, cfg.max_position_embeddings)
        return self._apply("encode", (ids, _mask(attention_mask, "attention_mask", ids.shape)), {}, {}, False,
                           None)

    def decode(self, decoder_input_ids: Any, encoder_hidden_states: Any = None, encoder_attention_mask: Any = None,
               decoder_attention_mask: Any = None, *, past_key_values: Optional[dict] = None,
               decoder_position_ids: Any = None) -> LMOutput:
        """Decoder logits given encoder states; with ``past_key_values`` one chunk at a time against the cache
        (the first cached call passes ``encoder_hidden_states`` to fill cross K/V, later calls may pass None)."""
        cfg = self.config.decoder
        ids = _ids(decoder_input_ids, "decoder_input_ids", cfg.vocab_size, cfg.max_position_embeddings)
        if past_key_values is not None and decoder_attention_mask is not None:
            cache_len = _cache_length(past_key_values)
            m = np.asarray(decoder_attention_mask)
            decoder_attention_mask = np.pad(m, ((0, 0), (0, cache_len - m.shape[1])))
        result = self._apply("decode", (ids, encoder_hidden_states, encoder_attention_mask, decoder_attention_mask,
                                        decoder_position_ids), {},
                             dict(decode=past_key_values is not None), False, None, cache=past_key_values)
        if past_key_values is None:
            return result
        out, variables = result
        return out.replace(past_key_values=variables["cache"])
