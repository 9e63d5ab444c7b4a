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
import importlib
import json
from typing import Any

import torch
from torch import nn

from growcli.errors import ArchitectureError

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


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_from_json(v) for v in value["__tuple__"])
    if isinstance(value, dict) and "__dtype__" in value:
        return getattr(torch, value["__dtype__"])
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


def build_module(spec: dict, root: nn.Module) -> nn.Module:
    """Inverse of :func:`module_spec`; ``ref`` entries are looked up in ``root`` (before the edit)."""
    kind = spec["type"]
    if kind == "ref":
        return root.get_submodule(spec["name"])
    if kind == "copy":
        return copy.deepcopy(root.get_submodule(spec["name"]))
    if kind in ("Sequential", "ModuleList"):
        children = [build_module(c, root) for c in spec["children"]]
        return nn.Sequential(*children) if kind == "Sequential" else nn.ModuleList(children)
    module_name, _, cls_name = kind.partition(":")
    try:
        cls = getattr(nn if module_name == "torch.nn" else importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ArchitectureError(f"recorded edit needs module class {kind}, which cannot be imported: {exc}") from None
    kwargs = {k: _from_json(v) for k, v in spec.get("kwargs", {}).items()}
    return cls(**kwargs)


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


def replay(root: nn.Module, records: list[dict]) -> nn.Module:
    """Apply recorded edits to ``root`` in order; tensors get placeholder values of the right shape.

    Raises :class:`ArchitectureError` when the model does not have what an edit names,
    which means the base model is not the one the edits were recorded on.
    """
    for rec in records:
        op = rec["op"]
        try:
            if op == "param":
                _set_tensor(root, rec["name"], torch.full(rec["shape"], rec.get("value", 0), dtype=getattr(torch, rec["dtype"])))
            elif op == "attr":
                setattr(root.get_submodule(rec["module"]) if rec["module"] else root, rec["attr"], _from_json(rec["value"]))
            elif op == "module":
                new = build_module(rec["spec"], root)
                owner, leaf = _parent(root, rec["name"])
                setattr(owner, leaf, new)
            elif op == "insert":
                seq = root.get_submodule(rec["container"])
                items = list(seq)
                items.insert(rec["index"], build_module(rec["spec"], root))
                _replace_items(seq, items)
            elif op == "config":
                _set_config(root, rec["key"], _from_json(rec["value"]))
            elif op == "graph_arg":
                _set_graph_arg(root, rec["node"], rec["index"], _from_json(rec["value"]))
            elif op == "graph_call":
                _graph_call(root, rec["after"], rec["name"], build_module(rec["spec"], root))
            else:
                raise ArchitectureError(f"unknown recorded edit {op!r}; written by a newer growcli?")
        except AttributeError as exc:
            raise ArchitectureError(f"recorded edit {rec} does not fit this model: {exc}") from None
    return root
