"""GradMax (Evci et al. 2022): new units whose outgoing weights maximise their incoming gradient.

New units get zero incoming weights, so they output a constant and the function is
unchanged; their outgoing weights (the consumer's new columns) are the top-``k`` left
singular vectors of ``M = Σ δ hᵀ``, where ``h`` is the layer's input and ``δ = ∂L/∂z`` the
gradient at the consumer's output, measured on calibration data. The gradient of the new
incoming weights is then ``φ'·W_newᵀ M``, as large as it can be for outgoing weights of that
norm. Convolutions use patches: ``M`` pairs ``(consumer channel, consumer tap)`` with
``(input channel, producer tap)``. Recipe: docs/recipes.md section 6.

``h`` and ``δ`` are observed with a :class:`~torch.overrides.TorchFunctionMode` that
recognises the producer's and consumer's weight tensors in linear/convolution calls, so the
same code serves eager modules and loaded ``.pt2`` programs.

Where exactness ends: a unit with zero incoming weights outputs ``φ(0)``; growcli refuses
when that is not 0 (sigmoid, softplus…). ReLU has ``φ(0) = 0`` but autograd's ReLU
gradient at exactly 0 is 0, so such units would never learn (the reference counts it as 1);
growcli gives them a small positive bias ε instead (on ReLU's linear side) and subtracts
their constant output from the consumer's bias, which is exact for a Linear consumer and for
an unpadded convolution, and refused for a zero-padded one (its border taps see fewer copies
of the constant).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx
from torch.overrides import TorchFunctionMode

from growcli.analysis.calibration import Calibration, batch_loss
from growcli.core.errors import InputsError, NotGrowableError
from growcli.analysis.coupling import BATCH_NORM, CONV, UNARY, Group, Trace, aten, op_name, shape, where
from growcli.core.inputs import cast_batch

EPS_REL = 0.01  # ReLU shift, relative to the RMS of the consumer's input on the calibration data
_MAX_PATCH_ELEMENTS = 1 << 24  # memory bound for the unfolded patches of one chunk of samples


@dataclass(frozen=True)
class ConvGeom:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


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

    @property
    def is_conv(self) -> bool:
        return self.producer_conv is not None


def _refuse(layer: str, reason: str) -> NotGrowableError:
    return NotGrowableError(f"'{layer}': gradmax: {reason}")


def _pair(v) -> tuple[int, int]:
    """``2`` or ``[2]`` or ``[2, 3]`` as a pair (ATen lists may hold one value for both dims)."""
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return int(v[0]), int(v[-1])


def _conv_geom(node: fx.Node, layer: str) -> ConvGeom:
    w = shape(node.args[1])
    if len(w) != 4:
        raise _refuse(layer, f"{op_name(node)}{where(node)} is a {len(w) - 2}-d convolution; gradmax handles Linear and Conv2d")
    if node.target == aten.convolution.default:
        stride, padding, dilation, transposed, _, groups = node.args[3:9]
        if transposed:
            raise _refuse(layer, f"transposed convolution{where(node)} is not supported")
    else:
        names = ("stride", "padding", "dilation", "groups")
        defaults = (1, 0, 1, 1)
        vals = [node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))]
        stride, padding, dilation, groups = vals
    if isinstance(padding, str):
        raise _refuse(layer, f"convolution{where(node)} uses padding={padding!r}; gradmax needs explicit padding sizes")
    if int(groups) != 1:
        raise _refuse(layer, f"grouped convolution{where(node)} ({groups} groups)")
    return ConvGeom((w[2], w[3]), _pair(stride), _pair(padding), _pair(dilation))


def _attr(arg) -> str | None:
    return str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def find_site(trace: Trace, group: Group) -> Site:
    """Check that GradMax applies to ``group``'s layer and describe it, or refuse with the reason.

    GradMax needs one producer (Linear or Conv2d), exactly one consumer of the same kind reading
    the channels directly (no concatenation or flatten), and between them only element-wise
    activations, dropout and BatchNorm, on a single path.
    """
    layer = group.layer
    if len(group.producers) != 1:
        raise _refuse(layer, f"the channels are shared with {', '.join(p for p in group.producers if p != layer)} "
                             "(a residual sum or gate); gradmax needs a single producer")
    if group.groups != 1 or group.depthwise:
        raise _refuse(layer, "grouped or depthwise convolutions follow the channels; gradmax needs one plain consumer")
    consumers = [u for u in group.uses if u.role in ("consumer", "grouped_consumer")]
    if len(consumers) != 1:
        names = ", ".join(u.fqn.rpartition(".")[0] for u in consumers) or "none"
        raise _refuse(layer, f"the channels feed {len(consumers)} layers ({names}); gradmax needs exactly one consumer")
    use = consumers[0]
    if use.role != "consumer" or type(use.layout).__name__ != "Core":
        raise _refuse(layer, f"'{use.fqn.rpartition('.')[0]}' reads the channels through a flatten or concatenation; "
                             "gradmax needs a consumer that reads them directly")
    users = trace.weight_users()
    weight = f"{layer}.weight" if layer else "weight"
    prod = next(u for u in users[weight] if u.op == "call_function")
    cons = next(u for u in users[use.fqn] if u.op == "call_function")
    kinds = {aten.linear.default: "linear"}
    pk = kinds.get(prod.target, "conv" if prod.target in CONV else None)
    ck = kinds.get(cons.target, "conv" if cons.target in CONV else None)
    if pk is None:
        raise _refuse(layer, f"its weight is used by {op_name(prod)}; gradmax grows Linear and Conv2d layers")
    if pk != ck:
        raise _refuse(layer, f"it is a {pk} layer and its consumer a {ck} layer; gradmax needs both of one kind")
    consumer = use.fqn.rpartition(".")[0]
    site = Site(layer, consumer, group.size, weight, _attr(prod.args[2]) if len(prod.args) > 2 else None,
                use.fqn, _attr(cons.args[2]) if len(cons.args) > 2 else None, _walk(prod, cons, layer))
    if pk == "conv":
        site.producer_conv, site.consumer_conv = _conv_geom(prod, layer), _conv_geom(cons, layer)
    for node in site.chain:
        if node.target in BATCH_NORM:
            fqns = [_attr(a) for a in node.args[1:5]]
            if fqns[2] is None or fqns[3] is None:
                raise _refuse(layer, f"batch norm{where(node)} has no running statistics (it normalises with batch statistics)")
            eps = node.args[7] if node.target == aten.batch_norm.default else node.args[6]
            site.norms[node.name] = NormUse(*fqns, float(eps))
    known = {weight, site.producer_b, use.fqn} | {f for n in site.norms.values() for f in n.fqns() if f}
    for u in group.uses:
        if u.fqn not in known:
            raise _refuse(layer, f"parameter {u.fqn} also follows the channels ({u.role}); gradmax handles only "
                                 "BatchNorm between the layer and its consumer")
    return site


def _walk(prod: fx.Node, cons: fx.Node, layer: str) -> list[fx.Node]:
    """The nodes from the producer's output to the consumer's input; refuses anything but per-unit ops."""
    chain: list[fx.Node] = []
    node = prod
    while True:
        users = [u for u in node.users if not (u.target == operator.getitem and not u.users and u.args[1] != 0)]
        if len(users) != 1:
            raise _refuse(layer, f"the output of {op_name(node)}{where(node)} is used by {len(users)} operations; "
                                 "gradmax needs a single path to the consumer")
        nxt = users[0]
        if nxt is cons:
            if nxt.args[0] is not node:
                raise _refuse(layer, f"{op_name(nxt)}{where(nxt)} uses the channels as its weight")
            return chain
        if nxt.target == operator.getitem and node.target in BATCH_NORM and nxt.args[1] == 0:
            pass  # the normalised output of a native batch norm
        elif nxt.target in BATCH_NORM and nxt.args[0] is node:
            chain.append(nxt)
        elif nxt.target in UNARY and nxt.args[0] is node and not any(isinstance(a, fx.Node) for a in nxt.args[1:]):
            chain.append(nxt)
        else:
            raise _refuse(layer, f"{op_name(nxt)}{where(nxt)} lies between it and its consumer; gradmax handles "
                                 "element-wise activations, dropout and BatchNorm there")
        node = nxt


# --------------------------------------------------------------------------- the new units' activation
def new_unit_value(site: Site, pre: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """What a new unit whose pre-activation is ``pre`` feeds the consumer (element-wise).

    New units' BatchNorm statistics make it the identity (mean 0, variance 1, ``γ = √(1 + eps)``);
    ``beta`` is the β of the first BatchNorm that has one (where a ReLU shift goes when the
    layer has no bias).
    """
    x = pre
    placed = False
    for node in site.chain:
        if node.target in BATCH_NORM:
            norm = site.norms[node.name]
            shift = beta if norm.bias and not placed else 0.0
            placed = placed or bool(norm.bias)
            params = [_one(v, x.dtype) if fqn else None for v, fqn in zip(norm.new_values(shift), norm.fqns())]
            out = node.target(x.reshape(-1, 1), *params, *node.args[5:], **node.kwargs)
            x = (out[0] if isinstance(out, tuple) else out).reshape(pre.shape)
        else:
            x = node.target(x, *node.args[1:], **node.kwargs)
    return x


def _one(value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((1,), value, dtype=dtype)


def value_and_slope(site: Site, at: float, where_: str) -> tuple[float, float]:
    """The new units' constant output and its slope w.r.t. their pre-activation, shifted by ``at``."""
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    v = new_unit_value(site, x + at, 0.0) if where_ == "bias" else new_unit_value(site, x, at)
    (g,) = torch.autograd.grad(v.sum(), x, allow_unused=True)
    return float(v.detach()), float(g) if g is not None else 0.0


