"""growcli's own modules and initialisers for layers that start as the identity.

Everything here is recordable by :func:`growcli.core.module_specs.module_spec` (plain ``torch.nn``
modules, or a ``growcli_spec()`` method), so a grown architecture can be rebuilt by
:func:`growcli.load_grown`. Recipes: docs/recipes.md#deepen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from growcli.core.errors import UsageError

# φ of the parametric activation, by the name users type after --activation.
ACTIVATIONS = {
    "relu": F.relu,
    "relu6": F.relu6,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "softplus": F.softplus,
    "hardswish": F.hardswish,
    "mish": F.mish,
}


def check_activation(name: str) -> str:
    """``name`` if it is a known φ; :class:`UsageError` listing the known ones otherwise."""
    if name not in ACTIVATIONS:
        raise UsageError(f"--activation {name!r}: expected one of {', '.join(ACTIVATIONS)}")
    return name


class ParametricActivation(nn.Module):
    """``a·x + (1 − a)·φ(x)`` with a learnable scalar ``a`` (Network Morphism's P-activation).

    At ``a = 1`` (the initial value) it is exactly the identity for finite inputs:
    ``1·x + 0·φ(x) = x`` in floating point. Training moves ``a`` and the layer becomes
    non-linear; ``∂L/∂a = Σ δ·(x − φ(x))`` is non-zero wherever φ is not the identity.
    """

    def __init__(self, activation: str = "relu"):
        super().__init__()
        self.activation = check_activation(activation)
        self.a = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a.to(x.dtype)
        return a * x + (1 - a) * ACTIVATIONS[self.activation](x)

    def growcli_spec(self) -> dict:
        return {"activation": self.activation}

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def conv_class(dims: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]


def batch_norm_class(dims: int) -> type[nn.Module]:
    """BatchNorm over ``[N, C, *spatial]`` with ``dims`` spatial dims (0 means ``[N, C]``)."""
    return {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]


def identity_linear(features: int, *, dtype: torch.dtype, device: torch.device | None = None) -> nn.Linear:
    """A square ``Linear`` with ``W = I`` and ``b = 0`` (Net2DeeperNet's IdMorph)."""
    layer = nn.Linear(features, features, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(features, dtype=dtype))
        layer.bias.zero_()
    return layer


def dirac_conv(dims: int, channels: int, kernel: tuple[int, ...], *, dtype: torch.dtype,
               device: torch.device | None = None) -> nn.Module:
    """A ``channels → channels`` conv that is the identity: Dirac kernel, stride 1, "same" padding.

    ``kernel`` must be odd in every dimension (an even kernel has no centre tap);
    callers validate that and say so to the user.
    """
    if any(k % 2 == 0 for k in kernel):
        raise UsageError(f"kernel {tuple(kernel)}: an identity conv needs an odd kernel (an even one has no centre)")
    conv = conv_class(dims)(channels, channels, tuple(kernel), stride=1, padding=tuple(k // 2 for k in kernel),
                            bias=True, device=device, dtype=dtype)
    with torch.no_grad():
        conv.weight.zero_()
        centre = tuple(k // 2 for k in kernel)
        idx = torch.arange(channels)
        conv.weight[(idx, idx) + tuple(torch.full_like(idx, c) for c in centre)] = 1
        conv.bias.zero_()
    return conv


IDENTITY_BN_EPS = 2.0 ** -16  # about PyTorch's 1e-5, and a power of two so that 1 - eps is exact in float32


def identity_batch_norm(dims: int, channels: int, *, dtype: torch.dtype, device: torch.device | None = None) -> nn.Module:
    """A BatchNorm that is exactly the identity in eval mode.

    Eval mode computes ``γ·(x − mean)/sqrt(var + eps) + β``. The textbook recipe (``var = 1``,
    ``γ = sqrt(1 + eps)``; docs/recipes.md#deepen-identity-batchnorm) is the identity in real arithmetic but rounds twice in
    floating point; here ``eps = 2⁻¹⁶`` and ``var = 1 − eps`` (exact in float32 and float64),
    so ``var + eps = 1``, ``γ = 1``, ``mean = β = 0``: every step is exact. Where the dtype
    cannot hold ``1 − eps`` (float16), ``γ = sqrt(var + eps)`` as in the recipe. In training
    mode batch statistics are used instead: not the identity.
    """
    bn = batch_norm_class(dims)(channels, eps=IDENTITY_BN_EPS, device=device, dtype=dtype)
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - IDENTITY_BN_EPS)
        bn.weight.fill_(math.sqrt(float(bn.running_var[0]) + IDENTITY_BN_EPS))
        bn.bias.zero_()
    return bn


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random ``n × n`` orthogonal matrix in float64 (QR of a Gaussian, signs fixed)."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1  # QR is unique only up to column signs; fixing them makes Q Haar-distributed
    return q * signs


def zero_pad_kernel(weight: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """``weight`` ``[out, in, *k]`` zero-padded symmetrically to ``[out, in, *kernel]``.

    Kernel-size morphing: with the padding grown by ``(k' − k)/2`` per side the conv
    computes the same output. Both sizes must be odd (or equal) in every dimension.
    """
    pads: list[int] = []
    for have, want in reversed(list(zip(weight.shape[2:], kernel))):
        if want < have or (want - have) % 2:
            raise UsageError(f"kernel {tuple(kernel)}: cannot zero-pad a {tuple(weight.shape[2:])} kernel to it "
                             "(it must be at least as large and differ by an even amount)")
        pads += [(want - have) // 2] * 2
    return F.pad(weight, pads)


# Layers defined in submodules, exported here: the allowlist of recordable classes
# (growcli.core.module_specs) reads this namespace, and records them as ``growcli.nn:<name>``.
from growcli.nn.branch import *  # noqa: E402,F401,F403
from growcli.nn.columns import *  # noqa: E402,F401,F403
from growcli.nn.masks import *  # noqa: E402,F401,F403
