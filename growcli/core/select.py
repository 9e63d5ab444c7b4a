"""Select modules by name, the way users write them on the command line and in plans.

A selector is a string or a list of strings. Each string matches a candidate name when it is
the name itself, a dotted suffix of it (``fc1`` matches ``model.fc1``), a shell-style glob
(``layer1.*.conv1``) or a full regular-expression match. A string that is some candidate's full
name selects exactly that candidate: ``conv1`` on a ResNet is the stem's ``conv1``, not also
every ``layerN.M.conv1`` (write ``*.conv1`` for those). When nothing matches, the error repeats
what was asked for and lists near misses.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Iterable, Sequence

from growcli.core.errors import NoMatchingModuleError


def _matches(pattern: str, name: str, exact: frozenset[str] = frozenset()) -> bool:
    """Whether ``pattern`` selects ``name``; a pattern in ``exact`` (some candidate's full name) is that name only."""
    if pattern == name:
        return True
    if pattern in exact:
        return False
    if name.endswith("." + pattern):
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
    exact = frozenset(patterns) & frozenset(names)  # a full name wins over suffixes, globs and regexes
    chosen = [n for n in names if any(_matches(p, n, exact) for p in patterns)]
    if not chosen:
        near = []
        for p in patterns:
            near += difflib.get_close_matches(p, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(dict.fromkeys(near))}?" if near else \
            f"; candidates: {', '.join(names[:8])}{' …' if len(names) > 8 else ''}"
        raise NoMatchingModuleError(f"{what} {', '.join(map(repr, patterns))} matches nothing{hint}")
    return chosen
