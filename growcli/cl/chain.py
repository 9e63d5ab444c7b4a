"""Read a model as a chain of Linear/Conv layers, from its trace, and run the ops between them.

Compacting, Picking and Growing shares every hidden layer's weights among tasks, so it needs to
know exactly what the model computes: a chain ``layer → ops → layer → … → output layer`` where
each op between layers works on every unit on its own (element-wise activations, pooling,
flatten, spatial means). :func:`read_chain` reads that chain from the ``torch.export`` trace —
the rule is the graph's shape, never a class name — and refuses anything else (a branch, a
residual add, BatchNorm, attention) naming the operation. The chain is a list of JSON-ready
stage dicts; :func:`run_op` computes a non-layer stage.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from growcli.analysis.trace import (BATCH_NORM, CONV, METADATA_CHECKS, VIEW, attr_of, op_name, shape, trace_model,
                                    where)
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import Batch

aten = torch.ops.aten

WHAT = ("cpg needs a chain of Linear/Conv layers with element-wise activations, pooling or flatten between them "
        "and a Linear output layer")
# op → (activation name, names of its positional arguments after the input)
ACTIVATIONS = {
    aten.relu.default: ("relu", ()), aten.relu_.default: ("relu", ()), aten.tanh.default: ("tanh", ()),
    aten.sigmoid.default: ("sigmoid", ()), aten.silu.default: ("silu", ()), aten.silu_.default: ("silu", ()),
    aten.gelu.default: ("gelu", ()), aten.leaky_relu.default: ("leaky_relu", ("negative_slope",)),
    aten.elu.default: ("elu", ("alpha",)), aten.hardtanh.default: ("hardtanh", ("min_val", "max_val")),
    aten.hardtanh_.default: ("hardtanh", ("min_val", "max_val")), aten.relu6.default: ("relu6", ()),
}
# Ops that compute nothing in eval mode.
IDENTITY = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default, aten.clone.default,
            aten.contiguous.default, aten.alias.default, aten.detach.default}
POOLS = {aten.max_pool1d.default: ("max_pool", 1), aten.max_pool2d.default: ("max_pool", 2),
         aten.avg_pool1d.default: ("avg_pool", 1), aten.avg_pool2d.default: ("avg_pool", 2),
         aten.adaptive_avg_pool1d.default: ("adaptive_avg_pool", 1),
         aten.adaptive_avg_pool2d.default: ("adaptive_avg_pool", 2)}
POOL_ARGS = {"max_pool": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
             "avg_pool": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
             "adaptive_avg_pool": ("output_size",)}


def _refuse(node: fx.Node, why: str = "") -> NotGrowableError:
    return NotGrowableError(f"{WHAT}; {op_name(node)}{where(node)} is not one{': ' + why if why else ''}")


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def read_chain(module: nn.Module, batch: Batch) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The model's stages and their tensors, read from its trace on ``batch`` (one input tensor).

    Stages are ``{"op": "linear"|"conv", "name", "in", "out", "bias", …}`` for layers (the last
    one, a Linear, is the output layer), ``{"op": "act"|"pool"|"flatten"|"mean", …}`` between them;
    the tensors are ``"{i}.weight"``/``"{i}.bias"`` for stage ``i``. Raises
    :class:`NotGrowableError` naming the first operation that is not part of such a chain.
    """
    args, kwargs = batch
    if len(args) != 1 or kwargs:
        raise NotGrowableError(f"{WHAT}, with one input tensor; this model takes {len(args)} positional and "
                               f"{len(kwargs)} keyword inputs")
    trace = trace_model(module, batch)
    graph = trace.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise NotGrowableError(f"{WHAT}, with one input tensor; the traced model has {len(inputs)} inputs")
    cur = inputs[0]
    stages: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target in METADATA_CHECKS:
            continue
        data = node.args[0] if node.args else None
        if data is not cur:
            raise _refuse(node, "it does not read the output of the step before it (a branch or a second input)")
        if len(_readers(cur)) != 1:
            raise _refuse(node, "its input is read by more than one operation (a branch or a residual connection)")
        stage = _stage(trace.gm, node, tensors, len(stages))
        if stage is not None:
            stages.append(stage)
        cur = node
    outputs = [n for n in graph.nodes if n.op == "output"]
    out_args = [a for a in _flat(outputs[0].args) if isinstance(a, fx.Node)] if outputs else []
    if out_args != [cur] or not stages or stages[-1]["op"] != "linear":
        raise NotGrowableError(f"{WHAT}; this model's output is not the output of a Linear layer")
    if sum(s["op"] in ("linear", "conv") for s in stages) < 2:
        raise NotGrowableError(f"{WHAT}; this model has no hidden layer before its output layer to share among tasks")
    return stages, tensors


