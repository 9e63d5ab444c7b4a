"""Masked layers for NeST (Dai, Yin, Jha 2018): sparse connections as real module state.

:class:`MaskedLinear`, :class:`MaskedConv1d`/``2d``/``3d`` and :class:`MaskedConvTranspose1d`/``2d``/``3d``
are the ``torch.nn`` layers with one more persistent buffer, ``mask`` (the weight's shape and dtype, entries 0
or 1), and a forward that uses ``weight * mask``. So:

- the *function* is the masked one whatever the stored weights hold, in eager mode, in a
  ``torch.export`` program (the mask is a buffer of the program) and in ONNX (a ``Mul``);
- the gradient of a masked entry is exactly zero (``∂(w·m)/∂w = m = 0``), so plain SGD never
  revives it. Momentum, Adam's moments or decoupled weight decay can still move the *stored*
  value of an entry pruned mid-training (the function stays masked); :func:`keep_masked_zero`
  registers an optimizer hook that zeroes them after every step, and :func:`zero_masked_`
  does it once. growcli's transforms keep the stored entries under the mask at zero.

The mask is saved with the weights (``<layer>.mask`` in a state_dict or safetensors file) and
the layers record themselves (``growcli_spec``), so :func:`growcli.load_grown` rebuilds them.
Recipe: docs/recipes.md#nest.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskedLinear", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d", "MaskedConvTranspose1d",
           "MaskedConvTranspose2d", "MaskedConvTranspose3d"]


class _Masked:
    """The mask buffer and the helpers shared by the masked layers."""

    weight: nn.Parameter
    mask: torch.Tensor

    def _init_mask(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, requires_grad=False))

    def masked_weight(self) -> torch.Tensor:
        """``weight * mask``: what the layer computes with."""
        return self.weight * self.mask

    def density(self) -> float:
        """Fraction of connections present (mask entries equal to 1)."""
        return float(self.mask.count_nonzero()) / max(self.mask.numel(), 1)


class MaskedLinear(_Masked, nn.Linear):
    """``nn.Linear`` computing with ``weight * mask``; ``mask`` starts as ones (the dense layer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)

    def growcli_spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density():.3f}"


class _MaskedConv(_Masked):
    """Shared by the masked convolutions: same constructor arguments as ``nn.ConvNd``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def growcli_spec(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": tuple(self.kernel_size), "stride": tuple(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else tuple(self.padding),
                "dilation": tuple(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "padding_mode": self.padding_mode}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density():.3f}"


class MaskedConv1d(_MaskedConv, nn.Conv1d):
    """``nn.Conv1d`` computing with ``weight * mask``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()


class MaskedConv2d(_MaskedConv, nn.Conv2d):
    """``nn.Conv2d`` computing with ``weight * mask``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()


class MaskedConv3d(_MaskedConv, nn.Conv3d):
    """``nn.Conv3d`` computing with ``weight * mask``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()


class _MaskedConvTranspose(_Masked):
    """Shared by the masked transposed convolutions: same constructor arguments as ``nn.ConvTransposeNd``.

    The weight is ``[in, out/groups, k…]`` and the mask has its shape, so a mask entry is one connection
    (input channel, output channel, tap) as for a plain convolution; only the layout differs. The forward is
    ``nn.ConvTransposeNd``'s with ``weight * mask``, ``output_size`` included."""

    _functional = None  # F.conv_transpose1d / 2d / 3d, set by each class

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for {type(self).__name__}")
        dims = len(self.kernel_size)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, dims,
                                              self.dilation)
        return type(self)._functional(x, self.masked_weight(), self.bias, self.stride, self.padding, output_padding,
                                      self.groups, self.dilation)

    def growcli_spec(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": tuple(self.kernel_size), "stride": tuple(self.stride), "padding": tuple(self.padding),
                "output_padding": tuple(self.output_padding), "groups": self.groups, "bias": self.bias is not None,
                "dilation": tuple(self.dilation), "padding_mode": self.padding_mode}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density():.3f}"


class MaskedConvTranspose1d(_MaskedConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` computing with ``weight * mask``."""

    _functional = staticmethod(F.conv_transpose1d)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()


class MaskedConvTranspose2d(_MaskedConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` computing with ``weight * mask``."""

    _functional = staticmethod(F.conv_transpose2d)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()


class MaskedConvTranspose3d(_MaskedConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` computing with ``weight * mask``."""

    _functional = staticmethod(F.conv_transpose3d)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()


# plain layer class → its masked version (exact types: a subclass of nn.Linear may compute something else)
MASKED = {nn.Linear: MaskedLinear, nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d, nn.Conv3d: MaskedConv3d,
          nn.ConvTranspose1d: MaskedConvTranspose1d, nn.ConvTranspose2d: MaskedConvTranspose2d,
          nn.ConvTranspose3d: MaskedConvTranspose3d}
MASKED_TYPES = tuple(MASKED.values())


def masked_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(name, layer)`` for every masked layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)]


@torch.no_grad()
def zero_masked_(model: nn.Module) -> int:
    """Set every stored weight entry under a zero mask to 0; returns how many were not already 0."""
    moved = 0
    for _, layer in masked_layers(model):
        off = layer.mask == 0
        moved += int((layer.weight[off] != 0).sum())
        layer.weight.masked_fill_(off, 0)
    return moved


def keep_masked_zero(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Zero the masked weight entries of ``model`` after every ``optimizer.step()`` (momentum, Adam,
    weight decay cannot move them); returns the hook handle (``.remove()`` to stop)."""
    return optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: zero_masked_(model))
