"""From the features an attention reads back to the projection that produces them.

The second half of the walk of :mod:`growcli.analysis.attention_inputs`: once the heads axis has been
split back into the features of one tensor ``[.., F]`` (head ``j`` owning the block ``offset + j·block +
[0, block)``), :func:`walk_features` follows that feature axis back to a Linear, a Conv1D ``addmm`` or a
product by a weight (``x @ W.T``), through views, casts, moves, the split or slice of a fused ``qkv``
(an offset), element-wise ops with scalars or per-feature parameters (recorded so that they grow with the
heads) and norms over all heads' features (recorded: exact only when every head is copied equally often).
Anything else is refused, naming the op and module.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from growcli.analysis.matmuls import param_matmul
from growcli.analysis.trace import (ADDMM, REDUCE, Refuse, UNARY, VIEW, attr_of, module_of, op_name, reduce_dims,
                                    shape, source_dim, where)

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
    weight holds three projections); block ``b`` owns ``offset + b·head_size + [0, head_size)``,
    ``head_size`` being ``head_dim`` unless set (a per-head fused ``qkv``: the head's q, k and v). A block
    holds ``members`` of the attention's heads: more than one where the query heads of a key/value head sit in
    one block with it (Falcon's new decoder architecture, ``[kv, G + 2, head_dim]``): head ``h`` is in block
    ``h // members``, and such blocks are copied whole.
    """

    weight: str
    dim: int
    bias: str | None
    offset: int
    size: int
    module: str
    head_size: int | None = None
    members: int = 1


@dataclass
class Walk:
    """What the walk back from one attention input found."""

    data: set[fx.Node]  # nodes computed from some projection (the operands worth following)
    found: set = field(default_factory=set)  # (projection node, offset, head block)
    repeat: list[int] = field(default_factory=list)  # factors by which heads were repeated (GQA)
    params: set = field(default_factory=set)  # (parameter, dim, offset, head block, module): per-feature parameters
    stats: set = field(default_factory=set)  # modules of norms whose statistic is over all heads' features
    members: int = 1  # the attention's heads per block (a (group, member) layout of the projection's rows)


def args_of(node: fx.Node, dim_default: int = 0) -> tuple:
    """``(input, sizes, dim)`` of a split/chunk node."""
    x = node.args[0]
    sizes = node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", dim_default)
    return x, sizes, dim % len(shape(x))


def part_start(split: fx.Node, i: int) -> int:
    """Where part ``i`` of a split/chunk node starts along its dim."""
    x, sizes, dim = args_of(split)
    if split.target in (aten.chunk.default, aten.unsafe_chunk.default):
        sizes = -(-shape(x)[dim] // sizes)
    return sum(sizes[:i]) if isinstance(sizes, (list, tuple)) else i * sizes


def walk_features(w: Walk, node: fx.Node, f: int, offset: int, block: int) -> None:
    """Follow a tensor whose axis ``f`` holds the heads' features (head ``j`` at ``offset + j·block``) back to its
    projection."""
    if node.op != "call_function":
        raise Refuse(f"attention features '{node.name}' do not come from a projection")
    t = node.target
    if t in VIEW:
        src_f = source_dim(node, f)
        if src_f is None:
            raise Refuse(f"{op_name(node)}{where(node)} reshapes the attention features")
        return walk_features(w, node.args[0], src_f, offset, block)
    if t in UNARY:
        return walk_features(w, node.args[0], f, offset, block)
    if t in MOVES and source_dim(node, f) is not None:
        return walk_features(w, node.args[0], source_dim(node, f), offset, block)
    if t == operator.getitem and getattr(node.args[0], "target", None) in SPLITS:
        split = node.args[0]
        x, _, dim = args_of(split)
        if dim != f:
            raise Refuse(f"{op_name(split)}{where(split)} divides another dimension than the features")
        return walk_features(w, x, f, offset + part_start(split, node.args[1]), block)
    if t == aten.slice.Tensor:
        src, rank = node.args[0], len(shape(node))
        dim = node.args[1] % rank if len(node.args) > 1 else 0
        if dim != f or shape(src)[f] == shape(node)[f]:
            return walk_features(w, src, f, offset, block)
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        step = node.args[4] if len(node.args) > 4 else 1
        if step != 1:
            raise Refuse(f"slice{where(node)} takes every {step}th attention feature")
        return walk_features(w, src, f, offset + (start % shape(src)[f] if start < 0 else start), block)
    if t in ELEMENTWISE:
        return _elementwise(w, node, f, offset, block, stat=False)
    if t in NORMS and len(node.args[1]) == 1 and f == len(shape(node)) - 1:
        _norm_params(w, node, f, offset, block)
        return walk_features(w, node.args[0], f, offset, block)
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
                (_stat if stat else walk_features)(w, arg, fa, offset, block)
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
        return walk_features(w, src, f, offset, block)
    raise Refuse(f"{op_name(node)}{where(node)} computes a statistic of the attention features and growcli has no "
                 "rule for it")


def projection_in(node: fx.Node, offset: int, size: int, head_size: int | None = None, members: int = 1) -> Projection:
    """The features ``[offset, offset+size)`` produced by a linear/addmm node."""
    if node.target == ADDMM:
        return Projection(attr_of(node.args[2]), 1, attr_of(node.args[0]), offset, size, module_of(node), head_size,
                          members)
    if (m := param_matmul(node)) is not None:  # x @ W.T (its bias, if any, is an add met on the way)
        return Projection(m.fqn, m.weight_out, None, offset, size, module_of(node), head_size, members)
    bias = attr_of(node.args[2]) if len(node.args) > 2 else None
    return Projection(attr_of(node.args[1]), 0, bias, offset, size, module_of(node), head_size, members)
