"""Run a plan: against a model in memory (``validate --model``, ``grow --dry-run``) or for real (``grow``).

Settings come from three places, the first that gives one wins: the command line, the
plan, growcli's defaults. The real run is :func:`growcli.run.runner.grow` with the plan's
text as provenance; an error in a step is re-raised with the step's plan position, so a
CI log says which line to fix.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from growcli.analysis.calibration import attach as attach_calibration
from growcli.core.errors import GrowError, UsageError, VerificationFailed, format_error
from growcli.io.formats import load_inputs_file
from growcli.io.save import check_output
from growcli.core.model import GrowModel, eval_mode
from growcli.run.steps import VerifySettings, run_step
from growcli.run.planblame import blame
from growcli.run.planschema import Plan, PlanStep, Problem
from growcli.run.runner import Output, Source, Step, grow
from growcli.transforms.registry import Context
from growcli.transforms.catalog import build_spec, get_transform


@dataclass
class RunConfig:
    """Everything a plan run needs besides the plan: where from, where to, seed, verification."""

    source: Source
    outputs: list[Output]
    seed: int
    settings: VerifySettings
    overwrite: bool = False  # replace existing outputs (files, growcli's own directories)
    streaming: bool | None = None  # --streaming/--no-streaming; None: a chain of streamable steps streams when large


def configure(plan: Plan, source: Source, *, outputs: list[Path] | None = None, format: str | None = None,
              seed: int | None = None, batches: int | None = None, dtype: str | None = None,
              atol: float | None = None, rtol: float | None = None, allow_mismatch: bool = False,
              require_output: bool = True, overwrite: bool = False, device: str = "cpu",
              streaming: bool | None = None, shard_size: int | None = None) -> RunConfig:
    """Merge command-line values (``None``: not given) with the plan's.

    ``-o`` replaces the plan's output path and format; ``shard_size`` (bytes, ``--shard-size``)
    the plan's ``output.shard_size``. Raises :class:`UsageError` for a bad ``dtype`` and, with
    ``require_output``, when neither gives an output.
    """
    if dtype is not None and dtype not in ("float64", "float32"):
        raise UsageError(f"--dtype {dtype!r}: expected float64 or float32")
    v = plan.verify
    dtype_name = dtype or v.dtype or "float64"
    settings = VerifySettings(batches=batches or v.batches or 3, dtype=getattr(torch, dtype_name),
                              atol=atol if atol is not None else v.atol, rtol=rtol if rtol is not None else v.rtol,
                              allow_mismatch=allow_mismatch, device=device)
    if source.inputs_file is None and v.inputs is not None:
        source = dataclasses.replace(source, inputs_file=v.inputs)
    if outputs:
        outs = [Output(p, format) for p in outputs]  # a str keeps its trailing /
    elif plan.output.path is not None:
        outs = [Output(plan.output.path, format or plan.output.format)]
    else:
        outs = []
    if not outs and require_output:
        raise UsageError(f"{plan.file} has no output.path; pass -o OUTPUT")
    size = shard_size if shard_size is not None else plan.output.shard_size
    if size is not None:  # the writer uses it for Hugging Face directories only
        outs = [dataclasses.replace(o, shard_size=size) for o in outs]
    return RunConfig(source, outs, seed if seed is not None else (plan.seed or 0), settings, overwrite, streaming)


def run_plan(plan: Plan, cfg: RunConfig, progress=None) -> dict[str, Any]:
    """Load, apply every step (each verified), verify overall, write the outputs and the report.

    The report gets the plan's text, as the safetensors metadata does. A step that fails
    stops the run; its error is re-raised with ``FILE:LINE:COLUMN: step N (name):`` in front.
    A streaming run (``cfg.streaming``, see :func:`growcli.run.runner.execution_mode`) plans the
    steps one after the other on the meta device and writes the output once, verified once;
    ``progress(done, total)`` follows the bytes it writes.
    """
    for step in plan.steps:
        if not step.valid:
            raise UsageError(f"{plan.position(step)}: {step.label} is invalid; run growcli validate {plan.file}")
    source = _Tracked(**{f.name: getattr(cfg.source, f.name) for f in dataclasses.fields(Source)})
    started: list[int] = []
    runner_steps = [_runner_step(s) for s in plan.steps]
    try:
        return grow(source, runner_steps, cfg.outputs, seed=cfg.seed, settings=cfg.settings, plan_text=plan.text,
                    on_step=lambda i, _step: started.append(i), overwrite=cfg.overwrite,
                    protect=(Path(plan.file),) if plan.file else (), streaming=cfg.streaming, progress=progress)
    except Exception as exc:  # noqa: BLE001 — re-raised as is, with the step's position added
        failed = _failed_step(plan, source.loaded, started, exc)
        if failed is not None:
            _locate(exc, plan, failed)
        raise


@dataclass
class _Tracked(Source):
    """A :class:`Source` that keeps the model it loaded, to tell which step an error came from."""

    loaded: GrowModel | None = field(default=None, init=False, repr=False)

    def load(self, base: GrowModel | None = None) -> GrowModel:
        self.loaded = super().load(base)
        return self.loaded


def _runner_step(step: PlanStep) -> Step:
    return Step(step.transform, dict(step.options))


def _failed_step(plan: Plan, gm: GrowModel | None, started: list[int], exc: BaseException) -> PlanStep | None:
    """The step that raised ``exc``, or ``None`` when it came before or after the steps (loading, saving)."""
    planned = getattr(exc, "plan_step", None)  # a streaming run: the step whose planning raised
    if isinstance(planned, int) and 0 <= planned < len(plan.steps):
        return plan.steps[planned]
    if gm is None or not started:
        return None
    i, done = started[-1], len(gm.steps)
    if done == i:  # the transform itself raised: run_step records a step only after applying it
        return plan.steps[i]
    last = gm.steps[-1] if gm.steps else {}
    if done == i + 1 and isinstance(exc, VerificationFailed) and last.get("exact") \
            and not (last.get("verification") or {}).get("passed", True):
        return plan.steps[i]
    return None


def _locate(exc: BaseException, plan: Plan, step: PlanStep) -> None:
    """Put ``FILE:LINE:COLUMN: step N (name):`` in front of ``exc``'s message (the label once only)."""
    # growcli's errors carry their message as the first argument; prefixing it keeps the
    # exception's class, and so its exit code and message table row. Others (a bug in a
    # transform) get the position too when their message is text.
    if exc.args and isinstance(exc.args[0], str):
        message = exc.args[0]
        label = "" if message.startswith(step.label) else f"{step.label}: "
        exc.args = (f"{plan.position(step)}: {label}{message}",) + exc.args[1:]


