"""deepen --after: building the new layers and placing them after the layer, without changing the model's code.

Placement: a module the forward calls is replaced by ``nn.Sequential(original, new layers…)``
(for identity init the module wrapped is the last one before φ, e.g. the BatchNorm after a
conv, and the Sequential re-applies φ before the new layer: ``bn → φ → new``, and the
forward's own φ follows); in a loaded ``.pt2`` program, whose code is its graph, the new
layers are called on the right graph node. ``morph``'s dense splits rewrite the layer as the
first factor and put the second in the new layer (docs/recipes.md#deepen-network-morphism).
"""

from __future__ import annotations

import torch
from torch import nn

from growcli.analysis.trace import Trace, in_scope, module_of, op_name, where
from growcli.core.errors import NotGrowableError
from growcli.core.model import GrowModel
from growcli.nn import (ParametricActivation, conv_class, dirac_conv, identity_batch_norm, identity_linear,
                        random_orthogonal, zero_pad_kernel)
from growcli.transforms.deepen_layers import (BATCH_NORM_TYPES, CONV_TYPES, LayerOptions, LayerPlan, activation_module,
                                              data_users, kernel_of)
from growcli.transforms.registry import StepReport


def _identity(plan: LayerPlan, spec: LayerOptions, like: torch.Tensor) -> nn.Module:
    if plan.kind == "linear":
        return identity_linear(plan.channels, dtype=like.dtype, device=like.device)
    return dirac_conv(plan.dims, plan.channels, kernel_of(plan, spec), dtype=like.dtype, device=like.device)


def _factor(gm: GrowModel, plan: LayerPlan, spec: LayerOptions, gen: torch.Generator) -> nn.Module:
    """Rewrite the layer's weight as the first dense factor; return the second as a new layer (bias moves to it)."""
    root = gm.module
    layer = root.get_submodule(plan.name)
    weight, bias = layer._parameters["weight"], layer._parameters.get("bias")
    w = weight.detach().to(torch.float64).reshape(plan.channels, -1)
    if spec.split == "orthogonal":
        q = random_orthogonal(plan.channels, gen)
        first, second = q @ w, q.T
    else:  # refusal() made sure there are at least as many inputs as outputs
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root_s = s.sqrt()
        first, second = root_s[:, None] * vh, u * root_s[None, :]
    gm.edits.param(root, f"{plan.name}.weight", first.reshape(weight.shape).to(weight.dtype))
    if bias is not None:
        gm.edits.param(root, f"{plan.name}.bias", torch.zeros_like(bias))
    if plan.kind == "linear":
        new = nn.Linear(plan.channels, plan.channels, dtype=weight.dtype, device=weight.device)
        new_weight = second
    else:
        kernel = (spec.kernel,) * plan.dims if spec.kernel is not None else (1,) * plan.dims
        new = conv_class(plan.dims)(plan.channels, plan.channels, kernel, padding=tuple(k // 2 for k in kernel),
                                    dtype=weight.dtype, device=weight.device)
        new_weight = zero_pad_kernel(second.reshape(second.shape + (1,) * plan.dims), kernel)
    with torch.no_grad():
        new.weight.copy_(new_weight.to(weight.dtype))
        new.bias.copy_(bias.detach() if bias is not None else torch.zeros(plan.channels, dtype=weight.dtype))
    return new


def describe(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}→{m.out_features})"
    if isinstance(m, CONV_TYPES):
        return f"{type(m).__name__}({m.in_channels}→{m.out_channels}, k={'x'.join(map(str, m.kernel_size))})"
    if isinstance(m, ParametricActivation):
        return f"ParametricActivation({m.activation}, a=1)"
    return type(m).__name__


def _unique_child(root: nn.Module, base: str) -> str:
    name, i = base, 1
    while True:
        try:
            root.get_submodule(name)
        except AttributeError:
            return name
        name, i = f"{base}_{i}", i + 1


def insert_layer(gm: GrowModel, trace: Trace, plan: LayerPlan, spec: LayerOptions, gen: torch.Generator,
                  report: StepReport) -> None:
    """Insert the new layer(s) after ``plan.name`` (see the module docstring for where)."""
    root = gm.module
    like = root.get_submodule(plan.name)._parameters["weight"]
    if spec.init == "morph":
        phi = spec.activation or plan.phi or "relu"
        new = _identity(plan, spec, like) if (spec.split or "identity") == "identity" else _factor(gm, plan, spec, gen)
        parts: list[nn.Module] = [ParametricActivation(phi).to(dtype=like.dtype, device=like.device), new]
    else:
        new = _identity(plan, spec, like)
        parts = [new]
    if spec.bn:
        parts.append(identity_batch_norm(plan.dims, plan.channels, dtype=like.dtype, device=like.device))
    act = plan.act if spec.init == "identity" else None
    if act is None and spec.init == "identity":
        report.notes.append(f"no activation follows '{plan.name}' in the trace, so the new layer after it is linear "
                            "(use --init morph for a non-linear one)")
    if trace.is_model:  # a .pt2 program: call the new layers on the graph node
        after = act if act is not None else plan.op
        seq = nn.Sequential(*parts, activation_module(act)) if act is not None else nn.Sequential(*parts)
        seq.eval()  # a program is fixed in eval mode (its train()/eval() refuse), so its new layers are too
        name = _unique_child(root, f"{plan.name}.deepen")
        gm.edits.graph_call(root, after.name, name, seq)
        report.changes.append({"name": name, "before": f"(after {op_name(after)} of '{plan.name}')",
                               "after": "Sequential(" + ", ".join(describe(m) for m in seq) + ")"})
        return
    anchor = plan.name if act is None else _anchor(trace, root, plan)
    original = root.get_submodule(anchor)
    inner = [activation_module(act)] + parts if act is not None else parts
    seq = nn.Sequential(original, *inner).train(root.training)
    gm.edits.module(root, anchor, seq, refs={id(original): anchor})
    report.changes.append({"name": anchor, "before": describe(original),
                           "after": "Sequential(" + ", ".join(describe(m) for m in seq) + ")"})


def _anchor(trace: Trace, root: nn.Module, plan: LayerPlan) -> str:
    """The module whose output φ reads (the layer, or a BatchNorm after it), checked to be wrappable."""
    name = module_of(plan.last)
    module = root.get_submodule(name) if name else None
    if module is None or not isinstance(module, (nn.Linear,) + CONV_TYPES + BATCH_NORM_TYPES) \
            or in_scope(plan.act, name):
        raise NotGrowableError(f"the activation after '{plan.name}' reads {op_name(plan.last)}{where(plan.last)}, "
                               "which is not the output of a Linear, Conv or BatchNorm module growcli can wrap")
    owned = [n for n in trace.graph.nodes if n.op == "get_attr" and str(n.target).startswith(name + ".")]
    if any(u is not plan.last for n in owned for u in data_users(n)):
        raise NotGrowableError(f"'{name}' (between '{plan.name}' and its activation) is called more than once")
    return name


