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
(concatenation offsets, ``C×H×W`` flattened into features). A fused projection whose output is split
into equal parts along its channels (``gate, up = gate_up_proj(x).chunk(2, -1)``, slices tiling
them) has the parts' channels: its rows are ``Cat([Core, Core])``, so growing channel ``j`` grows
rows ``j`` and ``I + j`` together. Fused 3-D expert parameters (``experts.gate_up_proj`` [E, 2I, H])
are layers named by the parameter itself; every expert grows with the same channel map.

A layer whose weight runs several times in one forward pass (ALBERT's layer at every depth, a block
called in a loop) is a producer at every use; the walk starts at all of them, and afterwards every op
reading a recorded parameter must have been reached (:meth:`Analysis._check_shared`): then one map of
each parameter is exact at every use, else the use that is not coupled is named.

This module holds the entry points (:func:`analyze`, :func:`producer_layers`), the producer rules
and the backward rules; the result types and the walk's bookkeeping are in
:mod:`growcli.analysis.coupled_group`, the forward rules in :mod:`growcli.analysis.coupling_forward`.
"""

from __future__ import annotations

import operator

from torch import fx

from growcli.analysis.coupled_group import Group
from growcli.analysis.coupling_forward import ELEMENTWISE, ELEMENTWISE_N, LIKE, ForwardRules, SHAPE_ONLY, roll_dims
from growcli.analysis.layouts import CORE, Cat
from growcli.analysis.matmuls import WEIGHT_MOVES, param_matmul, weight_param
from growcli.analysis.pooling import PER_CHANNEL, WITH_INDICES, pooled_source
from growcli.analysis.scatter import GATHER, INDEX_SELECT, SCATTER, STACK, UNBIND
from growcli.analysis.trace import (ADDMM, BATCH_NORM, CONV, CONV_TRANSPOSE, INDEX_PUT, METADATA_CHECKS, PAD, REINDEX,
                                    Refuse, SHAPE_AS, Trace, VIEW, aten, attr_of, conv_groups, conv_transposed, conv_weight_dims,
                                    op_name, shape, source_dim, weight_of, where)
from growcli.core.errors import NotGrowableError

# Ops that split a tensor into parts along one dimension (``gate, up = x.chunk(2, -1)``).
SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unsafe_chunk.default,
          aten.unsafe_split.Tensor, aten.unsafe_split_with_sizes.default}


class Analysis(ForwardRules):
    """Coupled-channel analysis of one producer layer's output (see module docstring)."""

    weight_moves = frozenset(WEIGHT_MOVES)

    # -- entry
    def run(self) -> Group:
        weight = f"{self.layer}.weight" if self.layer else "weight"
        if weight not in self.users and self.layer in self.users:
            weight = self.layer  # a parameter that is a layer's weight itself (fused 3-D experts)
        users = self.users.get(weight)
        if users is None:
            raise NotGrowableError(f"'{self.layer}' has no weight parameter used by the traced model")
        ops = self._readers(weight)
        if not ops:
            raise NotGrowableError(f"'{self.layer}' has no weight parameter used by the traced model")
        self.group = Group(self.layer, 0, applications=len(ops))
        try:
            # A layer applied at several depths: every application produces the same channels, by the same map.
            starts = [self._start(op, weight) for op in ops]
            sizes = sorted({size for _, _, _, size in starts})
            if len(sizes) != 1:
                raise Refuse(f"it is used {len(ops)} times in the forward pass (shared weights) with {sizes} channels; "
                             "growing it would change its uses differently")
            self.group.size = sizes[0]
            self.group.producers.append(self.layer)
            kinds = {None if parts is None else len(parts) for _, _, parts, _ in starts}
            if len(kinds) != 1:
                raise Refuse(f"it is used {len(ops)} times in the forward pass (shared weights), its output split "
                             "into parts at some uses only")
            if (count := kinds.pop()) is not None:  # a fused projection: its rows are a concatenation of the parts
                for use in self._uses.values():
                    use.layout = Cat([CORE] * count)
            for node, dim, parts, _ in starts:
                for part, part_dim in ([(node, dim)] if parts is None else [(p, dim) for p in parts if p is not None]):
                    self._mark(part, part_dim, backward=False)
            self._drain()
            self._check_shared()
        except Refuse as exc:
            raise NotGrowableError(f"'{self.layer}': {exc}") from None
        self.group.uses = list(self._uses.values())
        return self.group

    def _start(self, op: fx.Node, weight: str) -> tuple[fx.Node, int, list[fx.Node | None] | None, int]:
        """One application of the layer as a producer: the node carrying its channels (past the single uses that
        keep them in place) and their dim, the parts of a fused projection (``None``: not split), and the size."""
        node = op
        while node.target in WEIGHT_MOVES and len(node.users) == 1 and weight_param(node) is not None:
            node = next(iter(node.users))  # w.transpose(-2, -1) or w[expert_ids] read by a grouped or batched matmul
        self._at = node
        dim = self._producer(node, weight)
        end, end_dim = self._through(node, dim)
        parts = self._split_parts(end, end_dim)
        if parts is None:
            return node, dim, None, shape(node)[dim]
        return end, end_dim, parts, shape(next(p for p in parts if p is not None))[end_dim]

    def _check_shared(self) -> None:
        """Refuse a parameter of the group read by an op the walk did not reach: that use would see the new map
        without its channels growing (a weight shared by a use the growth is not coupled to)."""
        for fqn, use in self._uses.items():
            owners = self._readers(fqn)
            self.group.applications = max(self.group.applications, len(owners))
            missed = [u for u in owners if u not in self.reached.get(fqn, ())]
            if missed:
                k = owners.index(missed[0]) + 1
                raise Refuse(f"parameter {fqn} is used {len(owners)} times (shared weights) and its use {k} "
                             f"({op_name(missed[0])}{where(missed[0])}, node {missed[0].name}) is not coupled to the "
                             f"same grown channels (it is {use.role} dim {use.dim} where the growth reaches it); widening "
                             "is exact only when every use is")

    def _readers(self, fqn: str) -> list[fx.Node]:
        """The ops that read parameter ``fqn``'s values (not only its metadata or sizes), in graph order."""
        return [u for u in self.users.get(fqn, [])
                if u.op == "call_function" and u.target not in METADATA_CHECKS and u.target not in SHAPE_ONLY]

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
        if t in CONV or t in CONV_TRANSPOSE:
            groups = conv_groups(node)
            w = shape(node.args[1])
            if groups > 1:
                if groups == w[0] and w[1] == 1:  # in = out = groups, for either weight layout
                    raise Refuse("a depthwise convolution's channels follow its input; widen the layer that feeds it")
                if conv_transposed(node):
                    raise Refuse(f"transposed convolution{where(node)} has {groups} groups; growcli widens the output "
                                 "channels of transposed convolutions with groups=1 only")
                self.group_groups(groups)
            self._use(weight_fqn, conv_weight_dims(node)[0], "producer")
            if len(node.args) > 2 and attr_of(node.args[2]):
                self._use(attr_of(node.args[2]), 0, "producer")
            return len(out) - (len(w) - 2) - 1
        if t == aten.embedding.default:
            self._use(weight_fqn, 1, "producer")
            return len(out) - 1
        if (m := param_matmul(node)) is not None and m.fqn == weight_fqn:
            self._use(weight_fqn, m.weight_out, "producer")  # x @ W.T, or every expert's output channels
            return m.out_dim
        if t == ADDMM and attr_of(node.args[2]) == weight_fqn:
            self._use(weight_fqn, 1, "producer")  # x @ W: W is [in, out]
            if attr_of(node.args[0]):
                self._use(attr_of(node.args[0]), 0, "producer")
            return len(out) - 1
        raise Refuse(f"its weight is used by {op_name(node)}, which growcli cannot widen (Linear, Conv, Embedding and "
                     "products by a weight can be)")

    @staticmethod
    def _through(node: fx.Node, dim: int) -> tuple[fx.Node, int]:
        """Where the producer's output is split, past a chain of single uses that keep every channel in place
        (casts, element-wise ops, ``squeeze``/``unsqueeze`` of other dims): the node and its channel dim."""
        while True:
            users = [u for u in node.users if u.target not in METADATA_CHECKS]
            if len(users) != 1 or users[0].args[0] is not node:
                return node, dim
            u = users[0]
            if u.target in ELEMENTWISE and not any(isinstance(a, fx.Node) for a in u.args[1:]):
                node = u
            elif u.target in (aten.squeeze.dim, aten.unsqueeze.default):
                new = [d for d in range(len(shape(u))) if source_dim(u, d) == dim]
                if len(new) != 1:
                    return node, dim
                node, dim = u, new[0]
            else:
                return node, dim

    def _split_parts(self, node: fx.Node, dim: int) -> list[fx.Node | None] | None:
        """The parts, in order, when ``node``'s only use splits its channels into equal parts (``chunk``, ``split``,
        slices tiling the dimension); ``None`` when it is not split. The parts share one channel map: part ``i``'s
        channel ``j`` is row ``i·I + j`` of the producer, so growing channel ``j`` grows every part's row ``j``."""
        users = [u for u in node.users if u.target not in METADATA_CHECKS]
        size, rank = shape(node)[dim], len(shape(node))
        if len(users) == 1 and users[0].target in SPLITS:
            split = users[0]
            axis = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
            if axis % rank != dim:
                return None
            sizes = [int(v.shape[dim]) for v in split.meta.get("val") or []]
            items = {}
            for u in split.users:
                if u.target != operator.getitem:
                    raise Refuse(f"{op_name(split)}{where(split)} splits the channels and its parts are used whole")
                items[u.args[1]] = u
            if len(sizes) < 2 or len(set(sizes)) != 1:
                raise Refuse(f"{op_name(split)}{where(split)} splits the channels into parts of sizes {sizes}; "
                             "growcli grows fused projections split into equal parts")
            return [items.get(i) for i in range(len(sizes))]
        if len(users) < 2 or any(u.target != aten.slice.Tensor or u.args[0] is not node for u in users):
            return None
        spans = []
        for u in users:
            axis = u.args[1] % rank if len(u.args) > 1 else 0
            start = (u.args[2] if len(u.args) > 2 else 0) or 0
            end = min(u.args[3] if len(u.args) > 3 and u.args[3] is not None else size, size)
            step = u.args[4] if len(u.args) > 4 else 1
            if axis != dim or step != 1:
                return None
            spans.append((start % size if start < 0 else start, end % size if end < 0 else end, u))
        spans.sort(key=lambda s: s[:2])
        width = spans[0][1] - spans[0][0]
        if [s[:2] for s in spans] != [(k * width, (k + 1) * width) for k in range(len(spans))] or width * len(spans) != size:
            raise Refuse(f"slices{where(users[0])} take unequal or overlapping parts of the channels; growcli grows "
                         "fused projections split into equal parts")
        return [s[2] for s in spans]

    # -- backward: a tensor must carry the channels; its producer joins the group
    def _backward(self, node: fx.Node) -> None:
        dim = self.core[node]
        if node.op == "placeholder":
            raise Refuse(f"the channels are tied to the model input '{node.target}'")
        if node.op == "get_attr":
            self._use(str(node.target), dim, "copy")
            return
        t = node.target
        if t == aten.linear.default and dim < len(shape(node)) - 1 and isinstance(node.args[0], fx.Node):
            self._mark(node.args[0], dim, backward=True)  # a batch dim of the Linear (token mixing): rows pass through
            return
        if t in CONV or t in CONV_TRANSPOSE or t in (aten.linear.default, aten.embedding.default, ADDMM):
            w = weight_of(node)
            if w is None:
                raise Refuse(f"{op_name(node)}{where(node)} has a computed weight")
            own = self._producer(node, w)
            if own != dim:
                raise Refuse(f"{op_name(node)}{where(node)} produces the channels in another dimension")
            if (name := w.rsplit(".", 1)[0]) not in self.group.producers:  # a co-producer applied at several depths
                self.group.producers.append(name)
            return
        if (m := param_matmul(node)) is not None and m.data not in self.core:  # x @ W.T, an expert's output
            if self._producer(node, m.fqn) != dim:
                raise Refuse(f"{op_name(node)}{where(node)} produces the channels in another dimension")
            if (name := layer_name(m.fqn)) not in self.group.producers:
                self.group.producers.append(name)
            return
        if t in INDEX_PUT:  # out = x; out[indices] (+)= values, along other dims
            self._index_put_operands(node, dim)
            return
        if t == aten.index.Tensor:
            self._index_back(node, dim)
            return
        if t == operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0].target in UNBIND:
            self._unbind_back(node, dim)  # an item of x.unbind(d): x carries the channels
            return
        if t in INDEX_SELECT:
            self._index_select_back(node, dim)
            return
        if t in GATHER or t in SCATTER:
            self._gather_scatter_back(node, dim)
            return
        if t in STACK:
            self._stack_back(node, dim)
            return
        if t in (aten.zeros.default, aten.new_zeros.default) and not self.trace.is_model:
            return  # what x[idx] += v starts from: zero everywhere, its size computed again by the module's code
        if t in (aten.index_add.default, aten.index_add_.default):
            self._index_add_operands(node, dim)
            return
        if t in LIKE or t == aten.roll.default and roll_dims(node) and dim not in roll_dims(node):
            self._mark(node.args[0], dim, backward=True)  # its positions are its input's
            return
        if t in ELEMENTWISE or t == operator.getitem and node.args[1] == 0:
            src = node.args[0]
            if t == operator.getitem:
                self._backward_multi(src, dim)
                return
            self._mark(src, dim, backward=True)
            return
        if t in ELEMENTWISE_N:
            self._binary(node, dim, backward=True)
            return
        if t in PER_CHANNEL and t not in WITH_INDICES and (src_dim := pooled_source(node, dim)) is not None:
            self._mark(node.args[0], src_dim, backward=True)  # per-channel: its input carries the same channels
            return
        if t in PAD and dim < len(shape(node)):
            self._mark(node.args[0], dim, backward=True)
            return
        if t in BATCH_NORM:
            self._batch_norm_params(node, CORE)
            self._mark(node.args[0], dim, backward=True)
            return
        if t in SHAPE_AS and isinstance(node.args[1], fx.Node):
            self._mark(node.args[1], dim, backward=True)  # the shape comes from it: it must grow with the output
        if t in REINDEX or t in VIEW or t in SHAPE_AS:
            src_dim = source_dim(node, dim)
            if src_dim is None:
                raise Refuse(f"{op_name(node)}{where(node)} produces a tensor that must share the channels "
                             "from a reshaped or selected one, which growcli cannot follow back")
            if shape(node.args[0])[src_dim] == 1 and SHAPE_AS.get(t, t) == aten.expand.default:
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
        elif src.target in WITH_INDICES and (src_dim := pooled_source(src, dim)) is not None:
            self._mark(src.args[0], src_dim, backward=True)  # the values of a max-pooling or x.max(dim)
        else:
            raise Refuse(f"{op_name(src)}{where(src)} produces a tensor that must share the channels")