@dataclass
class Activation:
    """How the new units sit on the activation: their shift, constant output and slope."""

    shift: float  # added to the new units' bias (or first BatchNorm β); 0 unless the activation is flat at 0
    shift_at: str | None  # "bias" | "norm" | None
    value: float  # the constant each new unit feeds the consumer
    slope: float  # d(value)/d(pre-activation): the φ' in the incoming gradient φ'·W_newᵀ M


def plan_activation(site: Site, consumer_rms: float) -> Activation:
    """Decide where the new units sit; refuses when they would change the function or never learn."""
    value, slope = value_and_slope(site, 0.0, "bias")
    if value != 0.0:
        culprit = _first_nonzero(site)
        raise _refuse(site.layer, f"{culprit} between it and '{site.consumer}' maps 0 to {value:.4g}, so units with "
                                  "zero incoming weights would change the output (gradmax needs φ(0) = 0; "
                                  "use init net2net or zero)")
    if slope != 0.0:
        return Activation(0.0, None, 0.0, slope)
    # Flat at 0 in autograd (ReLU): shift the new units onto the linear side and compensate.
    where_ = "bias" if site.producer_b else ("norm" if any(n.bias for n in site.norms.values()) else None)
    if where_ is None:
        raise _refuse(site.layer, "the activation's gradient at 0 is 0 (ReLU), so new units need a small positive bias "
                                  "to learn, and the layer has neither a bias nor a BatchNorm β to hold it")
    eps = EPS_REL * consumer_rms if consumer_rms > 0 else EPS_REL
    value, slope = value_and_slope(site, eps, where_)
    if slope == 0.0:
        raise _refuse(site.layer, "the activation has zero gradient at and just above 0, so new units would never learn")
    if site.consumer_b is None:
        raise _refuse(site.layer, f"the activation's gradient at 0 is 0 (ReLU); new units get a bias ε > 0 and their "
                                  f"constant output must be subtracted from the bias of '{site.consumer}', which has none")
    if site.is_conv and any(site.consumer_conv.padding):
        raise _refuse(site.layer, f"the activation's gradient at 0 is 0 (ReLU); new units get a bias ε > 0, and "
                                  f"'{site.consumer}' zero-pads its input, so their constant output cannot be "
                                  "compensated exactly at the borders (a GELU/SiLU/tanh network, or an unpadded "
                                  "consumer, works)")
    return Activation(eps, where_, value, slope)


