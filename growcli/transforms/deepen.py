"""Net2DeeperNet and Network Morphism: insert layers and blocks that start as the identity.

Recipes: GROWTH.md sections 2 and 3. What follows a layer is read from the ``torch.export``
trace, never from names:

- ``identity`` init adds a real layer — a square identity Linear or a Dirac conv, then the
  model's own activation φ — *after* φ: ``layer → φ → [new → φ]``. That is exact only when
  ``φ(φ(x)) = φ(x)`` (ReLU, ReLU6, hard clipping); after GELU, tanh, SiLU… it is refused
  (use ``morph``). When no activation follows the layer (an output layer, a conv feeding a
  residual add) the new layer is linear and goes right after the layer.
- ``morph`` init puts a parametric activation ``a·x + (1 − a)·φ(x)`` at ``a = 1`` between the
  layer and the new one: ``layer → Pφ → new``, exact after any activation. ``split`` chooses
  the two matrices: the layer as it is and an identity (``identity``), or a dense
  factorisation of the layer's ``W`` (``orthogonal``: ``(Q W, Qᵀ)``; ``svd``:
  ``(√S Vᵀ, U √S)``). Dense factors are exact up to the rounding of the weights' dtype.

Placement without changing the model's code: a module the forward calls is replaced by
``nn.Sequential(original, new layers…)`` (for identity init the module wrapped is the last
one before φ, e.g. the BatchNorm after a conv, and the Sequential re-applies φ before the
new layer: ``bn → φ → new``, and the forward's own φ follows); in a loaded ``.pt2`` program,
whose code is its graph, the new layers are called on the right graph node. ``block``
inserts a copy of a residual block after it with its residual writers zeroed
(:mod:`growcli.analysis.residual`).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from growcli.core.errors import NoMatchingModuleError, NotGrowableError, UsageError
from growcli.analysis.coupling import Trace, op_name, shape, trace_model, where
from growcli.core.inputs import Batch, cast_batch, make_batches
from growcli.core.model import GrowModel
from growcli.nn import (ACTIVATIONS, ParametricActivation, conv_class, dirac_conv, identity_batch_norm,
                        identity_linear, random_orthogonal, zero_pad_kernel)
from growcli.analysis.residual import (BlockAnalysis, data_users, depth_config_changes, in_scope, renumber_layer_idx,
                              residual_writers)
from growcli.core.select import select
from growcli.transforms.registry import Context, StepReport, option, register

aten = torch.ops.aten

LINEAR_OPS = {aten.linear.default}
CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
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


@dataclass(frozen=True)
class DeepenSpec:
    """Insert a layer after each layer matched by ``after`` (or, with ``block``, a block copy)."""

    after: str | list[str] = option(help="Layer (or, with block, block) to insert after: name, dotted suffix, glob or"
                                         " regex; a list inserts after each.")
    init: Literal["identity", "morph"] = option("identity", "identity (Net2DeeperNet: needs an idempotent activation such as ReLU after the layer) or morph (parametric activation a·x + (1−a)·φ(x) at a=1, exact after any layer).")
    activation: str | None = option(None, "φ of morph's parametric activation: relu, gelu, tanh, silu, … (default: "
                                          "the model's activation after the layer, else relu).")
    split: Literal["identity", "orthogonal", "svd"] | None = option(None, "morph only: identity (new layer = I), or a"
                                                                          " dense factorisation of the layer: "
                                                                          "orthogonal or svd.")
    kernel: int | None = option(None, "Kernel size of a new conv (odd; default: the layer's, 1 for a dense split).")
    bn: bool = option(False, "Add a BatchNorm that is the identity in eval mode.")
    block: bool = option(False, "Insert a copy of the residual block after it, with its residual writers zeroed (pre-"
                                "LN transformers, ResNets).")

    def __post_init__(self):
        problems = []
        if self.kernel is not None and (self.kernel < 1 or self.kernel % 2 == 0):
            problems.append(f"kernel {self.kernel}: the new conv needs an odd kernel size (an even kernel has no "
                            "centre tap, so no kernel of that size is the identity)")
        if self.activation is not None and self.init != "morph":
            problems.append("activation is for init morph (identity init reuses the model's own activation)")
        elif self.activation is not None and self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        if self.split is not None and self.init != "morph":
            problems.append("split is for init morph")
        if self.block and (self.init != "identity" or self.kernel is not None or self.bn):
            problems.append("block copies a whole residual block; it takes no init, kernel or bn")
        if problems:
            raise UsageError("; ".join(problems))


# --------------------------------------------------------------------------- analysis
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


def _scope(node: fx.Node) -> str | None:
    """The innermost module a node was computed in."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


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


