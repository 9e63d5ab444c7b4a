"""Attention computed without ``scaled_dot_product_attention``: eager implementations found in the trace.

Eager attention is the pattern ``scores = q·kᵀ`` (``matmul``, ``bmm``, ``baddbmm`` or ``einsum``),
then ops acting on each score on its own (a scale, softcapping ``c·tanh(s/c)``, additive masks,
casts), a softmax over the keys, dropout, and ``probs·v``. Growing heads copies whole heads, so it
stays exact when every op between the two products treats each head alike and with operands that
are the same for every head whatever their number: then a copied head computes exactly what its
source computes. :func:`eager_calls` finds every such attention from the trace's ops alone: a
product of two tensors computed from projections whose results reach a softmax and then a
second such product. Every op on the way must have a rule below; anything else, a per-head
operand (ALiBi's slopes, a learned ``[heads, L, L]`` bias) or an operand computed from
projections (a relative-position term) is refused with the op and module named. Each attention
is returned as an :class:`AttentionCall` in ``[B, heads, L, head_dim]`` layout, following the
views of models that compute on ``[B·heads, L, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from growcli.analysis.attention_bias import BiasTable, NotATable, head_tables
from growcli.analysis.attention_inputs import projection_outputs
from growcli.analysis.trace import (ADDMM, CONV, METADATA_CHECKS, Refuse, Trace, UNARY, VIEW, flat_args,
                                    merge_groups, module_of, op_name, reduce_dims, shape, where)
from growcli.core.errors import NotGrowableError

aten = torch.ops.aten
# Products of two tensors: q·kᵀ and probs·v.
PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default}
SOFTMAX = {aten._softmax.default, aten.softmax.int} | (
    {aten._safe_softmax.default} if hasattr(aten, "_safe_softmax") else set())
# One tensor, scalar parameters: each score moves on its own (scale, softcapping's tanh, casts, dropout).
POINTWISE = UNARY | {aten.log.default, aten.reciprocal.default, aten.rsqrt.default, aten.rsub.Scalar}
# The scores combined element-wise with other tensors (masks, biases) or scalars.
COMBINE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.rsub.Tensor,
           aten.maximum.default, aten.minimum.default, aten.max.other, aten.min.other, aten.where.self,
           aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.add_.Tensor, aten.mul_.Tensor}
# Statistics over the key axis, kept as size 1 (a softmax written out: exp(s − max s) / Σ exp).
KEY_REDUCE = {aten.amax.default, aten.sum.dim_IntList, aten.mean.dim, aten.logsumexp.default}
# A number multiplying or dividing the keys before the product (DeBERTa's kᵀ / √d).
SCALE = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
# Where a walk over the scores ends: the value product, or an op that would mix features.
STOPS = PRODUCTS | CONV | {aten.linear.default, ADDMM}


@dataclass
class AttentionCall:
    """One attention in the trace: its query, key and value inputs, each ``[B, heads, L, head_dim]``,
    and the node of its output ``[B, heads, L, head_dim]`` (whose users lead to the output projection);
    ``tables``: the learned tables a per-head bias on its scores is looked up from (they grow with the heads)."""

    module: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    tables: tuple[BiasTable, ...] = ()


@dataclass(frozen=True)
class _Layout:
    """Where the heads are in a tensor of scores: axis ``head`` of ``rank``, merged with the batch
    axis before it when ``flat`` (``[B·H, Lq, Lk]``). The key axis is always the last."""

    rank: int
    head: int
    flat: bool


def eager_calls(trace: Trace) -> list[AttentionCall]:
    """Every attention computed without ``scaled_dot_product_attention``.

    A product of two projection outputs is an attention when its results reach a softmax and then
    a second such product; products that do not are left alone (they are no attention). Raises
    :class:`NotGrowableError` naming the op and module when an attention has an op this module has
    no rule for, an operand that differs per head, or an input it cannot put in head layout.
    """
    data = projection_outputs(trace)
    params = {name for name, _ in trace.gm.named_parameters()}
    calls = []
    for node in trace.graph.nodes:
        if not _is_product(node, data):
            continue
        region, stops = _region(node)
        if not any(n.target in SOFTMAX for n in region) or not any(_is_product(s, data) for s in stops):
            continue
        try:
            calls.append(_call(node, region, stops, data, params))
        except Refuse as exc:
            raise NotGrowableError(f"attention in '{module_of(node)}': {exc}") from None
    return calls


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in METADATA_CHECKS)]


def _operands(node: fx.Node) -> list:
    """The two matrices of a product (``einsum``'s operand list, ``baddbmm``'s after its bias)."""
    if node.target == aten.einsum.default:
        return list(node.args[1]) if len(node.args[1]) == 2 else []
    return list(node.args[1:3]) if node.target == aten.baddbmm.default else list(node.args[:2])


def _is_product(node: fx.Node, data: set[fx.Node]) -> bool:
    if node.op != "call_function" or node.target not in PRODUCTS:
        return False
    ops = _operands(node)
    return len(ops) == 2 and all(isinstance(a, fx.Node) and a in data for a in ops)


def _region(start: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The nodes computed from ``start`` before any product or projection (in graph order), and the
    nodes where that stops."""
    region, stops, todo, seen = [], [], [start], {start}
    while todo:
        for user in _users(todo.pop()):
            if user in seen:
                continue
            seen.add(user)
            if user.op != "call_function" or user.target in STOPS:
                stops.append(user)
            else:
                region.append(user)
                todo.append(user)
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return sorted(region, key=order.__getitem__), stops


