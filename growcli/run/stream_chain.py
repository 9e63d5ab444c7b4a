"""Streaming execution of a chain of steps: each planned on the meta device, their tensor maps composed, one output written.

Step ``k + 1`` is planned on what step ``k`` planned: its config (a scratch directory holding
only that ``config.json``, from which the meta-device model is built exactly as a streamed step
builds it from a checkpoint) and its tensors (a :class:`~growcli.run.stream_source.Stage`, in
which every tensor says how it is made from the INPUT checkpoint). Each step's planner — the
single-step executors' own planning (:func:`growcli.transforms.stack.plan_stack`,
:func:`growcli.transforms.deepen.plan_streamed_blocks`, :func:`growcli.run.width_stream.plan_width`)
— maps the stage's tensors to its outputs: a rename keeps a tensor's pieces (input bytes stay
byte copies), a zeroed writer becomes zeros, a rewrite becomes a computation that reads the
tensor it rewrites from the stage when it is written. So each FINAL tensor is computed from
the input tensors it depends on, no intermediate checkpoint is written, and peak memory is a
few tensors (a rewrite of a rewrite holds one tensor per step it goes through).

The written directory is then checked like a single streamed step's: the config of every step
must rebuild exactly the tensors planned for it (names and shapes), and the output is run
against the input — loaded whole from disk up to ``verify_limit`` bytes (at the tolerance the
in-memory chain gets: exact in the dtype when every step is), block by block above it through
the composed map between the residual streams (the stack and block-copy layer maps composed in
order; the hidden axis by width, or by the composed tilings of several hidden steps).

``upcycle`` streams only as a single step: its planner reads the input's byte ranges directly
(expert rows are slices of the dense tensors), which a planned stage does not have.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from growcli.analysis.blocks import find_stack
from growcli.core.errors import GrowError, NotGrowableError
from growcli.io.atomic import atomic_output
from growcli.io.hf_dir import load_hf_config, sample_batch
from growcli.io.load import load_model
from growcli.io.shards import INDEX, pack_shards, shard_names, write_index, write_shard
from growcli.io.sidefiles import copy_side_files
from growcli.run.steps import VerifySettings, verification_batches
from growcli.run.stream_names import checkpoint_names, meta_model, stack_names, structure_check
from growcli.run.stream_source import Stage, as_out, from_out, numel, whole_ref
from growcli.run.streaming import VERIFY_LIMIT, Progress, byte_progress, plan_tensors, verify_written
from growcli.run.upcycle_stream import Entry, pack, write_file
from growcli.run.width_stream import _natural, _structure, plan_entries, plan_width, saved_names
from growcli.transforms.catalog import get_transform
from growcli.transforms.deepen import plan_streamed_blocks
from growcli.transforms.registry import StepReport
from growcli.transforms.stack import plan_stack, post_ln_reason, step_report
from growcli.transforms.width_edit import note_rounding
from growcli.verification.compare import VerifyReport, compose_maps, verify_models
from growcli.verification.stream_map import StreamMap, compose, compose_tilings, identity, stacked


@dataclass
class Planned:
    """One step planned on a stage: its output tensors (in the input's terms) and what the chain needs of it."""

    report: StepReport
    entries: list[Entry]
    config: dict[str, Any]  # the whole config.json after the step
    check: Callable[[Path], str]  # the structure check, given the directory of the new config
    depth: StreamMap | None = None  # the layer map, for steps that change the depth
    widths: tuple[int, int] | None = None  # the residual stream's width before and after (hidden growth)
    finish: Callable[[], None] = lambda: None  # after writing: what only computing the tensors tells (rounding)


def _depth_step(stage: Stage, plan, report: StepReport, module: torch.nn.Module) -> Planned:
    """A stack layout (``stack`` or ``deepen --block``) applied to the stage: renames and zeroed writers."""
    names = stack_names(module, plan.container, stage.tensors)
    outs = plan_tensors(stage.tensors, plan, names)
    report.params_before = sum(numel(e) for e in stage.tensors.values())
    report.params_after = sum(numel(t.ref) for t in outs)

    def check(directory: Path) -> str:
        config = module.config.__class__.from_pretrained(str(directory), local_files_only=True)
        return structure_check(type(module), config, names, outs)

    return Planned(report, [from_out(t) for t in outs], {**stage.config, **plan.config}, check,
                   depth=stacked(plan.order, plan.copies))


def plan_stack_step(stage: Stage, spec: Any, seed: int, batch=None) -> Planned:
    module = meta_model(stage.directory)
    plan = plan_stack(module, spec, lambda: sample_batch(module, seed, batch))
    if spec.init == "identity" and plan.post_norms and not spec.allow_inexact:
        raise NotGrowableError(f"stack --init identity: {post_ln_reason(plan)}. Pass --allow-mismatch to write it "
                               "anyway (reported as not function-preserving), or use --init copy")
    report = step_report(spec, plan, 0, 0)
    return _depth_step(stage, plan, report, module)


def plan_deepen_step(stage: Stage, spec: Any, seed: int, batch=None) -> Planned:
    module = meta_model(stage.directory)
    plan, report = plan_streamed_blocks(module, spec, sample_batch(module, seed, batch))
    return _depth_step(stage, plan, report, module)


def _plan_width_step(name: str, stage: Stage, spec: Any, seed: int, batch=None) -> Planned:
    before = getattr(load_hf_config(stage.directory)[1], "hidden_size", None) if name == "hidden" else None
    gm, report, jobs, siblings, changed = plan_width(stage.directory, name, spec, seed, tensors=stage.tensors,
                                                     batch=batch)
    report.exact = get_transform(name).exact(spec) and report.exact
    rounded: dict[str, str] = {}
    dtypes: dict[str, torch.dtype] = {}

    def on_rounded(param: str, why: str, dtype: torch.dtype) -> None:
        rounded[param] = why
        dtypes[param] = dtype

    entries = plan_entries(stage.tensors, checkpoint_names(gm.module), jobs, siblings, saved_names(gm), on_rounded)
    after = getattr(gm.module.config, "hidden_size", None) if name == "hidden" else None
    return Planned(report, entries, {**stage.config, **changed},
                   lambda directory: _structure(directory, {e.name: e.shape for e in entries}),
                   widths=(before, after) if before and after else None,
                   finish=lambda: note_rounding(report, rounded, dtypes[min(rounded)] if rounded else torch.float64))


def plan_widen_step(stage: Stage, spec: Any, seed: int, batch=None) -> Planned:
    if spec.init in ("gradmax", "firefly"):
        raise NotGrowableError(f"widen --init {spec.init} --streaming: the new units come from gradients on "
                               "calibration data, which needs the model in memory; use --no-streaming")
    return _plan_width_step("widen", stage, spec, seed, batch)


# Planner(stage, spec, seed, batch): ``batch`` is the user's --inputs (None: inputs generated from the config).
PLANNERS: dict[str, Callable[..., Planned]] = {
    "stack": plan_stack_step,
    "deepen": plan_deepen_step,
    "hidden": lambda stage, spec, seed, batch=None: _plan_width_step("hidden", stage, spec, seed, batch),
    "heads": lambda stage, spec, seed, batch=None: _plan_width_step("heads", stage, spec, seed, batch),
    "widen": plan_widen_step,
}


def chain_refusal(transforms: list[str]) -> str | None:
    """Why these steps cannot stream as one chain (naming the first step that cannot), else ``None``."""
    for i, name in enumerate(transforms, 1):
        if name not in PLANNERS:
            return (f"step {i} ({name}) streams only as a single step, not in a chain of {len(transforms)} "
                    f"(chains stream {', '.join(PLANNERS)})")
    return None


@dataclass
class ChainRun:
    """What :func:`stream_chain` hands the runner: every step's report and one verification of the whole chain."""

    steps: list[dict[str, Any]]
    verification: VerifyReport | None
    params_before: int
    params_after: int
    output: dict[str, Any]
    checked: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


@dataclass
class _Overall:
    """The chain's verdict as :func:`growcli.run.streaming.verify_written` records it."""

    exact: bool
    verification: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def stream_chain(src: Path, out: Path, steps: list[tuple[str, Any]], *, shard_size: int,
                 settings: VerifySettings | None = None, seed: int = 0, progress: Progress | None = None,
                 verify_limit: int = VERIFY_LIMIT, on_step: Callable[[int], None] | None = None) -> ChainRun:
    """Run the ``(transform, spec)`` steps on the HF directory ``src`` and write the HF directory ``out`` once.

    Run inside the runner's transaction (the directory is staged, not committed). An error while
    planning step ``k`` (0-based) carries ``plan_step = k``. Raises :class:`NotGrowableError` for
    a step with no planner here (see :func:`chain_refusal`) and what each step's streamed
    execution raises; :class:`VerificationFailed` when the chain is exact and the written model
    differs from the input (nothing is kept), unless ``settings.allow_mismatch``.
    """
    settings = settings or VerifySettings()
    started = time.perf_counter()
    refusal = chain_refusal([name for name, _ in steps])
    if refusal:
        raise NotGrowableError(f"--streaming: {refusal}")
    planned: list[Planned] = []
    checked: list[str] = []
    with tempfile.TemporaryDirectory(prefix="growcli-chain-") as scratch:
        stage = Stage.from_dir(src)
        for k, (name, spec) in enumerate(steps):
            if on_step:
                on_step(k)
            try:
                step = PLANNERS[name](stage, spec, seed, (settings.inputs or [None])[0])
                directory = Path(scratch) / f"after-step-{k + 1}"
                directory.mkdir()
                (directory / "config.json").write_text(json.dumps(step.config, indent=2, sort_keys=True) + "\n")
                checked.append(f"step {k + 1} ({name}): {_kinds(step.entries)}; {step.check(directory)}")
            except GrowError as exc:
                exc.plan_step = k  # the plan runner puts the step's position in front of the message
                raise
            planned.append(step)
            stage = Stage(directory, {e.name: e for e in step.entries})
        config = stage.config
    entries = sorted(stage.tensors.values(), key=lambda e: _natural(e.name))
    total = sum(e.nbytes for e in entries)
    checked.append(f"composed: {len(entries)} tensors written, {_kinds(entries)}")
    report = _Overall(all(p.report.exact for p in planned))
    timing = {"plan": time.perf_counter() - started}
    advance = byte_progress(total, progress)
    with atomic_output(out, directory=True) as tmp:
        shards = _write(tmp, entries, shard_size, advance)
        timing["write"] = time.perf_counter() - started - timing["plan"]
        for p in planned:
            p.finish()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(src, tmp)  # tokenizer, generation config…; never the input's weights
        output: dict[str, Any] = {"path": str(out), "format": "hf", "shards": shards, "bytes": total,
                                  "loaded_with": None, "max_abs_diff": None, "readback": None}
        exact_in_dtype = True if all(p.report.exact_in_dtype for p in planned) else None
        maps: dict = {}
        for p in planned:
            maps = compose_maps(maps, getattr(p.report, "output_maps", None) or {})
        label = f"the chain ({' → '.join(name for name, _ in steps)})"
        verification = verify_written(
            src, tmp, out, label, report, output, checked, settings, seed, total=total, verify_limit=verify_limit,
            stream_map=_stream_map(src, planned), label=label, exact_in_dtype=exact_in_dtype,
            read_back=lambda: _run_both(src, tmp, settings, seed, exact_in_dtype, maps))
        timing["check"] = time.perf_counter() - started - timing["plan"] - timing["write"]
    return ChainRun([p.report.to_dict() for p in planned], verification, planned[0].report.params_before,
                    planned[-1].report.params_after, output, checked, {k: round(v, 3) for k, v in timing.items()})


def _kinds(entries: list[Entry]) -> str:
    copies = sum(1 for e in entries if whole_ref(e) is not None)
    zeros = sum(1 for e in entries if all(isinstance(p, int) for p in e.pieces))
    return (f"{len(entries)} tensors: {copies} byte copies of input tensors, {zeros} zeros, "
            f"{len(entries) - copies - zeros} computed")


def _write(tmp: Path, entries: list[Entry], shard_size: int, advance: Callable[[int], None]) -> int:
    """The shards and their index; byte-level copies only (the stack writer) when no tensor is computed."""
    outs = [as_out(e) for e in entries]
    if all(o is not None for o in outs):
        groups = pack_shards(outs, shard_size)
        files = shard_names(len(groups))
        for file, group in zip(files, groups):
            write_shard(tmp / file, group, advance)
        if len(groups) > 1:
            write_index(tmp, files, groups)
        return len(groups)
    shards = pack(entries, shard_size)
    files = shard_names(len(shards))
    for file, group in zip(files, shards):
        write_file(tmp / file, group, advance)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: f for f, g in zip(files, shards) for e in g}}
        (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return len(shards)


def _stream_map(src: Path, planned: list[Planned]) -> StreamMap:
    """The map between the input's and the output's residual streams: the layer maps composed, and the hidden
    steps' tilings composed (:func:`growcli.verification.stream_map.compose_tilings`, as
    :func:`growcli.run.streaming.recorded_map` does from the report), or the hidden axis by width when a hidden
    step's widths are not known (the config does not say)."""
    depth = None
    for p in planned:
        if p.depth is not None:
            depth = p.depth if depth is None else compose(depth, p.depth)
    if depth is None:
        module = meta_model(src)
        depth = identity(len(module.get_submodule(find_stack(module, None))))
    widths = [p.widths for p in planned if p.report.transform == "hidden"]
    if None in widths:
        return StreamMap(depth.depth, None, "inferred", "hidden axis by width: a hidden step's widths are not known")
    return StreamMap(depth.depth, compose_tilings(widths)) if widths else depth


def _run_both(src: Path, tmp: Path, settings: VerifySettings, seed: int, exact_in_dtype: bool | None,
              maps: dict) -> tuple[str, VerifyReport]:
    """The written directory loaded back from disk and run against the input, also from disk, at the tolerance
    the in-memory chain gets (exact in the weights' dtype when every step is)."""
    original = load_model(src)
    grown = load_model(tmp)
    batches = verification_batches(original, settings, seed)
    result = verify_models(original.module, grown.module, batches, dtype=settings.dtype, atol=settings.atol,
                           rtol=settings.rtol, exact_in_dtype=exact_in_dtype, output_maps=maps or None,
                           device=settings.device)
    return f"transformers.{grown.hf_class}.from_pretrained", result
