"""Train one child briefly, as NASH does: a few epochs with a cosine learning rate that restarts per child (SGDR).

Each child's training is one SGDR cycle (Loshchilov & Hutter 2017): the learning rate falls from
``lr`` to ``lr_min`` along a cosine over ``epochs`` passes of the training data, stepped once per
batch. The optimizer is SGD with momentum (NASH's choice) or AdamW; its state may come from the
parent (carried across the growth step by the weights' own map, :mod:`growcli.train.optim`), so
a child continues its parent's momentum. The order of the training samples is drawn from the
child's own seed, so a child trains the same wherever and whenever it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from growcli.analysis.calibration import Calibration, batch_loss
from growcli.core.errors import UsageError
from growcli.search.data import set_mode


@dataclass(frozen=True)
class TrainSettings:
    """How every child is trained: epochs, optimizer, SGDR learning-rate range."""

    epochs: int = 2
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.epochs < 0:
            raise UsageError(f"epochs must be non-negative, got {self.epochs}")
        if self.optimizer not in ("sgd", "adamw"):
            raise UsageError(f"optimizer {self.optimizer!r}: expected sgd or adamw")
        if not (self.lr > 0 and 0 <= self.lr_min <= self.lr):
            raise UsageError(f"learning rates: need lr > 0 and 0 <= lr_min <= lr, got lr {self.lr}, lr_min {self.lr_min}")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise UsageError(f"weight decay must be non-negative, got {self.weight_decay}")

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "optimizer": self.optimizer, "lr": self.lr, "lr_min": self.lr_min,
                "momentum": self.momentum, "weight_decay": self.weight_decay}

    def describe(self) -> str:
        opt = f"SGD momentum {self.momentum}" if self.optimizer == "sgd" else "AdamW"
        return (f"{self.epochs} epoch(s) of {opt}, cosine learning rate {self.lr:g} → {self.lr_min:g} (one SGDR "
                f"cycle), weight decay {self.weight_decay:g}")


def make_optimizer(module: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def sgdr_lr(settings: TrainSettings, step: int, total: int) -> float:
    """The learning rate at batch ``step`` (0-based) of a cycle of ``total`` batches."""
    if total <= 1:
        return settings.lr
    t = step / (total - 1)
    return settings.lr_min + 0.5 * (settings.lr - settings.lr_min) * (1 + math.cos(math.pi * t))


def train(module: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Calibration, settings: TrainSettings,
          generator: torch.Generator) -> list[float]:
    """One SGDR cycle of ``settings.epochs`` epochs on ``data``; returns the mean training loss of each epoch.

    Samples are reshuffled every epoch with ``generator`` (batches of the data's batch size).
    Raises :class:`UsageError` when the loss becomes non-finite (a learning rate too large).
    """
    inputs, target = _stack(data)
    n = _length(inputs)
    size = max(_length(b) for b, _ in data.batches)
    per_epoch = math.ceil(n / size)
    total = per_epoch * settings.epochs
    losses, step = [], 0
    set_mode(module, True)
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        running = 0.0
        for s in range(0, n, size):
            idx = order[s:s + size]
            args, kwargs = inputs
            batch_args = tuple(a[idx] for a in args)
            batch_kwargs = {k: v[idx] for k, v in kwargs.items()}
            for group in optimizer.param_groups:
                group["lr"] = sgdr_lr(settings, step, total)
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(module(*batch_args, **batch_kwargs), target[idx] if target is not None else None,
                              data.loss, data.source)
            if not torch.isfinite(loss):
                raise UsageError(f"training diverged (loss {float(loss)}) at learning rate "
                                 f"{optimizer.param_groups[0]['lr']:g}; lower --lr")
            loss.backward()
            optimizer.step()
            running += float(loss.detach()) * len(idx)
            step += 1
        losses.append(running / n)
    set_mode(module, False)
    return losses


def _stack(data: Calibration):
    """The batches joined back into one set of inputs and targets (to reshuffle across batches)."""
    args_list = [b[0] for b, _ in data.batches]
    kwargs_list = [b[1] for b, _ in data.batches]
    args = tuple(torch.cat([a[i] for a in args_list]) for i in range(len(args_list[0])))
    kwargs = {k: torch.cat([kw[k] for kw in kwargs_list]) for k in kwargs_list[0]}
    targets = [t for _, t in data.batches]
    target = torch.cat(targets) if all(t is not None for t in targets) else None
    return (args, kwargs), target


def _length(batch) -> int:
    args, kwargs = batch
    first = args[0] if args else next(iter(kwargs.values()))
    return int(first.shape[0])
