"""Structural edits: the record that lets a grown architecture travel with its weights.

Every transform changes a model only through :class:`EditLog`, which applies the change
and records it as a small JSON-able dict. :func:`replay` applies a recorded list to a
freshly built original model, so that a grown state_dict loads into it strictly.

Edit kinds:
- ``param``: replace a parameter or buffer by a tensor of a new shape.
- ``attr``: set a module attribute (``out_features``, ``groups``, ``normalized_shape``...).
- ``module``: replace a submodule by one described by a module spec (see :func:`module_spec`).
- ``insert``: insert a module (spec) into a ``ModuleList``/``Sequential`` at an index.
- ``config``: set a key of a Hugging Face config (``num_hidden_layers``...).
- ``graph_arg``: set an argument of a node in a loaded ``.pt2`` program (a view's literal size).
- ``graph_call``: in a loaded ``.pt2`` program, call a new shape-preserving module (spec) on a node's output.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import torch
from torch import nn

from growcli.core.errors import ArchitectureError, FormatError, GrowError

# Constructor arguments of the torch.nn leaf modules a transform may create, read back
# from the instance's attributes.
_CTOR_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features"),
    nn.Conv1d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    nn.Conv3d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm3d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine"),
    nn.Identity: (),
    nn.ReLU: (),
    nn.ReLU6: (),
    nn.GELU: ("approximate",),
    nn.Tanh: (),
    nn.SiLU: (),
    nn.Sigmoid: (),
    nn.Hardtanh: ("min_val", "max_val"),
    nn.Dropout: ("p",),
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    raise TypeError(f"cannot record attribute value of type {type(value).__name__}")


def _dtype(name: Any) -> torch.dtype:
    """The torch dtype named ``name`` (``"float32"``); never any other attribute of ``torch``."""
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise FormatError(f"recorded dtype {name!r} is not a torch dtype")
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_from_json(v) for v in value["__tuple__"])
    if isinstance(value, dict) and "__dtype__" in value:
        return _dtype(value["__dtype__"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def module_spec(module: nn.Module, refs: dict[int, str] | None = None) -> dict:
    """Describe ``module`` so :func:`build_module` can rebuild it (weights excluded).

    ``refs`` maps ``id(submodule)`` to a name in the model *before* the edit; such
    submodules are recorded as references (``{"type": "ref", "name": ...}``) and moved,
    not rebuilt, on replay.
    """
    refs = refs or {}
    if id(module) in refs:
        return {"type": "ref", "name": refs[id(module)]}
    if type(module) in (nn.Sequential, nn.ModuleList):
        return {"type": type(module).__name__, "children": [module_spec(m, refs) for m in module]}
    if type(module) in _CTOR_ATTRS:
        kwargs = {a: _jsonable(getattr(module, a)) for a in _CTOR_ATTRS[type(module)]}
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kwargs["bias"] = module.bias is not None
        if isinstance(module, nn.LayerNorm):
            kwargs["bias"] = module.bias is not None
        return {"type": f"torch.nn:{type(module).__name__}", "kwargs": kwargs}
    spec_fn = getattr(module, "growcli_spec", None)
    if callable(spec_fn):
        return {"type": f"{type(module).__module__}:{type(module).__qualname__}",
                "kwargs": {k: _jsonable(v) for k, v in spec_fn().items()}}
    raise TypeError(f"growcli cannot record a module of type {type(module).__qualname__}")


# The only module classes a recorded spec may name, by exact "module:qualname": the torch.nn
# leaf classes above (plus the bare "Sequential"/"ModuleList" containers) and growcli's own
# layers. A recorded spec never imports anything: a file cannot make growcli run its code.
_TORCH_CLASSES: dict[str, type] = {f"torch.nn:{cls.__name__}": cls for cls in _CTOR_ATTRS}
_MAX_SPEC_DEPTH = 32


def _growcli_classes() -> dict[str, type]:
    """growcli's own recordable layers (classes of ``growcli.nn`` with a ``growcli_spec`` method)."""
    from growcli import nn as growcli_nn  # growcli's own module; imports nothing from outside

    return {f"growcli.nn:{cls.__qualname__}": cls for cls in vars(growcli_nn).values()
            if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == "growcli.nn"
            and callable(getattr(cls, "growcli_spec", None))}


def allowed_module_class(kind: str) -> type | None:
    """The class a recorded spec ``type`` names, if it is on the allowlist; ``None`` otherwise."""
    return _TORCH_CLASSES.get(kind) or _growcli_classes().get(kind)