@dataclass
class StepPreview:
    """What one step did to an in-memory copy: matches, shape changes, parameters, exactness, error."""

    step: PlanStep
    matched: list[str] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)  # {"name", "before", "after"}; None: absent
    params_before: int = 0
    params_after: int = 0
    exact: bool | None = None
    verification: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    error: BaseException | None = None
    skipped: bool = False  # not applied because the schema check rejected it

    def to_dict(self, plan: Plan) -> dict[str, Any]:
        code, message = format_error(self.error) if self.error is not None else (0, None)
        return {"index": self.step.index, "transform": self.step.transform, "options": self.step.options,
                "position": plan.position(self.step), "matched": self.matched, "changes": self.changes,
                "params_before": self.params_before, "params_after": self.params_after, "exact": self.exact,
                "verification": self.verification, "notes": self.notes, "skipped": self.skipped,
                "error": message, "exit_code": code}


def simulate(plan: Plan, gm: GrowModel, *, seed: int = 0, settings: VerifySettings | None = None) -> list[StepPreview]:
    """Apply every step to ``gm`` (a copy the caller may discard), recording what each one does.

    With ``settings`` each step is verified as in the real run; without, steps are only
    applied (enough to find missing layers and impossible sizes). A step that fails is
    undone and the next ones run without it, each noting so: every problem is found in
    one pass. Never writes anything.
    """
    ctx = Context(seed=seed)
    previews: list[StepPreview] = []
    missing: list[int] = []
    for step in plan.steps:
        preview = StepPreview(step, params_before=gm.num_parameters(), params_after=gm.num_parameters())
        previews.append(preview)
        if not step.valid:
            preview.skipped = True
            missing.append(step.index)
            continue
        if missing:
            which = ", ".join(map(str, missing))
            preview.notes.append(f"checked without step{'s' if len(missing) > 1 else ''} {which}, which could not be applied")
        shapes = _shapes(gm)
        snapshot = copy.deepcopy(gm)
        try:
            attach_calibration(ctx, gm, [step.options])  # a gradient-informed step's data; its problems are the step's
            report = _apply(gm, step, ctx, settings)
        except Exception as exc:  # every failure is a finding about the plan, reported with the step
            if gm.steps and len(gm.steps) > len(snapshot.steps):  # failed verification: keep what it measured
                _fill(preview, gm.steps[-1], shapes, gm)
            preview.error = exc
            gm.__dict__.update(snapshot.__dict__)
            missing.append(step.index)
            continue
        _fill(preview, report, shapes, gm)
    return previews


