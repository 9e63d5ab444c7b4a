"""The CPG network: hidden layers shared by every task, an owner per weight, a mask and a head per task.

Every weight (and bias) of a hidden layer has an owner: ``0`` free (never trained, or released by
pruning), ``k + 1`` kept by task ``k``. Task ``k`` computes with a stored boolean mask
``mask{k}_weight`` over the layer as it was when ``k`` was learned: the weights ``k`` owns plus
the earlier tasks' weights ``k`` picked. Inference for task ``k`` is
``torch.where(mask_k, W[:o_k, :i_k], 0)`` — only the entries the mask selects are read, of a
block whose shape is fixed when ``k`` is learned — followed by ``heads[k]``. Later tasks only
change free weights and append units (rows and columns past ``o_k``, ``i_k``), so task ``k``'s
outputs stay bit-identical (see :mod:`growcli.cl.driver`, which checks it after every task).
Everything inference needs is a parameter or a buffer, so a state_dict is the whole model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from growcli.cl.chain import Op, conv, run_op
from growcli.core.errors import UsageError

OWNER_DTYPE = torch.int16  # owner k + 1 of task k: up to 32766 tasks


class SharedLayer(nn.Module):
    """One hidden Linear/Conv layer: the shared weight and bias, their owners, every learned task's masks."""

    def __init__(self, stage: dict[str, Any], weight: torch.Tensor, bias: torch.Tensor | None,
                 owners: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.stage = dict(stage)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        for name in self.names():
            own = (owners or {}).get(name)
            self.register_buffer(f"{name}_owner", own if own is not None else
                                 torch.zeros(getattr(self, name).shape, dtype=OWNER_DTYPE))

    def names(self) -> list[str]:
        return ["weight"] + (["bias"] if self.bias is not None else [])

    def owner(self, name: str) -> torch.Tensor:
        return self.get_buffer(f"{name}_owner")

    def mask(self, task: int, name: str) -> torch.Tensor:
        return self.get_buffer(f"mask{task}_{name}")

    def set_mask(self, task: int, name: str, mask: torch.Tensor) -> None:
        self.register_buffer(f"mask{task}_{name}", mask.clone())

    def effective(self, task: int, live: dict[str, torch.Tensor] | None) -> list[torch.Tensor | None]:
        """Weight and bias as task ``task`` sees them: stored masks, or (``live``) the current task's picking."""
        out: list[torch.Tensor | None] = []
        for name in ("weight", "bias"):
            value = getattr(self, name)
            if value is None:
                out.append(None)
            elif live is None:
                mask = self.mask(task, name)
                out.append(torch.where(mask, value[tuple(slice(0, s) for s in mask.shape)], 0.0))
            else:
                out.append(picked_value(value, self.owner(name), live[name], task))
        return out

    def forward(self, x: torch.Tensor, task: int, live: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        weight, bias = self.effective(task, live)
        return F.linear(x, weight, bias) if self.stage["op"] == "linear" else conv(x, weight, bias, self.stage)

    def extend(self, name: str, grown: torch.Tensor, owner: int) -> None:
        """Replace ``name`` by ``grown`` (the same tensor with units appended); keep the stored values in the old
        block (``grown`` holds the current task's view there) and give every new entry to ``owner``."""
        old = getattr(self, name).detach()
        block = tuple(slice(0, s) for s in old.shape)
        new = grown.detach().clone().to(old.dtype)
        new[block] = old
        own = torch.full(new.shape, owner, dtype=OWNER_DTYPE)
        own[block] = self.owner(name)
        setattr(self, name, nn.Parameter(new))
        self.register_buffer(f"{name}_owner", own)
        if name == "weight":
            self.stage["out"], self.stage["in"] = int(new.shape[0]), int(new.shape[1])


def picked_value(value: torch.Tensor, owner: torch.Tensor, logits: torch.Tensor, task: int) -> torch.Tensor:
    """The current task's view while it learns: its own entries (trainable), plus the earlier tasks' entries
    its mask picks (frozen values; the mask learns through a straight-through estimator)."""
    own = owner == task + 1
    old = (owner >= 1) & (owner <= task)
    hard = (logits > 0).to(value.dtype)
    ste = hard + (logits - logits.detach())  # forward: the binary mask; backward: the identity onto the logits
    return torch.where(own, value, 0.0) + torch.where(old, value.detach(), 0.0) * ste


def picked_mask(owner: torch.Tensor, logits: torch.Tensor, task: int) -> torch.Tensor:
    """What ``task`` reads once it is learned: its own entries and the earlier entries its mask picked."""
    return (owner == task + 1) | ((owner >= 1) & (owner <= task) & (logits > 0))


class CPGNet(nn.Module):
    """Shared hidden layers and one output head per task; ``model(x, task=k)`` computes task ``k``.

    ``stages`` is the chain (:func:`growcli.cl.chain.read_chain`); its last stage is the output
    layer every head is shaped like. ``input_shape`` is one sample's shape (without the batch).
    """

    def __init__(self, stages: list[dict[str, Any]], input_shape: list[int]):
        super().__init__()
        self.stages = [dict(s) for s in stages]
        self.input_shape = [int(s) for s in input_shape]
        self.layers = nn.ModuleList()
        self.heads = nn.ModuleList()
        self.source_head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the original output layer

    # ------------------------------------------------------------------ building
    @classmethod
    def from_chain(cls, stages: list[dict[str, Any]], tensors: dict[str, torch.Tensor],
                   input_shape: list[int]) -> "CPGNet":
        """A network with no task learned yet: every weight free, the original output layer kept for task 0."""
        net = cls(stages, input_shape)
        for i, stage in enumerate(stages[:-1]):
            if stage["op"] in ("linear", "conv"):
                net.layers.append(SharedLayer(stage, tensors[f"{i}.weight"], tensors.get(f"{i}.bias")))
        last = len(stages) - 1
        net.source_head = (tensors[f"{last}.weight"], tensors.get(f"{last}.bias"))
        return net

    @classmethod
    def from_state(cls, stages: list[dict[str, Any]], input_shape: list[int], state: dict[str, torch.Tensor],
                   tasks: int) -> "CPGNet":
        """Rebuild a saved network from its stages and state_dict (shapes come from the tensors)."""
        net = cls(stages, input_shape)
        hidden = [s for s in stages[:-1] if s["op"] in ("linear", "conv")]
        for j, stage in enumerate(hidden):
            p = f"layers.{j}."
            names = ["weight"] + (["bias"] if stage.get("bias") else [])
            layer = SharedLayer(stage, state[p + "weight"], state.get(p + "bias"),
                                {n: state[f"{p}{n}_owner"] for n in names})
            for k in range(tasks):
                for n in names:
                    layer.set_mask(k, n, state[f"{p}mask{k}_{n}"])
            net.layers.append(layer)
        for k in range(tasks):
            w, b = state[f"heads.{k}.weight"], state.get(f"heads.{k}.bias")
            net.heads.append(make_head(w, b))
        return net

    # ------------------------------------------------------------------ running
    @property
    def tasks(self) -> int:
        """How many tasks are learned (their masks are stored)."""
        return sum(1 for k in range(len(self.heads)) if hasattr(self.layers[0], f"mask{k}_weight"))

    def forward(self, x: torch.Tensor, task: int = 0, live: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """Task ``task``'s outputs (``live``: the picking of the task being learned, see :func:`picked_value`)."""
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(self.heads) \
                or (live is None and task >= self.tasks):
            raise UsageError(f"task {task!r}: this model has learned tasks 0..{self.tasks - 1}" if self.tasks else
                             f"task {task!r}: this model has learned no task yet")
        return self.heads[task](self.features(x, task, live))

    def features(self, x: torch.Tensor, task: int, live: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """What task ``task``'s head reads: the shared layers and the ops between them."""
        j = 0
        for stage in self.stages[:-1]:
            if stage["op"] in ("linear", "conv"):
                x = self.layers[j](x, task, live[j] if live is not None else None)
                j += 1
            else:
                x = run_op(x, stage)
        return x

    def dense_view(self, task: int, live: list[dict[str, torch.Tensor]]) -> nn.Sequential:
        """Task ``task``'s current network as plain torch layers (``layer{j}``, ``op{i}``, ``head``), for the widen."""
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        j = 0
        for i, stage in enumerate(self.stages[:-1]):
            if stage["op"] not in ("linear", "conv"):
                parts[f"op{i}"] = Op(stage)
                continue
            weight, bias = (t.detach().clone() if t is not None else None
                            for t in self.layers[j].effective(task, live[j]))
            parts[f"layer{j}"] = plain_layer(stage, weight, bias)
            j += 1
        head = self.heads[task]
        parts["head"] = make_head(head.weight.detach().clone(), head.bias.detach().clone() if head.bias is not None else None)
        return nn.Sequential(parts)

    def owned(self, task: int) -> int:
        """Number of hidden-layer weights and biases ``task`` owns."""
        return sum(int((layer.owner(n) == task + 1).sum()) for layer in self.layers for n in layer.names())

    def free(self) -> int:
        return sum(int((layer.owner(n) == 0).sum()) for layer in self.layers for n in layer.names())

    def metadata(self) -> dict[str, Any]:
        stages = [dict(s) for s in self.stages]
        j = 0
        for stage in stages[:-1]:
            if stage["op"] in ("linear", "conv"):
                stage.update(self.layers[j].stage)
                j += 1
        return {"format": "growcli.cpg", "version": 1, "stages": stages, "input_shape": self.input_shape,
                "tasks": self.tasks, "classes": [int(h.out_features) for h in self.heads]}


def make_head(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head


def plain_layer(stage: dict[str, Any], weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A torch Linear/Conv holding ``weight`` and ``bias`` with the stage's hyperparameters."""
    if stage["op"] == "linear":
        layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    else:
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[stage["dims"] - 1]
        layer = cls(weight.shape[1], weight.shape[0], stage["kernel"], stage["stride"], stage["padding"],
                    stage["dilation"], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer
