"""The three phases of learning one task: pick (and train the free weights), grow, compact.

- **pick**: the task trains the weights it owns (the free ones, given to it at its start), its
  head, and real-valued mask logits over the earlier tasks' frozen weights, binarised at 0 with a
  straight-through estimator (:func:`growcli.cl.net.picked_value`). After every optimiser step the
  entries the task does not own are put back bit for bit, so nothing else can move.
- **grow**: when the accuracy goal is not met, every hidden layer gets ``by`` new units through
  growcli's exact ``widen`` with ``init: zero`` (random incoming, zero outgoing weights), applied
  to the task's current network as plain torch layers and verified there; the new entries go to
  the task. Earlier tasks never read them: their masks cover only the block that existed when they
  were learned. Net2Net's copy-and-split would halve earlier tasks' frozen outgoing weights, so it
  is not used.
- **compact**: gradual magnitude pruning (Zhu & Gupta's cubic schedule) of the task's own hidden
  weights, retraining after each step; pruned weights are zeroed and released (owner 0) for later
  tasks. With ``keep_accuracy`` a step that costs more accuracy than that is undone and pruning stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from growcli.cl.net import CPGNet, make_head
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context

Live = list[dict[str, torch.Tensor]]


@dataclass
class TaskData:
    """One task: ``input`` ``[N, …]`` and integer class ``target`` ``[N]``, optionally a validation split."""

    input: torch.Tensor
    target: torch.Tensor
    val_input: torch.Tensor | None = None
    val_target: torch.Tensor | None = None
    name: str = ""

    def val(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation split, or the training data when the task has none."""
        if self.val_input is not None and self.val_target is not None:
            return self.val_input, self.val_target
        return self.input, self.target

    @property
    def classes(self) -> int:
        return int(max(int(self.target.max()), int(self.val()[1].max()))) + 1


def accuracy(net: CPGNet, x: torch.Tensor, y: torch.Tensor, task: int, live: Live | None = None,
             batch: int = 512) -> float:
    """Fraction of ``x`` whose arg-max output for ``task`` is the class in ``y``."""
    was = net.training
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((net(x[i:i + batch], task, live).argmax(-1) == y[i:i + batch]).sum())
    net.train(was)
    return correct / max(1, len(x))


def new_live(net: CPGNet, init: float) -> Live:
    """Mask logits of the task about to be learned: ``init`` everywhere (positive: every old weight picked)."""
    return [{n: torch.full(getattr(layer, n).shape, init, dtype=layer.weight.dtype, requires_grad=True)
             for n in layer.names()} for layer in net.layers]


