"""Who picks the children's moves: uniformly at random (NASH) or a learned controller (EAS), trained by REINFORCE.

Both pick ``k`` distinct moves per round in three levels — a transform, then one of its
targets, then a size — so that a transform with many size choices is not favoured.

:class:`RandomPolicy` draws each level uniformly (NASH, Elsken et al. 2017).

:class:`Controller` (EAS, Cai et al. 2018; small on purpose):

- the architecture is its layer list (every parameter of two or more dimensions, in model
  order), each layer described by ``[log2 out/10, log2 in/10, log2 kernel/5, is-conv, position]``
  and embedded by ``Linear(5, 16) → tanh → bidirectional GRU(16)`` (32 numbers per layer, and their
  mean as the architecture's summary ``c``);
- three actor heads: transform logits ``Linear(32 → T)(c)``; a target's score
  ``v · tanh(W [h_target, c, onehot(transform)])`` with ``h_target`` the embedding of the layer the
  target names (``c`` for a block or every site); size logits ``Linear(32 + T → 4)`` over the
  transform's size choices, in order;
- REINFORCE with EAS's reward ``R = tan(acc · π/2)`` (``acc`` clipped to 0.99 so that ``R`` stays
  finite, at most 63.7) and a moving-average baseline ``b ← 0.9 b + 0.1 mean(R)`` (the first
  round's mean to start): ``loss = −mean((R − b) · log p(move))``, one Adam step (lr 0.01) per round.

Its state (weights, Adam moments, baseline, the transform vocabulary) is a plain dict of tensors
and numbers (:meth:`Controller.state_dict`), saved with ``torch.save`` and read back with
``weights_only=True``, so a search can resume where it stopped.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from growcli.core.errors import UsageError
from growcli.core.model import GrowModel
from growcli.search.moves import BLOCK_MARK, Move

MAX_SIZES = 4
CLIP_ACC = 0.99
BASELINE_DECAY = 0.9
LR = 0.01


def reward(accuracy: float) -> float:
    """EAS's reward ``tan(acc · π/2)``, with ``acc`` clipped to [0, 0.99]."""
    return math.tan(min(max(accuracy, 0.0), CLIP_ACC) * math.pi / 2)


def _levels(moves: list[Move]) -> dict[str, dict[str, list[Move]]]:
    out: dict[str, dict[str, list[Move]]] = {}
    for m in moves:
        out.setdefault(m.transform, {}).setdefault(m.target, []).append(m)
    return out


def _pick(n: int, gen: torch.Generator, logits: torch.Tensor | None = None) -> int:
    if logits is None:
        return int(torch.randint(n, (1,), generator=gen))
    return int(torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen))


class RandomPolicy:
    """Uniform choices at each level (NASH)."""

    name = "random"

    def choose(self, gm: GrowModel, moves: list[Move], k: int, gen: torch.Generator) -> list[Move]:
        levels = _levels(moves)

        def draw() -> Move:
            transform = sorted(levels)[_pick(len(levels), gen)]
            targets = list(levels[transform])
            options = levels[transform][targets[_pick(len(targets), gen)]]
            return options[_pick(len(options), gen)]

        return distinct(draw, moves, k)

    def update(self, gm: GrowModel, moves: list[Move], chosen: list[Move], accuracies: list[float]) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.name}


def distinct(draw, moves: list[Move], k: int) -> list[Move]:
    """``k`` distinct draws (all moves when there are no more); retries a repeated draw, then takes the next unused move."""
    k = min(k, len(moves))
    chosen: list[Move] = []
    while len(chosen) < k:
        for _ in range(20):
            m = draw()
            if m not in chosen:
                break
        else:
            m = next(x for x in moves if x not in chosen)
        chosen.append(m)
    return chosen


def layer_list(module: nn.Module) -> tuple[list[str], torch.Tensor]:
    """The module names owning a weight of two or more dimensions, in order, and their feature rows."""
    names, rows = [], []
    weights = [(n, p) for n, p in module.named_parameters() if p.dim() >= 2]
    for i, (n, p) in enumerate(weights):
        kernel = max(1, p[0, 0].numel()) if p.dim() > 2 else 1
        rows.append([math.log2(p.shape[0]) / 10, math.log2(max(1, p.shape[1])) / 10, math.log2(kernel) / 5,
                     float(p.dim() > 2), i / max(1, len(weights) - 1)])
        names.append(n.rpartition(".")[0])
    return names, torch.tensor(rows or [[0.0] * 5], dtype=torch.float32)


