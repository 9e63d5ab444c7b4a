"""The search: rounds of children made by exact growth steps, trained briefly, the best becoming the parent.

NASH (Elsken et al. 2017), with EAS's controller as an option (Cai et al. 2018): each round

1. lists every exact move from the parent (:mod:`growcli.search.moves`) and lets the policy pick
   ``children`` distinct ones (:mod:`growcli.search.policy`);
2. makes each child by its move, checks it starts at the parent's validation loss, and trains it
   for one SGDR cycle (:mod:`growcli.search.child`), in ``jobs`` processes;
3. ranks the children by validation accuracy (then loss; loss alone for non-class targets); the
   best becomes the parent of the next round, and the controller learns from the round.

The search stops after ``rounds`` rounds, when the parent reaches ``budget_params`` or no child
fits in it, or on ``KeyboardInterrupt`` (``SearchResult.interrupted``; what was found so far is
kept). The result is the best chosen child of any round, with the path of moves that made it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from growcli.core.errors import UsageError
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings
from growcli.search.child import ChildJob, ChildResult, ChildRunner, child_seed
from growcli.search.data import Score, SearchData, evaluate
from growcli.search.fit import TrainSettings
from growcli.search.moves import default_transforms, enumerate_moves, require_moves
from growcli.search.policy import Controller, RandomPolicy
from growcli.transforms.catalog import all_transforms

POLICIES = ("random", "controller")


@dataclass(frozen=True)
class SearchSettings:
    rounds: int = 3
    children: int = 4
    budget_params: int | None = None
    policy: str = "random"
    jobs: int = 1
    seed: int = 0
    transforms: tuple[str, ...] | None = None  # only these transforms' moves (default: every registered one)

    def __post_init__(self):
        if self.rounds < 1 or self.children < 1 or self.jobs < 1:
            raise UsageError(f"rounds, children and jobs must be positive, got {self.rounds}, {self.children}, {self.jobs}")
        if self.policy not in POLICIES:
            raise UsageError(f"policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if self.budget_params is not None and self.budget_params < 1:
            raise UsageError(f"budget_params must be positive, got {self.budget_params}")
        unknown = [t for t in self.transforms or () if t not in all_transforms()]
        if unknown:
            raise UsageError(f"unknown transform(s) {', '.join(unknown)}; known: {', '.join(sorted(all_transforms()))}")


@dataclass
class Round:
    round: int
    parent_params: int
    parent: Score
    children: list[ChildResult]
    chosen: int | None  # index of the best child
    policy: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "parent_params": self.parent_params, "parent": self.parent.to_dict(),
                "chosen": self.chosen, "policy": self.policy, "children": [c.to_dict() for c in self.children]}


@dataclass
class SearchResult:
    original: GrowModel
    original_score: Score
    best: GrowModel
    best_score: Score
    path: list[ChildResult]  # the chosen child of each round up to the best one
    rounds: list[Round]
    stop: str
    interrupted: bool = False
    policy_state: dict[str, Any] | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"params_before": self.original.num_parameters(), "params_after": self.best.num_parameters(),
                "original": self.original_score.to_dict(), "best": self.best_score.to_dict(),
                "path": [c.to_dict() for c in self.path], "rounds": [r.to_dict() for r in self.rounds],
                "stop": self.stop, "interrupted": self.interrupted, "skipped": self.skipped}


def rank_key(child: ChildResult, classification: bool) -> tuple:
    """Higher is better: accuracy, then lower loss; earlier children win ties."""
    acc = child.val.accuracy if classification else 0.0
    return (acc, -child.val.loss, -child.index)


def make_policy(settings: SearchSettings, state: dict[str, Any] | None = None):
    if settings.policy == "random":
        return RandomPolicy()
    controller = Controller(sorted(settings.transforms or default_transforms()), seed=settings.seed)
    if state is not None:
        controller.load_state_dict(state)
    return controller


def search(gm: GrowModel, data: SearchData, settings: SearchSettings, train_settings: TrainSettings | None = None,
           verify: VerifySettings | None = None, *, policy_state: dict[str, Any] | None = None,
           on_child: Callable[[int, int, int], None] | None = None,
           on_round: Callable[[SearchResult], None] | None = None) -> SearchResult:
    """Search from ``gm`` (left unchanged) on ``data``; see the module docstring.

    ``on_child(round, done, total)`` follows each round's children; ``on_round(result)`` is called
    with the result so far after each round (e.g. to save ``policy_state``). Raises :class:`UsageError` for a
    budget below the model's size or a controller on non-class targets, and
    :class:`NotGrowableError` when no transform can grow the model.
    """
    train_settings = train_settings or TrainSettings()
    verify = verify or VerifySettings(batches=2)
    params = gm.num_parameters()
    if settings.budget_params is not None and settings.budget_params < params:
        raise UsageError(f"--budget-params {settings.budget_params:,} is smaller than the model ({params:,} parameters)")
    if settings.policy == "controller" and not data.classification:
        raise UsageError("--policy controller is rewarded by validation accuracy; it needs integer class targets "
                         "(loss cross_entropy)")
    found = enumerate_moves(gm, list(settings.transforms) if settings.transforms else None)
    require_moves(found)
    policy = make_policy(settings, policy_state)
    original_score = evaluate(gm.module, data.val)
    result = SearchResult(gm, original_score, gm, original_score, [], [], "rounds", skipped=found.skipped)
    try:
        with ChildRunner(settings.jobs) as runner:
            _rounds(runner, result, policy, found, gm, data, settings, train_settings, verify, on_child, on_round)
    except KeyboardInterrupt:
        result.interrupted = True
        result.stop = "interrupted"
    if result.policy_state is None:
        result.policy_state = policy.state_dict()
    return result


def _rounds(runner: ChildRunner, result: SearchResult, policy, found, gm: GrowModel, data: SearchData,
            settings: SearchSettings, train_settings: TrainSettings, verify: VerifySettings, on_child, on_round) -> None:
    """Run the rounds, filling ``result`` as they finish (so an interruption keeps every finished round)."""
    parent, parent_opt, parent_score, path = gm, None, result.original_score, []
    best_key = None
    for r in range(1, settings.rounds + 1):
        if settings.budget_params is not None and parent.num_parameters() >= settings.budget_params:
            result.stop = "budget"
            break
        if r > 1:
            found = enumerate_moves(parent, list(settings.transforms) if settings.transforms else None)
            if not found.moves:
                result.stop = "no move"
                break
        gen = torch.Generator().manual_seed(child_seed(settings.seed, r, 1_000))
        chosen = policy.choose(parent, found.moves, settings.children, gen)
        parent_loss = evaluate(parent.module, data.val, torch.float64).loss
        jobs = [ChildJob(r, i, child_seed(settings.seed, r, i), parent, parent_opt, parent_loss, move, data,
                         train_settings, verify, settings.budget_params) for i, move in enumerate(chosen)]
        done = [0]

        def tick(_result: ChildResult, r=r, total=len(jobs)) -> None:
            done[0] += 1
            if on_child:
                on_child(r, done[0], total)

        if on_child:
            on_child(r, 0, len(jobs))
        children = runner.run(jobs, tick)
        trained = [c for c in children if c.status == "trained"]
        record = Round(r, parent.num_parameters(), parent_score, children, None)
        result.rounds.append(record)
        if not trained:
            result.stop = "budget" if any(c.status == "over budget" for c in children) else "no move"
            break
        best = max(trained, key=lambda c: rank_key(c, data.classification))
        record.chosen = best.index
        if isinstance(policy, Controller):
            record.policy = policy.update(parent, found.moves, [c.move for c in trained],
                                          [c.val.accuracy for c in trained])
        result.policy_state = policy.state_dict()
        parent, parent_opt, parent_score = best.gm, best.optimizer, best.val
        path.append(best)
        key = rank_key(best, data.classification)[:2]
        if best_key is None or key > best_key:
            best_key = key
            result.best, result.best_score, result.path = best.gm, best.val, list(path)
        for c in children:  # only the chosen child's model lives on
            if c is not best:
                c.gm = c.optimizer = None
        if on_round:
            on_round(result)


__all__ = ["SearchSettings", "SearchResult", "Round", "search"]