def _readers(node: fx.Node) -> list[fx.Node]:
    """The ops and outputs that read ``node`` (the exporter's guard and metadata checks compute nothing)."""
    return [u for u in node.users if u.op == "output" or (u.op == "call_function" and u.target not in METADATA_CHECKS)]


def _flat(args) -> list:
    out = []
    for a in args:
        out += _flat(a) if isinstance(a, (list, tuple)) else [a]
    return out


def _tensor(gm: fx.GraphModule, arg: Any, node: fx.Node, what: str) -> tuple[str, torch.Tensor]:
    name = attr_of(arg)
    if name is None:
        raise _refuse(node, f"its {what} is computed, not a parameter")
    return name, operator.attrgetter(name)(gm).detach().clone()


def _stage(gm: fx.GraphModule, node: fx.Node, tensors: dict[str, torch.Tensor], i: int) -> dict[str, Any] | None:
    """The stage a node is (``None`` for an op that computes nothing), its tensors into ``tensors``."""
    t, a = node.target, node.args
    if t in IDENTITY:
        return None
    if t == aten.linear.default or t in CONV:
        wname, weight = _tensor(gm, a[1], node, "weight")
        bias = a[2] if len(a) > 2 else node.kwargs.get("bias")
        stage: dict[str, Any] = {"op": "linear" if t == aten.linear.default else "conv",
                                 "name": wname.rpartition(".")[0] or wname, "in": int(weight.shape[1]),
                                 "out": int(weight.shape[0]), "bias": bias is not None}
        tensors[f"{i}.weight"] = weight
        if bias is not None:
            tensors[f"{i}.bias"] = _tensor(gm, bias, node, "bias")[1]
        if t in CONV:
            stage.update(_conv_args(node, weight))
        return stage
    if t in ACTIVATIONS:
        fn, names = ACTIVATIONS[t]
        if len(a) > len(names) + 1 and any(float(v) != 1.0 for v in a[len(names) + 1:]):
            raise _refuse(node, f"its extra arguments {list(a[len(names) + 1:])} (only plain {fn} is supported)")
        stage = {"op": "act", "fn": fn, **{k: float(v) for k, v in zip(names, a[1:])}}
        if fn == "gelu":
            stage["approximate"] = node.kwargs.get("approximate", a[1] if len(a) > 1 else "none")
        return stage
    if t in POOLS:
        kind, dims = POOLS[t]
        if len(a) > 1 + len(POOL_ARGS[kind]) and a[1 + len(POOL_ARGS[kind])] is not None:
            raise _refuse(node, "divisor_override is not supported")
        return {"op": "pool", "kind": kind, "dims": dims, **{k: _plain(v) for k, v in zip(POOL_ARGS[kind], a[1:])}}
    if t in VIEW or t == aten.flatten.using_ints:
        ins, outs = shape(a[0]), shape(node)
        if ins is None or outs is None or len(outs) != 2 or outs[1] != math.prod(ins[1:]) or outs[0] != ins[0]:
            raise _refuse(node, "only a flatten of every dimension after the batch keeps units in order")
        return {"op": "flatten"}
    if t == aten.mean.dim:
        ins = shape(a[0]) or ()
        dims = [d % len(ins) for d in (a[1] if isinstance(a[1], (list, tuple)) else [a[1]])]
        if not dims or min(dims) < 2:
            raise _refuse(node, "a mean may only run over spatial dimensions, not over units or the batch")
        return {"op": "mean", "dims": dims, "keepdim": bool(a[2] if len(a) > 2 else node.kwargs.get("keepdim", False))}
    if t in BATCH_NORM:
        raise _refuse(node, "its statistics and affine parameters would be shared by every task and change with each")
    raise _refuse(node)