class ControllerNet(nn.Module):
    def __init__(self, transforms: int):
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.rnn = nn.GRU(16, 16, batch_first=True, bidirectional=True)
        self.transform_head = nn.Linear(32, transforms)
        self.target_w = nn.Linear(64 + transforms, 32)
        self.target_v = nn.Linear(32, 1, bias=False)
        self.size_head = nn.Linear(32 + transforms, MAX_SIZES)

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = self.rnn(torch.tanh(self.embed(rows)).unsqueeze(0))
        h = h.squeeze(0)
        return h, h.mean(0)


class Controller:
    """The EAS-style learned policy described in the module docstring."""

    name = "controller"

    def __init__(self, transforms: list[str], seed: int = 0):
        self.transforms = list(transforms)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = ControllerNet(len(self.transforms))
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=LR)
        self.baseline: float | None = None
        self.updates = 0

    # ------------------------------------------------------------------ log-probabilities
    def _onehot(self, transform: str) -> torch.Tensor:
        v = torch.zeros(len(self.transforms))
        v[self.transforms.index(transform)] = 1.0
        return v

    def _target_row(self, h: torch.Tensor, c: torch.Tensor, names: list[str], target: str) -> torch.Tensor:
        name = target.removesuffix(BLOCK_MARK)
        hits = [i for i, n in enumerate(names) if n == name or n.startswith(name + ".")]
        return h[hits[-1]] if hits else c

    def _logits(self, gm: GrowModel, moves: list[Move]):
        """Per level, the logits of every available choice (and the lookup tables to index them)."""
        names, rows = layer_list(gm.module)
        h, c = self.net.encode(rows)
        levels = _levels(moves)
        unknown = [t for t in levels if t not in self.transforms]
        if unknown:
            raise UsageError(f"the controller's state knows transforms {', '.join(self.transforms)}, not "
                             f"{', '.join(unknown)}; start a new --policy-state")
        available = sorted(levels)
        t_logits = self.net.transform_head(c)[[self.transforms.index(t) for t in available]]
        per_t = {}
        for t in available:
            one = self._onehot(t)
            targets = list(levels[t])
            feats = torch.stack([torch.cat([self._target_row(h, c, names, g), c, one]) for g in targets])
            scores = self.net.target_v(torch.tanh(self.net.target_w(feats))).squeeze(-1)
            size_logits = self.net.size_head(torch.cat([c, one]))
            per_t[t] = (targets, scores, size_logits)
        return available, t_logits, per_t, levels

    def log_prob(self, tables, move: Move) -> torch.Tensor:
        available, t_logits, per_t, levels = tables
        targets, scores, size_logits = per_t[move.transform]
        sizes = levels[move.transform][move.target]
        lp = torch.log_softmax(t_logits, -1)[available.index(move.transform)]
        lp = lp + torch.log_softmax(scores, -1)[targets.index(move.target)]
        return lp + torch.log_softmax(size_logits[:len(sizes)], -1)[sizes.index(move)]

    # ------------------------------------------------------------------ the policy interface
    def choose(self, gm: GrowModel, moves: list[Move], k: int, gen: torch.Generator) -> list[Move]:
        with torch.no_grad():
            available, t_logits, per_t, levels = self._logits(gm, moves)

        def draw() -> Move:
            t = available[_pick(len(available), gen, t_logits)]
            targets, scores, size_logits = per_t[t]
            target = targets[_pick(len(targets), gen, scores)]
            sizes = levels[t][target]
            return sizes[_pick(len(sizes), gen, size_logits[:len(sizes)][:MAX_SIZES])]

        return distinct(draw, moves, k)

    def update(self, gm: GrowModel, moves: list[Move], chosen: list[Move], accuracies: list[float]) -> dict[str, Any]:
        """One REINFORCE step on the round's children; returns the rewards, baseline and loss."""
        rewards = [reward(a) for a in accuracies]
        mean = sum(rewards) / len(rewards)
        baseline = mean if self.baseline is None else self.baseline
        tables = self._logits(gm, moves)
        logp = torch.stack([self.log_prob(tables, m) for m in chosen])
        advantage = torch.tensor([r - baseline for r in rewards])
        loss = -(advantage * logp).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.baseline = BASELINE_DECAY * baseline + (1 - BASELINE_DECAY) * mean
        self.updates += 1
        return {"rewards": rewards, "baseline": baseline, "loss": float(loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "version": 1, "transforms": list(self.transforms), "net": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "baseline": self.baseline, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("policy") != self.name or state.get("version") != 1:
            raise UsageError("the policy state file is not a version-1 controller state")
        self.transforms = list(state["transforms"])
        self.net = ControllerNet(len(self.transforms))
        self.net.load_state_dict(state["net"])
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=LR)
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
        self.updates = int(state["updates"])
