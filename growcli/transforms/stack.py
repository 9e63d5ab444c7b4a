"""Progressive stacking: duplicate a model's stack of repeated blocks (GROWTH.md sections 3 and 4).

``copy`` init is Gong et al.'s progressive stacking (not function-preserving). ``identity``
init zeroes the *residual writers* of every new copy — the parameters of the last layer on
each branch that is added to the block's residual stream (LLaMA-Pro's block expansion) —
which is exact for pre-LN blocks. The writers are found from a ``torch.export`` trace of the
whole model, never from a family's parameter names; a block whose stream passes through a
normalisation after the add (post-LN, BERT) is reported, because zeroing cannot make it the
identity there.

Everything that depends on depth follows the new layout: the ``ModuleList`` itself (one
recorded ``insert`` per new copy, so ``load_grown`` replays it), integer index attributes
such as ``layer_idx``, and the Hugging Face config's layer count and per-layer lists. The
planning functions here are shared with the streaming path (``growcli.run.streaming``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from growcli.core.errors import NoMatchingModuleError, NotGrowableError, UsageError
from growcli.core.inputs import Batch, cast_batch, make_batches
from growcli.analysis.blocks import block_stacks
from growcli.core.model import GrowModel
from growcli.transforms.registry import Context, StepReport, option, register
from growcli.analysis.stack_writers import stack_residuals

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


def find_stack(module: nn.Module, blocks: str | None) -> str:
    """The container to stack: ``blocks`` if given, else the longest list of same-typed blocks."""
    if blocks is not None:
        try:
            container = module.get_submodule(blocks)
        except AttributeError:
            near = [s["name"] for s in block_stacks(module)]
            hint = f"; stacks found: {', '.join(near)}" if near else ""
            raise NoMatchingModuleError(f"--blocks {blocks!r}: no such module{hint}") from None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 1:
            raise NotGrowableError(f"stack: --blocks {blocks} is a {type(container).__name__}, not a ModuleList/Sequential of blocks")
        if len({type(b) for b in container}) != 1:
            raise NotGrowableError(f"stack: the blocks in {blocks} are of different types; stacking needs repeated blocks")
        return blocks
    stacks = block_stacks(module)
    if not stacks:
        raise NotGrowableError(f"stack: {type(module).__name__} has no ModuleList/Sequential of two or more same-typed "
                               "blocks; name one with --blocks PATH")
    return stacks[0]["name"]


def check_repeated(module: nn.Module, container: str) -> None:
    """Refuse stacks whose blocks differ in parameter names or shapes (a stage's downsampling block…)."""
    stack = module.get_submodule(container)
    first = {k: tuple(v.shape) for k, v in stack[0].state_dict().items()}
    for i, block in enumerate(stack):
        shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
        if shapes != first:
            diff = sorted(set(shapes.items()) ^ set(first.items()))[0][0]
            raise NotGrowableError(f"stack: the blocks of {container} are not repeats of one another ({container}.{i}."
                                   f"{diff} {list(shapes.get(diff, ()))} vs {container}.0.{diff} "
                                   f"{list(first.get(diff, ()))}); a copy could not follow every block")


def check_not_shared(module: nn.Module, container: str) -> None:
    """Refuse blocks that share parameters with modules outside the stack: a copy would break the tie."""
    stack = module.get_submodule(container)
    inside = {id(p) for p in stack.parameters()}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in inside and not name.startswith(container + "."):
            raise NotGrowableError(f"stack: {container} shares parameter {name} with a module outside the stack; "
                                   "copies would either share it or silently untie it")


def config_updates(config: Any, length: int, order: list[int]) -> dict[str, Any]:
    """New values of a Hugging Face config's depth-dependent keys, or ``{}`` without a config.

    The layer count key is ``num_hidden_layers`` or what the config class maps it to
    (``n_layer`` for GPT-2); per-layer lists are the list values of length ``length`` whose
    key names layers (``layer_types``…), remapped by ``order``. Raises
    :class:`NotGrowableError` when the config's count is not this stack's length.
    """
    if config is None or not hasattr(config, "to_dict"):
        return {}
    key = getattr(type(config), "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    values = config.to_dict()
    if values.get(key) != length:
        raise NotGrowableError(f"stack: the config's {key}={values.get(key)} does not count this stack of {length} "
                               "blocks; growcli cannot keep the config in step with it")
    updates: dict[str, Any] = {key: len(order)}
    for k, v in values.items():
        if "layer" in k and isinstance(v, (list, tuple)) and len(v) == length and k != key:
            updates[k] = [v[i] for i in order]
    return updates


def index_attributes(stack: nn.Module) -> list[tuple[str, str, int]]:
    """``(submodule, attribute, offset)`` of integer attributes equal to ``block index + offset``.

    Found from the values themselves (``layer_idx`` in HF attention, 1-based ``layer_number``…):
    an int attribute is an index when, across all blocks, it equals ``i`` (or ``i + 1``).
    """
    per_block = []
    for block in stack:
        values = {}
        for sub, m in block.named_modules():
            for attr, v in vars(m).items():
                if type(v) is int and not attr.startswith("_"):
                    values[(sub, attr)] = v
        per_block.append(values)
    found = []
    for key in per_block[0]:
        got = [vals.get(key) for vals in per_block]
        for offset in (0, 1):
            if got == [i + offset for i in range(len(per_block))]:
                found.append((key[0], key[1], offset))
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
    check_repeated(module, container)
    check_not_shared(module, container)
    plan = StackPlan(container, length, order, config=config_updates(getattr(module, "config", None), length, order))
    if spec.init == "identity":
        found = stack_residuals(module, container, batch())
        plan.writers = {i: r.writers for i, r in found.items()}
        plan.post_norms = sorted({n for r in found.values() for n in r.post_norms})
    return plan


def post_ln_reason(plan: StackPlan) -> str:
    return (f"the blocks of {plan.container} normalise after the residual add ({', '.join(plan.post_norms)}): with "
            "zeroed residual writers a new block computes LN(x) with its own γ and β instead of x, so identity init "
            "is not function-preserving on post-LN models")


def apply_plan(gm: GrowModel, plan: StackPlan) -> None:
    """Carry out ``plan`` on ``gm`` through ``gm.edits``: inserts, zeroed writers, index attributes, config."""
    root = gm.module
    stack = root.get_submodule(plan.container)
    indices = index_attributes(stack) if plan.length > 1 else []
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
    stack = root.get_submodule(plan.container)
    for p in plan.copies:
        for name in plan.writers.get(plan.order[p], ()):
            full = f"{plan.container}.{p}.{name}"
            gm.edits.param(root, full, torch.zeros_like(root.get_parameter(full)))
    for p in range(len(plan.order)):
        for sub, attr, offset in indices:
            path = f"{plan.container}.{p}" + (f".{sub}" if sub else "")
            if getattr(root.get_submodule(path), attr) != p + offset:
                gm.edits.attr(root, path, attr, p + offset)
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
    if spec.init == "identity":
        zeroed = sorted({w for p in plan.copies for w in plan.writers.get(plan.order[p], ())})
        report.notes.append(f"identity init: zeroed residual writers {', '.join(zeroed)} in every new copy")
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