def _conv_args(node: fx.Node, weight: torch.Tensor) -> dict[str, Any]:
    a = list(node.args) + [None] * 9
    if node.target == aten.convolution.default:
        stride, padding, dilation, transposed, groups = a[3], a[4], a[5], a[6], a[8]
        if transposed:
            raise _refuse(node, "a transposed convolution")
    else:
        stride, padding, dilation, groups = a[3], a[4], a[5], a[6]
    dims = weight.dim() - 2
    if isinstance(padding, str):
        raise _refuse(node, f"padding={padding!r}; give the padding as numbers")
    if (groups or 1) != 1:
        raise _refuse(node, f"a grouped convolution (groups={groups}) ties units together")

    def tup(v, default):
        v = default if v is None else v
        return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)] * dims
    return {"dims": dims, "kernel": [int(k) for k in weight.shape[2:]], "stride": tup(stride, 1),
            "padding": tup(padding, 0), "dilation": tup(dilation, 1)}


# --------------------------------------------------------------------------- running stages
def run_op(x: torch.Tensor, stage: dict[str, Any]) -> torch.Tensor:
    """Compute a non-layer stage (an activation, a pooling, flatten or a spatial mean) on ``x``."""
    op = stage["op"]
    if op == "act":
        fn = stage["fn"]
        if fn == "gelu":
            return F.gelu(x, approximate=stage.get("approximate", "none"))
        if fn == "leaky_relu":
            return F.leaky_relu(x, stage.get("negative_slope", 0.01))
        if fn == "elu":
            return F.elu(x, stage.get("alpha", 1.0))
        if fn == "hardtanh":
            return F.hardtanh(x, stage.get("min_val", -1.0), stage.get("max_val", 1.0))
        return {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "relu6": F.relu6}[fn](x)
    if op == "pool":
        kind, d = stage["kind"], stage["dims"]
        args = [stage[k] for k in POOL_ARGS[kind] if k in stage]
        fn = {"max_pool": (F.max_pool1d, F.max_pool2d), "avg_pool": (F.avg_pool1d, F.avg_pool2d),
              "adaptive_avg_pool": (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)}[kind][d - 1]
        if kind == "max_pool" and args and isinstance(args[0], list) and len(args) > 1 and args[1] == []:
            args[1] = None  # aten spells "stride = kernel" as an empty list
        if kind == "avg_pool" and len(args) > 1 and args[1] == []:
            args[1] = None
        return fn(x, *args)
    if op == "flatten":
        return x.flatten(1)
    if op == "mean":
        return x.mean(stage["dims"], keepdim=stage["keepdim"])
    raise NotGrowableError(f"cpg: unknown stage {op!r} in the model's structure")


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stage: dict[str, Any]) -> torch.Tensor:
    fn = (F.conv1d, F.conv2d, F.conv3d)[stage["dims"] - 1]
    return fn(x, weight, bias, stage["stride"], stage["padding"], stage["dilation"])


class Op(nn.Module):
    """A non-layer stage as a module (the dense view the exact widen is applied to)."""

    def __init__(self, stage: dict[str, Any]):
        super().__init__()
        self.stage = stage

    def forward(self, x):
        return run_op(x, self.stage)
