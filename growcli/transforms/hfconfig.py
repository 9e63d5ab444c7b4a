"""Keeping a Hugging Face config and the model it describes in agreement after growth.

A transform that changes sizes updates config keys (``hidden_size``, ``num_attention_heads``…)
and then asks: would a model built from this config be the grown model? Models are built on the
meta device (no memory, no weights) and compared with the grown one: parameter shapes, and the
size attributes of every module (``GPT2Attention.split_size``, ``LlamaAttention.num_key_value_groups``,
``nn.LayerNorm.normalized_shape``, a norm's ``eps``…), which the in-memory model must share so that it
computes what ``from_pretrained`` of the saved directory computes. Config keys describing a grown
size, and unset sizes the model derives (GPT-2's ``n_inner``), get the value the weights have
(:func:`fit_sizes`, used by every width transform); values that must not change (``head_dim``)
are refused when the config would change them. A ``head_dim`` the config lacks is written when a model
built with it is the grown model (:data:`NEW_KEYS`), sizes stated as ratios (``mlp_ratio``) follow the
weights, and names the grown model shares but a model built from the config does not (BERT's MLM
decoder bias once the embeddings are untied) get copies of their own.

Composite models (``text_config`` + ``vision_config``, an encoder-decoder's ``encoder``/``decoder``)
nest configs: every key of every nested sub-config is a candidate too, named by its dotted path
(``text_config.intermediate_size``, :func:`config_items`) and judged like a top-level key, by the
shapes of the model built from the changed config, so growing one tower changes that tower's
sub-config. A key a transform names without a path (``num_attention_heads``) that the top-level
config lacks is the key of every sub-config holding it (:func:`key_paths`).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from growcli.core.edits import config_owner, sub_configs
from growcli.core.errors import NotGrowableError
from growcli.core.model import GrowModel
from growcli.core.origins import Origin
from growcli.transforms.width_edit import Rewrite, deferring


def fresh_model(module: nn.Module) -> nn.Module:
    """``type(module)(module.config)`` on the meta device: shapes and attributes, no memory."""
    with torch.device("meta"):
        return type(module)(module.config)


def mismatches(module: nn.Module) -> list[str]:
    """Parameters whose shape differs from a model built from the (edited) config, as messages."""
    try:
        return _shape_diffs(module)
    except Exception as exc:  # the config no longer builds a model
        return [f"the config does not build a model ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"]


def _shape_diffs(module: nn.Module) -> list[str]:
    """:func:`mismatches`, raising what building the model raises when the config does not build one."""
    want = {k: tuple(v.shape) for k, v in fresh_model(module).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return [f"{k} {list(have[k])} vs config {list(want[k])}" for k in have if k in want and want[k] != have[k]]


def config_items(config) -> list[tuple[str, object]]:
    """``(key, value)`` of every key of ``config`` and, by dotted path, of its nested sub-configs, sorted by key.

    Values that are themselves configs or dicts (``text_config``, ``rope_scaling``) are not listed: the keys
    inside a sub-config are.
    """
    owners = [("", config)] + [(f"{path}.", sub) for path, sub in sub_configs(config).items()]
    return sorted((prefix + key, value) for prefix, owner in owners for key, value in owner.to_dict().items()
                  if not isinstance(value, dict))


def get_key(config, key: str, default=None):
    """The value of ``key`` (maybe a dotted path into a sub-config), ``default`` when it is not set."""
    owner, leaf = config_owner(config, key)
    return getattr(owner, leaf, default)


def set_key(config, key: str, value) -> None:
    """Set ``key`` (maybe a dotted path into a sub-config) on ``config``, in place."""
    owner, leaf = config_owner(config, key)
    setattr(owner, leaf, value)


def key_paths(config, key: str, others: Iterable[str] = ()) -> list[str]:
    """Where a transform's ``key`` lives: itself when dotted or set at the top level, else the dotted paths of
    every nested sub-config that sets it. A :data:`NEW_KEYS` key set nowhere goes where the other keys of the
    update (``others``) live: the top level, or the sub-configs holding them."""
    if "." in key or getattr(config, key, None) is not None:
        return [key]
    nested = sub_configs(config)
    found = [f"{path}.{key}" for path, sub in nested.items() if getattr(sub, key, None) is not None]
    if found or key not in NEW_KEYS:
        return found
    homes = {p.rpartition(".")[0] for other in others if other != key and other not in NEW_KEYS
             for p in key_paths(config, other)}
    return sorted(f"{home}.{key}" if home else key for home in homes) or [key]


def mismatched_sizes(module: nn.Module) -> set[int]:
    """The grown sizes along dimensions where the weights and a model built from the config disagree."""
    try:
        want = {k: tuple(v.shape) for k, v in fresh_model(module).state_dict().items()}
    except Exception:  # the config no longer builds a model: nothing to offer
        return set()
    out = set()
    for k, v in module.state_dict().items():
        if k in want and len(want[k]) == v.dim():
            out |= {h for h, w in zip(v.shape, want[k]) if h != w}
    return out


def sync_config(gm: GrowModel, updates: dict[str, int], sizes: dict[int, set[int]], protected: dict[int, str],
                eps: list, notes: list[str]) -> None:
    """Update config keys and module attributes so that a model built from the config equals ``gm.module``.

    ``sizes`` maps old size values to new ones (attributes holding an old value take the new);
    ``protected`` names values that must not change (``head_dim``): a config that would change them
    cannot describe the grown model, which is refused.
    """
    module = gm.module
    config = getattr(module, "config", None)
    if not gm.is_hf or config is None:
        return
    # Attributes that already disagree with the config (say an earlier widen step left LlamaMLP's unused
    # intermediate_size behind) are not this step's business.
    stale = set(attr_diffs(module))
    for name, value in updates.items():
        for key in key_paths(config, name):
            if get_key(config, key) is not None and get_key(config, key) != value:
                notes.append(f"config {key}: {get_key(config, key)} → {value}")
                gm.edits.config(module, key, value)
    factors = {fix.old: fix.new for fix in eps}
    for key, value in config_items(config):
        if isinstance(value, float) and any(math.isclose(value, old, rel_tol=1e-12) for old in factors):
            new = next(factors[o] for o in factors if math.isclose(value, o, rel_tol=1e-12))
            notes.append(f"config {key}: {value:g} → {new:g}")
            gm.edits.config(module, key, new)
    notes.extend(f"config {change}" for change in fit_sizes(gm, {}, sorted(mismatched_sizes(module))))
    for name, attr, value, want in attr_diffs(module):
        if (name, attr, value, want) not in stale:
            _sync_attr(gm, name, attr, value, want, sizes, protected)
    try:
        validate_config(config)
    except Exception as exc:  # transformers refuses to save it, though the model itself is fine
        notes.append(f"transformers' checks reject the updated config ({config_error(exc)}): a Hugging Face "
                     "directory cannot be written; write .safetensors and load it with growcli.load_grown")
    untie_as_config(gm, notes)
    bad = mismatches(module)
    if bad:
        notes.append(f"the Hugging Face config cannot describe the grown model ({bad[0]}); "
                     "write .safetensors and load it with growcli.load_grown")


def untie_as_config(gm: GrowModel, notes: list[str]) -> None:
    """Give every name its own copy of a tensor it shares in ``gm.module`` but not in a model built from the config.

    Untying the word embeddings (``tie_word_embeddings: False``) unties every tie the model declares, not
    only the one the growth changed: BERT's ``cls.predictions.decoder.bias`` is tied to
    ``cls.predictions.bias`` only while the config ties. A saved file keeps one name of a shared tensor, so
    ``from_pretrained`` would leave the other at its initial value; a copy of its own keeps the values.
    """
    module = gm.module
    try:
        fresh = fresh_model(module)
    except Exception:  # the config no longer builds a model: mismatches() reports it
        return
    fresh_ids = {name: id(t) for name, t in _named_tensors(fresh).items()}
    groups: dict[int, list[str]] = {}
    for name, t in _named_tensors(module).items():
        groups.setdefault(id(t), []).append(name)
    for names in groups.values():
        if len(names) < 2 or any(n not in fresh_ids for n in names):
            continue
        keep = names[0]
        for other in names[1:]:
            if fresh_ids[other] != fresh_ids[keep]:
                value = _named_tensors(module)[keep]
                gm.edits.param(module, other, value, Origin())
                jobs = deferring()
                if jobs is not None:  # planning a stream: the copy is read from disk through the name stored
                    shape = tuple(value.shape)
                    jobs.append(Rewrite(other, [], 0.0, torch.Generator().get_state(), shape, value.dtype, shape))
                notes.append(f"untied {other} from {keep}: a model built from the config does not tie them")


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def attr_diffs(module: nn.Module) -> list[tuple]:
    """``(module name, attribute, value, value in a model built from the config)`` for every size-like
    attribute (ints, floats, tuples) that differs."""
    fresh = dict(fresh_model(module).named_modules())
    out = []
    for name, m in module.named_modules():
        f = fresh.get(name)
        if f is None or type(f) is not type(m):
            continue
        for attr, value in list(vars(m).items()):
            if attr.startswith("_") or attr == "training" or isinstance(value, bool):
                continue
            want = getattr(f, attr, None)
            if isinstance(value, (int, float, tuple)) and type(want) is type(value) and value != want:
                out.append((name, attr, value, want))
    return out


def _sync_attr(gm: GrowModel, name: str, attr: str, value, want, sizes: dict[int, set[int]],
               protected: dict[int, str]) -> None:
    """Set ``name.attr`` to the config's ``want`` if every changed entry is an expected size change, else refuse."""
    where = f"{type(gm.module.get_submodule(name)).__name__} '{name}'"
    olds = list(value) if isinstance(value, (tuple, list)) else [value]
    news = list(want) if isinstance(want, (tuple, list)) else [want]
    if len(olds) != len(news):
        raise NotGrowableError(f"{where}.{attr} would change from {value} to {want} with the new config")
    for old, new in zip(olds, news):
        if old == new or isinstance(old, int) and new in sizes.get(old, ()):
            continue
        if isinstance(old, int) and old in protected:
            raise NotGrowableError(f"{where}.{attr} would change from {old} to {new} with the new config: the model derives "
                                   f"{protected[old]} from the config, so it cannot stay {old}")
        if isinstance(old, float):
            raise NotGrowableError(f"{where}.{attr} would change from {old:g} to {new:g} with the new config (one config "
                                   "key sets it and a value this growth changes), so no config describes the grown model")
        raise NotGrowableError(f"{where}.{attr} would change from {value} to {want} with the new config, "
                               "which growcli does not expect")
    gm.edits.attr(gm.module, name, attr, want)


