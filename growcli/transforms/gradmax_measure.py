"""GradMax's measurement: ``M = Σ δ hᵀ`` for a site, from calibration data.

``h`` (the producer's input) and ``δ = ∂L/∂z`` (the gradient at the consumer's output) are
observed with a :class:`~torch.overrides.TorchFunctionMode` that recognises the producer's and
consumer's weight tensors in linear/convolution calls, so the same code serves eager modules and
loaded ``.pt2`` programs. For convolutions ``M`` pairs ``(consumer channel, consumer tap)`` with
``(input channel, producer tap)``, from unfolded patches. :class:`Probe` accumulates ``M`` for one
:class:`~growcli.transforms.gradmax_site.Site`; :func:`measure` runs the data through the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from growcli.analysis.calibration import Calibration, batch_loss, run_on_batch
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import cast_batch
from growcli.transforms.gradmax_site import ConvGeom, Site

_MAX_PATCH_ELEMENTS = 1 << 24  # memory bound for the unfolded patches of one chunk of samples


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
            pr.add(mode.seen_in[id(pr.pw)][0], delta if delta is not None else torch.zeros_like(aux))
            pr.rms_sq += mode.out_in_rms[id(pr.cw)][0] ** 2
            pr.rms_n += 1
    return mean_loss
