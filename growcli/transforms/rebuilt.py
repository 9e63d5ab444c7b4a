"""Depth edits checked against the model the written config rebuilds (docs/recipes.md#blocks-that-depend-on-their-index).

``stack`` and ``deepen --block`` copy block modules, so in memory every copy keeps its
source's attributes. A Hugging Face directory is rebuilt from its config by
``from_pretrained``, where block ``k`` gets whatever the architecture gives index ``k``: Swin's
shifted windows alternate with the index, ModernBERT's layer 0 has no attention norm and its
layers alternate global and sliding-window attention, Gemma-2's follow ``layer_types``. This
module builds the model the grown config describes (meta device: shapes and attributes, no
memory) and compares, position by position, the block that will sit there with the block the
config builds there:

- *structure*: the class of every submodule and the names and shapes of its parameters and
  buffers (buffer values are not compared on the meta device: saved buffers travel with the
  weights and the read-back run covers computed ones);
- *behaviour*: every plain attribute (int, float, bool, str, None, tuples and lists of them).

Three kinds of difference are not behaviour. An *index* attribute (``layer_idx``) is one whose
value is the block's position in the original stack and in the rebuilt one; it is set to the
new position (:mod:`growcli.analysis.depth` proposes them; one the rebuilt model does not
confirm, such as Swin's ``shift_size`` 0, 1 with two blocks, is behaviour and keeps its value).
A *training-only* attribute belongs to a submodule without weights that is the identity in eval
mode (dropout, stochastic depth rates): it follows the config. A *stale* attribute already
differs between the original model and a model built from its own config (one the forward
mutates): not the depth edit's business.

When blocks differ, :func:`fit_layout` can move the source of a new copy to another block that
was already placed and matches the rebuilt position (stack with identity init: the copy is the
identity whatever it copies). Whatever still differs is returned as one line naming the block,
the attribute and both values, for the transform to refuse with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from growcli.analysis.depth import DepthChanges, config_candidates, depth_changes, index_attributes, insert_order, rebuild

Key = tuple[str, str]  # (submodule relative to the block, attribute or tensor name)
CLASS = "<class>"
ABSENT = "<absent>"
_PLAIN = (int, float, bool, str, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    return isinstance(value, (tuple, list)) and all(_plain(v) for v in value)


def block_state(block: nn.Module) -> dict[Key, Any]:
    """Structure and behaviour of ``block``: ``(submodule, name) → value`` (see the module docstring)."""
    state: dict[Key, Any] = {}
    for sub, m in block.named_modules():
        state[(sub, CLASS)] = type(m)
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            state[(sub, name)] = ("tensor", tuple(t.shape) if t is not None else None)
        for attr, value in vars(m).items():
            if not attr.startswith("_") and attr != "training" and _plain(value):
                state[(sub, attr)] = tuple(value) if isinstance(value, list) else value
    return state


def eval_identity(module: nn.Module) -> bool:
    """``module`` has no weights and returns its input unchanged in eval mode (dropout, drop-path)."""
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return False
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try:
        probe = copy.deepcopy(module).eval()
        with torch.no_grad():
            y = probe(x)
    except Exception:  # a module that cannot run on a plain tensor is not known to be the identity
        return False
    return isinstance(y, torch.Tensor) and y.shape == x.shape and torch.equal(y, x)


def _show(key: Key, value: Any) -> str:
    if value is ABSENT:
        return "absent"
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, tuple) and value[:1] == ("tensor",):
        return f"a tensor of shape {list(value[1])}" if value[1] is not None else "an unset tensor (None)"
    return repr(value)


@dataclass
class Mismatch:
    """Block ``position`` (a copy of block ``source`` when ``copy``) differs from the rebuilt block at ``key``."""

    position: int
    source: int
    copy: bool
    key: Key
    have: Any
    want: Any

    def describe(self, container: str) -> str:
        sub, name = self.key
        where = f"{container}.{self.position}" + (f" (a copy of {container}.{self.source})" if self.copy else
                                                 f" (block {self.source} of the original stack)"
                                                 if self.source != self.position else "")
        what = (sub or "the block") if name == CLASS else ".".join(x for x in (sub, name) if x)
        return (f"{where}: {what} is {_show(self.key, self.have)}, but a model built from the written config has "
                f"{_show(self.key, self.want)} there")


@dataclass
class LayoutCheck:
    """The comparison of a layout with the model its config rebuilds."""

    container: str
    order: list[int]
    attrs: list[tuple[str, str, int]]  # the index attributes to set (confirmed by the rebuilt model)
    mismatches: list[Mismatch] = field(default_factory=list)
    training: list[str] = field(default_factory=list)  # training-only attributes that follow the config
    moved: list[tuple[int, int, int]] = field(default_factory=list)  # (position, requested source, chosen source)
    built: nn.Module | None = field(default=None, repr=False, compare=False)  # the rebuilt stack compared with

    def reason(self) -> str | None:
        """One line naming the first block, attribute and both values; ``None`` when nothing differs."""
        if not self.mismatches:
            return None
        more = len({m.position for m in self.mismatches}) - 1
        tail = f" (and {more} more block{'s' if more > 1 else ''})" if more > 0 else ""
        return (f"{self.mismatches[0].describe(self.container)}{tail}: the written directory would not compute what "
                "the grown model computes")

    def notes(self) -> list[str]:
        out = [f"position {p} copies block {new} instead of block {old}: block {old}'s structure or attributes differ "
               f"from those the config gives position {p}, and an identity copy computes the same either way"
               for p, old, new in self.moved]
        if self.training:
            out.append("training-only attributes follow the written config: " + ", ".join(self.training[:4]))
        return out


def _stack_of(model: nn.Module | None, container: str) -> nn.Module | None:
    if model is None:
        return None
    try:
        return model.get_submodule(container)
    except AttributeError:
        return None


def _training_keys(block: nn.Module) -> set[str]:
    return {sub for sub, m in block.named_modules() if sub and eval_identity(m)}


def _training_only(key: Key, training: set[str], rebuilt_training: set[str]) -> bool:
    """A difference in a weight-free submodule that is the identity in eval mode (drop path), where the
    rebuilt block has one too when it is the submodule's class that differs."""
    return key[0] in training and (key[1] != CLASS or key[0] in rebuilt_training)


