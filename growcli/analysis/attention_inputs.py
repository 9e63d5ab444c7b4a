"""From an attention's query, key and value inputs back to the projections that produce them.

The walk starts at an attention input ``[B, heads, L, head_dim]`` and follows it back to a
Linear (or Conv1D ``addmm``), describing its features as a :class:`Projection`. It tracks the
heads axis and the axes that hold positions inside ``head_dim``, and accepts an op only by what
it does to them, never by module or class names:

- ops that only move positions inside ``head_dim`` are per head: rotary embeddings (element-wise
  ops with tensors computed from no projection that are the same for every head, slices,
  concatenations, ``stack`` then ``flatten`` of interleaved halves), norms over ``head_dim``;
- the view ``[.., F] → [.., (fixed axes), H, (head block)]`` splits features into heads: head
  ``h`` owns the contiguous block ``offset + h·block + [0, block)``, where the block is
  ``head_dim`` or, for a per-head fused ``qkv`` (``[H, 3·head_dim]`` then a split along it, or
  ``[H, 3, head_dim]`` then a select), the head's query, key and value together;
- head picks: a slice, or an ``index`` by a constant run of positions, along the heads axis takes the
  attention's heads out of a fused projection's heads (Falcon's multi-query ``[H + 2, head_dim]``: the query
  heads, then the key's, then the value's): the attention's first head is at that position;
- a (group, member) layout: a flatten ``[.., G, M, ..] → [.., G·M, ..]`` of the heads axis, head ``g·M + i``
  being member ``i`` of group ``g`` (Falcon's new decoder architecture, ``[kv, H/kv + 2, head_dim]``). Picks
  and repeats (``expand``/``broadcast_to`` of a size-1 member axis: a key/value head shared by its group) may
  act on the member axis; the view that splits the features must put the member axis inside the head block,
  which then holds a whole group (its query heads, key and value: copied together);
- before that split, on the features (:mod:`growcli.analysis.attention_features`): the split or slice of a
  fused ``qkv`` projection (an offset), element-wise ops with scalars or with tensors constant across the
  features, per-feature parameters and norms over all heads' features (recorded);
- the ``unsqueeze → expand → reshape`` that repeats key/value heads (grouped-query attention).

Anything else is refused, with the op and module named. The sites are built in
:mod:`growcli.analysis.attention`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import fx

from growcli.analysis.attention_features import (ELEMENTWISE, HEAD_NORM, MOVES, NORMS, SPLITS, Walk, args_of,
                                                 part_start, walk_features)
from growcli.analysis.matmuls import param_matmul
from growcli.analysis.trace import (ADDMM, REDUCE, Refuse, Trace, UNARY, VIEW, flat_args, merge_groups, op_name,
                                    reduce_dims, shape, source_dim, where)

aten = torch.ops.aten
BROADCAST = {aten.expand.default, aten.broadcast_to.default}
# Ops that copy a constant tensor into the graph (a list index such as ``x[..., [-2], :]``).
CONSTANT_COPIES = {aten.lift_fresh_copy.default, aten.clone.default, aten._to_copy.default, aten.detach.default,
                   aten.detach_.default}
# Values of index constants a trace on the meta device cannot hold, by name, read from a trace of the same code.
_KNOWN: ContextVar[dict[str, list[int]]] = ContextVar("known_index_constants", default={})
# Reshapes, read by their input and output shapes (unflatten: a view that splits one dim; module traces keep it).
RESHAPES = VIEW | {aten.unflatten.int}


def index_constants(trace: Trace) -> dict[str, list[int]]:
    """The values of every 1-D integer constant tensor in ``trace`` that holds them (not on the meta device)."""
    out = {}
    for n in trace.graph.nodes:
        if n.op != "get_attr":
            continue
        value = operator.attrgetter(str(n.target))(trace.gm)
        if isinstance(value, torch.Tensor) and not value.is_meta and value.dim() == 1 and not value.is_floating_point() \
                and value.dtype != torch.bool and not isinstance(value, torch.nn.Parameter):
            out[str(n.target)] = [int(v) for v in value.tolist()]
    return out


@contextmanager
def known_constants(table: dict[str, list[int]]) -> Iterator[None]:
    """Within the block, an index constant without values (a trace of a meta-device model built from an edited
    config) is read from ``table`` (:func:`index_constants` of a trace of the same model code)."""
    token = _KNOWN.set(table)
    try:
        yield
    finally:
        _KNOWN.reset(token)

def projection_outputs(trace: Trace) -> set[fx.Node]:
    """Nodes computed from the output of some Linear/addmm (rotary cos/sin and masks are not)."""
    out: set[fx.Node] = set()
    for n in trace.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in (aten.linear.default, ADDMM) or param_matmul(n) is not None \
                or any(isinstance(a, fx.Node) and a in out for a in flat_args(n.args)):
            out.add(n)
    return out


def walk_input(node: fx.Node, data: set[fx.Node]) -> Walk:
    """Walk back from an attention input ``[B, heads, L, head_dim]``; raises :class:`Refuse`."""
    walk = Walk(data)
    _heads(walk, node, 1, (3,), {})
    return walk


def _source(node: fx.Node, dim: int) -> int | None:
    """:func:`source_dim`, with ``broadcast_to`` read as the ``expand`` it is."""
    if node.target == aten.broadcast_to.default:
        k = dim - (len(shape(node)) - len(shape(node.args[0])))
        return k if k >= 0 else None
    return source_dim(node, dim)


def _heads(w: Walk, node: fx.Node, h: int, ds: tuple[int, ...], fixed: dict[int, int], first: int = 0,
           member: tuple[int, int] | None = None) -> None:
    """``node``'s axis ``h`` indexes heads, ``ds`` hold positions inside a head, ``fixed`` are axes of which one
    index was selected further on (the q part of a fused ``[.., 3, H, hd]``); the attention's first head is at
    ``first`` along ``h``; ``member`` is ``(axis, count)`` in a (group, member) layout (``h`` then indexes groups)."""
    if node.op != "call_function":
        raise Refuse(f"attention input '{node.name}' does not come from a projection")
    t = node.target
    src = node.args[0] if node.args else None
    if member is None and _one_head(node, h, ds, fixed):  # one head made by unsqueeze (multi-query's key/value)
        return walk_features(w, src, source_dim(node, ds[0]), 0, shape(node)[ds[0]])
    if t in MOVES or t in BROADCAST:
        return _move(w, node, h, ds, fixed, first, member)
    if t == aten.select.int or t == operator.getitem and getattr(src, "target", None) == aten.unbind.int:
        inner = src if t == aten.select.int else src.args[0]
        k = (node.args[1] if t == aten.select.int else src.args[1] if len(src.args) > 1 else 0) % len(shape(inner))
        up = lambda a: a + 1 if a >= k else a  # noqa: E731  (the selected axis is back in the input)
        index = node.args[2] if t == aten.select.int else node.args[1]
        return _heads(w, inner, up(h), tuple(up(a) for a in ds),
                      {**{up(a): i for a, i in fixed.items()}, k: index % shape(inner)[k]}, first,
                      None if member is None else (up(member[0]), member[1]))
    if t == operator.getitem and getattr(src, "target", None) in SPLITS:
        x, _, dim = args_of(src)
        if dim == h:  # one part of the heads (multi-query's [H, 1, 1]): a head pick, as a slice
            return _heads(w, x, h, ds, fixed, first + part_start(src, node.args[1]), member)
        if member is not None and dim == member[0]:
            return _heads(w, x, h, ds, fixed, first, member)  # members inside each group, as a slice
        if dim not in ds:
            raise Refuse(f"{op_name(src)}{where(src)} divides another dimension than the head dimension")
        if member is None and _one_head(x, h, ds, fixed):  # the single head of unsqueezed features: this part
            return walk_features(w, x.args[0], source_dim(x, dim), part_start(src, node.args[1]), shape(node)[dim])
        return _heads(w, x, h, ds, fixed, first, member)  # one part of each head's block (a per-head fused qkv)
    if t in RESHAPES:
        return _view(w, node, h, ds, fixed, first, member)
    if t in UNARY or t in HEAD_NORM:
        return _heads(w, src, h, ds, fixed, first, member)
    rank = len(shape(node))
    if t in REDUCE and len(shape(src)) == rank and set(reduce_dims(node, rank)) <= set(ds):
        return _heads(w, src, h, ds, fixed, first, member)  # a statistic inside each head (kept as size 1)
    if t in NORMS and set(range(rank - len(node.args[1]), rank)) <= set(ds):
        return _heads(w, src, h, ds, fixed, first, member)  # a norm over head_dim: each head normalised on its own
    if t in ELEMENTWISE:
        return _elementwise(w, node, h, ds, fixed, first, member)
    if t in (aten.cat.default, aten.stack.default):
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        if dim == h or member is not None and dim == member[0]:
            raise Refuse(f"{op_name(node)}{where(node)} concatenates attention heads")
        if dim not in ds:
            raise Refuse(f"{op_name(node)}{where(node)} joins tensors along another dimension than the head dimension")
        for part in node.args[0]:
            if t == aten.cat.default:
                _heads(w, part, h, ds, fixed, first, member)
            else:  # the stacked axis is a new position inside head_dim (interleaved rotary halves)
                down = lambda a: a - 1 if a > dim else a  # noqa: E731
                _heads(w, part, down(h), tuple(down(a) for a in ds if a != dim),
                       {down(a): i for a, i in fixed.items()}, first,
                       None if member is None else (down(member[0]), member[1]))
        return
    if t == aten.slice.Tensor:
        dim = node.args[1] % rank if len(node.args) > 1 else 0
        if shape(node)[dim] == shape(src)[dim]:
            return _heads(w, src, h, ds, fixed, first, member)
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        start = min(max(start + shape(src)[dim] if start < 0 else start, 0), shape(src)[dim])
        step = node.args[4] if len(node.args) > 4 else 1
        if step != 1 and dim == h:
            raise Refuse(f"slice{where(node)} takes every {step}th attention head")
        return _picked(w, node, dim, start, h, ds, fixed, first, member)
    if t == aten.index.Tensor:
        dim, values = _constant_index(node)
        if values != list(range(values[0], values[0] + len(values))):
            raise Refuse(f"index{where(node)} picks positions {values} of the attention's dim {dim}, which are not a "
                         "run of consecutive positions")
        return _picked(w, node, dim, values[0], h, ds, fixed, first, member)
    raise Refuse(f"{op_name(node)}{where(node)} sits between a projection and the attention, and growcli has no rule for it")


def _picked(w: Walk, node: fx.Node, dim: int, start: int, h: int, ds: tuple[int, ...], fixed: dict[int, int],
            first: int, member: tuple[int, int] | None) -> None:
    """``node`` keeps positions ``start, start + 1, …`` of its input's axis ``dim`` (a slice or a constant index)."""
    src = node.args[0]
    if dim == h:  # a head pick: the attention's heads start further along the projection's heads
        return _heads(w, src, h, ds, fixed, first + start, member)
    if dim in ds or member is not None and dim == member[0]:
        return _heads(w, src, h, ds, fixed, first, member)  # positions inside a head, or members inside a group
    if dim in fixed or node.target == aten.index.Tensor and shape(node)[dim] == 1:  # one position: as a select
        return _heads(w, src, h, ds, {**fixed, dim: fixed.get(dim, 0) + start}, first, member)
    if node.target == aten.index.Tensor:
        raise Refuse(f"index{where(node)} takes positions of dim {dim} of the attention input, and growcli has no rule "
                     "for it")
    return _heads(w, src, h, ds, fixed, first, member)  # a slice of another dim (positions, batch): not the heads


