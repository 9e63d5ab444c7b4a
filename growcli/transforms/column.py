"""Progressive columns (Rusu et al. 2016): a new column for a new task, old columns frozen.

Recipe: docs/recipes.md#column. The column's layer sequence is read from the ``torch.export``
trace, never from names: starting at the model's one input, every activation must have exactly
one consumer, and that consumer must be a Linear or Conv layer (transposed too) whose weight is a parameter, an
eval-mode BatchNorm, a parameter-free per-sample op of :data:`growcli.nn.columns.OPS`
(activations, pooling, flatten) or a view that keeps the batch dimension; the last one feeds the
output. Anything else — an activation read twice (a residual or a branch), an op that mixes
samples or that growcli cannot place — is refused, naming the op. The derived chain is then
run on the original's own weights and must reproduce the model's output exactly, or the step
is refused: the laterals would read activations the model does not compute.

The grown model is a :class:`growcli.nn.columns.Columns` whose column 0 is the original module
unchanged; ``forward(x, task=k)``, and the default ``task=0`` is the original task, so the
runner's comparison (default arguments) checks it. The step itself compares every old task.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from growcli.analysis.trace import (BATCH_NORM, CONV, CONV_TRANSPOSE, METADATA_CHECKS, VIEW, Trace, attr_of,
                                    conv_transposed, conv_weight_dims, flat_args, op_name, shape, trace_model, where)
from growcli.core.errors import NotGrowableError, VerificationFailed
from growcli.core.inputs import Batch, cast_batch, make_batches
from growcli.core.model import GrowModel
from growcli.core.module_specs import module_spec
from growcli.nn.columns import OPS, Column, Columns, base_chain, init_uniform_
from growcli.transforms.registry import Context, StepReport, option, register

aten = torch.ops.aten


@dataclass(frozen=True)
class ColumnSpec:
    """Add one column (a new task) to a sequential MLP or CNN, or to a model that already has columns."""

    adapter: Literal["1x1", "layer"] = option("1x1", "Lateral adapters into a conv layer: 1x1 (a 1×1 conv with the "
                                                     "layer's stride, where its output size matches the layer's; "
                                                     "else the layer's geometry) or layer (the layer's kernel, stride "
                                                     "and padding).")


def _sample(gm: GrowModel) -> Batch:
    """One input batch in the weights' dtype, without a ``task`` (the step passes each task itself)."""
    args, kwargs = make_batches(gm.inputs, 1)[0]
    batch = (args, {k: v for k, v in kwargs.items() if k != "task"})
    dtype = next((p.dtype for p in gm.module.parameters() if p.is_floating_point()), None)
    return cast_batch(batch, dtype) if dtype is not None else batch


def _consumers(node: fx.Node) -> list[fx.Node]:
    """The nodes that use ``node``'s value (the exporter's guard calls and metadata checks compute nothing)."""
    return [u for u in node.users if u.target not in METADATA_CHECKS and (u.users or u.op == "output")]


def _refuse(node: fx.Node, why: str) -> NotGrowableError:
    return NotGrowableError(f"column: {op_name(node)}{where(node)} ({node.name}) {why}; progressive columns need a "
                            "chain of Linear/Conv layers with per-sample ops between them")


def _params_only(node: fx.Node, data: fx.Node) -> None:
    """Refuse unless every tensor argument of ``node`` but ``data`` is a parameter or buffer."""
    for arg in flat_args(list(node.args) + list(node.kwargs.values())):
        if isinstance(arg, fx.Node) and arg is not data and attr_of(arg) is None:
            raise _refuse(node, f"also reads the computed value {arg.name} (a residual or a branch)")


def _ints(value, dims: int) -> list[int]:
    """A conv argument (an int, or a list of one per spatial dim or one for all) as one int per spatial dim."""
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return values * dims if len(values) == 1 else values