def _first_nonzero(site: Site) -> str:
    """The first op on the chain that turns the new units' 0 into something else (for the message)."""
    x = torch.zeros(1, dtype=torch.float64)
    for i, node in enumerate(site.chain):
        if float(new_unit_value(dataclasses.replace(site, chain=site.chain[: i + 1]), x)) != 0.0:
            return f"{op_name(node)}{where(node)}"
    return "an operation"


# --------------------------------------------------------------------------- observing h and δ
class _Observe(TorchFunctionMode):
    """Records the input of calls using ``inputs`` weights and adds a zero ``aux`` to the output of
    calls using ``outputs`` weights, whose gradient is then ``δ`` (the graph stays intact)."""

    def __init__(self, inputs: set[int], outputs: set[int]):
        super().__init__()
        self.inputs, self.outputs = inputs, outputs
        self.seen_in: dict[int, list[torch.Tensor]] = {k: [] for k in inputs}
        self.seen_out: dict[int, list[torch.Tensor]] = {k: [] for k in outputs}
        self.out_in_rms: dict[int, list[float]] = {k: [] for k in outputs}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        key = id(weight) if isinstance(weight, torch.Tensor) else None
        if key in self.inputs:
            self.seen_in[key].append(args[0].detach())
        out = func(*args, **kwargs)
        if key in self.outputs and isinstance(out, torch.Tensor):
            x = args[0].detach()
            self.out_in_rms[key].append(float(x.double().pow(2).mean().sqrt()) if x.numel() else 0.0)
            aux = torch.zeros_like(out, requires_grad=True)
            self.seen_out[key].append(aux)
            out = out + aux
        return out


