"""Where GradMax applies: a producer layer, its one consumer, and the per-unit ops between them.

:func:`find_site` checks a coupled group (:mod:`growcli.analysis.coupling`) for what GradMax
needs — one Linear or convolution producer, exactly one consumer of the same kind reading the
channels directly, and between them only element-wise activations, dropout and BatchNorm on a
single path — and describes it as a :class:`Site` (parameter names, the chain of ops, the
BatchNorms' running statistics, convolution geometry), or refuses with the reason. The method
is described in :mod:`growcli.transforms.gradmax`.

Which weight dim holds the units: a producer's output dim, a consumer's input dim, from
:func:`growcli.analysis.trace.conv_weight_dims` — ``(0, 1)`` for Linear and convolutions, ``(1, 0)``
for transposed convolutions (:attr:`Site.producer_axis`, :attr:`Site.consumer_axis`). With
``any_conv=True`` (GradMax, Firefly: they replay the traced calls) 1-, 2- and 3-d and transposed
convolutions are sites; without it only Conv2d is, for callers that unfold 2-d patches themselves.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

from torch import fx

from growcli.analysis.coupled_group import Group
from growcli.analysis.trace import BATCH_NORM, CONV, CONV_TRANSPOSE, Trace, UNARY, aten, attr_of, conv_transposed, \
    conv_weight_dims, op_name, shape, where
from growcli.core.errors import NotGrowableError


@dataclass(frozen=True)
class ConvGeom:
    """A convolution's geometry, one entry per spatial dim.

    ``padding`` is what the op pads before each dim's positions, ``padding_after`` what it pads after them when
    that differs (empty: the same). Numeric paddings are symmetric; ``padding="same"`` pads ``d·(k − 1)`` in all,
    split as torch splits it: ``total // 2`` before and the rest after, so an even kernel (``k = 4``: 1 and 2)
    pads one more after (``"valid"``: nothing)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    padding_after: tuple[int, ...] = ()

    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        """``(before, after)`` per spatial dim."""
        return tuple(zip(self.padding, self.padding_after or self.padding))

    def uniform_on_constants(self) -> bool:
        """Whether every output position reads every tap of a constant input (so a constant input gives
        ``constant · Σ weights`` everywhere): an unpadded convolution; a transposed one only with stride 1
        and padding ``dilation·(kernel − 1)`` (borders cropped to where all taps overlap)."""
        if not self.transposed:
            return not any(p for side in self.pads for p in side)
        return all(s == 1 and p == d * (k - 1) for s, p, d, k in zip(self.stride, self.padding, self.dilation, self.kernel))


@dataclass(frozen=True)
class NormUse:
    """A BatchNorm between producer and consumer: its parameter names and ``eps``."""

    weight: str | None
    bias: str | None
    mean: str
    var: str
    eps: float

    def fqns(self) -> tuple[str | None, ...]:
        return self.weight, self.bias, self.mean, self.var

    def new_values(self, shift: float = 0.0) -> tuple[float, float, float, float]:
        """γ, β, mean, variance for a new channel: the identity in eval mode (plus ``shift``)."""
        return math.sqrt(1.0 + self.eps), shift, 0.0, 1.0


@dataclass
class Site:
    """One layer GradMax can grow: producer, consumer, and the per-unit ops between them."""

    layer: str
    consumer: str
    size: int
    producer_w: str
    producer_b: str | None
    consumer_w: str
    consumer_b: str | None
    chain: list[fx.Node]
    norms: dict[str, NormUse] = field(default_factory=dict)  # by batch-norm node name
    producer_conv: ConvGeom | None = None
    consumer_conv: ConvGeom | None = None
    producer_axis: int = 0  # the producer weight's dim holding the units (its outputs): 1 if transposed
    consumer_axis: int = 1  # the consumer weight's dim holding the units (its inputs): 0 if transposed

    @property
    def is_conv(self) -> bool:
        return self.producer_conv is not None


