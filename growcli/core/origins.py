"""Where a grown parameter's values came from: the map that also grows its optimizer state.

A transform that replaces a parameter says how each new position relates to the tensor it
replaces (:class:`Origin`): along each grown dimension, new position ``i`` holds
``old[index[i]] · scale[i]``, or is fresh (``index[i] = -1``: zero, random or padded, nothing to
inherit). A whole tensor can be fresh (a zeroed residual writer) or a plain copy of another one (a
stacked block's parameter). :class:`growcli.core.edits.EditLog` resolves these against the
tensor objects that existed before the step (:class:`Derived`), so renamed or moved parameters
need no bookkeeping. Training-time growth applies the same maps to the optimizer's moments
(:mod:`growcli.train.optim`); origins live in memory only and are never saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AxisMap:
    """New positions along ``dim``: ``old[index[i]] · scale[i]``; ``index[i] == -1`` marks a fresh position."""

    dim: int
    index: tuple[int, ...]
    scale: tuple[float, ...]

    def __post_init__(self):
        if len(self.index) != len(self.scale):
            raise ValueError(f"axis map along dim {self.dim}: {len(self.index)} indices but {len(self.scale)} scales")


@dataclass(frozen=True)
class Origin:
    """How a tensor's new value derives from the one it replaces: ``maps`` applied in order, or ``fresh``."""

    maps: tuple[AxisMap, ...] = ()
    fresh: bool = False


@dataclass(frozen=True)
class Derived:
    """A tensor made during a step (``tensor``), and the pre-step tensor (``source``) its values come from."""

    tensor: torch.Tensor
    source: torch.Tensor | None
    origin: Origin
