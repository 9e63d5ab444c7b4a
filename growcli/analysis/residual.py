"""Residual blocks: which layers write into the residual stream, and the bookkeeping of depth.

A block computes ``x + F(x)`` (possibly several times, and possibly followed by an
idempotent activation as in ResNets). A copy of it is the identity when the last layer of
every ``F`` — its *residual writer* — outputs zero. :func:`residual_writers` finds those
layers from the ``torch.export`` trace, never from module names: it walks the residual
stream backwards from the block's output, and at every add follows the other operand back
through zero-preserving operations (views, dropout, casts) to the operation whose
parameters produce it (a linear, conv, ``addmm``, norm affine or a scaling parameter).
Zeroing those parameters makes the branch write exactly zero. Recipe: GROWTH.md section 3.

Also here, for every transform that changes a stack's depth (``deepen --block``,
``stack``): :func:`renumber_layer_idx` and :func:`depth_config_changes` keep per-layer
indices and a Hugging Face config consistent with the new depth.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from growcli.core.errors import NotGrowableError
from growcli.analysis.coupling import Trace, op_name, shape, where
from growcli.core.model import GrowModel

aten = torch.ops.aten

# Operations that map a zero tensor to a zero tensor with one tensor input: a residual
# branch may pass through them between its writer and the add.
ZERO_PRESERVING = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.t.default, aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.dropout.default, aten.feature_dropout.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.flatten.using_ints, aten.expand.default,
    aten.mul.Scalar, aten.div.Scalar,
}
# Operations that are the identity in eval mode, allowed on the residual stream itself.
STREAM_IDENTITY = {
    aten.dropout.default, aten.feature_dropout.default, aten.clone.default, aten.contiguous.default,
    aten.alias.default, aten.detach.default,
}
# Writers: operations whose output is zero when all their parameter inputs are zero.
WRITERS = {
    aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
    aten.addmm.default, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
    aten.layer_norm.default, aten.group_norm.default,
}
if hasattr(aten, "rms_norm"):
    WRITERS.add(aten.rms_norm.default)
ADDS = {aten.add.Tensor, aten.add_.Tensor}
IDEMPOTENT = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}
if hasattr(aten, "relu6"):
    IDEMPOTENT.add(aten.relu6.default)
NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.group_norm.default,
         aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
if hasattr(aten, "rms_norm"):
    NORMS.add(aten.rms_norm.default)
CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}
# Assertions the exporter adds; they read a tensor but are not part of the computation.
IGNORED_USERS = {aten._assert_tensor_metadata.default}


@dataclass
class Branch:
    """One residual branch: the add it enters and the parameters that make it write zero."""

    add: str
    writer_op: str
    params: list[str]  # FQNs in the traced model


@dataclass
class BlockAnalysis:
    """How block ``name`` writes into its residual stream."""

    name: str
    branches: list[Branch] = field(default_factory=list)
    post: list[str] = field(default_factory=list)  # idempotent activations after the last add

    def zeroed(self) -> list[str]:
        """Parameter names relative to the block that a copy must zero to start as the identity."""
        prefix = self.name + "."
        return [p[len(prefix):] for b in self.branches for p in b.params]


def data_users(node: fx.Node) -> list[fx.Node]:
    """``node``'s users that compute something (the exporter's metadata assertions excluded)."""
    return [u for u in node.users if u.target not in IGNORED_USERS]


def in_scope(node: fx.Node, name: str) -> bool:
    """Whether ``node`` was computed inside a call of module ``name`` (from the trace's module stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    return any(v[0] == name for v in stack.values())


def _param_args(node: fx.Node, params: set[str]) -> list[str]:
    return [str(a.target) for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target) in params]


def _writer(node: Any, block: str, params: set[str]) -> tuple[fx.Node, list[str]] | None:
    """Follow ``node`` back through zero-preserving ops to a writer inside ``block``, or ``None``."""
    cur = node
    while isinstance(cur, fx.Node) and cur.op == "call_function" and in_scope(cur, block):
        if cur.target in WRITERS:
            found = _param_args(cur, params)
            return (cur, found) if found else None
        if cur.target in (aten.mul.Tensor, aten.mul_.Tensor):  # a learnable scale (ReZero α, layer scale)
            found = _param_args(cur, params)
            return (cur, found) if found else None
        if cur.target is operator.getitem and cur.args[1] == 0 and isinstance(cur.args[0], fx.Node) \
                and cur.args[0].target in WRITERS:
            cur = cur.args[0]
            continue
        if cur.target in ZERO_PRESERVING:
            cur = cur.args[0]
            continue
        return None
    return None


