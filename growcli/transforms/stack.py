"""Progressive stacking: duplicate a model's stack of repeated blocks (docs/recipes.md#stack).

``copy`` init is Gong et al.'s progressive stacking (not function-preserving). ``identity``
init zeroes the *residual writers* of every new copy — the parameters of the last layer on
each branch that is added to the block's residual stream (LLaMA-Pro's block expansion) —
which is exact for pre-LN blocks and for ResNet blocks ``relu(x + F(x))`` whose copy follows
a block ending in the same relu. The writers are found from a ``torch.export`` trace of the
whole model (:mod:`growcli.analysis.residual`), never from a family's parameter names; a
block whose stream passes through a normalisation after the add (post-LN, BERT) is reported,
because zeroing cannot make it the identity there.

Everything that depends on depth follows the new layout (:mod:`growcli.analysis.depth`): the
``ModuleList`` itself (one recorded ``insert`` per new copy, so ``load_grown`` replays it),
integer index attributes such as ``layer_idx``, and the Hugging Face config's layer count and
per-layer lists. The planning functions here are shared with the streaming path
(``growcli.run.streaming``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import Batch, cast_batch, make_batches
from growcli.analysis.blocks import block_stacks, check_not_shared, check_repeated, find_stack
from growcli.analysis.residual import BlockWriters, ResidualRefusal, follows, stack_writers
from growcli.analysis.trace import Trace, trace_model
from growcli.core.model import GrowModel
from growcli.transforms.rebuilt import fit_layout
from growcli.transforms.registry import Context, StepReport, option, register

Order = Literal["stack", "interleave"]
Init = Literal["copy", "identity"]


@dataclass(frozen=True)
class StackSpec:
    """Options of ``stack``. At most one of ``factor``, ``to``, ``layers``; none means ``factor=2``.

    ``layers`` is an explicit map from new positions to source blocks, e.g. ``"0-11,4-11"``.
    ``allow_inexact`` lets ``identity`` proceed on post-LN blocks (reported as not exact).
    """

    blocks: str | None = option(None, "The ModuleList of blocks (default: the longest list of same-typed blocks).")
    factor: int | None = option(None, "Multiply the number of blocks by K (default 2).")
    to: int | None = option(None, "Grow the stack to N blocks.")
    order: Order = option("stack", "stack (1..L, 1..L) or interleave (1,1,2,2,…).")
    layers: str | None = option(None, "Explicit source block per new position, e.g. 0-11,4-11 (depth up-scaling).")
    init: Init = option("copy", "copy (progressive stacking; changes the function) or identity (new copies' residual writers zeroed; exact for pre-LN).")
    allow_inexact: bool = option(False, "Let identity proceed on post-LN blocks (reported as not exact).")

    def __post_init__(self):
        given = [f"--{k}" for k in ("factor", "to", "layers") if getattr(self, k) is not None]
        if len(given) > 1:
            raise UsageError(f"give only one of --factor, --to, --layers (got {' and '.join(given)})")
        if self.factor is not None and self.factor < 2:
            raise UsageError(f"--factor {self.factor}: expected an integer ≥ 2")
        if self.to is not None and self.to < 2:
            raise UsageError(f"--to {self.to}: expected a layer count ≥ 2")
        if self.layers is not None:
            if self.order != "stack":
                raise UsageError("--order does not apply to --layers, which lists the order itself")
            parse_layer_map(self.layers)
        if self.order not in ("stack", "interleave"):
            raise UsageError(f"--order {self.order!r}: expected stack or interleave")
        if self.init not in ("copy", "identity"):
            raise UsageError(f"--init {self.init!r}: expected copy or identity")


def parse_layer_map(text: str) -> list[int]:
    """``"0-11,4-11"`` → ``[0..11, 4..11]`` (ranges inclusive); :class:`UsageError` when malformed."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(f"--layers {text!r}: expected comma-separated indices or ranges like 0-11,4-11")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise UsageError(f"--layers {text!r}: range {lo}-{hi} runs backwards")
        out.extend(range(lo, hi + 1))
    return out


