"""Carry an optimizer across a growth step: param groups and state follow the weights' own map.

After a transform replaced some parameters, :func:`carry_optimizer` makes ``optimizer`` hold the
model's new parameters. A parameter object that survived the step (unchanged, perhaps renamed
or moved, as stacked blocks are) keeps its state and its place. A replaced parameter takes its
predecessor's place in the same param group; a parameter that did not exist before joins the
group of the parameter it was derived from, else the group of its nearest sibling. Its state is
the state of the pre-step tensor it derives from (:class:`growcli.core.origins.Derived`, recorded by
the transform's edits), mapped by its :class:`growcli.core.origins.Origin`:

- first moments (Adam's ``exp_avg``, SGD's ``momentum_buffer``, …) map like the weights:
  copied positions copy, positions scaled by ``s`` scale by ``s``;
- second moments (``exp_avg_sq``, ``max_exp_avg_sq``, RMSprop's ``square_avg``, Adagrad's ``sum``, …)
  scale by ``s²`` (they track the squared
  gradient, and the gradient of ``s·w`` with respect to the scaled copy is ``s`` times as large);
- fresh positions (new units, zeroed writers, identity layers) get zero moments; a wholly fresh
  parameter gets no state at all, so the optimizer starts it with its own step count (Adam's bias
  correction then treats it as new).

State entries that are tensors of the parameter's shape but not known moments are refused
(naming the optimizer and the key) rather than guessed; scalars (``step``) are copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from growcli.core.errors import UsageError
from growcli.core.origins import Derived, Origin

FIRST_MOMENTS = ("exp_avg", "momentum_buffer", "grad_avg")  # Adam(W), SGD/RMSprop momentum, centred RMSprop
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta")  # Adam, AMSGrad, RMSprop, Adagrad, Adadelta


@dataclass
class Carried:
    """What happened to the optimizer: parameter names kept, mapped from a predecessor, or fresh."""

    kept: list[str] = field(default_factory=list)
    mapped: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    removed: int = 0

    def to_dict(self) -> dict:
        return {"kept": len(self.kept), "mapped": self.mapped, "fresh": self.fresh, "removed": self.removed}


def map_tensor(old: torch.Tensor, origin: Origin, power: int = 1) -> torch.Tensor:
    """``old`` under ``origin``'s axis maps, scales raised to ``power``; fresh positions are zero."""
    out = old
    for m in origin.maps:
        index = torch.tensor(m.index, dtype=torch.long)
        scale = torch.tensor(m.scale, dtype=torch.float64) ** power
        scale = torch.where(index < 0, torch.zeros_like(scale), scale)
        picked = out.index_select(m.dim, index.clamp(min=0))
        view = [1] * picked.dim()
        view[m.dim] = -1
        out = (picked.to(torch.float64) * scale.view(view)).to(old.dtype)
    return out.clone() if out is old else out


def new_positions(derived: Derived | None, shape: torch.Size) -> torch.Tensor:
    """Boolean mask of the positions that do not hold the replaced tensor's own values at the same place.

    A fresh tensor or a copy (a new block) is new everywhere; a resized one is new where a map moved
    or created a position (replicated units, padding), old where it kept ``i → i``.
    """
    if derived is None or derived.origin.fresh or not derived.origin.maps:
        return torch.ones(shape, dtype=torch.bool)
    # Maps in the order they were made (one call may resize a dimension twice: widen, then prune): composed
    # per dimension into one final position → original position map before comparing positions.
    composed: dict[int, list[int]] = {}
    for m in derived.origin.maps:
        prev = composed.get(m.dim)
        composed[m.dim] = [-1 if i < 0 else (prev[i] if prev is not None else i) for i in m.index]
    mask = torch.zeros(shape, dtype=torch.bool)
    for dim, index in composed.items():
        moved = torch.tensor([i != j for j, i in enumerate(index)], dtype=torch.bool)
        view = [1] * len(shape)
        view[dim] = -1
        mask |= moved.view(view).expand(shape)
    return mask


def _per_weight(value, p: torch.Tensor) -> bool:
    """State that holds one number per weight (a moment), as opposed to scalars like ``step``."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == p.shape


def _unmappable(optimizer: torch.optim.Optimizer, key: str) -> UsageError:
    return UsageError(f"cannot grow {type(optimizer).__name__}'s state {key!r}: growcli knows how first "
                      f"({', '.join(FIRST_MOMENTS)}) and second ({', '.join(SECOND_MOMENTS)}) moments grow")


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, before anything grows, an optimizer whose per-parameter state growcli cannot map."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if _per_weight(value, p) and key not in FIRST_MOMENTS + SECOND_MOMENTS:
                raise _unmappable(optimizer, key)


def _state_of(optimizer: torch.optim.Optimizer, old: nn.Parameter, origin: Origin) -> dict:
    out = {}
    for key, value in (optimizer.state.get(old) or {}).items():
        if not _per_weight(value, old):
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
        elif key in FIRST_MOMENTS + SECOND_MOMENTS:
            out[key] = map_tensor(value, origin, 1 if key in FIRST_MOMENTS else 2)
        else:
            raise _unmappable(optimizer, key)
    return out


def carry_optimizer(optimizer: torch.optim.Optimizer, before: dict[str, nn.Parameter],
                    after: dict[str, nn.Parameter], derived: dict[int, Derived]) -> Carried:
    """Update ``optimizer`` in place from the parameters ``before`` the step to those ``after`` it."""
    group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
    alive = {id(p) for p in after.values()}
    order = {id(p): i for i, p in enumerate(dict.fromkeys(after.values()))}
    old_ids = {id(p) for p in before.values()}
    carried = Carried()
    placed: dict[int, nn.Parameter] = {}  # id(old param) → its replacement, put at the old one's place
    appended: list[tuple[int, nn.Parameter]] = []
    new_state: dict[nn.Parameter, dict] = {}
    for name, p in after.items():
        if id(p) in old_ids:
            carried.kept.append(name)
            continue
        d = derived.get(id(p))
        source = d.source if d is not None and d.source is not None and id(d.source) in old_ids else None
        if source is None or d.origin.fresh:
            carried.fresh.append(name)
        else:
            new_state[p] = _state_of(optimizer, source, d.origin)
            carried.mapped.append(name)
        replaced = source if source is not None else before.get(name)
        if replaced is not None and id(replaced) not in alive and id(replaced) in group_of and id(replaced) not in placed:
            placed[id(replaced)] = p  # a resized parameter takes the place of the one it replaces
        else:
            ref = replaced if replaced is not None and id(replaced) in group_of else _sibling(name, before, group_of)
            appended.append((group_of.get(id(ref), 0) if ref is not None else 0, p))
    for gi, group in enumerate(optimizer.param_groups):
        params = []
        for q in group["params"]:
            if id(q) in placed:
                params.append(placed[id(q)])
            elif id(q) in alive:
                params.append(q)
            else:
                carried.removed += 1
        params.extend(p for g, p in appended if g == gi)
        # Module order within each group: what an optimizer built afresh for the grown model holds,
        # so that a checkpoint of this optimizer loads into that one parameter for parameter.
        group["params"] = sorted(params, key=lambda q: order.get(id(q), len(order)))
    for q in [q for q in optimizer.state if id(q) not in alive]:
        del optimizer.state[q]
    for p, state in new_state.items():
        if state:
            optimizer.state[p] = state
    return carried


def _sibling(name: str, before: dict[str, nn.Parameter], group_of: dict[int, int]) -> nn.Parameter | None:
    """The old parameter most like ``name`` (for a parameter of a new module): the same kind (``weight``,
    ``bias``, …), then the longest shared module prefix — so a new layer's weight joins the group the
    model's other weights are in (e.g. with weight decay) and its bias the biases' group."""
    parts = name.split(".")
    best, best_key = None, (-1, -1)
    for other, p in before.items():
        if id(p) not in group_of:
            continue
        other_parts = other.split(".")
        common = 0
        for a, b in zip(parts[:-1], other_parts[:-1]):
            if a != b:
                break
            common += 1
        key = (int(other_parts[-1] == parts[-1]), common)
        if key > best_key:
            best, best_key = p, key
    return best
