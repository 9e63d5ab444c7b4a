"""The traced graph: tracing a model with ``torch.export`` and reading its ATen nodes.

Holds the ATen op vocabulary the analyses dispatch on (``UNARY``, ``BINARY``, ``CONV``, …),
:class:`Trace` and :func:`trace_model` (which first refreshes the recorded shapes of a loaded
``.pt2`` program edited in memory), and helpers over single nodes: their shapes, names,
parameters and modules, and how a view or an op that only moves dimensions maps an output
dimension back to an input one (:func:`permutation` for every transpose form, :func:`index_result_dim`
for advanced indexing). No analysis happens here; see :mod:`growcli.analysis.coupling`.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn

from growcli.analysis.literals import literal_values, on_meta
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import Batch

aten = torch.ops.aten

# Element-wise ops with one tensor input: positions pass through unchanged.
UNARY = {
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.silu_.default,
    aten.sigmoid.default, aten.tanh.default, aten.hardtanh.default, aten.hardtanh_.default, aten.relu6.default,
    aten.leaky_relu.default, aten.elu.default, aten.hardswish.default, aten.hardsigmoid.default,
    aten.mish.default, aten.softplus.default, aten.dropout.default, aten.feature_dropout.default,
    aten.alpha_dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default,
    aten.neg.default, aten.abs.default, aten.exp.default, aten.sqrt.default, aten.square.default,
    aten.pow.Tensor_Scalar, aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.erf.default,
    aten.log_sigmoid.default if hasattr(aten, "log_sigmoid") else aten.sigmoid.default,
}
# Element-wise ops over several tensors (broadcasting): other full-size operands are coupled.
BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
          aten.minimum.default, aten.where.self, aten.add_.Tensor, aten.mul_.Tensor}
# Reductions with explicit dims.
REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.sum.default,
          aten.mean.default, aten.max.default, aten.min.default}
# Pooling over trailing spatial dims, each channel on its own: (op, number of spatial dims). The rule is in
# :mod:`growcli.analysis.pooling` (with ``x.max(dim)``; some of these return ``(values, indices)``).
POOL = {aten.max_pool2d.default: 2, aten.avg_pool2d.default: 2, aten.adaptive_avg_pool2d.default: 2,
        aten.max_pool1d.default: 1, aten.avg_pool1d.default: 1, aten.adaptive_avg_pool1d.default: 1,
        aten.max_pool3d.default: 3, aten.avg_pool3d.default: 3, aten.adaptive_avg_pool3d.default: 3,
        aten.max_pool1d_with_indices.default: 1, aten.max_pool2d_with_indices.default: 2,
        aten.max_pool3d_with_indices.default: 3, aten.adaptive_max_pool1d.default: 1,
        aten.adaptive_max_pool2d.default: 2, aten.adaptive_max_pool3d.default: 3,
        aten.upsample_nearest2d.vec: 2, aten.upsample_bilinear2d.vec: 2}
# ``conv*d.padding`` is the overload for string padding (``padding="same"`` / ``"valid"``): same arguments in the
# same places, the padding a string (channels are unaffected; code that reads the padding must handle the string).
CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
        aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
# Transposed convolutions (``nn.ConvTranspose1d/2d/3d``); ``aten.convolution`` with ``transposed=True`` is one too
# (:func:`conv_transposed`). Kept out of ``CONV``: their weight holds the channels the other way round (:func:`conv_weight_dims`).
CONV_TRANSPOSE = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
VIEW = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}
# ``a.reshape_as(b)`` / ``a.view_as(b)`` / ``a.expand_as(b)``: ``a`` viewed or expanded to ``b``'s shape, read from ``b``
# at run time (``b``'s values are not read); the rule of the op each equals.
SHAPE_AS = {aten.reshape_as.default: aten.reshape.default, aten.view_as.default: aten.view.default,
            aten.expand_as.default: aten.expand.default}
PAD = {aten.pad.default, aten.constant_pad_nd.default, aten.reflection_pad2d.default, aten.replication_pad2d.default}
BATCH_NORM = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
# ``addmm(bias, x, W) = bias + x @ W``: Hugging Face's Conv1D (GPT-2) is a view → addmm → view.
ADDMM = aten.addmm.default
# Ops that reorder the dimensions and nothing else (:func:`permutation`), in every form ``torch.export`` keeps:
# ``x.permute(…)``, ``x.transpose(a, b)`` / ``swapaxes`` / ``swapdims``, ``x.t()``, ``x.T`` (``numpy_T``), ``x.mT``,
# ``x.mH`` / ``x.adjoint()`` (which also conjugate: element-wise), ``x.movedim(…)``.
PERMUTES = {getattr(getattr(aten, name), overload) for name, overload in (
    ("permute", "default"), ("transpose", "int"), ("t", "default"), ("numpy_T", "default"), ("mT", "default"),
    ("mH", "default"), ("adjoint", "default"), ("swapaxes", "default"), ("swapdims", "default"), ("movedim", "int"),
    ("movedim", "intlist")) if hasattr(getattr(aten, name, None), overload)}
# Ops that only move dimensions around; used to follow a tensor back to what produced it.
REINDEX = PERMUTES | {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default,
                      aten.select.int, aten.slice.Tensor}
# ``out = x.index_put(indices, values, accumulate)``: ``out[indices] = values`` (``+=`` with ``accumulate=True``;
# ``x[idx] += v`` in place); the positions of the dims no index touches pass through (:func:`index_result_dim`).
INDEX_PUT = {aten.index_put.default, aten.index_put_.default}
# Assertions the exporter adds about a tensor's dtype/device; they read a tensor but compute nothing.
METADATA_CHECKS = {aten._assert_tensor_metadata.default} if hasattr(aten, "_assert_tensor_metadata") else set()


class Refuse(Exception):
    """Raised inside a graph walk; the walk's entry point turns it into a :class:`NotGrowableError`
    that names what the walk was about (a layer, the hidden size, an attention)."""


# --------------------------------------------------------------------------- trace
@dataclass
class Trace:
    """An ATen-level graph of the model with parameters as ``get_attr`` nodes."""

    gm: fx.GraphModule
    is_model: bool  # True when ``gm`` is the user's model itself (a loaded .pt2 program)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def weight_users(self) -> dict[str, list[fx.Node]]:
        """FQN of every parameter/buffer → the op nodes using it."""
        out: dict[str, list[fx.Node]] = {}
        for n in self.graph.nodes:
            if n.op == "get_attr":
                out[str(n.target)] = [u for u in n.users]
        return out


def trace_model(module: nn.Module, batch: Batch) -> Trace:
    """Trace ``module`` on ``batch``; a loaded ``.pt2`` program is its own trace.

    A program's recorded shapes go stale once an earlier edit (a previous step, or an earlier
    layer of the same widen) has changed its weights, and the analyses would then compute
    offsets (concatenation, flattening) from the old sizes: they are refreshed first.
    Raises :class:`NotGrowableError` when ``torch.export`` cannot trace the model.
    """
    if isinstance(module, fx.GraphModule) and any(
            n.op == "get_attr" and "val" in n.meta for n in module.graph.nodes):
        if _stale_shapes(module):
            _refresh_shapes(module, batch)
        return Trace(module, True)
    args, kwargs = batch
    # On the meta device, constants the forward builds from literals (an index [-2]) keep their values.
    with warnings.catch_warnings(), literal_values(on_meta(module, [*args, *kwargs.values()])) as literals:
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(module, tuple(args), dict(kwargs), strict=False)
        except Exception as exc:
            # Fallback: draft_export specialises data-dependent control flow on these inputs; the
            # values that steer it (e.g. a sum over channels) stay in the graph, so the analysis
            # refuses any growth that could flip a branch.
            try:
                ep = torch.export.draft_export(module, tuple(args), dict(kwargs))
            except Exception:
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise NotGrowableError(f"torch.export cannot trace the model, so its channels cannot be analysed ({first})") from None
    gm = ep.module()
    if literals is not None:
        literals.fill(gm)
    return Trace(gm, False)


def _stale_shapes(module: fx.GraphModule) -> bool:
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


def _refresh_shapes(module: fx.GraphModule, batch: Batch) -> None:
    """Re-run the program on fake copies of ``batch`` to record every node's current shape (best effort)."""
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


def in_place(ops: set) -> set:
    """The in-place forms (``relu_``, ``add_.Tensor``) of ``ops`` that aten has: the same rule as the functional op."""
    out = set()
    for op in ops:
        packet = getattr(aten, op.overloadpacket.__name__ + "_", None)
        overload = getattr(packet, op._overloadname, None) if packet is not None else None
        if overload is not None:
            out.add(overload)
    return out


def module_of(node: fx.Node) -> str:
    """The innermost module a node was computed in (``""`` for the root or when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def in_scope(node: fx.Node, name: str) -> bool:
    """Whether ``node`` was computed inside a call of module ``name`` (from the trace's module stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    return any(v[0] == name for v in stack.values())


def attr_of(arg: Any) -> str | None:
    """The parameter or buffer name an argument reads, if it is a ``get_attr`` node; else ``None``."""
    return str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def weight_of(node: fx.Node) -> str | None:
    """The parameter a Linear/Conv/Embedding/``addmm`` node reads as its weight; ``None`` if it is computed."""
    t = node.target
    return attr_of(node.args[0] if t == aten.embedding.default else node.args[2] if t == ADDMM else node.args[1])


def data_of(node: fx.Node) -> fx.Node:
    """The data input of a Linear/Conv/Embedding/``addmm`` node (an embedding's indices)."""
    return node.args[1] if node.target in (aten.embedding.default, ADDMM) else node.args[0]


def where(node: fx.Node) -> str:
    """The module a node was called in, as `` in 'path'`` for messages (empty for the root)."""
    path = module_of(node)
    return f" in '{path}'" if path else ""


def op_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)) if node.op == "call_function" else f"{node.op} {t}"


def shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def source_dim(node: fx.Node, dim: int) -> int | None:
    """The dimension of ``node``'s input that becomes its output dimension ``dim`` (a view that
    neither splits nor merges it, or an op that only moves dimensions); None if there is none."""
    src = node.args[0]
    ins, outs, t = shape(src), shape(node), SHAPE_AS.get(node.target, node.target)
    if ins is None or outs is None:
        return None
    rank = len(ins)
    if t in VIEW:
        for (a, b), (c, d) in merge_groups(ins, outs) or []:
            if c <= dim < d:
                big_in = [k for k in range(a, b) if ins[k] > 1]
                big_out = [k for k in range(c, d) if outs[k] > 1]
                return big_in[0] if big_out == [dim] and len(big_in) == 1 and ins[big_in[0]] == outs[dim] else None
        return None
    if t in PERMUTES:
        return permutation(node, rank)[dim]
    if t == aten.unsqueeze.default:
        k = node.args[1] % (rank + 1)
        return None if dim == k else dim - (1 if k < dim else 0)
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        ds = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        kept = [k for k in range(rank) if not (k in [d % rank for d in ds] and ins[k] == 1)]
        return kept[dim]
    if t == aten.expand.default:
        k = dim - (len(outs) - rank)
        return k if k >= 0 else None
    if t == aten.select.int:
        d = node.args[1] % rank
        return dim + (1 if d <= dim else 0)
    if t == aten.slice.Tensor:
        d = node.args[1] % rank if len(node.args) > 1 else 0
        return None if d == dim and ins[dim] != outs[dim] else dim
    return None


