"""Tracing and coupled-channel analysis: which tensor dimensions must grow together.

A model is traced with ``torch.export`` to an ATen graph whose parameters are ``get_attr``
nodes named by their fully qualified names. Starting at a producer layer's output, the
analysis walks the graph forwards (and backwards where an operation ties another tensor to
the same channels, e.g. a residual add) and collects every parameter dimension indexed by
those channels, with the role it plays:

- ``producer``: rows of a Linear / output channels of a Conv / columns of an Embedding;
- ``copy``: per-channel parameters and buffers (BatchNorm, PReLU, layer scales, biases);
- ``consumer``: input columns of the Linear/Conv layers that read the channels.

Positions along a grown dimension are described by a :class:`Layout`, a function from the
channel list ``g`` (new index → source channel) to position keys; this covers
concatenation (offsets) and flattening ``C×H×W`` into features (each channel owns ``H·W``
columns). Every operation has an explicit rule; an operation without one makes the layer
not growable, with the operation and module named — never assumed element-wise.

The layouts live in :mod:`growcli.analysis.layouts`, tracing, the op tables and node helpers in
:mod:`growcli.analysis.trace`; both are re-exported here, where the rest of growcli imports them from.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from growcli.core.errors import NotGrowableError
# Re-exported: growcli.analysis.coupling stays the one import for the analysis and its vocabulary.
from growcli.analysis.layouts import CORE, Cat, Core, Fixed, Key, Layout, Merge  # noqa: F401
from growcli.analysis.trace import (ADDMM, BATCH_NORM, BINARY, CONV, METADATA_CHECKS, PAD, POOL, REDUCE, REINDEX,  # noqa: F401
                           UNARY, VIEW, Trace, _conv_groups, _merge_groups, _prod, _source_dim, aten, op_name, shape,
                           reduce_dims, where)
from growcli.analysis.trace import trace_model as _trace_model


# --------------------------------------------------------------------------- analysis result
@dataclass
class TensorUse:
    """One parameter dimension indexed by the group's channels."""

    fqn: str
    dim: int
    role: str  # producer | copy | consumer | grouped_consumer
    layout: Layout = CORE
    groups: int = 1


@dataclass
class ViewPatch:
    """A view/reshape whose literal target size must follow the group (only in .pt2 programs)."""

    node: str
    out_dim: int
    layout: Layout


@dataclass
class Group:
    """Everything that grows together with a layer's output channels."""

    layer: str
    size: int
    producers: list[str] = field(default_factory=list)
    uses: list[TensorUse] = field(default_factory=list)
    groups: int = 1  # channels must grow group by group (grouped convolutions)
    depthwise: list[str] = field(default_factory=list)  # conv modules whose ``groups`` follows the size
    patches: list[ViewPatch] = field(default_factory=list)

    def describe(self) -> list[str]:
        return [f"{u.fqn} (dim {u.dim}, {u.role})" for u in self.uses]


class _Refuse(Exception):
    pass


