"""Equivalence checking: run two models on the same inputs and report every output.

The check is scale-relative: an output passes when ``max|a - b| <= atol + rtol * max|a|``.
Differences are measured element-wise as absolute values (never a signed sum, where
errors could cancel). All outputs are compared before a verdict; a shape or name
mismatch is a failure, not a warning. An output a step grew on purpose (the logits of a larger
vocabulary) is compared through its output map (:class:`growcli.core.origins.AxisMap`): each
grown position that derives from an old one is compared with it, fresh positions are not.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from growcli.core.errors import InputsError
from growcli.core.inputs import Batch, cast_batch, to_device
from growcli.core.model import eval_mode, weights_default_dtype
from growcli.core.origins import AxisMap

# (atol, rtol) by the precision the weights are stored in, for a step that rounds weights to that
# precision (or does not say it does not): a float32 model compared in float64 still carries float32
# rounding of its (split, rescaled) weights, so float32 tolerances apply to it. In ulps of each
# dtype: bf16 ≈ 2.6, fp16 ≈ 2, fp32 ≈ 84 (dense rescalings and factorisations of widths in the
# thousands), fp64 ≈ 4.5e5 (the float32 arithmetic some models use inside a float64 run).
DEFAULT_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-6, 1e-5),
               torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-3, 2e-2)}

# A step exact in the stored dtype leaves two evaluations of the same real function that differ only
# in the order of their sums: each rounding stage (a product, a reduction, a normalisation) may round
# differently by a few ulps of the precision the model computes in, relative to the output's scale.
EXACT_ULPS = 16
STAGES = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "convolution", "einsum",
                    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
                    "_scaled_dot_product_efficient_attention", "native_layer_norm", "native_group_norm",
                    "native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                    "mean", "sum", "var", "var_mean", "_softmax", "_log_softmax", "linalg_vector_norm"})


def exact_tolerance(compute: torch.dtype, stages: int) -> tuple[float, float]:
    """(atol, rtol) for a step exact in the weights' dtype: ``EXACT_ULPS`` ulps of ``compute`` (the least
    precise dtype the model computes in) per rounding stage of its forward pass (``stages`` ≥ 1)."""
    tol = EXACT_ULPS * torch.finfo(compute).eps * max(1, stages)
    return tol, tol


@dataclass
class Profile:
    """What one forward pass computes in: the least precise floating dtype of any op's result, and the
    number of rounding stages (products, reductions, normalisations, softmaxes)."""

    lowest: torch.dtype
    stages: int


# Ops that only move or cast values (loading weights, stacking experts): not arithmetic the model rounds in.
DATA_MOVES = {"_to_copy", "copy_", "copy", "cat", "stack", "clone", "detach", "view", "_unsafe_view", "reshape",
              "unsqueeze", "alias", "lift_fresh", "expand", "permute", "transpose", "t", "contiguous"}


@contextlib.contextmanager
def observing(dtype: torch.dtype, ignore: frozenset[str] | set[str] = frozenset()) -> Iterator[Profile]:
    """Observe every aten op run inside, into the :class:`Profile` yielded: rounding stages, and the least
    precise floating dtype of any op's result (ops named in ``ignore`` excepted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = Profile(dtype, 0)

    class Observe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in STAGES:
                seen.stages += 1
            if name in ignore:
                return out
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and \
                        torch.finfo(t.dtype).eps > torch.finfo(seen.lowest).eps:
                    seen.lowest = t.dtype
            return out

    with Observe():
        yield seen


def profile_run(module: nn.Module, batch: Batch, dtype: torch.dtype) -> Profile | None:
    """The :class:`Profile` of ``module`` on ``batch`` (already in ``dtype``), observed at the aten level;
    None when the model cannot run under observation."""
    try:
        with observing(dtype) as seen:
            run_model(module, batch)
    except Exception:
        return None
    return seen


