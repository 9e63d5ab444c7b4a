"""Write a model's outputs in one transaction, each read back from disk and run before it is committed.

This is where writing (:mod:`growcli.io.save`, formats only) meets verification
(:mod:`growcli.verification.readback`): every output is written to a temporary sibling,
loaded back from it the way its user would load it, run on the verification batches and
compared with the model in memory. The outputs are renamed into place together, only after
all of them were written and read back; any failure (a write, a read-back, a rename) leaves
no output, no temporary and no directory created for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from growcli.core.errors import UsageError
from growcli.core.inputs import Batch, make_batches
from growcli.core.model import GrowModel, eval_mode
from growcli.io.atomic import atomic_output, check_distinct, transaction
from growcli.io.save import check_output, write_output
from growcli.run.steps import VerifySettings
from growcli.transforms.rebuilt import written_mismatch
from growcli.verification.compare import VerifyReport, flatten_outputs, run_model
from growcli.verification.readback import Readback


def save_model(gm: GrowModel, out: str | Path, *, fmt: str | None = None, verification: VerifyReport | None = None,
               plan: str | None = None, batches: list[Batch] | None = None,
               shard_size: int | None = None) -> dict[str, Any]:
    """Write ``gm`` to ``out``; returns ``{"path", "format", "loaded_with", "max_abs_diff", "readback"}``.

    ``shard_size`` (bytes) caps each weights file of a Hugging Face directory output.

    The written file is loaded back and run on ``batches`` against ``gm`` (ONNX with
    onnxruntime); a mismatch raises :class:`VerificationFailed` and leaves nothing behind.
    """
    return save_models(gm, [(out, fmt, shard_size)], verification=verification, plan=plan, batches=batches)[0]


def save_models(gm: GrowModel, outputs: list[tuple[str | Path, str | None, int | None]], *,
                verification: VerifyReport | None = None, plan: str | None = None,
                batches: list[Batch] | None = None, settings: VerifySettings | None = None) -> list[dict[str, Any]]:
    """Write every ``(path, format, shard_size)`` output, or none of them.

    Each result gains ``loaded_with``, ``max_abs_diff`` and ``readback`` (see
    :class:`growcli.verification.readback.Readback`). The read-back runs in ``settings``'
    dtype and tolerances, else in ``verification``'s (the run being recorded), else growcli's
    defaults. Inside a :func:`growcli.io.atomic.transaction` the outputs commit with it.
    """
    if batches is None:
        batches = make_batches(gm.inputs, 2, seed=1) if not gm.inputs.empty else []
    paths = [Path(out) for out, _, _ in outputs]
    check_distinct(paths)
    formats = [check_output(gm, out, fmt) for out, (_, fmt, _) in zip(paths, outputs)]  # all valid before any write
    if "hf" in formats:  # from_pretrained rebuilds every block from the config: it must build these blocks
        refuse_rebuilt_blocks(gm)
    readback = Readback(gm, batches, **_tolerances(settings, verification))
    recorded = verification.to_dict() if verification is not None else None
    sample = batches[0] if batches else None
    names = list(flatten_outputs(run_model(eval_mode(gm.module), sample))) if sample is not None and "onnx" in formats else None
    results: list[dict[str, Any]] = []
    with transaction():  # every output renamed into place at the end, or none
        for out, fmt, (_, _, shard_size) in zip(paths, formats, outputs):
            with atomic_output(out, directory=(fmt == "hf")) as tmp:
                write_output(gm, out, fmt, tmp, verification=recorded, plan=plan, sample=sample, output_names=names,
                             shard_size=shard_size)
                # Inside the block: a failure here discards this temporary and every earlier one.
                results.append({"path": str(out), "format": fmt, **readback.check(fmt, tmp, out)})
    del readback
    return results


def refuse_rebuilt_blocks(gm: GrowModel) -> None:
    """Refuse (:class:`UsageError`) a Hugging Face output whose config would rebuild a grown stack's block differently."""
    reason = written_mismatch(gm.module, gm.all_edits()) if gm.is_hf else None
    if reason:
        raise UsageError(f"the grown model cannot be described by a Hugging Face config ({reason}); write "
                         ".safetensors and load it with growcli.load_grown")


def _tolerances(settings: VerifySettings | None, verification: VerifyReport | None) -> dict[str, Any]:
    if settings is not None:
        return {"dtype": settings.dtype, "atol": settings.atol, "rtol": settings.rtol}
    if verification is not None:
        dtype = getattr(torch, verification.dtype, None)
        return {"dtype": dtype if isinstance(dtype, torch.dtype) else torch.float64, "atol": verification.atol,
                "rtol": verification.rtol}
    return {}
