"""Sizes in bytes as users write them: ``2000000``, ``"500MB"``, ``"2GiB"``."""

from __future__ import annotations

import re
from typing import Any

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from ``2000000``, ``"500MB"`` or ``"2GiB"`` (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024).

    Raises :class:`ValueError` naming the value; callers add the option it came from.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value) if isinstance(value, str) else None
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"expected a size like 2GB, 500MB or a number of bytes, got {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"expected a positive size, got {value!r}")
    return size
