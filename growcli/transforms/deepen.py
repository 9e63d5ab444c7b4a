"""Net2DeeperNet and Network Morphism: insert layers and blocks that start as the identity.

Recipes: docs/recipes.md#deepen. What follows a layer is read from the
``torch.export`` trace, never from names:

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
- ``block`` inserts a copy of a residual block after it with its residual writers zeroed.
  On a Hugging Face checkpoint it can also stream (:func:`plan_streamed_blocks` plans it on
  the meta device as a stack layout; ``growcli.run.deepen_stream`` writes it).

This module holds the options and the entry point; the parts are
:mod:`growcli.transforms.deepen_layers` (reading a layer and its refusals),
:mod:`growcli.transforms.deepen_insert` (building and placing new layers) and
:mod:`growcli.transforms.deepen_blocks` (block copies).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from growcli.analysis.blocks import block_stacks
from growcli.analysis.trace import Trace, trace_model
from growcli.core.errors import NoMatchingModuleError, NotGrowableError, UsageError
from growcli.core.inputs import Batch, cast_batch, make_batches
from growcli.core.model import GrowModel, weights_default_dtype
from growcli.core.select import select
from growcli.nn import ACTIVATIONS
from growcli.transforms.deepen_blocks import analyse_block, block_names, insert_blocks, plan_copies
from growcli.transforms.deepen_insert import describe, insert_layer
from growcli.transforms.deepen_layers import layer_names, plan_layer, refusal
from growcli.transforms.registry import Context, StepReport, option, register
from growcli.transforms.stack import StackPlan


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
        with torch.no_grad(), weights_default_dtype(gm.module):
            gm.module(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError) as exc:  # the model's own code failing on a sample batch
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise NotGrowableError(f"deepen: the model's forward pass fails on a sample batch "
                               f"({type(exc).__name__}: {detail})") from None
    finally:
        for h in hooks:
            h.remove()
    missing = [m for m in modules if id(m) not in called]
    if missing:
        raise NotGrowableError(f"the inserted {describe(missing[0])} is never called by the model's forward pass, "
                               "so the model would not be deeper")


def plan_streamed_blocks(module: nn.Module, spec: DeepenSpec, batch: Batch) -> tuple[StackPlan, StepReport]:
    """``deepen --block`` decided on ``module`` (the meta device is fine) without changing it.

    Returns the stack layout with the writers to zero and the config values, and the step's
    report (without parameter counts or verification) — the same matched blocks, changes and
    notes as the in-memory :func:`deepen`. Raises :class:`UsageError` unless ``spec.block``,
    and what the in-memory path raises for the same blocks.
    """
    if not spec.block:
        raise UsageError("--streaming: deepen streams only --block (copies of residual blocks); drop --streaming "
                         "to insert layers")
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    args, kwargs = batch
    trace = trace_model(module, (tuple(a.to(device) for a in args), {k: v.to(device) for k, v in kwargs.items()}))
    report = StepReport("deepen", dataclasses.asdict(spec))
    report.matched = select(spec.after, block_names(module), "block")
    plan, report.changes, report.notes = plan_copies(trace, module, report.matched)
    return plan, report


def deepen_candidates(gm: GrowModel) -> dict[str, str | None]:
    """Each layer (and residual block, marked ``--block``) → ``None`` if deepen applies, else why not."""
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
                    analyse_block(trace, root, block)
                    out[f"{block} (--block)"] = None
                except NotGrowableError as exc:
                    out[f"{block} (--block)"] = str(exc)
    return out


@register("deepen", DeepenSpec, exact=True, candidates=deepen_candidates,
          help="Insert layers or residual blocks that start as the identity (Net2DeeperNet, Network Morphism).",
          modes=("memory", "streaming"))
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
        inserted = insert_blocks(gm, trace, report.matched, report)
    else:
        report.matched = _select_layers(trace, root, spec.after)
        plans = [plan_layer(trace, root, name) for name in report.matched]
        for plan in plans:  # every layer is checked before any is changed
            reason = refusal(plan, spec)
            if reason:
                raise NotGrowableError(reason)
        for i, plan in enumerate(plans):
            insert_layer(gm, trace, plan, spec, ctx.generator(4001 + i), report)
        if spec.init == "morph" and spec.split in ("orthogonal", "svd"):
            report.notes.append(f"dense {spec.split} split: the layer's weight was replaced by the first factor and "
                                "the new layer holds the second (with the bias); their product equals the old "
                                "weight up to the rounding of the weights' dtype")
        inserted = []  # wrapped modules and graph calls run wherever the traced layer ran
    _check_runs(gm, inserted)
    report.params_after = gm.num_parameters()
    return report
