"""GradMax's measurement: ``M = Σ δ hᵀ`` for a site, from calibration data.

``h`` (the producer's input) and ``δ = ∂L/∂z`` (the gradient at the consumer's output) are
observed with a :class:`~torch.overrides.TorchFunctionMode` that recognises the producer's and
consumer's weight tensors in linear/convolution calls, so the same code serves eager modules and
loaded ``.pt2`` programs. For convolutions ``M`` pairs ``(consumer channel, consumer tap)`` with
``(input channel, producer tap)``. It is computed by replaying the two traced calls (:class:`Call`)
with other weights, so stride, padding, dilation, output padding, 1/2/3-d and transposed
convolutions all follow the op's own semantics: the producer run with one "basis" unit per incoming
weight gives every patch element as a channel (:func:`patches`), and the consumer's weight gradient
on those channels, against ``δ``, is ``M`` (:func:`new_unit_gradient`). :class:`Probe` accumulates
``M`` for one :class:`~growcli.transforms.gradmax_site.Site`; :func:`measure` runs the data through the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from growcli.analysis.calibration import Calibration, batch_loss, run_on_batch
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import cast_batch
from growcli.transforms.gradmax_site import ConvGeom, Site

_MAX_PATCH_ELEMENTS = 1 << 24  # memory bound for the unfolded patches of one chunk of samples


@dataclass
class Call:
    """One observed linear/convolution call, replayable with another input, weight and bias."""

    func: object
    args: tuple  # the call's arguments, the input and weight left out (None)
    kwargs: dict
    in_shape: tuple[int, ...]  # the input's shape in the observed call

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The same op with the same geometry (stride, padding, …) on ``x`` with ``weight`` and ``bias``."""
        args, kwargs = list(self.args), dict(self.kwargs)
        args[0] = x
        for i, name, value in ((1, "weight", weight), (2, "bias", bias)):
            if len(args) > i:
                args[i] = value
            elif name in kwargs or name == "weight":
                kwargs[name] = value
        return self.func(*args, **kwargs)


def unit_major(w: torch.Tensor, axis: int) -> torch.Tensor:
    """``w`` with its units' dim ``axis`` first: ``[units, rest…]`` (a view)."""
    return w.movedim(axis, 0)


def basis(w: torch.Tensor, axis: int) -> torch.Tensor:
    """A producer weight shaped like ``w`` with ``D`` units, ``D`` = incoming weights per unit, unit ``d``
    the ``d``-th one-hot incoming weight (float64): run with it, the producer outputs its patches."""
    rest = unit_major(w, axis).shape[1:]
    d = math.prod(rest)
    return torch.eye(d, dtype=torch.float64).reshape(d, *rest).movedim(0, axis)


def patches(producer: Call, h: torch.Tensor, w: torch.Tensor, axis: int) -> torch.Tensor:
    """What each incoming weight of a producer unit multiplies, at each output position: ``[N, D, *out]``
    (``D`` = incoming weights per unit in unit-major order, ``out`` = the producer's output positions)."""
    return producer.run(h, basis(w, axis))


def new_unit_gradient(consumer: Call, a: torch.Tensor, delta: torch.Tensor, cw: torch.Tensor, axis: int) -> torch.Tensor:
    """``∂/∂V Σ δ · consumer(a, V)`` for new units whose consumer inputs are ``a`` (``R`` channels, dim 1)
    and whose outgoing weights ``V`` are still zero: ``[R, consumer outputs × taps]``, each row the
    gradient of one unit's outgoing weights in unit-major order. Linear in ``a`` and ``δ``."""
    shape = list(cw.shape)
    shape[axis] = a.shape[1]
    v = torch.zeros(shape, dtype=a.dtype, requires_grad=True)
    with torch.enable_grad():
        out = consumer.run(a, v)
        (g,) = torch.autograd.grad(out, v, grad_outputs=delta.to(out.dtype).reshape(out.shape))
    return unit_major(g, axis).reshape(a.shape[1], -1)


