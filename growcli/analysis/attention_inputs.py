"""From an attention's query, key and value inputs back to the projections that produce them.

The walk starts at a ``scaled_dot_product_attention`` input ``[B, heads, L, head_dim]`` and
follows it back through the ops that may sit between it and its projection: the view that
splits features into ``[heads, head_dim]``, transposes, rotary embeddings (element-wise ops,
slices and concatenations inside ``head_dim``), norms over ``head_dim``, the split of a fused
``qkv`` projection and the ``unsqueeze → expand → reshape`` that repeats key/value heads for
grouped-query attention. It ends at a Linear (or Conv1D ``addmm``) and describes its features
as a :class:`Projection`; anything else is refused, with the op and module named. The sites
themselves are in :mod:`growcli.analysis.attention`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from growcli.analysis.trace import (ADDMM, REDUCE, Refuse, Trace, UNARY, VIEW, attr_of, flat_args, merge_groups,
                                    module_of, op_name, reduce_dims, shape, source_dim, where)

aten = torch.ops.aten
# Element-wise ops that may sit between a projection and attention (rotary embeddings, casts, scaling).
ELEMENTWISE = UNARY | {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
# Per-element ops of a norm over head_dim (Qwen3's q_norm/k_norm): each head is normalised on its own.
HEAD_NORM = {aten.rsqrt.default, aten.sqrt.default, aten.reciprocal.default}
MOVES = {aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default, aten.expand.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


@dataclass
class Projection:
    """The features of one projection that an attention reads (or, for ``o``, the columns it writes from).

    ``weight`` is the parameter's name in the trace and ``dim`` the weight dimension indexed by
    those features (rows of a Linear producing q/k/v; columns of the Linear reading the
    attention output; for Conv1D ``addmm`` the other way round). ``offset``/``size`` locate the
    features inside that dimension (a fused ``qkv`` weight holds three projections).
    """

    weight: str
    dim: int
    bias: str | None
    offset: int
    size: int
    module: str


def projection_outputs(trace: Trace) -> set[fx.Node]:
    """Nodes computed from the output of some Linear/addmm (rotary cos/sin and masks are not)."""
    out: set[fx.Node] = set()
    for n in trace.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in (aten.linear.default, ADDMM) or any(isinstance(a, fx.Node) and a in out for a in flat_args(n.args)):
            out.add(n)
    return out


def back_heads(node: fx.Node, h: int, d: int, found: set, repeat: list[int], data: set[fx.Node]) -> None:
    """Follow a tensor whose axis ``h`` indexes heads and ``d`` the head dimension back to its projection.

    Adds ``(projection node, offset)`` pairs to ``found``; ``repeat`` collects the factor by which
    heads were repeated on the way (grouped-query attention); ``data`` holds the nodes computed
    from some projection (the operands worth following through element-wise ops).
    """
    if node.op != "call_function":
        raise Refuse(f"attention input '{node.name}' does not come from a projection")
    t = node.target
    src = node.args[0] if node.args else None
    if t in MOVES:
        nh, nd = source_dim(node, h), source_dim(node, d)
        if nh is None or nd is None:
            raise Refuse(f"{op_name(node)}{where(node)} moves the heads in a way growcli cannot follow")
        return back_heads(src, nh, nd, found, repeat, data)
    if t in VIEW:
        ins, outs = shape(src), shape(node)
        if ins == outs:
            return back_heads(src, h, d, found, repeat, data)
        for (a, b), (c, e) in merge_groups(ins, outs) or []:
            if (c, e) == (h, d + 1) and d == h + 1 and b - a == 1:  # [.., H·hd] → [.., H, hd]: the head split
                return _back_features(src, a, 0, found)
            if (c, e) == (h, h + 1) and b - a == 2 and source_dim(node, d) is not None:
                # [.., Hkv, G, ..] → [.., Hkv·G, ..]: heads repeated by an expand below this reshape
                repeat.append(ins[a + 1])
                return _back_repeat(src, a, a + 1, source_dim(node, d), found, repeat, data)
        raise Refuse(f"{op_name(node)}{where(node)} reshapes the attention heads in a way growcli cannot follow")
    if t in UNARY or t in HEAD_NORM:
        return back_heads(src, h, d, found, repeat, data)
    if t in REDUCE and len(shape(node)) == len(shape(src)) and reduce_dims(node, len(shape(src))) == [d]:
        return back_heads(src, h, d, found, repeat, data)  # a statistic over head_dim (kept as size 1)
    if t in ELEMENTWISE:
        size, rank = shape(node)[h], len(shape(node))
        followed = False
        for arg in node.args:
            s = shape(arg)
            if s is None or arg not in data:
                continue  # a literal, or a tensor not computed from a projection (rotary cos/sin, a mask)
            off = rank - len(s)
            if h - off < 0 or s[h - off] == 1 and size > 1:
                continue  # broadcast over the heads: the same for every head, whatever their number
            back_heads(arg, h - off, d - off, found, repeat, data)
            followed = True
        if not followed:
            raise Refuse(f"{op_name(node)}{where(node)} produces the attention input from no projection")
        return
    if t == aten.cat.default:
        if node.args[1] % len(shape(node)) != d:
            raise Refuse(f"cat{where(node)} concatenates attention heads")
        for part in node.args[0]:
            back_heads(part, h, d, found, repeat, data)
        return
    if t == aten.slice.Tensor:
        if node.args[1] % len(shape(node)) == h:
            raise Refuse(f"slice{where(node)} takes some of the attention heads")
        return back_heads(src, h, d, found, repeat, data)
    raise Refuse(f"{op_name(node)}{where(node)} sits between a projection and the attention, and growcli has no rule for it")


def _back_repeat(node: fx.Node, h: int, r: int, d: int, found: set, repeat: list[int], data: set[fx.Node]) -> None:
    """Below a ``[Hkv, G] → H`` reshape: axis ``r`` must come from expanding an unsqueezed axis (a true repeat)."""
    src = node.args[0] if node.target == aten.expand.default else None
    if src is not None and src.target == aten.unsqueeze.default and len(shape(src)) == len(shape(node)) \
            and src.args[1] % len(shape(src)) == r:
        inner = src.args[0]
        fix = lambda a: a - 1 if a > r else a  # noqa: E731  (the unsqueezed axis disappears)
        return back_heads(inner, fix(h), fix(d), found, repeat, data)
    raise Refuse(f"{op_name(node)}{where(node)} builds repeated key/value heads in a way growcli cannot follow")


def _back_features(node: fx.Node, f: int, offset: int, found: set) -> None:
    """Follow a tensor whose axis ``f`` holds ``heads·head_dim`` features (from ``offset``) back to its projection."""
    if node.op != "call_function":
        raise Refuse(f"attention features '{node.name}' do not come from a projection")
    t = node.target
    if t in VIEW:
        src_f = source_dim(node, f)
        if src_f is None:
            raise Refuse(f"{op_name(node)}{where(node)} reshapes the attention features")
        return _back_features(node.args[0], src_f, offset, found)
    if t in UNARY:
        return _back_features(node.args[0], f, offset, found)
    if t == operator.getitem and node.args[0].op == "call_function" and node.args[0].target in SPLITS:
        split = node.args[0]
        x, sizes = split.args[0], split.args[1]
        dim = (split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)) % len(shape(x))
        if dim != f:
            raise Refuse(f"split{where(split)} divides another dimension than the features")
        i = node.args[1]
        start = sum(sizes[:i]) if isinstance(sizes, (list, tuple)) else i * sizes
        return _back_features(x, f, offset + start, found)
    if t == aten.linear.default and f == len(shape(node)) - 1 and attr_of(node.args[1]):
        found.add((node, offset))
        return
    if t == ADDMM and f == 1 and attr_of(node.args[2]):
        found.add((node, offset))
        return
    raise Refuse(f"{op_name(node)}{where(node)} produces attention features and growcli has no rule for it")


def projection_in(node: fx.Node, offset: int, size: int) -> Projection:
    """The features ``[offset, offset+size)`` produced by a linear/addmm node."""
    if node.target == ADDMM:
        return Projection(attr_of(node.args[2]), 1, attr_of(node.args[0]), offset, size, module_of(node))
    bias = attr_of(node.args[2]) if len(node.args) > 2 else None
    return Projection(attr_of(node.args[1]), 0, bias, offset, size, module_of(node))

