"""learn_tasks: Compacting, Picking and Growing over a sequence of tasks, verified after every task.

For each task ``t`` in turn: the free weights are given to ``t``; ``t`` trains them, its head and
a mask over the earlier tasks' frozen weights (pick); while its accuracy is below the goal, every
hidden layer grows by exact widening and ``t`` trains again (grow); then ``t``'s own weights are
pruned gradually with retraining and the pruned ones released (compact); finally ``t``'s masks are
stored and its outputs on a probe batch recorded. After every task, every earlier task's outputs
on its probe batch must be ``torch.equal`` to what they were right after it was learned, else
:class:`~growcli.core.errors.VerificationFailed`.

Why they are equal: task ``k`` reads ``where(mask_k, W[:o_k, :i_k], 0)`` — the entries of a block
fixed when ``k`` was learned that ``k`` owns or picked, all owned by tasks ``≤ k``; later tasks
train only entries they own (free ones, or units appended after the block), and every step puts
all other entries back bit for bit. So every tensor task ``k`` computes with, and its shape, is
unchanged, and the same kernels give the same bits.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from growcli.cl.chain import read_chain
from growcli.cl.net import CPGNet, picked_mask
from growcli.cl.phases import TaskData, accuracy, compact, grow, new_head, new_live, train
from growcli.core.errors import UsageError, VerificationFailed
from growcli.core.model import eval_mode


@dataclass(frozen=True)
class CPGConfig:
    """How each task is learned. Accuracies are fractions in [0, 1], measured on the task's validation split
    (its training data when it has none)."""

    epochs: int = 10  # training epochs of the pick phase, and again after every growth
    lr: float = 1e-2  # Adam learning rate (weights, heads and mask logits)
    batch_size: int = 32
    prune_ratio: float = 0.5  # fraction of each task's own hidden weights compact releases
    keep_accuracy: float | None = None  # allowed accuracy drop while pruning; a step that drops more is undone
    prune_steps: int = 3
    prune_epochs: int | None = None  # retraining epochs after each pruning step (default: half of epochs, ≥ 1)
    accuracy_goal: float | None = None  # grow while the task's accuracy is below this
    grow_by: int = 8  # units added to every hidden layer per growth
    max_grows: int = 2
    mask_init: float = 0.01  # initial mask logits (> 0: every earlier weight picked at first)
    probe_size: int = 16  # inputs per task whose outputs are checked after every later task
    seed: int = 0

    def __post_init__(self):
        for key in ("epochs", "prune_steps", "grow_by", "batch_size", "probe_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < (0 if key == "epochs" else 1):
                raise UsageError(f"{key} must be a {'non-negative' if key == 'epochs' else 'positive'} integer, "
                                 f"got {getattr(self, key)!r}")
        if not 0 <= self.prune_ratio < 1:
            raise UsageError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if self.keep_accuracy is not None and not 0 <= self.keep_accuracy <= 1:
            raise UsageError(f"keep_accuracy must be in [0, 1], got {self.keep_accuracy}")
        if self.accuracy_goal is not None and not 0 <= self.accuracy_goal <= 1:
            raise UsageError(f"accuracy_goal must be in [0, 1], got {self.accuracy_goal}")
        if self.lr <= 0 or self.max_grows < 0 or (self.prune_epochs is not None and self.prune_epochs < 0):
            raise UsageError("lr must be positive; max_grows and prune_epochs must be zero or more")

    def generator(self, task: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + task * 7919 + salt)


@dataclass
class TaskReport:
    """One row of the per-task table."""

    task: int
    accuracy: float  # right after learning it
    trained: float = 0.0  # its accuracy after pick (and grow), before compaction
    earlier: list[float | None] = field(default_factory=list)  # every earlier task's accuracy now (None: no data)
    owned: int = 0  # hidden-layer weights and biases the task owns after compaction
    units_added: int = 0
    grows: int = 0
    released: float = 0.0  # fraction of its own hidden weights compaction released
    picked: float | None = None  # fraction of the earlier tasks' entries its mask picked
    free: int = 0  # free entries left for later tasks
    grow_max_abs_diff: float | None = None  # the exact widen's verified difference (largest over growths)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def to_cpg(model: nn.Module, sample: torch.Tensor) -> CPGNet:
    """A :class:`CPGNet` with no task learned, built from a chain model (see :func:`growcli.cl.chain.read_chain`)."""
    eval_mode(model)
    stages, tensors = read_chain(model, ((sample[:2],), {}))
    return CPGNet.from_chain(stages, tensors, list(sample.shape[1:]))


def learn_tasks(model: nn.Module | CPGNet, tasks: Sequence[TaskData], config: CPGConfig = CPGConfig(), *,
                on_task: Callable[[TaskReport], None] | None = None) -> tuple[CPGNet, list[TaskReport]]:
    """Learn ``tasks`` one after the other with CPG; returns the network and one report per task.

    ``model`` is a chain of Linear/Conv layers (converted with :func:`to_cpg`) or a :class:`CPGNet`
    that has already learned tasks (the new tasks get the next ids). Raises
    :class:`VerificationFailed` if any earlier task's outputs change, :class:`UsageError` for bad
    task data, :class:`~growcli.core.errors.NotGrowableError` for a model CPG cannot share.
    """
    if not tasks:
        raise UsageError("cpg needs at least one task")
    if isinstance(model, CPGNet):
        net = model
    else:
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        net = to_cpg(model, tasks[0].input.to(dtype))
    while len(net.heads) > net.tasks:  # a head of a task that was never finished
        del net.heads[len(net.heads) - 1]
    dtype = net.layers[0].weight.dtype
    tasks = [_checked(task, i, dtype, net.input_shape) for i, task in enumerate(tasks)]
    probes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    data: dict[int, TaskData] = {}
    first = net.tasks
    for k in range(first):  # tasks learned before: random probes, outputs as they are now
        probe = torch.randn((config.probe_size, *net.input_shape), generator=config.generator(k, 97),
                            dtype=torch.float64).to(dtype)
        probes[k] = (probe, _outputs(net, probe, k))
    reports: list[TaskReport] = []
    for i, task_data in enumerate(tasks):
        t = first + i
        backup = copy.deepcopy(net)
        try:
            report = learn_one(net, t, task_data, config)
            probe = task_data.val()[0][:config.probe_size]
            probes[t], data[t] = (probe, _outputs(net, probe, t)), task_data
            verify_earlier(net, probes, t)
            report.earlier = [accuracy(net, *data[k].val(), k) if k in data else None for k in range(t)]
            for k in range(first, t):  # implied by the outputs above; checked on the whole validation split too
                if report.earlier[k] != reports[k - first].accuracy:
                    raise VerificationFailed(f"task {k}'s accuracy changed after learning task {t} "
                                             f"({reports[k - first].accuracy} → {report.earlier[k]})")
        except BaseException:  # the network is left as it was before this task
            vars(net).clear()
            vars(net).update(vars(backup))
            raise
        reports.append(report)
        if on_task is not None:
            on_task(report)
    return net, reports


def learn_one(net: CPGNet, t: int, data: TaskData, cfg: CPGConfig) -> TaskReport:
    """Pick, grow and compact task ``t``, then store its masks (the task is frozen from then on)."""
    gen = cfg.generator(t, 1)
    for layer in net.layers:  # the free entries (never used, or released by compaction) are the task's
        for n in layer.names():
            owner = layer.owner(n)
            owner[owner == 0] = t + 1
    live = new_live(net, cfg.mask_init)
    new_head(net, t, data, gen, live)
    fit = dict(lr=cfg.lr, batch_size=cfg.batch_size, gen=gen)
    train(net, t, data, live, epochs=cfg.epochs, **fit)
    report = TaskReport(task=t, accuracy=accuracy(net, *data.val(), t, live))
    while cfg.accuracy_goal is not None and report.accuracy < cfg.accuracy_goal and report.grows < cfg.max_grows:
        added, diff = grow(net, t, live, data.input, cfg.grow_by, cfg.seed * 1_000_003 + t * 7919 + report.grows,
                           cfg.mask_init)
        report.units_added += added
        report.grows += 1
        report.grow_max_abs_diff = max(diff, report.grow_max_abs_diff or 0.0)
        train(net, t, data, live, epochs=cfg.epochs, **fit)
        report.accuracy = accuracy(net, *data.val(), t, live)
    report.trained = report.accuracy
    epochs = cfg.prune_epochs if cfg.prune_epochs is not None else max(1, cfg.epochs // 2)
    report.released = compact(net, t, data, live, ratio=cfg.prune_ratio, steps=cfg.prune_steps, epochs=epochs,
                              keep_accuracy=cfg.keep_accuracy, **fit)
    old = picked = 0
    for layer, logits in zip(net.layers, live):
        for n in layer.names():
            owner = layer.owner(n)
            mask = picked_mask(owner, logits[n].detach(), t)
            layer.set_mask(t, n, mask)
            earlier = (owner >= 1) & (owner <= t)
            old, picked = old + int(earlier.sum()), picked + int((earlier & mask).sum())
    for p in net.heads[t].parameters():
        p.requires_grad_(False)
    report.picked = picked / old if old else None
    report.accuracy = accuracy(net, *data.val(), t)
    report.owned, report.free = net.owned(t), net.free()
    return report


def verify_earlier(net: CPGNet, probes: dict[int, tuple[torch.Tensor, torch.Tensor]], now: int) -> None:
    """Every task's outputs on its probe batch are bit-identical to the ones recorded when it was learned."""
    for k in sorted(probes):
        if k == now:
            continue
        probe, expected = probes[k]
        got = _outputs(net, probe, k)
        if got.shape != expected.shape or not torch.equal(got, expected):
            diff = float((got.double() - expected.double()).abs().max()) if got.shape == expected.shape else float("inf")
            raise VerificationFailed(f"task {k}'s outputs changed after learning task {now} (max abs diff {diff:.3g} "
                                     f"on {len(probe)} probe inputs); CPG must leave earlier tasks bit-identical")


