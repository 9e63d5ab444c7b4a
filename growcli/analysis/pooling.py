"""Pooling as a per-channel op: how the coupled-channel walk passes channels through it, both ways.

Average, max and adaptive pooling over the trailing spatial dims (``aten.max_pool2d``,
``adaptive_max_pool1d``, ``max_pool2d_with_indices``, …, listed in
:data:`growcli.analysis.trace.POOL`) and the max or min over one dimension with its position
(``x.max(dim=-1)``, ``torch.max(x.flatten(2), -1)``, :data:`INDEXED_REDUCE`) compute each value
from one channel's positions alone: a new channel's output is computed from the new channel
only, so the channels pass through, in the same dim (pooling, or ``keepdim``) or one lower
for each dim a reduction removed before them. Pooling or reducing over the channels' own dim
mixes them and is refused. Ops that return ``(values, indices)`` (:data:`WITH_INDICES`) carry the
channels in their values; the indices are positions, not channel values, and a use of them
(``max_unpool``, a gather) is refused, naming the op, since no rule says what it does with them.
``x.amax(dims)`` has no indices and is a plain reduction (:data:`growcli.analysis.trace.REDUCE`).
"""

from __future__ import annotations

import operator

from torch import fx

from growcli.analysis.trace import POOL, Refuse, aten, op_name, shape, where

# max/min over one dim that also return where each extreme sits: ``(values, indices)``.
INDEXED_REDUCE = {aten.max.dim, aten.min.dim}
# The ops of POOL and INDEXED_REDUCE whose result is the tuple ``(values, indices)``.
WITH_INDICES = {aten.max_pool1d_with_indices.default, aten.max_pool2d_with_indices.default,
                aten.max_pool3d_with_indices.default, aten.adaptive_max_pool1d.default,
                aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default} | INDEXED_REDUCE
PER_CHANNEL = set(POOL) | INDEXED_REDUCE


def pooled_dims(node: fx.Node, rank: int) -> tuple[list[int], bool]:
    """The dims of ``node``'s ``rank``-dim input that a pooling or indexed reduction combines, and whether its
    output keeps them (pooled to a smaller size, or to size 1 with ``keepdim``)."""
    if node.target in INDEXED_REDUCE:
        keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        return [node.args[1] % rank], keep
    return list(range(rank - POOL[node.target], rank)), True


def pooled_values(node: fx.Node, src: fx.Node, dim: int) -> list[tuple[fx.Node, int]]:
    """Where the channels in dim ``dim`` of ``src`` go through ``node``: ``[(values node, dim)]`` — the node
    itself, or the ``getitem(·, 0)`` items of a ``(values, indices)`` result. Raises :class:`Refuse` when
    ``node`` pools over the channels, reads them in another argument, or its indices are used."""
    pooled, keep = pooled_dims(node, len(shape(src)))
    if node.args[0] is not src:
        raise Refuse(f"{op_name(node)}{where(node)} uses the channels as a parameter")
    if dim in pooled:
        verb = "reduces" if node.target in INDEXED_REDUCE else "pools"
        raise Refuse(f"{op_name(node)}{where(node)} {verb} over the grown dimension")
    new = dim if keep else dim - sum(1 for d in pooled if d < dim)
    if node.target not in WITH_INDICES:
        return [(node, new)]
    out = []
    for u in node.users:
        if u.target == operator.getitem and u.args[1] == 0:
            out.append((u, new))
        elif u.target != operator.getitem or u.users:
            raise Refuse(f"the indices of {op_name(node)}{where(node)} are used ({op_name(next(iter(u.users), u))}), "
                         "and growcli has no rule for what they do with the channels")
    return out


def pooled_source(node: fx.Node, dim: int) -> int | None:
    """The dim of a pooling's or indexed reduction's input that becomes dim ``dim`` of its values; None when
    ``dim`` is a pooled one (its values mix positions, not channels)."""
    ins = shape(node.args[0])
    if ins is None:
        return None
    pooled, keep = pooled_dims(node, len(ins))
    kept = list(range(len(ins))) if keep else [d for d in range(len(ins)) if d not in pooled]
    src = kept[dim] if 0 <= dim < len(kept) else None
    return None if src is None or src in pooled else src