def fit_sizes(gm: GrowModel, sizes: dict[int, int], unset: Iterable[int]) -> list[str]:
    """Give config keys that describe a grown size the value the weights have; returns ``"key: old → new"`` per change.

    A key holding an old size in ``sizes`` tries its new size; an unset key (``None``: a size the
    model derives, GPT-2's ``n_inner = 4 · n_embd``) tries each value of ``unset`` in turn. A value
    is kept when a model built from the config then builds and has fewer parameters whose shape
    differs from the grown model's; typed config fields and constructors that reject it leave it out.
    """
    module = gm.module
    config = getattr(module, "config", None)
    if not gm.is_hf or config is None:
        return []
    bad = len(mismatches(module))
    unset = list(unset)
    changed = []
    for key, value in config_items(config):
        if not bad:
            break
        if isinstance(value, int) and not isinstance(value, bool) and value in sizes:
            tries = [sizes[value]]
        elif value is None:
            tries = unset
        else:
            continue
        for new in tries:
            after = _diffs_with(module, key, new, value, bad)
            if after < bad:
                gm.edits.config(module, key, new)
                changed.append(f"{key}: {value} → {new}")
                bad = after
                break
    if bad:
        changed += _fit_ratios(gm, bad)
    return changed


def _fit_ratios(gm: GrowModel, bad: int) -> list[str]:
    """Config keys that state a size as a multiple of another (``mlp_ratio``: intermediate = ratio × hidden)
    get ``value × have / want`` for a dimension where the weights (``have``) and a model built from the config
    (``want``) disagree; kept, like :func:`fit_sizes`' values, only when fewer shapes then differ."""
    module = gm.module
    config = module.config
    changed = []
    for key, value in config_items(config):
        if not bad:
            break
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value or "eps" in key:
            continue
        for have, want in _size_pairs(module):
            new = value * have / want
            new = int(new) if isinstance(value, int) and float(new).is_integer() else float(new)
            after = _diffs_with(module, key, new, value, bad)
            if after < bad:
                gm.edits.config(module, key, new)
                changed.append(f"{key}: {value:g} → {new:g} (a ratio of sizes)")
                bad = after
                break
    return changed


