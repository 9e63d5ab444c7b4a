"""Forward rules of the coupled-channel analysis: what each op does with channels it reads.

For every user of a tensor carrying the channels, the rule of its op says where the channels
go: element-wise ops pass them on, other full-size operands of a binary op join them (a
residual add, a gate), Linear/Conv/``addmm`` layers that read them become consumers (grouped
and depthwise convolutions follow them; a Linear over another dim passes them on, as in MLP-Mixer
token mixing), views (``reshape_as``/``view_as``/``expand_as`` too: the other tensor lends only its
shape), selections and every permutation form (``x.mT``, ``x.T``, ``transpose``, ``permute``,
``movedim``, …) move them to another dimension, indexed writes and reads along other
dims keep them (:mod:`growcli.analysis.indexing`: ``index_put``, ``x[idx]``, ``index_add``; :mod:`growcli.analysis.scatter`:
``gather``, ``scatter_add``, ``index_select``, ``stack``, ``unbind``),
concatenation and flattening make derived layouts, LayerNorm, RMSNorm and GroupNorm over them
pass them on and are recorded, exact only by whole copies (:mod:`growcli.analysis.norms`), and pooling
and reductions over them are refused; products by a parameter (:mod:`growcli.analysis.matmuls`: ``x @ W.T``,
fused experts' grouped and batched matmuls, ``w[e]`` per group of rows) read them like a Linear, in every
expert. An op without a rule makes the layer not growable, with the op and
module named — never assumed element-wise. The backward rules, the entry point and fused projections
(one producer split into gate and up) are in :mod:`growcli.analysis.coupling`.
"""

from __future__ import annotations

import math
import operator

from torch import fx

from growcli.analysis.coupled_group import ViewPatch
from growcli.analysis.indexing import IndexRules
from growcli.analysis.layouts import CORE, Cat, Fixed, Layout, Merge
from growcli.analysis.matmuls import ParamMatmul, is_grouped_mm, param_matmul
from growcli.analysis.pooling import PER_CHANNEL, pooled_values
from growcli.analysis.norms import GROUP_NORM, LAYER_NORMS, NormRules
from growcli.analysis.scatter import ROW_MOVES, ScatterRules
from growcli.analysis.trace import (ADDMM, BATCH_NORM, BINARY, CONV, CONV_TRANSPOSE, METADATA_CHECKS, PAD, PERMUTES,
                                    INDEX_PUT, REDUCE, REINDEX, Refuse, SHAPE_AS, UNARY, VIEW, aten, attr_of, conv_groups,
                                    conv_transposed, conv_weight_dims, in_place, index_result_dim, merge_groups, op_name,
                                    permutation, reduce_dims, shape, where)


ELEMENTWISE = UNARY | in_place(UNARY)
ELEMENTWISE_N = BINARY | in_place(BINARY)
# A new tensor of its input's shape with values that do not depend on it (every channel the same): positions follow.
LIKE = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default}
# Reads only a tensor's dtype and device (the size is a literal) or its sizes: no channel values are read.
SHAPE_ONLY = {aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
              aten.sym_size.int, aten.sym_size.default, aten.size.int, aten.size.default, aten.sym_numel.default,
              aten.sym_stride.int, aten.sym_stride.default}


