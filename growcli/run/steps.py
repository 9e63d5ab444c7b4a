"""Apply registered transforms one step at a time, verifying every function-preserving step."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from growcli.core.errors import VerificationFailed
from growcli.core.inputs import Batch, make_batches
from growcli.core.model import GrowModel, eval_mode
from growcli.transforms.registry import Context, StepReport
from growcli.transforms.catalog import build_spec, get_transform
from growcli.verification.compare import VerifyReport, verify_models


@dataclasses.dataclass
class VerifySettings:
    batches: int = 3
    dtype: torch.dtype = torch.float64
    atol: float | None = None
    rtol: float | None = None
    allow_mismatch: bool = False
    inputs: list[Batch] | None = None  # explicit batches (``--inputs``) instead of generated ones
    seq_len: int | None = None  # base length of generated token sequences (``--seq-len``)
    device: str = "cpu"  # where verification runs both models (``--device``: cpu or cuda)


def verification_batches(gm: GrowModel, settings: VerifySettings, seed: int) -> list[Batch]:
    if settings.inputs is not None:
        return settings.inputs
    return make_batches(gm.inputs, settings.batches, seed=seed, seq_len=settings.seq_len)


def run_step(gm: GrowModel, name: str, options: dict[str, Any] | Any, ctx: Context | None = None,
             settings: VerifySettings | None = None, *, restore: bool = True) -> StepReport:
    """Apply transform ``name`` to ``gm`` in place and verify it against the model before the step.

    A step that promises exactness and fails verification raises
    :class:`VerificationFailed` (unless ``allow_mismatch``). A step that raises anything
    leaves ``gm`` as it was before the step (module, parameters, edits, steps), the same
    module object included; ``restore=False`` leaves it in its failed, grown state instead
    (for a dry run that shows what the step did and undoes it itself). Steps that do not
    promise exactness report their measured divergence in ``notes``.
    """
    ctx = ctx or Context()
    settings = settings or VerifySettings()
    transform = get_transform(name)
    spec = options if dataclasses.is_dataclass(options) else build_spec(name, dict(options))
    exact = transform.exact(spec)
    module = gm.module
    before = copy.deepcopy(module)  # the verification reference, and what a failed step is undone to
    state = {k: copy.deepcopy(v) for k, v in vars(gm).items() if k != "module"}
    try:
        report = transform.apply(gm, spec, ctx)
        eval_mode(gm.module)
        report.exact = exact and report.exact
        batches = verification_batches(gm, settings, ctx.seed)
        # The tolerance follows what the step says about the weights' dtype (exact in it, or rounded to it).
        result = verify_models(before, gm.module, batches, dtype=settings.dtype, atol=settings.atol, rtol=settings.rtol,
                               exact_in_dtype=report.exact_in_dtype if report.exact else None,
                               output_maps=getattr(report, "output_maps", None), device=settings.device)
        report.verification = result.to_dict()
        if not report.exact:
            report.notes.append(f"not function-preserving by design; measured: {result.summary()}")
        gm.steps.append(report.to_dict())
        if report.exact and not result.passed and not settings.allow_mismatch:
            raise VerificationFailed(f"step {len(gm.steps)} ({name}) changed the function: {result.summary()}", result)
    except BaseException:
        if restore:
            _restore_module(module, before)
            vars(gm).update(state, module=module)
        raise
    return report


def _restore_module(module: torch.nn.Module, saved: torch.nn.Module) -> None:
    """Make ``module`` (the object callers hold) what its deep copy ``saved`` is: attributes, submodules, weights."""
    if type(module) is not type(saved):  # a torch.fx GraphModule's code lives on its own per-instance class
        module.__class__ = type(saved)
    vars(module).clear()
    vars(module).update(vars(saved))


def final_report(gm: GrowModel) -> VerifyReport | None:
    """The last step's verification, as a report object (for provenance)."""
    if not gm.steps or not gm.steps[-1].get("verification"):
        return None
    return VerifyReport.from_dict(gm.steps[-1]["verification"])