def _constant_index(node: fx.Node) -> tuple[int, list[int]]:
    """``(dim, positions)`` of an ``index`` node indexing one dim by a constant 1-D integer tensor (``x[.., [-2]]``),
    positions taken modulo that dim's size; refuses any other ``index``."""
    src, indices = node.args[0], node.args[1]
    used = [(k, i) for k, i in enumerate(indices) if i is not None]
    cannot = Refuse(f"index{where(node)} selects from the attention input with indices computed in the model, "
                    "which growcli cannot read")
    if len(used) != 1:
        raise cannot
    dim, arg = used[0]
    while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in CONSTANT_COPIES:
        arg = arg.args[0]
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        raise cannot
    value = operator.attrgetter(str(arg.target))(arg.graph.owning_module)
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.is_floating_point() or value.dtype == torch.bool:
        raise cannot
    raw = _KNOWN.get().get(str(arg.target)) if value.is_meta else [int(v) for v in value.tolist()]
    if not raw:
        raise Refuse(f"index{where(node)} selects from the attention input by a constant whose values a trace on the "
                     "meta device does not hold (a streamed run plans on it: grow this model in memory)")
    return dim, [v % shape(src)[dim] for v in raw]


def _move(w: Walk, node: fx.Node, h: int, ds: tuple[int, ...], fixed: dict[int, int], first: int,
          member: tuple[int, int] | None) -> None:
    """An op that only moves axes, or an expand: a size-1 heads (or member) axis broadcast is a repeat (GQA)."""
    src = node.args[0]
    back = lambda a: _source(node, a)  # noqa: E731
    nh, nds, nfx = back(h), [back(a) for a in ds], {back(a): i for a, i in fixed.items()}
    nm = None if member is None else (back(member[0]), member[1])
    if nh is None or None in nds or None in nfx or nm is not None and nm[0] is None:
        raise Refuse(f"{op_name(node)}{where(node)} moves the heads in a way growcli cannot follow")
    if shape(src)[nh] != shape(node)[h]:  # an expand that broadcasts one head to all: a repeat
        w.repeat.append(shape(node)[h] // shape(src)[nh])
        first = 0
    if nm is not None and shape(src)[nm[0]] != shape(node)[member[0]]:  # one key/value head per group, repeated
        factor = shape(node)[member[0]] // shape(src)[nm[0]]
        w.repeat.append(factor)
        nm = (nm[0], member[1] // factor)
    return _heads(w, src, nh, tuple(nds), nfx, first, nm)


def _elementwise(w: Walk, node: fx.Node, h: int, ds: tuple[int, ...], fixed: dict[int, int], first: int,
                 member: tuple[int, int] | None) -> None:
    """An element-wise op on the heads: follow every operand computed from a projection; the others must be the same
    for every head (rotary cos/sin)."""
    rank = len(shape(node))
    size, followed = shape(node)[h], False
    if not any(isinstance(a, fx.Node) and a in w.data for a in node.args):
        raise Refuse(f"{op_name(node)}{where(node)} produces the attention input from no projection")
    for arg in node.args:
        s = shape(arg)
        if s is None:
            continue
        off = rank - len(s)
        if arg not in w.data:
            if h - off >= 0 and s[h - off] > 1 or member is not None and member[0] - off >= 0 and s[member[0] - off] > 1:
                raise Refuse(f"{op_name(node)}{where(node)} combines the attention heads with a tensor that differs "
                             "from head to head")
            continue  # a tensor not computed from a projection, the same for every head (rotary cos/sin)
        if h - off < 0 or s[h - off] == 1 and size > 1:
            if member is not None:
                raise Refuse(f"{op_name(node)}{where(node)} broadcasts a tensor over groups of attention heads")
            continue  # broadcast over the heads: the same for every head, whatever their number
        if member is not None and (member[0] - off < 0 or s[member[0] - off] != shape(node)[member[0]]):
            raise Refuse(f"{op_name(node)}{where(node)} broadcasts a tensor over the heads of a group")
        _heads(w, arg, h - off, tuple(a - off for a in ds if a - off >= 0),
               {a - off: i for a, i in fixed.items() if a - off >= 0}, first,
               None if member is None else (member[0] - off, member[1]))
        followed = True
    if not followed:
        raise Refuse(f"{op_name(node)}{where(node)} produces the attention input from no projection")


def _one_head(node: fx.Node, h: int, ds: tuple[int, ...], fixed: dict[int, int]) -> bool:
    """Whether ``node`` makes the heads axis by unsqueezing features: a single head (GPT-BigCode's key/value)."""
    return node.op == "call_function" and node.target == aten.unsqueeze.default and not fixed and len(ds) == 1 \
        and node.args[1] % len(shape(node)) == h


def _view(w: Walk, node: fx.Node, h: int, ds: tuple[int, ...], fixed: dict[int, int], first: int,
          member: tuple[int, int] | None, src: fx.Node | None = None) -> None:
    """A reshape on the way back: the split of features into heads, a repeat of key/value heads, the flatten of a
    (group, member) layout, or a reshape that only regroups positions inside head_dim (interleaved rotary halves).
    ``src`` (default: the view's input) is the tensor ``node`` reshapes, an earlier view's input when two compose."""
    src = node.args[0] if src is None else src
    ins, outs = shape(src), shape(node)
    if ins == outs:
        return _heads(w, src, h, ds, fixed, first, member)
    groups = merge_groups(ins, outs) or []
    cannot = Refuse(f"{op_name(node)}{where(node)} reshapes the attention heads in a way growcli cannot follow")
    m = member[0] if member is not None else None
    for (a, b), (c, e) in groups:
        if not c <= h < e:
            continue
        after, before = range(h + 1, e), range(c, h)
        if b - a == 1 and set(ds) <= set(after) and all(k in ds or k in fixed or k == m for k in after) \
                and all(k in fixed for k in before) and all(c <= k < e for k in fixed) and (m is None or m in after):
            # [.., F] → [.., (fixed), H, (block)]: head j owns features base + j·block + [0, block)
            stride = {k: _prod(outs[k + 1:e]) for k in range(c, e)}
            base = sum(fixed[k] * stride[k] for k in before) + first * stride[h]
            w.members = member[1] if member is not None else 1
            return walk_features(w, src, a, base, stride[h])
        if e - c == 1 and b - a == 2 and not fixed and member is None and first == 0 and src is node.args[0] \
                and all(source_dim(node, k) is not None for k in ds):
            nds = tuple(source_dim(node, k) for k in ds)
            if _unsqueezed_repeat(src, a + 1):  # [.., Hkv, G] → [.., Hkv·G]: heads repeated by unsqueeze → expand
                w.repeat.append(ins[a + 1])
                return _heads(w, src.args[0].args[0], a, tuple(k - 1 if k > a + 1 else k for k in nds), {})
            # [.., G, M] → [.., G·M]: head g·M + i is member i of group g
            return _heads(w, src, a, nds, {}, 0, (a + 1, ins[a + 1]))
        if b - a == 1 and e - c > 1 and src.op == "call_function" and src.target in RESHAPES:
            # the heads axis of a view split again ([.., kv·(M + 2), hd] → [.., kv, M + 2, hd]): reshapes compose,
            # so this is one reshape of the first view's input
            return _view(w, node, h, ds, fixed, first, member, src.args[0])
        if not (e - c == 1 and b - a == 1):
            raise cannot
        nh = a
        break
    else:
        raise cannot
    nds: list[int] = []
    nfx: dict[int, int] = {}
    nm = None
    for (a, b), (c, e) in groups:
        inside = [k for k in range(c, e) if k in ds]
        if inside and inside != list(range(c, e)):
            raise cannot  # head_dim mixed with another axis
        if inside:
            nds += range(a, b)  # positions inside head_dim regrouped: still per head
        for k in range(c, e):
            if k in fixed or k == m:
                if not (e - c == 1 and b - a == 1):
                    raise cannot
                if k == m:
                    nm = (a, member[1])
                else:
                    nfx[a] = fixed[k]
    return _heads(w, src, nh, tuple(nds), nfx, first, nm)


def _prod(sizes) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out


def _unsqueezed_repeat(node: fx.Node, r: int) -> bool:
    """Whether ``node`` expands an axis ``r`` that an unsqueeze just made (a true repeat of every head)."""
    src = node.args[0] if node.op == "call_function" and node.target == aten.expand.default else None
    return isinstance(src, fx.Node) and src.op == "call_function" and src.target == aten.unsqueeze.default \
        and len(shape(src)) == len(shape(node)) and src.args[1] % len(shape(src)) == r