def refusal(layer: str, reason: str) -> NotGrowableError:
    return NotGrowableError(f"'{layer}': gradmax: {reason}")


def _ints(v, n: int) -> tuple[int, ...]:
    """``2`` or ``[2]`` or ``[2, 3]`` as one int per spatial dim (ATen lists may hold one value for all)."""
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(int(x) for x in v) if len(v) == n else (int(v[0]),) * n


def _conv_geom(node: fx.Node, layer: str, any_conv: bool) -> ConvGeom:
    w = shape(node.args[1])
    n = len(w) - 2
    transposed = conv_transposed(node)
    if not any_conv and (n != 2 or transposed):
        kind = "transposed convolution" if transposed else f"{n}-d convolution"
        raise refusal(layer, f"{op_name(node)}{where(node)} is a {kind}; only Linear and Conv2d layers are measured here")
    if node.target == aten.convolution.default:
        stride, padding, dilation, _, output_padding, groups = (list(node.args[3:9]) + [None] * 6)[:6]
    else:
        names = ("stride", "padding", "output_padding", "groups", "dilation") if transposed else \
            ("stride", "padding", "dilation", "groups")
        defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}
        vals = {m: node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(m, defaults[m]) for i, m in enumerate(names)}
        stride, padding, dilation, groups = vals["stride"], vals["padding"], vals["dilation"], vals["groups"]
        output_padding = vals.get("output_padding", 0)
    if int(groups or 1) != 1:
        raise refusal(layer, f"grouped convolution{where(node)} ({groups} groups)")
    kernel, dilation = tuple(w[2:]), _ints(dilation if dilation is not None else 1, n)
    after: tuple[int, ...] = ()
    if isinstance(padding, str):
        # the op's own padding: "valid" pads nothing; "same" pads d·(k − 1), total // 2 before and the rest after
        total = tuple(d * (k - 1) if padding == "same" else 0 for d, k in zip(dilation, kernel))
        padding, after = tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
        after = after if after != padding else ()
    return ConvGeom(kernel, _ints(stride if stride is not None else 1, n), _ints(padding if padding is not None else 0, n),
                    dilation, transposed, _ints(output_padding or 0, n) if transposed else (), after)