def _groups(node: fx.Node) -> int:
    if node.target == aten.convolution.default:
        return int(node.args[8]) if len(node.args) > 8 else 1
    return int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))


def plan_layer(trace: Trace, root: nn.Module, name: str) -> LayerPlan:
    """Read layer ``name`` and its successors from the trace; :class:`NotGrowableError` if it cannot be deepened."""
    module = root.get_submodule(name)
    if not trace.is_model and not isinstance(module, (nn.Linear,) + CONV_TYPES):
        raise NotGrowableError(f"'{name}' is a {type(module).__name__}; deepen --after takes nn.Linear or "
                               "nn.Conv1d/2d/3d layers (or --block for a block in a stack)")
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
    if not trace.is_model and _scope(op) != name:
        raise NotGrowableError(f"'{name}''s weight is used by code outside its forward{where(op)}; wrapping "
                               "the module would not change that computation")
    if op.target == aten.convolution.default and op.args[6]:
        raise NotGrowableError(f"'{name}' is a transposed convolution; deepen inserts only after Linear and Conv")
    weight = module._parameters["weight"]
    conv = op.target in CONV_OPS
    plan = LayerPlan(name, "conv" if conv else "linear", weight.dim() - 2 if conv else 0, int(weight.shape[0]),
                     tuple(int(k) for k in weight.shape[2:]), _groups(op) if conv else 1, op, op,
                     fan_in=int(weight[0].numel()))
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


def _activation_module(node: fx.Node) -> nn.Module:
    """A module computing the traced idempotent activation ``node``."""
    base = getattr(node.target, "__name__", "").split(".")[0]
    if base in ("relu", "relu_"):
        return nn.ReLU()
    if base == "relu6":
        return nn.ReLU6()
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    return nn.Hardtanh(float(lo), float(hi))


def refusal(plan: LayerPlan, spec: DeepenSpec) -> str | None:
    """Why ``spec`` cannot deepen after ``plan``'s layer exactly, or ``None``: checked for every layer before any edit."""
    dense = spec.init == "morph" and spec.split in ("orthogonal", "svd")
    if spec.init == "identity" and plan.blocker:
        return plan.blocker
    if plan.kind == "conv" and not dense and any(k % 2 == 0 for k in _kernel(plan, spec)):
        return (f"'{plan.name}' has an even kernel {plan.kernel}: an identity conv needs an odd kernel (an even one "
                "has no centre tap); pass --kernel 1 or 3")
    if spec.bn and plan.kind == "linear" and len(shape(plan.op) or ()) != 2:
        return f"--bn after a Linear needs a [batch, features] output; '{plan.name}' gives {list(shape(plan.op) or [])}"
    if dense and plan.groups != 1:
        return (f"'{plan.name}' is a grouped convolution (groups={plan.groups}); a dense split would mix its output "
                "channels across groups; use --split identity")
    fan_in = plan.fan_in
    if spec.init == "morph" and spec.split == "svd" and plan.channels > fan_in:
        return (f"'{plan.name}' has more outputs ({plan.channels}) than inputs ({fan_in}), so an SVD split has fewer "
                "inner units than the new layer needs; use --split orthogonal")
    return None


# --------------------------------------------------------------------------- building
def _kernel(plan: LayerPlan, spec: DeepenSpec) -> tuple[int, ...]:
    """The new conv's kernel: ``--kernel`` in every dimension, else the layer's own."""
    return (spec.kernel,) * plan.dims if spec.kernel is not None else plan.kernel


def _identity(plan: LayerPlan, spec: DeepenSpec, like: torch.Tensor) -> nn.Module:
    if plan.kind == "linear":
        return identity_linear(plan.channels, dtype=like.dtype, device=like.device)
    return dirac_conv(plan.dims, plan.channels, _kernel(plan, spec), dtype=like.dtype, device=like.device)


def _factor(gm: GrowModel, plan: LayerPlan, spec: DeepenSpec, gen: torch.Generator) -> nn.Module:
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


def _describe(m: nn.Module) -> str:
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


