"""Phase 1 of the residual-stream analysis: which tensors carry the hidden size.

:class:`StreamAnalysis` is the coupled-channel analysis of :mod:`growcli.analysis.coupling` in
*stream mode*, started at the op that writes the stream first
(:func:`growcli.analysis.stream.stream_start`): LayerNorm and RMSNorm ops join the stream instead
of stopping it, and a mean or sum over the hidden dimension becomes a per-token statistic that is
followed until it multiplies the stream again. Mixture-of-experts layers are followed through the ops
that move whole hidden vectors between rows (:data:`ROW_OPS`, :func:`row_dim`: ``x[token_ids]``,
``index_select``, ``repeat_interleave`` along the token dimension), sums over the top-k rows of a token
and additions of rows back onto the tokens (:data:`ACCUMULATE`: ``index_add_``, ``scatter_add_``); the
experts' per-expert matmuls (``bmm`` of ``w[expert_ids]``, grouped matmuls), like any other product by a
weight (``x @ W.T``; :func:`growcli.analysis.matmuls.param_matmul`), read the stream like a Linear
(``experts.gate_up_proj``'s input dim) and write it like one (``experts.down_proj``'s output dim). How each
of these tensors grows is phase 2, :mod:`growcli.analysis.stream_plan` and :mod:`growcli.analysis.stream_rules`;
:mod:`growcli.analysis.stream` has the overview.
"""

from __future__ import annotations

import torch
from torch import fx

from growcli.analysis.coupled_group import Group, TensorUse
from growcli.analysis.coupling import Analysis
from growcli.analysis.layouts import CORE, Cat, Fixed, Layout
from growcli.analysis.liveness import dead_nodes
from growcli.analysis.trace import (ADDMM, BINARY, CONV, METADATA_CHECKS, REDUCE, REINDEX, Refuse, Trace, UNARY, VIEW,
                                    attr_of, flat_args, module_of, op_name, reduce_dims, shape, weight_of, where)
from growcli.core.errors import NotGrowableError

aten = torch.ops.aten
RMS_NORM = aten.rms_norm.default if hasattr(aten, "rms_norm") else None
NORMS = {aten.layer_norm.default} | ({RMS_NORM} if RMS_NORM is not None else set())
PRODUCERS = {aten.linear.default, aten.embedding.default, ADDMM} | CONV
# Ops that gather or repeat whole rows along a dimension other than the hidden one: every output hidden vector
# is one of the input's (tokens sent to their experts, and back).
ROW_OPS = {aten.index.Tensor, aten.index_select.default, aten.repeat_interleave.self_int}
if hasattr(aten.repeat_interleave, "self_Tensor"):
    ROW_OPS.add(aten.repeat_interleave.self_Tensor)
# ``out = self; out[index[i]] += source[i]`` along a dimension other than the hidden one (index_add, scatter_add
# with an index constant along the hidden dim): expert outputs summed back onto their tokens.
ACCUMULATE = {aten.index_add.default, aten.index_add_.default, aten.scatter_add.default, aten.scatter_add_.default}
# Fresh zero tensors (what ACCUMULATE adds onto): zero at every position, whatever the size.
ZEROS = {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}
# Element-wise ops a per-token statistic may pass through, with the power they raise its scale to.
STAT_POWER = {aten.rsqrt.default: -0.5, aten.sqrt.default: 0.5, aten.reciprocal.default: -1.0}


