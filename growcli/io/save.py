"""Write a model in the format its user asked for, atomically, with provenance."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growcli import __version__
from growcli.errors import FormatError, MissingDependencyError, UsageError, VerificationFailed
from growcli.inputs import Batch, make_batches
from growcli.io.atomic import atomic_output, check_output_path
from growcli.model import GrowModel, eval_mode
from growcli.verify import VerifyReport, compare_outputs, flatten_outputs, run_model

FORMATS = ("safetensors", "pt2", "onnx", "hf", "pt")
_SUFFIX = {".safetensors": "safetensors", ".pt2": "pt2", ".onnx": "onnx", ".pt": "pt", ".pth": "pt"}


def output_format(out: Path, fmt: str | None) -> str:
    """The format to write: ``fmt`` if given, else from the suffix; no suffix means an HF directory."""
    if fmt:
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        return fmt
    if out.suffix in _SUFFIX:
        return _SUFFIX[out.suffix]
    if not out.suffix or str(out).endswith("/") or out.is_dir():
        return "hf"
    raise UsageError(f"{out}: unknown output format {out.suffix}; use .safetensors, .pt2, .onnx, .pt or a directory (--format hf)")


def check_output(gm: GrowModel, out: Path, fmt: str | None) -> str:
    """Validate an output before any work is done; returns the format."""
    fmt = output_format(out, fmt)
    check_output_path(out, gm.source)
    if fmt == "hf" and not gm.is_hf:
        raise UsageError(f"{out}: a Hugging Face directory can only be written for a Hugging Face input; use .safetensors or .pt2")
    if fmt == "pt" and gm.kind != "pickle":
        raise UsageError(f"{out}: a whole pickled module (.pt) is only written when the input was one; "
                         "use .safetensors (weights with the recorded architecture) or .pt2")
    return fmt


def provenance(gm: GrowModel, verification: VerifyReport | None, plan: str | None) -> dict[str, str]:
    """The safetensors ``__metadata__`` (all values are strings)."""
    meta = {
        "format": "pt",
        "growcli.version": __version__,
        "growcli.source": gm.source.name,
        "growcli.source_sha256": gm.source_sha256,
        "growcli.source_kind": gm.kind,
        "growcli.edits": json.dumps(gm.all_edits(), separators=(",", ":")),
        "growcli.inputs": gm.inputs.to_json(),
        "growcli.steps": json.dumps(gm.steps, separators=(",", ":")),
        "growcli.verification": json.dumps(verification.to_dict() if verification else None, separators=(",", ":")),
    }
    if gm.arch:
        meta["growcli.arch"] = json.dumps(gm.arch)
    if gm.hf_class:
        meta["growcli.hf_class"] = gm.hf_class
    if plan:
        meta["growcli.plan"] = plan
    return meta


def owned_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict whose tensors each own contiguous storage (safetensors refuses shared memory)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


def save_model(gm: GrowModel, out: str | Path, *, fmt: str | None = None, verification: VerifyReport | None = None,
               plan: str | None = None, batches: list[Batch] | None = None) -> dict[str, Any]:
    """Write ``gm`` to ``out``; returns ``{"path", "format", "check"?}``.

    ONNX outputs are run with onnxruntime against the torch model on ``batches`` and a
    mismatch raises :class:`VerificationFailed` without leaving the file.
    """
    out = Path(out)
    fmt = check_output(gm, out, fmt)
    result: dict[str, Any] = {"path": str(out), "format": fmt}
    with atomic_output(out, directory=(fmt == "hf")) as tmp:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(owned_state_dict(gm.module), str(tmp), metadata=provenance(gm, verification, plan))
        elif fmt == "pt2":
            _save_pt2(gm, tmp)
        elif fmt == "onnx":
            result["check"] = _save_onnx(gm, tmp, batches or make_batches(gm.inputs, 2, seed=1)).to_dict()
        elif fmt == "hf":
            _save_hf(gm, tmp)
        elif fmt == "pt":
            torch.save(gm.module, tmp)
    return result


def export_program(gm: GrowModel):
    from growcli.inputs import make_batches as _mb

    args, kwargs = _mb(gm.inputs, 1)[0]
    module = eval_mode(gm.module)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, tuple(args), dict(kwargs), strict=False)
    except Exception as exc:
        raise FormatError(f"torch.export could not export the model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def _save_pt2(gm: GrowModel, tmp: Path) -> None:
    torch.export.save(export_program(gm), str(tmp))


def _save_onnx(gm: GrowModel, tmp: Path, batches: list[Batch]) -> VerifyReport:
    import onnx

    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("checking ONNX outputs needs onnxruntime: pip install onnxruntime") from None
    module = eval_mode(gm.module)
    args, kwargs = batches[0]
    names = list(flatten_outputs(run_model(module, batches[0])))
    input_names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:  # the torch.export-based exporter first; the TorchScript one for what it cannot export
            torch.onnx.export(module, tuple(args), str(tmp), kwargs=dict(kwargs), dynamo=True, verbose=False,
                              input_names=input_names, output_names=names)
        except Exception as first:
            try:
                torch.onnx.export(module, tuple(args) + ((dict(kwargs),) if kwargs else ()), str(tmp), dynamo=False,
                                  input_names=input_names, output_names=names, opset_version=17)
            except Exception:
                raise FormatError(f"ONNX export failed ({type(first).__name__}: {str(first).splitlines()[0][:200]})") from None
    onnx.checker.check_model(str(tmp))
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    ort_inputs = [i.name for i in session.get_inputs()]
    ort_outputs = [o.name for o in session.get_outputs()]

    checks: dict = {}
    for batch in batches:
        a, kw = batch
        feed_vals = [t.detach().numpy() for t in a] + [v.detach().numpy() for v in kw.values()]
        feed = dict(zip(ort_inputs, feed_vals))
        got = session.run(None, feed)
        ref = run_model(module, batch)
        cand = {n: torch.from_numpy(v) for n, v in zip(ort_outputs, got)}
        compare_outputs({f"onnx:{k}": v for k, v in ref.items()}, {f"onnx:{k}": v for k, v in cand.items()}, 1e-5, 1e-4, checks)
    outputs = list(checks.values())
    report = VerifyReport(all(o.passed for o in outputs), "float32", len(batches), 1e-5, 1e-4,
                          max((o.max_abs_diff for o in outputs), default=0.0), outputs, "onnxruntime vs torch")
    if not report.passed:
        raise VerificationFailed(f"the ONNX export differs from the torch model: {report.summary()}", report)
    return report


def _save_hf(gm: GrowModel, tmp: Path) -> None:
    module = gm.module
    runtime = {k: getattr(module.config, k) for k in gm.hf_saved_config}
    try:
        for k, v in gm.hf_saved_config.items():
            setattr(module.config, k, v)
        module.save_pretrained(str(tmp), safe_serialization=True)
    finally:
        for k, v in runtime.items():
            setattr(module.config, k, v)
    _check_hf_config(module, tmp)


def _check_hf_config(module: nn.Module, directory: Path) -> None:
    """Refuse an HF directory whose config would not rebuild these weights' shapes."""
    cls = type(module)
    config = cls.config_class.from_pretrained(str(directory))
    with torch.device("meta"):
        fresh = cls(config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    bad = [f"{k} {list(have[k])} vs config {list(want[k])}" for k in have if k in want and want[k] != have[k]]
    if bad:
        raise UsageError("the grown model cannot be described by a Hugging Face config (its layers differ from each "
                         f"other: {bad[0]}); write .safetensors and load it with growcli.load_grown")