def _deepen_layer(gm: GrowModel, trace: Trace, plan: LayerPlan, spec: DeepenSpec, gen: torch.Generator,
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
        seq = nn.Sequential(*parts, _activation_module(act)) if act is not None else nn.Sequential(*parts)
        seq.eval()  # a program is fixed in eval mode (its train()/eval() refuse), so its new layers are too
        name = _unique_child(root, f"{plan.name}.deepen")
        gm.edits.graph_call(root, after.name, name, seq)
        report.changes.append({"name": name, "before": f"(after {op_name(after)} of '{plan.name}')",
                               "after": "Sequential(" + ", ".join(_describe(m) for m in seq) + ")"})
        return
    anchor = plan.name if act is None else _anchor(trace, root, plan)
    original = root.get_submodule(anchor)
    inner = [_activation_module(act)] + parts if act is not None else parts
    seq = nn.Sequential(original, *inner).train(root.training)
    gm.edits.module(root, anchor, seq, refs={id(original): anchor})
    report.changes.append({"name": anchor, "before": _describe(original),
                           "after": "Sequential(" + ", ".join(_describe(m) for m in seq) + ")"})


def _anchor(trace: Trace, root: nn.Module, plan: LayerPlan) -> str:
    """The module whose output φ reads (the layer, or a BatchNorm after it), checked to be wrappable."""
    name = _scope(plan.last)
    module = root.get_submodule(name) if name else None
    if module is None or not isinstance(module, (nn.Linear,) + CONV_TYPES + BATCH_NORM_TYPES) \
            or in_scope(plan.act, name):
        raise NotGrowableError(f"the activation after '{plan.name}' reads {op_name(plan.last)}{where(plan.last)}, "
                               "which is not the output of a Linear, Conv or BatchNorm module growcli can wrap")
    owned = [n for n in trace.graph.nodes if n.op == "get_attr" and str(n.target).startswith(name + ".")]
    if any(u is not plan.last for n in owned for u in data_users(n)):
        raise NotGrowableError(f"'{name}' (between '{plan.name}' and its activation) is called more than once")
    return name


# --------------------------------------------------------------------------- blocks
def block_names(root: nn.Module) -> list[str]:
    """Every element of a ``ModuleList``/``Sequential``: the places a block copy can follow."""
    return [f"{n}.{i}" if n else str(i) for n, m in root.named_modules()
            if isinstance(m, (nn.ModuleList, nn.Sequential)) for i in range(len(m))]


def _deepen_blocks(gm: GrowModel, trace: Trace, spec: DeepenSpec, report: StepReport) -> list[nn.Module]:
    root = gm.module
    chosen = select(spec.after, block_names(root), "block")
    analyses: dict[str, BlockAnalysis] = {b: residual_writers(trace, root, b) for b in chosen}
    config = getattr(root, "config", None)
    new_blocks = []
    # Highest index first, so inserting does not move the blocks still to be copied.
    for block in sorted(chosen, key=lambda b: (b.rpartition(".")[0], -int(b.rpartition(".")[2]))):
        container, _, idx = block.rpartition(".")
        index = int(idx)
        seq = root.get_submodule(container)
        old_len = len(seq)
        # The copy shares the model's config object instead of cloning it.
        new = copy.deepcopy(seq[index], memo={id(config): config} if config is not None else None)
        gm.edits.insert(root, container, index + 1, new, {"type": "copy", "name": block})
        zeroed = analyses[block].zeroed()
        for rel in zeroed:
            full = ".".join(p for p in (container, str(index + 1), rel) if p)
            gm.edits.param(root, full, torch.zeros_like(root.get_parameter(full)))
        renumber_layer_idx(gm, container, index + 1)
        changes = depth_config_changes(root, container, index + 1, old_len)
        if changes is None:
            report.notes.append(f"no config value describes the new depth of '{container}'; a Hugging Face "
                                "directory output will be refused (.safetensors + growcli.load_grown works)")
        for key, value in (changes or {}).items():
            gm.edits.config(root, key, value)
        report.changes.append({"name": container or "(root)", "before": f"{old_len} blocks",
                               "after": f"{old_len + 1} blocks: a copy of '{block}' at index {index + 1} with "
                                        f"zeroed residual writers {', '.join(zeroed)}"})
        new_blocks.append(new)
    for a in analyses.values():
        if a.post:
            report.notes.append(f"'{a.name}' ends in {', '.join(a.post)} after its residual add; exact because "
                                "the copy receives that activation's output, on which it is the identity")
    return new_blocks


# --------------------------------------------------------------------------- entry
def _select_layers(trace: Trace, root: nn.Module, after: str | list[str]) -> list[str]:
    candidates = layer_names(trace, root)
    try:
        return select(after, candidates, "layer")
    except NoMatchingModuleError:
        for pattern in [after] if isinstance(after, str) else after:
            try:
                module = root.get_submodule(pattern)
            except AttributeError:
                continue
            if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module):
                hint = f" (it holds {len(module)} blocks: to copy one, pass --block --after {pattern}.{len(module) - 1})"
            else:
                hint = " (add --block to insert a copy of this block)" if pattern in block_names(root) else ""
            raise NotGrowableError(f"'{pattern}' is a {type(module).__name__}; deepen --after takes a Linear or "
                                   f"Conv layer{hint}") from None
        raise