def new_head(net: CPGNet, task: int, data: TaskData, gen: torch.Generator, live: Live) -> None:
    """Head ``task``: the original output layer for task 0 when it fits, else a seeded Linear init."""
    with torch.no_grad():
        width = net.features(data.input[:1], task, live).shape[-1]
    classes, dtype = data.classes, net.layers[0].weight.dtype
    source = net.source_head
    if task == 0 and source is not None and tuple(source[0].shape) == (classes, width):
        net.heads.append(make_head(source[0].to(dtype), None if source[1] is None else source[1].to(dtype)))
        return
    bound = 1 / math.sqrt(width)
    weight = (torch.rand(classes, width, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    bias = (torch.rand(classes, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    net.heads.append(make_head(weight.to(dtype), bias.to(dtype)))


def train(net: CPGNet, task: int, data: TaskData, live: Live, *, epochs: int, lr: float, batch_size: int,
          gen: torch.Generator, masks: bool = True) -> None:
    """Train ``task``'s own weights and head (and, with ``masks``, its picking) with Adam on cross-entropy."""
    params = [p for layer in net.layers for p in (layer.weight, layer.bias) if p is not None]
    params += list(net.heads[task].parameters())
    if masks and task > 0:
        params += [t for d in live for t in d.values()]
    kept = [(value, value.detach().clone(), layer.owner(n) != task + 1)
            for layer in net.layers for n in layer.names() for value in [getattr(layer, n)]]
    opt = torch.optim.Adam(params, lr=lr)
    net.train()
    x_all, y_all = data.input, data.target
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(net(x_all[idx], task, live), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # entries the task does not own are exactly what they were
                for value, snapshot, frozen in kept:
                    value.copy_(torch.where(frozen, snapshot, value))
    net.eval()


def grow(net: CPGNet, task: int, live: Live, sample: torch.Tensor, by: int, seed: int,
         mask_init: float) -> tuple[int, float]:
    """Widen every hidden layer by ``by`` units with growcli's exact widen (init zero) on ``task``'s current
    network; the new entries belong to ``task``. Returns the units added and the verified max abs difference."""
    view = net.dense_view(task, live)
    before = {k: v.clone() for k, v in view.state_dict().items()}
    gm = GrowModel(view, "state_dict", Path("cpg"), "0", spec_from_batch(((sample[:2],), {})))
    names = [f"layer{j}" for j in range(len(net.layers))]
    report = run_step(gm, "widen", {"layer": names, "by": by, "init": "zero"}, Context(seed=seed), VerifySettings())
    grown = gm.module.state_dict()
    for key, old in before.items():  # the widen appends units: every existing entry stays where it was
        if not torch.equal(grown[key][tuple(slice(0, s) for s in old.shape)], old):
            raise NotGrowableError(f"cpg grow: widen moved the existing entries of {key}; CPG needs new units "
                                   "appended after the old ones")
    for j, layer in enumerate(net.layers):
        for n in layer.names():
            old_logits = live[j][n].detach()
            layer.extend(n, grown[f"layer{j}.{n}"], task + 1)
            logits = torch.full(getattr(layer, n).shape, mask_init, dtype=old_logits.dtype)
            logits[tuple(slice(0, s) for s in old_logits.shape)] = old_logits
            live[j][n] = logits.requires_grad_(True)
    net.heads[task] = make_head(grown["head.weight"], grown.get("head.bias"))
    diff = float((report.verification or {}).get("max_abs_diff", 0.0))
    return by * len(net.layers), diff


def prune_schedule(ratio: float, steps: int) -> list[float]:
    """Cumulative fractions pruned after each step: ``ratio · (1 − (1 − s/steps)³)`` (Zhu & Gupta 2017)."""
    return [ratio * (1 - (1 - s / steps) ** 3) for s in range(1, steps + 1)]


def compact(net: CPGNet, task: int, data: TaskData, live: Live, *, ratio: float, steps: int, epochs: int,
            keep_accuracy: float | None, lr: float, batch_size: int, gen: torch.Generator) -> float:
    """Gradual magnitude pruning of ``task``'s own hidden weights with retraining; returns the fraction released."""
    start = [int((layer.owner("weight") == task + 1).sum()) for layer in net.layers]
    if ratio <= 0 or sum(start) == 0:
        return 0.0
    x_val, y_val = data.val()
    base = accuracy(net, x_val, y_val, task, live)
    for fraction in prune_schedule(ratio, steps):
        saved = [(getattr(layer, n), getattr(layer, n).detach().clone(), layer.owner(n), layer.owner(n).clone())
                 for layer in net.layers for n in layer.names()]
        head = {k: v.clone() for k, v in net.heads[task].state_dict().items()}
        for layer, n0 in zip(net.layers, start):
            _prune(layer, task, int(math.floor(fraction * n0)) - (n0 - int((layer.owner("weight") == task + 1).sum())))
        train(net, task, data, live, epochs=epochs, lr=lr, batch_size=batch_size, gen=gen, masks=False)
        if keep_accuracy is not None and accuracy(net, x_val, y_val, task, live) < base - keep_accuracy:
            with torch.no_grad():  # undo the step: its pruning and its retraining
                for value, value_before, owner, owner_before in saved:
                    value.copy_(value_before)
                    owner.copy_(owner_before)
                net.heads[task].load_state_dict(head)
            break
    released = sum(s - int((layer.owner("weight") == task + 1).sum()) for s, layer in zip(start, net.layers))
    return released / sum(start)


def _prune(layer, task: int, count: int) -> None:
    """Release the ``count`` smallest-magnitude weights ``task`` owns in ``layer`` (ties: the lower index)."""
    if count <= 0:
        return
    owner = layer.owner("weight")
    flat_own = (owner == task + 1).flatten()
    magnitude = torch.where(flat_own, layer.weight.detach().abs().flatten().to(torch.float64), math.inf)
    idx = torch.sort(magnitude, stable=True).indices[:count]
    with torch.no_grad():
        layer.weight.view(-1)[idx] = 0
        owner.view(-1)[idx] = 0