def _diffs_with(module: nn.Module, key: str, new, value, bad: int) -> int:
    """How many parameter shapes differ from a model built with config ``key = new`` (``bad`` when the config
    rejects it or builds a model with other tensor names); ``key`` is set back to ``value``."""
    try:
        set_key(module.config, key, new)
        return len(_shape_diffs(module)) if _same_names(module) else bad
    except Exception:  # typed config fields and model constructors reject values that do not fit
        return bad
    finally:
        set_key(module.config, key, value)


def _same_names(module: nn.Module) -> bool:
    """A model built from the config has exactly ``module``'s tensor names (a ratio key that halves the layer
    count leaves fewer shapes to differ, and describes another model)."""
    return set(fresh_model(module).state_dict()) == set(module.state_dict())


def _size_pairs(module: nn.Module) -> list[tuple[int, int]]:
    """``(size in the weights, size in a model built from the config)`` along every dimension that differs."""
    try:
        want = {k: tuple(v.shape) for k, v in fresh_model(module).state_dict().items()}
    except Exception:  # the config no longer builds a model
        return []
    pairs = []
    for k, v in module.state_dict().items():
        if k in want and len(want[k]) == v.dim():
            pairs += [(h, w) for h, w in zip(v.shape, want[k]) if h != w and w and (h, w) not in pairs]
    return pairs


