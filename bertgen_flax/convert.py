"""One table maps PyTorch checkpoint keys to Flax parameter paths; both directions read it.

Flax trees here are canonical: layers stacked on a leading axis under ``.../encoder/layer`` (what ``nn.scan``
uses). ``unstack_layers``/``stack_layers`` switch to and from the unrolled ``layer_{i}`` form, so the mapping is
the same either way. Adapters before the table turn BERT, RoBERTa and shared encoder-decoder files into the
key names the table expects, and record everything they drop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from .config import BertGenerationConfig

LINEAR, NORM, EMBED = "linear", "norm", "embed"
# PyTorch parameter name -> (Flax leaf name, transpose?) for each module type.
_LEAVES = {
    LINEAR: (("weight", "kernel", True), ("bias", "bias", False)),
    NORM: (("weight", "scale", False), ("bias", "bias", False)),
    EMBED: (("weight", "embedding", False),),
}
ENCODER, DECODER, ENCODER_DECODER = "encoder", "decoder", "encoder-decoder"
LAYER = "{i}"


class ConversionError(ValueError):
    """Checkpoint keys or shapes that do not fit the model's config."""


@dataclass(frozen=True)
class Entry:
    """One parameter: its PyTorch key (``{i}`` marks the layer index) and its Flax path in the stacked tree."""
    torch_key: str
    flax_path: tuple[str, ...]
    transpose: bool = False
    initialisable: bool = False  # may be missing from a warm-start checkpoint (cross-attention, heads)

    @property
    def layered(self) -> bool:
        """Whether this entry is per layer (stacked on a leading layer axis)."""
        return LAYER in self.torch_key


