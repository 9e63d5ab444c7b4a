"""The one registry of transforms, shared by CLI commands and YAML plans.

A transform is a frozen spec dataclass plus a function ``(model, spec, ctx) -> StepReport``
registered under a name. The function changes the model in place through
``model.edits`` and does no I/O. ``exact(spec)`` says whether the step promises to keep
the function; the pipeline verifies that promise after the step.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from growcli.errors import UsageError
from growcli.model import GrowModel


@dataclass
class Context:
    """Per-run settings a transform may use: the seed (all randomness derives from it), and data
    the runner loaded for the steps (calibration batches by request, see growcli.calibration)."""

    seed: int = 0
    data: dict[Any, Any] = field(default_factory=dict)

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)


@dataclass
class StepReport:
    transform: str
    spec: dict[str, Any]
    matched: list[str] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)  # {"name", "before", "after"}
    params_before: int = 0
    params_after: int = 0
    exact: bool = True
    notes: list[str] = field(default_factory=list)
    verification: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Transform:
    name: str
    spec: type
    apply: Callable[[GrowModel, Any, Context], StepReport]
    exact: Callable[[Any], bool]
    help: str
    candidates: Callable[[GrowModel], dict[str, str | None]] | None = None


REGISTRY: dict[str, Transform] = {}


def register(name: str, spec: type, *, exact: bool | Callable[[Any], bool] = True, help: str = "",
             candidates: Callable[[GrowModel], dict[str, str | None]] | None = None):
    """Decorator: ``@register("widen", WidenSpec, exact=lambda s: s.noise == 0)``."""
    exact_fn = exact if callable(exact) else (lambda _spec, _v=exact: _v)

    def deco(fn):
        REGISTRY[name] = Transform(name, spec, fn, exact_fn, help or (fn.__doc__ or "").strip().split("\n")[0], candidates)
        return fn

    return deco


def get_transform(name: str) -> Transform:
    _load_builtin()
    if name not in REGISTRY:
        near = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(sorted(REGISTRY))}"
        raise UsageError(f"unknown transform {name!r}{hint}")
    return REGISTRY[name]


def all_transforms() -> dict[str, Transform]:
    _load_builtin()
    return dict(REGISTRY)


def _load_builtin() -> None:
    import growcli.transforms  # noqa: F401  (registers the built-in transforms)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


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
        elif not _type_ok(value, hints[key]):
            problems.append((key, f"option {key!r} of {name} expects {_type_name(hints[key])}, got {value!r}"))
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


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))
