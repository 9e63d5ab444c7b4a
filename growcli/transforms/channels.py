"""The channel map of Net2WiderNet: which source channel each new channel copies, and the shares of
the outgoing weights (:mod:`growcli.transforms.widen`), and where a map puts each position of a tensor.
Channels a LayerNorm or GroupNorm normalises over grow by whole copies (:func:`copy_groups`,
:mod:`growcli.analysis.norms`).
"""

from __future__ import annotations

import math

import torch

from growcli.analysis.coupled_group import Group
from growcli.analysis.layouts import Core, Layout
from growcli.core.errors import NotGrowableError


def channel_map(size: int, new_size: int, groups: int, gen: torch.Generator, whole: bool = False) -> list[int]:
    """``g``: new index → source channel. Old channels keep their place within their group;
    each group gets the same number of new channels, copied from random channels of that group.

    With ``whole`` every channel of a group is copied the same number of times (``new_size`` a whole multiple
    of ``size``): the new channels of a group are its channels repeated, in a random order — what a norm over
    the channels needs to keep its statistics (:func:`copy_groups`)."""
    if size % groups or new_size % groups:
        raise NotGrowableError(f"a grouped convolution splits these channels into {groups} groups; "
                               f"the new size must be a multiple of {groups}")
    per_old, per_new = size // groups, new_size // groups
    if whole and per_new % per_old:
        raise NotGrowableError(f"whole copies of {size} channels need a multiple of {size}, not {new_size}")
    g: list[int] = []
    for k in range(groups):
        base = k * per_old
        g += range(base, base + per_old)
        if whole:
            extra = torch.arange(per_old).repeat(per_new // per_old - 1)
            g += (extra[torch.randperm(len(extra), generator=gen)] + base).tolist()
        else:
            g += (torch.randint(0, per_old, (per_new - per_old,), generator=gen) + base).tolist()
    return g


def copy_groups(group: Group, new_size: int, init: str) -> int:
    """The number of blocks :func:`channel_map` keeps copies in for ``group``: its grouped convolutions' groups,
    and with norms over the channels (:attr:`Group.norms`) the least common multiple with every GroupNorm's groups
    (a block lies inside one group of each, so each GroupNorm group of the grown model holds the copies of one
    original group). Raises :class:`NotGrowableError`, naming the norm, when it cannot keep its statistics: a new
    size that is not a whole multiple, or init zero (new channels that are not copies)."""
    if not group.norms:
        return group.groups
    norm, size = group.norms[0], group.size
    where = f"'{group.layer}': {norm.describe()} normalises over the grown channels"
    if norm.groups > 1:
        where += f" in {norm.groups} groups"
    if init == "zero":
        raise NotGrowableError(f"{where}: init zero gives the new channels random incoming weights, which changes "
                               "its statistics; use init net2net (whole copies keep them)")
    if new_size % size:
        raise NotGrowableError(f"{where}: grow them by a whole factor ({size} → {2 * size}, {3 * size}, …), "
                               f"not to {new_size}")
    return math.lcm(group.groups, *(n.groups for n in group.norms))


def split_factors(g: list[int], size: int, mode: str, init: str, gen: torch.Generator) -> torch.Tensor:
    """The share of the source's outgoing weight each new unit gets; shares of a source sum to 1."""
    if init == "zero":
        return (~new_units(g)).to(torch.float64)
    counts = torch.bincount(torch.tensor(g), minlength=size).to(torch.float64)
    if mode == "uniform":
        return 1.0 / counts[torch.tensor(g)]
    weights = torch.rand(len(g), generator=gen, dtype=torch.float64) + 0.5  # in [0.5, 1.5)
    totals = torch.zeros(size, dtype=torch.float64).index_add_(0, torch.tensor(g), weights)
    return weights / totals[torch.tensor(g)]


def new_units(g: list[int]) -> torch.Tensor:
    """True for every unit that is a copy (an earlier unit has the same source)."""
    seen: set[int] = set()
    return torch.tensor([(src in seen) or seen.add(src) or False for src in g], dtype=torch.bool)


_REMAPS: list[tuple] = []  # the last few answers: the slices of a tensor written in pieces (streaming) map once


def remap(layout: Layout, g: list[int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Old position of each new position along a dimension, and its channel (-1: not a channel); the
    tensors are shared by calls with the same layout and channel list (never written in place)."""
    for lay, known, n, idx, chan in _REMAPS:
        if lay is layout and n == size and known == g:
            return idx, chan
    if type(layout) is Core:  # the channels themselves: new position c copies old position g[c]
        idx_t, chan_t = torch.tensor(g, dtype=torch.long), torch.arange(len(g))
    else:
        old = {k: i for i, k in enumerate(layout.keys(list(range(size))))}
        idx, chan = [], []
        for c, sub in layout.keys(g):
            idx.append(old[(g[c], sub)] if c >= 0 else old[(c, sub)])
            chan.append(c)
        idx_t, chan_t = torch.tensor(idx), torch.tensor(chan)
    _REMAPS[:] = [(layout, list(g), size, idx_t, chan_t), *_REMAPS[:3]]
    return _REMAPS[0][3], _REMAPS[0][4]