def check_layout(root: nn.Module, container: str, order: list[int], depth: DepthChanges) -> LayoutCheck | None:
    """Compare the layout ``order`` of ``container`` with the model its config (changed by ``depth``) builds.

    ``None`` when there is no Hugging Face config to build from. Changes nothing.
    """
    stack = root.get_submodule(container)
    length = len(stack)
    change = depth.config
    if change is None:  # no value describes the grown shapes: compare with the plain layer count's model
        change = next(iter(config_candidates(root.config, length, order)), None) if hasattr(root, "config") else None
    built = _stack_of(rebuild(root, change), container) if change is not None else None
    base = _stack_of(rebuild(root, {}), container)
    if built is None or base is None or len(built) != len(order) or len(base) != length:
        return None
    have = [block_state(b) for b in stack]
    want = [block_state(b) for b in built]
    stale = _differing(have, [block_state(b) for b in base], range(length))
    index = {(sub, attr): off for sub, attr, off in index_attributes(stack)
             if all(want[p].get((sub, attr)) == p + off for p in range(len(order)))}
    attrs = [(path, attr, v) for path, attr, v in depth.attrs if (_sub_of(path, container), attr) in index]
    check = LayoutCheck(container, list(order), attrs, built=built)
    training = [_training_keys(b) for b in stack]
    seen: set[int] = set()
    for p, s in enumerate(order):
        rebuilt_training = _training_keys(built[p])
        for key in sorted(set(have[s]) | set(want[p]), key=lambda k: (k[1] != CLASS, k)):
            if key in stale or key in index:
                continue
            a, b = have[s].get(key, ABSENT), want[p].get(key, ABSENT)
            if a == b:
                continue
            if _training_only(key, training[s], rebuilt_training):
                name = f"{container}.{p}.{key[0]}.{key[1]}"
                check.training.append(f"{name} {_show(key, a)} → {_show(key, b)}")
                continue
            check.mismatches.append(Mismatch(p, s, s in seen, key, a, b))
        seen.add(s)
    return check


def _differing(have: list[dict], want: list[dict], positions) -> set[Key]:
    """Keys whose values differ between ``have[p]`` and ``want[p]`` at any of ``positions``."""
    return {k for p in positions for k in set(have[p]) | set(want[p]) if have[p].get(k, ABSENT) != want[p].get(k, ABSENT)}


def _sub_of(path: str, container: str) -> str:
    rest = path[len(container) + 1:] if container else path
    return rest.partition(".")[2]


def layout_depth(root: nn.Module, container: str, order: list[int]) -> tuple[DepthChanges, LayoutCheck | None]:
    """:func:`growcli.analysis.depth.depth_changes` with only the index attributes the rebuilt model confirms."""
    depth = depth_changes(root, container, order)
    check = check_layout(root, container, order, depth)
    if check is not None:
        depth = DepthChanges(depth.config, check.attrs, depth.reason)
    return depth, check


