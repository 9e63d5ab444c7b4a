"""Phase 1 of the residual-stream analysis: which tensors carry the hidden size.

:class:`StreamAnalysis` is the coupled-channel analysis of :mod:`growcli.analysis.coupling` in
*stream mode*, started at the op that writes the stream first
(:func:`growcli.analysis.stream.stream_start`): LayerNorm and RMSNorm ops join the stream instead
of stopping it, and a mean or sum over the hidden dimension becomes a per-token statistic that is
followed until it multiplies the stream again. How each of these tensors grows is phase 2,
:mod:`growcli.analysis.stream_plan` and :mod:`growcli.analysis.stream_rules`;
:mod:`growcli.analysis.stream` has the overview.
"""

from __future__ import annotations

import torch
from torch import fx

from growcli.analysis.coupled_group import Group, TensorUse
from growcli.analysis.coupling import Analysis
from growcli.analysis.layouts import CORE, Layout
from growcli.analysis.trace import (ADDMM, BINARY, CONV, METADATA_CHECKS, REDUCE, REINDEX, Refuse, Trace, UNARY, VIEW,
                                    attr_of, flat_args, module_of, op_name, reduce_dims, shape, weight_of, where)
from growcli.core.errors import NotGrowableError

aten = torch.ops.aten
RMS_NORM = aten.rms_norm.default if hasattr(aten, "rms_norm") else None
NORMS = {aten.layer_norm.default} | ({RMS_NORM} if RMS_NORM is not None else set())
PRODUCERS = {aten.linear.default, aten.embedding.default, ADDMM} | CONV
# Element-wise ops a per-token statistic may pass through, with the power they raise its scale to.
STAT_POWER = {aten.rsqrt.default: -0.5, aten.sqrt.default: 0.5, aten.reciprocal.default: -1.0}


# --------------------------------------------------------------------------- phase 1: which tensors
class StreamAnalysis(Analysis):
    """Coupled-channel analysis that follows the hidden dimension through normalisations.

    Besides the tensors carrying the channels (``core``), it collects ``stats``: per-token
    statistics over the channels (a mean or sum over the hidden dimension) and what is computed
    from them alone. Roles of parameters are decided later, per use, by :func:`plan_stream`.
    """

    def __init__(self, trace: Trace, start: fx.Node):
        super().__init__(trace, module_of(start))
        self.start = start
        self.stats: dict[fx.Node, None] = {}
        # Hidden states that are model outputs (an embedding model's last_hidden_state) → their hidden dim;
        # they grow with the stream, and the verification compares them through the output map.
        self.outputs: dict[fx.Node, int] = {}

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
        if layout is not CORE:
            raise Refuse(f"parameter {fqn} reads the hidden dimension concatenated or flattened with another")
        self._uses.setdefault(fqn, TensorUse(fqn, dim, role))

    def _mark_derived(self, node: fx.Node, dim: int, layout: Layout) -> None:
        raise Refuse(f"{op_name(node)}{where(node)} concatenates or flattens the hidden dimension with another one")

    def _stat(self, node: fx.Node) -> None:
        if node in self.core:
            raise Refuse(f"{op_name(node)}{where(node)} mixes a statistic over the hidden dimension with the hidden states")
        if node not in self.stats:
            self.stats[node] = None
            self.work.append(("fwd", node))

    def _forward(self, src: fx.Node, node: fx.Node) -> None:
        if node.op == "call_function" and node.target in METADATA_CHECKS:
            return
        if node.op == "output":
            if src in self.stats:
                raise Refuse("a statistic over the hidden dimension reaches the model's output, whose shape would "
                             "change; grow a model with a head (…ForCausalLM, …ForMaskedLM, …ForImageClassification…)")
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
        super()._forward(src, node)

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