def layout(spec: StackSpec, length: int) -> list[int]:
    """The source block of every new position, for a stack of ``length`` blocks.

    Every original block must appear, and each block's first occurrence (the original, which
    keeps its weights) must come in the original order: reordering or dropping blocks is not
    growth. Raises :class:`UsageError` otherwise.
    """
    if spec.layers is not None:
        order = parse_layer_map(spec.layers)
        bad = sorted({i for i in order if i >= length})
        if bad:
            raise UsageError(f"--layers {spec.layers}: the stack has blocks 0-{length - 1}, not {bad[0]}")
        missing = sorted(set(range(length)) - set(order))
        if missing:
            raise UsageError(f"--layers {spec.layers}: every block must appear (missing {missing[:5]}); stack only adds blocks")
        firsts = list(dict.fromkeys(order))
        if firsts != list(range(length)):
            raise UsageError(f"--layers {spec.layers}: blocks must first appear in their original order 0,1,2,…; "
                             "reordering existing blocks is not growth")
    else:
        total = spec.to if spec.to is not None else length * (spec.factor or 2)
        if total <= length:
            raise UsageError(f"--to {total}: the stack already has {length} blocks; give more")
        if spec.order == "stack":
            order = [k % length for k in range(total)]
        else:  # interleave: block i repeated floor((i+1)N/L) - floor(iN/L) times, evenly spread
            order = [i for i in range(length) for _ in range((i + 1) * total // length - i * total // length)]
    if len(order) <= length:
        raise UsageError(f"--layers {spec.layers}: gives {len(order)} blocks, the stack already has {length}")
    return order


@dataclass
class StackPlan:
    """What stacking will do, decided before any change (shared by in-memory and streaming)."""

    container: str
    length: int
    order: list[int]  # source block of each new position
    writers: dict[int, tuple[str, ...]] = field(default_factory=dict)  # block → block-relative params to zero
    post_norms: list[str] = field(default_factory=list)  # modules normalising after a residual add
    config: dict[str, Any] = field(default_factory=dict)  # HF config key → new value
    attrs: list[tuple[str, str, int]] = field(default_factory=list)  # (module, attribute, value) after stacking
    post_acts: list[str] = field(default_factory=list)  # idempotent activations after the blocks' last add
    notes: list[str] = field(default_factory=list)  # copy sources moved to match the rebuilt config, and why

    @property
    def copies(self) -> list[int]:
        """New positions that are copies (every position after a block's first occurrence)."""
        seen: set[int] = set()
        out = []
        for p, i in enumerate(self.order):
            if i in seen:
                out.append(p)
            seen.add(i)
        return out


def trace_for_writers(module: nn.Module, batch: Batch) -> Trace:
    """Trace ``module`` (real or meta weights) on ``batch``, moved to the module's device."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    args, kwargs = batch
    try:
        return trace_model(module, (tuple(a.to(device) for a in args), {k: v.to(device) for k, v in kwargs.items()}))
    except NotGrowableError as exc:
        raise NotGrowableError(f"stack --init identity: torch.export could not trace {type(module).__name__} to find "
                               f"the blocks' residual writers ({exc}); use --init copy") from None


def identity_writers(module: nn.Module, container: str, order: list[int], batch: Batch) -> dict[int, BlockWriters]:
    """Every block's residual writers, checked so that each new copy is the identity where it lands.

    Raises :class:`NotGrowableError` (a :class:`ResidualRefusal`) naming the block, op and module.
    """
    try:
        found = stack_writers(trace_for_writers(module, batch), module, container)
        seen: set[int] = set()
        for p, i in enumerate(order):
            refusal = follows(found[i], found[order[p - 1]]) if i in seen else None
            if refusal is not None:
                raise ResidualRefusal(refusal)
            seen.add(i)
    except ResidualRefusal as exc:
        raise ResidualRefusal(exc.refusal, f"stack --init identity: {exc}; use --init copy") from None
    return found


def plan_stack(module: nn.Module, spec: StackSpec, batch: Callable[[], Batch]) -> StackPlan:
    """Decide the container, the new order, residual writers (identity init) and config changes.

    ``batch`` makes one sample input for the trace (only called for ``identity``). The module
    may live on the meta device. Raises :class:`UsageError`, :class:`NoMatchingModuleError`
    or :class:`NotGrowableError`; changes nothing.
    """
    container = find_stack(module, spec.blocks)
    length = len(module.get_submodule(container))
    order = layout(spec, length)
    check_not_shared(module, container)
    # With a config, every position is compared with the block the config rebuilds there (growcli.transforms.rebuilt).
    order, depth, check = fit_layout(module, container, order, move=spec.init == "identity" and spec.layers is None)
    if check is None:  # nothing to rebuild from: a copy must repeat the blocks it follows
        check_repeated(module, container)
    elif check.reason():
        raise NotGrowableError(f"stack: {check.reason()}; use a layout whose copies match (--to, --order or --layers)")
    if depth.config is None:
        raise NotGrowableError(f"stack: {depth.reason}; growcli cannot keep the config in step with it")
    plan = StackPlan(container, length, order, config=depth.config, attrs=depth.attrs,
                     notes=check.notes() if check is not None else [])
    if spec.init == "identity":
        found = identity_writers(module, container, order, batch())
        plan.writers = {i: r.writers for i, r in found.items()}
        plan.post_norms = sorted({n for r in found.values() for n in r.post_norms})
        plan.post_acts = sorted({op for r in found.values() for op, _ in r.post_sites})
    return plan


def post_ln_reason(plan: StackPlan) -> str:
    return (f"the blocks of {plan.container} normalise after the residual add ({', '.join(plan.post_norms)}): with "
            "zeroed residual writers a new block computes LN(x) with its own γ and β instead of x, so identity init "
            "is not function-preserving on post-LN models")


def apply_plan(gm: GrowModel, plan: StackPlan) -> None:
    """Carry out ``plan`` on ``gm`` through ``gm.edits``: inserts, zeroed writers, index attributes, config."""
    root = gm.module
    stack = root.get_submodule(plan.container)
    config = getattr(root, "config", None)
    first: dict[int, int] = {}
    for p, i in enumerate(plan.order):
        if i not in first:
            first[i] = p  # the original sits here already: the prefix before p is final
            continue
        q = first[i]
        # Share the HF config object instead of cloning it into every copy.
        new = copy.deepcopy(stack[q], memo={id(config): config} if config is not None else None)
        gm.edits.insert(root, plan.container, p, new, {"type": "copy", "name": f"{plan.container}.{q}"})
        for made, source in zip(new.parameters(), stack[q].parameters() if q < p else ()):
            gm.edits.derive(made, source)
    for p in plan.copies:
        for name in plan.writers.get(plan.order[p], ()):
            full = f"{plan.container}.{p}.{name}"
            gm.edits.param(root, full, torch.zeros_like(root.get_parameter(full)))
    for path, attr, value in plan.attrs:
        gm.edits.attr(root, path, attr, value)
    for key, value in plan.config.items():
        gm.edits.config(root, key, value)


def _sample_batch(gm: GrowModel, ctx: Context) -> Callable[[], Batch]:
    def make() -> Batch:
        batch = make_batches(gm.inputs, 1, seed=ctx.seed)[0]
        dtype = next((p.dtype for p in gm.module.parameters() if p.is_floating_point()), torch.float32)
        return cast_batch(batch, dtype)
    return make


def _measured_deviation(gm: GrowModel, plan: StackPlan, ctx: Context) -> str:
    """Apply ``plan`` to a scratch copy and measure how far its outputs move (float32, 2 batches)."""
    from growcli.core.edits import EditLog
    from growcli.verification.compare import verify_models

    scratch = dataclasses.replace(gm, module=copy.deepcopy(gm.module), edits=EditLog())
    apply_plan(scratch, plan)
    result = verify_models(gm.module, scratch.module, make_batches(gm.inputs, 2, seed=ctx.seed), dtype=torch.float32)
    worst = max(result.outputs, key=lambda o: o.max_rel_diff)
    return f"measured max abs deviation {result.max_abs_diff:.3g} ({worst.max_rel_diff:.3g} of {worst.name}'s scale)"


def _candidates(gm: GrowModel) -> dict[str, str | None]:
    return {s["name"]: None for s in block_stacks(gm.module)}


@register("stack", StackSpec, exact=lambda s: s.init == "identity", candidates=_candidates,
          help="Duplicate a stack of repeated blocks (progressive stacking; identity init keeps the function)",
          modes=("memory", "streaming"))
def stack(gm: GrowModel, spec: StackSpec, ctx: Context) -> StepReport:
    """Stack the blocks of ``gm`` per ``spec``; see the module docstring for what follows the depth.

    Raises :class:`NotGrowableError` for identity init on post-LN blocks unless
    ``spec.allow_inexact`` (the message explains why and gives the measured deviation).
    """
    params_before = gm.num_parameters()
    plan = plan_stack(gm.module, spec, _sample_batch(gm, ctx))
    if spec.init == "identity" and plan.post_norms and not spec.allow_inexact:
        raise NotGrowableError(f"stack --init identity: {post_ln_reason(plan)}; {_measured_deviation(gm, plan, ctx)}. "
                               "Pass --allow-mismatch to write it anyway (reported as not function-preserving), "
                               "or use --init copy")
    apply_plan(gm, plan)
    return step_report(spec, plan, params_before, gm.num_parameters())


def step_report(spec: StackSpec, plan: StackPlan, params_before: int, params_after: int) -> StepReport:
    """The step's report (without verification), shared by the in-memory and streaming paths."""
    report = StepReport("stack", dataclasses.asdict(spec), matched=[plan.container], params_before=params_before,
                        params_after=params_after, exact=spec.init == "identity" and not plan.post_norms)
    report.changes = [{"name": plan.container, "before": plan.length, "after": len(plan.order)}]
    report.changes += [{"name": f"config.{k}", "after": v} for k, v in plan.config.items()]
    if spec.init == "identity" and plan.post_norms:
        report.notes.append(post_ln_reason(plan))
    report.notes.append(f"layout: {describe_order(plan.order)}; new copies at positions {describe_order(plan.copies)}")
    report.notes += plan.notes
    if spec.init == "identity":
        zeroed = sorted({w for p in plan.copies for w in plan.writers.get(plan.order[p], ())})
        report.notes.append(f"identity init: zeroed residual writers {', '.join(zeroed)} in every new copy")
        if plan.post_acts:
            report.notes.append(f"the blocks end in {', '.join(plan.post_acts)} after their residual add; exact "
                                "because every copy follows a block ending in the same activation, on whose outputs "
                                "it is the identity")
    else:
        report.notes.append("copy init: every new block duplicates its source (progressive stacking)")
    return report


def describe_order(order: list[int]) -> str:
    """``[0,1,2,3,0,1]`` → ``"0-3,0,1"``: runs of three or more consecutive indices as ranges."""
    parts, start = [], 0
    for k in range(1, len(order) + 1):
        if k == len(order) or order[k] != order[k - 1] + 1:
            run = order[start:k]
            parts += [f"{run[0]}-{run[-1]}"] if len(run) >= 3 else [str(i) for i in run]
            start = k
    return ",".join(parts)