def _structure(key: Key, value: Any) -> bool:
    """A submodule's class or a tensor's presence and shape (not a plain attribute)."""
    return key[1] == CLASS or isinstance(value, tuple) and value[:1] == ("tensor",)


def _matches(state: dict[Key, Any], want: dict[Key, Any], only: Key | None) -> bool:
    """``state`` has ``want``'s value at ``only``, or (``None``) the same structure."""
    if only is not None:
        return state.get(only, ABSENT) == want.get(only, ABSENT)
    keys = {k for k in set(state) | set(want) if _structure(k, state.get(k)) or _structure(k, want.get(k))}
    return all(state.get(k, ABSENT) == want.get(k, ABSENT) for k in keys)


def fit_layout(root: nn.Module, container: str, order: list[int], *, move: bool
               ) -> tuple[list[int], DepthChanges, LayoutCheck | None]:
    """The layout to use: ``order``, or with ``move`` the same positions of new copies with other sources.

    A new copy whose block differs from the block the config builds at its position takes the
    nearest block already placed before it that matches (structure first, then attributes);
    originals never move. Returns the layout, its depth changes and its check.
    """
    stack = root.get_submodule(container)
    states = [block_state(b) for b in stack]
    depth, check = layout_depth(root, container, order)
    requested = list(order)
    for _ in range(3):
        if check is None or not check.mismatches or not move:
            break
        new, built = list(order), check.built  # the stack the config rebuilds for this layout
        bad = {m.position: m for m in check.mismatches if m.copy}
        for p, m in bad.items():
            want = block_state(built[p])
            only = None if _structure(m.key, m.want) or _structure(m.key, m.have) else m.key
            placed = sorted(set(order[:p]), key=lambda j: (abs(j - order[p]), j))
            match = next((j for j in placed if j != order[p] and _matches(states[j], want, only)), None)
            if match is not None:
                new[p] = match
        if new == order:
            break
        order = new
        depth, check = layout_depth(root, container, order)
    if check is not None:
        check.moved = [(p, a, b) for p, (a, b) in enumerate(zip(requested, order)) if a != b]
    return order, depth, check


def deepen_hint(root: nn.Module, container: str, index: int, limit: int = 8) -> str:
    """Placements of one identity copy that the config rebuilds block for block, for a refusal's message."""
    length = len(root.get_submodule(container))
    tried, after, end = 0, [], []
    for j in sorted(range(length), key=lambda j: (abs(j - index), j)):
        for order, found in ((insert_order(length, j), after), (list(range(length)) + [j], end)):
            if tried >= limit or (found is after and j == index) or (found is end and j == length - 1):
                continue
            tried += 1
            _, check = layout_depth(root, container, order)
            if check is not None and not check.mismatches:
                found.append(j)
    name = (lambda j: f"{container}.{j}") if container else str
    hints = ([f"--after {name(after[0])}"] if after else []) + \
            ([f"stack --blocks {container} --layers 0-{length - 1},{end[0]} (a copy of {name(end[0])} at the end)"]
             if end else [])
    return f"; placements the config rebuilds as they are: {' or '.join(hints)}" if hints else ""


def written_mismatch(module: nn.Module, records: list[dict]) -> str | None:
    """Before writing a Hugging Face directory: a block of a stack that grew (``insert`` records) that
    ``from_pretrained`` would build differently from the model in memory, as one line; else ``None``.

    The model in memory already carries the new index attributes, so blocks are compared at the
    same position; attributes that differ in the untouched blocks before the first insertion are
    stale (not the depth edit's) and are left out.
    """
    inserts = [r for r in records if r.get("op") == "insert" and isinstance(r.get("index"), int)]
    if not inserts:
        return None
    fresh = rebuild(module, {})
    for container in dict.fromkeys(r.get("container", "") for r in inserts):
        grown, built = _stack_of(module, container), _stack_of(fresh, container)
        if grown is None or built is None or len(grown) != len(built):
            continue  # the config does not describe this depth: the shape check refuses it
        first = min(r["index"] for r in inserts if r.get("container", "") == container)
        have = [block_state(b) for b in grown]
        want = [block_state(b) for b in built]
        stale = _differing(have, want, range(min(first, len(grown))))
        for p in range(first, len(grown)):
            training, rebuilt_training = _training_keys(grown[p]), _training_keys(built[p])
            for key in sorted(set(have[p]) | set(want[p]), key=lambda k: (k[1] != CLASS, k)):
                a, b = have[p].get(key, ABSENT), want[p].get(key, ABSENT)
                if a != b and key not in stale and not _training_only(key, training, rebuilt_training):
                    return Mismatch(p, p, False, key, a, b).describe(container)
    return None