class Probe:
    """Accumulates ``M = Σ δ hᵀ`` (float64) for one site over calibration batches."""

    def __init__(self, site: Site, module: torch.nn.Module):
        self.site = site
        self.pw = module.get_parameter(site.producer_w)
        self.cw = module.get_parameter(site.consumer_w)
        self.m: torch.Tensor | None = None
        self.rms_sq = 0.0
        self.rms_n = 0

    def add(self, h: torch.Tensor, delta: torch.Tensor) -> None:
        h, delta = h.double(), delta.double()
        if self.site.is_conv:
            m = _conv_matrix(h, delta, self.site.producer_conv, self.site.consumer_conv)
        else:
            m = delta.reshape(-1, delta.shape[-1]).T @ h.reshape(-1, h.shape[-1])
        self.m = m if self.m is None else self.m + m
        self.extra(h, delta)

    def extra(self, h: torch.Tensor, delta: torch.Tensor) -> None:
        """Hook for more statistics from the same ``h`` and ``δ`` (see :mod:`growcli.advise.suggest`)."""

    @property
    def consumer_rms(self) -> float:
        return math.sqrt(self.rms_sq / self.rms_n) if self.rms_n else 0.0


def unfold_patches(h: torch.Tensor, p: ConvGeom, out_hw: tuple[int, int]) -> torch.Tensor:
    """The producer's input patches at each of its output positions: ``[N, C_in·k1h·k1w, H1, W1]``."""
    u = F.unfold(h, p.kernel, dilation=p.dilation, padding=p.padding, stride=p.stride)
    return u.reshape(h.shape[0], u.shape[1], *out_hw)


def consumer_taps(a: torch.Tensor, q: ConvGeom) -> torch.Tensor:
    """What each consumer tap reads at each consumer output position: ``[N, C·k2h·k2w, L2]``."""
    return F.unfold(a, q.kernel, dilation=q.dilation, padding=q.padding, stride=q.stride)


def _conv_out_hw(h: torch.Tensor, p: ConvGeom) -> tuple[int, int]:
    return tuple((h.shape[2 + i] + 2 * p.padding[i] - p.dilation[i] * (p.kernel[i] - 1) - 1) // p.stride[i] + 1
                 for i in range(2))


