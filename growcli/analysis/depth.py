"""Depth bookkeeping: what else must change when a stack of blocks gets a new layout.

Shared by every transform that changes a stack's depth (``deepen --block``, ``stack``). The
new layout is ``order``: the source block of every new position (``[0, 1, 1, 2]`` inserts a
copy of block 1 after it). Two things follow it:

- *index attributes* of the blocks and their submodules (``self_attn.layer_idx``, which KV
  caches index by; a 1-based ``layer_number``): integer attributes whose value, across the
  blocks, is ``i`` (or ``i + 1``); with a single block, ``layer_idx``/``layer_id`` equal to 0.
  Each new position ``p`` gets ``p`` (or ``p + 1``).
- a Hugging Face config: its layer count (``num_hidden_layers``, ``n_layer``…, or the entry
  of a staged model's ``depths`` list that counts this stack) and per-layer lists whose key
  names layers and whose length is the count (``layer_types``), remapped by ``order``.
  Candidates are tried by building the model from the changed config on the meta device;
  the first whose parameter names and shapes are the grown model's is the answer. A composite
  model's nested sub-configs (``text_config``, ``vision_config``, an encoder-decoder's
  ``encoder``…) give candidates too, by dotted path (``text_config.num_hidden_layers``): the
  tower whose stack grew is the one whose sub-config then builds the grown model.

Nothing here edits the model: the transforms apply the result through ``gm.edits``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from growcli.core.edits import config_owner, sub_configs

INDEX_NAMES = ("layer_idx", "layer_id")


@dataclass
class DepthChanges:
    """What follows a new layout: config values and ``(module, attribute, value)`` in the grown model."""

    config: dict[str, Any] | None = field(default_factory=dict)  # None: no config value describes the new depth
    attrs: list[tuple[str, str, int]] = field(default_factory=list)
    reason: str | None = None  # why ``config`` is None


def index_attributes(stack: nn.Module) -> list[tuple[str, str, int]]:
    """``(submodule, attribute, offset)`` of integer attributes equal to ``block index + offset`` in every block."""
    per_block = []
    for block in stack:
        values = {}
        for sub, m in block.named_modules():
            for attr, v in vars(m).items():
                if type(v) is int and not attr.startswith("_"):
                    values[(sub, attr)] = v
        per_block.append(values)
    if len(per_block) == 1:
        return [(sub, attr, 0) for (sub, attr), v in per_block[0].items() if attr in INDEX_NAMES and v == 0]
    found = []
    for key in per_block[0] if per_block else ():
        got = [vals.get(key) for vals in per_block]
        for offset in (0, 1):
            if got == [i + offset for i in range(len(per_block))]:
                found.append((key[0], key[1], offset))
    return found


def index_changes(root: nn.Module, container: str, order: list[int]) -> list[tuple[str, str, int]]:
    """The index attributes to set after the stack ``container`` takes the layout ``order``."""
    stack = root.get_submodule(container)
    out = []
    for sub, attr, offset in index_attributes(stack):
        for p, i in enumerate(order):
            if getattr(stack[i].get_submodule(sub), attr) != p + offset:
                out.append((".".join(x for x in (container, str(p), sub) if x), attr, p + offset))
    return out


def _grown_shapes(root: nn.Module, container: str, order: list[int]) -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes of ``root`` after its stack ``container`` takes the layout ``order``."""
    pattern = re.compile(rf"{re.escape(container)}\.(\d+)\.(.+)" if container else r"(\d+)\.(.+)")
    state = {k: tuple(v.shape) for k, v in root.state_dict().items()}
    out = {k: s for k, s in state.items() if not pattern.fullmatch(k)}
    head = f"{container}." if container else ""
    for k, s in state.items():
        m = pattern.fullmatch(k)
        if m:
            out.update({f"{head}{p}.{m.group(2)}": s for p, i in enumerate(order) if i == int(m.group(1))})
    return out


def _count_key(config: Any) -> str:
    return getattr(type(config), "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")


def config_candidates(config: Any, length: int, order: list[int]) -> list[dict[str, Any]]:
    """Possible config changes, the config class's layer count first; then those of every nested sub-config,
    with keys as dotted paths (``text_config.num_hidden_layers``)."""
    out = _own_candidates(config, length, order)
    for path, sub in sub_configs(config).items():
        out += [{f"{path}.{k}": v for k, v in change.items()} for change in _own_candidates(sub, length, order)]
    return out


def _own_candidates(config: Any, length: int, order: list[int]) -> list[dict[str, Any]]:
    """:func:`config_candidates` among the keys of ``config`` itself (values that are sub-configs are left out)."""
    values = {k: v for k, v in config.to_dict().items() if not isinstance(v, dict)}
    first = _count_key(config)
    lists = {k: [v[i] for i in order] for k, v in values.items()
             if "layer" in k and isinstance(v, (list, tuple)) and len(v) == length
             and all(isinstance(x, (str, int, float, bool)) or x is None for x in v)}
    out: list[dict[str, Any]] = []
    for key in sorted(values, key=lambda k: k != first):
        value = values[key]
        if type(value) is int and value == length:
            out.append({key: len(order), **{k: v for k, v in lists.items() if k != key}})
        elif isinstance(value, list) and value and all(type(v) is int for v in value):
            out += [{key: value[:j] + [len(order)] + value[j + 1:]} for j, v in enumerate(value) if v == length]
    return out


def config_changes(root: nn.Module, container: str, order: list[int]) -> tuple[dict[str, Any] | None, str | None]:
    """New values of ``root.config`` for the layout ``order`` of ``container`` (see the module docstring).

    ``({}, None)`` without a config; ``(None, reason)`` when no candidate describes the grown model.
    """
    config = getattr(root, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}, None
    length = len(root.get_submodule(container))
    want = _grown_shapes(root, container, order)
    candidates = config_candidates(config, length, order)
    for change in candidates:
        fresh = rebuild(root, change)  # a candidate the model cannot even be built from is simply not it
        if fresh is not None and {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == want:
            return change, None
    key = _count_key(config)
    tried = ", ".join(sorted({k for c in candidates for k in c})) or "none"
    return None, (f"the config's {key}={config.to_dict().get(key)} does not count this stack of {length} blocks and no "
                  f"other config value describes {container} with {len(order)} (tried: {tried})")


def depth_changes(root: nn.Module, container: str, order: list[int]) -> DepthChanges:
    """Config values and index attributes for the layout ``order`` of ``container``; changes nothing."""
    config, reason = config_changes(root, container, order)
    return DepthChanges(config, index_changes(root, container, order), reason)


def insert_order(length: int, index: int) -> list[int]:
    """The layout that inserts a copy of block ``index`` right after it."""
    return list(range(index + 1)) + [index] + list(range(index + 1, length))


def rebuild(root: nn.Module, change: dict[str, Any]) -> nn.Module | None:
    """``type(root)`` built on the meta device from its config with ``change`` applied (``None`` if it does not build)."""
    config = getattr(root, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    trial = copy.deepcopy(config)
    try:
        for key, value in change.items():
            owner, leaf = config_owner(trial, key)
            setattr(owner, leaf, value)
        with torch.device("meta"):
            return type(root)(trial)
    except Exception:  # a config the model cannot be built from describes nothing to compare with
        return None
