"""Rewritten tensors of a streamed width step (:mod:`growcli.run.width_stream`) computed ahead of the writer.

The writer asks each rewritten tensor for its bytes in the order it writes them; a worker thread
computes the next ones meanwhile, so reading and computing overlap the writes and the byte copies of
unchanged tensors. Every tensor is computed by its own ``compute()`` from its own generator state, so
the order of computation does not change a bit of the output.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch


AHEAD_BYTES = 1 << 27  # rewritten output the worker may hold ready beyond the next tensor (small ones queue up)


class Ahead:
    """Rewritten tensors computed ahead of the writer, on a worker thread: while one is written (or the byte
    copies around it), the next ones are computed — at least one, more while their outputs stay within
    :data:`AHEAD_BYTES` — each thread running torch on one thread (no intra-op pool waiting on a core another
    process holds). Memory: the tensor written, the next one, and at most ``AHEAD_BYTES`` more."""

    def __init__(self, order: list):  # of width_stream._Computed and RowGather, in the order the writer takes them
        self.order = order
        self.at = {id(a): i for i, a in enumerate(order)}
        self.next = 0  # the first item of ``order`` not yet started
        self.pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))
        self.pending: dict[int, tuple[Future, int]] = {}
        for item in order:
            item.ahead = self
        self._start(-1)

    def _start(self, taken: int) -> None:
        """Start the items after ``order[taken]``: the next one always, more while within the byte budget."""
        self.next = max(self.next, taken + 1)
        queued = sum(n for _, n in self.pending.values())
        while self.next < len(self.order):
            item = self.order[self.next]
            size = item.nbytes
            if self.next > taken + 1 and queued + size > AHEAD_BYTES:
                break
            self.pending[id(item)] = (self.pool.submit(item.compute), size)
            queued += size
            self.next += 1

    def take(self, item) -> list[tuple[torch.Tensor, str]]:
        """``item``'s runs: the worker's (computed while the tensors before it were written), else computed now;
        the tensors written after it are started on the worker first."""
        done = self.pending.pop(id(item), None)
        self._start(self.at.get(id(item), self.next - 1))
        return done[0].result() if done is not None else item.compute()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