def _conv_matrix(h: torch.Tensor, delta: torch.Tensor, p: ConvGeom, q: ConvGeom) -> torch.Tensor:
    """``M[(o, q), (c, p)] = Σ_{n,y} δ[n,o,y] · h[n, c, (y·s2 + q·d2 − p2)·s1 + p·d1 − p1]`` as a
    ``[C_out·k2h·k2w, C_in·k1h·k1w]`` matrix: rows match a new consumer column ``W[:, j]``,
    columns match a new producer row ``W[j]`` (both flattened channel-major)."""
    n, m2 = delta.shape[0], delta.shape[1]
    hw = _conv_out_hw(h, p)
    c1 = h.shape[1] * p.kernel[0] * p.kernel[1]
    k2 = q.kernel[0] * q.kernel[1]
    per_sample = c1 * k2 * delta.shape[2] * delta.shape[3]
    chunk = max(1, _MAX_PATCH_ELEMENTS // max(per_sample, 1))
    total = torch.zeros(m2, c1 * k2, dtype=torch.float64)
    for s in range(0, n, chunk):
        taps = consumer_taps(unfold_patches(h[s:s + chunk], p, hw), q)  # [n, c1·k2, L2]
        total += torch.einsum("nol,ncl->oc", delta[s:s + chunk].reshape(taps.shape[0], m2, -1), taps)
    return total.reshape(m2, c1, k2).permute(0, 2, 1).reshape(m2 * k2, c1)


def measure(module: torch.nn.Module, probes: list[Probe], cal: Calibration) -> float:
    """Run ``cal`` through ``module`` (eval mode, the model's dtype) feeding every probe; returns the mean loss.

    The loss of each batch is weighted by its share of the samples, so ``M`` is the gradient
    of the mean loss over all calibration samples. Raises :class:`InputsError` when the model
    rejects the data and :class:`NotGrowableError` when a layer is not observed running.
    """
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    ins = {id(pr.pw) for pr in probes}
    outs = {id(pr.cw) for pr in probes}
    total = cal.samples
    mean_loss = 0.0
    for i, (batch, target) in enumerate(cal.batches):
        args, kwargs = cast_batch(batch, dtype)
        n = int((args[0] if args else next(iter(kwargs.values()))).shape[0])
        mode = _Observe(ins, outs)
        with torch.enable_grad(), mode:
            try:
                output = module(*args, **kwargs)
            except Exception as exc:  # the model's own error, reported with the data file
                detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise InputsError(f"{cal.source}: the model failed on calibration batch {i + 1} "
                                  f"({type(exc).__name__}: {detail})") from None
        loss = batch_loss(output, target, cal.loss, cal.source)
        mean_loss += float(loss.detach()) * n / total
        auxes = [a for pr in probes for a in mode.seen_out[id(pr.cw)]]
        for pr in probes:
            if len(mode.seen_in[id(pr.pw)]) != 1 or len(mode.seen_out[id(pr.cw)]) != 1:
                raise NotGrowableError(f"'{pr.site.layer}': gradmax could not observe it and '{pr.site.consumer}' running "
                                       "once each (their weights must be passed to linear/convolution calls directly)")
        grads = torch.autograd.grad(loss * (n / total), auxes, allow_unused=True) if auxes else []
        by_aux = {id(a): g for a, g in zip(auxes, grads)}
        for pr in probes:
            aux = mode.seen_out[id(pr.cw)][0]
            delta = by_aux[id(aux)]
            pr.add(mode.seen_in[id(pr.pw)][0], delta if delta is not None else torch.zeros_like(aux))
            pr.rms_sq += mode.out_in_rms[id(pr.cw)][0] ** 2
            pr.rms_n += 1
    return mean_loss


# --------------------------------------------------------------------------- the directions
def directions(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` left singular vectors of ``m`` (columns, unit norm, sign fixed so the largest
    entry is positive) and all singular values, largest first."""
    u, s, _ = torch.linalg.svd(m, full_matrices=True)
    u = u[:, :k].clone()
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, s


def outgoing_norm(site: Site, module: torch.nn.Module) -> float:
    """Mean L2 norm of the existing units' outgoing weights (the consumer's columns)."""
    w = module.get_parameter(site.consumer_w).detach().double()
    cols = w.transpose(0, 1).reshape(w.shape[1], -1)
    return float(cols.norm(dim=1).mean()) if cols.numel() else 0.0


# --------------------------------------------------------------------------- the transform's part
def widen_gradmax(gm, trace: Trace, group: Group, new_size: int, spec, ctx, report) -> None:
    """Add ``new_size − group.size`` GradMax units to ``group``'s layer (in place, through ``gm.edits``).

    ``spec`` is a :class:`~growcli.transforms.widen.WidenSpec` with ``init="gradmax"``; its
    calibration data must be in ``ctx`` (:func:`growcli.analysis.calibration.lookup`). Refuses
    (:class:`NotGrowableError`) where GradMax does not apply or cannot be exact, and when
    asked for more units than ``M`` has rows (independent directions).
    """
    from growcli.analysis.calibration import lookup
    from growcli.transforms.resize import sync_attributes

    site = find_site(trace, group)
    cal = lookup(ctx, spec)
    root = gm.module
    probe = Probe(site, root)
    loss = measure(root, [probe], cal)
    act = plan_activation(site, probe.consumer_rms)
    k = new_size - group.size
    rows = probe.m.shape[0]
    if k > rows:
        taps = " × taps" if site.is_conv else ""
        raise _refuse(site.layer, f"it can add at most {rows} units in one step (one per direction of M, whose rows are "
                                  f"'{site.consumer}'s outputs{taps}); asked for {k}: grow in several steps")
    dirs, sv = directions(probe.m, k)
    radius = spec.scale * (outgoing_norm(site, root) or 1.0)
    old_cw = root.get_parameter(site.consumer_w).detach()
    w_new = dirs * radius  # [rows, k]
    if site.is_conv:
        m2, kh, kw = old_cw.shape[0], old_cw.shape[2], old_cw.shape[3]
        w_new = w_new.reshape(m2, kh * kw, k).permute(0, 2, 1).reshape(m2, k, kh, kw)

    def put(fqn: str, new: torch.Tensor, dim: int, role: str) -> None:
        old = root.get_parameter(fqn) if fqn in dict(root.named_parameters()) else root.get_buffer(fqn)
        grown = torch.cat([old.detach(), new.to(old.dtype)], dim=dim)
        gm.edits.param(root, fqn, grown)
        report.changes.append({"name": fqn, "role": role, "before": list(old.shape), "after": list(grown.shape)})

    old_pw = root.get_parameter(site.producer_w).detach()
    put(site.producer_w, torch.zeros((k, *old_pw.shape[1:]), dtype=torch.float64), 0, "producer")
    if site.producer_b:
        put(site.producer_b, torch.full((k,), act.shift if act.shift_at == "bias" else 0.0, dtype=torch.float64), 0, "producer")
    placed = act.shift_at != "norm"
    for norm in site.norms.values():
        shift = act.shift if norm.bias and not placed else 0.0
        placed = placed or bool(norm.bias)
        for fqn, value in zip(norm.fqns(), norm.new_values(shift)):
            if fqn:
                put(fqn, torch.full((k,), value, dtype=torch.float64), 0, "copy")
    put(site.consumer_w, w_new, 1, "consumer")
    notes = []
    if act.shift_at is not None:
        # Every new unit feeds the consumer the same constant on every input; take it off the bias.
        constant = w_new.reshape(w_new.shape[0], k, -1).sum(dim=2).sum(dim=1) * act.value
        old_cb = root.get_parameter(site.consumer_b).detach()
        gm.edits.param(root, site.consumer_b, (old_cb.double() - constant).to(old_cb.dtype))
        where_ = "bias" if act.shift_at == "bias" else "BatchNorm β"
        notes.append(f"the activation's autograd gradient at 0 is 0 (ReLU), so the new units' {where_} is "
                     f"ε = {act.shift:.3g} (their linear side) and their constant output is subtracted from "
                     f"'{site.consumer_b}'")
    for name in sorted({site.layer, site.consumer} | {n.mean.rpartition(".")[0] for n in site.norms.values()}):
        sync_attributes(gm, name)
    top = ", ".join(f"{float(v):.3g}" for v in sv[:min(k, 4)])
    notes.insert(0, f"gradmax '{site.layer}': M ({rows}×{probe.m.shape[1]}) from {cal.describe()}, mean loss {loss:.4g}; "
                    f"top singular values {top}; new outgoing columns have norm {radius:.3g} "
                    f"({spec.scale} × the mean of the existing ones)")
    rank = int((sv > sv[0] * 1e-12).sum()) if len(sv) and sv[0] > 0 else 0
    if k > rank:
        notes.append(f"{k - rank} of the {k} new units got directions with zero gradient (M has rank {rank})")
    report.notes.extend(notes)
