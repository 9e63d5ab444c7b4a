"""Progressive columns (Rusu et al. 2016): one column per task, old columns frozen, lateral adapters.

:class:`Columns` holds the original model unchanged as column 0 and :class:`Column` s added for
new tasks. A column runs the *chain* the original computes — a sequence of layers (Linear,
Conv or ConvTranspose) with element-wise activations, BatchNorm, pooling and flattening between them — read from
the model's ``torch.export`` trace by :mod:`growcli.transforms.column` and stored as a JSON
``plan``. Layer ``i`` of column ``k`` computes

    ``z_i^k = layer_i^k(h_{i-1}^k) + Σ_{j<k} U_i^{k,j}(h_{i-1}^j)``

where ``h_{i-1}^j`` is the input of column ``j``'s layer ``i`` and ``U`` a lateral adapter
(a bias-free Linear, or a conv — transposed into a transposed layer). ``forward(x, task=k)`` returns column ``k``'s output; task 0
is ``base(x)`` itself, so the original task's output is the original's, bit for bit, and an
old column never reads a newer one, so every old task is unchanged too. Old columns are frozen:
``requires_grad=False`` on their parameters, and eval mode (BatchNorm statistics never move)
whatever ``train()`` asks. Recipe: docs/recipes.md#column.
"""

from __future__ import annotations

import json
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from growcli.core.errors import FormatError, UsageError

__all__ = ["ColumnOp", "Column", "Columns"]

aten = torch.ops.aten

# The parameter-free ops a column may run between its layers, by "name.overload": element-wise
# activations (positions pass through unchanged), pooling over trailing dims and flattening.
# A recorded plan names ops from this table only; nothing else is ever looked up.
OPS = {f"{op.__name__}": op for op in (
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
    aten.hardtanh.default, aten.relu6.default, aten.leaky_relu.default, aten.elu.default, aten.hardswish.default,
    aten.hardsigmoid.default, aten.mish.default, aten.softplus.default, aten.max_pool1d.default,
    aten.max_pool2d.default, aten.max_pool3d.default, aten.avg_pool1d.default, aten.avg_pool2d.default,
    aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default, aten.flatten.using_ints, aten.dropout.default,
)}


class ColumnOp(nn.Module):
    """One parameter-free op of a column's chain: ``OPS[op](x, *args)``; ``op`` must be in :data:`OPS`.

    ``kwargs`` is a list of ``[name, value]`` pairs. ``reshape`` is special: it keeps the batch
    dimension and gives the rest the recorded ``args``.
    """

    def __init__(self, op: str, args: list | None = None, kwargs: list | None = None):
        super().__init__()
        if op != "reshape" and op not in OPS:
            raise FormatError(f"column op {op!r} is not one growcli runs between a column's layers")
        self.op, self.args, self.kwargs = op, list(args or []), [list(kv) for kv in kwargs or []]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "reshape":
            return x.reshape(x.shape[0], *self.args)
        return OPS[self.op](x, *self.args, **dict(self.kwargs))

    def growcli_spec(self) -> dict:
        return {"op": self.op, "args": self.args, "kwargs": self.kwargs}

    def extra_repr(self) -> str:
        return f"{self.op}{tuple(self.args) if self.args else ''}"


_MAX_WEIGHT = 2**31  # elements of one layer built from a recorded plan; real weights must match it anyway
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _conv_class(item: dict, geometry: dict):
    """The conv module class of a plan item, and the geometry keywords (``output_padding`` when transposed)."""
    keywords = {k: tuple(geometry[k]) for k in ("stride", "padding", "dilation")}
    if item.get("transposed"):
        keywords["output_padding"] = tuple(geometry.get("output_padding") or [0] * item["dims"])
        return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[item["dims"]], keywords
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[item["dims"]], keywords


def _layer(item: dict, dtype: torch.dtype) -> nn.Module:
    size = item["in"] * item["out"] * math.prod(item.get("kernel") or [1])
    if not all(isinstance(v, int) and v > 0 for v in (item["in"], item["out"])) or size > _MAX_WEIGHT:
        raise FormatError(f"column plan: a layer of {item['in']} → {item['out']} features is malformed or implausibly large")
    if item["kind"] == "linear":
        return nn.Linear(item["in"], item["out"], bias=item["bias"] is not None, dtype=dtype)
    conv, keywords = _conv_class(item, item)
    return conv(item["in"], item["out"], tuple(item["kernel"]), **keywords, groups=item["groups"],
                bias=item["bias"] is not None, dtype=dtype)