def permutation(node: fx.Node, rank: int) -> list[int]:
    """For a :data:`PERMUTES` node whose input has ``rank`` dims: ``perm[i]`` is the input dim that becomes output
    dim ``i`` (``x.mT`` of a rank-3 tensor: ``[0, 2, 1]``; ``x.T``: the dims reversed; ``x.t()`` of a vector: ``[0]``)."""
    t, args = node.target, node.args
    if t == aten.permute.default:
        return [d % rank for d in args[1]]
    perm = list(range(rank))
    name = t.overloadpacket.__name__
    if name == "numpy_T":
        return perm[::-1]
    if name == "movedim":
        src, dst = (list(args[1]), list(args[2])) if isinstance(args[1], (list, tuple)) else ([args[1]], [args[2]])
        src, dst = [d % rank for d in src], [d % rank for d in dst]
        out: list[int | None] = [None] * rank
        for a, b in zip(src, dst):
            out[b] = a
        rest = iter(d for d in range(rank) if d not in src)
        return [next(rest) if d is None else d for d in out]
    if name == "t":
        a, b = (0, 1) if rank == 2 else (0, 0)
    elif name in ("transpose", "swapaxes", "swapdims"):
        a, b = args[1] % rank, args[2] % rank
    else:  # mT, mH, adjoint: the last two dims
        a, b = rank - 2, rank - 1
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def index_result_dim(indices: Sequence[Any], rank: int, dim: int) -> tuple[int, int] | None:
    """Where dim ``dim`` of a rank-``rank`` tensor ``x`` lands in ``x[indices]`` (advanced indexing, as ``index``
    and ``index_put`` read it), with that result's rank: ``(position, result rank)``; None when an index touches
    ``dim`` or an index's shape is not recorded. The indexed dims become the indices' broadcast dims, in place
    when they are adjacent, else first (NumPy's rule); a boolean mask indexes as many dims as it has."""
    indexed, index_rank, pos = [], 0, 0
    for idx in indices:
        if idx is None:
            pos += 1
            continue
        val = idx.meta.get("val") if isinstance(idx, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        width = val.dim() if val.dtype == torch.bool else 1
        indexed += list(range(pos, pos + width))
        index_rank = max(index_rank, 1 if val.dtype == torch.bool else val.dim())
        pos += width
    if dim in indexed:
        return None
    out_rank = rank - len(indexed) + index_rank
    if not indexed:
        return dim, out_rank
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    kept = [d for d in range(rank) if d not in indexed]
    if adjacent:
        return (dim if dim < indexed[0] else dim - len(indexed) + index_rank), out_rank
    return index_rank + kept.index(dim), out_rank


def conv_groups(node: fx.Node) -> int:
    if node.target == aten.convolution.default:
        return int(node.args[8]) if len(node.args) > 8 else 1
    if len(node.args) > 6:
        return int(node.args[6])
    return int(node.kwargs.get("groups", 1))


def conv_transposed(node: fx.Node) -> bool:
    """Whether a convolution node is a transposed one (``conv_transpose*``, or ``convolution`` with ``transposed``)."""
    if node.target == aten.convolution.default:
        return bool(node.args[6]) if len(node.args) > 6 else False
    return node.target in CONV_TRANSPOSE


def conv_weight_dims(node: fx.Node) -> tuple[int, int]:
    """Which dims of a convolution node's weight hold its output and its input channels, ``(out, in)``.

    A convolution's weight is ``[out, in/groups, k…]``: ``(0, 1)``; a transposed convolution's is
    ``[in, out/groups, k…]``: ``(1, 0)``. Stride, padding, output padding and dilation act on the spatial
    dims only, never on the channels."""
    return (1, 0) if conv_transposed(node) else (0, 1)


def merge_groups(ins: Sequence[int], outs: Sequence[int]):
    """Pair runs of input dims with runs of output dims of equal product (a view's structure)."""
    groups = []
    i = j = 0
    while i < len(ins) or j < len(outs):
        a, c = i, j
        p, q = 1, 1
        if i < len(ins):
            p *= ins[i]
            i += 1
        if j < len(outs):
            q *= outs[j]
            j += 1
        while p != q:
            if p < q and i < len(ins):
                p *= ins[i]
                i += 1
            elif q < p and j < len(outs):
                q *= outs[j]
                j += 1
            else:
                return None
        # absorb trailing size-1 dims into this run
        groups.append(((a, i), (c, j)))
    return groups


def flat_args(args) -> list:
    """Every leaf of nested argument lists/tuples, in order."""
    items = []
    for a in args:
        items += flat_args(a) if isinstance(a, (list, tuple)) else [a]
    return items


def reduce_dims(node: fx.Node, rank: int) -> list[int]:
    """The dimensions a reduction node (mean/sum/amax…) reduces over; all of them when none are given."""
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None or dims == []:
        return list(range(rank))
    return [d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
