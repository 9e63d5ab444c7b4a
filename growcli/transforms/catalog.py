"""The catalog: every built-in transform, imported and registered, and lookup by name.

Transform modules register themselves with :func:`growcli.transforms.registry.register` on import;
importing this module imports all of them. Lookups and option checks go through here.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from growcli.core.errors import UsageError
from growcli.transforms import (branch, column, deepen, heads, hidden, nest, prune, stack,  # noqa: F401
                                upcycle, vocab, widen)  # (each registers itself)
from growcli.transforms.registry import REGISTRY, Transform, type_name, type_ok


def get_transform(name: str) -> Transform:
    if name not in REGISTRY:
        near = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(sorted(REGISTRY))}"
        raise UsageError(f"unknown transform {name!r}{hint}")
    return REGISTRY[name]


def all_transforms() -> dict[str, Transform]:
    return dict(REGISTRY)


def spec_problems(name: str, options: dict[str, Any]) -> list[tuple[str | None, str]]:
    """Every problem with ``options`` for transform ``name``, as ``(option, message)`` pairs."""
    t = get_transform(name)
    fields = {f.name: f for f in dataclasses.fields(t.spec)}
    hints = typing.get_type_hints(t.spec)
    problems: list[tuple[str | None, str]] = []
    for key, value in options.items():
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; expected one of {', '.join(fields)}"
            problems.append((key, f"unknown option {key!r} for {name}{hint}"))
        elif not type_ok(value, hints[key]):
            problems.append((key, f"option {key!r} of {name} expects {type_name(hints[key])}, got {value!r}"))
    for f in fields.values():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in options:
            problems.append((None, f"{name} needs option {f.name!r}"))
    if not problems:
        try:
            t.spec(**options)
        except (ValueError, UsageError) as exc:
            problems.append((None, f"{name}: {exc}"))
    return problems


def build_spec(name: str, options: dict[str, Any]):
    """A validated spec instance for ``name``, or :class:`UsageError` listing every problem."""
    problems = spec_problems(name, options)
    if problems:
        raise UsageError("; ".join(msg for _, msg in problems))
    return get_transform(name).spec(**options)