# --------------------------------------------------------------------------- the scores, op by op
def _call(m1: fx.Node, region: list[fx.Node], stops: list[fx.Node], data: set[fx.Node],
          params: set[str]) -> AttentionCall:
    """The attention whose scores ``m1`` computes, after checking every op in ``region`` and where it ends."""
    rank = len(shape(m1) or ())
    if rank not in (3, 4):
        raise Refuse(f"{op_name(m1)}{where(m1)} computes attention scores of rank {rank}")
    layouts = {m1: _Layout(rank, 1, False) if rank == 4 else _Layout(3, 0, True)}
    heads_seen: list[int] = []  # head counts of views that split [B·H] into [B, H]
    tables: set[BiasTable] = set()
    if m1.target == aten.baddbmm.default:
        tables.update(_head_free(m1.args[0], m1, layouts[m1], data, params))
    for node in region:
        layouts[node] = _step(node, layouts, data, params, heads_seen, tables)
    inside = set(layouts)
    ends = [s for s in stops if s.op != "output"]
    if len(ends) != len(stops):
        raise Refuse(f"the attention probabilities{where(m1)} are also an output of the model (attention weights "
                     "returned), which would change shape with the heads")
    if len(ends) != 1 or not _is_product(ends[0], data):
        names = ", ".join(f"{op_name(s)}{where(s)}" for s in ends)
        raise Refuse(f"the attention scores of {op_name(m1)}{where(m1)} reach {names}, and growcli has no rule for it")
    m2 = ends[0]
    q, k = _scores_inputs(m1, data)
    v, out = _values(m2, inside, layouts)
    b, h = shape(q)[:2]
    if not (shape(k)[:2] == shape(v)[:2] == (b, h) and shape(q)[3] == shape(k)[3] and shape(k)[2] == shape(v)[2]):
        raise Refuse(f"the query, key and value of {op_name(m1)}{where(m1)} have shapes {list(shape(q))}, "
                     f"{list(shape(k))}, {list(shape(v))}, which do not fit one attention")
    if any(n != h for n in heads_seen) or shape(out)[:2] != (b, h):
        raise Refuse(f"the attention scores{where(m1)} are reshaped to another number of heads than {h}")
    return AttentionCall(module_of(m1), q, k, v, out, tuple(sorted(tables, key=lambda t: (t.fqn, t.dim))))