def check_module_spec(spec: Any, where: str = "recorded edit", depth: int = 0) -> None:
    """Raise :class:`FormatError` unless ``spec`` is well-formed and names only allowlisted classes."""
    if depth > _MAX_SPEC_DEPTH:
        raise FormatError(f"{where}: module spec is nested more than {_MAX_SPEC_DEPTH} levels deep")
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise FormatError(f"{where}: malformed module spec (expected an object with a 'type' string)")
    kind = spec["type"]
    if kind in ("ref", "copy"):
        if not isinstance(spec.get("name"), str):
            raise FormatError(f"{where}: malformed {kind} module spec (expected a 'name' string)")
        return
    if kind in ("Sequential", "ModuleList"):
        children = spec.get("children")
        if not isinstance(children, list):
            raise FormatError(f"{where}: malformed {kind} module spec (expected a 'children' list)")
        for child in children:
            check_module_spec(child, where, depth + 1)
        return
    if allowed_module_class(kind) is None:
        raise FormatError(f"{where}: names module type {kind!r}, which growcli does not rebuild "
                          "(only torch.nn layers and growcli's own; nothing named in a file is imported)")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise FormatError(f"{where}: malformed module spec for {kind} ('kwargs' must be an object)")


def build_module(spec: dict, root: nn.Module, where: str = "recorded edit") -> nn.Module:
    """Inverse of :func:`module_spec`; ``ref`` entries are looked up in ``root`` (before the edit).

    Only allowlisted classes are built (see :func:`check_module_spec`); nothing is imported.
    """
    check_module_spec(spec, where)
    kind = spec["type"]
    if kind == "ref":
        return root.get_submodule(spec["name"])
    if kind == "copy":
        return copy.deepcopy(root.get_submodule(spec["name"]))
    if kind in ("Sequential", "ModuleList"):
        children = [build_module(c, root, where) for c in spec["children"]]
        return nn.Sequential(*children) if kind == "Sequential" else nn.ModuleList(children)
    cls = allowed_module_class(kind)
    kwargs = {k: _from_json(v) for k, v in spec.get("kwargs", {}).items()}
    try:
        return cls(**kwargs)
    except GrowError:
        raise
    except Exception as exc:
        raise ArchitectureError(f"{where}: cannot build {kind} from its recorded arguments "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), leaf


def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, leaf = _parent(root, name)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise ArchitectureError(f"recorded edit names tensor {name!r}, which the model does not have")


def _set_graph_arg(root: nn.Module, node: str, index: int, value: Any) -> None:
    graph = getattr(root, "graph", None)
    target = next((n for n in graph.nodes if n.name == node), None) if graph is not None else None
    if target is None:
        raise ArchitectureError(f"recorded edit names graph node {node!r}, which the model does not have")
    args = list(target.args)
    args[index] = value
    target.args = tuple(args)
    root.recompile()


def _graph_call(root: nn.Module, after: str, name: str, new: nn.Module) -> None:
    graph = getattr(root, "graph", None)
    node = next((n for n in graph.nodes if n.name == after), None) if graph is not None else None
    if node is None:
        raise ArchitectureError(f"recorded edit names graph node {after!r}, which the model does not have")
    users = list(node.users)
    root.add_submodule(name, new)
    with graph.inserting_after(node):
        call = graph.call_module(name, (node,))
    if "val" in node.meta:  # the module keeps the shape; later graph analyses read it from here
        call.meta["val"] = node.meta["val"]
    for user in users:  # everything that read the node now reads the new module's output
        user.replace_input_with(node, call)
    root.recompile()


def _set_config(root: nn.Module, key: str, value: Any) -> None:
    config = getattr(root, "config", None)
    if config is None:
        raise ArchitectureError(f"recorded edit sets config key {key!r} but the model has no config")
    setattr(config, key, value)


