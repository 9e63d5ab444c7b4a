"""Write a model in the format its user asked for, with provenance: formats only.

:func:`check_output` validates an output before any work; :func:`write_output` writes one
format at a temporary path. Committing outputs together and reading each back is
:func:`growcli.run.outputs.save_models`'s job.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growcli.core.version import __version__
from growcli.core.errors import FormatError, UsageError
from growcli.core.inputs import Batch, make_batches
from growcli.core.model import GrowModel, eval_mode
from growcli.io.atomic import check_output_path
from growcli.io.formats import write_safetensors
from growcli.io.sidefiles import copy_side_files

FORMATS = ("safetensors", "pt2", "onnx", "hf", "pt")
_SUFFIX = {".safetensors": "safetensors", ".pt2": "pt2", ".onnx": "onnx", ".pt": "pt", ".pth": "pt"}


# Suffixes of files growcli cannot write: refused rather than taken for a directory name.
_FOREIGN = {".bin", ".ckpt", ".h5", ".gguf", ".ggml", ".msgpack", ".npz", ".npy", ".pkl", ".pickle", ".json",
            ".yaml", ".yml", ".txt", ".zip", ".tar", ".gz", ".tflite", ".mlmodel", ".data"}


def output_format(out: str | Path, fmt: str | None) -> str:
    """The format to write: ``fmt`` if given, else from the suffix.

    A path is a (Hugging Face) directory when it ends with ``/``, exists as a directory or
    has no known file suffix (``llama-3.2-2b`` is a directory: ``.2-2b`` is no file suffix).
    """
    raw = os.fspath(out)
    out = Path(raw)
    slash = raw.endswith(("/", os.sep))
    if fmt:
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        if slash and fmt != "hf":
            raise UsageError(f"{raw}: ends with / (a directory) but --format {fmt} writes a file")
        return fmt
    if slash or out.is_dir():
        return "hf"
    if out.suffix in _SUFFIX:
        return _SUFFIX[out.suffix]
    if out.suffix.lower() in _FOREIGN:
        raise UsageError(f"{out}: unknown output format {out.suffix}; use .safetensors, .pt2, .onnx, .pt or a "
                         "directory (--format hf)")
    return "hf"


def check_output(gm: GrowModel, out: str | Path, fmt: str | None, *, overwrite: bool | None = None,
                 inputs: tuple[Path | None, ...] = ()) -> str:
    """Validate an output before any work is done; returns the format.

    The output must not be, contain or lie inside the input (or any of ``inputs``). With
    ``overwrite`` ``False`` an existing output is refused, with ``True`` a file or a
    directory growcli wrote may be replaced; ``None`` does not look at what exists.
    """
    explicit = bool(fmt) or os.fspath(out).endswith(("/", os.sep))
    fmt = output_format(out, fmt)
    out = Path(out)
    if fmt == "hf" and not gm.is_hf and not explicit and not out.is_dir() and out.suffix:
        raise UsageError(f"{out}: unknown output format {out.suffix}; use .safetensors, .pt2, .onnx, .pt or a "
                         "directory (--format hf) for a Hugging Face input")
    check_output_path(out, (gm.source, *inputs), overwrite=overwrite, directory=(fmt == "hf"))
    if fmt == "onnx" and overwrite is not None:  # weights too large for protobuf go to <name>.data beside it
        check_output_path(out.with_name(out.name + ".data"), (gm.source, *inputs), overwrite=overwrite)
    if fmt == "hf" and not gm.is_hf:
        raise UsageError(f"{out}: a Hugging Face directory can only be written for a Hugging Face input; use .safetensors or .pt2")
    refusal = getattr(gm.module, "growcli_output_refusal", None)  # a model that no program of this format can carry
    reason = refusal(fmt) if callable(refusal) else None
    if reason:
        raise UsageError(f"{out}: {reason}")
    if fmt == "pt" and gm.kind != "pickle":
        raise UsageError(f"{out}: a whole pickled module (.pt) is only written when the input was one; "
                         "use .safetensors (weights with the recorded architecture) or .pt2")
    return fmt


def provenance(gm: GrowModel, verification: dict[str, Any] | None, plan: str | None) -> dict[str, str]:
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
        "growcli.verification": json.dumps(verification, separators=(",", ":")),
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


def write_output(gm: GrowModel, out: Path, fmt: str, tmp: Path, *, verification: dict[str, Any] | None = None,
                 plan: str | None = None, sample: Batch | None = None, output_names: list[str] | None = None,
                 shard_size: int | None = None) -> None:
    """Write ``gm`` as ``fmt`` at ``tmp`` (the temporary path of ``out``); nothing is checked or committed here.

    ``verification`` (a report as a dict) and ``plan`` go into the safetensors metadata; an
    ONNX export traces ``sample`` and names the graph's outputs ``output_names`` (the names
    its read-back compares); ``shard_size`` (bytes) caps each weights file of a Hugging Face
    directory.
    """
    if fmt == "safetensors":
        write_safetensors(owned_state_dict(gm.module), tmp, provenance(gm, verification, plan))
    elif fmt == "pt2":
        _save_pt2(gm, tmp)
    elif fmt == "onnx":
        _save_onnx(gm, tmp, out.name, sample or make_batches(gm.inputs, 1, seed=1)[0], output_names)
    elif fmt == "hf":
        _save_hf(gm, tmp, shard_size)
    elif fmt == "pt":
        torch.save(gm.module, tmp)


def batch_dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """torch.export ``dynamic_shapes`` that let the batch (and the sequence of integer inputs) vary.

    ``Dim.AUTO`` lets the exporter keep the batch static where the model fixes it, so this
    never makes an export fail. ``None`` when the torch version or the forward signature
    does not allow it.
    """
    auto = getattr(torch.export.Dim, "AUTO", None)
    if auto is None:
        return None
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None

    def one(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        # Token ids and masks ([batch, seq] integers): the sequence length may vary too.
        return {0: auto, 1: auto} if value.dim() == 2 and not value.is_floating_point() else {0: auto}

    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(one(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: one(v) for k, v in value.items()}
        else:
            shapes[name] = one(value)
    return shapes


def export_program(gm: GrowModel):
    """torch.export the model on its first sample batch, with a variable batch size where it allows.

    Raises :class:`FormatError` when the model cannot be exported at all.
    """
    from growcli.core.inputs import make_batches as _mb

    args, kwargs = _mb(gm.inputs, 1)[0]
    module = eval_mode(gm.module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = batch_dynamic_shapes(module, tuple(args), dict(kwargs))
        if dynamic is not None:
            try:
                return torch.export.export(module, tuple(args), dict(kwargs), dynamic_shapes=dynamic, strict=False)
            except Exception:
                pass  # a program for the sample's exact shapes is still useful
        try:
            return torch.export.export(module, tuple(args), dict(kwargs), strict=False)
        except Exception as exc:
            raise FormatError(f"torch.export could not export the model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def _save_pt2(gm: GrowModel, tmp: Path) -> None:
    # Through a file object: given a path, torch.export names the archive's top folder after
    # the (temporary, pid-stamped) file, which would make the bytes differ run to run.
    with open(tmp, "wb") as fh:
        torch.export.save(export_program(gm), fh)


# Protobuf cannot hold a model over 2 GiB; above this the weights go to an external file.
ONNX_INLINE_LIMIT = 1_800_000_000


def _save_onnx(gm: GrowModel, tmp: Path, final_name: str, sample: Batch, output_names: list[str] | None) -> None:
    """Export to ``tmp`` (traced on ``sample``) and check it with ``onnx.checker``.

    Weights are stored inside the ``.onnx`` file, so the output is one self-contained file;
    only a model too large for protobuf gets ``<final_name>.data`` beside it (removed again
    if the export or its check fails). Running it is the read-back's job
    (:mod:`growcli.verification.onnxrun`).
    """
    data_file = tmp.parent / f"{final_name}.data"
    try:
        _export_onnx(gm, tmp, data_file, sample, output_names)
    except BaseException:
        if data_file.exists():
            data_file.unlink()
        raise


def _export_onnx(gm: GrowModel, tmp: Path, data_file: Path, batch: Batch, names: list[str] | None) -> None:
    import onnx

    module = eval_mode(gm.module)
    args, kwargs = batch
    input_names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:  # the torch.export-based exporter first; the TorchScript one for what it cannot export
            program = _onnx_program(module, tuple(args), dict(kwargs), input_names, names)
            if sum(p.numel() * p.element_size() for p in module.state_dict().values()) <= ONNX_INLINE_LIMIT:
                program.save(str(tmp), external_data=False)
            else:
                # Given a path, the exporter names the data file after it: the temporary name.
                import onnx_ir

                onnx_ir.save(program.model, str(tmp), external_data=data_file.name)
        except Exception as first:
            try:
                torch.onnx.export(module, tuple(args) + ((dict(kwargs),) if kwargs else ()), str(tmp), dynamo=False,
                                  input_names=input_names, output_names=names, opset_version=17)
            except Exception:
                raise FormatError(f"ONNX export failed ({type(first).__name__}: {str(first).splitlines()[0][:200]})") from None
    try:
        onnx.checker.check_model(str(tmp))
    except Exception as exc:
        raise FormatError(f"the exported ONNX model is invalid ({type(exc).__name__}: {_first_line(exc)})") from None


def _onnx_program(module: nn.Module, args: tuple, kwargs: dict, input_names: list[str], output_names: list[str]):
    """The dynamo ONNX export, with a variable batch size where the model allows one."""
    dynamic = batch_dynamic_shapes(module, args, kwargs)
    if dynamic is not None:
        try:
            return torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, verbose=False, dynamic_shapes=dynamic,
                                     input_names=input_names, output_names=output_names)
        except Exception:
            pass  # a graph for the sample's exact shapes is still useful
    return torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, verbose=False,
                             input_names=input_names, output_names=output_names)


def _save_hf(gm: GrowModel, tmp: Path, shard_size: int | None = None) -> None:
    module = gm.module
    runtime = {k: getattr(module.config, k) for k in gm.hf_saved_config}
    try:
        for k, v in gm.hf_saved_config.items():
            setattr(module.config, k, v)
        _validate_hf_config(module.config)
        module.save_pretrained(str(tmp), safe_serialization=True,
                               **({"max_shard_size": shard_size} if shard_size else {}))
    finally:
        for k, v in runtime.items():
            setattr(module.config, k, v)
    _check_hf_config(module, tmp)
    if gm.source.is_dir():  # tokenizer, generation config and other side files travel along
        copy_side_files(gm.source, tmp, steps=gm.steps)  # a vocab step's new tokens go into the tokenizer


def _validate_hf_config(config) -> None:
    """Refuse, as a usage error, a config transformers' own validators reject (they run on save)."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except Exception as exc:  # e.g. Llama: hidden_size must be a multiple of num_attention_heads
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise UsageError(f"transformers rejects the grown model's config ({lines[-1][:200] if lines else type(exc).__name__}); "
                         "write .safetensors and load it with growcli.load_grown") from None


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
    # Inserted modules (deepen) add weights the config's architecture has no place for.
    extra = sorted(set(have) - set(want))
    if extra:
        raise UsageError("the grown model cannot be described by a Hugging Face config (it has weights the "
                         f"architecture does not build, e.g. {extra[0]}); write .safetensors and load it with "
                         "growcli.load_grown")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""