def _step(node: fx.Node, layouts: dict, data: set[fx.Node], params: set[str], heads_seen: list[int],
          tables: set[BiasTable]) -> _Layout:
    """The layout of ``node``'s scores, after checking that ``node`` treats every head alike (adding to ``tables``
    the learned tables its per-head operands are looked up from)."""
    args = [a for a in flat_args(list(node.args) + list(node.kwargs.values())) if isinstance(a, fx.Node)]
    ins = [a for a in args if a in layouts]
    kinds = {layouts[a] for a in ins}
    if len(kinds) != 1:
        raise Refuse(f"{op_name(node)}{where(node)} combines attention scores laid out differently")
    lay, t, src = kinds.pop(), node.target, node.args[0] if node.args else None
    others = [a for a in args if a not in layouts and t != aten.type_as.default]  # type_as reads a dtype only
    if t in SOFTMAX or t in POINTWISE or t in KEY_REDUCE or t in VIEW:
        if src not in layouts or others:
            raise Refuse(f"{op_name(node)}{where(node)} acts on the attention scores with other tensors, "
                         "and growcli has no rule for it")
    if t in SOFTMAX:
        if node.args[1] % lay.rank != lay.rank - 1:
            raise Refuse(f"{op_name(node)}{where(node)} normalises the attention scores over another axis than "
                         "the keys")
        return lay
    if t in POINTWISE:
        return lay
    if t in KEY_REDUCE:
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if reduce_dims(node, lay.rank) != [lay.rank - 1] or not keep:
            raise Refuse(f"{op_name(node)}{where(node)} reduces the attention scores over another axis than the keys")
        return lay
    if t in COMBINE:
        if len(shape(node) or ()) != lay.rank:
            raise Refuse(f"{op_name(node)}{where(node)} broadcasts the attention scores to more dimensions")
        for other in others:
            tables.update(_head_free(other, node, lay, data, params))
        return lay
    if t in VIEW:
        return _view(node, lay, heads_seen)
    raise Refuse(f"{op_name(node)}{where(node)} acts on the attention scores, and growcli has no rule for it "
                 "(it is never assumed to treat every head alike)")


def _view(node: fx.Node, lay: _Layout, heads_seen: list[int]) -> _Layout:
    """A reshape of the scores: the key axis must stay last and alone; heads may merge with the batch
    axis before them (``[B, H, ..] → [B·H, ..]``) or split back out of it."""
    ins, outs = shape(node.args[0]), shape(node)
    if ins == outs:
        return lay
    groups = merge_groups(ins, outs) or []
    last = next((((a, b), (c, e)) for (a, b), (c, e) in groups if b == len(ins)), None)
    if last is None or last[0] != (len(ins) - 1, len(ins)) or last[1] != (len(outs) - 1, len(outs)):
        raise Refuse(f"{op_name(node)}{where(node)} reshapes the key axis of the attention scores")
    for (a, b), (c, e) in groups:
        if not a <= lay.head < b:
            continue
        if b - a == 1 and e - c == 1:
            return _Layout(len(outs), c, lay.flat)
        if not lay.flat and (a, b) == (lay.head - 1, lay.head + 1) and e - c == 1:
            return _Layout(len(outs), c, True)
        if lay.flat and b - a == 1 and e - c == 2:
            heads_seen.append(outs[c + 1])
            return _Layout(len(outs), c + 1, False)
    raise Refuse(f"{op_name(node)}{where(node)} reshapes the heads of the attention scores in a way growcli "
                 "cannot follow")


def score_operand_tables(arg, node: fx.Node, data: set[fx.Node], params: set[str]) -> list[BiasTable]:
    """The learned tables ``arg``, an operand ``node`` combines with scores ``[B, heads, Lq, Lk]`` (broadcast to them;
    an ``attn_mask``), is looked up from along its heads ([] when it is the same for every head). Raises
    :class:`Refuse` like the operands of eager attention scores."""
    return _head_free(arg, node, _Layout(4, 1, False), data, params)


