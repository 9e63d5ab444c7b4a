"""Giving freed memory back to the system (glibc), so a run's peak is what it holds, not what it once held."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Iterator

_LIBC: ctypes.CDLL | None | bool = None
_FIXED = False  # fix_map_threshold ran: the process's allocator settings are growcli's to change
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_TRIM, _DEFAULT_MMAP_MAX = 128 << 10, 65536  # glibc's defaults


def _libc() -> ctypes.CDLL | None:
    """glibc, loaded once; None elsewhere (another C library, another system)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform == "linux" else False
            _LIBC.malloc_trim  # noqa: B018 (present?)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def fix_map_threshold(nbytes: int) -> None:
    """Allocations from ``nbytes`` up become memory maps of their own, returned when freed (``mallopt``
    ``M_MMAP_THRESHOLD``; a fixed value also stops glibc raising it after each large free)."""
    global _FIXED
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)
        _FIXED = True


@contextlib.contextmanager
def reuse_freed() -> Iterator[None]:
    """Inside, freed memory stays with the allocator and is reused (no memory maps of their own, no
    trimming of the heap's top); on leaving, the settings :func:`fix_map_threshold` made come back and
    the free memory is returned (:func:`trim`).

    For a loop that allocates and frees tensors of the same few sizes (the streamed writer): on
    this virtual machine a page touched for the first time costs several times more than one reused,
    and glibc maps every allocation of 32 MB or more on its own and unmaps it when freed, so each
    such tensor faulted in fresh pages (1.1B heads ×2 writing 1.5-1.8 s, 1.0-1.1 s reusing). Only
    where growcli owns the allocator's settings (the CLI: :func:`fix_map_threshold`); a no-op
    elsewhere, so a program that imports growcli keeps its own.
    """
    libc = _libc() if _FIXED else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        trim()


def trim() -> None:
    """Return the allocator's free memory to the system (``malloc_trim(0)``: free pages anywhere in the heap,
    not only at its top). A no-op where the C library has no such call."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
