"""Firefly's measurement: the two kinds of candidate a layer offers, scored on calibration data.

For a :class:`~growcli.transforms.gradmax_site.Site` (producer ``W``, per-unit activation chain
``φ``, consumer ``V``) one forward/backward pass per calibration batch
(:func:`growcli.transforms.gradmax_measure.measure`) gives the producer's input ``h`` and the
gradient ``δ = ∂L/∂z'`` at the consumer's output. From them :class:`FireflyProbe` accumulates,
for the gradient of the *mean* loss over all samples:

- **new units**: ``g_j = ∂L/∂c_j``, the gradient of the loss w.r.t. the outgoing column ``c_j``
  of a candidate unit with random incoming weights ``w_j`` (its activation ``a_j = φ(w_j·h)``
  with identity BatchNorm statistics) and zero outgoing weights: ``g_j = Σ δ a_jᵀ``
  (convolutions: over the consumer's taps; the traced calls are replayed, so any stride, padding,
  dilation, 1/2/3-d and transposed convolutions);
- **splits** (Liu, Wu, Wang 2019): the splitting matrix of every existing unit ``i``,
  ``S_i = Σ (∂L/∂a_i) · φ_i''(z_i) · x̃ x̃ᵀ``, where ``z_i = w̃_i·x̃`` is its pre-activation,
  ``x̃ = [h; 1]`` (the ``1`` only when the producer has a bias; convolutions: ``h``'s patches
  at every output position) and ``φ_i`` the unit's own chain (its BatchNorm statistics
  included). Splitting unit ``i`` into two halves ``w̃_i ± δ v`` with its outgoing weights
  halved changes the loss by ``½ δ² vᵀ S_i v + O(δ⁴)``.

The recipe is in :mod:`growcli.transforms.firefly`.
"""

from __future__ import annotations

import torch

from growcli.analysis.trace import BATCH_NORM
from growcli.transforms.gradmax import new_unit_value
from growcli.transforms.gradmax_measure import Probe, input_gradient, new_unit_gradient, patches, unit_major
from growcli.transforms.gradmax_site import Site


def _tensor(module: torch.nn.Module, fqn: str) -> torch.Tensor:
    owner, _, leaf = fqn.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def unit_values(site: Site, module: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The existing units' outputs (what the consumer reads) for pre-activations ``z`` (units in dim 1).

    Element-wise ops of the chain run as traced; a BatchNorm runs with each unit's own running
    statistics and affine parameters (eval mode).
    """
    x = z
    view = (1, -1) + (1,) * (z.dim() - 2)
    for node in site.chain:
        if node.target in BATCH_NORM:
            norm = site.norms[node.name]
            mean = _tensor(module, norm.mean).detach().double().reshape(view)
            var = _tensor(module, norm.var).detach().double().reshape(view)
            x = (x - mean) / torch.sqrt(var + norm.eps)
            if norm.weight:
                x = x * _tensor(module, norm.weight).detach().double().reshape(view)
            if norm.bias:
                x = x + _tensor(module, norm.bias).detach().double().reshape(view)
        else:
            x = node.target(x, *node.args[1:], **node.kwargs)
    return x


def second_derivative(site: Site, module: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``φ_i''(z)`` element-wise (float64), by differentiating the chain twice."""
    z = z.detach().double().requires_grad_(True)
    with torch.enable_grad():
        a = unit_values(site, module, z)
        (d1,) = torch.autograd.grad(a.sum(), z, create_graph=True)
        if not d1.requires_grad:  # piecewise linear (ReLU, identity): no curvature anywhere
            return torch.zeros_like(z)
        (d2,) = torch.autograd.grad(d1.sum(), z, allow_unused=True)
    return d2.detach() if d2 is not None else torch.zeros_like(z)


class FireflyProbe(Probe):
    """A :class:`Probe` that also accumulates the new-unit gradients ``g`` and the splitting matrices ``S``.

    Weights are read unit-major (:func:`~growcli.transforms.gradmax_measure.unit_major`), so a transposed
    convolution's units (dim 1 of a producer, dim 0 of a consumer) are handled like any other."""

    def __init__(self, site: Site, module: torch.nn.Module, candidates: int, gen: torch.Generator):
        super().__init__(site, module)
        self.module = module
        w = self.pw.detach().double()
        std = float(w.std()) if w.numel() > 1 else 1.0
        # Candidate incoming weights, unit-major: random with the spread of the existing ones, bias 0.
        rest = unit_major(w, site.producer_axis).shape[1:]
        self.cand = torch.randn((candidates, *rest), generator=gen, dtype=torch.float64) * std
        self.g: torch.Tensor | None = None  # [candidates, consumer outputs (× taps)]
        self.s: torch.Tensor | None = None  # [units, D, D], D = incoming weights per unit (+1 for a bias)

    def extra(self, h: torch.Tensor, delta: torch.Tensor) -> None:
        site = self.site
        w = self.pw.detach().double()
        b = self.module.get_parameter(site.producer_b).detach().double() if site.producer_b else None
        v = self.cw.detach().double()
        if site.is_conv:
            pa, ca = site.producer_axis, site.consumer_axis
            if len(self.cand):
                pre = self.producer.run(h, self.cand.movedim(0, pa))
                g = new_unit_gradient(self.consumer, new_unit_value(site, pre), delta, v, ca)  # [R, rows]
                self.g = g if self.g is None else self.g + g
            z = self.producer.run(h, w, b)
            grad_a = input_gradient(self.consumer, z, delta, v)
            x = patches(self.producer, h, w, pa)
            x = x.reshape(x.shape[0], x.shape[1], -1)
            if b is not None:
                x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            c = (grad_a * second_derivative(site, self.module, z)).reshape(z.shape[0], z.shape[1], -1)
            s = torch.einsum("nul,ndl,nel->ude", c, x, x)
        else:
            h2 = h.reshape(-1, h.shape[-1])
            d2 = delta.reshape(-1, delta.shape[-1])
            if len(self.cand):
                g = (d2.T @ new_unit_value(site, h2 @ self.cand.T)).T  # [R, consumer outputs]
                self.g = g if self.g is None else self.g + g
            z = h2 @ w.T + (b if b is not None else 0.0)
            x = torch.cat([h2, torch.ones_like(h2[:, :1])], dim=1) if b is not None else h2
            c = (d2 @ v) * second_derivative(site, self.module, z)  # ∂L/∂a · φ''
            s = torch.einsum("mu,md,me->ude", c, x, x)
        self.s = s if self.s is None else self.s + s
