"""Replaying recorded edits: checking a record list from a file, then applying it to a fresh model.

A grown ``.safetensors`` carries its structural edits (:mod:`growcli.core.edits`) as JSON
metadata. :func:`check_records` checks every entry — its kind, its keys and their types, shapes,
dtypes, and that module specs name only allowlisted classes — before anything is built or read;
:func:`replay` then applies the edits to a freshly built original, giving tensors placeholder
values of the recorded shapes, so that the grown weights load into it strictly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from growcli.core.edits import (check_child_name, insert_graph_call, parent_of, replace_items, set_config, set_graph_arg,
                                set_tensor)
from growcli.core.errors import ArchitectureError, FormatError, GrowError
from growcli.core.module_specs import build_module, check_module_spec, dtype_named, from_json_value
from growcli.core.size_attrs import sync_sizes

# What each recorded edit kind must carry: key -> accepted JSON types.
_STR, _INT = (str,), (int,)
_RECORD_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "param": {"name": _STR, "shape": (list,), "dtype": _STR},
    "attr": {"module": _STR, "attr": _STR},
    "module": {"name": _STR, "spec": (dict,)},
    "insert": {"container": _STR, "index": _INT, "spec": (dict,)},
    "wrap": {"spec": (dict,), "child": _STR},
    "config": {"key": _STR},
    "graph_arg": {"node": _STR, "index": _INT},
    "graph_call": {"after": _STR, "name": _STR, "spec": (dict,)},
}
_VALUE_KINDS = ("attr", "config", "graph_arg")
_MAX_PLACEHOLDER = 2**31  # elements of one replayed parameter; real weights must match it anyway


def check_records(records: Any, source: str | None = None) -> list[dict]:
    """Raise :class:`FormatError` (one line naming the entry and ``source``) unless ``records`` is
    a list of well-formed edits whose module specs name only allowlisted classes."""
    src = f"{source}: " if source else ""
    if not isinstance(records, list):
        raise FormatError(f"{src}recorded edits (growcli.edits) must be a JSON list, got {type(records).__name__}")
    for i, rec in enumerate(records):
        where = f"{src}recorded edit {i}"
        if not isinstance(rec, dict):
            raise FormatError(f"{where} is not an object")
        op = rec.get("op")
        if op not in _RECORD_KEYS:
            raise FormatError(f"{where}: unknown edit kind {op!r}; written by a newer growcli, or not by growcli")
        for key, types in _RECORD_KEYS[op].items():
            if not isinstance(rec.get(key), types) or isinstance(rec.get(key), bool):
                raise FormatError(f"{where} ({op}): missing or malformed {key!r}")
        if op in _VALUE_KINDS and "value" not in rec:
            raise FormatError(f"{where} ({op}): missing 'value'")
        if op == "param":
            shape = rec["shape"]
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) or len(shape) > 8:
                raise FormatError(f"{where} (param): malformed shape {shape!r}")
            if math.prod(shape) > _MAX_PLACEHOLDER:
                raise FormatError(f"{where} (param): shape {shape} is implausibly large")
            try:
                dtype_named(rec["dtype"])
            except FormatError:
                raise FormatError(f"{where} (param): dtype {rec['dtype']!r} is not a torch dtype") from None
            value = rec.get("value", 0)
            if not isinstance(value, (int, float)):
                raise FormatError(f"{where} (param): malformed value {value!r}")
        if op == "attr" and (rec["attr"].startswith("__") or rec["attr"] == "forward"):
            raise FormatError(f"{where} (attr): refuses to set attribute {rec['attr']!r}")
        if op == "wrap":
            try:
                check_child_name(rec["child"])
            except ArchitectureError as exc:
                raise FormatError(f"{where} (wrap): {exc}") from None
        if "spec" in rec:
            check_module_spec(rec["spec"], where)
        if "value" in rec:
            try:
                from_json_value(rec["value"])
            except FormatError as exc:
                raise FormatError(f"{where} ({op}): {exc}") from None
    return records


def replay(root: nn.Module, records: list[dict], source: str | None = None) -> nn.Module:
    """Apply recorded edits to ``root`` in order and return the root; tensors get placeholder values of the right shape.

    The returned module is ``root`` unless a ``wrap`` edit made a new root (holding ``root``).

    ``source`` (the file the records come from) is named in error messages. Every record is
    checked first (:func:`check_records`): a malformed one, or a module spec naming a class
    outside the allowlist, raises :class:`FormatError` before anything is changed or built.
    Raises :class:`ArchitectureError` when the model does not have what an edit names,
    which means the base model is not the one the edits were recorded on.

    A module whose tensors a ``param`` edit replaced gets the size attributes its tensors say
    (:func:`growcli.core.size_attrs.sync_sizes`, the rule the width transforms record), also where none
    were recorded: edits recorded on a loaded ``.pt2`` program, whose modules have no such attributes.
    """
    check_records(records, source)
    src = f"{source}: " if source else ""
    resized: dict[int, nn.Module] = {}  # modules whose tensors changed shape, by id
    for i, rec in enumerate(records):
        op = rec["op"]
        where = f"{src}recorded edit {i}"
        try:
            if op == "param":
                set_tensor(root, rec["name"], torch.full(rec["shape"], rec.get("value", 0), dtype=dtype_named(rec["dtype"]),
                                                         device=_device_of(root, rec["name"])))
                owner = parent_of(root, rec["name"])[0]
                resized[id(owner)] = owner
                sync_sizes(owner)  # now, for a later edit copying the module; again at the end (groups set later)
            elif op == "attr":
                setattr(root.get_submodule(rec["module"]) if rec["module"] else root, rec["attr"], from_json_value(rec["value"]))
            elif op == "module":
                new = build_module(rec["spec"], root, where, like=_like(root.get_submodule(rec["name"]), root))
                owner, leaf = parent_of(root, rec["name"])
                setattr(owner, leaf, new)
            elif op == "wrap":
                new = build_module(rec["spec"], root, where, like=_like(root))
                setattr(new, rec["child"], root)
                root = new
            elif op == "insert":
                seq = root.get_submodule(rec["container"])
                items = list(seq)
                items.insert(rec["index"], build_module(rec["spec"], root, where, like=_like(seq, root)))
                replace_items(seq, items)
            elif op == "config":
                set_config(root, rec["key"], from_json_value(rec["value"]))
            elif op == "graph_arg":
                set_graph_arg(root, rec["node"], rec["index"], from_json_value(rec["value"]))
            elif op == "graph_call":
                insert_graph_call(root, rec["after"], rec["name"], build_module(rec["spec"], root, where, like=_like(root)))
        except GrowError:
            raise
        except (AttributeError, TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ArchitectureError(f"{where} ({op}) does not fit this model: {detail}") from None
    for owner in resized.values():
        sync_sizes(owner)
    return root


def _device_of(root: nn.Module, name: str) -> torch.device | None:
    """The device of the tensor ``name`` an edit replaces; ``None`` (the default device) when there is none."""
    try:
        owner, leaf = parent_of(root, name)
    except AttributeError:
        return None  # set_tensor names the missing tensor
    old = owner._parameters.get(leaf, owner._buffers.get(leaf))
    return old.device if old is not None else None


def _like(*modules: nn.Module) -> torch.Tensor | None:
    """The first floating-point parameter or buffer of the first of ``modules`` that has one: the tensor whose
    dtype and device a layer built next to them takes (when no saved weights say otherwise)."""
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                return tensor
    return None
