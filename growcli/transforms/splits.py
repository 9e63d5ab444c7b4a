"""Splitting a weight among its copies so that the parts add up to it exactly, in the weight's dtype.

When a unit is replicated (widen, a copied attention head) or a hidden vector is tiled ``k``
times (the columns reading it), each affected weight ``w`` is shared out among its copies:
``w·s_1, …, w·s_k`` with shares summing to 1. Computed in float64 and rounded to bf16 (8-bit
mantissa) or float32, the rounded parts no longer sum to ``w``, and the grown model differs
from the original by the rounding of every split weight (~1e-3 relative in bf16).

Exact instead, in any binary floating-point format:

- shares that are all powers of two (``1/2, 1/4, 1/4``; the ``1/k`` tiles of ``k = 2, 4, 8…``)
  are applied directly: ``w·2^-m`` is exact (barring underflow below the smallest normal);
- any other shares: the first part is ``a = fl(w·r)`` with ``r ∈ [1/2, 1]``, the rest is
  ``w − a``, which is exact by Sterbenz's lemma (``y/2 ≤ x ≤ 2y`` implies ``x − y`` is
  representable); more parts split the rest the same way. So the shares asked for are honoured
  where they can be (the largest share first, relative to what is left, clamped to at least
  1/2: three equal shares become ``1/2, 1/4, 1/4``), and the parts always sum to ``w`` bit for bit.

A grown low-precision model evaluated in float64 then equals the original up to summation
order. Float64 weights keep the shares exactly as asked (their rounding is below any tolerance).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def split_columns(old: torch.Tensor, dim: int, idx: torch.Tensor, share: torch.Tensor,
                  split: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``old.index_select(dim, idx)`` with every old position that several ``split`` positions copy shared
    out among them (shares ``share``, summing to 1 per old position); returns the new tensor (``old``'s
    dtype) and the share each new position actually got (float64). The parts of an old position sum
    to it bit for bit in ``old``'s dtype (see the module docstring); positions not in ``split`` are
    plain copies."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    share = torch.as_tensor(share, dtype=torch.float64)
    split = torch.as_tensor(split, dtype=torch.bool)
    new = old.index_select(dim, idx).clone()
    got = torch.where(split, share, torch.ones_like(share))
    if old.dtype == torch.float64 or not old.is_floating_point():
        return new * along(new, dim, got), got
    copies: dict[int, list[int]] = defaultdict(list)
    for pos in torch.nonzero(split).flatten().tolist():
        copies[int(idx[pos])].append(pos)
    direct = [p for ps in copies.values() if _powers_of_two(share[ps].tolist()) for p in ps]
    if direct:  # w·2^-m is exact: apply the shares as asked
        d = torch.tensor(direct)
        part = new.index_select(dim, d).double() * along(new, dim, share[d]).double()
        new.index_copy_(dim, d, part.to(old.dtype))
    rest_groups = [sorted(ps, key=lambda p: (-float(share[p]), p)) for ps in copies.values()
                   if not _powers_of_two(share[ps].tolist())]
    if rest_groups:
        _remainders(new, old, dim, idx, share, got, rest_groups)
    return new, got


def _remainders(new: torch.Tensor, old: torch.Tensor, dim: int, idx: torch.Tensor, share: torch.Tensor,
                got: torch.Tensor, groups: list[list[int]]) -> None:
    """The Sterbenz remainder construction for every group at once (rank by rank), written into ``new``."""
    lens = torch.tensor([len(g) for g in groups])
    table = torch.full((len(groups), int(lens.max())), -1, dtype=torch.long)
    for i, g in enumerate(groups):
        table[i, :len(g)] = torch.tensor(g)
    rest = old.index_select(dim, idx[table[:, 0]])
    left = torch.tensor([float(share[g].sum()) for g in groups], dtype=torch.float64)
    kept = torch.ones(len(groups), dtype=torch.float64)  # the fraction of the weight still to share out
    for j in range(table.shape[1]):
        active = torch.nonzero(lens > j).flatten()
        pos = table[active, j]
        sh = share[table[:, j].clamp(min=0)]
        last = lens == j + 1
        r = torch.where(left > 0, (sh / left.clamp(min=1e-300)).clamp(0.5, 1.0), torch.ones_like(left))
        r = torch.where(last, torch.ones_like(r), r)
        part = (rest.double() * along(rest.double(), dim, r)).to(old.dtype)
        part = torch.where(along(rest, dim, last).bool(), rest, part)
        new.index_copy_(dim, pos, part.index_select(dim, active))
        got[pos] = (kept * r)[active]
        rest = rest - part  # exact: part lies in [rest/2, rest]
        kept, left = kept * (1 - r), left - sh


def _powers_of_two(shares: list[float]) -> bool:
    """True when every share is 2^-m (m ≥ 0) and they sum to 1 exactly."""
    return sum(shares) == 1.0 and all(s > 0 and math.frexp(s)[0] == 0.5 for s in shares)


def along(t: torch.Tensor, dim: int, values: torch.Tensor) -> torch.Tensor:
    """``values`` shaped to broadcast along ``dim`` of ``t`` (in ``t``'s dtype)."""
    view = [1] * t.dim()
    view[dim] = -1
    return values.to(t.dtype).view(view)