def _apply(gm: GrowModel, step: PlanStep, ctx: Context, settings: VerifySettings | None) -> dict[str, Any]:
    if settings is not None:
        return run_step(gm, step.transform, step.options, ctx, settings, restore=False).to_dict()  # simulate undoes it
    transform = get_transform(step.transform)
    spec = build_spec(step.transform, dict(step.options))
    report = transform.apply(gm, spec, ctx)
    eval_mode(gm.module)
    report.exact = transform.exact(spec) and report.exact
    return report.to_dict()


def _fill(preview: StepPreview, report: dict[str, Any], shapes: dict[str, tuple], gm: GrowModel) -> None:
    preview.matched = list(report.get("matched") or [])
    preview.exact = bool(report.get("exact"))
    preview.verification = report.get("verification")
    preview.notes += list(report.get("notes") or [])
    preview.params_after = gm.num_parameters()
    after = _shapes(gm)
    preview.changes = [{"name": k, "before": list(shapes[k]) if k in shapes else None,
                        "after": list(after[k]) if k in after else None}
                       for k in list(shapes) + [k for k in after if k not in shapes]
                       if shapes.get(k) != after.get(k)]


def _shapes(gm: GrowModel) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in gm.module.state_dict(keep_vars=True).items()}


def check_against_model(plan: Plan, gm: GrowModel, seed: int = 0) -> list[Problem]:
    """Problems only a model reveals: layers that do not exist, sizes that shrink, steps that cannot apply.

    Each is placed at the option the error is about when it can tell (see
    :func:`growcli.run.planblame.blame`), else at the step. Also checks that the plan's output
    format suits the model.
    """
    problems: list[Problem] = []
    if plan.output.path is not None and _format_known(plan):  # else the schema check has reported it
        try:
            check_output(gm, plan.output.path, plan.output.format, inputs=(Path(plan.file),) if plan.file else ())
        except GrowError as exc:
            problems.append(Problem(plan.file, plan.output.loc, "output", str(exc)))
    for p in simulate(plan, copy.deepcopy(gm), seed=seed):
        if p.error is None:
            continue
        _, message = format_error(p.error)
        option = blame(message, p.step.options)
        loc = p.step.option_locs.get(option, p.step.loc) if option else p.step.loc
        note = f" ({'; '.join(p.notes)})" if p.notes else ""
        problems.append(Problem(plan.file, loc, p.step.label, message + note, option))
    return problems


def _format_known(plan: Plan) -> bool:
    from growcli.io.save import output_format

    try:
        output_format(plan.output.path, plan.output.format)
    except UsageError:
        return False
    return True


def dry_run(plan: Plan, cfg: RunConfig) -> tuple[dict[str, Any], BaseException | None]:
    """What the run would do, step by step, on an in-memory copy; writes nothing.

    Returns the report and the first step's error (``None`` if every step would pass),
    which the caller raises after showing the report, so the exit code is the real run's.
    """
    gm = cfg.source.load()
    formats = [check_output(gm, o.path, o.format, overwrite=cfg.overwrite,
                            inputs=(cfg.source.inputs_file, Path(plan.file) if plan.file else None))
               for o in cfg.outputs]
    settings = dataclasses.replace(cfg.settings)
    if cfg.source.inputs_file is not None:
        settings.inputs = [load_inputs_file(cfg.source.inputs_file, gm.inputs)]
    params_before = gm.num_parameters()
    previews = simulate(plan, gm, seed=cfg.seed, settings=settings)
    first = next((p for p in previews if p.error is not None), None)
    if first is not None:
        _locate(first.error, plan, first.step)
    report = {
        "dry_run": True,
        "plan": plan.file,
        "input": str(cfg.source.path),
        "seed": cfg.seed,
        "verify": {"dtype": str(settings.dtype).removeprefix("torch."),
                   "batches": len(settings.inputs) if settings.inputs is not None else settings.batches,
                   "atol": settings.atol, "rtol": settings.rtol},
        "steps": [p.to_dict(plan) for p in previews],
        "function_preserving": all(p.exact and p.error is None for p in previews),
        "params_before": params_before,
        "params_after": gm.num_parameters(),
        "outputs": [{"path": str(o.path), "format": f} for o, f in zip(cfg.outputs, formats)],
        "written": [],
    }
    return report, first.error if first is not None else None
