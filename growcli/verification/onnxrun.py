"""Run an ONNX file with onnxruntime, and compare it with the torch model it was exported from.

:func:`onnx_runner` turns a file into a callable batch → named outputs (what ``growcli verify``
compares); :func:`check_onnx` is the read-back of a written ``.onnx`` (see
:mod:`growcli.verification.readback`): onnxruntime against torch in float32, on the batches
whose shapes the graph accepts (the exporter fixes every dimension it could not keep symbolic).
Inputs are fed by the names growcli's exporter gives them: ``input_0, input_1, …`` for
positional arguments, then the keyword arguments' own names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from growcli.core.errors import FormatError, MissingDependencyError, VerificationFailed
from growcli.core.inputs import Batch
from growcli.core.model import eval_mode
from growcli.verification.compare import VerifyReport, compare_outputs, run_model

ONNX_ATOL, ONNX_RTOL = 1e-5, 1e-4  # onnxruntime vs torch, both float32


def session(path: Path):
    """An onnxruntime CPU session for ``path``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("running ONNX files needs onnxruntime: pip install onnxruntime") from None
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_runner(path: Path):
    """A callable batch → named outputs running an ONNX file with onnxruntime."""
    sess = session(path)
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        args, kwargs = batch
        values = [t.float().numpy() if t.is_floating_point() else t.numpy() for t in list(args) + list(kwargs.values())]
        got = sess.run(None, dict(zip(in_names, values)))
        return {n: torch.from_numpy(v) for n, v in zip(out_names, got)}

    return run


def export_input_names(batch: Batch) -> list[str]:
    """The input names growcli's ONNX export gives a batch's tensors."""
    args, kwargs = batch
    return [f"input_{i}" for i in range(len(args))] + list(kwargs)


def check_onnx(module: nn.Module, path: Path, batches: list[Batch]) -> VerifyReport:
    """Run ``path`` with onnxruntime against ``module`` (torch) on ``batches``; raises if it differs.

    :class:`VerificationFailed` when the file does not run or its outputs differ beyond
    float32 rounding (atol 1e-5, rtol 1e-4); :class:`FormatError` when onnxruntime cannot load it.
    """
    try:
        sess = session(path)
    except MissingDependencyError:
        raise
    except Exception as exc:
        raise FormatError(f"the exported ONNX model is invalid ({type(exc).__name__}: {_first_line(exc)})") from None
    module = eval_mode(module)
    ort_inputs = [i.name for i in sess.get_inputs()]
    ort_outputs = [o.name for o in sess.get_outputs()]
    fixed = {i.name: i.shape for i in sess.get_inputs()}

    def feed_of(batch: Batch) -> dict | None:
        a, kw = batch
        # By name: the exporter may drop an input the graph does not use.
        values = dict(zip(export_input_names(batch), [t.detach().numpy() for t in a] + [v.detach().numpy() for v in kw.values()]))
        feed = {n: values[n] for n in ort_inputs}
        for n, v in feed.items():
            dims = fixed.get(n) or []
            if len(dims) != v.ndim or any(isinstance(d, int) and d != s for d, s in zip(dims, v.shape)):
                return None
        return feed

    runnable = [(b, f) for b, f in ((b, feed_of(b)) for b in batches) if f is not None] or [(batches[0], feed_of(batches[0]) or {})]
    checks: dict = {}
    for batch, feed in runnable:
        try:
            got = sess.run(None, feed)
        except Exception as exc:
            raise VerificationFailed(f"the written ONNX file, loaded back with onnxruntime, does not run "
                                     f"({type(exc).__name__}: {_first_line(exc)})") from None
        ref = run_model(module, batch)
        cand = {n: torch.from_numpy(v) for n, v in zip(ort_outputs, got)}
        compare_outputs({f"onnx:{k}": v for k, v in ref.items()}, {f"onnx:{k}": v for k, v in cand.items()},
                        ONNX_ATOL, ONNX_RTOL, checks)
    outputs = list(checks.values())
    note = "onnxruntime vs torch"
    if len(runnable) != len(batches):
        note += f"; {len(runnable)} of {len(batches)} batches have shapes the graph accepts"
    report = VerifyReport(bool(outputs) and all(o.passed for o in outputs), "float32", len(runnable), ONNX_ATOL,
                          ONNX_RTOL, max((o.max_abs_diff for o in outputs), default=0.0), outputs, note)
    if not report.passed:
        raise VerificationFailed(f"the written ONNX file, loaded back with onnxruntime, differs from the torch model: "
                                 f"{report.summary()}", report)
    return report


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""
