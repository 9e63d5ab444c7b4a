"""The small Python API: load, apply a transform, verify, save, reload a grown checkpoint.

Saving is transactional as on the command line: :func:`save_model` and :func:`save_models`
(several outputs) read every written file back from disk and run it before renaming anything
into place; a failure leaves no output behind (see :mod:`growcli.run.outputs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growcli.core.errors import FormatError
from growcli.core.inputs import Batch, make_batches
from growcli.io.formats import require_exists, safetensors_metadata
from growcli.io.load import load_model
from growcli.io.weights import load_replayed
from growcli.core.model import GrowModel, eval_mode
from growcli.run.outputs import save_model, save_models
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context, StepReport
from growcli.verification.compare import VerifyReport, verify_models

__all__ = ["apply", "load_grown", "load_model", "save_model", "save_models", "verify"]


def apply(gm: GrowModel, transform: str, *, seed: int = 0, allow_mismatch: bool = False, **options: Any) -> StepReport:
    """Apply one registered transform in place and verify it; see ``growcli.run.steps.run_step``.

    If the step raises (:class:`growcli.core.errors.VerificationFailed` included), ``gm`` is left
    exactly as it was: same module object, structure, weights, edits and steps.
    """
    from growcli.analysis.calibration import attach

    ctx = Context(seed=seed)
    attach(ctx, gm, [options])  # calibration data a gradient-informed step names (``data=FILE``)
    return run_step(gm, transform, options, ctx, VerifySettings(allow_mismatch=allow_mismatch))


def verify(original: GrowModel | nn.Module, grown: GrowModel | nn.Module, batches: list[Batch] | None = None,
           *, dtype: torch.dtype = torch.float64, atol: float | None = None, rtol: float | None = None) -> VerifyReport:
    """Compare two models on the same inputs (generated from ``original``'s input spec if not given)."""
    if batches is None:
        if not isinstance(original, GrowModel):
            raise TypeError("pass batches when comparing plain modules")
        batches = make_batches(original.inputs, 3)
    a = original.module if isinstance(original, GrowModel) else original
    b = grown.module if isinstance(grown, GrowModel) else grown
    return verify_models(a, b, batches, dtype=dtype, atol=atol, rtol=rtol)


def load_grown(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild a grown architecture on a freshly built original ``model`` and load its weights.

    Replays the structural edits recorded in the safetensors metadata, then loads the
    weights strictly, so shapes always fit. Modifies ``model`` and returns the grown model: ``model``
    itself, or a new root holding it when a step wrapped it (progressive columns).
    """
    path = Path(path)
    require_exists(path, "grown safetensors")
    meta = safetensors_metadata(path)
    if "growcli.edits" not in meta:
        raise FormatError(f"{path}: no growcli metadata; it was not written by growcli")
    try:
        records = json.loads(meta["growcli.edits"])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{path}: metadata growcli.edits is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
    # Only allowlisted module classes are built (torch.nn layers, growcli's own); nothing is imported.
    return eval_mode(load_replayed(model, records, path))
