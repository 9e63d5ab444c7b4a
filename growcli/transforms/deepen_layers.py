"""deepen --after: what the trace says about a layer and what follows it, and whether deepening it is exact.

:func:`plan_layer` reads the layer's op and the activation φ after it (through a BatchNorm)
from the ``torch.export`` trace, never from names; :func:`refusal` decides, for every layer
before any edit, whether the requested insertion is exact: identity init needs an idempotent
φ (φ(φ(x)) = φ(x): ReLU, ReLU6, hard clipping), an identity conv an odd kernel, a dense split
an ungrouped layer. Building the new layers is :mod:`growcli.transforms.deepen_insert`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import fx, nn

from growcli.analysis.trace import (CONV, CONV_TRANSPOSE, METADATA_CHECKS, Trace, conv_groups, conv_transposed,
                                    conv_weight_dims, module_of, op_name, shape, where)
from growcli.core.errors import NotGrowableError

aten = torch.ops.aten

LINEAR_OPS = {aten.linear.default}
# Transposed convolutions too: the identity after one is a Dirac conv on its output channels (weight dim 1).
CONV_OPS = CONV | CONV_TRANSPOSE  # string padding (``conv2d.padding``) included: the new layer sets its own padding
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

def _ops(*names: str) -> set:
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


# Activations with φ(φ(x)) = φ(x), and how to rebuild each as a module from its traced node.
IDEMPOTENT = _ops("relu", "relu_", "relu6", "hardtanh", "hardtanh_")
# Activations that are not idempotent: an identity layer after them changes the function.
NOT_IDEMPOTENT = _ops("gelu", "tanh", "sigmoid", "silu", "silu_", "elu", "elu_", "leaky_relu", "leaky_relu_",
                      "softplus", "mish", "hardswish", "hardsigmoid", "selu", "celu", "_prelu_kernel", "prelu",
                      "log_sigmoid", "rrelu", "softsign")
# Traced activation → φ of the parametric activation (morph's default).
_PHI = {"relu": "relu", "relu_": "relu", "relu6": "relu6", "gelu": "gelu", "tanh": "tanh", "sigmoid": "sigmoid",
        "silu": "silu", "silu_": "silu", "elu": "elu", "leaky_relu": "leaky_relu", "softplus": "softplus",
        "hardswish": "hardswish", "mish": "mish"}



class LayerOptions(Protocol):
    """The options of ``deepen`` that shape a layer insertion (``DeepenSpec`` has them)."""

    init: str
    activation: str | None
    split: str | None
    kernel: int | None
    bn: bool


def data_users(node: fx.Node) -> list[fx.Node]:
    """``node``'s users that compute something (the exporter's metadata assertions excluded)."""
    return [u for u in node.users if u.target not in METADATA_CHECKS]


@dataclass
class LayerPlan:
    """What the trace says about one layer and what follows it."""

    name: str
    kind: str  # "linear" or "conv"
    dims: int  # spatial dims of a conv, 0 for a linear
    channels: int
    kernel: tuple[int, ...]
    groups: int
    op: fx.Node  # the traced op computing the layer
    last: fx.Node  # the node φ reads: the layer op, or a BatchNorm after it
    act: fx.Node | None = None  # idempotent activation after the layer
    blocker: str | None = None  # why identity init must refuse (a non-idempotent activation)
    phi: str | None = None  # the following activation as a parametric-activation name
    fan_in: int = 0  # inputs per output unit: in_features, or in_channels/groups × kernel area
    transposed: bool = False  # a transposed convolution: weight [in, out/groups, k…]


def _weight_nodes(trace: Trace, root: nn.Module, name: str) -> list[fx.Node]:
    """The trace's nodes reading ``name``'s weight (several when it is tied to other parameters)."""
    weight = root.get_submodule(name)._parameters.get("weight")
    if weight is None:
        return []
    names = {n for n, p in root.named_parameters(remove_duplicate=False) if p is weight}
    return [n for n in trace.graph.nodes if n.op == "get_attr" and str(n.target) in names]


def layer_names(trace: Trace, root: nn.Module) -> list[str]:
    """Modules deepen can follow: Linear/Conv modules, or in a ``.pt2`` program the owners of linear/conv weights."""
    if not trace.is_model:
        return [n for n, m in root.named_modules() if n and isinstance(m, (nn.Linear,) + CONV_TYPES)]
    names = []
    for node in trace.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_OPS | CONV_OPS and isinstance(node.args[1], fx.Node) \
                and node.args[1].op == "get_attr" and str(node.args[1].target).endswith(".weight"):
            names.append(str(node.args[1].target)[: -len(".weight")])
    return list(dict.fromkeys(names))


def plan_layer(trace: Trace, root: nn.Module, name: str) -> LayerPlan:
    """Read layer ``name`` and its successors from the trace; :class:`NotGrowableError` if it cannot be deepened."""
    module = root.get_submodule(name)
    if not trace.is_model and not isinstance(module, (nn.Linear,) + CONV_TYPES):
        raise NotGrowableError(f"'{name}' is a {type(module).__name__}; deepen --after takes nn.Linear, "
                               "nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d layers (or --block for a block in a stack)")
    wnodes = _weight_nodes(trace, root, name)
    users = [u for w in wnodes for u in data_users(w)]
    if not users:
        raise NotGrowableError(f"'{name}' has no weight used by the traced model")
    ops = [u for u in users if u.target in LINEAR_OPS | CONV_OPS and u.args[1] in wnodes]
    if len(users) == 1 and not ops:
        raise NotGrowableError(f"'{name}''s weight is used by {op_name(users[0])}{where(users[0])}, not by a linear "
                               "or convolution op")
    if len(users) != 1:
        raise NotGrowableError(f"'{name}' is used {len(users)} times in the forward pass (shared weights or a "
                               "functional call), so there is no single place to insert a layer after it")
    op = ops[0]
    if not trace.is_model and module_of(op) != name:
        raise NotGrowableError(f"'{name}''s weight is used by code outside its forward{where(op)}; wrapping "
                               "the module would not change that computation")
    weight = module._parameters["weight"]
    conv = op.target in CONV_OPS
    transposed = conv and conv_transposed(op)
    groups = conv_groups(op) if conv else 1
    out_dim = conv_weight_dims(op)[0] if conv else 0
    plan = LayerPlan(name, "conv" if conv else "linear", weight.dim() - 2 if conv else 0,
                     int(weight.shape[out_dim]) * (groups if transposed else 1), tuple(int(k) for k in weight.shape[2:]),
                     groups, op, op, fan_in=int(weight[0].numel()), transposed=transposed)
    # Follow the output through per-channel affine ops (BatchNorm) to the activation.
    cur = op
    while True:
        nxt = data_users(cur)
        if len(nxt) != 1:
            break
        user = nxt[0]
        if user.target in BATCH_NORMS and user.args[0] is cur:
            cur = plan.last = user
            continue
        if user.target is operator.getitem and user.args[1] == 0 and cur.target in BATCH_NORMS:
            cur = plan.last = user  # the output of a BatchNorm op that also returns its statistics
            continue
        if user.target in IDEMPOTENT | NOT_IDEMPOTENT:
            plan.phi = _phi(user)
            if user.target in IDEMPOTENT:
                plan.act = user
            else:
                plan.blocker = (f"'{name}' is followed by {op_name(user)}{where(user)}, which is not idempotent "
                                f"({op_name(user)}({op_name(user)}(x)) ≠ {op_name(user)}(x)), so an identity layer "
                                "after it changes the function; use --init morph (a parametric activation that "
                                "starts as the identity)")
        break
    return plan


def _phi(node: fx.Node) -> str | None:
    base = getattr(node.target, "__name__", "").split(".")[0]
    if base == "gelu" and node.kwargs.get("approximate") == "tanh":
        return "gelu_tanh"
    if base in ("hardtanh", "hardtanh_"):
        lo = node.args[1] if len(node.args) > 1 else -1.0
        hi = node.args[2] if len(node.args) > 2 else 1.0
        return "relu6" if (lo, hi) == (0, 6) else None
    return _PHI.get(base)


def activation_module(node: fx.Node) -> nn.Module:
    """A module computing the traced idempotent activation ``node``."""
    base = getattr(node.target, "__name__", "").split(".")[0]
    if base in ("relu", "relu_"):
        return nn.ReLU()
    if base == "relu6":
        return nn.ReLU6()
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    return nn.Hardtanh(float(lo), float(hi))


def refusal(plan: LayerPlan, spec: LayerOptions) -> str | None:
    """Why ``spec`` cannot deepen after ``plan``'s layer exactly, or ``None``: checked for every layer before any edit."""
    dense = spec.init == "morph" and spec.split in ("orthogonal", "svd")
    if spec.init == "identity" and plan.blocker:
        return plan.blocker
    if plan.kind == "conv" and not dense and any(k % 2 == 0 for k in kernel_of(plan, spec)):
        return (f"'{plan.name}' has an even kernel {plan.kernel}: an identity conv needs an odd kernel (an even one "
                "has no centre tap); pass --kernel 1 or 3")
    if spec.bn and plan.kind == "linear" and len(shape(plan.op) or ()) != 2:
        return f"--bn after a Linear needs a [batch, features] output; '{plan.name}' gives {list(shape(plan.op) or [])}"
    if dense and plan.transposed:
        return (f"'{plan.name}' is a transposed convolution; a dense split factors [out, in] weights only; use "
                "--split identity")
    if dense and plan.groups != 1:
        return (f"'{plan.name}' is a grouped convolution (groups={plan.groups}); a dense split would mix its output "
                "channels across groups; use --split identity")
    fan_in = plan.fan_in
    if spec.init == "morph" and spec.split == "svd" and plan.channels > fan_in:
        return (f"'{plan.name}' has more outputs ({plan.channels}) than inputs ({fan_in}), so an SVD split has fewer "
                "inner units than the new layer needs; use --split orthogonal")
    return None




def kernel_of(plan: LayerPlan, spec: LayerOptions) -> tuple[int, ...]:
    """The new conv's kernel: ``--kernel`` in every dimension, else the layer's own."""
    return (spec.kernel,) * plan.dims if spec.kernel is not None else plan.kernel