class Analysis:
    """Coupled-channel analysis of one producer layer's output (see module docstring)."""

    def __init__(self, trace: Trace, layer: str):
        self.trace = trace
        self.layer = layer
        self.users = trace.weight_users()
        self.core: dict[fx.Node, int] = {}
        self.derived: dict[fx.Node, tuple[int, Layout]] = {}
        self.work: list[tuple[str, fx.Node]] = []
        self.group: Group | None = None
        self._uses: dict[str, TensorUse] = {}

    # -- entry
    def run(self) -> Group:
        weight = f"{self.layer}.weight" if self.layer else "weight"
        users = self.users.get(weight)
        if users is None:
            raise NotGrowableError(f"'{self.layer}' has no weight parameter used by the traced model")
        ops = [u for u in users if u.op == "call_function"]
        if len(ops) != 1:
            raise NotGrowableError(f"'{self.layer}' is used {len(ops)} times in the forward pass (shared weights); "
                                   "growing it would change every use")
        node = ops[0]
        self.group = Group(self.layer, 0)
        try:
            dim = self._producer(node, weight)
            self.group.size = shape(node)[dim]
            self.group.producers.append(self.layer)
            self._mark(node, dim, backward=False)
            self._drain()
        except _Refuse as exc:
            raise NotGrowableError(f"'{self.layer}': {exc}") from None
        self.group.uses = list(self._uses.values())
        return self.group

    # -- bookkeeping
    def _use(self, fqn: str, dim: int, role: str, layout: Layout = CORE, groups: int = 1) -> None:
        prev = self._uses.get(fqn)
        if prev is not None:
            if (prev.dim, prev.role) != (dim, role):
                raise _Refuse(f"parameter {fqn} is tied to the channels in two ways ({prev.role} dim {prev.dim}, {role} dim {dim})")
            return
        owners = [u for u in self.users.get(fqn, []) if u.op == "call_function"]
        if len(owners) > 1 and role != "copy":
            raise _Refuse(f"parameter {fqn} is shared by {len(owners)} operations (tied weights)")
        self._uses[fqn] = TensorUse(fqn, dim, role, layout, groups)

    def _attr(self, arg: Any) -> str | None:
        return str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None

    def _mark(self, node: fx.Node, dim: int, backward: bool) -> None:
        if node in self.core:
            if self.core[node] != dim:
                raise _Refuse(f"{op_name(node)}{where(node)} carries the channels in two different dimensions")
            return
        if node in self.derived:
            raise _Refuse(f"{op_name(node)}{where(node)} mixes concatenated or flattened channels with the group")
        size = shape(node)
        if size is None or dim >= len(size) or size[dim] != self.group.size:
            raise _Refuse(f"{op_name(node)}{where(node)} does not carry the {self.group.size} channels in dimension {dim}")
        self.core[node] = dim
        self.work.append(("fwd", node))
        if backward:
            self.work.append(("bwd", node))

    def _mark_derived(self, node: fx.Node, dim: int, layout: Layout) -> None:
        if node in self.core or node in self.derived:
            raise _Refuse(f"{op_name(node)}{where(node)} is reached by the channels twice")
        self.derived[node] = (dim, layout)
        self.work.append(("fwd", node))

    def _drain(self) -> None:
        while self.work:
            kind, node = self.work.pop(0)
            if kind == "fwd":
                for user in list(node.users):
                    self._forward(node, user)
            else:
                self._backward(node)

    def _state(self, node: fx.Node) -> tuple[int, Layout] | None:
        if node in self.core:
            return self.core[node], CORE
        return self.derived.get(node)

    def _propagate(self, src: fx.Node, dst: fx.Node, dim: int) -> None:
        """``dst`` carries ``src``'s positions (core or derived) at ``dim``."""
        if src in self.core:
            self._mark(dst, dim, backward=False)
        else:
            self._mark_derived(dst, dim, self.derived[src][1])

    # -- producers
    def _producer(self, node: fx.Node, weight_fqn: str) -> int:
        """Register ``node`` (linear/conv/embedding using ``weight_fqn``) as a producer; returns its channel dim."""
        out = shape(node)
        t = node.target
        if t == aten.linear.default:
            self._use(weight_fqn, 0, "producer")
            if len(node.args) > 2 and self._attr(node.args[2]):
                self._use(self._attr(node.args[2]), 0, "producer")
            return len(out) - 1
        if t in CONV:
            groups = _conv_groups(node)
            if t == aten.convolution.default and node.args[6]:
                raise _Refuse("transposed convolutions are not supported yet")
            w = shape(node.args[1])
            if groups > 1:
                if groups == w[0] and w[1] == 1:
                    raise _Refuse("a depthwise convolution's channels follow its input; widen the layer that feeds it")
                self.group_groups(groups)
            self._use(weight_fqn, 0, "producer")
            if len(node.args) > 2 and self._attr(node.args[2]):
                self._use(self._attr(node.args[2]), 0, "producer")
            return len(out) - (len(w) - 2) - 1
        if t == aten.embedding.default:
            self._use(weight_fqn, 1, "producer")
            return len(out) - 1
        if t == ADDMM and self._attr(node.args[2]) == weight_fqn:
            self._use(weight_fqn, 1, "producer")  # x @ W: W is [in, out]
            if self._attr(node.args[0]):
                self._use(self._attr(node.args[0]), 0, "producer")
            return len(out) - 1
        raise _Refuse(f"its weight is used by {op_name(node)}, which growcli cannot widen (Linear, Conv and Embedding can be)")

    def group_groups(self, groups: int) -> None:
        if self.group.groups not in (1, groups):
            raise _Refuse(f"grouped convolutions with {self.group.groups} and {groups} groups share the channels")
        else:
            self.group.groups = groups

    # -- backward: a tensor must carry the channels; its producer joins the group
    def _backward(self, node: fx.Node) -> None:
        dim = self.core[node]
        if node.op == "placeholder":
            raise _Refuse(f"the channels are tied to the model input '{node.target}'")
        if node.op == "get_attr":
            self._use(str(node.target), dim, "copy")
            return
        t = node.target
        if t in (aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                 aten.convolution.default, aten.embedding.default, ADDMM):
            w = self._attr(node.args[0] if t == aten.embedding.default else node.args[2] if t == ADDMM else node.args[1])
            if w is None:
                raise _Refuse(f"{op_name(node)}{where(node)} has a computed weight")
            own = self._producer(node, w)
            if own != dim:
                raise _Refuse(f"{op_name(node)}{where(node)} produces the channels in another dimension")
            self.group.producers.append(w.rsplit(".", 1)[0])
            return
        if t in UNARY or t == operator.getitem and node.args[1] == 0:
            src = node.args[0]
            if t == operator.getitem:
                self._backward_multi(src, dim)
                return
            self._mark(src, dim, backward=True)
            return
        if t in BINARY:
            self._binary(node, dim, backward=True)
            return
        if (t in POOL and t != aten.max_pool2d_with_indices.default or t in PAD) and dim < len(shape(node)) - POOL.get(t, 0):
            self._mark(node.args[0], dim, backward=True)  # per-channel: its input carries the same channels
            return
        if t in BATCH_NORM:
            self._batch_norm_params(node, CORE)
            self._mark(node.args[0], dim, backward=True)
            return
        if t in REINDEX or t in VIEW:
            src_dim = _source_dim(node, dim)
            if src_dim is None:
                raise _Refuse(f"{op_name(node)}{where(node)} produces a tensor that must share the channels "
                              "from a reshaped or selected one, which growcli cannot follow back")
            if shape(node.args[0])[src_dim] == 1 and t == aten.expand.default:
                return  # broadcast: the same value for every channel, whatever their number
            src = node.args[0]
            if src.op == "get_attr":
                self._use(str(src.target), src_dim, "copy")
            else:
                self._mark(src, src_dim, backward=True)
            return
        raise _Refuse(f"{op_name(node)}{where(node)} produces a tensor that must share the channels, "
                      "and growcli has no rule to grow it")

    def _backward_multi(self, src: fx.Node, dim: int) -> None:
        if src.target in BATCH_NORM:
            self._batch_norm_params(src, CORE)
            self._mark(src.args[0], dim, backward=True)
        else:
            raise _Refuse(f"{op_name(src)}{where(src)} produces a tensor that must share the channels")

    # -- forward rules
    def _forward(self, src: fx.Node, node: fx.Node) -> None:
        dim, layout = self._state(src)
        if node.op == "output":
            raise _Refuse("the channels reach the model's output (widening would change the output shape)")
        if node.op != "call_function":
            raise _Refuse(f"{node.op} {node.target} uses the channels")
        t = node.target
        if t in METADATA_CHECKS:
            return
        if t == aten.type_as.default and node.args[0] is not src:
            return  # ``y.type_as(x)`` takes only x's dtype
        if t in UNARY:
            if node.args[0] is not src:
                raise _Refuse(f"{op_name(node)}{where(node)} uses the channels as a parameter")
            self._propagate(src, node, dim)
        elif t in BINARY:
            self._binary(node, None, backward=False)
        elif t in BATCH_NORM:
            if node.args[0] is not src or dim != 1:
                raise _Refuse(f"batch norm{where(node)} normalises another dimension than the channels")
            self._batch_norm_params(node, layout)
            if t == aten.batch_norm.default:
                self._propagate(src, node, dim)
            else:
                for u in node.users:
                    if u.target == operator.getitem and u.args[1] == 0:
                        self._propagate(src, u, dim)
        elif t == operator.getitem:
            raise _Refuse(f"item {node.args[1]} of {op_name(src)}{where(src)} is not understood")
        elif t == aten.prelu.default:
            n = shape(node.args[1])
            if n and n[0] > 1:
                if dim != 1:
                    raise _Refuse(f"PReLU{where(node)} has per-channel slopes along another dimension")
                self._use(self._attr(node.args[1]), 0, "copy", layout)
            self._propagate(src, node, dim)
        elif t == aten.linear.default:
            self._linear(src, node, dim, layout)
        elif t == ADDMM:
            self._addmm(src, node, dim, layout)
        elif t in CONV:
            self._conv(src, node, dim, layout)
        elif t in REDUCE:
            dims = reduce_dims(node, len(shape(src)))
            if dim in dims:
                raise _Refuse(f"{op_name(node)}{where(node)} reduces over the grown dimension "
                              "(a normalisation or mean over the channels)")
            keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
            self._propagate(src, node, dim if keep else dim - sum(1 for d in dims if d < dim))
        elif t in POOL:
            if dim >= len(shape(src)) - POOL[t]:
                raise _Refuse(f"{op_name(node)}{where(node)} pools over the grown dimension")
            if t == aten.max_pool2d_with_indices.default:
                for u in node.users:
                    if u.target != operator.getitem or u.args[1] != 0:
                        raise _Refuse(f"the pooling indices{where(node)} are used")
                    self._propagate(src, u, dim)
            else:
                self._propagate(src, node, dim)
        elif t in VIEW:
            self._view(src, node, dim, layout)
        elif t in (aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
                   aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.select.int, aten.slice.Tensor):
            self._reindex(src, node, dim)
        elif t == aten.cat.default:
            self._cat(src, node, dim)
        elif t in PAD:
            pads = list(node.args[1])
            rank = len(shape(src))
            k = rank - 1 - dim  # the grown dim's position counted from the last dim
            if node.args[0] is not src or (2 * k + 1 < len(pads) and (pads[2 * k] or pads[2 * k + 1])):
                raise _Refuse(f"{op_name(node)}{where(node)} pads the grown dimension")
            self._propagate(src, node, dim)
        elif t == aten.layer_norm.default:
            rank = len(shape(src))
            if dim >= rank - len(node.args[1]):
                raise _Refuse(f"LayerNorm{where(node)} normalises over the grown dimension "
                              "(its statistics would change; grow the hidden size with the transformer recipes)")
            self._propagate(src, node, dim)
        elif t == aten.group_norm.default:
            raise _Refuse(f"GroupNorm{where(node)} normalises over the grown channels")
        elif t == aten.embedding.default:
            raise _Refuse(f"embedding{where(node)} uses the channels as indices")
        else:
            raise _Refuse(f"{op_name(node)}{where(node)} uses the channels and growcli has no rule for it "
                          "(it is never assumed to be element-wise)")

    def _binary(self, node: fx.Node, dim_hint: int | None, backward: bool) -> None:
        """All full-size operands of an element-wise op share the channels (a residual add, a gate)."""
        out = shape(node)
        tensors = [a for a in node.args if isinstance(a, fx.Node) and shape(a) is not None]
        if node.target == aten.where.self:
            tensors = tensors[1:] if tensors and tensors[0] is node.args[0] else tensors
        # The dimension of the output that carries the channels.
        if dim_hint is None:
            for a in tensors:
                st = self._state(a)
                if st is not None:
                    dim_hint = st[0] + len(out) - len(shape(a))
                    break
        layouts = [self._state(a) for a in tensors if self._state(a) is not None]
        derived = any(a in self.derived for a in tensors)
        for a in tensors:
            s = shape(a)
            d = dim_hint - (len(out) - len(s))
            if d < 0 or s[d] == 1:
                continue  # broadcast along the channels: the same for every channel
            if a in self.core or a in self.derived:
                continue
            if derived:
                raise _Refuse(f"{op_name(node)}{where(node)} combines concatenated or flattened channels with another tensor")
            fqn = self._attr(a)
            if fqn is not None:
                self._use(fqn, d, "copy")
            else:
                self._mark(a, d, backward=True)
        if derived:
            if len(layouts) > 1:
                raise _Refuse(f"{op_name(node)}{where(node)} combines two concatenated or flattened tensors")
            self._mark_derived(node, dim_hint, next(self._state(a)[1] for a in tensors if a in self.derived))
        elif not backward:
            self._mark(node, dim_hint, backward=False)
        elif node not in self.core:
            self._mark(node, dim_hint, backward=False)

    def _batch_norm_params(self, node: fx.Node, layout: Layout) -> None:
        for arg in node.args[1:5]:
            fqn = self._attr(arg)
            if fqn is not None:
                self._use(fqn, 0, "copy", layout)

    def _linear(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout) -> None:
        if node.args[0] is not src:
            raise _Refuse(f"linear{where(node)} uses the channels as its weight")
        if dim != len(shape(src)) - 1:
            self._propagate(src, node, dim)  # channels are a batch dimension of this Linear
            return
        w = self._attr(node.args[1])
        if w is None:
            raise _Refuse(f"linear{where(node)} with a computed weight reads the channels")
        self._use(w, 1, "consumer", layout)

    def _addmm(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout) -> None:
        """``bias + x @ W`` reading the channels in ``x``'s last dim: rows of ``W`` are the consumer."""
        if node.args[1] is not src or dim != 1:
            raise _Refuse(f"addmm{where(node)} uses the channels as its bias or weight")
        w = self._attr(node.args[2])
        if w is None:
            raise _Refuse(f"addmm{where(node)} with a computed weight reads the channels")
        self._use(w, 0, "consumer", layout)

    def _conv(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout) -> None:
        if node.args[0] is not src:
            raise _Refuse(f"convolution{where(node)} uses the channels as its weight")
        w_shape = shape(node.args[1])
        if dim != len(shape(src)) - (len(w_shape) - 2) - 1:
            raise _Refuse(f"convolution{where(node)} reads the channels in a spatial dimension")
        if node.target == aten.convolution.default and node.args[6]:
            raise _Refuse(f"transposed convolution{where(node)} reads the channels (not supported yet)")
        w = self._attr(node.args[1])
        if w is None:
            raise _Refuse(f"convolution{where(node)} with a computed weight reads the channels")
        groups = _conv_groups(node)
        c_in = shape(src)[dim]
        if groups == 1:
            self._use(w, 1, "consumer", layout)
        elif groups == c_in and w_shape[0] == c_in:
            if src not in self.core:
                raise _Refuse(f"depthwise convolution{where(node)} after a concatenation or flatten")
            self._use(w, 0, "copy")
            b = self._attr(node.args[2]) if len(node.args) > 2 else None
            if b:
                self._use(b, 0, "copy")
            self.group.depthwise.append(w.rsplit(".", 1)[0])
            self._mark(node, 1, backward=False)
        elif groups == c_in:
            raise _Refuse(f"depthwise convolution{where(node)} with a channel multiplier of {w_shape[0] // c_in}")
        else:
            if src not in self.core:
                raise _Refuse(f"grouped convolution{where(node)} after a concatenation or flatten")
            self.group_groups(groups)
            self._use(w, 1, "grouped_consumer", CORE, groups)

    def _view(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout) -> None:
        ins, outs = shape(src), shape(node)
        groups = _merge_groups(ins, outs)
        if groups is None:
            raise _Refuse(f"{op_name(node)}{where(node)} reshapes the channels in a way growcli cannot follow")
        for (a, b), (c, d) in groups:
            if not a <= dim < b:
                continue
            big = [k for k in range(c, d) if outs[k] > 1]
            if len(big) > 1:
                raise _Refuse(f"{op_name(node)}{where(node)} splits the grown dimension into {list(outs[c:d])} "
                              "(e.g. attention heads); grow whole heads instead")
            target = big[0] if big else c
            before, after = _prod(ins[a:dim]), _prod(ins[dim + 1:b])
            if self.trace.is_model and node.target != aten.flatten.using_ints:
                self.group.patches.append(ViewPatch(node.name, target, layout if before * after == 1 else Merge(layout, before, after)))
            if before * after == 1:
                self._propagate(src, node, target)
            else:
                self._mark_derived(node, target, Merge(layout, before, after))
            return
        raise _Refuse(f"{op_name(node)}{where(node)} reshapes the channels in a way growcli cannot follow")

    def _reindex(self, src: fx.Node, node: fx.Node, dim: int) -> None:
        t = node.target
        rank = len(shape(src))
        if t == aten.permute.default:
            new = [d % rank for d in node.args[1]].index(dim)
        elif t in (aten.transpose.int, aten.t.default):
            a, b = (node.args[1] % rank, node.args[2] % rank) if t == aten.transpose.int else (0, 1)
            new = b if dim == a else a if dim == b else dim
        elif t == aten.unsqueeze.default:
            k = node.args[1] % (rank + 1)
            new = dim + 1 if k <= dim else dim
        elif t in (aten.squeeze.dim, aten.squeeze.dims):
            ds = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
            ds = [d % rank for d in ds if shape(src)[d % rank] == 1]
            new = dim - sum(1 for d in ds if d < dim)
        elif t == aten.expand.default:
            new = dim + len(shape(node)) - rank
        elif t == aten.select.int:
            d = node.args[1] % rank
            if d == dim:
                raise _Refuse(f"select{where(node)} picks a single channel")
            new = dim - (1 if d < dim else 0)
        else:  # slice
            d = node.args[1] % rank if len(node.args) > 1 else 0
            if d == dim:
                if shape(node)[dim] != shape(src)[dim]:
                    raise _Refuse(f"slice{where(node)} takes part of the grown dimension")
            new = dim
        self._propagate(src, node, new)

    def _cat(self, src: fx.Node, node: fx.Node, dim: int) -> None:
        tensors = node.args[0]
        rank = len(shape(node))
        cat_dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        if cat_dim != dim:
            for a in tensors:  # concatenation along another dim: every part must carry the channels
                if a not in self.core and a not in self.derived:
                    if self._attr(a) is not None:
                        self._use(self._attr(a), dim, "copy")
                    else:
                        self._mark(a, dim, backward=True)
            self._propagate(src, node, dim)
            return
        if node in self.derived:
            raise _Refuse(f"cat{where(node)} concatenates the channels with themselves")
        parts: list[Layout] = []
        for i, a in enumerate(tensors):
            st = self._state(a)
            parts.append(st[1] if st is not None else Fixed(shape(a)[dim], f"{node.name}:{i}"))
        self._mark_derived(node, dim, Cat(parts))


