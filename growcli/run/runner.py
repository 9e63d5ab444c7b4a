"""load → transform steps (each verified) → overall verification → save: the one growth run.

CLI commands and plans both call :func:`grow`; it does the I/O around the transforms and
returns the report that is printed, embedded in safetensors metadata and written as
``<output stem>.growth_report.json``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from growcli.analysis.calibration import attach as attach_calibration
from growcli.core.errors import OutputError, VerificationFailed
from growcli.io.formats import load_inputs_file
from growcli.io.atomic import (atomic_output, check_distinct, check_output_path, ensure_space, staged_path,
                               transaction)
from growcli.io.load import load_model
from growcli.io.save import check_output, save_models
from growcli.core.model import GrowModel, eval_mode
from growcli.run.steps import VerifySettings, final_report, run_step, verification_batches
from growcli.transforms.registry import Context
from growcli.verification.compare import verify_models


@dataclass
class Source:
    path: Path
    arch: str | None = None
    arch_kwargs: str | dict | None = None
    trust_pickle: bool = False
    input_shape: str | None = None
    inputs_file: Path | None = None

    def load(self, base: GrowModel | None = None) -> GrowModel:
        return load_model(self.path, arch=self.arch, arch_kwargs=self.arch_kwargs, trust_pickle=self.trust_pickle,
                          input_shape=self.input_shape, base=base)


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
         protect: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Run ``steps`` on the model at ``source`` and write every output; returns the report.

    Outputs are validated before any work; nothing is written unless every exact step and
    the overall comparison pass (or ``settings.allow_mismatch``). No output may be, contain or
    lie inside an input (the model, ``--inputs``, ``protect``: a plan file); an existing one is
    refused unless ``overwrite`` (see :func:`growcli.io.atomic.check_output_path`). Outputs and
    the report are renamed into place together, or not at all.
    """
    settings = settings or VerifySettings()
    inputs = (source.inputs_file, *protect)
    check_distinct([o.path for o in outputs])
    gm = source.load()
    formats = [check_output(gm, o.path, o.format, overwrite=overwrite, inputs=inputs) for o in outputs]
    if outputs and formats[0] != "hf":
        check_output_path(report_path(outputs[0].path, formats[0]), (source.path, *inputs), overwrite=overwrite)
        check_distinct([o.path for o in outputs] + [report_path(outputs[0].path, formats[0])])
    if source.inputs_file is not None:
        settings.inputs = [load_inputs_file(source.inputs_file, gm.inputs)]
    ctx = Context(seed=seed)
    attach_calibration(ctx, gm, [step.options for step in steps])  # data for gradient-informed steps
    # One step is already verified against the input on these batches; only chains need a copy.
    original = eval_mode(copy.deepcopy(gm.module)) if len(steps) != 1 else None
    params_before = gm.num_parameters()
    for i, step in enumerate(steps):
        if on_step:
            on_step(i, step)
        run_step(gm, step.transform, step.options, ctx, settings)
    batches = verification_batches(gm, settings, seed)
    if original is None:
        overall = final_report(gm)
    else:
        overall = verify_models(original, gm.module, batches, dtype=settings.dtype, atol=settings.atol, rtol=settings.rtol)
    del original
    all_exact = all(s["exact"] for s in gm.steps)
    if all_exact and not overall.passed and not settings.allow_mismatch:
        raise VerificationFailed(f"the grown model differs from the input: {overall.summary()}", overall)
    report: dict[str, Any] = {
        "input": str(source.path),
        "steps": gm.steps,
        "function_preserving": all_exact,
        "verification": overall.to_dict(),
        "params_before": params_before,
        "params_after": gm.num_parameters(),
        "outputs": [],
    }
    if plan_text is not None:  # provenance: the plan travels in the report as in the safetensors metadata
        report["plan"] = plan_text
    ensure_space([(o.path, weight_bytes(gm)) for o in outputs])
    with transaction():  # the outputs and the report: all renamed into place at the end, or none
        report["outputs"] = save_models(gm, [(o.path, fmt, o.shard_size) for o, fmt in zip(outputs, formats)],
                                        verification=overall, plan=plan_text, batches=batches)
        if outputs:
            write_report(report, outputs[0].path, formats[0])
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
