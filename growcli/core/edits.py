"""Structural edits: the record that lets a grown architecture travel with its weights.

Every transform changes a model only through :class:`EditLog`, which applies the change
and records it as a small JSON-able dict. :func:`replay` applies a recorded list to a
freshly built original model, so that a grown state_dict loads into it strictly
(:mod:`growcli.core.replay`); new modules are recorded as module specs
(:mod:`growcli.core.module_specs`).

Edit kinds:
- ``param``: replace a parameter or buffer by a tensor of a new shape.
- ``attr``: set a module attribute (``out_features``, ``groups``, ``normalized_shape``...).
- ``module``: replace a submodule by one described by a module spec (see :func:`growcli.core.module_specs.module_spec`).
- ``insert``: insert a module (spec) into a ``ModuleList``/``Sequential`` at an index.
- ``wrap``: make a new module (spec) the model's root, holding the old root as its submodule ``child``.
- ``config``: set a key of a Hugging Face config (``num_hidden_layers``...), or of a nested sub-config
  by dotted path (``text_config.intermediate_size``).
- ``graph_arg``: set an argument of a node in a loaded ``.pt2`` program (a view's literal size, a depthwise
  convolution's ``groups``; :meth:`EditLog.groups` records both that and the module's ``attr``).
- ``graph_call``: in a loaded ``.pt2`` program, call a new shape-preserving module (spec) on a node's output.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from growcli.core.errors import ArchitectureError
from growcli.core.module_specs import module_spec, to_json_value
from growcli.core.origins import Derived, Origin


def parent_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), leaf


def set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, leaf = parent_of(root, name)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise ArchitectureError(f"recorded edit names tensor {name!r}, which the model does not have")


def _graph_node(root: nn.Module, name: str):
    """Node ``name`` of a GraphModule's graph (a loaded .pt2 program); one-line error when there is none."""
    graph = getattr(root, "graph", None)
    node = next((n for n in graph.nodes if n.name == name), None) if graph is not None else None
    if node is None:
        raise ArchitectureError(f"recorded edit names graph node {name!r}, which the model does not have")
    return node


def set_graph_arg(root: nn.Module, node: str, index: int, value: Any) -> None:
    target = _graph_node(root, node)
    args = list(target.args)
    args[index] = value
    target.args = tuple(args)
    root.recompile()


def insert_graph_call(root: nn.Module, after: str, name: str, new: nn.Module) -> None:
    node = _graph_node(root, after)
    graph = root.graph
    users = list(node.users)
    root.add_submodule(name, new)
    with graph.inserting_after(node):
        call = graph.call_module(name, (node,))
    if "val" in node.meta:  # the module keeps the shape; later graph analyses read it from here
        call.meta["val"] = node.meta["val"]
    for user in users:  # everything that read the node now reads the new module's output
        user.replace_input_with(node, call)
    root.recompile()


def groups_args(root: nn.Module, weight: str) -> list[tuple[str, int]]:
    """``(node, argument index)`` of the ``groups`` literal of every op in ``root``'s graph (a loaded .pt2
    program) whose ``weight`` argument is parameter ``weight``; ``[]`` for a module without a graph.

    The index comes from the op's schema (``convolution``: 8; ``conv2d``, ``conv_transpose2d``: 6). Raises
    ``ArchitectureError`` when such an op passes ``groups`` by keyword or leaves it at its default."""
    graph = getattr(root, "graph", None)
    found = []
    for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        names = [a.name for a in schema.arguments] if schema is not None else []
        if "weight" not in names or "groups" not in names:
            continue
        w = node.args[names.index("weight")] if names.index("weight") < len(node.args) else node.kwargs.get("weight")
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target == weight):
            continue
        index = names.index("groups")
        if index >= len(node.args):
            raise ArchitectureError(f"graph node {node.name!r} ({node.target}) does not pass groups as an argument "
                                    "growcli can set; export the program without keyword arguments")
        found.append((node.name, index))
    return found