# Keys a config may lack and growth may still write: the attention of many families reads
# ``config.head_dim`` when it is set and derives ``hidden_size // num_attention_heads`` otherwise.
NEW_KEYS = ("head_dim",)


def with_config(gm: GrowModel, updates: dict[str, int], validate: bool = False) -> nn.Module:
    """A meta-device model built from the config with ``updates`` applied (the config itself is restored).

    A key goes where :func:`key_paths` finds it (a composite model's sub-configs); keys the config does not
    have are left out, except :data:`NEW_KEYS`, which are set for the build. With ``validate``, raises what
    the config's own validators raise (Llama wants ``hidden_size`` divisible by the heads, although its
    explicit ``head_dim`` makes the model work either way).
    """
    config = gm.module.config
    paths = {path: updates[k] for k in updates for path in key_paths(config, k, updates)}
    saved = {k: get_key(config, k) for k in paths if get_key(config, k) is not None}
    added = [k for k in paths if k.rpartition(".")[2] in NEW_KEYS and k not in saved]
    try:
        for k in saved:
            set_key(config, k, paths[k])
        for k in added:
            set_key(config, k, paths[k])
        if validate:
            validate_config(config)
        return fresh_model(gm.module)
    finally:
        for k, v in saved.items():
            set_key(config, k, v)
        for k in added:
            owner, leaf = config_owner(config, k)
            if leaf in vars(owner):
                delattr(owner, leaf)
            else:
                setattr(owner, leaf, None)


def set_new_keys(gm: GrowModel, updates: dict[str, int], notes: list[str]) -> None:
    """Write the :data:`NEW_KEYS` of ``updates`` that the config lacks (or holds as None) into it."""
    config = getattr(gm.module, "config", None)
    if not gm.is_hf or config is None:
        return
    for name in NEW_KEYS:
        for key in key_paths(config, name, updates) if name in updates else ():
            if get_key(config, key) is None:
                gm.edits.config(gm.module, key, updates[name])
                notes.append(f"config {key}: unset → {updates[name]} (the attention reads it; derived from "
                             "hidden_size / num_attention_heads it would change)")


def validate_config(config) -> None:
    """Run the config's validators (transformers' strict configs run them only when saving)."""
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()


def config_error(exc: Exception) -> str:
    """The informative last line of a config validation error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(exc).__name__
