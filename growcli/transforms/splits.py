"""Splitting a weight among its copies so that the parts add up to it exactly, in the weight's dtype.

When a unit is replicated (widen, a copied attention head) or a hidden vector is tiled ``k``
times (the columns reading it), each affected weight ``w`` is shared out among its copies:
``w·s_1, …, w·s_k`` with shares summing to 1. Computed in float64 and rounded to bf16 (8-bit
mantissa) or float32, the rounded parts no longer sum to ``w``, and the grown model differs
from the original by the rounding of every split weight (~1e-3 relative in bf16).

Exact instead, in any binary floating-point format:

- shares that are all powers of two (``1/2, 1/4, 1/4``; the ``1/k`` tiles of ``k = 2, 4, 8…``)
  are applied directly: ``w·2^-m`` is exact (barring underflow below the smallest normal);
- any other shares: the first part is ``a = fl(w·r)``, one rounded product in the dtype, with ``r``
  rounded to the dtype within ``[1/2, 1]`` (the share the part gets), the rest is
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
from dataclasses import dataclass

import numpy as np
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
    got = torch.where(split, share, torch.ones_like(share))
    if old.dtype == torch.float64 or not old.is_floating_point():
        new = old.index_select(dim, idx)
        return new * along(new, dim, got), got
    if bool(split.any()) and finite(old) and finite(share):
        return _split_fast(old, dim, idx, share, got, split), got
    new = take(old, dim, idx)  # a new tensor: written in place below
    if bool(split.any()):  # NaNs (or inf − inf) as well: float64 writes the canonical NaN
        _split_reference(new, old, dim, idx, share, got, split)
    return new, got


@dataclass
class _Plan:
    """What :func:`_split_fast` does for given positions and shares, whatever the values: the shares the
    positions get, the positions whose power-of-two share is applied directly, and the remainder groups
    (their old positions, largest groups first, and per rank the groups still sharing, the positions they
    write and their ratios); ``final`` picks each new position from ``old`` and the computed parts."""

    got: torch.Tensor
    direct: torch.Tensor
    direct_share: torch.Tensor
    sources: torch.Tensor
    ranks: list[tuple[int, int, torch.Tensor]]
    final: torch.Tensor


_PLANS: list[tuple] = []  # the last few plans: the slices of one tensor (streaming) share theirs


def _split_fast(old: torch.Tensor, dim: int, idx: torch.Tensor, share: torch.Tensor, got: torch.Tensor,
                split: torch.Tensor) -> torch.Tensor:
    """The new tensor of :func:`split_columns` for a finite ``old``, bit for bit :func:`_split_reference`'s (and
    its shares, written into ``got``): a position whose part is the old value itself (the one copy of its
    old position at share 1, which float64 leaves unchanged) is a copy; only the other split positions are
    computed (the remainders on the groups still sharing at each rank), and the result is gathered once
    from ``old`` and the computed parts."""
    size = old.shape[dim]
    plan = next((p for n, i, s, m, d, p in _PLANS
                 if n == size and d == old.dtype and _same(i, idx) and _same(s, share) and _same(m, split)), None)
    if plan is None:
        plan = _plan(size, idx, share, split, old.dtype)
        _PLANS[:] = [(size, idx.clone(), share.clone(), split.clone(), old.dtype, plan), *_PLANS[:3]]
    got.copy_(plan.got)
    pieces = [old]
    if len(plan.direct):  # w·2^-m is exact: apply the shares as asked
        pieces.append(take(old, dim, idx[plan.direct]) * along(old, dim, plan.direct_share))
    rest = gather(old, dim, plan.sources)  # runs of positions as slice copies
    for active, going, r in plan.ranks:
        if going:
            head = rest.narrow(dim, 0, going)
            head = head * along(head, dim, r)  # r in the dtype: one rounding of the exact product
            pieces.append(head)
        if going < active:  # the last part of a group is what is left
            pieces.append(rest.narrow(dim, going, active - going))
        if going:
            rest = rest.narrow(dim, 0, going) - head  # exact: head lies in [rest/2, rest]
    return gather(torch.cat(pieces, dim) if len(pieces) > 1 else old, dim, plan.final)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _plan(size: int, idx: torch.Tensor, share: torch.Tensor, split: torch.Tensor, dtype: torch.dtype) -> _Plan:
    """:func:`_split_fast`'s plan (:class:`_Plan`) for ``dtype``, the groups formed as :func:`_split_reference` does."""
    got = torch.where(split, share, torch.ones_like(share))
    where = torch.nonzero(split).flatten()
    src, sh = idx[where], share[where]
    counts = torch.bincount(src, minlength=size)
    pow2 = (sh > 0) & (torch.frexp(sh).mantissa == 0.5)
    alone = counts[src] == 1
    # A group is "exact" (its shares applied directly) when all its shares are powers of two summing to 1:
    # alone, its share is 1; in larger groups (rare) the sum is taken as the reference takes it, in order.
    all_pow2 = torch.ones(len(counts), dtype=torch.bool).index_put_((src[~pow2],), torch.tensor(False))
    exact = alone & (sh == 1.0)
    several = torch.nonzero(~alone & all_pow2[src]).flatten()
    members: dict[int, list[int]] = defaultdict(list)
    for k, i in zip(several.tolist(), src[several].tolist()):
        members[i].append(k)
    shares = sh.tolist()
    for ks in members.values():
        if sum(shares[k] for k in ks) == 1.0:
            exact[ks] = True
    direct = where[exact & (sh != 1.0)]
    writes = [direct]  # positions of each computed piece, in the order _split_fast appends them
    rest = torch.nonzero(~exact).flatten()
    pos, src, sh = where[rest], src[rest], sh[rest]
    order = torch.argsort(-sh, stable=True)  # within a source: the largest share first, then by position
    order = order[torch.argsort(src[order], stable=True)]
    pos, src, sh = pos[order], src[order], sh[order]
    first = torch.ones(len(src), dtype=torch.bool)
    first[1:] = src[1:] != src[:-1]
    starts = torch.nonzero(first).flatten()
    lens = torch.diff(starts, append=torch.tensor([len(src)]))
    by_len = torch.argsort(-lens, stable=True)
    starts, lens = starts[by_len], lens[by_len]
    left = sh[starts].clone()  # a sum of one or two floats is one rounding in any order; longer ones as torch sums them
    two = lens == 2
    left[two] = sh[starts[two]] + sh[starts[two] + 1]
    for g in torch.nonzero(lens > 2).flatten().tolist():
        a, n = int(starts[g]), int(lens[g])
        left[g] = float(sh[a:a + n].sum())
    kept = torch.ones(len(starts), dtype=torch.float64)
    ranks = []
    for j in range(int(lens[0]) if len(lens) else 0):
        active = int((lens > j).sum())  # groups still sharing: a prefix
        going = int((lens > j + 1).sum())  # of which these continue after rank j
        at = pos[starts[:active] + j]
        s = sh[starts[:active] + j]
        r = torch.ones(active, dtype=torch.float64)
        lv = left[:active]
        r[:going] = torch.where(lv[:going] > 0, (s[:going] / lv[:going].clamp(min=1e-300)).clamp(0.5, 1.0), 1.0
                                ).to(dtype).double()  # in the dtype, still in [1/2, 1]: the share applied
        ranks.append((active, going, r[:going]))
        writes += [at[:going], at[going:]]
        got[at] = kept[:active] * r
        kept, left = (kept[:active] * (1 - r))[:going], (lv - s)[:going]
    final = idx.clone()
    offset = size
    for at in writes:
        final[at] = torch.arange(offset, offset + len(at))
        offset += len(at)
    return _Plan(got, direct, share[direct], src[starts], ranks, final)


def finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN and no infinity (one pass: its smallest and largest values)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def has_nan(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a NaN (one reduction, no mask: its smallest value is NaN then)."""
    return t.numel() > 0 and t.is_floating_point() and math.isnan(float(torch.aminmax(t.detach())[0]))


def take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, idx)`` (``idx ≥ 0``), bit for bit. Along an inner dimension of a CPU float tensor
    through numpy's ``take`` on its bits, several times faster than torch's element-wise gather there."""
    if dim == 0 or t.device.type != "cpu" or not t.is_floating_point() or t.element_size() not in BITS:
        return t.index_select(dim, idx)
    bits = np.take(t.detach().view(BITS[t.element_size()]).numpy(), idx.numpy(), axis=dim)
    return torch.from_numpy(bits).view(t.dtype)


def put(t: torch.Tensor, dim: int, pos: torch.Tensor, values: torch.Tensor) -> None:
    """``t.index_copy_(dim, pos, values)`` (distinct ``pos``, the same dtype), bit for bit; along an inner
    dimension of CPU float tensors as a numpy assignment of their bits (as :func:`take`)."""
    starts = _runs(pos)
    if len(starts) <= RUNS:  # runs of positions (padding, tiles, copied heads): one slice copy each
        for a, b in zip(starts, starts[1:] + [len(pos)]):
            t.narrow(dim, int(pos[a]), b - a).copy_(values.narrow(dim, a, b - a))
        return
    if dim == 0 or t.device.type != "cpu" or not t.is_floating_point() or t.element_size() not in BITS:
        t.index_copy_(dim, pos, values)
        return
    kind = BITS[t.element_size()]
    t.detach().view(kind).numpy()[(slice(None),) * dim + (pos.numpy(),)] = values.detach().view(kind).numpy()


RUNS = 64  # runs of consecutive positions copied as slices; more: one gather or scatter


def _runs(pos: torch.Tensor) -> list[int]:
    """Where each run of consecutive positions (``p, p + 1, …``) of ``pos`` starts."""
    if not len(pos):
        return []
    brk = torch.ones(len(pos), dtype=torch.bool)
    brk[1:] = pos[1:] != pos[:-1] + 1
    return torch.nonzero(brk).flatten().tolist()


def _split_reference(new: torch.Tensor, old: torch.Tensor, dim: int, idx: torch.Tensor, share: torch.Tensor,
                     got: torch.Tensor, split: torch.Tensor) -> None:
    """The split positions of :func:`split_columns`, one group of copies at a time (any values, NaN too)."""
    copies: dict[int, list[int]] = defaultdict(list)
    where = torch.nonzero(split).flatten().tolist()
    for pos, i in zip(where, idx[where].tolist()):
        copies[i].append(pos)
    shares = share.tolist()
    exact = {i: _powers_of_two([shares[p] for p in ps]) for i, ps in copies.items()}
    direct = [p for i, ps in copies.items() if exact[i] for p in ps]
    if direct:  # w·2^-m is exact: apply the shares as asked
        d = torch.tensor(direct)
        new.index_copy_(dim, d, new.index_select(dim, d) * along(new, dim, share[d]))  # shares in the dtype: exact
    rest_groups = [sorted(ps, key=lambda p: (-shares[p], p)) for i, ps in copies.items() if not exact[i]]
    if rest_groups:
        _remainders(new, old, dim, idx, share, got, rest_groups)


def _remainders(new: torch.Tensor, old: torch.Tensor, dim: int, idx: torch.Tensor, share: torch.Tensor,
                got: torch.Tensor, groups: list[list[int]]) -> None:
    """The Sterbenz remainder construction for every group at once (rank by rank), written into ``new``."""
    lens = torch.tensor([len(g) for g in groups])
    width = int(lens.max())
    table = torch.tensor([g + [-1] * (width - len(g)) for g in groups], dtype=torch.long)
    rest = old.index_select(dim, idx[table[:, 0]])
    shares = share.tolist()  # a sum of one or two floats is one rounding in any order; longer ones as torch sums them
    left = torch.tensor([shares[g[0]] + shares[g[1]] if len(g) == 2 else float(share[g].sum()) for g in groups],
                        dtype=torch.float64)
    kept = torch.ones(len(groups), dtype=torch.float64)  # the fraction of the weight still to share out
    for j in range(table.shape[1]):
        active = torch.nonzero(lens > j).flatten()
        pos = table[active, j]
        sh = share[table[:, j].clamp(min=0)]
        last = lens == j + 1
        r = torch.where(left > 0, (sh / left.clamp(min=1e-300)).clamp(0.5, 1.0), torch.ones_like(left)
                        ).to(old.dtype).double()  # in the dtype, as _plan rounds it
        r = torch.where(last, torch.ones_like(r), r)
        if bool(last[active].all()):  # every group still sharing takes all that is left
            part = rest
        else:
            part = rest * along(rest, dim, r)  # r in the dtype: one rounding of the exact product
            if bool(last.any()):
                part = torch.where(along(rest, dim, last).bool(), rest, part)
        new.index_copy_(dim, pos, part if len(active) == len(groups) else part.index_select(dim, active))
        got[pos] = (kept * r)[active]
        if j + 1 < width:
            rest = rest - part  # exact: part lies in [rest/2, rest]
        kept, left = kept * (1 - r), left - sh


BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer type of each float width


def negative_zeros(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a ``-0`` (its bits: the sign bit alone)."""
    kind = BITS[t.element_size()]  # -0's bits are the smallest integer: present iff it is the minimum
    return t.numel() > 0 and int(t.view(kind).amin()) == torch.iinfo(kind).min


def positive_zeros(t: torch.Tensor) -> None:
    """``-0`` → ``+0`` in place, on the bits: what a float64 ``x + 0.0`` does, without the arithmetic."""
    bits = t.view(BITS[t.element_size()])
    bits.masked_fill_(bits == torch.iinfo(bits.dtype).min, 0)


def identity_splits(t: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor,
                     multi: torch.Tensor) -> torch.Tensor:
    """The split positions whose part is the old value itself, bit for bit: an old position copied ``k = 2^a``
    times, every copy at scale 1, has total ``k`` and shares ``2^-a``; its parts are ``fl(fl(w·k)·2^-a)``,
    which is ``w`` whenever ``|w|·k`` stays finite (both products are exact then). Checked on the whole
    tensor's largest magnitude (a NaN or an infinity anywhere: none qualify)."""
    src = idx.clamp(min=0)
    other = torch.zeros(len(counts), dtype=torch.bool)
    other[src[multi & (scale != 1.0)]] = True  # an old position with a copy at another scale
    fits = (counts & (counts - 1)) == 0
    ident = multi & fits[src] & ~other[src]
    if not bool(ident.any()) or t.numel() == 0:
        return ident
    top = float(t.abs().amax()) * float(counts[src[ident]].max())
    return ident if top <= torch.finfo(t.dtype).max else torch.zeros_like(ident)


def share_out(old: torch.Tensor, dim: int, src: torch.Tensor, scale: torch.Tensor, total: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The positions copying old positions ``src`` at ``scale`` (float64), each old position's ``total`` (its
    copies' scales summed) shared out among them exactly in the dtype (:func:`split_columns` of
    ``fl(w·total)``): the parts, the scale each got (float64), and whether the parts of every old position
    sum, in float64, to ``w·total``."""
    hit, slot = torch.unique(src, return_inverse=True)
    cols = gather(old, dim, hit)
    if bool((total[hit] == 1.0).all()) and finite(cols):  # w·1 is w: no float64 round trip
        parts, got = split_columns(cols, dim, slot, scale / total[src], torch.ones(len(src), dtype=torch.bool))
        if _parts_exact(cols, slot, got):
            return parts, got, True
        want = cols.to(torch.float64)
    else:
        want = cols.to(torch.float64)
        want = want * along(want, dim, total[hit])
        parts, got = split_columns(want.to(old.dtype), dim, slot, scale / total[src],
                                   torch.ones(len(src), dtype=torch.bool))
    sums = torch.zeros_like(want).index_add_(dim, slot, parts.to(torch.float64))
    return parts, got * total[src], torch.equal(sums, want)


def _parts_exact(cols: torch.Tensor, slot: torch.Tensor, got: torch.Tensor) -> bool:
    """Whether the parts :func:`split_columns` made of finite ``cols`` sum to them in float64, in any order,
    without a check. Every part of a weight ``w`` has its sign, and the remainder construction takes at most
    ``p`` bits of exponent per part (``p``: the dtype's significand bits; a remainder ``w − fl(w·r)``
    with ``r ∈ [1/2, 1]`` is a multiple of ``ulp(w)/2``), so with ``k`` parts every partial sum is a multiple of
    ``2^(e − k·p)`` below ``2^(e+1)`` (``e``: ``w``'s exponent): exact in float64's 53 bits when ``k·p + 1 ≤ 53``
    (bf16 up to 6 parts, fp16 4, float32 2). Parts ``w·2^-m`` (shares that are all powers of two) are exact
    unless they underflow: no nonzero ``|w|`` below ``2^m`` times the smallest normal."""
    if cols.dtype == torch.float64 or not len(slot):
        return False
    p = 2 - math.frexp(torch.finfo(cols.dtype).eps)[1]  # significand bits: eps = 2^(1 - p) = 0.5 · 2^(2 - p)
    if int(torch.bincount(slot).max()) * p + 1 > 53:
        return False
    pow2 = got[(got < 1) & (torch.frexp(got).mantissa == 0.5)]
    if not len(pow2):
        return True
    a = cols.abs()
    return not bool(((a < torch.finfo(cols.dtype).tiny / float(pow2.min())) & (a > 0)).any())


def gather(old: torch.Tensor, dim: int, idx: torch.Tensor, runs: int = 64) -> torch.Tensor:
    """``old.index_select(dim, idx)`` where ``idx ≥ 0``; positions with ``idx = -1`` are left unset (the caller
    fills them). Runs of consecutive indices (tiles, copied heads; a run of padding counts as one) are copied
    as slices, which is several times faster than a gather along an inner dimension, and along the first
    dimension copies whole blocks of rows; more than ``runs`` runs: ``index_select``."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    pad = idx < 0
    brk = torch.ones(len(idx), dtype=torch.bool)  # a run starts where the index does not go on by one
    brk[1:] = ((idx[1:] != idx[:-1] + 1) & ~(pad[1:] & pad[:-1])) | (pad[1:] != pad[:-1])
    starts = torch.nonzero(brk).flatten().tolist()
    if len(starts) > runs:
        return take(old, dim, idx.clamp(min=0))
    shape = list(old.shape)
    shape[dim] = len(idx)
    new = torch.empty(shape, dtype=old.dtype)
    for a, b in zip(starts, starts[1:] + [len(idx)]):
        if int(idx[a]) >= 0:
            new.narrow(dim, a, b - a).copy_(old.narrow(dim, int(idx[a]), b - a))
    return new


def _powers_of_two(shares: list[float]) -> bool:
    """True when every share is 2^-m (m ≥ 0) and they sum to 1 exactly."""
    return sum(shares) == 1.0 and all(s > 0 and math.frexp(s)[0] == 0.5 for s in shares)


def along(t: torch.Tensor, dim: int, values: torch.Tensor) -> torch.Tensor:
    """``values`` shaped to broadcast along ``dim`` of ``t`` (in ``t``'s dtype)."""
    view = [1] * t.dim()
    view[dim] = -1
    return values.to(t.dtype).view(view)


_POSITIONS: list[tuple] = []  # the last few answers: the slices of one tensor (streaming) share their map's


def map_positions(t: torch.Tensor, m) -> tuple[torch.Tensor, ...]:
    """``m`` (a :class:`growcli.transforms.width_edit.DimMap` of ``t``) as tensors: old index, scale, source,
    copies per old position, split positions, total per old position (shared by calls with the same map
    object and size along its dim: the slices of one tensor; never written in place)."""
    for known, idx, scale, size, answer in _POSITIONS:
        if known is m and idx is m.idx and scale is m.scale and size == t.shape[m.dim]:
            return answer
    answer = _positions_of(t.shape[m.dim], m)
    _POSITIONS[:] = [(m, m.idx, m.scale, t.shape[m.dim], answer), *_POSITIONS[:3]]
    return answer


def _positions_of(size: int, m) -> tuple[torch.Tensor, ...]:
    idx = torch.tensor(m.idx, dtype=torch.long)
    scale = torch.tensor(m.scale, dtype=torch.float64)
    src = idx.clamp(min=0)
    counts = torch.bincount(idx[idx >= 0], minlength=size)
    multi = (idx >= 0) & (counts[src] > 1) if m.split else torch.zeros_like(idx, dtype=torch.bool)
    total = torch.zeros(size, dtype=torch.float64).index_add_(0, src[idx >= 0], scale[idx >= 0])
    total = torch.where((total - 1).abs() <= 1e-12, torch.ones_like(total), total)  # shares summing to 1 (float64 sums)
    return idx, scale, src, counts, multi, total
