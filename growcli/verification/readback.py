"""Every output is verified as written: load it back the way its user would, run it, compare.

:class:`Readback` is used by :func:`growcli.run.outputs.save_models` after each artefact was
written to its temporary path and before anything is renamed into place, and by the streaming
executor (:mod:`growcli.run.streaming`) on the checkpoint it wrote. The reference is a model
in memory: the model that was written (itself already compared with the original), or for a
conversion or a streamed step the input as loaded from disk. It runs on the run's verification
batches, in the run's dtype and tolerances (float64 where the loaded model runs in it; ONNX
is run with onnxruntime against torch in float32, :mod:`growcli.verification.onnxrun`).

How each format is loaded back:

- ``.pt2``: ``torch.export.load(path).module()`` (on the batches whose shapes the program
  accepts: a program fixes every dimension but the batch at export).
- ``.safetensors``: :func:`growcli.io.load.load_model` — the run's architecture (``--arch``,
  recorded in the file) is built and the recorded edits replayed, then the weights are
  loaded strictly. Without a recorded
  architecture (``.pt2``, Hugging Face or pickled inputs) the *original* input is loaded
  again from disk (after checking its sha256 is unchanged) and the edits are replayed on it,
  as ``growcli verify ORIGINAL GROWN`` / ``growcli.load_grown`` do. This re-reads the input
  only for safetensors outputs, instead of keeping a copy of the pre-growth model in memory
  for every run.
- Hugging Face directory: ``<config.architectures[0]>.from_pretrained(dir, local_files_only=True)``.
- ``.pt``: ``torch.load(path, weights_only=False)`` (growcli's own pickle of the module).
- ``.onnx``: ``onnxruntime.InferenceSession``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growcli.core.errors import GrowError, InputsError, VerificationFailed
from growcli.core.inputs import Batch, cast_batch, make_batches
from growcli.core.model import GrowModel, eval_mode
from growcli.verification.compare import DEFAULT_TOL, OutputCheck, VerifyReport, as_dtype, compare_outputs, run_model, storage_precision
from growcli.verification.onnxrun import check_onnx

LOADED_WITH = {
    "pt2": "torch.export.load",
    "safetensors": "growcli.io.load.load_model",
    "pt": "torch.load",
    "onnx": "onnxruntime.InferenceSession",
}


class Readback:
    """Reads back written outputs and compares each with ``gm`` (the reference, in memory).

    ``dtype``, ``atol`` and ``rtol`` are the run's verification settings (``None``: growcli's
    defaults for the weights' precision); ``reference`` names ``gm`` in reports and messages.
    """

    def __init__(self, gm: GrowModel, batches: list[Batch], *, dtype: torch.dtype = torch.float64,
                 atol: float | None = None, rtol: float | None = None, reference: str = "the model in memory"):
        self.gm = gm
        self.batches = batches
        self.dtype = dtype
        self.atol = atol
        self.rtol = rtol
        self.reference = reference
        self._ref_models: dict[torch.dtype, nn.Module] = {}
        self._base: GrowModel | None = None

    # -- the entry points -----------------------------------------------------------------
    def check(self, fmt: str, tmp: Path, out: Path) -> dict[str, Any]:
        """Load ``tmp`` (to become ``out``) back, compare; ``{"loaded_with", "max_abs_diff", "readback"}``.

        Raises :class:`VerificationFailed` when the file cannot be loaded or run, or differs.
        ONNX outputs also get ``check`` (the same onnxruntime comparison, as reports always had).
        """
        loaded_with, report = self.measure(fmt, tmp, out)
        if report is not None and not report.passed:
            raise VerificationFailed(f"{out}: the written file, loaded back with {loaded_with}, differs from "
                                     f"{self.reference}: {report.summary()}; nothing was written", report)
        entry = {"loaded_with": loaded_with, "max_abs_diff": report.max_abs_diff if report else None,
                 "readback": report.to_dict() if report else None}
        if fmt == "onnx" and report is not None:
            entry["check"] = report.to_dict()
        return entry

    def measure(self, fmt: str, tmp: Path, out: Path) -> tuple[str, VerifyReport | None]:
        """Load ``tmp`` back and compare it with the reference: ``(loaded with, report)``; never judges.

        Raises :class:`VerificationFailed` only when the file cannot be loaded or run (an ONNX
        file also when onnxruntime disagrees with torch). The report is ``None`` when there are
        no batches to run (API use on a model without a known input shape).
        """
        if fmt == "onnx":
            batches = self.batches or make_batches(self.gm.inputs, 2, seed=1)
            return LOADED_WITH["onnx"], check_onnx(self.gm.module, tmp, batches)
        loaded_with = LOADED_WITH.get(fmt, fmt)
        try:
            if fmt == "pt2":
                module, batches = self._load_pt2(tmp)
            elif fmt == "safetensors":
                module, loaded_with = self._load_safetensors(tmp)
                batches = self.batches
            elif fmt == "hf":
                module, loaded_with = _load_hf(tmp, getattr(getattr(self.gm.module, "config", None),
                                                            "_attn_implementation", None))
                batches = self.batches
            elif fmt == "pt":
                module = torch.load(tmp, map_location="cpu", weights_only=False)
                batches = self.batches
            else:
                raise VerificationFailed(f"{out}: growcli cannot read back a {fmt} output")
        except VerificationFailed:
            raise
        except Exception as exc:
            raise VerificationFailed(f"{out}: the written file cannot be loaded back with {loaded_with} "
                                     f"({type(exc).__name__}: {_first_line(exc)}); nothing was written") from None
        eval_mode(module)
        if not batches:  # no input shape known (API use without batches): loaded, but not run
            return loaded_with, None
        try:
            report = self._compare(module, batches)
        except VerificationFailed:
            raise
        except _WrittenFileFails as exc:
            raise VerificationFailed(f"{out}: the written file, loaded back with {loaded_with}, does not run "
                                     f"(InputsError: {exc}); nothing was written") from None
        except InputsError:  # the reference itself rejects the batches: an inputs problem, not the file's
            raise
        except Exception as exc:
            raise VerificationFailed(f"{out}: the written file, loaded back with {loaded_with}, does not run "
                                     f"({type(exc).__name__}: {_first_line(exc)}); nothing was written") from None
        finally:
            del module
        report.note = "; ".join(n for n in (f"{loaded_with} vs {self.reference}", report.note) if n)
        if len(batches) != len(self.batches) and fmt == "pt2":
            report.note += f"; {len(batches)} of {len(self.batches)} batches have shapes the program accepts"
        return loaded_with, report

    # -- loading --------------------------------------------------------------------------
    def _load_pt2(self, tmp: Path) -> tuple[nn.Module, list[Batch]]:
        from growcli.io.load import register_hf_output_types

        register_hf_output_types(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(str(tmp))
            module = ep.module()
        example = getattr(ep, "example_inputs", None)
        if example is None:
            return module, self.batches
        fits = [b for b in self.batches if _same_shapes(b, example)]
        if not fits:  # e.g. --inputs of another shape than the generated sample the program was exported on
            fits = [b for b in make_batches(self.gm.inputs, 2, seed=1) if _same_shapes(b, example)]
        if not fits:
            args, kwargs = example
            fits = [(tuple(args), dict(kwargs))]
        return module, fits

    def _load_safetensors(self, tmp: Path) -> tuple[nn.Module, str]:
        from growcli.io.load import load_model

        if self.gm.arch:  # the run's architecture (named by the user) built afresh; the edits replayed on it
            loaded = load_model(tmp, arch=self.gm.arch["factory"], arch_kwargs=dict(self.gm.arch.get("kwargs") or {}))
            return loaded.module, f"growcli.io.load.load_model (arch {self.gm.arch.get('factory')}, edits replayed)"
        loaded = load_model(tmp, base=self._original())
        return loaded.module, f"growcli.io.load.load_model (edits replayed on {self.gm.source.name})"

    def _original(self) -> GrowModel:
        """The unmodified input, loaded again from disk (once per save), for replaying the edits on."""
        if self._base is None:
            from growcli.io.formats import sha256_of
            from growcli.io.load import load_model

            gm = self.gm
            if gm.base_edits:
                raise VerificationFailed(f"{gm.source}: a grown input without a recorded architecture cannot be "
                                         "rebuilt to read its safetensors output back")
            if sha256_of(gm.source) != gm.source_sha256:  # checked before anything in it is unpickled
                raise VerificationFailed(f"{gm.source}: the input changed on disk during the run; its safetensors "
                                         "output cannot be read back against it")
            # A pickled input was trusted (or safe) when it was loaded: its hash is unchanged.
            self._base = load_model(gm.source, trust_pickle=(gm.kind == "pickle"))
        return self._base

    # -- comparing ------------------------------------------------------------------------
    def _reference(self, dtype: torch.dtype) -> nn.Module:
        if dtype not in self._ref_models:
            self._ref_models[dtype] = as_dtype(self.gm.module, dtype)
        return self._ref_models[dtype]

    def _compare(self, module: nn.Module, batches: list[Batch]) -> VerifyReport:
        note = ""
        dtype = self.dtype
        try:
            checks = self._run(module, batches, dtype)
        except GrowError:
            if dtype == torch.float32:
                raise
            note = f"the read-back model does not run in {str(dtype).removeprefix('torch.')}; checked in float32"
            dtype = torch.float32
            checks = self._run(module, batches, dtype)
        outputs = list(checks.values())
        passed = bool(outputs) and all(o.passed for o in outputs)
        atol, rtol = self._tol(module, dtype)
        return VerifyReport(passed, str(dtype).removeprefix("torch."), len(batches), atol, rtol,
                            max((o.max_abs_diff for o in outputs), default=math.inf), outputs, note)

    def _tol(self, module: nn.Module, dtype: torch.dtype) -> tuple[float, float]:
        precision = storage_precision(self.gm.module, module, compute=dtype)
        d_atol, d_rtol = DEFAULT_TOL.get(precision, DEFAULT_TOL[torch.float32])
        atol = d_atol if self.atol is None else self.atol
        rtol = d_rtol if self.rtol is None else self.rtol
        if dtype == torch.float32 and self.dtype != torch.float32:  # fell back: float32 rounding applies
            atol, rtol = max(atol, DEFAULT_TOL[torch.float32][0]), max(rtol, DEFAULT_TOL[torch.float32][1])
        return atol, rtol

    def _run(self, module: nn.Module, batches: list[Batch], dtype: torch.dtype) -> dict[str, OutputCheck]:
        module.to(dtype)  # the loaded model is ours: converted in place, no copy
        ref = self._reference(dtype)
        atol, rtol = self._tol(module, dtype)
        checks: dict[str, OutputCheck] = {}
        for batch in batches:
            b = cast_batch(batch, dtype)
            expected = run_model(ref, b, self.reference)
            try:
                got = run_model(module, b, "the written file")
            except InputsError as exc:
                raise _WrittenFileFails(str(exc)) from None
            compare_outputs(expected, got, atol, rtol, checks)
        return checks


class _WrittenFileFails(InputsError):
    """The read-back model (not the reference) failed on a batch."""


def _load_hf(directory: Path, attn_implementation: str | None = None) -> tuple[nn.Module, str]:
    """The directory loaded as growcli loads a Hugging Face model, with the attention implementation the model in
    memory ran with (eager attention computes its softmax in float32, sdpa does not)."""
    from growcli.io.hf_dir import float64_experts, load_hf_config

    transformers, config = load_hf_config(directory)
    if getattr(config, "use_cache", None) is not None:
        config.use_cache = False  # as growcli loads (and verified) it: whole sequences, no cache
    archs = getattr(config, "architectures", None) or []
    if not archs or getattr(transformers, archs[0], None) is None:
        raise ValueError(f"config.json names no transformers class ({archs[:1]})")
    cls = getattr(transformers, archs[0])
    extra = {"attn_implementation": attn_implementation} if isinstance(attn_implementation, str) else {}
    module = cls.from_pretrained(str(directory), config=config, local_files_only=True, **extra)
    float64_experts(module)  # as growcli loads it
    return module, f"transformers.{archs[0]}.from_pretrained"


def _same_shapes(batch: Batch, example: Any) -> bool:
    """``batch`` has the example's tensors with the same shapes but (maybe) the batch dimension."""
    args, kwargs = batch
    e_args, e_kwargs = example
    if len(args) != len(e_args) or set(kwargs) != set(e_kwargs or {}):
        return False
    pairs = list(zip(args, e_args)) + [(kwargs[k], e_kwargs[k]) for k in kwargs]
    for a, e in pairs:
        if not isinstance(a, torch.Tensor) or not isinstance(e, torch.Tensor):
            continue
        if a.dim() != e.dim() or tuple(a.shape[1:]) != tuple(e.shape[1:]):
            return False
    return True


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""