@dataclass
class Report:
    """What a conversion did, for logs and the CLI."""
    mapped: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)       # (key, why)
    initialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A readable summary: counts, then what was dropped (with why) and initialised."""
        lines = [f"mapped {len(self.mapped)} tensors"]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)}:")
            lines += [f"  {k}  ({why})" for k, why in self.dropped]
        if self.initialised:
            lines.append(f"initialised {len(self.initialised)} (not in the checkpoint):")
            lines += [f"  {k}" for k in self.initialised]
        return "\n".join(lines)


# ---- the table ------------------------------------------------------------------------------------------------
def _module_entries(torch_module: str, flax_module: tuple[str, ...], kind: str, initialisable: bool = False
                    ) -> list[Entry]:
    return [Entry(f"{torch_module}.{t}", flax_module + (f,), tr, initialisable) for t, f, tr in _LEAVES[kind]]


def _attention_modules(prefix: str, relative: bool) -> list[tuple[str, str]]:
    mods = [(f"{prefix}.self.query", LINEAR), (f"{prefix}.self.key", LINEAR), (f"{prefix}.self.value", LINEAR)]
    if relative:
        mods.append((f"{prefix}.self.distance_embedding", EMBED))
    return mods + [(f"{prefix}.output.dense", LINEAR), (f"{prefix}.output.LayerNorm", NORM)]


def stack_entries(cfg: BertGenerationConfig, torch_prefix: str = "", flax_prefix: tuple[str, ...] = ()
                  ) -> list[Entry]:
    """Embeddings and every layer of one BertGeneration stack (``BertGenerationEncoder`` key names)."""
    modules = [("embeddings.word_embeddings", EMBED), ("embeddings.position_embeddings", EMBED),
               ("embeddings.LayerNorm", NORM)]
    layer = _attention_modules("attention", cfg.position_embedding_type != "absolute")
    cross = _attention_modules("crossattention", False) if cfg.add_cross_attention else []
    layer += [("intermediate.dense", LINEAR), ("output.dense", LINEAR), ("output.LayerNorm", NORM)]
    entries = []
    for name, kind in modules:
        entries += _module_entries(torch_prefix + name, flax_prefix + tuple(name.split(".")), kind)
    for name, kind in layer + cross:
        entries += _module_entries(f"{torch_prefix}encoder.layer.{LAYER}.{name}",
                                   flax_prefix + ("encoder", "layer") + tuple(name.split(".")), kind,
                                   initialisable=name.startswith("crossattention"))
    return entries


def decoder_entries(cfg: BertGenerationConfig, torch_prefix: str = "", flax_prefix: tuple[str, ...] = ()
                    ) -> list[Entry]:
    """``BertGenerationDecoder``: the stack under ``bert.`` plus the LM head."""
    entries = stack_entries(cfg, torch_prefix + "bert.", flax_prefix + ("bert",))
    entries.append(Entry(f"{torch_prefix}lm_head.bias", flax_prefix + ("lm_head", "bias"), initialisable=True))
    if not cfg.tie_word_embeddings:
        entries.append(Entry(f"{torch_prefix}lm_head.decoder.weight", flax_prefix + ("lm_head", "decoder", "kernel"),
                             True, initialisable=True))
    return entries


def model_entries(kind: str, config: Any) -> list[Entry]:
    """The whole table for one model kind."""
    if kind == ENCODER:
        return stack_entries(config)
    if kind == DECODER:
        return decoder_entries(config)
    if kind == ENCODER_DECODER:
        entries = [] if config.tie_encoder_decoder else stack_entries(config.encoder, "encoder.", ("encoder",))
        entries += decoder_entries(config.decoder, "decoder.", ("decoder",))
        if config.needs_projection:
            entries += _module_entries("enc_to_dec_proj", ("enc_to_dec_proj",), LINEAR, initialisable=True)
        return entries
    raise ValueError(f"unknown model kind {kind!r}")


# ---- adapters: other checkpoint families -> the table's key names ---------------------------------------------
_STACK_ROOTS = ("embeddings.", "encoder.")
_HEADS = ("cls.", "pooler.", "qa_outputs.", "classifier.", "lm_head.")


def _stack_prefix(state: Mapping[str, np.ndarray], where: str) -> str:
    for prefix in ("", "bert.", "roberta."):
        if f"{prefix}embeddings.word_embeddings.weight" in state:
            return prefix
    keys = ", ".join(sorted(state)[:6])
    raise ConversionError(f"{where}: no BertGeneration, BERT or RoBERTa weights found (no "
                          f"'embeddings.word_embeddings.weight' with prefix '', 'bert.' or 'roberta.'); "
                          f"first keys: {keys}")


def _adapt_stack(state: dict[str, np.ndarray], cfg: BertGenerationConfig, target_prefix: str, report: Report,
                 source_type: str, fold: Optional[bool], keep_lm_head: bool, where: str = ""
                 ) -> dict[str, np.ndarray]:
    """Renames one stack (+ optional LM head) to ``target_prefix`` names, dropping what BertGeneration lacks.

    ``where`` is the prefix the keys had in the file (``decoder.`` inside an encoder-decoder), for reports.
    """
    prefix = _stack_prefix(state, where.rstrip(".") or "checkpoint")
    drop = lambda key, why: report.dropped.append((where + key, why))
    roberta = prefix == "roberta." or source_type == "roberta"
    if fold is None:
        fold = roberta  # transformers cannot load RoBERTa at all; the exact equivalent folds token types
    out: dict[str, np.ndarray] = {}
    token_types = None
    for key, value in state.items():
        if key.endswith("position_ids"):
            drop(key, "stale position_ids buffer")
            continue
        if key.startswith(prefix) and key[len(prefix):].startswith(_STACK_ROOTS):
            rest = key[len(prefix):]
            if rest == "embeddings.token_type_embeddings.weight":
                token_types = (key, value)
                continue
            if ".crossattention." in rest and not cfg.add_cross_attention:
                drop(key, "cross-attention unused without add_cross_attention")
                continue
            out[target_prefix + rest] = value
        elif key.startswith(prefix + "pooler.") or key.startswith(_HEADS):
            if keep_lm_head and not roberta and key.startswith("lm_head."):
                out[key] = value  # the decoder's own head: lm_head.* keeps its name
            else:
                drop(key, "head not part of BertGeneration")
        else:
            out[key] = value  # left for the caller to report as unexpected
    head_bias = out.pop("lm_head.decoder.bias", None)
    if head_bias is not None:
        # The logits' bias is lm_head.decoder.bias: 4.57 aliases it to lm_head.bias; 5.x unties the two when
        # tie_word_embeddings is false and then never reads lm_head.bias.
        old = out.get("lm_head.bias")
        if old is not None and not np.array_equal(old, head_bias):
            drop("lm_head.bias", "unused: the untied head computes with lm_head.decoder.bias")
        else:
            drop("lm_head.decoder.bias", "alias of lm_head.bias")
        out["lm_head.bias"] = head_bias
    pos_key = target_prefix + "embeddings.position_embeddings.weight"
    if roberta and pos_key in out:
        # RoBERTa positions start at padding_idx + 1; the config read from RoBERTa already shrank P by that.
        offset = max(out[pos_key].shape[0] - cfg.max_position_embeddings, 0)
        out[pos_key] = out[pos_key][offset:]
    if token_types is not None:
        key, value = token_types
        if fold:
            out[pos_key] = (out[pos_key].astype(np.float32) + value[0].astype(np.float32)).astype(out[pos_key].dtype)
            drop(key, "type-0 row folded into position embeddings")
        else:
            drop(key, "token types are not part of BertGeneration (as transformers drops them)")
    return out


def _split(state: Mapping[str, np.ndarray], prefix: str) -> tuple[dict, dict]:
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outside = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return inside, outside


def adapt(state: Mapping[str, np.ndarray], kind: str, config: Any, report: Report,
          fold_token_type_embeddings: Optional[bool] = None) -> dict[str, np.ndarray]:
    """Source checkpoint keys -> the table's keys for ``kind``; drops are recorded in ``report``."""
    state = dict(state)
    if kind in (ENCODER, DECODER):
        source_type = config.extra.get("_source_model_type", "bert-generation")
        target = "" if kind == ENCODER else "bert."
        return _adapt_stack(state, config, target, report, source_type, fold_token_type_embeddings,
                            keep_lm_head=kind == DECODER)
    enc, rest = _split(state, "encoder.")
    dec, rest = _split(rest, "decoder.")
    if not dec:
        raise ConversionError("not an encoder-decoder checkpoint: no 'decoder.*' keys (load it with "
                              "from_encoder_decoder_pretrained to warm-start from separate checkpoints)")
    out = {"decoder." + k: v for k, v in _adapt_stack(dec, config.decoder, "bert.", report, "bert-generation",
                                                      fold_token_type_embeddings, True, "decoder.").items()}
    if config.tie_encoder_decoder:
        for key, value in enc.items():
            twin = out.get("decoder.bert." + key)
            if key.endswith("position_ids"):
                report.dropped.append(("encoder." + key, "stale position_ids buffer"))
            elif twin is None or twin.shape != value.shape or not np.array_equal(twin, value):
                raise ConversionError(
                    f"the config ties encoder and decoder, but the checkpoint's encoder.{key} differs from "
                    f"decoder.bert.{key}: it holds separate weights; load it with tie_encoder_decoder=False")
            else:
                report.dropped.append(("encoder." + key, "copy of the shared decoder weight"))
    elif enc:
        out.update({"encoder." + k: v for k, v in _adapt_stack(
            enc, config.encoder, "", report, "bert-generation", fold_token_type_embeddings, False,
            "encoder.").items()})
    out.update(rest)
    return out