def _conv_item(node: fx.Node) -> dict:
    """A conv layer's plan item; a transposed one (weight ``[in, out/groups, k…]``) also records its output padding."""
    args = list(node.args)
    w = shape(args[1])
    dims = len(w) - 2
    transposed = conv_transposed(node)
    if node.target == aten.convolution.default:
        stride, padding, dilation, _, output_padding, groups = args[3:9]
    else:  # conv_transpose*(x, w, b, stride, padding, output_padding, groups, dilation); conv*(x, w, b, stride, padding, dilation, groups)
        rest = args[3:] + [None] * 5
        stride, padding = rest[0] or 1, rest[1] or 0
        output_padding, groups, dilation = (rest[2] or 0, rest[3] or 1, rest[4] or 1) if transposed else (0, rest[3] or 1, rest[2] or 1)
        if isinstance(padding, str):
            raise _refuse(node, f"uses padding={padding!r}")
    stride, padding, dilation = _ints(stride, dims), _ints(padding, dims), _ints(dilation, dims)
    out_dim, in_dim = conv_weight_dims(node)
    item = {"kind": "conv", "dims": dims, "weight": attr_of(args[1]), "bias": attr_of(args[2]) if len(args) > 2 else None,
            "in": w[in_dim] * (1 if transposed else int(groups)), "out": w[out_dim] * (int(groups) if transposed else 1),
            "kernel": list(w[2:]), "stride": stride, "padding": padding, "dilation": dilation, "groups": int(groups)}
    same = {"kernel": list(w[2:]), "stride": stride, "padding": padding, "dilation": dilation}
    one = {"kernel": [1] * dims, "stride": stride, "padding": [0] * dims, "dilation": [1] * dims}
    size_in, size_out = shape(args[0])[2:], shape(node)[2:]
    if transposed:
        item["transposed"], item["output_padding"] = True, _ints(output_padding, dims)
        same["output_padding"] = item["output_padding"]
        # a 1×1 transposed conv of the same stride gives (h − 1)·s + 1 + output padding positions
        extra = [o - ((h - 1) * s + 1) for h, s, o in zip(size_in, stride, size_out)]
        fits = all(0 <= e < s for e, s in zip(extra, stride))
        one["output_padding"] = extra if fits else [0] * dims
    else:
        fits = all((h - 1) // s + 1 == o for h, s, o in zip(size_in, stride, size_out))
    item["adapters"] = {"1x1": one if fits else same, "layer": same}
    return item


def _op_args(node: fx.Node) -> tuple[list, list]:
    values = list(node.args[1:]) + list(node.kwargs.values())
    if any(isinstance(v, fx.Node) for v in flat_args(values)):
        raise _refuse(node, "takes a computed argument")
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return [norm(v) for v in node.args[1:]], [[k, norm(v)] for k, v in node.kwargs.items()]


def chain_plan(trace: Trace) -> list[dict]:
    """The model's chain of layers and per-sample ops, from the input to the output (see the module doc).

    Raises :class:`NotGrowableError` naming the first op that does not fit a column.
    """
    graph = trace.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    if len(inputs) != 1:
        raise NotGrowableError(f"column: the model takes {len(inputs)} tensor inputs; progressive columns need exactly one")
    items: list[dict] = []
    node = inputs[0]
    while True:
        users = _consumers(node)
        if len(users) != 1:
            names = ", ".join(f"{op_name(u)} ({u.name})" for u in users) or "nothing"
            raise NotGrowableError(f"column: the value {node.name}{where(node)} is read by {names}: a branching or "
                                   "residual graph has no single chain of layers for the laterals to follow")
        user = users[0]
        if user.op == "output":
            if flat_args(user.args) != [node]:
                raise NotGrowableError("column: the model returns more than one value; a column has one output")
            break
        if user.op != "call_function" or not user.args or user.args[0] is not node:
            raise _refuse(user, "reads the activation other than as its data input")
        t = user.target
        _params_only(user, node)
        before, after = shape(node), shape(user)
        if t == aten.linear.default:
            if attr_of(user.args[1]) is None:
                raise _refuse(user, "has a computed weight")
            w = shape(user.args[1])
            items.append({"kind": "linear", "weight": attr_of(user.args[1]), "in": w[1], "out": w[0],
                          "bias": attr_of(user.args[2]) if len(user.args) > 2 else None})
        elif t in CONV or t in CONV_TRANSPOSE:
            if attr_of(user.args[1]) is None:
                raise _refuse(user, "has a computed weight")
            items.append(_conv_item(user))
        elif t in BATCH_NORM:
            items.append(_bn_item(user))
            if t != aten.batch_norm.default:  # returns (output, saved mean, saved invstd): follow the output
                outs = _consumers(user)
                if len(outs) != 1 or outs[0].target.__name__ != "getitem" or outs[0].args[1] != 0:
                    raise _refuse(user, "has its statistics read")
                user = outs[0]
        elif t in VIEW:
            if after[0] != before[0] or math.prod(after[1:]) != math.prod(before[1:]):
                raise _refuse(user, f"reshapes {list(before)} to {list(after)} across the batch dimension")
            items.append({"kind": "op", "op": "reshape", "args": list(after[1:])})
        elif getattr(t, "__name__", None) in OPS:
            if after is None or before is None or after[0] != before[0] or (
                    t == aten.flatten.using_ints and (user.args[1] if len(user.args) > 1 else 0) % len(before) == 0):
                raise _refuse(user, "mixes samples of the batch")
            args, kwargs = _op_args(user)
            items.append({"kind": "op", "op": t.__name__, "args": args, "kwargs": kwargs})
        else:
            raise _refuse(user, "cannot be placed in a column")
        node = user
    if not any(i["kind"] in ("linear", "conv") for i in items):
        raise NotGrowableError("column: the model has no Linear or Conv layer for a column to copy")
    return items


def _bn_item(node: fx.Node) -> dict:
    args = list(node.args)
    if node.target == aten.batch_norm.default:
        w, b, mean, var, training, _momentum, eps = args[1:8]
    else:  # _native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)
        w, b, mean, var, _momentum, eps = args[1:7]
        training = False
    if training or attr_of(mean) is None or attr_of(var) is None:
        raise _refuse(node, "normalises with batch statistics (training mode)")
    return {"kind": "bn", "dims": len(shape(node)) - 2, "channels": shape(node)[1], "eps": float(eps),
            "weight": attr_of(w), "bias": attr_of(b), "mean": attr_of(mean), "var": attr_of(var)}


def _outputs(model: nn.Module, batch: Batch, task: int) -> torch.Tensor:
    args, kwargs = batch
    with torch.no_grad():
        return model(*args, **kwargs) if task == 0 and not isinstance(model, Columns) else model(*args, task=task, **kwargs)


def _check_chain(root: nn.Module, items: list[dict], batch: Batch) -> None:
    """Refuse unless the derived chain, run on the original's weights, gives the model's output exactly."""
    args, kwargs = batch
    with torch.no_grad():
        want = root(*args, **kwargs)
        got = base_chain(root, items, args[0])[0]
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or not torch.equal(want, got):
        diff = float((want - got).abs().max()) if isinstance(want, torch.Tensor) and want.shape == got.shape else math.inf
        raise NotGrowableError(f"column: the chain of layers read from the trace does not reproduce the model's output "
                               f"(max abs diff {diff:.3g}), so its lateral structure cannot be derived from the trace")


def _wrap(gm: GrowModel, new: Columns) -> Columns:
    """Make ``new`` the model's root with the old root as its ``base``, recorded for replay."""
    wrap = getattr(gm.edits, "wrap", None)
    if wrap is not None:
        return wrap(gm.module, new, "base")
    # Until growcli.core.edits has EditLog.wrap: the same record, and the same change.
    spec = module_spec(new)
    new.base = gm.module
    gm.edits.records.append({"op": "wrap", "spec": spec, "child": "base"})
    return new


def column_candidates(gm: GrowModel) -> dict[str, str | None]:
    """``{"model": None}`` when a column can be added, else why not."""
    if isinstance(gm.module, Columns):
        return {"model": None}
    try:
        chain_plan(trace_model(gm.module, _sample(gm)))
        return {"model": None}
    except NotGrowableError as exc:
        return {"model": str(exc)}


@register("column", ColumnSpec, exact=True, candidates=column_candidates,
          help="Add a progressive-network column for a new task: old tasks exactly unchanged, old columns frozen.")
def column(gm: GrowModel, spec: ColumnSpec, ctx: Context) -> StepReport:
    """Add column ``k`` (task ``k``) to ``gm``; every old task's output stays bit-identical.

    Changes ``gm`` only through ``gm.edits`` (the first column wraps the original as column 0).
    Raises :class:`NotGrowableError` naming the op when the model is not a chain of layers, and
    :class:`VerificationFailed` if an old task's output changed.
    """
    root = gm.module
    report = StepReport("column", dataclasses.asdict(spec), params_before=gm.num_parameters())
    batch = _sample(gm)
    if isinstance(root, Columns):
        items, plan = root._items, root.plan
        old = [_outputs(root, batch, k) for k in range(root.tasks)]
    else:
        items = chain_plan(trace_model(root, batch))
        _check_chain(root, items, batch)
        plan = json.dumps(items, separators=(",", ":"))
        old = [_outputs(root, batch, 0)]
    weight = next((p for p in root.parameters() if p.is_floating_point()), None)
    tasks = len(old)
    new_col = Column(plan, previous=tasks, dtype=weight.dtype if weight is not None else torch.float32,
                     adapter=spec.adapter)
    init_uniform_(new_col, ctx.generator(1601 + tasks))
    if weight is not None:
        new_col.to(weight.device)
    if not isinstance(root, Columns):
        root = gm.module = _wrap(gm, Columns(plan))
    gm.edits.insert(root, "columns", tasks - 1, new_col, module_spec(new_col))
    gm.edits.attr(root, "", "frozen", tasks)
    report.matched = [f"task {tasks}"]
    layers = sum(i["kind"] in ("linear", "conv") for i in items)
    report.changes.append({"name": f"columns.{tasks - 1}", "before": f"{tasks} column(s)",
                           "after": f"{tasks + 1} columns ({layers} layers each, {tasks * (layers - 1)} lateral "
                                    "adapters into the new one)"})
    for k, want in enumerate(old):
        got = _outputs(root, batch, k)
        diff = float((got.double() - want.double()).abs().max()) if got.shape == want.shape else math.inf
        report.notes.append(f"task {k}: max abs diff {diff:.3g} against the model before the step "
                            f"({'bit-identical' if torch.equal(got, want) else 'DIFFERENT'})")
        if not torch.equal(got, want):
            raise VerificationFailed(f"column: task {k}'s output changed (max abs diff {diff:.3g})")
    frozen = sum(p.numel() for p in root.parameters() if not p.requires_grad)
    report.notes.append(f"columns 0-{tasks - 1} frozen ({frozen} parameters, requires_grad=False, eval mode); "
                        f"run task {tasks} with forward(x, task={tasks})")
    report.exact_in_dtype = True  # old tasks run the very same weights: bit-identical, checked above
    report.params_after = gm.num_parameters()
    return report

