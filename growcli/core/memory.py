"""Giving freed memory back to the system (glibc), so a run's peak is what it holds, not what it once held."""

from __future__ import annotations

import ctypes
import sys

_LIBC: ctypes.CDLL | None | bool = None


def trim() -> None:
    """Return the allocator's free memory to the system (``malloc_trim(0)``: free pages anywhere in the heap,
    not only at its top). A no-op where the C library has no such call."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform == "linux" else False
            _LIBC.malloc_trim  # noqa: B018 (present?)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