def _head_free(arg, node: fx.Node, lay: _Layout, data: set[fx.Node], params: set[str]) -> list[BiasTable]:
    """The learned tables ``arg`` (an operand ``node`` combines with the scores) is looked up from along its head
    axis: [] when it is the same for every head. Refuses any other per-head operand, with the reason the walk
    to a table stopped."""
    s = shape(arg)
    if s is None:
        return []  # a number
    if arg in data:
        raise Refuse(f"{op_name(node)}{where(node)} combines the attention scores with '{arg.name}' {list(s)}, "
                     "which is computed from projections (a relative-position term?), and growcli has no rule for it")
    off = lay.rank - len(s)
    if off < 0:
        raise Refuse(f"{op_name(node)}{where(node)} broadcasts the attention scores to more dimensions")
    axis = lay.head - off
    if axis < 0 or s[axis] == 1:
        return []  # broadcast over the heads: the same for every head, whatever their number
    if lay.flat:  # [B·H, ..]: the heads share an axis with the batch, no table column is one head
        why = "its heads are merged with the batch axis"
    else:
        try:
            return head_tables(arg, axis, data, params)
        except NotATable as exc:
            why = str(exc)
    learned, sources = _origins(arg, params)
    if learned:
        names = ", ".join(f"'{n}'" for n in learned)
        raise Refuse(f"{op_name(node)}{where(node)} combines the attention scores with a learned per-head bias "
                     f"{list(s)} (parameter {names}), which growcli does not grow with the heads ({why})")
    name = f"buffer '{arg.target}'" if arg.op == "get_attr" else f"'{arg.name}'"
    origin = f"computed from {', '.join(sources)}" if sources else "built from constants"
    raise Refuse(f"{op_name(node)}{where(node)} combines the attention scores with {name} {list(s)}, a bias that "
                 f"differs per head and comes from no projection ({origin}), like ALiBi's: its slopes depend on the "
                 f"number of heads, so heads cannot grow ({why})")


def _origins(node: fx.Node, params: set[str]) -> tuple[list[str], list[str]]:
    """The parameters, and the buffers and model inputs, that ``node`` is computed from."""
    learned, sources, todo, seen = [], [], [node], {node}
    while todo and len(seen) < 500:
        n = todo.pop()
        if n.op == "get_attr":
            (learned if str(n.target) in params else sources).append(str(n.target))
        elif n.op == "placeholder":
            sources.append(n.name)
        for a in flat_args(list(n.args) + list(n.kwargs.values())):
            if isinstance(a, fx.Node) and a not in seen:
                seen.add(a)
                todo.append(a)
    return sorted(set(learned)), sorted(set(sources))


# --------------------------------------------------------------------------- q, k, v and the output in head layout
def _einsum(node: fx.Node) -> tuple[str, str, str]:
    spec = node.args[0].replace(" ", "")
    left, _, out = spec.partition("->")
    a, _, b = left.partition(",")
    if "." in spec or not out:
        raise Refuse(f"einsum{where(node)} '{spec}' is not a product growcli can read")
    return a, b, out


def _scores_inputs(m1: fx.Node, data: set[fx.Node]) -> tuple[fx.Node, fx.Node]:
    """``(q, k)`` in ``[B, H, L, hd]`` layout from ``scores = q·kᵀ``."""
    a, b = _operands(m1)
    if m1.target == aten.einsum.default:
        sa, sb, so = _einsum(m1)
        lead = so[:-2]
        if not (len(sa) == len(sb) == len(so) and sa[:-2] == sb[:-2] == lead and sa[-2] == so[-2]
                and so[-1] not in sa and sa[-1] not in so):
            raise Refuse(f"einsum{where(m1)} '{m1.args[0]}' is not a product of queries and keys growcli can read")
        if sb[-2:] == so[-1] + sa[-1]:
            return _four_d(a, "query"), _four_d(b, "key")
        if sb[-2:] == sa[-1] + so[-1]:
            return _four_d(a, "query"), _untranspose(b, data)
        raise Refuse(f"einsum{where(m1)} '{m1.args[0]}' is not a product of queries and keys growcli can read")
    return _four_d(a, "query"), _untranspose(b, data)


