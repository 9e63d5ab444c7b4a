"""Apply registered transforms one step at a time, verifying every function-preserving step."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from growcli.errors import VerificationFailed
from growcli.inputs import Batch, make_batches
from growcli.model import GrowModel, eval_mode
from growcli.transforms.registry import Context, StepReport, build_spec, get_transform
from growcli.verify import VerifyReport, verify_models


@dataclasses.dataclass
class VerifySettings:
    batches: int = 3
    dtype: torch.dtype = torch.float64
    atol: float | None = None
    rtol: float | None = None
    allow_mismatch: bool = False
    inputs: list[Batch] | None = None  # explicit batches (``--inputs``) instead of generated ones


def verification_batches(gm: GrowModel, settings: VerifySettings, seed: int) -> list[Batch]:
    return settings.inputs if settings.inputs is not None else make_batches(gm.inputs, settings.batches, seed=seed)


def run_step(gm: GrowModel, name: str, options: dict[str, Any] | Any, ctx: Context | None = None,
             settings: VerifySettings | None = None) -> StepReport:
    """Apply transform ``name`` to ``gm`` in place and verify it against the model before the step.

    A step that promises exactness and fails verification raises
    :class:`VerificationFailed` (unless ``allow_mismatch``), leaving ``gm`` in its grown
    state, which the caller must not write. Steps that do not promise exactness report
    their measured divergence in ``notes``.
    """
    ctx = ctx or Context()
    settings = settings or VerifySettings()
    transform = get_transform(name)
    spec = options if dataclasses.is_dataclass(options) else build_spec(name, dict(options))
    exact = transform.exact(spec)
    before = eval_mode(copy.deepcopy(gm.module))
    report = transform.apply(gm, spec, ctx)
    eval_mode(gm.module)
    report.exact = exact and report.exact
    batches = verification_batches(gm, settings, ctx.seed)
    result = verify_models(before, gm.module, batches, dtype=settings.dtype, atol=settings.atol, rtol=settings.rtol)
    del before
    report.verification = result.to_dict()
    if not report.exact:
        report.notes.append(f"not function-preserving by design; measured: {result.summary()}")
    gm.steps.append(report.to_dict())
    if report.exact and not result.passed and not settings.allow_mismatch:
        raise VerificationFailed(f"step {len(gm.steps)} ({name}) changed the function: {result.summary()}", result)
    return report


def final_report(gm: GrowModel) -> VerifyReport | None:
    """The last step's verification, as a report object (for provenance)."""
    if not gm.steps or not gm.steps[-1].get("verification"):
        return None
    return VerifyReport.from_dict(gm.steps[-1]["verification"])
