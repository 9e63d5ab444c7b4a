"""Coupled-channel analysis: which tensor dimensions must grow together with a layer's channels.

A model is traced with ``torch.export`` (:mod:`growcli.analysis.trace`) to an ATen graph whose
parameters are ``get_attr`` nodes named by their fully qualified names. Starting at a producer
layer's output, the analysis walks the graph forwards (and backwards where an operation ties
another tensor to the same channels, e.g. a residual add) and collects every parameter
dimension indexed by those channels, with the role it plays:

- ``producer``: rows of a Linear / output channels of a Conv / columns of an Embedding;
- ``copy``: per-channel parameters and buffers (BatchNorm, PReLU, layer scales, biases);
- ``consumer``: input columns of the Linear/Conv layers that read the channels.

Positions along a grown dimension are described by a :class:`~growcli.analysis.layouts.Layout`
(concatenation offsets, ``C×H×W`` flattened into features). This module holds the entry points
(:func:`analyze`, :func:`producer_layers`), the producer rules and the backward rules; the
result types and the walk's bookkeeping are in :mod:`growcli.analysis.coupled_group`, the
forward rules in :mod:`growcli.analysis.coupling_forward`.
"""

from __future__ import annotations

import operator

from torch import fx

from growcli.analysis.coupled_group import Group
from growcli.analysis.coupling_forward import ForwardRules
from growcli.analysis.layouts import CORE
from growcli.analysis.trace import (ADDMM, BATCH_NORM, BINARY, CONV, PAD, POOL, REINDEX, Refuse, Trace, UNARY, VIEW,
                                    aten, attr_of, conv_groups, op_name, shape, source_dim, weight_of, where)
from growcli.core.errors import NotGrowableError


