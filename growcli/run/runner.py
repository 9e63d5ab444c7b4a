"""load → transform steps (each verified) → overall verification → save: the one growth run.

CLI commands and plans all call :func:`grow`; it does the I/O around the transforms and
returns the report that is printed, embedded in safetensors metadata and written as
``<output stem>.growth_report.json``. A step is executed in memory (the model loaded and
changed in place) or, for transforms that declare it in ``Transform.modes``, streaming
(:mod:`growcli.run.streaming`: the checkpoint rewritten tensor by tensor); both modes give
the same report schema, with ``execution`` saying which ran. A chain of streamable steps
streams as one (:mod:`growcli.run.stream_chain`: the steps planned one after the other on the
meta device, their tensor maps composed, the output written and verified once).

What the report's ``verification`` is: for one step, that step's comparison with the input;
for a chain, the input against the grown model (both in memory); for a conversion (no step),
the read-back of the first output from disk against the input model as loaded (``against``
says which). Every output is also read back from disk and run (``outputs[].readback``).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from growcli.analysis.calibration import attach as attach_calibration
from growcli.core.errors import OutputError, UsageError, VerificationFailed
from growcli.core.inputs import floating_dtype, with_example
from growcli.core.model import GrowModel, eval_mode
from growcli.io.atomic import (atomic_output, check_distinct, check_output_path, ensure_space, staged_path,
                               transaction)
from growcli.io.formats import load_inputs_file
from growcli.io.hub import HubSnapshot, resolve_source
from growcli.io.load import load_model
from growcli.io.save import check_output
from growcli.run.outputs import save_models
from growcli.run.steps import VerifySettings, final_report, run_step, verification_batches
from growcli.run.stream_chain import chain_refusal, stream_chain
from growcli.run.stream_executors import APPLIES, DOES_NOT_STREAM, EXECUTORS as STREAMING
from growcli.run.streaming import DEFAULT_SHARD_SIZE, choose_streaming, parse_shard_size
from growcli.transforms.catalog import build_spec, get_transform
from growcli.transforms.registry import Context
from growcli.verification.compare import VerifyReport, compose_maps, verify_models


@dataclass
class Source:
    """The model to read. A Hub id ``org/name[@revision]`` that is no local path becomes its cached snapshot
    directory here (:func:`growcli.io.hub.resolve_source`), so ``path`` is always local; ``hub`` says where it came from."""

    path: Path
    arch: str | None = None
    arch_kwargs: str | dict | None = None
    trust_pickle: bool = False
    input_shape: str | None = None
    inputs_file: Path | None = None
    hub: HubSnapshot | None = None

    def __post_init__(self) -> None:
        self.path, found = resolve_source(self.path)
        self.hub = self.hub or found

    def load(self, base: GrowModel | None = None) -> GrowModel:
        """The model; its inputs' example is the ``inputs_file`` batch when one is given (what it is traced on)."""
        gm = load_model(self.path, arch=self.arch, arch_kwargs=self.arch_kwargs, trust_pickle=self.trust_pickle,
                        input_shape=self.input_shape, base=base)
        if self.inputs_file is not None:
            gm.inputs = with_example(gm.inputs, load_inputs_file(self.inputs_file, gm.inputs),
                                     dtype=floating_dtype(gm.module))  # traced in the model's dtype
        return gm


@dataclass
class Output:
    path: Path
    format: str | None = None
    shard_size: int | None = None  # bytes per weights shard, for Hugging Face directory outputs

    def __post_init__(self) -> None:
        # A trailing / (which Path drops) means a directory: the Hugging Face format.
        if isinstance(self.path, str) and self.path.endswith(("/", os.sep)) and self.format is None:
            self.format = "hf"
        self.path = Path(self.path)


@dataclass
class Step:
    transform: str
    options: dict[str, Any] = field(default_factory=dict)