def _adapter(item: dict, dtype: torch.dtype, kind: str) -> nn.Module:
    """The lateral adapter into this layer: a bias-free Linear, or a conv of the recorded geometry ``kind``."""
    if item["kind"] == "linear":
        return nn.Linear(item["in"], item["out"], bias=False, dtype=dtype)
    if kind not in item["adapters"]:
        raise UsageError(f"adapter {kind!r}: expected one of {', '.join(item['adapters'])}")
    a = item["adapters"][kind]
    conv, keywords = _conv_class(item, a)
    return conv(item["in"], item["out"], tuple(a["kernel"]), **keywords, bias=False, dtype=dtype)


def _module(item: dict, dtype: torch.dtype) -> nn.Module:
    if item["kind"] in ("linear", "conv"):
        return _layer(item, dtype)
    if item["kind"] == "bn":
        bn = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[item["dims"]]
        return bn(item["channels"], eps=item["eps"], affine=item["weight"] is not None, dtype=dtype)
    return ColumnOp(item["op"], item.get("args"), item.get("kwargs"))


def parse_plan(plan: str) -> list[dict]:
    try:
        items = json.loads(plan)
    except json.JSONDecodeError as exc:
        raise FormatError(f"column plan is not valid JSON ({exc.msg})") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) and i.get("kind") in ("linear", "conv", "bn", "op")
                                             for i in items):
        raise FormatError("column plan must be a list of linear, conv, bn and op items")
    return items