class Analysis(ForwardRules):
    """Coupled-channel analysis of one producer layer's output (see module docstring)."""

    # -- entry
    def run(self) -> Group:
        weight = f"{self.layer}.weight" if self.layer else "weight"
        users = self.users.get(weight)
        if users is None:
            raise NotGrowableError(f"'{self.layer}' has no weight parameter used by the traced model")
        ops = [u for u in users if u.op == "call_function"]
        if len(ops) != 1:
            raise NotGrowableError(f"'{self.layer}' is used {len(ops)} times in the forward pass (shared weights); "
                                   "growing it would change every use")
        node = ops[0]
        self.group = Group(self.layer, 0)
        try:
            dim = self._producer(node, weight)
            self.group.size = shape(node)[dim]
            self.group.producers.append(self.layer)
            self._mark(node, dim, backward=False)
            self._drain()
        except Refuse as exc:
            raise NotGrowableError(f"'{self.layer}': {exc}") from None
        self.group.uses = list(self._uses.values())
        return self.group

    # -- producers
    def _producer(self, node: fx.Node, weight_fqn: str) -> int:
        """Register ``node`` (linear/conv/embedding using ``weight_fqn``) as a producer; returns its channel dim."""
        out = shape(node)
        t = node.target
        if t == aten.linear.default:
            self._use(weight_fqn, 0, "producer")
            if len(node.args) > 2 and attr_of(node.args[2]):
                self._use(attr_of(node.args[2]), 0, "producer")
            return len(out) - 1
        if t in CONV:
            groups = conv_groups(node)
            if t == aten.convolution.default and node.args[6]:
                raise Refuse("transposed convolutions are not supported yet")
            w = shape(node.args[1])
            if groups > 1:
                if groups == w[0] and w[1] == 1:
                    raise Refuse("a depthwise convolution's channels follow its input; widen the layer that feeds it")
                self.group_groups(groups)
            self._use(weight_fqn, 0, "producer")
            if len(node.args) > 2 and attr_of(node.args[2]):
                self._use(attr_of(node.args[2]), 0, "producer")
            return len(out) - (len(w) - 2) - 1
        if t == aten.embedding.default:
            self._use(weight_fqn, 1, "producer")
            return len(out) - 1
        if t == ADDMM and attr_of(node.args[2]) == weight_fqn:
            self._use(weight_fqn, 1, "producer")  # x @ W: W is [in, out]
            if attr_of(node.args[0]):
                self._use(attr_of(node.args[0]), 0, "producer")
            return len(out) - 1
        raise Refuse(f"its weight is used by {op_name(node)}, which growcli cannot widen (Linear, Conv and Embedding can be)")

    # -- backward: a tensor must carry the channels; its producer joins the group
    def _backward(self, node: fx.Node) -> None:
        dim = self.core[node]
        if node.op == "placeholder":
            raise Refuse(f"the channels are tied to the model input '{node.target}'")
        if node.op == "get_attr":
            self._use(str(node.target), dim, "copy")
            return
        t = node.target
        if t in (aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                 aten.convolution.default, aten.embedding.default, ADDMM):
            w = weight_of(node)
            if w is None:
                raise Refuse(f"{op_name(node)}{where(node)} has a computed weight")
            own = self._producer(node, w)
            if own != dim:
                raise Refuse(f"{op_name(node)}{where(node)} produces the channels in another dimension")
            self.group.producers.append(w.rsplit(".", 1)[0])
            return
        if t in UNARY or t == operator.getitem and node.args[1] == 0:
            src = node.args[0]
            if t == operator.getitem:
                self._backward_multi(src, dim)
                return
            self._mark(src, dim, backward=True)
            return
        if t in BINARY:
            self._binary(node, dim, backward=True)
            return
        if (t in POOL and t != aten.max_pool2d_with_indices.default or t in PAD) and dim < len(shape(node)) - POOL.get(t, 0):
            self._mark(node.args[0], dim, backward=True)  # per-channel: its input carries the same channels
            return
        if t in BATCH_NORM:
            self._batch_norm_params(node, CORE)
            self._mark(node.args[0], dim, backward=True)
            return
        if t in REINDEX or t in VIEW:
            src_dim = source_dim(node, dim)
            if src_dim is None:
                raise Refuse(f"{op_name(node)}{where(node)} produces a tensor that must share the channels "
                             "from a reshaped or selected one, which growcli cannot follow back")
            if shape(node.args[0])[src_dim] == 1 and t == aten.expand.default:
                return  # broadcast: the same value for every channel, whatever their number
            src = node.args[0]
            if src.op == "get_attr":
                self._use(str(src.target), src_dim, "copy")
            else:
                self._mark(src, src_dim, backward=True)
            return
        raise Refuse(f"{op_name(node)}{where(node)} produces a tensor that must share the channels, "
                     "and growcli has no rule to grow it")

    def _backward_multi(self, src: fx.Node, dim: int) -> None:
        if src.target in BATCH_NORM:
            self._batch_norm_params(src, CORE)
            self._mark(src.args[0], dim, backward=True)
        else:
            raise Refuse(f"{op_name(src)}{where(src)} produces a tensor that must share the channels")


def analyze(trace: Trace, layer: str) -> Group:
    """The coupled group of ``layer``'s output channels, or :class:`NotGrowableError` with the reason."""
    return Analysis(trace, layer).run()


def producer_layers(trace: Trace) -> list[str]:
    """Modules whose ``weight`` feeds a Linear, Conv, Embedding or addmm (Conv1D) op (candidates for widening)."""
    out = []
    for fqn, users in trace.weight_users().items():
        if not (fqn == "weight" or fqn.endswith(".weight")):
            continue
        if any(u.op == "call_function" and (u.target in (aten.linear.default, aten.embedding.default) or u.target in CONV
                                             or u.target == ADDMM and len(u.args) > 2 and getattr(u.args[2], "target", None) == fqn)
               for u in users):
            out.append(fqn[: -len(".weight")] if fqn != "weight" else "")
    return out