def analyze(trace: Trace, layer: str) -> Group:
    """The coupled group of ``layer``'s output channels, or :class:`NotGrowableError` with the reason."""
    return Analysis(trace, layer).run()


def producer_layers(trace: Trace) -> list[str]:
    """Modules whose ``weight`` feeds a Linear, Conv, Embedding or addmm (Conv1D) op (candidates for widening)."""
    out = []
    for fqn, users in trace.weight_users().items():
        if not (fqn == "weight" or fqn.endswith(".weight")):
            continue
        if any(u.op == "call_function" and (u.target in (aten.linear.default, aten.embedding.default) or u.target in CONV
                                             or u.target == ADDMM and len(u.args) > 2 and getattr(u.args[2], "target", None) == fqn)
               for u in users):
            out.append(fqn[: -len(".weight")] if fqn != "weight" else "")
    return out


# --------------------------------------------------------------------------- tracing a program edited in memory
def trace_model(module: Any, batch: Any) -> Trace:
    """:func:`growcli.analysis.trace.trace_model`, after refreshing a loaded ``.pt2`` program's shape metadata.

    A program is its own trace, so its nodes' recorded shapes go stale once an earlier edit
    (a previous step, or an earlier layer of the same widen) has changed its weights; the
    analysis would then compute offsets (concatenation, flattening) from the old sizes.
    """
    if _stale_shapes(module):
        _refresh_shapes(module, batch)
    return _trace_model(module, batch)


