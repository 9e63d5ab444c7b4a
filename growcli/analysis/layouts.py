"""Positions along a grown dimension: a :class:`Layout` maps the channel list ``g`` (new index →
source channel) to position keys.

``Core`` is the grown channels themselves, ``Fixed`` positions that do not grow, ``Cat`` a
concatenation of parts (offsets) and ``Merge`` a dimension flattened together with others
(``C×H×W`` into features: each channel owns ``H·W`` columns). The coupled-channel analysis
(:mod:`growcli.analysis.coupling`) describes every use of the channels with one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

Key = tuple


class Layout:
    """Positions along one tensor dimension as a function of the channel list ``g``."""

    def keys(self, g: Sequence[int]) -> list[Key]:
        raise NotImplementedError


class Core(Layout):
    def keys(self, g):
        return [(j, ()) for j in range(len(g))]


@dataclass
class Fixed(Layout):
    size: int
    uid: str

    def keys(self, g):
        return [(-1, (self.uid, i)) for i in range(self.size)]


@dataclass
class Cat(Layout):
    parts: list[Layout]

    def keys(self, g):
        return [(c, sub + (i,)) for i, p in enumerate(self.parts) for c, sub in p.keys(g)]


@dataclass
class Merge(Layout):
    """``before`` outer positions × the inner layout × ``after`` inner positions, row-major."""

    inner: Layout
    before: int
    after: int

    def keys(self, g):
        inner = self.inner.keys(g)
        return [(c, sub + (b, a)) for b in range(self.before) for c, sub in inner for a in range(self.after)]


CORE = Core()
