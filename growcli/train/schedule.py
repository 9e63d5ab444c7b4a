"""When to grow during training: fixed steps or fractions of training, a validation-loss plateau,
or a layer's GradMax score passing a threshold, all under one parameter budget.

A :class:`Schedule` holds growth rules; each rule is a trigger plus the growth steps to run
when it fires (plan steps: ``{"transform": name, "options": {...}}``). The training loop (or a
callback) calls :meth:`Schedule.due` after every optimizer step with a :class:`TrainingState`
and runs whatever is due. Nothing here touches a model or a tensor: triggers look at numbers
the loop hands in, so the same schedule drives a plain loop, the Hugging Face Trainer and
Lightning. The schedule's own state (which rules fired, the plateau's best loss) is a plain
dict (:meth:`Schedule.state_dict`) that travels with training checkpoints.

On timing, from progressive stacking (Gong et al. 2019) and G_stack (Du et al. 2024, "Stacking
Your Transformers"): grow early rather than late — G_stack grows once, by a factor of 4 in depth,
after a small fraction of the training tokens (about 10B tokens at their 7B scale, and a fitted
law for the growth point that rises slowly with model size and compute budget); growing
later leaves fewer steps to profit from the larger model, growing too early wastes the small
model's cheap steps. ``at: [0.25, 0.5]`` (stacking in two stages) is a reasonable default for
small experiments; measure with ``benchmarks/`` before trusting any timing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from growcli.core.errors import UsageError
from growcli.core.safeyaml import YamlError, load_located, read_text


@dataclass
class TrainingState:
    """What the loop knows after an optimizer step; ``val_loss`` only when it evaluated this step."""

    step: int
    total_steps: int | None = None
    val_loss: float | None = None
    num_parameters: int = 0


@dataclass
class AtSteps:
    """Fire at fixed optimizer steps (integers ≥ 1) or fractions of training (floats in (0, 1))."""

    at: tuple[float, ...]
    kind: str = "at"

    def __post_init__(self):
        if not self.at:
            raise UsageError("at: needs at least one step or fraction")
        for x in self.at:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or x <= 0 or (isinstance(x, float) and x >= 1):
                raise UsageError(f"at: {x!r} is neither a step ≥ 1 nor a fraction in (0, 1)")
        self.at = tuple(sorted(self.at, key=lambda x: (isinstance(x, float), x)))

    def points(self, total_steps: int | None) -> list[int]:
        """The steps this trigger fires at; fractions need ``total_steps``."""
        out = []
        for x in self.at:
            if isinstance(x, float):
                if total_steps is None:
                    raise UsageError(f"at: {x} is a fraction of training, but the total number of steps is unknown")
                out.append(max(1, math.ceil(x * total_steps)))
            else:
                out.append(int(x))
        return sorted(out)

    def check(self, state: TrainingState, memory: dict[str, Any]) -> str | None:
        done = memory.setdefault("fired_at", [])
        for point in self.points(state.total_steps):
            if point <= state.step and point not in done:
                done.append(point)
                return f"step {state.step} reached {point}"
        return None


@dataclass
class Plateau:
    """Fire when the validation loss has not improved by ``min_delta`` for ``patience`` evaluations.

    After firing, the best loss is forgotten and ``cooldown`` evaluations pass before counting again
    (a grown model's loss first equals the old one, then drops).
    """

    patience: int
    min_delta: float = 0.0
    cooldown: int = 0
    kind: str = "plateau"

    def __post_init__(self):
        if self.patience < 1 or self.min_delta < 0 or self.cooldown < 0:
            raise UsageError("plateau: patience must be ≥ 1, min_delta and cooldown ≥ 0")

    def check(self, state: TrainingState, memory: dict[str, Any]) -> str | None:
        if state.val_loss is None:
            return None
        loss = float(state.val_loss)
        if memory.get("cooldown", 0) > 0:
            memory["cooldown"] -= 1
            memory["best"], memory["bad"] = loss, 0
            return None
        best = memory.get("best")
        if best is None or loss < best - self.min_delta:
            memory["best"], memory["bad"] = loss, 0
            return None
        memory["bad"] = memory.get("bad", 0) + 1
        if memory["bad"] < self.patience:
            return None
        memory.update(best=None, bad=0, cooldown=self.cooldown)
        return f"validation loss {loss:.4g} has not improved on {best:.4g} by {self.min_delta} for {self.patience} evaluations"


@dataclass
class ScoreAbove:
    """Fire when a layer's growth score passes ``threshold``; the growth steps then target that layer.

    ``scores`` is called every ``every`` steps and returns ``{layer: score}``, e.g. the top singular
    value of GradMax's ``M`` per layer from ``growcli suggest``'s scoring on the current batch (how much
    loss decrease new units in that layer promise, per unit of outgoing weight norm).
    """

    threshold: float
    scores: Callable[[], dict[str, float]] | None = None
    every: int = 1
    kind: str = "score"

    def check(self, state: TrainingState, memory: dict[str, Any]) -> str | None:
        if self.scores is None:
            raise UsageError("score trigger: no scores function given")
        if state.step % self.every:
            return None
        scores = self.scores()
        if not scores:
            return None
        layer, score = max(scores.items(), key=lambda kv: kv[1])
        if score <= self.threshold:
            return None
        memory["layer"] = layer
        return f"layer {layer} scores {score:.4g} > {self.threshold}"


Trigger = AtSteps | Plateau | ScoreAbove


@dataclass
class Rule:
    """A trigger and the growth steps it runs; ``times`` bounds how often it may fire (None: no bound)."""

    trigger: Trigger
    steps: list[dict[str, Any]]
    times: int | None = None


@dataclass
class Event:
    """A growth that is due now: which rule, why, and the steps to run (layer filled in for score triggers)."""

    rule: int
    reason: str
    steps: list[dict[str, Any]]


@dataclass
class Schedule:
    """Growth rules checked after every optimizer step, under an optional parameter budget."""

    rules: list[Rule]
    budget_params: int | None = None
    memory: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        self.memory = self.memory or [{"fired": 0} for _ in self.rules]

    def due(self, state: TrainingState) -> list[Event]:
        """The growths to run now (in rule order); none once the model holds ``budget_params``."""
        events = []
        for i, rule in enumerate(self.rules):
            mem = self.memory[i]
            if rule.times is not None and mem["fired"] >= rule.times:
                continue
            if self.budget_params is not None and state.num_parameters >= self.budget_params:
                continue
            reason = rule.trigger.check(state, mem)
            if reason is None:
                continue
            mem["fired"] += 1
            steps = [dict(s, options=dict(s.get("options", {}))) for s in rule.steps]
            if isinstance(rule.trigger, ScoreAbove):
                for s in steps:
                    s["options"].setdefault("layer", mem["layer"])
            events.append(Event(i, reason, steps))
        return events

    def over_budget(self, num_parameters: int) -> bool:
        return self.budget_params is not None and num_parameters > self.budget_params

    def state_dict(self) -> dict[str, Any]:
        return {"memory": [dict(m) for m in self.memory]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        memory = state.get("memory")
        if not isinstance(memory, list) or len(memory) != len(self.rules):
            raise UsageError(f"schedule state has {len(memory) if isinstance(memory, list) else 'no'} rules, "
                             f"this schedule {len(self.rules)}")
        self.memory = [dict(m) for m in memory]


def schedule_from_dict(data: dict[str, Any], scores: Callable[[], dict[str, float]] | None = None) -> Schedule:
    """A schedule from its plan form::

        budget_params: 2000000
        grow:
          - at: [0.25, 0.5]
            steps: [{transform: stack, options: {init: identity}}]
          - plateau: {patience: 3, min_delta: 0.001}
            times: 1
            steps: [{transform: widen, options: {layer: fc1, factor: 2}}]
    """
    if not isinstance(data, dict):
        raise UsageError("schedule: expected a mapping with 'grow' (and optionally 'budget_params')")
    unknown = set(data) - {"grow", "budget_params"}
    if unknown:
        raise UsageError(f"schedule: unknown key(s) {', '.join(sorted(unknown))}; expected grow, budget_params")
    rules = []
    for i, entry in enumerate(data.get("grow") or []):
        if not isinstance(entry, dict):
            raise UsageError(f"schedule.grow[{i}]: expected a mapping")
        kinds = [k for k in ("at", "plateau", "score") if k in entry]
        if len(kinds) != 1:
            raise UsageError(f"schedule.grow[{i}]: give exactly one trigger of at, plateau, score")
        kind, value = kinds[0], entry[kinds[0]]
        if kind == "at":
            trigger: Trigger = AtSteps(tuple(value if isinstance(value, list) else [value]))
        elif kind == "plateau":
            trigger = Plateau(**(value or {}))
        else:
            trigger = ScoreAbove(scores=scores, **(value if isinstance(value, dict) else {"threshold": value}))
        steps = entry.get("steps")
        if not isinstance(steps, list) or not steps:
            raise UsageError(f"schedule.grow[{i}]: needs a non-empty 'steps' list")
        rules.append(Rule(trigger, steps, entry.get("times")))
    if not rules:
        raise UsageError("schedule: 'grow' lists no rules")
    return Schedule(rules, data.get("budget_params"))


def load_schedule(path: str | Path, scores: Callable[[], dict[str, float]] | None = None) -> Schedule:
    """A schedule from a YAML file in the form of :func:`schedule_from_dict` (a ``schedule:`` key or the
    mapping itself), read as safely as growth plans are: plain data only, bounded in size."""
    path = Path(path)
    try:
        data = load_located(read_text(path)).data
    except (YamlError, OSError) as exc:
        raise UsageError(f"{path}: {getattr(exc, 'message', None) or exc}") from None
    if isinstance(data, dict) and "schedule" in data:
        data = data["schedule"]
    try:
        return schedule_from_dict(data, scores)
    except (UsageError, TypeError) as exc:
        raise UsageError(f"{path}: {exc}") from None