def layer_name(fqn: str) -> str:
    """The layer a weight parameter names: its module for ``….weight`` (``x @ W.T`` in a module), else the
    parameter itself (fused 3-D experts)."""
    return "" if fqn == "weight" else fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn


def analyze(trace: Trace, layer: str) -> Group:
    """The coupled group of ``layer``'s output channels, or :class:`NotGrowableError` with the reason."""
    return Analysis(trace, layer).run()


def producer_layers(trace: Trace) -> list[str]:
    """Modules whose ``weight`` feeds a Linear, Conv, Embedding or addmm (Conv1D) op or is multiplied by the data
    (``x @ W.T``), and parameters that are a grouped or batched matmul's weight (fused experts), named by themselves
    (candidates for widening), each once."""
    out = []
    for node in trace.graph.nodes:
        if (m := param_matmul(node)) is not None:
            out.append(layer_name(m.fqn))
    for fqn, users in trace.weight_users().items():
        if not (fqn == "weight" or fqn.endswith(".weight")):
            continue
        if any(u.op == "call_function" and (u.target in (aten.linear.default, aten.embedding.default) or u.target in CONV
                                             or u.target in CONV_TRANSPOSE
                                             or u.target == ADDMM and len(u.args) > 2 and getattr(u.args[2], "target", None) == fqn)
               for u in users):
            out.append(fqn[: -len(".weight")] if fqn != "weight" else "")
    return list(dict.fromkeys(out))