def input_gradient(consumer: Call, a: torch.Tensor, delta: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    """``∂/∂a Σ δ · consumer(a, V)``: the gradient at the consumer's input (``V`` = ``cw``, no bias)."""
    a = a.detach().requires_grad_(True)
    with torch.enable_grad():
        out = consumer.run(a, cw)
        (g,) = torch.autograd.grad(out, a, grad_outputs=delta.to(out.dtype).reshape(out.shape))
    return g


class _Observe(TorchFunctionMode):
    """Records the input of calls using ``inputs`` weights and adds a zero ``aux`` to the output of
    calls using ``outputs`` weights, whose gradient is then ``δ`` (the graph stays intact); keeps
    each call (:class:`Call`) for replay."""

    def __init__(self, inputs: set[int], outputs: set[int]):
        super().__init__()
        self.inputs, self.outputs = inputs, outputs
        self.seen_in: dict[int, list[torch.Tensor]] = {k: [] for k in inputs}
        self.seen_out: dict[int, list[torch.Tensor]] = {k: [] for k in outputs}
        self.out_in_rms: dict[int, list[float]] = {k: [] for k in outputs}
        self.calls: dict[int, Call] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        key = id(weight) if isinstance(weight, torch.Tensor) else None
        if key in self.inputs or key in self.outputs:
            kept = [None, None, *args[2:]] if len(args) > 1 else [None]
            self.calls[key] = Call(func, tuple(kept), {k: v for k, v in kwargs.items() if k != "weight"},
                                   tuple(args[0].shape))
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
        self.producer: Call | None = None  # the observed calls (set by :func:`measure` before :meth:`add`)
        self.consumer: Call | None = None

    def add(self, h: torch.Tensor, delta: torch.Tensor) -> None:
        h, delta = h.double(), delta.double()
        if self.site.is_conv:
            m = self.conv_matrix(h, delta)
        else:
            m = delta.reshape(-1, delta.shape[-1]).T @ h.reshape(-1, h.shape[-1])
        self.m = m if self.m is None else self.m + m
        self.extra(h, delta)

    def conv_matrix(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``M[(o, q), (c, p)] = ∂²(Σ δ · consumer(producer(h)))/∂V[o, ·, q] ∂W[·, c, p]`` for one new unit
        (incoming ``W``, outgoing ``V``): ``[C_out·taps₂, C_in·taps₁]``, rows in the order of a new outgoing
        slice, columns in that of a new incoming slice (both unit-major). Chunked over samples."""
        site = self.site
        w, cw = self.pw.detach().double(), self.cw.detach().double()
        per_sample = math.prod(unit_major(w, site.producer_axis).shape[1:]) * math.prod(self.consumer.in_shape[2:])
        chunk = max(1, _MAX_PATCH_ELEMENTS // max(per_sample, 1))
        total = None
        for s in range(0, h.shape[0], chunk):
            a = patches(self.producer, h[s:s + chunk], w, site.producer_axis)
            g = new_unit_gradient(self.consumer, a, delta[s:s + chunk], cw, site.consumer_axis)  # [D, rows]
            total = g if total is None else total + g
        return total.T.contiguous()

    def extra(self, h: torch.Tensor, delta: torch.Tensor) -> None:
        """Hook for more statistics from the same ``h`` and ``δ`` (see :mod:`growcli.advise.suggest`)."""

    @property
    def consumer_rms(self) -> float:
        return math.sqrt(self.rms_sq / self.rms_n) if self.rms_n else 0.0


def padded_as_op(x: torch.Tensor, geom: ConvGeom) -> torch.Tensor:
    """``x`` zero-padded as the convolution pads it, before and after each spatial dim (``padding="same"`` with an
    even kernel pads one more after), for an unpadded op with ``geom``'s other arguments."""
    pads = [p for before, after in reversed(geom.pads) for p in (before, after)]
    return F.pad(x, pads) if any(pads) else x


def consumer_taps(a: torch.Tensor, q: ConvGeom) -> torch.Tensor:
    """What each consumer tap reads at each consumer output position, ``[N, C·k2h·k2w, L2]``, padded as the op pads."""
    return F.unfold(padded_as_op(a, q), q.kernel, dilation=q.dilation, stride=q.stride)


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
            output = run_on_batch(module, cal, i, args, kwargs)
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
            pr.producer, pr.consumer = mode.calls[id(pr.pw)], mode.calls[id(pr.cw)]
            pr.add(mode.seen_in[id(pr.pw)][0], delta if delta is not None else torch.zeros_like(aux))
            pr.rms_sq += mode.out_in_rms[id(pr.cw)][0] ** 2
            pr.rms_n += 1
    return mean_loss