def storage_precision(*modules: Any, compute: torch.dtype = torch.float64) -> torch.dtype:
    """The least precise of ``compute`` and the floating-point parameter dtypes of ``modules``."""
    dtypes = {compute}
    for m in modules:
        if isinstance(m, nn.Module):
            dtypes |= {p.dtype for p in m.parameters() if p.is_floating_point()}
            dtypes |= {b.dtype for b in m.buffers() if b.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


@dataclass
class OutputCheck:
    name: str
    shape: list[int]
    max_abs_diff: float
    max_rel_diff: float
    scale: float
    tolerance: float
    passed: bool
    note: str = ""


@dataclass
class VerifyReport:
    passed: bool
    dtype: str
    batches: int
    atol: float
    rtol: float
    max_abs_diff: float
    outputs: list[OutputCheck] = field(default_factory=list)
    note: str = ""
    basis: str = ""  # which tolerance was used, and why

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return finite_json(d)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VerifyReport":
        """Inverse of :meth:`to_dict` (non-finite numbers come back from their string form)."""
        num = lambda v: float(v) if isinstance(v, str) else v  # noqa: E731
        fields = {k: num(v) if k in ("max_abs_diff", "atol", "rtol") else v for k, v in data.items() if k != "outputs"}
        outputs = [OutputCheck(**{k: num(v) if k in ("max_abs_diff", "max_rel_diff", "scale", "tolerance") else v
                                  for k, v in o.items()}) for o in data.get("outputs", [])]
        return cls(outputs=outputs, **fields)

    def summary(self) -> str:
        worst = max(self.outputs, key=lambda o: o.max_abs_diff / max(o.tolerance, 1e-300), default=None)
        where = f" (worst: {worst.name}, {worst.max_abs_diff:.3g} > {worst.tolerance:.3g})" if worst and not self.passed else ""
        where += f"; tolerance: {self.basis}" if self.basis and not self.passed else ""
        return (f"{'equal' if self.passed else 'NOT equal'} in {self.dtype} over {self.batches} batches: "
                f"max abs diff {self.max_abs_diff:.3g}{where}")


def finite_json(obj: Any) -> Any:
    """JSON-safe: infinities and NaN as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_json(v) for v in obj]
    return obj


def flatten_outputs(out: Any, prefix: str = "output") -> dict[str, torch.Tensor]:
    """Name every tensor in a model's output: tensors, tuples, dicts and HF ModelOutputs."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    result: dict[str, torch.Tensor] = {}
    if isinstance(out, dict) or hasattr(out, "keys") and hasattr(out, "__getitem__"):
        for k in out.keys():
            result.update(flatten_outputs(out[k], str(k) if prefix == "output" else f"{prefix}.{k}"))
    elif isinstance(out, (list, tuple)):
        for i, v in enumerate(out):
            result.update(flatten_outputs(v, f"{prefix}[{i}]"))
    return result


def run_model(module: nn.Module, batch: Batch, who: str = "the model") -> dict[str, torch.Tensor]:
    """Run ``module`` on one batch without gradients and name its output tensors.

    Raises :class:`InputsError` naming ``who`` and the input shapes when the model rejects
    the batch (wrong shape for a fixed-shape ``.pt2`` program, wrong dtype...).
    """
    args, kwargs = batch
    try:
        with torch.no_grad(), weights_default_dtype(module):
            return flatten_outputs(module(*args, **kwargs))
    except Exception as exc:
        shapes = ", ".join([str(list(t.shape)) for t in args] + [f"{k}={list(v.shape)}" for k, v in kwargs.items()])
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise InputsError(f"{who} failed on inputs of shape {shapes} ({type(exc).__name__}: {detail})") from None


def as_dtype(module: nn.Module, dtype: torch.dtype, device: torch.device | str | None = None) -> nn.Module:
    """An eval-mode copy of ``module`` in ``dtype`` (on ``device`` if given; the original is untouched)."""
    twin = copy.deepcopy(module)
    eval_mode(twin)
    return twin.to(dtype) if device is None else twin.to(device=device, dtype=dtype)


def through_map(a: torch.Tensor, b: torch.Tensor, m: AxisMap) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a', b')``: the original output ``a`` mapped by ``m`` and the positions of the grown ``b`` it predicts.

    Along ``m.dim``, grown position ``i`` holds ``a[index[i]] · scale[i]``; fresh positions
    (``index[i] == -1``) are left out. Shapes that do not fit the map are returned as they are
    (and then fail as a shape mismatch).
    """
    dim = m.dim % b.dim() if b.dim() else 0
    if b.dim() == 0 or a.dim() != b.dim() or b.shape[dim] != len(m.index):
        return a, b
    keep = [i for i, j in enumerate(m.index) if j >= 0]
    src = torch.tensor([m.index[i] for i in keep], dtype=torch.long)
    if src.numel() and int(src.max()) >= a.shape[dim]:
        return a, b
    view = [1] * a.dim()
    view[dim] = -1
    scale = torch.tensor([m.scale[i] for i in keep], dtype=torch.float64).view(view)
    mapped = a.detach().to(torch.float64).index_select(dim, src) * scale
    return mapped, b.index_select(dim, torch.tensor(keep, dtype=torch.long))


def compose_maps(first: dict[str, AxisMap], then: dict[str, AxisMap]) -> dict[str, AxisMap]:
    """The output maps of two steps run one after the other (``then`` applied to ``first``'s grown outputs)."""
    out = dict(first)
    for name, m in then.items():
        f = first.get(name)
        if f is None:
            out[name] = m
            continue
        if f.dim != m.dim:  # grown along two axes: no single map says it, so the shapes will not match (refused)
            del out[name]
            continue
        out[name] = AxisMap(m.dim, tuple(f.index[j] if j >= 0 else -1 for j in m.index),
                            tuple(f.scale[j] * s if j >= 0 else s for j, s in zip(m.index, m.scale)))
    return out


def compare_outputs(ref: dict[str, torch.Tensor], cand: dict[str, torch.Tensor], atol: float, rtol: float,
                    into: dict[str, OutputCheck] | None = None,
                    maps: dict[str, AxisMap] | None = None) -> dict[str, OutputCheck]:
    """Fold one batch's outputs into per-output checks (the worst case is kept across batches).

    ``maps`` names the outputs a step grew on purpose and how (see :func:`through_map`).
    """
    checks = into if into is not None else {}
    for name in list(ref) + [n for n in cand if n not in ref]:
        a, b = ref.get(name), cand.get(name)
        if maps and name in maps and a is not None and b is not None:
            a, b = through_map(a, b, maps[name])
        check = _check_one(name, a, b, atol, rtol)
        prev = checks.get(name)
        if prev is not None and (prev.note or check.note):
            check = prev if prev.note else check
        elif prev is not None:
            scale = max(prev.scale, check.scale)
            max_abs = max(prev.max_abs_diff, check.max_abs_diff)
            tol = atol + rtol * scale
            check = OutputCheck(name, check.shape, max_abs, max(prev.max_rel_diff, check.max_rel_diff),
                                scale, tol, prev.passed and check.passed)
        checks[name] = check
    return checks


def _check_one(name: str, a: torch.Tensor | None, b: torch.Tensor | None, atol: float, rtol: float) -> OutputCheck:
    if a is None or b is None:
        present = a if a is not None else b
        return OutputCheck(name, list(present.shape), math.inf, math.inf, 0.0, 0.0, False,
                           "missing from the grown model" if b is None else "not in the original model")
    if a.shape != b.shape:
        return OutputCheck(name, list(a.shape), math.inf, math.inf, 0.0, 0.0, False,
                           f"shape {list(a.shape)} vs {list(b.shape)}")
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
    # A NaN or infinity on one side only is an infinite difference (nan_to_num would otherwise
    # also clamp +inf to the largest finite float and report a number).
    diff = torch.nan_to_num(torch.where(same, torch.zeros_like(a64), (a64 - b64).abs()), nan=math.inf, posinf=math.inf)
    max_abs = float(diff.max()) if diff.numel() else 0.0
    finite = a64[torch.isfinite(a64)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    tol = atol + rtol * scale
    return OutputCheck(name, list(a.shape), max_abs, max_rel, scale, tol, max_abs <= tol)


def _run_both(ref: nn.Module, cand, batch: Batch, device: torch.device | str | None = None,
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Both models' named outputs on ``batch`` (run on ``device``), compared on the CPU."""
    on = batch if device is None else to_device(batch, device)
    a = run_model(ref, on, "the original model")
    c = run_model(cand, on, "the grown model") if isinstance(cand, nn.Module) else cand(batch)
    if device is not None:
        a, c = ({k: v.cpu() for k, v in out.items()} for out in (a, c))
    return a, c


def _prepare(reference: nn.Module, candidate, batch: Batch, dtype: torch.dtype, device: torch.device | str | None = None):
    """Both models in ``dtype`` and their outputs on the first batch (raises if either cannot run)."""
    ref = as_dtype(reference, dtype, device)
    cand = as_dtype(candidate, dtype, device) if isinstance(candidate, nn.Module) else candidate
    return ref, cand, _run_both(ref, cand, cast_batch(batch, dtype), device)


def verify_models(reference: nn.Module, candidate: nn.Module | Callable[[Batch], dict[str, torch.Tensor]],
                  batches: list[Batch], *, dtype: torch.dtype = torch.float64,
                  atol: float | None = None, rtol: float | None = None,
                  exact_in_dtype: bool | None = None, output_maps: dict[str, AxisMap] | None = None,
                  device: torch.device | str | None = None) -> VerifyReport:
    """Run both models in eval mode on ``batches`` in ``dtype`` and compare every output.

    ``dtype=float64`` falls back to float32 (said in ``note``) when a model cannot run in
    float64. ``candidate`` may also be a callable from batch to named outputs (ONNX).
    ``exact_in_dtype`` is what the step that made ``candidate`` says about the weights' dtype:
    True (its weights are exact in it) holds it to :func:`exact_tolerance`, False or None to the
    dtype's rounding (:data:`DEFAULT_TOL`); ``basis`` in the report says which and why.
    ``output_maps`` names outputs the step grew on purpose (the logits of a larger vocabulary):
    they are compared through the map (see :func:`through_map`; said in ``note``).
    ``device`` is where both models run (``cuda``; default the CPU); outputs are compared on the CPU.
    """
    device = None if device in (None, "cpu") else device
    note = ""
    try:
        ref, cand, first = _prepare(reference, candidate, batches[0], dtype, device)
    except Exception as exc:
        if dtype == torch.float32:
            raise
        note = f"float64 not supported by this model ({type(exc).__name__}); checked in float32"
        dtype = torch.float32
        ref, cand, first = _prepare(reference, candidate, batches[0], dtype, device)
    precision = storage_precision(reference, candidate, compute=dtype)
    first_batch = cast_batch(batches[0], dtype)
    d_atol, d_rtol, basis = _default_tolerance(ref, first_batch if device is None else to_device(first_batch, device),
                                               precision, dtype, exact_in_dtype)
    if atol is not None or rtol is not None:
        basis = "given" + (f" (otherwise: {basis})" if atol is None or rtol is None else "")
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    checks: dict[str, OutputCheck] = {}
    compare_outputs(*first, atol, rtol, checks, output_maps)
    for batch in batches[1:]:
        compare_outputs(*_run_both(ref, cand, cast_batch(batch, dtype), device), atol, rtol, checks, output_maps)
    outputs = list(checks.values())
    passed = bool(outputs) and all(o.passed for o in outputs)
    if not outputs:
        note = (note + "; " if note else "") + "the model returned no tensors"
    mapped = sorted(n for n in (output_maps or {}) if n in checks)
    if mapped:
        note = (note + "; " if note else "") + (f"{', '.join(mapped)} compared through the output map (the grown "
                                                "positions that derive from the original's; fresh ones are not compared)")
    if precision != dtype and not (exact_in_dtype and basis.startswith("exact")):
        note = (note + "; " if note else "") + f"weights stored in {_name(precision)}: its tolerances apply"
    return VerifyReport(passed, _name(dtype), len(batches), atol, rtol,
                        max((o.max_abs_diff for o in outputs), default=0.0), outputs, note, basis)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _default_tolerance(ref: nn.Module, batch: Batch, precision: torch.dtype, compute: torch.dtype,
                       exact_in_dtype: bool | None) -> tuple[float, float, str]:
    """(atol, rtol, why) when none is given: the rounding tolerance of ``precision``, tightened to
    :func:`exact_tolerance` when the step is exact in it (never looser than the rounding tolerance)."""
    profile = profile_run(ref, batch, compute) if exact_in_dtype else None
    return default_tolerance(profile, precision, compute, exact_in_dtype)


def default_tolerance(profile: Profile | None, precision: torch.dtype, compute: torch.dtype,
                      exact_in_dtype: bool | None) -> tuple[float, float, str]:
    """:func:`_default_tolerance` from the reference's :class:`Profile` (observed by the caller; None when it
    could not be): whole-model and block-wise verification hold an exact step to the same bound."""
    r_atol, r_rtol = DEFAULT_TOL.get(precision, DEFAULT_TOL[torch.float32])
    rounded = f"{_name(precision)} rounding"
    if exact_in_dtype is None:
        return r_atol, r_rtol, rounded + ("" if precision == compute else
                                          f" (the step does not say it is exact in {_name(precision)})")
    if not exact_in_dtype:
        return r_atol, r_rtol, rounded + f" (the step rounds weights to {_name(precision)})"
    if profile is None:
        return r_atol, r_rtol, rounded + " (the model's arithmetic could not be observed)"
    e_atol, e_rtol = exact_tolerance(profile.lowest, profile.stages)
    inside = "" if profile.lowest == compute else f"; the model computes in {_name(profile.lowest)} inside"
    return (min(e_atol, r_atol), min(e_rtol, r_rtol),
            f"exact in {_name(precision)}: {EXACT_ULPS} ulps of {_name(profile.lowest)} per rounding stage × "
            f"{profile.stages} stages{inside}" + (f", capped at {rounded}" if e_rtol > r_rtol else ""))
