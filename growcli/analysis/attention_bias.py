"""Per-head biases added to attention scores: the same for every head, or looked up from a learned table.

Growing heads copies whole heads, so a tensor added to (or combined with) the scores keeps the
function exact when it is the same for every head (broadcast over them, or a constant fill such as
T5's ``zeros([1, H, q, k])`` for cross-attention), or when it is gathered by position from a learned
table whose head axis can grow with the same map as the heads: T5's ``relative_attention_bias``
(an embedding ``[buckets, H]`` looked up by relative-position buckets, then permuted to
``[1, H, q, k]``), Swin's and BEiT's ``relative_position_bias_table`` (``[(2W−1)², H]`` indexed by a
buffer, viewed and permuted). :func:`head_tables` walks back from the operand along its head axis
through ops that keep that axis identifiable (permute, view, unsqueeze, slice, casts, per-channel
interpolation, concatenation along other axes, element-wise combinations with head-free tensors)
to the lookup, and returns each table with the dim holding its heads. Anything else — a bias built
from constants that differs per head (ALiBi's slopes), a learned parameter added without a lookup,
an index computed from projections — raises :class:`NotATable` with the op that stopped the walk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from growcli.analysis.pooling import PER_CHANNEL, WITH_INDICES, pooled_source
from growcli.analysis.trace import (BINARY, REINDEX, UNARY, VIEW, flat_args, module_of, op_name, shape, source_dim,
                                    where)

aten = torch.ops.aten
# New tensors with one value everywhere: the same for every head, whatever their number.
FILLS = {aten.zeros.default, aten.ones.default, aten.full.default, aten.zeros_like.default, aten.ones_like.default,
         aten.full_like.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
         aten.scalar_tensor.default}
# Element-wise ops combining a bias with other tensors (masks) or numbers.
COMBINE = BINARY | {aten.rsub.Tensor, aten.where.ScalarOther, aten.where.ScalarSelf, aten.masked_fill.Scalar,
                    aten.masked_fill.Tensor, aten.max.other, aten.min.other}
LOOKUPS = {aten.embedding.default, aten.index.Tensor}


@dataclass(frozen=True)
class BiasTable:
    """A learned table a per-head attention bias is looked up from: parameter ``fqn``, its heads along ``dim``,
    read in module ``module`` (where the lookup is)."""

    fqn: str
    dim: int
    module: str


class NotATable(Exception):
    """The per-head operand is neither head-free nor looked up from a table; the message says where the walk
    stopped."""


def head_tables(arg: fx.Node, axis: int, data: set[fx.Node], params: set[str]) -> list[BiasTable]:
    """The tables ``arg``'s values along its head axis ``axis`` are looked up from ([] when every head gets the
    same values). Raises :class:`NotATable` naming the op where the head axis cannot be followed."""
    found: set[BiasTable] = set()
    _walk(arg, axis, False, data, params, found, set())
    return sorted(found, key=lambda t: (t.fqn, t.dim))


def _walk(n, axis: int | None, looked_up: bool, data: set, params: set, found: set, seen: set) -> None:
    s = shape(n)
    if s is None or axis is None or axis < 0 or s[axis] == 1:
        return  # a number, or broadcast over the heads
    if (n, axis, looked_up) in seen:
        return
    seen.add((n, axis, looked_up))
    if n in data:
        raise NotATable(f"'{n.name}'{where(n)} is computed from projections")
    if n.op == "get_attr":
        if str(n.target) not in params:
            raise NotATable(f"buffer '{n.target}' holds values per head")
        if not looked_up:
            raise NotATable(f"parameter '{n.target}' is used whole, not looked up by position")
        found.add(BiasTable(str(n.target), axis, ""))
        return
    if n.op != "call_function":
        raise NotATable(f"{n.op} '{n.name}' holds values per head")
    t = n.target
    if t in FILLS:
        return
    if t in LOOKUPS:
        table, index, rank = _lookup(n)
        if table is None or axis < rank:
            raise NotATable(f"{op_name(n)}{where(n)} takes the head axis from its index")
        _constant_index(index, n, data, params)
        _walk(table, axis - rank + 1 if t == aten.index.Tensor else 1, True, data, params, found, seen)
        tagged = {f if f.module else BiasTable(f.fqn, f.dim, module_of(n)) for f in found}  # read in the lookup's module
        found.clear()
        found.update(tagged)
        return
    if t in UNARY or t in (aten.contiguous.default, aten.clone.default, aten.lift_fresh_copy.default):
        _walk(n.args[0], axis, looked_up, data, params, found, seen)
        return
    if t in REINDEX or t in VIEW:
        src = source_dim(n, axis)
        if src is None:
            raise NotATable(f"{op_name(n)}{where(n)} mixes the head axis with another one")
        if t == aten.expand.default and shape(n.args[0])[src] == 1:
            return
        _walk(n.args[0], src, looked_up, data, params, found, seen)
        return
    if t in PER_CHANNEL and t not in WITH_INDICES:
        src = pooled_source(n, axis)
        if src is None:
            raise NotATable(f"{op_name(n)}{where(n)} interpolates along the head axis")
        _walk(n.args[0], src, looked_up, data, params, found, seen)
        return
    if t == aten.cat.default:
        dim = (n.args[1] if len(n.args) > 1 else 0) % len(s)
        if dim == axis:
            raise NotATable(f"cat{where(n)} concatenates along the head axis")
        for part in n.args[0]:
            _walk(part, axis, looked_up, data, params, found, seen)
        return
    if t in COMBINE:
        for a in flat_args(list(n.args)):
            if isinstance(a, fx.Node) and shape(a) is not None:
                _walk(a, axis - (len(s) - len(shape(a))), looked_up, data, params, found, seen)
        return
    raise NotATable(f"{op_name(n)}{where(n)} computes it, and growcli has no rule to follow the heads through it")


def _lookup(n: fx.Node) -> tuple[fx.Node | None, fx.Node | None, int]:
    """``(table, index, index rank)`` of ``embedding(table, index)`` or ``table[index]`` (one index, on dim 0)."""
    if n.target == aten.embedding.default:
        return n.args[0], n.args[1], len(shape(n.args[1]) or ())
    idx = n.args[1]
    if len(idx) != 1 or not isinstance(idx[0], fx.Node):
        return None, None, 0
    return n.args[0], idx[0], len(shape(idx[0]) or ())


def _constant_index(index: fx.Node, lookup: fx.Node, data: set, params: set) -> None:
    """Refuse an index computed from projections or learned parameters (positions must not depend on the heads)."""
    todo, seen = [index], {index}
    while todo:
        n = todo.pop()
        if n in data or n.op == "get_attr" and str(n.target) in params:
            raise NotATable(f"the index of {op_name(lookup)}{where(lookup)} is computed from learned values")
        for a in flat_args(list(n.args) + list(n.kwargs.values())):
            if isinstance(a, fx.Node) and a not in seen:
                seen.add(a)
                todo.append(a)