def _behind_add(node: fx.Node, block: str) -> bool:
    """Whether ``node`` reads, through one-input ops inside ``block``, the result of an add (a residual sum)."""
    cur = node
    while isinstance(cur, fx.Node) and cur.op == "call_function" and in_scope(cur, block):
        if cur.target in ADDS:
            return True
        tensors = [a for a in cur.args if isinstance(a, fx.Node) and a.op != "get_attr"]
        if len(tensors) != 1:
            return False
        cur = tensors[0]
    return False


def _same_dtype(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    a = node.meta.get("val")
    b = src.meta.get("val") if isinstance(src, fx.Node) else None
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype


def block_output(trace: Trace, block: str) -> fx.Node:
    """The one node computed in ``block`` that is read outside it; :class:`NotGrowableError` otherwise."""
    inside = [n for n in trace.graph.nodes if n.op == "call_function" and in_scope(n, block)]
    if not inside:
        raise NotGrowableError(f"'{block}' is never called in the traced forward pass")
    outputs = [n for n in inside if any(u.op == "output" or not in_scope(u, block) for u in data_users(n))]
    if len(outputs) != 1:
        raise NotGrowableError(f"'{block}' returns {len(outputs)} tensors that are used outside it; "
                               "a residual block returns one (its residual stream)")
    return outputs[0]


def residual_writers(trace: Trace, root: nn.Module, block: str) -> BlockAnalysis:
    """Find every residual branch of ``block`` and the parameters that make it write zero.

    Walks the stream backwards from the block's output. Allowed on the stream: residual adds,
    eval-mode identities (dropout), and idempotent activations after the last add (ResNet's
    ``relu(x + F(x))``: a copy inserted after a block of the same kind receives ``relu``'s
    output, on which ``relu`` is the identity). Raises :class:`NotGrowableError` naming the
    operation that makes a copy differ from the identity: a norm on the stream (post-LN),
    an add of two computed branches (a projection shortcut), a branch that does not end in
    a layer with parameters, or a shape change.
    """
    params = {n for n, _ in root.named_parameters(remove_duplicate=False)}
    prefix = block + "."
    out = block_output(trace, block)
    analysis = BlockAnalysis(block)
    cur, seen_add = out, False
    while isinstance(cur, fx.Node) and cur.op == "call_function" and in_scope(cur, block):
        if cur.target in ADDS and len(cur.args) >= 2 and all(isinstance(a, fx.Node) for a in cur.args[:2]):
            found = [_writer(a, block, params) for a in cur.args[:2]]
            if all(found):
                raise NotGrowableError(
                    f"'{block}': both inputs of the add{where(cur)} are computed by layers "
                    f"({op_name(found[0][0])}{where(found[0][0])} and {op_name(found[1][0])}{where(found[1][0])}), "
                    "so the block has no identity path (a projection shortcut changes the stream)")
            if not any(found):
                raise NotGrowableError(
                    f"'{block}': neither input of the add{where(cur)} ends in a layer whose parameters can be "
                    "zeroed (it is reached through an operation that does not map zero to zero)")
            k = 0 if found[0] else 1
            node, names = found[k]
            outside = [n for n in names if not n.startswith(prefix)]
            if outside:
                raise NotGrowableError(f"'{block}': the residual writer {op_name(node)}{where(node)} uses {outside[0]}, "
                                       "a parameter outside the block (shared weights)")
            analysis.branches.insert(0, Branch(cur.name, f"{op_name(node)}{where(node)}", names))
            seen_add = True
            cur = cur.args[1 - k]
        elif cur.target in STREAM_IDENTITY or cur.target in CASTS and _same_dtype(cur):
            # A cast to the dtype a tensor already has returns that tensor, and the tracer then
            # attributes every later use of it to the cast (e.g. inside an RMSNorm): skip it.
            cur = cur.args[0]
        elif cur.target in IDEMPOTENT and not seen_add:
            analysis.post.insert(0, op_name(cur))
            cur = cur.args[0]
        elif cur.target in IDEMPOTENT:
            raise NotGrowableError(
                f"'{block}': {op_name(cur)}{where(cur)} sits between two residual adds; {op_name(cur)}(x + 0) = x "
                "only for x it leaves unchanged, which the stream inside the block need not be")
        elif not analysis.branches and not _behind_add(cur, block):
            raise NotGrowableError(f"'{block}' is not a residual block: its output comes from {op_name(cur)}{where(cur)}, "
                                   "not from a residual add (x + F(x))")
        elif cur.target in NORMS:
            raise NotGrowableError(
                f"'{block}' is a post-LN block: the residual sum goes through {op_name(cur)}{where(cur)}, so a copy "
                "with zeroed writers computes norm(x + 0) with its own weights, which re-normalises x instead of "
                "passing it through (GROWTH.md section 3); only pre-LN blocks (x + F(norm(x))) can start as the identity")
        else:
            raise NotGrowableError(f"'{block}': {op_name(cur)}{where(cur)} acts on the residual stream, so a copy "
                                   "with zeroed writers would not be the identity")
    if not analysis.branches:
        raise NotGrowableError(f"'{block}' has no residual add (x + F(x)) on its output path; a copy of it "
                               "cannot start as the identity")
    if shape(cur) != shape(out):
        raise NotGrowableError(f"'{block}' changes the stream's shape from {list(shape(cur) or [])} to "
                               f"{list(shape(out) or [])}; a copy of it cannot follow it")
    return analysis


def renumber_layer_idx(gm: GrowModel, container: str, start: int) -> list[str]:
    """Add 1 to every integer ``layer_idx`` attribute of the blocks at ``start`` and after in ``container``.

    Hugging Face attention modules index their cache by ``layer_idx``; after inserting a
    block at ``start`` the ones from there on moved down by one. Returns the modules changed.
    """
    root = gm.module
    seq = root.get_submodule(container)
    changed = []
    for j in range(start, len(seq)):
        for sub, m in seq[j].named_modules():
            value = m.__dict__.get("layer_idx")
            if isinstance(value, int) and not isinstance(value, bool):
                name = ".".join(p for p in (container, str(j), sub) if p)
                gm.edits.attr(root, name, "layer_idx", value + 1)
                changed.append(name)
    return changed


def depth_config_changes(root: nn.Module, container: str, index: int, old_len: int) -> dict[str, Any] | None:
    """Config values that describe ``root`` after a block was inserted at ``index`` of ``container``.

    Hugging Face models rebuild their layers from the config (``num_hidden_layers``, a
    per-stage ``depths`` list, per-layer lists such as ``layer_types``). Candidates are the
    config's integers equal to the old length and list entries equal to it; each is tried by
    building the model from the changed config on the meta device, and the first whose
    parameter names and shapes equal the grown model's is returned. ``{}`` when the model
    has no config, ``None`` when no candidate describes the new structure.
    """
    config = getattr(root, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    want = {k: tuple(v.shape) for k, v in root.state_dict().items()}
    values = config.to_dict()
    candidates: list[dict[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, int) and not isinstance(value, bool) and value == old_len:
            change: dict[str, Any] = {key: value + 1}
            for other, items in values.items():  # per-layer lists follow the layer count
                if other != "architectures" and isinstance(items, list) and len(items) == old_len \
                        and all(isinstance(v, (str, int, float, bool)) or v is None for v in items):
                    change[other] = items[:index] + [items[index - 1]] + items[index:]
            candidates.append(change)
        elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            for j, v in enumerate(value):
                if v == old_len:
                    candidates.append({key: value[:j] + [v + 1] + value[j + 1:]})
    for change in candidates:
        trial = copy.deepcopy(config)
        try:
            for key, value in change.items():
                setattr(trial, key, value)
            with torch.device("meta"):
                fresh = type(root)(trial)
        except Exception:  # a candidate the model cannot even be built from is simply not it
            continue
        if {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == want:
            return change
    return None
