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
- before that split, on the features: the split or slice of a fused ``qkv`` projection (an
  offset), element-wise ops with scalars or with tensors constant across the features (query
  scaling), per-feature parameters (a norm's ``γ``, recorded so that they grow with the heads)
  and norms whose statistic is a mean over all heads' features (recorded: they keep their value
  only when every head is copied the same number of times);
- the ``unsqueeze → expand → reshape`` that repeats key/value heads (grouped-query attention).

Anything else is refused, with the op and module named. The sites are built in
:mod:`growcli.analysis.attention`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from growcli.analysis.matmuls import param_matmul
from growcli.analysis.trace import (ADDMM, REDUCE, Refuse, Trace, UNARY, VIEW, attr_of, flat_args, merge_groups,
                                    module_of, op_name, reduce_dims, shape, source_dim, where)

aten = torch.ops.aten
# Element-wise ops that may sit between a projection and attention (rotary embeddings, casts, scaling).
ELEMENTWISE = UNARY | {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
# Per-element ops of a norm's statistic (Qwen3's q_norm/k_norm, OLMo-2's q_norm over all heads).
HEAD_NORM = {aten.rsqrt.default, aten.sqrt.default, aten.reciprocal.default}
MOVES = {aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default, aten.expand.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unsafe_chunk.default}
NORMS = {aten.layer_norm.default} | ({aten.rms_norm.default} if hasattr(aten, "rms_norm") else set())
# Statistics over the features that duplicating every head the same number of times leaves unchanged.
MEANS = {aten.mean.dim, aten.mean.default, aten.amax.default, aten.amin.default}


@dataclass
class Projection:
    """The features of one projection that an attention reads (or, for ``o``, the columns it writes from).

    ``weight`` is the parameter's name in the trace and ``dim`` the weight dimension indexed by
    those features (rows of a Linear producing q/k/v; columns of the Linear reading the
    attention output; for Conv1D ``addmm`` the other way round; dim 0 of a per-feature
    parameter). ``offset``/``size`` locate the features inside that dimension (a fused ``qkv``
    weight holds three projections); head ``h`` owns ``offset + h·head_size + [0, head_size)``,
    ``head_size`` being ``head_dim`` unless set (a per-head fused ``qkv``: the head's q, k and v).
    """

    weight: str
    dim: int
    bias: str | None
    offset: int
    size: int
    module: str
    head_size: int | None = None


@dataclass
class Walk:
    """What the walk back from one attention input found."""

    data: set[fx.Node]  # nodes computed from some projection (the operands worth following)
    found: set = field(default_factory=set)  # (projection node, offset, head block)
    repeat: list[int] = field(default_factory=list)  # factors by which heads were repeated (GQA)
    params: set = field(default_factory=set)  # (parameter, dim, offset, head block, module): per-feature parameters
    stats: set = field(default_factory=set)  # modules of norms whose statistic is over all heads' features


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


def _args_of(node: fx.Node, dim_default: int = 0) -> tuple:
    """``(input, sizes, dim)`` of a split/chunk node."""
    x = node.args[0]
    sizes = node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", dim_default)
    return x, sizes, dim % len(shape(x))


def _part_start(split: fx.Node, i: int) -> int:
    x, sizes, dim = _args_of(split)
    if split.target in (aten.chunk.default, aten.unsafe_chunk.default):
        sizes = -(-shape(x)[dim] // sizes)
    return sum(sizes[:i]) if isinstance(sizes, (list, tuple)) else i * sizes


def _heads(w: Walk, node: fx.Node, h: int, ds: tuple[int, ...], fixed: dict[int, int]) -> None:
    """``node``'s axis ``h`` indexes heads, ``ds`` hold positions inside a head, ``fixed`` are axes of which one
    index was selected further on (the q part of a fused ``[.., 3, H, hd]``)."""
    if node.op != "call_function":
        raise Refuse(f"attention input '{node.name}' does not come from a projection")
    t = node.target
    src = node.args[0] if node.args else None
    if _one_head(node, h, ds, fixed):  # one head made by unsqueeze (multi-query's key/value): its features
        return _features(w, src, source_dim(node, ds[0]), 0, shape(node)[ds[0]])
    if t in MOVES:
        back = lambda a: source_dim(node, a)  # noqa: E731
        nh, nds, nfx = back(h), [back(a) for a in ds], {back(a): i for a, i in fixed.items()}
        if nh is None or None in nds or None in nfx:
            raise Refuse(f"{op_name(node)}{where(node)} moves the heads in a way growcli cannot follow")
        if shape(src)[nh] != shape(node)[h]:  # an expand that broadcasts one head to all: a repeat
            w.repeat.append(shape(node)[h] // shape(src)[nh])
        return _heads(w, src, nh, tuple(nds), nfx)
    if t == aten.select.int or t == operator.getitem and getattr(src, "target", None) == aten.unbind.int:
        inner = src if t == aten.select.int else src.args[0]
        k = (node.args[1] if t == aten.select.int else src.args[1] if len(src.args) > 1 else 0) % len(shape(inner))
        up = lambda a: a + 1 if a >= k else a  # noqa: E731  (the selected axis is back in the input)
        index = node.args[2] if t == aten.select.int else node.args[1]
        return _heads(w, inner, up(h), tuple(up(a) for a in ds),
                      {**{up(a): i for a, i in fixed.items()}, k: index % shape(inner)[k]})
    if t == operator.getitem and getattr(src, "target", None) in SPLITS:
        x, _, dim = _args_of(src)
        if dim == h:
            raise Refuse(f"{op_name(src)}{where(src)} divides the attention heads")
        if dim not in ds:
            raise Refuse(f"{op_name(src)}{where(src)} divides another dimension than the head dimension")
        if _one_head(x, h, ds, fixed):  # the single head of unsqueezed features: this part is its features
            return _features(w, x.args[0], source_dim(x, dim), _part_start(src, node.args[1]), shape(node)[dim])
        return _heads(w, x, h, ds, fixed)  # one part of each head's block (a per-head fused qkv)
    if t in VIEW:
        return _view(w, node, h, ds, fixed)
    if t in UNARY or t in HEAD_NORM:
        return _heads(w, src, h, ds, fixed)
    rank = len(shape(node))
    if t in REDUCE and len(shape(src)) == rank and set(reduce_dims(node, rank)) <= set(ds):
        return _heads(w, src, h, ds, fixed)  # a statistic inside each head (kept as size 1)
    if t in NORMS and set(range(rank - len(node.args[1]), rank)) <= set(ds):
        return _heads(w, src, h, ds, fixed)  # a norm over head_dim: each head normalised on its own
    if t in ELEMENTWISE:
        size, followed = shape(node)[h], False
        if not any(isinstance(a, fx.Node) and a in w.data for a in node.args):
            raise Refuse(f"{op_name(node)}{where(node)} produces the attention input from no projection")
        for arg in node.args:
            s = shape(arg)
            if s is None:
                continue
            off = rank - len(s)
            if arg not in w.data:
                if h - off >= 0 and s[h - off] > 1:
                    raise Refuse(f"{op_name(node)}{where(node)} combines the attention heads with a tensor that differs "
                                 "from head to head")
                continue  # a tensor not computed from a projection, the same for every head (rotary cos/sin)
            if h - off < 0 or s[h - off] == 1 and size > 1:
                continue  # broadcast over the heads: the same for every head, whatever their number
            _heads(w, arg, h - off, tuple(a - off for a in ds if a - off >= 0),
                   {a - off: i for a, i in fixed.items() if a - off >= 0})
            followed = True
        if not followed:
            raise Refuse(f"{op_name(node)}{where(node)} produces the attention input from no projection")
        return
    if t in (aten.cat.default, aten.stack.default):
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        if dim == h:
            raise Refuse(f"{op_name(node)}{where(node)} concatenates attention heads")
        if dim not in ds:
            raise Refuse(f"{op_name(node)}{where(node)} joins tensors along another dimension than the head dimension")
        for part in node.args[0]:
            if t == aten.cat.default:
                _heads(w, part, h, ds, fixed)
            else:  # the stacked axis is a new position inside head_dim (interleaved rotary halves)
                down = lambda a: a - 1 if a > dim else a  # noqa: E731
                _heads(w, part, down(h), tuple(down(a) for a in ds if a != dim),
                       {down(a): i for a, i in fixed.items()})
        return
    if t == aten.slice.Tensor:
        if node.args[1] % rank == h and shape(node)[h] != shape(src)[h]:
            raise Refuse(f"slice{where(node)} takes some of the attention heads")
        return _heads(w, src, h, ds, fixed)
    raise Refuse(f"{op_name(node)}{where(node)} sits between a projection and the attention, and growcli has no rule for it")


def _one_head(node: fx.Node, h: int, ds: tuple[int, ...], fixed: dict[int, int]) -> bool:
    """Whether ``node`` makes the heads axis by unsqueezing features: a single head (GPT-BigCode's key/value)."""
    return node.op == "call_function" and node.target == aten.unsqueeze.default and not fixed and len(ds) == 1 \
        and node.args[1] % len(shape(node)) == h


def _view(w: Walk, node: fx.Node, h: int, ds: tuple[int, ...], fixed: dict[int, int]) -> None:
    """A reshape on the way back: the split of features into heads, a repeat of key/value heads, or a reshape
    that only regroups positions inside head_dim (the flatten of interleaved rotary halves)."""
    src = node.args[0]
    ins, outs = shape(src), shape(node)
    if ins == outs:
        return _heads(w, src, h, ds, fixed)
    groups = merge_groups(ins, outs) or []
    cannot = Refuse(f"{op_name(node)}{where(node)} reshapes the attention heads in a way growcli cannot follow")
    for (a, b), (c, e) in groups:
        if not c <= h < e:
            continue
        after, before = range(h + 1, e), range(c, h)
        if b - a == 1 and set(ds) <= set(after) and all(k in ds or k in fixed for k in after) \
                and all(k in fixed for k in before) and all(c <= k < e for k in fixed):
            # [.., F] → [.., (fixed), H, (block)]: head j owns features base + j·block + [0, block)
            stride = {k: _prod(outs[k + 1:e]) for k in range(c, e)}
            base = sum(fixed[k] * stride[k] for k in before)
            return _features(w, src, a, base, stride[h])
        if e - c == 1 and b - a == 2 and not fixed and all(source_dim(node, k) is not None for k in ds):
            # [.., Hkv, G, ..] → [.., Hkv·G, ..]: heads repeated by an expand below this reshape
            w.repeat.append(ins[a + 1])
            return _back_repeat(w, src, a, a + 1, tuple(source_dim(node, k) for k in ds))
        if not (e - c == 1 and b - a == 1):
            raise cannot
        nh = a
        break
    else:
        raise cannot
    nds: list[int] = []
    nfx: dict[int, int] = {}
    for (a, b), (c, e) in groups:
        inside = [k for k in range(c, e) if k in ds]
        if inside and inside != list(range(c, e)):
            raise cannot  # head_dim mixed with another axis
        if inside:
            nds += range(a, b)  # positions inside head_dim regrouped: still per head
        for k in range(c, e):
            if k in fixed:
                if not (e - c == 1 and b - a == 1):
                    raise cannot
                nfx[a] = fixed[k]
    return _heads(w, src, nh, tuple(nds), nfx)


def _prod(sizes) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out


def _back_repeat(w: Walk, node: fx.Node, h: int, r: int, ds: tuple[int, ...]) -> None:
    """Below a ``[Hkv, G] → H`` reshape: axis ``r`` must come from expanding an unsqueezed axis (a true repeat)."""
    src = node.args[0] if node.target == aten.expand.default else None
    if src is not None and src.target == aten.unsqueeze.default and len(shape(src)) == len(shape(node)) \
            and src.args[1] % len(shape(src)) == r:
        fix = lambda a: a - 1 if a > r else a  # noqa: E731  (the unsqueezed axis disappears)
        return _heads(w, src.args[0], fix(h), tuple(fix(a) for a in ds), {})
    raise Refuse(f"{op_name(node)}{where(node)} builds repeated key/value heads in a way growcli cannot follow")


def _features(w: Walk, node: fx.Node, f: int, offset: int, block: int) -> None:
    """Follow a tensor whose axis ``f`` holds the heads' features (head ``j`` at ``offset + j·block``) back to its
    projection."""
    if node.op != "call_function":
        raise Refuse(f"attention features '{node.name}' do not come from a projection")
    t = node.target
    if t in VIEW:
        src_f = source_dim(node, f)
        if src_f is None:
            raise Refuse(f"{op_name(node)}{where(node)} reshapes the attention features")
        return _features(w, node.args[0], src_f, offset, block)
    if t in UNARY:
        return _features(w, node.args[0], f, offset, block)
    if t in MOVES and source_dim(node, f) is not None:
        return _features(w, node.args[0], source_dim(node, f), offset, block)
    if t == operator.getitem and getattr(node.args[0], "target", None) in SPLITS:
        split = node.args[0]
        x, _, dim = _args_of(split)
        if dim != f:
            raise Refuse(f"{op_name(split)}{where(split)} divides another dimension than the features")
        return _features(w, x, f, offset + _part_start(split, node.args[1]), block)
    if t == aten.slice.Tensor:
        src, rank = node.args[0], len(shape(node))
        dim = node.args[1] % rank if len(node.args) > 1 else 0
        if dim != f or shape(src)[f] == shape(node)[f]:
            return _features(w, src, f, offset, block)
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        step = node.args[4] if len(node.args) > 4 else 1
        if step != 1:
            raise Refuse(f"slice{where(node)} takes every {step}th attention feature")
        return _features(w, src, f, offset + (start % shape(src)[f] if start < 0 else start), block)
    if t in ELEMENTWISE:
        return _elementwise(w, node, f, offset, block, stat=False)
    if t in NORMS and len(node.args[1]) == 1 and f == len(shape(node)) - 1:
        _norm_params(w, node, f, offset, block)
        return _features(w, node.args[0], f, offset, block)
    if t == aten.linear.default and f == len(shape(node)) - 1 and attr_of(node.args[1]):
        w.found.add((node, offset, block))
        return
    if t == ADDMM and f == 1 and attr_of(node.args[2]):
        w.found.add((node, offset, block))
        return
    if (m := param_matmul(node)) is not None and f == m.out_dim:  # x @ W.T: a Linear written as a matmul
        w.found.add((node, offset, block))
        return
    raise Refuse(f"{op_name(node)}{where(node)} produces attention features and growcli has no rule for it")


def _norm_params(w: Walk, node: fx.Node, f: int, offset: int, block: int) -> None:
    """A LayerNorm/RMSNorm over all heads' features: its statistic, and ``γ``/``β`` that grow with the heads."""
    w.stats.add(module_of(node))
    for arg in node.args[2:4]:
        if attr_of(arg):
            w.params.add((attr_of(arg), 0, offset, block, module_of(node)))


def _elementwise(w: Walk, node: fx.Node, f: int, offset: int, block: int, stat: bool) -> None:
    """An element-wise op on the features (``stat``: on a statistic over them, size 1 along ``f``)."""
    rank, size, followed = len(shape(node)), shape(node)[f], False
    for i, arg in enumerate(node.args):
        s = shape(arg)
        if s is None:
            continue  # a scalar: the same for every feature (query scaling)
        off = rank - len(s)
        fa = f - off
        along = s[fa] if fa >= 0 else 1
        if arg in w.data:
            if along == size:
                (_stat if stat else _features)(w, arg, fa, offset, block)
            elif along == 1:
                _stat(w, arg, fa, offset, block)
            else:
                raise Refuse(f"{op_name(node)}{where(node)} combines attention features of different sizes")
            followed = True
        elif along > 1:
            name = attr_of(arg)
            if name is None or stat or any(x > 1 for k, x in enumerate(s) if k != fa):
                raise Refuse(f"{op_name(node)}{where(node)} combines the attention features with a tensor that varies "
                             "across them, and growcli has no rule for it")
            w.params.add((name, fa, offset, block, module_of(node)))  # a per-feature scale or shift, copied
    if not followed:
        raise Refuse(f"{op_name(node)}{where(node)} produces attention features from no projection")


def _stat(w: Walk, node: fx.Node, f: int, offset: int, block: int) -> None:
    """Follow a statistic over the features (size 1 along ``f``) back to the reduction that made it."""
    if node.op != "call_function":
        raise Refuse(f"'{node.name}' scales the attention features and does not come from them")
    t = node.target
    if t in UNARY or t in HEAD_NORM:
        return _stat(w, node.args[0], f, offset, block)
    if t in ELEMENTWISE:
        return _elementwise(w, node, f, offset, block, stat=True)
    src = node.args[0]
    if t in REDUCE and len(shape(src)) == len(shape(node)) and reduce_dims(node, len(shape(src))) == [f]:
        if t not in MEANS:
            raise Refuse(f"{op_name(node)}{where(node)} sums over all attention heads' features, which changes with "
                         "their number")
        w.stats.add(module_of(node))
        return _features(w, src, f, offset, block)
    raise Refuse(f"{op_name(node)}{where(node)} computes a statistic of the attention features and growcli has no "
                 "rule for it")


def projection_in(node: fx.Node, offset: int, size: int, head_size: int | None = None) -> Projection:
    """The features ``[offset, offset+size)`` produced by a linear/addmm node."""
    if node.target == ADDMM:
        return Projection(attr_of(node.args[2]), 1, attr_of(node.args[0]), offset, size, module_of(node), head_size)
    if (m := param_matmul(node)) is not None:  # x @ W.T (its bias, if any, is an add met on the way)
        return Projection(m.fqn, m.weight_out, None, offset, size, module_of(node), head_size)
    bias = attr_of(node.args[2]) if len(node.args) > 2 else None
    return Projection(attr_of(node.args[1]), 0, bias, offset, size, module_of(node), head_size)