# ---- tree helpers ----------------------------------------------------------------------------------------------
def _get(tree: Mapping, path: Iterable[str]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """``tree[p0][p1]... = value``, creating the dicts on the way."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def pop_path(tree: dict, path: tuple[str, ...]) -> Any:
    """Removes and returns ``tree[p0][p1]...``; dicts left empty on the way are removed too."""
    node = _get(tree, path[:-1])
    value = node.pop(path[-1])
    if not node and len(path) > 1:
        pop_path(tree, path[:-1])
    return value


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """A nested dict as ``{path tuple: leaf}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unstack_layers(tree: Mapping) -> dict:
    """Stacked ``layer`` subtrees -> unrolled ``layer_0 .. layer_{L-1}``."""
    out = {}
    for k, v in tree.items():
        if k == "layer" and isinstance(v, Mapping):
            n = next(iter(flatten(v).values())).shape[0]
            for i in range(n):
                out[f"layer_{i}"] = _map_leaves(v, lambda x, i=i: x[i])
        elif isinstance(v, Mapping):
            out[k] = unstack_layers(v)
        else:
            out[k] = v
    return out


def stack_layers(tree: Mapping, stack: Optional[Callable[[list], Any]] = None) -> dict:
    """Unrolled ``layer_i`` subtrees -> one stacked ``layer`` subtree (the canonical form); ``stack`` joins the
    layers' arrays (default: on the host, ``np.stack``; ``jnp.stack`` keeps jax arrays on their device)."""
    out, layers = {}, {}
    for k, v in tree.items():
        m = re.fullmatch(r"layer_(\d+)", k)
        if m and isinstance(v, Mapping):
            layers[int(m.group(1))] = v
        elif isinstance(v, Mapping):
            out[k] = stack_layers(v, stack)
        else:
            out[k] = v
    if layers:
        ordered = [layers[i] for i in range(len(layers))]
        import jax
        join = stack or (lambda xs: np.stack([np.asarray(x) for x in xs]))
        out["layer"] = jax.tree_util.tree_map(lambda *xs: join(list(xs)), *ordered)
    return out


def _map_leaves(tree: Mapping, fn) -> dict:
    return {k: _map_leaves(v, fn) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


# ---- the two directions ----------------------------------------------------------------------------------------
def torch_to_flax(state: Mapping[str, np.ndarray], kind: str, config: Any, expected: Mapping,
                  init_params: Optional[Callable[[], Mapping]] = None, fold_token_type_embeddings: Optional[bool] = None,
                  release: bool = False, transform: Optional[Callable[[tuple[str, ...], Any], Mapping[str, Any]]] = None
                  ) -> tuple[dict, Report]:
    """A PyTorch state dict -> a canonical (stacked) Flax param tree.

    ``expected`` is the tree of shapes the model's config implies (``jax.eval_shape`` of init). Keys the
    checkpoint lacks are taken from ``init_params()`` (called once, after every check passed) when the table
    marks them initialisable (cross-attention, LM head bias, projection); anything else missing, left over or of
    the wrong shape is an error naming the keys. With ``release``, ``state`` is emptied and each array is dropped
    once its leaf is built, so a caller that hands over its only reference holds about one copy of the weights
    while converting, not two. ``transform(flax_path, array)`` takes each layer's array (or a leaf's one array) and
    returns the leaves that replace it in its subtree, stacked over the layers afterwards (a loader quantizing
    matrix by matrix, which then never holds a whole float leaf).
    """
    report = Report()
    adapted = adapt(state, kind, config, report, fold_token_type_embeddings)
    if release:
        state.clear()
    state = adapted
    tied_head = _tied_head_keys(kind, config)
    params: dict = {}

    def put(path: tuple[str, ...], layers: list, layered: bool) -> None:
        """Sets the leaf at ``path`` from its layers' arrays (stacked when ``layered``), emptying ``layers``: with a
        ``transform`` each layer is transformed before stacking, so one float layer is in memory at a time."""
        if transform is None:
            leaf = np.stack(layers) if layered else layers[0]
            # a read-only leaf is a view of a mapped file: the tree gets a copy, never the map
            set_path(params, path, leaf if leaf.flags.writeable else np.array(leaf))
            layers.clear()
            return
        parts = []
        for i in range(len(layers)):
            parts.append(transform(path, layers[i]))
            layers[i] = None  # that layer's file pages (or array) can go now
        for name in parts[0]:
            leaves = [p[name] for p in parts]
            set_path(params, path[:-1] + (name,), np.stack([np.asarray(x) for x in leaves]) if layered else leaves[0])

    missing, bad_shape, used = [], [], set()
    to_init: list[tuple[Entry, list[Optional[np.ndarray]]]] = []  # filled after every check passed

    for e in model_entries(kind, config):
        want = tuple(_get(expected, e.flax_path).shape)
        layer_shape = want[1:] if e.layered else want
        keys = ([e.torch_key.replace(LAYER, str(i)) for i in range(_n_layers(config, kind, e))] if e.layered
                else [e.torch_key])
        arrays: list[Optional[np.ndarray]] = []
        for key in keys:
            if key not in state:
                arrays.append(None)
                if not (e.initialisable and init_params is not None):
                    missing.append(key)
                continue
            value = state[key].T if e.transpose else state[key]
            used.add(key)
            if value.shape != layer_shape:
                bad_shape.append(f"{key} -> {'/'.join(e.flax_path)}: checkpoint {tuple(state[key].shape)}, config "
                                 f"expects {layer_shape[::-1] if e.transpose else layer_shape}")
            arrays.append(value)
        report.mapped += [k for k, a in zip(keys, arrays) if a is not None]
        if any(a is None for a in arrays):
            to_init.append((e, arrays))
            report.initialised += [k for k, a in zip(keys, arrays) if a is None]
        elif all(a.shape == layer_shape for a in arrays):
            if release:
                state.update(dict.fromkeys(keys))  # the keys stay (for the unexpected-key check), the arrays go
            value = None  # the loop's last view, too, must not outlive ``put`` (its pages go with it)
            put(e.flax_path, arrays, e.layered)
    unexpected = []
    for k in sorted(k for k in state if k not in used):
        if k in tied_head:
            report.dropped.append((k, tied_head[k]))
        else:
            unexpected.append(k)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if bad_shape:
        problems.append(f"shape mismatches ({len(bad_shape)}): " + "; ".join(bad_shape[:20]))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if problems:
        raise ConversionError(f"checkpoint does not fit the {kind} config: " + " | ".join(problems))
    if to_init:  # fresh values for what a warm start legitimately lacks (one init for all of them)
        initial = init_params()
        for e, arrays in to_init:
            fresh = np.asarray(_get(initial, e.flax_path))
            put(e.flax_path, [fresh[i] if a is None else a for i, a in enumerate(arrays)] if e.layered else [fresh],
                e.layered)
    return params, report


def flax_to_torch(params: Mapping, kind: str, config: Any, lazy: bool = False) -> dict[str, Any]:
    """A Flax param tree (stacked or unrolled layers; numpy or jax leaves) -> PyTorch state dict with
    transformers' key names.

    With ``lazy`` the values are ``checkpoints.LazyTensor``s: each PyTorch tensor (one layer's matrix, transposed)
    is cut from the tree only when it is read, so a writer streaming them holds one at a time instead of a second
    copy of the model. Shared encoder-decoders get ``encoder.*`` copies of the decoder's stack as well, so
    transformers 5.x (which ignores ``tie_encoder_decoder``) loads the right encoder and 4.57 (which ties them)
    reads identical values.
    """
    from .checkpoints import LazyTensor

    def tensor(e: Entry, i: Optional[int]) -> LazyTensor:
        path, stacked = e.flax_path, False
        if i is not None:
            at = path.index("layer")
            stacked = "layer" in _get(params, path[:at])  # else unrolled: layer_{i}
            path = path if stacked else path[:at] + (f"layer_{i}",) + path[at + 1:]
        leaf = _get(params, path)
        shape = tuple(leaf.shape[1:] if stacked else leaf.shape)  # [L, ...] stacked

        def make() -> np.ndarray:
            return _torch_layout(host_array(leaf[i] if stacked else leaf), e.transpose)

        return LazyTensor(shape[::-1] if e.transpose else shape, np.dtype(leaf.dtype), make)

    out: dict[str, Any] = {}
    for e in model_entries(kind, config):
        if e.layered:
            for i in range(_n_layers(config, kind, e)):
                out[e.torch_key.replace(LAYER, str(i))] = tensor(e, i)
        else:
            out[e.torch_key] = tensor(e, None)
    if kind != ENCODER:  # transformers' alias of the head bias; 5.x reads it when the head is untied
        prefix = "decoder." if kind == ENCODER_DECODER else ""
        out[f"{prefix}lm_head.decoder.bias"] = out[f"{prefix}lm_head.bias"]
    if kind == ENCODER_DECODER and config.tie_encoder_decoder:
        enc_cfg = config.decoder.replace(add_cross_attention=False)
        for e in stack_entries(enc_cfg, "encoder."):
            src = e.torch_key.replace("encoder.", "decoder.bert.", 1)
            if e.layered:
                for i in range(config.decoder.num_hidden_layers):
                    out[e.torch_key.replace(LAYER, str(i))] = out[src.replace(LAYER, str(i))]
            else:
                out[e.torch_key] = out[src]
    return out if lazy else {k: np.asarray(v) for k, v in out.items()}


def host_array(x: Any) -> np.ndarray:
    """``x`` as a numpy array. A jax array off an accelerator is copied through a temporary CPU array, because
    ``np.asarray`` would keep its host copy cached on the parameter itself (a second copy of the model, kept)."""
    if not isinstance(x, np.ndarray) and hasattr(x, "devices"):
        import jax
        if any(d.platform != "cpu" for d in x.devices()):
            x = jax.device_put(x, jax.local_devices(backend="cpu")[0])
    return np.asarray(x)


def _torch_layout(value: np.ndarray, transpose: bool) -> np.ndarray:
    return np.ascontiguousarray(value.T if transpose else value)


def _n_layers(config: Any, kind: str, entry: Entry) -> int:
    if kind == ENCODER_DECODER:
        return getattr(config, entry.flax_path[0]).num_hidden_layers
    return config.num_hidden_layers


def _tied_head_keys(kind: str, config: Any) -> dict[str, str]:
    """Head keys transformers stores as aliases: dropped when they only repeat tied weights."""
    if kind == ENCODER:
        return {}
    prefix = "decoder." if kind == ENCODER_DECODER else ""
    out = {}
    dec = config.decoder if kind == ENCODER_DECODER else config
    if dec.tie_word_embeddings:
        out[f"{prefix}lm_head.decoder.weight"] = "tied to the word embeddings"
    return out
