"""Compare two checkpoints on disk (what ``growcli verify`` does)."""

from __future__ import annotations

from pathlib import Path

import torch

from growcli.core.errors import MissingDependencyError
from growcli.core.inputs import Batch, make_batches
from growcli.io.formats import load_inputs_file
from growcli.io.formats import require_exists
from growcli.io.load import load_model
from growcli.run.steps import VerifySettings
from growcli.run.runner import Source
from growcli.verification.compare import VerifyReport, verify_models


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
    return verify_models(original.module, candidate, batches, dtype=settings.dtype, atol=settings.atol, rtol=settings.rtol)


def onnx_runner(path: Path):
    """A callable batch → named outputs running an ONNX file with onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("running ONNX files needs onnxruntime: pip install onnxruntime") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    in_names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        args, kwargs = batch
        values = [t.float().numpy() if t.is_floating_point() else t.numpy() for t in list(args) + list(kwargs.values())]
        got = session.run(None, dict(zip(in_names, values)))
        return {n: torch.from_numpy(v) for n, v in zip(out_names, got)}

    return run