class EditLog:
    """Applies structural changes to a model and records them for :func:`replay`."""

    def __init__(self, records: list[dict] | None = None):
        self.records: list[dict] = list(records or [])

    def param(self, root: nn.Module, name: str, tensor: torch.Tensor) -> None:
        """Replace parameter or buffer ``name`` with ``tensor`` (its own storage)."""
        tensor = tensor.detach().clone().contiguous()
        _set_tensor(root, name, tensor)
        record = {"op": "param", "name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        owner, leaf = _parent(root, name)
        if leaf in owner._non_persistent_buffers_set and tensor.numel() == 1:
            # Not in the state_dict, so a replay cannot load it: record the value (an embedding scale).
            record["value"] = tensor.item()
        self.records.append(record)

    def attr(self, root: nn.Module, module: str, attr: str, value: Any) -> None:
        setattr(root.get_submodule(module) if module else root, attr, value)
        self.records.append({"op": "attr", "module": module, "attr": attr, "value": _jsonable(value)})

    def module(self, root: nn.Module, name: str, new: nn.Module, refs: dict[int, str] | None = None) -> None:
        """Replace submodule ``name`` with ``new`` (which may contain existing modules, see ``refs``)."""
        spec = module_spec(new, refs)
        owner, leaf = _parent(root, name)
        setattr(owner, leaf, new)
        self.records.append({"op": "module", "name": name, "spec": spec})

    def insert(self, root: nn.Module, container: str, index: int, new: nn.Module, spec: dict) -> None:
        """Insert ``new`` (described by ``spec``, e.g. a ``copy`` of a sibling) into a list container."""
        seq = root.get_submodule(container)
        items = list(seq)
        items.insert(index, new)
        _replace_items(seq, items)
        self.records.append({"op": "insert", "container": container, "index": index, "spec": spec})

    def graph_arg(self, root: nn.Module, node: str, index: int, value: Any) -> None:
        """Set argument ``index`` of node ``node`` in a GraphModule (a loaded .pt2 program)."""
        _set_graph_arg(root, node, index, value)
        self.records.append({"op": "graph_arg", "node": node, "index": index, "value": _jsonable(value)})

    def graph_call(self, root: nn.Module, after: str, name: str, new: nn.Module) -> None:
        """In a GraphModule (a loaded .pt2 program), run submodule ``name`` = ``new`` on node ``after``'s output.

        Every node that read ``after`` reads the new module's output instead; the module's
        forward code is the graph, so this is how a layer is inserted into it.
        """
        spec = module_spec(new)
        _graph_call(root, after, name, new)
        self.records.append({"op": "graph_call", "after": after, "name": name, "spec": spec})

    def config(self, root: nn.Module, key: str, value: Any) -> None:
        _set_config(root, key, value)
        self.records.append({"op": "config", "key": key, "value": _jsonable(value)})

    def to_json(self) -> str:
        return json.dumps(self.records, separators=(",", ":"))


def _replace_items(seq: nn.Module, items: list[nn.Module]) -> None:
    for key in list(seq._modules):
        del seq._modules[key]
    for i, item in enumerate(items):
        seq._modules[str(i)] = item


# What each recorded edit kind must carry: key -> accepted JSON types.
_STR, _INT = (str,), (int,)
_RECORD_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "param": {"name": _STR, "shape": (list,), "dtype": _STR},
    "attr": {"module": _STR, "attr": _STR},
    "module": {"name": _STR, "spec": (dict,)},
    "insert": {"container": _STR, "index": _INT, "spec": (dict,)},
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
                _dtype(rec["dtype"])
            except FormatError:
                raise FormatError(f"{where} (param): dtype {rec['dtype']!r} is not a torch dtype") from None
            value = rec.get("value", 0)
            if not isinstance(value, (int, float)):
                raise FormatError(f"{where} (param): malformed value {value!r}")
        if op == "attr" and (rec["attr"].startswith("__") or rec["attr"] == "forward"):
            raise FormatError(f"{where} (attr): refuses to set attribute {rec['attr']!r}")
        if "spec" in rec:
            check_module_spec(rec["spec"], where)
        if "value" in rec:
            try:
                _from_json(rec["value"])
            except FormatError as exc:
                raise FormatError(f"{where} ({op}): {exc}") from None
    return records


def replay(root: nn.Module, records: list[dict], source: str | None = None) -> nn.Module:
    """Apply recorded edits to ``root`` in order; tensors get placeholder values of the right shape.

    ``source`` (the file the records come from) is named in error messages. Every record is
    checked first (:func:`check_records`): a malformed one, or a module spec naming a class
    outside the allowlist, raises :class:`FormatError` before anything is changed or built.
    Raises :class:`ArchitectureError` when the model does not have what an edit names,
    which means the base model is not the one the edits were recorded on.
    """
    check_records(records, source)
    src = f"{source}: " if source else ""
    for i, rec in enumerate(records):
        op = rec["op"]
        where = f"{src}recorded edit {i}"
        try:
            if op == "param":
                _set_tensor(root, rec["name"], torch.full(rec["shape"], rec.get("value", 0), dtype=_dtype(rec["dtype"])))
            elif op == "attr":
                setattr(root.get_submodule(rec["module"]) if rec["module"] else root, rec["attr"], _from_json(rec["value"]))
            elif op == "module":
                new = build_module(rec["spec"], root, where)
                owner, leaf = _parent(root, rec["name"])
                setattr(owner, leaf, new)
            elif op == "insert":
                seq = root.get_submodule(rec["container"])
                items = list(seq)
                items.insert(rec["index"], build_module(rec["spec"], root, where))
                _replace_items(seq, items)
            elif op == "config":
                _set_config(root, rec["key"], _from_json(rec["value"]))
            elif op == "graph_arg":
                _set_graph_arg(root, rec["node"], rec["index"], _from_json(rec["value"]))
            elif op == "graph_call":
                _graph_call(root, rec["after"], rec["name"], build_module(rec["spec"], root, where))
        except GrowError:
            raise
        except (AttributeError, TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ArchitectureError(f"{where} ({op}) does not fit this model: {detail}") from None
    return root
