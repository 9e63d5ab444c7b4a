"""The moves a search may make from a model: (transform, target, size) triples, each one exact growth step.

Targets come from each registered transform's own ``candidates(gm)`` (the layers, blocks or
stacks it can grow here, read from the model's trace by the transform), never from module
names. A transform contributes the candidates it reports as applicable (``None``), combined
with its size choices:

- ``widen``: the layer, ×1.25, ×1.5 or ×2 units (Net2WiderNet copies and split outgoing weights);
- ``deepen``: an identity layer after the layer, or a zeroed copy of a residual block (``--block``);
- ``hidden``: the hidden size ×2; ``stack``: the block stack ×2 with identity init;
  ``heads``: every attention's heads ×2; ``branch`` (path-level, Cai et al. 2018): two branches
  merged by ``add`` or by ``concat``;
- any other registered transform with a ``candidates`` function: its candidate passed to the
  spec's first required option, with every other option at its default.

Only steps whose spec promises exactness are moves (``Transform.exact``), so every child starts
computing its parent's function, which the step's verification then measures.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from growcli.core.errors import GrowError, NotGrowableError
from growcli.core.model import GrowModel
from growcli.core.select import select
from growcli.transforms.catalog import all_transforms, build_spec

BLOCK_MARK = " (--block)"
# transform → (the option the candidate goes to, [(size label, options)]); other transforms: see target_option.
CHOICES: dict[str, tuple[str | None, list[tuple[str, dict[str, Any]]]]] = {
    "widen": ("layer", [("x1.25", {"factor": 1.25}), ("x1.5", {"factor": 1.5}), ("x2", {"factor": 2.0})]),
    "deepen": ("after", [("identity", {})]),
    "hidden": ("start", [("x2", {"factor": 2.0})]),
    "stack": ("blocks", [("x2 identity", {"factor": 2, "init": "identity"})]),
    "heads": (None, [("x2", {"factor": 2.0})]),
    "branch": ("layer", [("add x2", {"merge": "add", "branches": 2}), ("concat x2", {"merge": "concat", "branches": 2})]),
}
DEFAULT_CHOICE = [("default", {})]
# What a search grows unless told otherwise: the transforms that add trainable capacity (path-level
# branching and sparse upcycling included once registered). Others (vocab, prune, column: new tokens
# nothing uses, smaller models, frozen columns) are for their own workflows; name them to use them.
DEFAULT_TRANSFORMS = ("widen", "deepen", "hidden", "heads", "stack", "branch", "upcycle")


@dataclass(frozen=True)
class Move:
    """One growth step the search can take: ``transform`` on ``target`` with size ``choice``."""

    transform: str
    target: str
    choice: str
    options: tuple[tuple[str, Any], ...]  # the step's options, sorted (hashable)

    @property
    def step(self) -> dict[str, Any]:
        return {"transform": self.transform, "options": dict(self.options)}

    def label(self) -> str:
        return f"{self.transform} {self.target} {self.choice}".replace(" default", "")

    def to_dict(self) -> dict[str, Any]:
        return {"transform": self.transform, "target": self.target, "choice": self.choice, "options": dict(self.options)}


@dataclass
class Moves:
    """Every move from one model, and why each transform (or target) offers none."""

    moves: list[Move]
    skipped: dict[str, str]  # transform or "transform target" → reason

    def by_transform(self) -> dict[str, list[Move]]:
        out: dict[str, list[Move]] = {}
        for m in self.moves:
            out.setdefault(m.transform, []).append(m)
        return out


def target_option(spec: type) -> str | None:
    """The option a candidate goes to for a transform without an entry in :data:`CHOICES`: its first required field."""
    for f in dataclasses.fields(spec):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            return f.name
    return None


def default_transforms() -> list[str]:
    registry = all_transforms()
    return sorted(t for t in DEFAULT_TRANSFORMS if t in registry)


def exact_selector(name: str, names: list[str]) -> str:
    """``name`` itself when it selects only itself among ``names``, else an escaped regex that does."""
    try:
        if select(name, names) == [name]:
            return name
    except GrowError:
        pass
    return re.escape(name)


def enumerate_moves(gm: GrowModel, transforms: list[str] | None = None) -> Moves:
    """Every exact move from ``gm`` by ``transforms`` (default: the registered ones of :data:`DEFAULT_TRANSFORMS`)."""
    registry = all_transforms()
    moves: list[Move] = []
    skipped: dict[str, str] = {}
    for name in transforms or default_transforms():
        t = registry[name]
        if t.candidates is None:
            skipped[name] = "the transform has no candidates function"
            continue
        try:
            found = t.candidates(gm)
        except GrowError as exc:
            skipped[name] = str(exc)
            continue
        option, choices = CHOICES.get(name, (target_option(t.spec), DEFAULT_CHOICE))
        names = [k.removesuffix(BLOCK_MARK) for k in found]
        usable = [k for k, why in found.items() if why is None]
        for key, why in found.items():
            if why is not None:
                skipped[f"{name} {key}"] = why
        if option is None and usable:  # the transform grows every site at once
            usable = ["(all)"]
        for key in usable:
            base: dict[str, Any] = {}
            if option is not None:
                base[option] = exact_selector(key.removesuffix(BLOCK_MARK), names)
            if key.endswith(BLOCK_MARK):
                base["block"] = True
            for label, extra in choices:
                options = {**base, **extra}
                try:
                    spec = build_spec(name, options)
                except GrowError as exc:
                    skipped[f"{name} {key}"] = str(exc)
                    continue
                if not t.exact(spec):
                    skipped[f"{name} {key}"] = "not function-preserving with these options"
                    continue
                moves.append(Move(name, key, label, tuple(sorted(options.items()))))
    return Moves(moves, skipped)


def require_moves(found: Moves) -> None:
    """:class:`NotGrowableError` naming every transform's reason when no move exists."""
    if not found.moves:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(found.skipped.items())[:6]) or "no transform is registered"
        raise NotGrowableError(f"search: no registered transform can grow this model exactly ({reasons})")