def _values(m2: fx.Node, inside: set[fx.Node], layouts: dict) -> tuple[fx.Node, fx.Node]:
    """``(v, out)`` in ``[B, H, L, hd]`` layout from ``out = probs·v``."""
    probs, v = _operands(m2)
    if m2.target == aten.einsum.default:
        sa, sb, so = _einsum(m2)
        if v in inside and probs not in inside:
            probs, v, sa, sb = v, probs, sb, sa
        if not (len(sa) == len(sb) == len(so) and sa[:-2] == sb[:-2] == so[:-2] and sb[-2] == sa[-1]
                and so[-2:] == sa[-2] + sb[-1]):
            raise Refuse(f"einsum{where(m2)} '{m2.args[0]}' is not a product of probabilities and values growcli "
                         "can read")
    elif m2.target == aten.baddbmm.default:
        raise Refuse(f"baddbmm{where(m2)} adds a tensor to the attention output, and growcli has no rule for it")
    if probs not in inside or v in inside:
        raise Refuse(f"{op_name(m2)}{where(m2)} multiplies the attention probabilities in a way growcli cannot follow")
    rank = len(shape(m2))
    if layouts[probs] != (_Layout(4, 1, False) if rank == 4 else _Layout(3, 0, True)):
        raise Refuse(f"{op_name(m2)}{where(m2)} reads the attention probabilities with their heads moved")
    if rank == 4:
        return _four_d(v, "value"), m2
    users = _users(m2)
    s = shape(m2)
    if len(users) == 1 and users[0].target in VIEW and len(shape(users[0])) == 4 \
            and shape(users[0])[0] * shape(users[0])[1] == s[0] and shape(users[0])[2:] == s[1:]:
        return _four_d(v, "value"), users[0]
    raise Refuse(f"the attention output of {op_name(m2)}{where(m2)} {list(s)} is not split back into "
                 "[batch, heads, length, head_dim]")


def _four_d(node: fx.Node, what: str) -> fx.Node:
    """``node`` when it is ``[B, H, L, hd]``; the 4-D tensor a ``[B·H, L, hd]`` view of it merges."""
    s = shape(node) or ()
    if len(s) == 4:
        return node
    src = node.args[0] if len(s) == 3 and node.op == "call_function" and node.target in VIEW else None
    ins = shape(src) or ()
    if len(ins) == 4 and ins[0] * ins[1] == s[0] and ins[2:] == s[1:]:
        return src
    raise Refuse(f"the attention {what} '{node.name}'{where(node)} is {list(s)}, not [batch, heads, length, head_dim] "
                 "or a view merging batch and heads")


def _number(arg, data: set[fx.Node]) -> bool:
    """Whether ``arg`` is a number: a Python scalar, or a one-element tensor computed from no projection."""
    s = shape(arg)
    return not isinstance(arg, fx.Node) or s is not None and all(n == 1 for n in s) and arg not in data


def _untranspose(node: fx.Node, data: set[fx.Node]) -> fx.Node:
    """The keys ``[B, H, L, hd]`` from ``kᵀ`` (a transpose of the last two axes, possibly merged to ``[B·H, hd, L]``,
    possibly scaled by a number: that scale is the same for every head and is not part of the keys' walk)."""
    s = shape(node) or ()
    r = len(s)
    if node.op == "call_function":
        if node.target in SCALE and len(node.args) == 2 and _number(node.args[1], data):
            return _untranspose(node.args[0], data)
        if node.target == aten.transpose.int and {node.args[1] % r, node.args[2] % r} == {r - 2, r - 1}:
            return _four_d(node.args[0], "key")
        if node.target == aten.permute.default and [d % r for d in node.args[1]] == [*range(r - 2), r - 1, r - 2]:
            return _four_d(node.args[0], "key")
        if r == 3 and node.target in VIEW:
            ins = shape(node.args[0]) or ()
            if len(ins) == 4 and ins[0] * ins[1] == s[0] and ins[2:] == s[1:]:
                return _untranspose(node.args[0], data)
    raise Refuse(f"{op_name(node)}{where(node)} gives the attention keys transposed in a way growcli cannot follow")
