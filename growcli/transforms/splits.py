"""Splitting a weight among its copies so that the parts add up to it exactly, in the weight's dtype.

When a unit is replicated, each outgoing weight ``w`` is shared out among the copies: ``w·s_1, …,
w·s_k`` with shares summing to 1. Computed in float64 and rounded to bf16 (8-bit mantissa) or
float32, the rounded parts no longer sum to ``w``, and the grown model differs from the
original by the rounding of every split weight (~1e-3 relative in bf16).

Exact instead, in any binary floating-point format: the first part is ``a = fl(w·r)`` with
``r ∈ [1/2, 1]``, the rest is ``w − a``, which is exact by Sterbenz's lemma (``y/2 ≤ x ≤ 2y``
implies ``x − y`` is representable); more parts split the rest the same way. So the shares
asked for are honoured where they can be (the largest share first, relative to what is left,
clamped to at least 1/2), the parts always sum to ``w`` bit for bit, and a grown low-precision
model evaluated in float64 equals the original up to summation order. Float64 weights keep
the shares exactly as asked (their rounding is below any tolerance).
"""

from __future__ import annotations

from collections import defaultdict

import torch


def split_columns(old: torch.Tensor, dim: int, idx: torch.Tensor, share: torch.Tensor,
                  split: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``old.index_select(dim, idx)`` with every old position that several ``split`` positions copy shared
    out among them (shares ``share``, summing to 1 per old position); returns the new tensor (``old``'s
    dtype) and the share each new position actually got (float64)."""
    new = old.index_select(dim, idx).clone()
    got = torch.where(split, share, torch.ones_like(share))
    if old.dtype == torch.float64 or not old.is_floating_point():
        return new * along(new, dim, got), got
    copies: dict[int, list[int]] = defaultdict(list)
    for pos in torch.nonzero(split).flatten().tolist():
        copies[int(idx[pos])].append(pos)
    for source, positions in copies.items():
        positions.sort(key=lambda p: (-float(share[p]), p))
        rest, left = old.select(dim, source), float(share[positions].sum())
        kept = 1.0  # the fraction of the weight still to share out
        for pos in positions[:-1]:
            r = min(1.0, max(0.5, float(share[pos]) / left)) if left > 0 else 1.0
            part = (rest.double() * r).to(old.dtype)
            new.select(dim, pos).copy_(part)
            rest = rest - part  # exact: part lies in [rest/2, rest]
            got[pos] = kept * r
            kept, left = kept * (1 - r), left - float(share[pos])
        new.select(dim, positions[-1]).copy_(rest)
        got[positions[-1]] = kept
    return new, got


def along(t: torch.Tensor, dim: int, values: torch.Tensor) -> torch.Tensor:
    """``values`` shaped to broadcast along ``dim`` of ``t`` (in ``t``'s dtype)."""
    view = [1] * t.dim()
    view[dim] = -1
    return values.to(t.dtype).view(view)
