"""Select modules by name, the way users write them on the command line and in plans.

A selector is a string or a list of strings. Each string matches a candidate name when it is
the name itself, a dotted suffix of it (``fc1`` matches ``model.fc1``), a shell-style glob
(``layer1.*.conv1``) or a full regular-expression match. When nothing matches, the error
repeats what was asked for and lists near misses.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Iterable, Sequence

from growcli.core.errors import NoMatchingModuleError


def _matches(pattern: str, name: str) -> bool:
    if pattern == name or name.endswith("." + pattern):
        return True
    if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def select(selector: str | Sequence[str], candidates: Iterable[str], what: str = "layer") -> list[str]:
    """Candidates matched by ``selector``, in model order; :class:`NoMatchingModuleError` if none."""
    patterns = [selector] if isinstance(selector, str) else list(selector)
    names = list(candidates)
    chosen = [n for n in names if any(_matches(p, n) for p in patterns)]
    if not chosen:
        near = []
        for p in patterns:
            near += difflib.get_close_matches(p, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(dict.fromkeys(near))}?" if near else \
            f"; candidates: {', '.join(names[:8])}{' …' if len(names) > 8 else ''}"
        raise NoMatchingModuleError(f"{what} {', '.join(map(repr, patterns))} matches nothing{hint}")
    return chosen
