"""Attention sites in a traced model: which projection rows and columns belong to which head.

Growing attention heads (GROWTH.md section 6) needs, for every attention, the query, key and
value projections, the output projection, and how their features split into heads. This module
finds them from the ``torch.export`` trace, never from module names: it starts at each
``scaled_dot_product_attention`` op and walks back from its query, key and value inputs to the
Linear (or Conv1D ``addmm``) that produced them, and forward from its output to the projection
that reads it. Every op on those paths must be one it understands — the view that splits
features into ``[heads, head_dim]``, transposes, rotary embeddings (element-wise ops, slices and
concatenations inside ``head_dim``), the split of a fused ``qkv`` projection and the
``unsqueeze → expand → reshape`` that repeats key/value heads for grouped-query attention;
anything else makes heads not growable, with the op and module named.

Features are assumed head-major inside a projection (head ``h`` owns features
``[h·head_dim, (h+1)·head_dim)``), which is what the split view ``[..., H·hd] → [..., H, hd]``
means in row-major order; the walk checks that this view is the only reshape of the features.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from growcli.core.errors import NotGrowableError
from growcli.analysis.trace import flat_args as _flat, reduce_dims as _reduce_dims
from growcli.analysis.coupling import (ADDMM, METADATA_CHECKS, REDUCE, UNARY, VIEW, Trace, _merge_groups, _source_dim, op_name, shape,
                           where)

aten = torch.ops.aten
SDPA = {aten.scaled_dot_product_attention.default}
# Element-wise ops that may sit between a projection and attention (rotary embeddings, casts, scaling).
ELEMENTWISE = UNARY | {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
# Per-element ops of a norm over head_dim (Qwen3's q_norm/k_norm): each head is normalised on its own.
HEAD_NORM = {aten.rsqrt.default, aten.sqrt.default, aten.reciprocal.default}
MOVES = {aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default, aten.expand.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
# Attention kernels that hide their projections (torch.nn.MultiheadAttention's fast path).
FUSED_ATTENTION = {aten._native_multi_head_attention.default} if hasattr(aten, "_native_multi_head_attention") else set()


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


@dataclass
class AttentionSite:
    """One attention: projections, number of query heads, key/value heads and head size."""

    module: str
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def kind(self) -> str:
        if self.kv_heads == self.heads:
            return "multi-head"
        return "multi-query" if self.kv_heads == 1 else "grouped-query"


class _Refuse(Exception):
    pass


def _module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in METADATA_CHECKS)]


def _attr(arg) -> str | None:
    return str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


# --------------------------------------------------------------------------- backward: input → projection
def _from_projection(trace: Trace) -> set[fx.Node]:
    """Nodes computed from the output of some Linear/addmm (rotary cos/sin and masks are not)."""
    out: set[fx.Node] = set()
    for n in trace.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in (aten.linear.default, ADDMM) or any(isinstance(a, fx.Node) and a in out for a in _flat(n.args)):
            out.add(n)
    return out


def _back_heads(node: fx.Node, h: int, d: int, found: set, repeat: list[int], data: set[fx.Node]) -> None:
    """Follow a tensor whose axis ``h`` indexes heads and ``d`` the head dimension back to its projection.

    Adds ``(projection node, offset)`` pairs to ``found``; ``repeat`` collects the factor by which
    heads were repeated on the way (grouped-query attention); ``data`` holds the nodes computed
    from some projection (the operands worth following through element-wise ops).
    """
    if node.op != "call_function":
        raise _Refuse(f"attention input '{node.name}' does not come from a projection")
    t = node.target
    src = node.args[0] if node.args else None
    if t in MOVES:
        nh, nd = _source_dim(node, h), _source_dim(node, d)
        if nh is None or nd is None:
            raise _Refuse(f"{op_name(node)}{where(node)} moves the heads in a way growcli cannot follow")
        return _back_heads(src, nh, nd, found, repeat, data)
    if t in VIEW:
        ins, outs = shape(src), shape(node)
        if ins == outs:
            return _back_heads(src, h, d, found, repeat, data)
        for (a, b), (c, e) in _merge_groups(ins, outs) or []:
            if (c, e) == (h, d + 1) and d == h + 1 and b - a == 1:  # [.., H·hd] → [.., H, hd]: the head split
                return _back_features(src, a, 0, found)
            if (c, e) == (h, h + 1) and b - a == 2 and _source_dim(node, d) is not None:
                # [.., Hkv, G, ..] → [.., Hkv·G, ..]: heads repeated by an expand below this reshape
                repeat.append(ins[a + 1])
                return _back_repeat(src, a, a + 1, _source_dim(node, d), found, repeat, data)
        raise _Refuse(f"{op_name(node)}{where(node)} reshapes the attention heads in a way growcli cannot follow")
    if t in UNARY or t in HEAD_NORM:
        return _back_heads(src, h, d, found, repeat, data)
    if t in REDUCE and len(shape(node)) == len(shape(src)) and _reduce_dims(node, len(shape(src))) == [d]:
        return _back_heads(src, h, d, found, repeat, data)  # a statistic over head_dim (kept as size 1)
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
            _back_heads(arg, h - off, d - off, found, repeat, data)
            followed = True
        if not followed:
            raise _Refuse(f"{op_name(node)}{where(node)} produces the attention input from no projection")
        return
    if t == aten.cat.default:
        if node.args[1] % len(shape(node)) != d:
            raise _Refuse(f"cat{where(node)} concatenates attention heads")
        for part in node.args[0]:
            _back_heads(part, h, d, found, repeat, data)
        return
    if t == aten.slice.Tensor:
        if node.args[1] % len(shape(node)) == h:
            raise _Refuse(f"slice{where(node)} takes some of the attention heads")
        return _back_heads(src, h, d, found, repeat, data)
    raise _Refuse(f"{op_name(node)}{where(node)} sits between a projection and the attention, and growcli has no rule for it")


def _back_repeat(node: fx.Node, h: int, r: int, d: int, found: set, repeat: list[int], data: set[fx.Node]) -> None:
    """Below a ``[Hkv, G] → H`` reshape: axis ``r`` must come from expanding an unsqueezed axis (a true repeat)."""
    src = node.args[0] if node.target == aten.expand.default else None
    if src is not None and src.target == aten.unsqueeze.default and len(shape(src)) == len(shape(node)) \
            and src.args[1] % len(shape(src)) == r:
        inner = src.args[0]
        fix = lambda a: a - 1 if a > r else a  # noqa: E731  (the unsqueezed axis disappears)
        return _back_heads(inner, fix(h), fix(d), found, repeat, data)
    raise _Refuse(f"{op_name(node)}{where(node)} builds repeated key/value heads in a way growcli cannot follow")


def _back_features(node: fx.Node, f: int, offset: int, found: set) -> None:
    """Follow a tensor whose axis ``f`` holds ``heads·head_dim`` features (from ``offset``) back to its projection."""
    if node.op != "call_function":
        raise _Refuse(f"attention features '{node.name}' do not come from a projection")
    t = node.target
    if t in VIEW:
        src_f = _source_dim(node, f)
        if src_f is None:
            raise _Refuse(f"{op_name(node)}{where(node)} reshapes the attention features")
        return _back_features(node.args[0], src_f, offset, found)
    if t in UNARY:
        return _back_features(node.args[0], f, offset, found)
    if t == operator.getitem and node.args[0].op == "call_function" and node.args[0].target in SPLITS:
        split = node.args[0]
        x, sizes = split.args[0], split.args[1]
        dim = (split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)) % len(shape(x))
        if dim != f:
            raise _Refuse(f"split{where(split)} divides another dimension than the features")
        i = node.args[1]
        start = sum(sizes[:i]) if isinstance(sizes, (list, tuple)) else i * sizes
        return _back_features(x, f, offset + start, found)
    if t == aten.linear.default and f == len(shape(node)) - 1 and _attr(node.args[1]):
        found.add((node, offset))
        return
    if t == ADDMM and f == 1 and _attr(node.args[2]):
        found.add((node, offset))
        return
    raise _Refuse(f"{op_name(node)}{where(node)} produces attention features and growcli has no rule for it")


def _projection_in(node: fx.Node, offset: int, size: int) -> Projection:
    """The features ``[offset, offset+size)`` produced by a linear/addmm node."""
    if node.target == ADDMM:
        return Projection(_attr(node.args[2]), 1, _attr(node.args[0]), offset, size, _module_of(node))
    bias = _attr(node.args[2]) if len(node.args) > 2 else None
    return Projection(_attr(node.args[1]), 0, bias, offset, size, _module_of(node))


# --------------------------------------------------------------------------- forward: output → o projection
def _forward_output(node: fx.Node) -> Projection:
    """From the attention output ``[B, H, L, hd]`` to the projection that reads its features."""
    h, d = 1, 3
    cur = node
    feat: int | None = None
    while True:
        users = _users(cur)
        if len(users) != 1:
            raise _Refuse(f"the attention output{where(cur)} is used {len(users)} times")
        user = users[0]
        t = user.target
        if user.op != "call_function":
            raise _Refuse(f"the attention output{where(cur)} reaches {user.op} {user.target}")
        if feat is None and t in MOVES | VIEW:
            ins, outs = shape(cur), shape(user)
            if t in VIEW and ins != outs:
                runs = [(c, e) for (a, b), (c, e) in _merge_groups(ins, outs) or [] if (a, b) == (h, d + 1)]
                if d != h + 1 or not runs or runs[0][1] - runs[0][0] != 1:
                    raise _Refuse(f"{op_name(user)}{where(user)} reshapes the attention output in a way growcli cannot follow")
                feat = runs[0][0]
            elif t not in VIEW:
                rank = len(outs)
                back = {_source_dim(user, k): k for k in range(rank)}
                if h not in back or d not in back:
                    raise _Refuse(f"{op_name(user)}{where(user)} moves the attention heads in a way growcli cannot follow")
                h, d = back[h], back[d]
            cur = user
            continue
        if t in UNARY and user.args[0] is cur:
            cur = user
            continue
        if feat is not None and t in VIEW:
            back = {_source_dim(user, k): k for k in range(len(shape(user)))}
            if feat not in back:
                raise _Refuse(f"{op_name(user)}{where(user)} reshapes the attention features")
            feat, cur = back[feat], user
            continue
        size = shape(cur)[feat] if feat is not None else None
        if feat is not None and t == aten.linear.default and user.args[0] is cur and feat == len(shape(cur)) - 1 \
                and _attr(user.args[1]):
            return Projection(_attr(user.args[1]), 1, None, 0, size, _module_of(user))
        if feat is not None and t == ADDMM and user.args[1] is cur and feat == 1 and _attr(user.args[2]):
            return Projection(_attr(user.args[2]), 0, None, 0, size, _module_of(user))
        raise _Refuse(f"{op_name(user)}{where(user)} reads the attention output and growcli has no rule for it")


# --------------------------------------------------------------------------- entry
def attention_sites(trace: Trace, required: bool = True) -> list[AttentionSite]:
    """Every attention in the trace with its projections and head counts.

    Raises :class:`NotGrowableError` naming the op and module when an attention's inputs or
    output pass through an op this module has no rule for, or, if ``required``, when the
    model computes attention without ``scaled_dot_product_attention`` (else that gives ``[]``).
    """
    nodes = [n for n in trace.graph.nodes if n.op == "call_function" and n.target in SDPA]
    if not nodes and not required:
        return []
    if not nodes:
        other = next((n for n in trace.graph.nodes if n.op == "call_function" and n.target in FUSED_ATTENTION), None)
        hint = f" (it uses {op_name(other)}{where(other)})" if other is not None else \
            " (load Hugging Face models with attn_implementation='sdpa')"
        raise NotGrowableError("growing attention heads needs attention computed by torch's "
                               f"scaled_dot_product_attention, and the traced model has none{hint}")
    data = _from_projection(trace)
    return [_site(n, data) for n in nodes]


def _site(node: fx.Node, data: set[fx.Node]) -> AttentionSite:
    module = _module_of(node)
    try:
        q, k, v = node.args[:3]
        hq, hk, hv = shape(q)[1], shape(k)[1], shape(v)[1]
        hd = shape(q)[3]
        found = {}
        for name, arg in (("q", q), ("k", k), ("v", v)):
            hits: set = set()
            repeat: list[int] = []
            _back_heads(arg, 1, 3, hits, repeat, data)
            if len(hits) != 1:
                raise _Refuse(f"the attention's {name} comes from {len(hits)} projections")
            (proj, offset), = hits
            heads = shape(arg)[1] // (repeat[0] if repeat else 1)
            found[name] = (_projection_in(proj, offset, heads * hd), heads)
        if not (found["k"][1] == found["v"][1] and hq % found["k"][1] == 0 and hk == hv):
            raise _Refuse(f"key and value heads ({found['k'][1]}, {found['v'][1]}) do not divide the {hq} query heads")
        o = _forward_output(node)
        if o.size != hq * hd:
            raise _Refuse(f"the output projection reads {o.size} features, not {hq} heads × {hd}")
    except _Refuse as exc:
        raise NotGrowableError(f"attention in '{module}': {exc}") from None
    return AttentionSite(module, found["q"][0], found["k"][0], found["v"][0], o, hq, found["k"][1], hd)