def _outputs(net: CPGNet, x: torch.Tensor, task: int) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(x, task)


def _checked(task: TaskData, i: int, dtype: torch.dtype, input_shape: list[int]) -> TaskData:
    """The task with float inputs in the model's dtype and int64 targets; refuses malformed data naming it."""
    name = task.name or f"task {i}"
    pairs = [("input", "target")] + ([("val_input", "val_target")] if task.val_input is not None else [])
    if (task.val_input is None) != (task.val_target is None):
        raise UsageError(f"{name}: give both val_input and val_target, or neither")
    out = {}
    for xk, yk in pairs:
        x, y = getattr(task, xk), getattr(task, yk)
        if not x.is_floating_point() or list(x.shape[1:]) != list(input_shape) or len(x) == 0:
            raise UsageError(f"{name}: {xk} must be a non-empty float tensor of shape [N, {', '.join(map(str, input_shape))}], "
                             f"got {x.dtype} {list(x.shape)}")
        if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.dtype == torch.bool or (len(y) and int(y.min()) < 0):
            raise UsageError(f"{name}: {yk} must hold one class index (an integer ≥ 0) per {xk} row, "
                             f"got {y.dtype} {list(y.shape)}")
        out[xk], out[yk] = x.to(dtype), y.to(torch.int64)
    return TaskData(name=name, **out)
