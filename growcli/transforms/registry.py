"""The one registry of transforms, shared by CLI commands, YAML plans and the Python API.

A transform is a frozen spec dataclass plus a function ``(model, spec, ctx) -> StepReport``
registered under a name. The function changes the model in place through
``model.edits`` and does no I/O. ``exact(spec)`` says whether the step promises to keep
the function; the pipeline verifies that promise after the step.

This module holds the data structures; :mod:`growcli.transforms.catalog` imports the built-in
transforms and looks them up (so no transform module imports the catalog).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from growcli.core.model import GrowModel


@dataclass
class Context:
    """Per-run settings a transform may use: the seed (all randomness derives from it), and data
    the runner loaded for the steps (calibration batches by request, see growcli.analysis.calibration)."""

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
    # The step's weights are exact in their stored dtype (splits and tiles sum bit for bit), so it is held to
    # float64-level tolerances (growcli.verification.compare.exact_tolerance); None: the step does not say.
    exact_in_dtype: bool | None = None

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
    # How a step may be executed: "memory" (the model loaded and changed in place) and/or
    # "streaming" (the checkpoint rewritten tensor by tensor, never loaded whole).
    modes: tuple[str, ...] = ("memory",)


REGISTRY: dict[str, Transform] = {}


def option(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A spec field with its help text, declared once for the CLI, the plan schema and the docs::

        to: int | None = option(None, "New number of units/channels.")
    """
    return field(default=default, metadata={"help": help})


def option_help(spec: type, name: str) -> str:
    """The help text of option ``name`` of a spec dataclass (what ``--help`` and the plan reference show)."""
    for f in dataclasses.fields(spec):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(f"{spec.__name__} has no option {name!r}")


def register(name: str, spec: type, *, exact: bool | Callable[[Any], bool] = True, help: str = "",
             candidates: Callable[[GrowModel], dict[str, str | None]] | None = None,
             modes: tuple[str, ...] = ("memory",)):
    """Decorator: ``@register("widen", WidenSpec, exact=lambda s: s.noise == 0)``."""
    exact_fn = exact if callable(exact) else (lambda _spec, _v=exact: _v)

    def deco(fn):
        REGISTRY[name] = Transform(name, spec, fn, exact_fn, help or (fn.__doc__ or "").strip().split("\n")[0], candidates,
                                   tuple(modes))
        return fn

    return deco


def type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(type_ok(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))
