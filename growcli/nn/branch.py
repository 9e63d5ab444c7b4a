"""Parallel paths over one input, merged by a weighted sum or a concatenation (Cai et al. 2018).

:class:`Branches` is the module ``growcli branch`` puts in place of a layer or a block. It is
recorded by its merge settings alone (``growcli_spec``); its paths live in ``branches`` (an
``nn.ModuleList``) and are recorded as edits of their own, so a grown model is rebuilt by
:func:`growcli.load_grown`. Recipe: docs/recipes.md#branch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from growcli.core.errors import ArchitectureError

__all__ = ["Branches"]

MERGES = ("add", "concat")


def huffman_order(weights: Sequence[float]) -> list[tuple[int, int]]:
    """The pairs of partial sums to add, smallest weights first: ``[(a, b), ...]`` over a growing list.

    Partial sum ``k`` is branch ``k`` for ``k < N`` and the result of pair ``k − N`` after that.
    When every weight is a power of two and they sum to 1, the two smallest partial weights
    are always equal, so each addition is ``x + x = 2x``: exact in every binary float format.
    Ties are broken by position, so the order is deterministic.
    """
    live = [(float(w), k) for k, w in enumerate(weights)]
    pairs: list[tuple[int, int]] = []
    nxt = len(live)
    while len(live) > 1:
        live.sort()
        (wa, a), (wb, b) = live[0], live[1]
        pairs.append((a, b))
        live = live[2:] + [(wa + wb, nxt)]
        nxt += 1
    return pairs


class Branches(nn.Module):
    """``N`` paths over the same input: ``Σ w_i · branch_i(x)`` (``add``) or ``cat(branch_i(x), dim)`` (``concat``).

    ``weights`` (add only) are Python floats, one per branch; ``dim`` (concat only) is the
    dimension the branch outputs are concatenated along (``-1`` for Linear features, ``1``
    for conv channels). The paths are appended to ``branches`` after construction.
    """

    def __init__(self, merge: str = "add", weights: list[float] | None = None, dim: int = -1):
        super().__init__()
        # ValueError, not a growcli error: the transform validates its options before building this, so
        # only a recorded spec read from a file gets here, and replay reports it with the edit's location.
        if merge not in MERGES:
            raise ValueError(f"merge {merge!r}: expected one of {', '.join(MERGES)}")
        if merge == "add" and not weights:
            raise ValueError("an add merge needs one weight per branch")
        self.merge = merge
        self.weights = [float(w) for w in weights] if merge == "add" else None
        self.dim = int(dim)
        self._order = huffman_order(self.weights) if self.weights else []
        self.branches = nn.ModuleList()

    def forward(self, *args, **kwargs):
        outs = [branch(*args, **kwargs) for branch in self.branches]
        if self.merge == "concat":
            return torch.cat(outs, dim=self.dim)
        if len(outs) != len(self.weights):
            raise ArchitectureError(f"Branches has {len(outs)} branches but {len(self.weights)} merge weights")
        parts = [out if w == 1.0 else out * w for out, w in zip(outs, self.weights)]
        for a, b in self._order:
            parts.append(parts[a] + parts[b])
        return parts[-1]

    def growcli_spec(self) -> dict:
        return {"merge": self.merge, "weights": self.weights, "dim": self.dim}

    def extra_repr(self) -> str:
        if self.merge == "concat":
            return f"merge=concat, dim={self.dim}"
        return f"merge=add, weights={self.weights}"