# --------------------------------------------------------------------------- phase 1: which tensors
class StreamAnalysis(Analysis):
    """Coupled-channel analysis that follows the hidden dimension through normalisations.

    Besides the tensors carrying the channels (``core``), it collects ``stats``: per-token
    statistics over the channels (a mean or sum over the hidden dimension) and what is computed
    from them alone. Roles of parameters are decided later, per use, by :func:`plan_stream`.
    """

    whole_copy_norms = False  # the stream grows by tiles and padding, not whole copies: a GroupNorm is refused

    def __init__(self, trace: Trace, start: fx.Node):
        super().__init__(trace, module_of(start))
        self.start = start
        self.stats: dict[fx.Node, None] = {}
        # Hidden states that are model outputs (an embedding model's last_hidden_state) → their hidden dim;
        # they grow with the stream, and the verification compares them through the output map.
        self.outputs: dict[fx.Node, int] = {}
        self.dead = dead_nodes(trace.graph)  # read for their shape only (BART's inputs_embeds[:, :, -1]): no use

    def run(self) -> Group:
        self.group = Group(self.layer, 0)
        try:
            weight = weight_of(self.start)
            dim = self._producer(self.start, weight)
            self.group.size = shape(self.start)[dim]
            self._mark(self.start, dim, backward=False)
            self._drain()
        except Refuse as exc:
            raise NotGrowableError(f"hidden size: {exc}") from None
        self.group.uses = list(self._uses.values())
        return self.group

    def _use(self, fqn: str, dim: int, role: str, layout: Layout = CORE, groups: int = 1) -> None:
        # Shared (tied) weights and roles are resolved per use in plan_stream; only layouts matter here.
        if layout is not CORE and not (role == "consumer" and hidden_cat(layout)):
            raise Refuse(f"parameter {fqn} reads the hidden dimension concatenated or flattened with another")
        self._uses.setdefault(fqn, TensorUse(fqn, dim, role))

    def _mark_derived(self, node: fx.Node, dim: int, layout: Layout) -> None:
        # Whole hidden vectors side by side (a classifier over cat([cls, mean(patches)])): read block by block.
        if not hidden_cat(layout):
            raise Refuse(f"{op_name(node)}{where(node)} concatenates or flattens the hidden dimension with another one")
        super()._mark_derived(node, dim, layout)

    def _stat(self, node: fx.Node) -> None:
        if node in self.core:
            raise Refuse(f"{op_name(node)}{where(node)} mixes a statistic over the hidden dimension with the hidden states")
        if node not in self.stats:
            self.stats[node] = None
            self.work.append(("fwd", node))

    def _forward(self, src: fx.Node, node: fx.Node) -> None:
        if node.op == "call_function" and node.target in METADATA_CHECKS or node in self.dead:
            return
        if node.op == "output":
            if src in self.stats:
                raise Refuse("a statistic over the hidden dimension reaches the model's output, whose shape would "
                             "change; grow a model with a head (…ForCausalLM, …ForMaskedLM, …ForImageClassification…)")
            if src in self.derived:
                raise Refuse(f"hidden states concatenated along the hidden dimension ({op_name(src)}{where(src)}) reach "
                             "the model's output, which growcli cannot map back to the original's")
            self.outputs[src] = self._state(src)[0]
            return
        if src in self.stats:
            return self._stat_user(src, node)
        dim, _ = self._state(src)
        t = node.target
        rank = len(shape(src))
        if t in NORMS:
            norm_dims = len(node.args[1])
            if dim < rank - norm_dims:
                return super()._forward(src, node) if t == aten.layer_norm.default else self._propagate(src, node, dim)
            if node.args[0] is not src or norm_dims != 1:
                raise Refuse(f"{op_name(node)}{where(node)} normalises the hidden dimension together with others")
            for i, role in ((2, "norm_weight"), (3, "norm_bias")):
                fqn = attr_of(node.args[i]) if len(node.args) > i else None
                if fqn is not None and not (t == RMS_NORM and i == 3):
                    self._use(fqn, 0, role)
            self._propagate(src, node, dim)
            return
        if t in REDUCE and dim in reduce_dims(node, rank):
            self._stat(node)
            return
        if t in ROW_OPS:
            self._propagate(src, node, row_dim(node, src, dim))
            return
        if t in ACCUMULATE:
            if node.args[2] is src:
                raise Refuse(f"{op_name(node)}{where(node)} uses the hidden states as indices")
            self._accumulate(node, dim)
            self._mark(node, dim, backward=False)
            return
        super()._forward(src, node)

    def _accumulate(self, node: fx.Node, dim: int) -> None:
        """``self`` and ``source`` of an ACCUMULATE op carry the hidden states in ``dim``, as its output does."""
        rank = len(shape(node))
        if node.args[1] % rank == dim:
            raise Refuse(f"{op_name(node)}{where(node)} adds entries along the hidden dimension")
        index = node.args[2]
        if node.target in (aten.scatter_add.default, aten.scatter_add_.default) and not _constant_along(index, dim):
            raise Refuse(f"{op_name(node)}{where(node)} scatters with an index that varies along the hidden dimension")
        for arg in (node.args[0], node.args[3]):
            if isinstance(arg, fx.Node) and arg not in self.core:
                self._mark(arg, dim, backward=True)

    def _backward(self, node: fx.Node) -> None:
        # The rules that make a tensor carry the hidden states and that the general ones lack (an expert's output
        # projection, like any product by a weight, is a general one): rows gathered from a tensor, a sum over
        # the rows of a token.
        dim = self.core[node]
        t = node.target
        if t in ACCUMULATE:
            return self._accumulate(node, dim)
        if t in ZEROS and t != aten.zeros_like.default:
            return  # zero everywhere, whatever the hidden size
        if t in ROW_OPS:
            src = node.args[0]
            found = [d for d in range(len(shape(src))) if _row_dim_or_none(node, src, d) == dim]
            if len(found) != 1:
                raise Refuse(f"{op_name(node)}{where(node)} makes hidden states from rows growcli cannot follow back")
            if src.op == "get_attr":
                self._use(str(src.target), found[0], "copy")
            else:
                self._mark(src, found[0], backward=True)
            return
        if t in REDUCE and len(node.args) > 1 and node.args[1] not in (None, []):
            src = node.args[0]
            rank = len(shape(src))
            dims = reduce_dims(node, rank)
            keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
            kept = list(range(rank)) if keep else [d for d in range(rank) if d not in dims]
            if kept[dim] in dims:
                raise Refuse(f"{op_name(node)}{where(node)} reduces the hidden dimension of what it sums")
            self._mark(src, kept[dim], backward=True)  # a sum over a token's top-k rows: each row carries them
            return
        super()._backward(node)

    def _stat_user(self, src: fx.Node, node: fx.Node) -> None:
        if node.op != "call_function":
            raise Refuse(f"{node.op} {node.target} uses a statistic over the hidden dimension")
        t = node.target
        tensors = [a for a in flat_args(node.args) if isinstance(a, fx.Node)]
        if any(a in self.core for a in tensors) and t in BINARY:
            self._binary(node, None, backward=False)  # x · rsqrt(mean(x²) + eps): back on the stream
            return
        if all(a in self.stats for a in tensors) and (t in UNARY or t in STAT_POWER or t in BINARY or t in REINDEX
                                                      or t in VIEW):
            self._stat(node)
            return
        raise Refuse(f"{op_name(node)}{where(node)} uses a statistic over the hidden dimension "
                     "and growcli has no rule for it")


