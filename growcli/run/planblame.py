"""Which option an error message is about: a line and column for errors that come without one.

Transforms explain a bad step in words ("fc1 has 48 units; the new size 40 is not larger"); a
plan's problems point at a place in the file. :func:`blame` bridges the two.
"""

from __future__ import annotations

import re
from typing import Any


def blame(message: str, options: dict[str, Any]) -> str | None:
    """The option an error message is most likely about, or ``None``.

    Transforms report errors in words; this finds which option to point at: one named
    as a flag (``--to``) first, then one whose value the message quotes, then one named
    as a word. Among equals the one mentioned last wins, since messages name the subject
    first and the offending value after it ("fc1 has 48 units; the new size 40 is not
    larger"). Used to put a line and column on errors that come without an option.
    """
    best, best_rank = None, (0, -1)
    for key, value in options.items():
        flag = key.replace("_", "-")
        found = [(3, re.search(rf"--{re.escape(flag)}\b", message)), (2, _value_match(message, value)),
                 (1, re.search(rf"(?<![\w-]){re.escape(key)}\b", message))]
        rank = next(((score, m.start()) for score, m in found if m is not None), (0, -1))
        if rank > best_rank:
            best, best_rank = key, rank
    return best


def _value_match(message: str, value: Any) -> re.Match | None:
    if isinstance(value, (list, tuple)):
        return next((m for m in (_value_match(message, v) for v in value) if m is not None), None)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        return re.search(re.escape(value), message) if len(value) >= 2 else None
    if isinstance(value, (int, float)):
        return re.search(rf"(?<![\w.]){re.escape(str(value))}(?![\w.])", message)
    return None