def sub_configs(config: Any) -> dict[str, Any]:
    """Every nested sub-config of ``config`` by dotted path (``text_config``, ``vision_config``…), parents first.

    A sub-config is an attribute that is itself a Hugging Face ``PretrainedConfig`` (in transformers the
    tower holds the same object: ``model.text_model.config is model.config.text_config``).
    """
    try:
        from transformers import PretrainedConfig
    except ImportError:  # without transformers no config has Hugging Face sub-configs
        return {}
    out: dict[str, Any] = {}
    seen, todo = {id(config)}, [("", config)]
    while todo:
        prefix, owner = todo.pop(0)
        for name, value in sorted(vars(owner).items()):
            if isinstance(value, PretrainedConfig) and not name.startswith("_") and id(value) not in seen:
                seen.add(id(value))  # a config reachable twice is one sub-config, named by its first path
                out[prefix + name] = value
                todo.append((f"{prefix}{name}.", value))
    return out


def config_owner(config: Any, key: str) -> tuple[Any, str]:
    """The (sub-)config holding ``key`` and the key's last part: ``text_config.intermediate_size`` is the
    ``intermediate_size`` of ``config.text_config``. Raises ``ArchitectureError`` when a part before the last
    is not a sub-config of the model's config."""
    *path, leaf = key.split(".")
    if not leaf or not all(path):
        raise ArchitectureError(f"recorded edit sets config key {key!r}, which is not a key or a dotted path of keys")
    nested = sub_configs(config) if path else {}
    for i in range(len(path)):
        if ".".join(path[: i + 1]) not in nested:
            raise ArchitectureError(f"recorded edit sets config key {key!r} but the config has no sub-config "
                                    f"{'.'.join(path[: i + 1])!r}")
    return (nested[".".join(path)] if path else config), leaf


def set_config_json(data: dict, key: str, value: Any) -> None:
    """Set ``key`` in the dict of a ``config.json``; a dotted key sets the entry inside the nested sub-config's
    dict (``text_config.num_hidden_layers``), which must be there (``ArchitectureError`` otherwise)."""
    *path, leaf = key.split(".")
    for i, part in enumerate(path):
        if not isinstance(data.get(part), dict):
            raise ArchitectureError(f"config key {key!r}: the config has no sub-config {'.'.join(path[: i + 1])!r}")
        data = data[part]
    data[leaf] = value


def set_config(root: nn.Module, key: str, value: Any) -> None:
    """Set config key ``key`` of ``root``, a dotted path into a nested sub-config (``text_config.num_hidden_layers``)
    or a top-level key."""
    config = getattr(root, "config", None)
    if config is None:
        raise ArchitectureError(f"recorded edit sets config key {key!r} but the model has no config")
    owner, leaf = config_owner(config, key)
    setattr(owner, leaf, value)


