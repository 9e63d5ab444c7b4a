"""Giving freed memory back to the system (glibc), so a run's peak is what it holds, not what it once held."""

from __future__ import annotations

import ctypes
import sys

_LIBC: ctypes.CDLL | None | bool = None


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
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, nbytes)


def trim() -> None:
    """Return the allocator's free memory to the system (``malloc_trim(0)``: free pages anywhere in the heap,
    not only at its top). A no-op where the C library has no such call."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
