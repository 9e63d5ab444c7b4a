"""Compare two checkpoints on disk (what ``growcli verify`` does)."""

from __future__ import annotations

from pathlib import Path

import torch

from growcli.core.inputs import make_batches
from growcli.io.formats import load_inputs_file, require_exists
from growcli.io.load import load_model
from growcli.run.steps import VerifySettings
from growcli.run.runner import Source
from growcli.verification.compare import VerifyReport, verify_models
from growcli.verification.onnxrun import onnx_runner


def compare_checkpoints(source: Source, grown: Path, settings: VerifySettings) -> VerifyReport:
    """Load ``source`` and ``grown`` and compare them on the same inputs.

    A grown ``.safetensors`` replays its recorded edits on the original; an ``.onnx`` is run
    with onnxruntime (in float32). Inputs come from ``--inputs``, else the original's
    input spec (its own example first), else the grown model's.
    """
    require_exists(Path(grown), "grown checkpoint")
    original = source.load()
    if Path(grown).suffix == ".onnx":
        candidate = onnx_runner(Path(grown))
        settings.dtype = torch.float32
        spec = original.inputs
    else:
        gm = load_model(grown, trust_pickle=source.trust_pickle, input_shape=source.input_shape, base=original)
        candidate = gm.module
        spec = original.inputs if not original.inputs.empty else gm.inputs
    if source.inputs_file is not None:
        batches = [load_inputs_file(source.inputs_file, spec)]
    else:
        batches = make_batches(spec, settings.batches, seed=0, seq_len=settings.seq_len)
    return verify_models(original.module, candidate, batches, dtype=settings.dtype, atol=settings.atol, rtol=settings.rtol,
                         device=settings.device)