def _sample(gm: GrowModel) -> Batch:
    """One input batch in the dtype of the model's weights (a float64 model cannot be traced on float32 inputs)."""
    batch = make_batches(gm.inputs, 1)[0]
    dtype = next((p.dtype for p in gm.module.parameters() if p.is_floating_point()), None)
    return cast_batch(batch, dtype) if dtype is not None else batch


def _check_runs(gm: GrowModel, modules: list[nn.Module]) -> None:
    """Refuse when an inserted block is never called by the forward (e.g. a loop bounded by a config value)."""
    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, _i, _o: called.add(id(mod))) for m in modules]
    try:
        args, kwargs = _sample(gm)
        with torch.no_grad():
            gm.module(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    missing = [m for m in modules if id(m) not in called]
    if missing:
        raise NotGrowableError(f"the inserted {_describe(missing[0])} is never called by the model's forward pass, "
                               "so the model would not be deeper")


def deepen_candidates(gm: GrowModel) -> dict[str, str | None]:
    """Each layer (and residual block, marked ``--block``) → ``None`` if deepen applies, else why not."""
    from growcli.analysis.blocks import block_stacks

    root = gm.module
    trace = trace_model(root, _sample(gm))
    out: dict[str, str | None] = {}
    for name in layer_names(trace, root):
        try:
            out[name] = refusal(plan_layer(trace, root, name), DeepenSpec(after=name))
        except NotGrowableError as exc:
            out[name] = str(exc)
    if not trace.is_model:
        for stack in block_stacks(root):
            for i in range(stack["length"]):
                block = f"{stack['name']}.{i}"
                try:
                    residual_writers(trace, root, block)
                    out[f"{block} (--block)"] = None
                except NotGrowableError as exc:
                    out[f"{block} (--block)"] = str(exc)
    return out


@register("deepen", DeepenSpec, exact=True, candidates=deepen_candidates,
          help="Insert layers or residual blocks that start as the identity (Net2DeeperNet, Network Morphism).")
def deepen(gm: GrowModel, spec: DeepenSpec, ctx: Context) -> StepReport:
    """Insert identity-initialised layers after every layer matched by ``spec.after`` (blocks with ``spec.block``).

    Changes ``gm`` only through ``gm.edits``. Raises :class:`NotGrowableError` naming the
    operation that prevents an exact insertion, before changing anything where it can.
    """
    root = gm.module
    report = StepReport("deepen", dataclasses.asdict(spec), params_before=gm.num_parameters())
    trace = trace_model(root, _sample(gm))
    if spec.block:
        if trace.is_model:
            raise NotGrowableError("a .pt2 program has no block modules to copy (its forward is one flat graph); "
                                   "load the weights with --arch, or the Hugging Face directory, to insert blocks")
        report.matched = select(spec.after, block_names(root), "block")
        inserted = _deepen_blocks(gm, trace, spec, report)
    else:
        report.matched = _select_layers(trace, root, spec.after)
        plans = [plan_layer(trace, root, name) for name in report.matched]
        for plan in plans:  # every layer is checked before any is changed
            reason = refusal(plan, spec)
            if reason:
                raise NotGrowableError(reason)
        for i, plan in enumerate(plans):
            _deepen_layer(gm, trace, plan, spec, ctx.generator(4001 + i), report)
        if spec.init == "morph" and spec.split in ("orthogonal", "svd"):
            report.notes.append(f"dense {spec.split} split: the layer's weight was replaced by the first factor and "
                                "the new layer holds the second (with the bias); their product equals the old "
                                "weight up to the rounding of the weights' dtype")
        inserted = []  # wrapped modules and graph calls run wherever the traced layer ran
    _check_runs(gm, inserted)
    report.params_after = gm.num_parameters()
    return report