class EditLog:
    """Applies structural changes to a model and records them for :func:`replay`."""

    def __init__(self, records: list[dict] | None = None):
        self.records: list[dict] = list(records or [])
        # id(tensor made by an edit) → where its values came from (in memory only; growcli.core.origins).
        self.derived: dict[int, Derived] = {}

    def param(self, root: nn.Module, name: str, tensor: torch.Tensor, origin: Origin | None = None) -> None:
        """Replace parameter or buffer ``name`` with ``tensor`` (its own storage).

        ``origin`` says how the new values derive from the tensor replaced (composed with that
        tensor's own origin if an earlier edit of the step made it); without one they are fresh.
        """
        owner, leaf = parent_of(root, name)
        replaced = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
        tensor = tensor.detach().clone().contiguous()
        set_tensor(root, name, tensor)
        made = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
        self._derive(made, replaced, origin or Origin(fresh=True))
        record = {"op": "param", "name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        owner, leaf = parent_of(root, name)
        if leaf in owner._non_persistent_buffers_set and tensor.numel() == 1:
            # Not in the state_dict, so a replay cannot load it: record the value (an embedding scale).
            record["value"] = tensor.item()
        self.records.append(record)

    def derive(self, made: torch.Tensor, source: torch.Tensor) -> None:
        """Note that ``made`` (e.g. a parameter of a copied block) holds a copy of ``source``'s values."""
        self._derive(made, source, Origin())

    def _derive(self, made: torch.Tensor, source: torch.Tensor | None, origin: Origin) -> None:
        earlier = self.derived.get(id(source)) if source is not None else None
        if earlier is not None:  # made from a tensor this step made: compose with its origin
            source = earlier.source
            origin = Origin(earlier.origin.maps + origin.maps, earlier.origin.fresh or origin.fresh)
        self.derived[id(made)] = Derived(made, source, origin)

    def attr(self, root: nn.Module, module: str, attr: str, value: Any) -> None:
        setattr(root.get_submodule(module) if module else root, attr, value)
        self.records.append({"op": "attr", "module": module, "attr": attr, "value": to_json_value(value)})

    def module(self, root: nn.Module, name: str, new: nn.Module, refs: dict[int, str] | None = None) -> None:
        """Replace submodule ``name`` with ``new`` (which may contain existing modules, see ``refs``)."""
        spec = module_spec(new, refs)
        owner, leaf = parent_of(root, name)
        setattr(owner, leaf, new)
        self.records.append({"op": "module", "name": name, "spec": spec})

    def wrap(self, root: nn.Module, new: nn.Module, child: str) -> nn.Module:
        """Make ``new`` the root, with the old ``root`` as its submodule ``child``; returns ``new``.

        The caller holds the root (``GrowModel.module``) and must replace it with the result.
        """
        check_child_name(child)
        spec = module_spec(new)  # before the old root is inside it: recorded as its own spec
        setattr(new, child, root)
        self.records.append({"op": "wrap", "spec": spec, "child": child})
        return new

    def insert(self, root: nn.Module, container: str, index: int, new: nn.Module, spec: dict) -> None:
        """Insert ``new`` (described by ``spec``, e.g. a ``copy`` of a sibling) into a list container."""
        seq = root.get_submodule(container)
        items = list(seq)
        items.insert(index, new)
        replace_items(seq, items)
        self.records.append({"op": "insert", "container": container, "index": index, "spec": spec})

    def graph_arg(self, root: nn.Module, node: str, index: int, value: Any) -> None:
        """Set argument ``index`` of node ``node`` in a GraphModule (a loaded .pt2 program)."""
        set_graph_arg(root, node, index, value)
        self.records.append({"op": "graph_arg", "node": node, "index": index, "value": to_json_value(value)})

    def groups(self, root: nn.Module, module: str, value: int) -> None:
        """Set the ``groups`` of convolution ``module`` to ``value`` (a depthwise conv following its channels).

        In a loaded .pt2 program the module holds only the weights and the graph holds ``groups`` as a literal
        argument of every op reading ``module.weight``: those literals are set too (``graph_arg`` records).
        """
        self.attr(root, module, "groups", value)
        for node, index in groups_args(root, f"{module}.weight" if module else "weight"):
            self.graph_arg(root, node, index, value)

    def graph_call(self, root: nn.Module, after: str, name: str, new: nn.Module) -> None:
        """In a GraphModule (a loaded .pt2 program), run submodule ``name`` = ``new`` on node ``after``'s output.

        Every node that read ``after`` reads the new module's output instead; the module's
        forward code is the graph, so this is how a layer is inserted into it.
        """
        spec = module_spec(new)
        insert_graph_call(root, after, name, new)
        self.records.append({"op": "graph_call", "after": after, "name": name, "spec": spec})

    def config(self, root: nn.Module, key: str, value: Any) -> None:
        set_config(root, key, value)
        self.records.append({"op": "config", "key": key, "value": to_json_value(value)})

    def to_json(self) -> str:
        return json.dumps(self.records, separators=(",", ":"))


def check_child_name(child: str) -> None:
    """A ``wrap`` edit's child must be a plain attribute name (not dotted, not private, not ``forward``)."""
    if not child.isidentifier() or child.startswith("_") or child == "forward":
        raise ArchitectureError(f"recorded edit wraps the model as {child!r}, which is not a plain submodule name")


def replace_items(seq: nn.Module, items: list[nn.Module]) -> None:
    for key in list(seq._modules):
        del seq._modules[key]
    for i, item in enumerate(items):
        seq._modules[str(i)] = item