def init_uniform_(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default scale, drawn from ``generator``: weights and biases ~ U(±1/√fan_in); BatchNorm 1, 0."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LAYERS):  # weight[0]: a transposed conv's out/groups·k, PyTorch's own fan-in
                bound = 1.0 / max(1, m.weight[0].numel()) ** 0.5
                m.weight.copy_((torch.rand(m.weight.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
                if m.bias is not None:
                    m.bias.copy_((torch.rand(m.bias.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()


class Column(nn.Module):
    """A new column: the plan's chain with fresh layers, and adapters from ``previous`` older columns.

    ``items[i]`` runs plan item ``i``; ``laterals[l][j]`` is the adapter from column ``j``'s input of
    layer ``l + 1`` into this column's layer ``l + 1`` (the first layer reads only the input).
    """

    def __init__(self, plan: str, previous: int, dtype: torch.dtype = torch.float32, adapter: str = "1x1"):
        super().__init__()
        items = parse_plan(plan)
        self.plan, self.previous, self.dtype, self.adapter = plan, int(previous), dtype, adapter
        self.items = nn.ModuleList([_module(i, dtype) for i in items])
        layers = [i for i in items if i["kind"] in ("linear", "conv")]
        self.laterals = nn.ModuleList([nn.ModuleList([_adapter(i, dtype, adapter) for _ in range(self.previous)])
                                       for i in layers[1:]])

    def forward(self, x: torch.Tensor, taps: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """This column's output and its layers' inputs (layers 1…), given the older columns' ``taps``."""
        mine: list[torch.Tensor] = []
        layer = 0
        for module in self.items:
            if isinstance(module, LAYERS):
                z = module(x)
                if layer:
                    mine.append(x)
                    for j, adapter in enumerate(self.laterals[layer - 1]):
                        z = z + adapter(taps[j][layer - 1])
                layer += 1
                x = z
            else:
                x = module(x)
        return x, mine

    def growcli_spec(self) -> dict:
        return {"plan": self.plan, "previous": self.previous, "dtype": self.dtype, "adapter": self.adapter}


def _tensor(module: nn.Module, name: str | None) -> torch.Tensor | None:
    return None if name is None else operator.attrgetter(name)(module)


def base_chain(base: nn.Module, items: list[dict], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Column 0's chain run on ``base``'s own tensors (named in the plan): its output and its layers' inputs."""
    taps: list[torch.Tensor] = []
    layer = 0
    for item in items:
        kind = item["kind"]
        if kind in ("linear", "conv"):
            if layer:
                taps.append(x)
            layer += 1
            w, b = _tensor(base, item["weight"]), _tensor(base, item["bias"])
            if kind == "linear":
                x = F.linear(x, w, b)
            elif item.get("transposed"):
                conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[item["dims"]]
                x = conv(x, w, b, item["stride"], item["padding"], item["output_padding"], item["groups"], item["dilation"])
            else:
                conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[item["dims"]]
                x = conv(x, w, b, item["stride"], item["padding"], item["dilation"], item["groups"])
        elif kind == "bn":
            x = F.batch_norm(x, _tensor(base, item["mean"]), _tensor(base, item["var"]), _tensor(base, item["weight"]),
                             _tensor(base, item["bias"]), False, 0.0, item["eps"])
        else:
            x = ColumnOp(item["op"], item.get("args"), item.get("kwargs"))(x)
    return x, taps


class Columns(nn.Module):
    """Column 0 (``base``, the original model, unchanged) and newer ``columns``; ``forward(x, task=0)``.

    ``task`` is a Python int, or an integer tensor with one element (then every column runs and
    the output is picked by indexing, so an exported program keeps the task as an input).
    The first ``frozen`` columns (column 0 is ``base``) are frozen: no gradients, eval mode.
    Built from its recorded ``plan`` with a placeholder base; the grown model's recorded edits
    then put the original in as ``base`` and insert the columns.
    """

    def __init__(self, plan: str = "[]", frozen: int = 1, base: nn.Module | None = None):
        super().__init__()
        self.base = base if base is not None else nn.Identity()
        self.columns = nn.ModuleList()
        self.plan = plan
        self._items = parse_plan(plan)
        self.frozen = frozen

    @property
    def tasks(self) -> int:
        return 1 + len(self.columns)

    @property
    def frozen(self) -> int:
        return self._frozen

    @frozen.setter
    def frozen(self, value: int) -> None:
        """Freeze the first ``value`` columns (set as a recorded attribute, so a replay freezes them too)."""
        value = int(value)
        if not 1 <= value <= self.tasks:
            raise UsageError(f"frozen {value}: expected 1 to {self.tasks} (the model has {self.tasks} columns)")
        self._frozen = value
        for k, col in enumerate(self._all()):
            for p in col.parameters():
                p.requires_grad_(k >= value)
        self.train(self.training)

    def _all(self) -> list[nn.Module]:
        return [self.base, *self.columns]

    def train(self, mode: bool = True) -> "Columns":
        """Train mode for the trainable columns only; frozen columns stay in eval mode."""
        self.training = mode
        for k, col in enumerate(self._all()):
            try:
                col.train(mode and k >= getattr(self, "_frozen", 1))
            except NotImplementedError:  # a loaded torch.export program is fixed in its export mode
                pass
        return self

    def forward(self, x: torch.Tensor, task: int | torch.Tensor = 0) -> torch.Tensor:
        if isinstance(task, torch.Tensor):
            outs = [self.base(x)]
            taps = [base_chain(self.base, self._items, x)[1]]
            for col in self.columns:
                out, mine = col(x, taps)
                outs.append(out)
                taps.append(mine)
            return torch.stack(outs)[task.reshape(())]
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.tasks:
            raise UsageError(f"task {task!r}: expected an int from 0 to {self.tasks - 1} (one per column)")
        if task == 0:
            return self.base(x)
        taps = [base_chain(self.base, self._items, x)[1]]
        for col in self.columns[:task]:
            out, mine = col(x, taps)
            taps.append(mine)
        return out

    def growcli_output_refusal(self, fmt: str) -> str | None:
        """Why a columns model is not written as ``fmt`` (``None``: it can be)."""
        if fmt in ("pt2", "onnx"):
            return (f"a {fmt} program exported on the sample inputs would fix task=0 (torch.export specialises a Python "
                    "int), losing the other tasks; write .safetensors (growcli.load_grown rebuilds every column), or "
                    "export with the task as a tensor: torch.export.export(model, (x,), {'task': torch.tensor(0)})")
        return None

    def growcli_spec(self) -> dict:
        return {"plan": self.plan, "frozen": 1}  # the base and columns are recorded edits of their own

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, frozen={self._frozen}"
