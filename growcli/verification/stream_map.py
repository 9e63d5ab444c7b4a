"""The map between two models' residual streams, for comparing them at every block boundary.

Boundary ``0`` is the stream entering the first block (what the embeddings wrote), boundary
``j`` the stream leaving block ``j - 1``. :class:`StreamMap` says, for each boundary of the
grown model, which boundary of the original it equals (``depth``), and, along the hidden axis,
which original entry each grown entry holds (``hidden``; ``-1``: an entry with nothing to
compare, such as hidden growth's padding).

- Same depth: boundary ``j`` equals boundary ``j`` (also between a dense model and its upcycled
  mixture of experts, whose blocks compute the same function of the stream).
- Stacked with identity copies (:func:`stacked`): a copy that starts as the identity leaves
  the stream as it found it, so its boundary equals the previous one; an original block's
  boundary is the original's boundary after that block. With ``copy`` init the same map holds
  for the originals' positions and the copies' boundaries differ: that difference is the
  measured divergence.
- Hidden growth (:func:`tiling`): the stream ``x`` of width ``d`` becomes ``[x, …, x, p]`` of
  width ``k·d + r``; entry ``t·d + i`` holds ``x[i]``, the ``r`` padded entries are ``-1``.
  Several hidden steps (:func:`compose_tilings`): each tiles the stream the one before wrote,
  padding included (32 → 48 → 96 is ``[x, p, x, p]``, not the tiling of 32 into 96).

``source`` says where a map came from: ``"recorded"`` (built from the growth steps: the grown
directory's ``growth_report.json`` or the plan being written) or ``"inferred"`` (by depth, or
the hidden axis by width because the steps do not say; ``note`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

from growcli.core.errors import NotGrowableError


@dataclass(frozen=True)
class StreamMap:
    """``depth[j]``: the original boundary grown boundary ``j`` equals; ``hidden``: ``None`` = by width.

    ``source``: ``"recorded"`` or ``"inferred"``; ``note``: what was inferred and why.
    """

    depth: tuple[int, ...]
    hidden: tuple[int, ...] | None = None
    source: str = "recorded"
    note: str = ""

    def hidden_index(self, grown_width: int, original_width: int) -> tuple[int, ...]:
        """The hidden map for these widths: the given one (checked), else identity or growcli's tiling."""
        if self.hidden is not None:
            if len(self.hidden) != grown_width or any(not -1 <= i < original_width for i in self.hidden):
                raise NotGrowableError(f"block-wise verification: the hidden map has {len(self.hidden)} entries into "
                                       f"0..{original_width - 1}; the streams are {grown_width} and {original_width} "
                                       "wide")
            return self.hidden
        if grown_width < original_width:
            raise NotGrowableError(f"block-wise verification: the grown stream ({grown_width} wide) is narrower than "
                                   f"the original's ({original_width}); no map between them is known")
        return tiling(original_width, grown_width)

    def check(self, grown_blocks: int, original_blocks: int) -> None:
        """Refuse a depth map that does not fit the two stacks."""
        if len(self.depth) != grown_blocks + 1 or self.depth[0] != 0 or any(
                not 0 <= b <= original_blocks for b in self.depth) or self.depth[-1] != original_blocks:
            raise NotGrowableError(f"block-wise verification: the depth map {list(self.depth)} does not map the "
                                   f"{grown_blocks + 1} boundaries of the grown stack onto the {original_blocks + 1} "
                                   "of the original's, first to first and last to last")


def identity(blocks: int) -> StreamMap:
    return StreamMap(tuple(range(blocks + 1)))


def stacked(order: list[int], copies: list[int]) -> StreamMap:
    """The map after stacking: ``order[p]`` is new position ``p``'s source block, ``copies`` the new copies."""
    depth = [0]
    new = set(copies)
    for p, source in enumerate(order):
        depth.append(depth[-1] if p in new else source + 1)
    return StreamMap(tuple(depth))


def compose(first: StreamMap, then: StreamMap) -> StreamMap:
    """Two growth steps' depth maps as one (``then`` maps the result of ``first``); hidden by width."""
    inferred = [m for m in (first, then) if m.source == "inferred"]
    return StreamMap(tuple(first.depth[b] for b in then.depth), source="inferred" if inferred else "recorded",
                     note="; ".join(m.note for m in inferred if m.note))


def tiling(width: int, grown: int) -> tuple[int, ...]:
    """``[x, …, x, p]``: ``grown // width`` whole tiles of the ``width`` entries, then padding (``-1``)."""
    tiles = grown // width
    return tuple(i for _ in range(tiles) for i in range(width)) + (-1,) * (grown - tiles * width)


def compose_tilings(widths: list[tuple[int, int]]) -> tuple[int, ...]:
    """The hidden map after hidden steps growing the stream ``before → after``, in order: each tiles what the one
    before wrote (:func:`tiling`), so a padded entry stays padding (``-1``) in every tile it is copied into.

    Raises :class:`NotGrowableError` without steps or when a step does not start at the width the one before left.
    """
    if not widths:
        raise NotGrowableError("block-wise verification: no hidden steps to compose")
    hidden = tuple(range(widths[0][0]))
    for k, (before, after) in enumerate(widths, 1):
        if before != len(hidden) or after < before:
            raise NotGrowableError(f"block-wise verification: hidden step {k} grows the stream {before} → {after}, "
                                   f"but the steps before it leave it {len(hidden)} wide")
        hidden = tuple(hidden[i] if i >= 0 else -1 for i in tiling(before, after))
    return hidden