def hidden_cat(layout: Layout) -> bool:
    """Whether ``layout`` is a concatenation of whole hidden vectors and of parts without hidden states."""
    return isinstance(layout, Cat) and all(p is CORE or isinstance(p, Fixed) for p in layout.parts)


def row_dim(node: fx.Node, src: fx.Node, dim: int) -> int:
    """The output dimension of :data:`ROW_OPS` op ``node`` that carries ``src``'s hidden dimension ``dim``.

    Raises :class:`Refuse` when the op selects or repeats along the hidden dimension, or uses the hidden states as
    indices."""
    if node.args[0] is not src:
        raise Refuse(f"{op_name(node)}{where(node)} uses the hidden states as indices")
    out = _row_dim_or_none(node, src, dim)
    if out is None:
        raise Refuse(f"{op_name(node)}{where(node)} selects or repeats entries along the hidden dimension")
    return out


def _row_dim_or_none(node: fx.Node, src: fx.Node, dim: int) -> int | None:
    rank = len(shape(src))
    t = node.target
    if t == aten.index.Tensor:  # advanced indexing: the indexed dims become the indices' broadcast dims
        consumed, index_rank, pos = [], 0, 0
        for idx in node.args[1]:
            if idx is None:
                pos += 1
                continue
            val = idx.meta.get("val") if isinstance(idx, fx.Node) else None
            if val is None:
                return None
            width = val.dim() if val.dtype == torch.bool else 1  # a boolean mask indexes as many dims as it has
            consumed += list(range(pos, pos + width))
            index_rank = max(index_rank, 1 if val.dtype == torch.bool else val.dim())
            pos += width
        if not consumed or dim <= max(consumed):
            return None
        return dim - len(consumed) + index_rank
    axis = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if t == aten.index_select.default:
        axis = node.args[1]
    if axis is None or axis % rank == dim:
        return None  # repeat_interleave without a dim repeats the flattened tensor
    return dim


def _constant_along(index, dim: int) -> bool:
    """Whether ``index`` (of a scatter) is the same at every position of ``dim``: expanded from size 1 there."""
    if not isinstance(index, fx.Node) or index.target != aten.expand.default:
        return False
    src = index.args[0]
    d = dim - (len(shape(index)) - len(shape(src)))
    return d < 0 or shape(src)[d] == 1