def find_site(trace: Trace, group: Group, any_conv: bool = False) -> Site:
    """Check that GradMax applies to ``group``'s layer and describe it, or refuse with the reason.

    GradMax needs one producer (Linear or convolution), exactly one consumer of the same kind reading
    the channels directly (no concatenation or flatten), and between them only element-wise
    activations, dropout and BatchNorm, on a single path. Convolutions may be transposed (either
    side) and 1-, 2- or 3-d only with ``any_conv`` (see the module docstring); groups must be 1.
    """
    layer = group.layer
    if group.norms:  # growcli.analysis.norms: exact only when every channel is copied equally often
        raise refusal(layer, f"{group.norms[0].describe()} normalises over the channels; the new units of gradmax "
                             "and firefly are not whole copies of every channel and would change its statistics "
                             "(init net2net grows them by whole copies)")
    if group.applications > 1:
        raise refusal(layer, f"its weights run {group.applications} times in the forward pass (shared weights); "
                             "gradmax measures one use")
    if len(group.producers) != 1:
        raise refusal(layer, f"the channels are shared with {', '.join(p for p in group.producers if p != layer)} "
                             "(a residual sum or gate); gradmax needs a single producer")
    if group.groups != 1 or group.depthwise:
        raise refusal(layer, "grouped or depthwise convolutions follow the channels; gradmax needs one plain consumer")
    consumers = [u for u in group.uses if u.role in ("consumer", "grouped_consumer")]
    if len(consumers) != 1:
        names = ", ".join(u.fqn.rpartition(".")[0] for u in consumers) or "none"
        raise refusal(layer, f"the channels feed {len(consumers)} layers ({names}); gradmax needs exactly one consumer")
    use = consumers[0]
    if use.role != "consumer" or type(use.layout).__name__ != "Core":
        raise refusal(layer, f"'{use.fqn.rpartition('.')[0]}' reads the channels through a flatten or concatenation; "
                             "gradmax needs a consumer that reads them directly")
    users = trace.weight_users()
    weight = f"{layer}.weight" if layer else "weight"
    if weight not in users:
        raise refusal(layer, "it is a fused expert parameter read by a grouped or batched matmul; gradmax grows "
                             "Linear and convolution layers")
    prod = next(u for u in users[weight] if u.op == "call_function")
    cons = next(u for u in users[use.fqn] if u.op == "call_function")
    kinds = {aten.linear.default: "linear"}
    convs = CONV | CONV_TRANSPOSE
    pk = kinds.get(prod.target, "conv" if prod.target in convs else None)
    ck = kinds.get(cons.target, "conv" if cons.target in convs else None)
    if pk is None:
        raise refusal(layer, f"its weight is used by {op_name(prod)}; gradmax grows Linear and convolution layers")
    if pk != ck:
        raise refusal(layer, f"it is a {pk} layer and its consumer a {ck} layer; gradmax needs both of one kind")
    consumer = use.fqn.rpartition(".")[0]
    site = Site(layer, consumer, group.size, weight, attr_of(prod.args[2]) if len(prod.args) > 2 else None,
                use.fqn, attr_of(cons.args[2]) if len(cons.args) > 2 else None, _walk(prod, cons, layer))
    if pk == "conv":
        site.producer_conv, site.consumer_conv = _conv_geom(prod, layer, any_conv), _conv_geom(cons, layer, any_conv)
        site.producer_axis, site.consumer_axis = conv_weight_dims(prod)[0], conv_weight_dims(cons)[1]
    for node in site.chain:
        if node.target in BATCH_NORM:
            fqns = [attr_of(a) for a in node.args[1:5]]
            if fqns[2] is None or fqns[3] is None:
                raise refusal(layer, f"batch norm{where(node)} has no running statistics (it normalises with batch statistics)")
            eps = node.args[7] if node.target == aten.batch_norm.default else node.args[6]
            site.norms[node.name] = NormUse(*fqns, float(eps))
    known = {weight, site.producer_b, use.fqn} | {f for n in site.norms.values() for f in n.fqns() if f}
    for u in group.uses:
        if u.fqn not in known:
            raise refusal(layer, f"parameter {u.fqn} also follows the channels ({u.role}); gradmax handles only "
                                 "BatchNorm between the layer and its consumer")
    return site


def _walk(prod: fx.Node, cons: fx.Node, layer: str) -> list[fx.Node]:
    """The nodes from the producer's output to the consumer's input; refuses anything but per-unit ops."""
    chain: list[fx.Node] = []
    node = prod
    while True:
        users = [u for u in node.users if not (u.target == operator.getitem and not u.users and u.args[1] != 0)]
        if len(users) != 1:
            raise refusal(layer, f"the output of {op_name(node)}{where(node)} is used by {len(users)} operations; "
                                 "gradmax needs a single path to the consumer")
        nxt = users[0]
        if nxt is cons:
            if nxt.args[0] is not node:
                raise refusal(layer, f"{op_name(nxt)}{where(nxt)} uses the channels as its weight")
            return chain
        if nxt.target == operator.getitem and node.target in BATCH_NORM and nxt.args[1] == 0:
            pass  # the normalised output of a native batch norm
        elif nxt.target in BATCH_NORM and nxt.args[0] is node:
            chain.append(nxt)
        elif nxt.target in UNARY and nxt.args[0] is node and not any(isinstance(a, fx.Node) for a in nxt.args[1:]):
            chain.append(nxt)
        else:
            raise refusal(layer, f"{op_name(nxt)}{where(nxt)} lies between it and its consumer; gradmax handles "
                                 "element-wise activations, dropout and BatchNorm there")
        node = nxt