def grow(source: Source, steps: list[Step], outputs: list[Output], *, seed: int = 0,
         settings: VerifySettings | None = None, plan_text: str | None = None,
         on_step: Callable[[int, Step], None] | None = None, overwrite: bool = False,
         protect: tuple[Path, ...] = (), streaming: bool | None = None,
         progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run ``steps`` on the model at ``source`` and write every output; returns the report.

    Outputs are validated before any work; nothing is written unless every exact step and
    the overall comparison pass (or ``settings.allow_mismatch``). No output may be, contain or
    lie inside an input (the model, ``--inputs``, ``protect``: a plan file); an existing one is
    refused unless ``overwrite`` (see :func:`growcli.io.atomic.check_output_path`). Outputs and
    the report are renamed into place together, or not at all.

    ``streaming`` chooses the execution mode (see :func:`execution_mode`): ``None`` streams a
    large Hugging Face checkpoint when every step can stream, ``True`` forces it, ``False``
    never streams. ``progress(done, total)`` follows the bytes a streaming run writes.
    Both modes return the same report schema; a streamed chain's steps carry no verification
    of their own (they are composed, then the output is verified once against the input).
    """
    started = time.perf_counter()
    settings = settings or VerifySettings()
    inputs = (source.inputs_file, *protect)
    check_distinct([o.path for o in outputs])
    if execution_mode(source, steps, outputs, streaming) == "streaming":
        return _grow_streaming(source, steps, outputs[0], seed, settings, plan_text, on_step, overwrite, inputs,
                               progress, started)
    timing: dict[str, float] = {}
    gm = source.load()
    formats = [check_output(gm, o.path, o.format, overwrite=overwrite, inputs=inputs) for o in outputs]
    if outputs and formats[0] != "hf":
        check_output_path(report_path(outputs[0].path, formats[0]), (source.path, *inputs), overwrite=overwrite)
        check_distinct([o.path for o in outputs] + [report_path(outputs[0].path, formats[0])])
    if source.inputs_file is not None:
        settings.inputs = [load_inputs_file(source.inputs_file, gm.inputs)]
    timing["load"] = time.perf_counter() - started
    ctx = Context(seed=seed)
    attach_calibration(ctx, gm, [step.options for step in steps])  # data for gradient-informed steps
    # One step is already verified against the input on these batches; a chain needs a copy of
    # the input; a conversion (no step) is verified by reading each output back against it.
    original = eval_mode(copy.deepcopy(gm.module)) if len(steps) > 1 else None
    params_before = gm.num_parameters()
    output_maps: dict = {}  # outputs grown on purpose (a larger vocabulary), composed over the chain
    for i, step in enumerate(steps):
        if on_step:
            on_step(i, step)
        step_report = run_step(gm, step.transform, step.options, ctx, settings)
        output_maps = compose_maps(output_maps, getattr(step_report, "output_maps", None) or {})
    batches = verification_batches(gm, settings, seed)
    overall = None
    if len(steps) == 1:
        overall = final_report(gm)
    elif original is not None:
        exact_all = bool(gm.steps) and all(s.get("exact_in_dtype") for s in gm.steps)  # every step exact in the dtype
        overall = verify_models(original, gm.module, batches, dtype=settings.dtype, atol=settings.atol, rtol=settings.rtol,
                                exact_in_dtype=True if exact_all else None, output_maps=output_maps, device=settings.device)
    del original
    all_exact = all(s["exact"] for s in gm.steps)
    if overall is not None and all_exact and not overall.passed and not settings.allow_mismatch:
        raise VerificationFailed(f"the grown model differs from the input: {overall.summary()}", overall)
    timing["steps"] = time.perf_counter() - started - timing["load"]
    ensure_space([(o.path, weight_bytes(gm)) for o in outputs])
    with transaction():  # the outputs and the report: all renamed into place at the end, or none
        written = save_models(gm, [(o.path, fmt, o.shard_size) for o, fmt in zip(outputs, formats)],
                              verification=overall, plan=plan_text, batches=batches, settings=settings)
        verification = _overall(overall, written, steps)
        checked = [f"step {i} ({s['transform']}): ran the model before and after the step: "
                   f"{VerifyReport.from_dict(s['verification']).summary()}" for i, s in enumerate(gm.steps, 1)]
        if len(steps) > 1:
            checked.append(f"ran the input and the grown model: {overall.summary()}")
        checked += [f"read back {o['path']} with {o['loaded_with']}: {VerifyReport.from_dict(o['readback']).summary()}"
                    for o in written if o.get("readback")]
        timing["save"] = time.perf_counter() - started - timing["load"] - timing["steps"]
        report = _report(source, gm.steps, all_exact, verification, params_before, gm.num_parameters(), written,
                         plan_text, "memory", checked, timing, started)
        if outputs:
            write_report(report, outputs[0].path, formats[0])
    return report


def execution_mode(source: Source, steps: list[Step], outputs: list[Output], streaming: bool | None) -> str:
    """``"streaming"`` or ``"memory"``, from each step's ``Transform.modes`` and ``--streaming/--no-streaming``.

    Forcing streaming on a transform that cannot stream, on a chain with a step that cannot
    stream or that :func:`growcli.run.stream_chain.chain_refusal` refuses (the step named), or on
    no step at all is a :class:`UsageError`; so is forcing it on inputs or outputs it cannot
    handle (see :func:`growcli.run.streaming.choose_streaming`). Unforced, a single streamable
    step, or a chain of steps that all stream, streams when the checkpoint is large.
    """
    if streaming is False:
        return "memory"
    chain = len(steps) > 1
    for i, step in enumerate(steps, 1):
        modes = get_transform(step.transform).modes
        if streaming and "streaming" not in modes:
            where = f" in step {i} of {len(steps)}" if chain else ""
            raise UsageError(f"--streaming: {step.transform} cannot run streaming (its execution modes: "
                             f"{', '.join(modes)}){where}; drop --streaming")
    if not steps or "streaming" not in get_transform(steps[0].transform).modes:
        if streaming:
            raise UsageError(f"--streaming runs one step or a chain of steps; this run has {len(steps)}")
        return "memory"
    if chain and any("streaming" not in get_transform(s.transform).modes for s in steps):
        return "memory"
    refusal = chain_refusal([s.transform for s in steps]) if chain else None
    if refusal:
        if streaming:
            raise UsageError(f"--streaming: {refusal}; drop --streaming")
        return "memory"
    for i, step in enumerate(steps, 1):
        applies = APPLIES.get(step.transform)
        if applies is not None and not applies(step.options):
            if streaming and chain:
                raise UsageError(f"--streaming: {step.transform} cannot run streaming with these options "
                                 f"({DOES_NOT_STREAM.get(step.transform, 'see its recipe')}) in step {i} of "
                                 f"{len(steps)}; drop --streaming")
            if streaming is None:
                return "memory"  # a step of that transform that cannot stream (deepen without block)
    fmt = outputs[0].format if outputs else None
    return "streaming" if choose_streaming(source.path, [o.path for o in outputs], fmt, streaming) else "memory"


def _grow_streaming(source: Source, steps: list[Step], output: Output, seed: int, settings: VerifySettings,
                    plan_text: str | None, on_step, overwrite: bool, inputs: tuple, progress,
                    started: float) -> dict[str, Any]:
    """The streaming execution of one step or a chain of steps (composed, one output), reported like an
    in-memory run: every step's report, and one verification of the output against the input."""
    specs = [build_spec(step.transform, dict(step.options)) for step in steps]
    check_output_path(output.path, (source.path, *inputs), overwrite=overwrite, directory=True)
    if source.inputs_file is not None:
        settings.inputs = [load_inputs_file(source.inputs_file)]
    shard_size = output.shard_size or parse_shard_size(DEFAULT_SHARD_SIZE)
    with transaction():
        if len(steps) == 1:
            if on_step:
                on_step(0, steps[0])
            run = STREAMING[steps[0].transform](source.path, output.path, specs[0], shard_size=shard_size,
                                                settings=settings, seed=seed, progress=progress)
            step_reports = [run.step]
        else:
            run = stream_chain(source.path, output.path, [(s.transform, spec) for s, spec in zip(steps, specs)],
                               shard_size=shard_size, settings=settings, seed=seed, progress=progress,
                               on_step=(lambda k: on_step(k, steps[k])) if on_step else None)
            step_reports = run.steps
        verification = run.verification.to_dict() if run.verification is not None else None
        if verification is not None:
            verification["against"] = (f"block-wise run of {output.path} from disk" if run.output.get("blockwise")
                                       else f"readback of {output.path}")
        report = _report(source, step_reports, all(s["exact"] for s in step_reports), verification, run.params_before,
                         run.params_after, [run.output], plan_text, "streaming", run.checked, run.timing, started)
        write_report(report, output.path, "hf")
    return report


def _overall(overall: VerifyReport | None, written: list[dict[str, Any]], steps: list[Step]) -> dict[str, Any] | None:
    """The report's verification: the run's own, or for a conversion the read-back of the first output."""
    if overall is not None:
        result = overall.to_dict()
        result["against"] = ("the model before step 1 (the input), in memory" if len(steps) == 1
                             else "a copy of the input model kept in memory")
        return result
    first = next((o for o in written if o.get("readback")), None)
    if first is None:
        return None
    return {**first["readback"], "against": f"readback of {first['path']}"}


def _report(source: Source, steps: list[dict], exact: bool, verification: dict[str, Any] | None, params_before: int,
            params_after: int, outputs: list[dict], plan_text: str | None, mode: str, checked: list[str],
            timing: dict[str, float], started: float) -> dict[str, Any]:
    """The growth report; its keys are the same whichever mode executed the steps."""
    report: dict[str, Any] = {
        "input": str(source.path),
        **({"source": source.hub.to_dict()} if source.hub else {}),  # a Hub id: the id and the commit read
        "steps": steps,
        "function_preserving": exact,
        "verification": verification,
        "params_before": params_before,
        "params_after": params_after,
        "outputs": outputs,
        "execution": mode,
        "streaming": mode == "streaming",
        "checked": checked,
        "seconds": round(time.perf_counter() - started, 3),
        "timing": {k: round(v, 3) for k, v in timing.items()},
    }
    if plan_text is not None:  # provenance: the plan travels in the report as in the safetensors metadata
        report["plan"] = plan_text
    return report


def weight_bytes(gm: GrowModel) -> int:
    """Bytes of the model's tensors (shared ones once): about what each output takes on disk."""
    seen: dict[tuple[int, int], int] = {}
    for t in gm.module.state_dict().values():
        if t.device.type != "meta":
            seen[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel() * t.element_size()
    return sum(seen.values())


def report_path(out: Path, fmt: str) -> Path:
    """``growth_report.json`` inside a directory output, else ``<stem>.growth_report.json`` beside the file."""
    return out / "growth_report.json" if fmt == "hf" else out.with_name(out.stem + ".growth_report.json")


def write_report(report: dict[str, Any], out: Path, fmt: str) -> Path:
    """Write the report at :func:`report_path`; inside a transaction, into the directory still being written."""
    path = report_path(out, fmt)
    text = json.dumps(report, indent=2, default=str) + "\n"
    staged = staged_path(out) if fmt == "hf" else None
    if staged is not None:
        try:
            (staged / path.name).write_text(text)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        return path
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return path
