"""A streamed tensor that gathers another's rows (:attr:`growcli.transforms.width_edit.Rewrite.rows`), written
mostly as byte copies.

A producer widened by copying units (FFN ``widen``: the up and gate projections) keeps its old
rows in order and appends copies of some of them: the result is, bit for bit, the stored tensor's
rows at the planned indices. Every run of consecutive rows of at least :data:`MIN_COPY` bytes is
a kernel-side copy of the input's bytes (:func:`growcli.io.shards.copy_range`); the rows between
them are read from disk and written as one computed piece (:class:`RowGather`), computed ahead
of the writer like any rewritten tensor (:mod:`growcli.run.width_ahead`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from growcli.io.shards import ITEMSIZE, TensorRef
from growcli.verification.chunked import runs_of
from growcli.verification.ondisk import read_rows

MIN_COPY = 64 << 10  # bytes: shorter runs of rows are gathered in memory (a kernel copy of 4 KB ran at 0.9 GB/s)
RUNS = 64  # more runs than this among the gathered rows: the whole tensor is read once instead of run by run


def row_pieces(ref: TensorRef, rows: tuple[int, ...]) -> list:
    """The pieces of the tensor made of ``ref``'s rows ``rows``, in order: byte ranges of ``ref`` for long runs,
    :class:`RowGather` pieces for the rows between them."""
    row = math.prod(ref.shape[1:]) * ITEMSIZE[ref.dtype]
    pieces: list = []
    short: list[int] = []
    for a, n in runs_of(rows):
        if n * row < MIN_COPY:
            short += range(a, a + n)
            continue
        if short:
            pieces.append(RowGather(ref, tuple(short)))
            short = []
        pieces.append(TensorRef(ref.file, ref.dtype, (n, *ref.shape[1:]), ref.start + a * row, n * row))
    if short:
        pieces.append(RowGather(ref, tuple(short)))
    return pieces


@dataclass
class RowGather:
    """Rows ``rows`` of the stored tensor ``ref``, read when written (on :class:`~growcli.run.width_ahead.Ahead`'s
    worker when the writer has one): bit for bit ``tensor.index_select(0, rows)``."""

    ref: TensorRef
    rows: tuple[int, ...]
    ahead: Any = None  # set by the writer

    @property
    def nbytes(self) -> int:
        return len(self.rows) * math.prod(self.ref.shape[1:]) * ITEMSIZE[self.ref.dtype]

    def __call__(self) -> torch.Tensor:  # as every computed piece (a chain's later step reads it so)
        return self.compute()[0][0]

    def parts(self) -> Iterator[torch.Tensor]:
        for piece, _ in self.ahead.take(self) if self.ahead is not None else self.compute():
            yield piece

    def compute(self) -> list[tuple[torch.Tensor, str]]:
        """The rows, read run by run (past :data:`RUNS` runs, the whole tensor read once), with "" (exact)."""
        runs = runs_of(self.rows)
        if len(runs) > RUNS:
            return [(read_rows(self.ref, 0, self.ref.shape[0]).index_select(0, torch.tensor(self.rows)), "")]
        got = [read_rows(self.ref, a, a + n) for a, n in runs]
        return [(got[0] if len(got) == 1 else torch.cat(got), "")]