def roll_dims(node: fx.Node) -> list[int]:
    """The dimensions a ``roll`` shifts along (none given: the flattened tensor, which moves every dimension)."""
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", [])
    return [d % len(shape(node)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]


class ForwardRules(IndexRules, ScatterRules, NormRules):
    """The forward half of the walk (see module docstring); :class:`growcli.analysis.coupling.Analysis`
    adds producers and the backward rules."""

    # -- forward rules
    def _forward(self, src: fx.Node, node: fx.Node) -> None:
        dim, layout = self._state(src)
        if node.op == "output":
            raise Refuse("the channels reach the model's output (widening would change the output shape)")
        if node.op != "call_function":
            raise Refuse(f"{node.op} {node.target} uses the channels")
        t = node.target
        if t in METADATA_CHECKS or t in SHAPE_ONLY:
            return
        if t == aten.type_as.default and node.args[0] is not src:
            return  # ``y.type_as(x)`` takes only x's dtype
        if t in LIKE:
            self._propagate(src, node, dim)  # the same value at every position, whatever the number of channels
        elif t in ELEMENTWISE:
            if node.args[0] is not src:
                raise Refuse(f"{op_name(node)}{where(node)} uses the channels as a parameter")
            self._propagate(src, node, dim)
        elif t in ELEMENTWISE_N:
            self._binary(node, None, backward=False)
        elif t == aten.roll.default:
            dims = roll_dims(node)
            if not dims or dim in dims:
                raise Refuse(f"roll{where(node)} moves entries along the grown dimension")
            self._propagate(src, node, dim)  # positions move (shifted windows), channels do not
        elif (product := param_matmul(node)) is not None:
            self._param_matmul(src, node, dim, layout, product)
        elif is_grouped_mm(node):
            raise Refuse(f"{op_name(node)}{where(node)} with a computed weight reads the channels")
        elif t in BATCH_NORM:
            if node.args[0] is not src or dim != 1:
                raise Refuse(f"batch norm{where(node)} normalises another dimension than the channels")
            self._batch_norm_params(node, layout)
            if t == aten.batch_norm.default:
                self._propagate(src, node, dim)
            else:
                for u in node.users:
                    if u.target == operator.getitem and u.args[1] == 0:
                        self._propagate(src, u, dim)
        elif t == operator.getitem:
            raise Refuse(f"item {node.args[1]} of {op_name(src)}{where(src)} is not understood")
        elif t == aten.prelu.default:
            n = shape(node.args[1])
            if n and n[0] > 1:
                if dim != 1:
                    raise Refuse(f"PReLU{where(node)} has per-channel slopes along another dimension")
                self._use(attr_of(node.args[1]), 0, "copy", layout)
            self._propagate(src, node, dim)
        elif t == aten.linear.default:
            self._linear(src, node, dim, layout)
        elif t == ADDMM:
            self._addmm(src, node, dim, layout)
        elif t in CONV or t in CONV_TRANSPOSE:
            self._conv(src, node, dim, layout)
        elif t in REDUCE:
            dims = reduce_dims(node, len(shape(src)))
            if dim in dims:
                raise Refuse(f"{op_name(node)}{where(node)} reduces over the grown dimension "
                             "(a normalisation or mean over the channels)")
            keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
            self._propagate(src, node, dim if keep else dim - sum(1 for d in dims if d < dim))
        elif t in PER_CHANNEL:  # pooling, x.max(dim): each channel on its own (indices refused when used)
            for values, new in pooled_values(node, src, dim):
                self._propagate(src, values, new)
        elif t in SHAPE_AS:
            self._shape_as(src, node, dim, layout)
        elif t in VIEW:
            self._view(src, node, dim, layout)
        elif t in REINDEX:
            if node.args[0] is not src:
                raise Refuse(f"{op_name(node)}{where(node)} uses the channels as an argument")
            self._reindex(src, node, dim)
        elif t == aten.cat.default:
            self._cat(src, node, dim)
        elif t in INDEX_PUT:
            self._index_put(src, node, dim)
        elif t == aten.index.Tensor:  # x[idx]: rows gathered along the indexed dims, the others in place
            at = index_result_dim(node.args[1], len(shape(src)), dim) if node.args[0] is src else None
            if at is None:
                raise Refuse(f"index{where(node)} indexes along the grown dimension or uses the channels as indices")
            self._propagate(src, node, at[0])
        elif t in (aten.index_add.default, aten.index_add_.default):
            self._index_add(src, node, dim)
        elif t in ROW_MOVES:  # gather, scatter, index_select, stack, unbind along other dims
            self._row_move(src, node, dim)
        elif t in PAD:
            pads = list(node.args[1])
            rank = len(shape(src))
            k = rank - 1 - dim  # the grown dim's position counted from the last dim
            if node.args[0] is not src or (2 * k + 1 < len(pads) and (pads[2 * k] or pads[2 * k + 1])):
                raise Refuse(f"{op_name(node)}{where(node)} pads the grown dimension")
            self._propagate(src, node, dim)
        elif t in LAYER_NORMS:  # over the channels: exact by whole copies (growcli.analysis.norms)
            self._layer_norm(src, node, dim, layout)
        elif t == GROUP_NORM:
            self._group_norm(src, node, dim, layout)
        elif t == aten.embedding.default:
            raise Refuse(f"embedding{where(node)} uses the channels as indices")
        else:
            raise Refuse(f"{op_name(node)}{where(node)} uses the channels and growcli has no rule for it "
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
                raise Refuse(f"{op_name(node)}{where(node)} combines concatenated or flattened channels with another tensor")
            fqn = attr_of(a)
            if fqn is not None:
                self._use(fqn, d, "copy")
            else:
                self._mark(a, d, backward=True)
        if derived:
            if len(layouts) > 1:
                raise Refuse(f"{op_name(node)}{where(node)} combines two concatenated or flattened tensors")
            self._mark_derived(node, dim_hint, next(self._state(a)[1] for a in tensors if a in self.derived))
        elif not backward:
            self._mark(node, dim_hint, backward=False)
        elif node not in self.core:
            self._mark(node, dim_hint, backward=False)

    def _batch_norm_params(self, node: fx.Node, layout: Layout) -> None:
        for arg in node.args[1:5]:
            fqn = attr_of(arg)
            if fqn is not None:
                self._use(fqn, 0, "copy", layout)

    def _linear(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout) -> None:
        if node.args[0] is not src:
            raise Refuse(f"linear{where(node)} uses the channels as its weight")
        if dim != len(shape(src)) - 1:
            self._propagate(src, node, dim)  # channels are a batch dimension of this Linear
            return
        w = attr_of(node.args[1])
        if w is None:
            raise Refuse(f"linear{where(node)} with a computed weight reads the channels")
        self._use(w, 1, "consumer", layout)

    def _addmm(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout) -> None:
        """``bias + x @ W`` reading the channels in ``x``'s last dim: rows of ``W`` are the consumer."""
        if node.args[1] is not src or dim != 1:
            raise Refuse(f"addmm{where(node)} uses the channels as its bias or weight")
        w = attr_of(node.args[2])
        if w is None:
            raise Refuse(f"addmm{where(node)} with a computed weight reads the channels")
        self._use(w, 0, "consumer", layout)

    def _param_matmul(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout, m: ParamMatmul) -> None:
        """A product by a parameter (``x @ W.T``, ``bmm(x, w[ids])``, a grouped matmul): channels in the data's
        contracted dim read the weight's matching dim (in every expert), like a Linear's columns; channels in a
        dim the product keeps (rows of ``x``) pass to the same output dim."""
        if m.data is not src:
            raise Refuse(f"{op_name(node)}{where(node)} uses the channels as its weight")
        if dim == m.data_dim:
            self._use(m.fqn, m.weight_in, "consumer", layout)
        elif dim in m.kept:
            self._propagate(src, node, dim)
        else:
            raise Refuse(f"{op_name(node)}{where(node)} reads the channels in its batch dimension or group offsets")

    def _conv(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout) -> None:
        if node.args[0] is not src:
            raise Refuse(f"convolution{where(node)} uses the channels as its weight")
        w_shape = shape(node.args[1])
        if dim != len(shape(src)) - (len(w_shape) - 2) - 1:
            raise Refuse(f"convolution{where(node)} reads the channels in a spatial dimension")
        w = attr_of(node.args[1])
        if w is None:
            raise Refuse(f"convolution{where(node)} with a computed weight reads the channels")
        groups, transposed = conv_groups(node), conv_transposed(node)
        c_in, c_out = shape(src)[dim], w_shape[1] * groups if transposed else w_shape[0]
        if groups == 1:
            self._use(w, conv_weight_dims(node)[1], "consumer", layout)
        elif groups == c_in and c_out == c_in:  # depthwise: weight [C, 1, k…] in either layout
            if src not in self.core:
                raise Refuse(f"depthwise convolution{where(node)} after a concatenation or flatten")
            self._use(w, 0, "copy")
            b = attr_of(node.args[2]) if len(node.args) > 2 else None
            if b:
                self._use(b, 0, "copy")
            self.group.depthwise.append(w.rsplit(".", 1)[0])
            self._mark(node, 1, backward=False)
        elif groups == c_in:
            raise Refuse(f"depthwise convolution{where(node)} with a channel multiplier of {c_out // c_in}")
        elif transposed:
            raise Refuse(f"transposed convolution{where(node)} reads the channels in {groups} groups; growcli grows "
                         "the input channels of transposed convolutions with groups=1 or depthwise only")
        else:
            if src not in self.core:
                raise Refuse(f"grouped convolution{where(node)} after a concatenation or flatten")
            self.group_groups(groups)
            self._use(w, 1, "grouped_consumer", CORE, groups)

    def _shape_as(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout) -> None:
        """``a.reshape_as(b)``, ``a.view_as(b)``, ``a.expand_as(b)``: from ``a`` the rule of the view or expand it
        equals; ``b`` gives only its shape, so the output and ``b`` carry the channels in the same dim, and ``a``
        must carry them too (backward rule). No literal size to patch: the shape follows ``b`` at run time."""
        a, b = node.args[0], node.args[1]
        if layout is not CORE:
            raise Refuse(f"{op_name(node)}{where(node)} reshapes concatenated or flattened channels to another "
                         "tensor's shape")
        if src is a:
            if SHAPE_AS[node.target] == aten.expand.default:
                self._propagate(src, node, dim + len(shape(node)) - len(shape(src)))
            else:
                self._view(src, node, dim, layout, patch=False)
            if node not in self.core:
                raise Refuse(f"{op_name(node)}{where(node)} merges the grown dimension with others")
        if isinstance(b, fx.Node):  # b has the output's shape: it carries the channels where the output does
            self._mark(b, self.core[node] if src is a else dim, backward=True)
        if src is b:
            self._mark(node, dim, backward=True)

    def _view(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout, patch: bool = True) -> None:
        ins, outs = shape(src), shape(node)
        groups = merge_groups(ins, outs)
        if groups is None:
            raise Refuse(f"{op_name(node)}{where(node)} reshapes the channels in a way growcli cannot follow")
        for (a, b), (c, d) in groups:
            if not a <= dim < b:
                continue
            big = [k for k in range(c, d) if outs[k] > 1]
            if len(big) > 1:
                raise Refuse(f"{op_name(node)}{where(node)} splits the grown dimension into {list(outs[c:d])} "
                             "(e.g. attention heads); grow whole heads instead")
            target = big[0] if big else c
            before, after = math.prod(ins[a:dim]), math.prod(ins[dim + 1:b])
            if patch and self.trace.is_model and node.target != aten.flatten.using_ints:
                self.group.patches.append(ViewPatch(node.name, target, layout if before * after == 1 else Merge(layout, before, after)))
            if before * after == 1:
                self._propagate(src, node, target)
            else:
                self._mark_derived(node, target, Merge(layout, before, after))
            return
        raise Refuse(f"{op_name(node)}{where(node)} reshapes the channels in a way growcli cannot follow")

    def _reindex(self, src: fx.Node, node: fx.Node, dim: int) -> None:
        t = node.target
        rank = len(shape(src))
        if t in PERMUTES:  # the channels go where the permutation puts their dim
            new = permutation(node, rank).index(dim)
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
                raise Refuse(f"select{where(node)} picks a single channel")
            new = dim - (1 if d < dim else 0)
        else:  # slice
            d = node.args[1] % rank if len(node.args) > 1 else 0
            if d == dim:
                if shape(node)[dim] != shape(src)[dim]:
                    raise Refuse(f"slice{where(node)} takes part of the grown dimension")
            new = dim
        self._propagate(src, node, new)

    def _cat(self, src: fx.Node, node: fx.Node, dim: int) -> None:
        tensors = node.args[0]
        rank = len(shape(node))
        cat_dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        if cat_dim != dim:
            for a in tensors:  # concatenation along another dim: every part must carry the channels
                if a not in self.core and a not in self.derived:
                    if attr_of(a) is not None:
                        self._use(attr_of(a), dim, "copy")
                    else:
                        self._mark(a, dim, backward=True)
            self._propagate(src, node, dim)
            return
        if node in self.derived:
            raise Refuse(f"cat{where(node)} concatenates the channels with themselves")
        # Laid out once the walk has reached every part that carries the channels (pooled features of one layer).
        self.pending.setdefault(node, dim)

    def _lay_out_cat(self, node: fx.Node, dim: int) -> None:
        """The concatenation's positions: each part carrying the channels at its offset, the others fixed."""
        parts: list[Layout] = []
        for i, a in enumerate(node.args[0]):
            st = self._state(a)
            if st is not None and st[0] != dim:
                raise Refuse(f"cat{where(node)} concatenates tensors carrying the channels in different dimensions")
            parts.append(st[1] if st is not None else Fixed(shape(a)[dim], f"{node.name}:{i}"))
        self._mark_derived(node, dim, Cat(parts))