def _stale_shapes(module: Any) -> bool:
    import torch

    if not isinstance(module, fx.GraphModule):
        return False
    for node in module.graph.nodes:
        val = node.meta.get("val") if node.op == "get_attr" else None
        if isinstance(val, torch.Tensor):
            try:
                actual = operator.attrgetter(node.target)(module)
            except AttributeError:
                continue
            if isinstance(actual, torch.Tensor) and tuple(actual.shape) != tuple(val.shape):
                return True
    return False


def _refresh_shapes(module: fx.GraphModule, batch: Any) -> None:
    """Re-run the program on fake copies of ``batch`` to record every node's current shape (best effort)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    from torch.utils import _pytree as pytree

    args, kwargs = batch
    kwargs = dict(kwargs)
    info = getattr(module.graph._codegen, "pytree_info", None)
    spec = getattr(info, "in_spec", None)
    try:
        if spec is not None and kwargs and len(spec.children_specs) == 2 and spec.children_specs[1].context:
            kwargs = {k: kwargs[k] for k in spec.children_specs[1].context if k in kwargs}
        flat = pytree.tree_leaves((tuple(args), kwargs))
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        prop = FakeTensorProp(module, mode)
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in flat]
        with mode:
            prop.run(*fake, enable_io_processing=False)
    except Exception:  # noqa: BLE001 — the old shapes stay; verification still catches a wrong offset
        pass
