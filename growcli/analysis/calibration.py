"""Calibration data: a few batches of the user's own inputs and targets, and the loss on them.

Gradient-informed growth (``widen --init gradmax``, ``growcli suggest``) needs the gradient
of a loss on real data. The data comes from one ``.safetensors`` or weights-only ``.pt``
file of tensors that share their leading (sample) dimension:

- ``input`` (or ``0``, ``1``, … for several positional arguments): the model's inputs;
  any other key except ``target`` is passed to ``forward`` by that name (``input_ids``,
  ``attention_mask``, ``pixel_values``, ``labels``…);
- ``target``: what the output is compared with: integer class indices for
  ``cross_entropy`` (shape of the output without its class dimension), or a float tensor
  of the output's shape for ``mse``.

``--loss auto`` picks ``cross_entropy`` for an integer ``target``, ``mse`` for a float one,
and the model's own ``loss`` output when there is no ``target`` but ``labels`` (Hugging
Face models compute their loss when given labels).

Loading is I/O and happens in the runner (:func:`attach`), before any transform runs; a
transform only looks its data up in the run's :class:`~growcli.transforms.registry.Context`
(:func:`lookup`). Every problem with a file is one :class:`~growcli.core.errors.InputsError` line
naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from growcli.core.errors import InputsError, UsageError
from growcli.core.inputs import Batch, InputSpec
from growcli.verification.compare import flatten_outputs

LOSSES = ("auto", "cross_entropy", "mse", "model")
DEFAULT_BATCH_SIZE = 32
INPUT_KEY, TARGET_KEY, LABELS_KEY = "input", "target", "labels"


@dataclass(frozen=True)
class DataRequest:
    """Which calibration data a step asks for; the key under which the runner stores it."""

    path: str
    loss: str = "auto"
    batches: int | None = None  # use only the first N batches
    batch_size: int | None = None  # default: DEFAULT_BATCH_SIZE, or a .pt2 program's fixed batch size


@dataclass
class Calibration:
    """Loaded calibration batches: ``(model inputs, target or None)`` each, and the resolved loss."""

    source: str
    loss: str  # cross_entropy | mse | model
    batches: list[tuple[Batch, torch.Tensor | None]]
    dropped: int = 0  # samples left out because a fixed-shape program needs full batches

    @property
    def samples(self) -> int:
        return sum(_batch_len(b) for b, _ in self.batches)

    def describe(self) -> str:
        dropped = f", {self.dropped} left out (the program runs fixed-size batches)" if self.dropped else ""
        return f"{self.samples} samples of {self.source} in {len(self.batches)} batches, loss {self.loss}{dropped}"


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise UsageError(f"loss {loss!r}: expected one of {', '.join(LOSSES)}")
    return loss


def load_calibration(request: DataRequest, spec: InputSpec, kind: str = "state_dict") -> Calibration:
    """Read ``request.path`` and split it into batches for a model taking ``spec``.

    ``kind`` is how the model was loaded: a ``.pt2`` program runs only the batch size it was
    exported with, so its batches have that size and a remainder is left out. Raises
    :class:`InputsError` (one line, naming the file and key) for missing keys, samples
    counts that differ between tensors, or input shapes the model does not take.
    """
    from growcli.io.formats import read_tensor_file

    path = Path(request.path)
    tensors = read_tensor_file(path, what="calibration data file")
    return from_tensors(tensors, spec, loss=request.loss, batch_size=request.batch_size, max_batches=request.batches,
                        fixed_batch=kind == "pt2", source=str(path))


def from_tensors(tensors: dict[str, torch.Tensor], spec: InputSpec | None = None, *, loss: str = "auto",
                 batch_size: int | None = None, max_batches: int | None = None, fixed_batch: bool = False,
                 source: str = "calibration data") -> Calibration:
    """Calibration batches from named tensors laid out as in a file (see the module docstring)."""
    check_loss(loss)
    keys = ", ".join(sorted(tensors)) or "none"
    if INPUT_KEY in tensors and "0" in tensors:
        raise InputsError(f"{source}: holds both 'input' and '0'; they name the same (first) argument, keep one")
    named = {("0" if k == INPUT_KEY else k): v for k, v in tensors.items()}
    target = named.pop(TARGET_KEY, None)
    positional = sorted((k for k in named if k.isdigit()), key=int)
    if [int(k) for k in positional] != list(range(len(positional))):
        raise InputsError(f"{source}: positional input keys must be 0..N-1, got {positional}")
    if not named:
        raise InputsError(f"{source}: no input tensors (keys found: {keys}); store the model's inputs under 'input' "
                          "(or '0', '1', …) or under its argument names")
    _check_against_spec(named, positional, spec, fixed_batch, source, keys)
    resolved = _resolve_loss(loss, target, named, source, keys)
    counts = {k: int(t.shape[0]) if t.dim() else 0 for k, t in [*named.items(), *([(TARGET_KEY, target)] if target is not None else [])]}
    n = counts[next(iter(counts))]
    for k, c in counts.items():
        if c != n:
            first = next(iter(counts))
            raise InputsError(f"{source}: '{_shown(k)}' has {c} samples (leading dimension) but '{_shown(first)}' has {n}; "
                              "every tensor holds one entry per sample")
    if n == 0:
        raise InputsError(f"{source}: the tensors hold no samples")
    size = batch_size or (_spec_batch(spec) if fixed_batch else None) or DEFAULT_BATCH_SIZE
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise UsageError(f"the number of calibration batches must be positive, got {max_batches}")
    if fixed_batch and n < size:
        raise InputsError(f"{source}: holds {n} samples; the .pt2 program runs batches of exactly {size}")
    stops = list(range(0, n, size))
    if fixed_batch:
        stops = [s for s in stops if s + size <= n]
    if max_batches is not None:
        stops = stops[:max_batches]
    batches = []
    for s in stops:
        sl = slice(s, s + size)
        args = tuple(named[k][sl] for k in positional)
        kwargs = {k: v[sl] for k, v in named.items() if not k.isdigit()}
        batches.append(((args, kwargs), target[sl] if target is not None else None))
    used = sum(min(size, n - s) for s in stops)
    return Calibration(source, resolved, batches, dropped=(n - used) if fixed_batch and max_batches is None else 0)


def _shown(key: str) -> str:
    return INPUT_KEY if key == "0" else key


def _spec_batch(spec: InputSpec | None) -> int | None:
    if spec is None or spec.empty:
        return None
    first = spec.args[0] if spec.args else spec.kwargs[0][1]
    return int(first.shape[0]) if first.shape else None


def _check_against_spec(named: dict[str, torch.Tensor], positional: list[str], spec: InputSpec | None,
                        strict: bool, source: str, keys: str) -> None:
    """Every input the model takes is present, and float inputs (every input, for a fixed-shape
    program) have the model's per-sample shape; token inputs may differ in sequence length."""
    if spec is None or spec.empty:
        return
    expected = [(str(i), t) for i, t in enumerate(spec.args)] + list(spec.kwargs)
    for name, want in expected:
        got = named.get(name)
        what = f"[batch, {', '.join(map(str, want.shape[1:]))}] {want.dtype}"
        if got is None:
            alias = " (or '0')" if name == "0" else ""
            raise InputsError(f"{source}: missing the model's input '{_shown(name)}'{alias} {what}; keys found: {keys}")
        if (strict or want.is_float) and tuple(got.shape[1:]) != tuple(want.shape[1:]):
            raise InputsError(f"{source}: '{_shown(name)}' has shape {list(got.shape)}; the model expects {what}")
        if want.is_float != got.is_floating_point():
            raise InputsError(f"{source}: '{_shown(name)}' is {str(got.dtype).removeprefix('torch.')}; "
                              f"the model expects {want.dtype}")
    extra = [k for k in positional if int(k) >= len(spec.args)]
    if extra:
        raise InputsError(f"{source}: holds {len(positional)} positional inputs; the model takes {len(spec.args)}")


def _resolve_loss(loss: str, target: torch.Tensor | None, named: dict[str, torch.Tensor], source: str, keys: str) -> str:
    if loss == "auto":
        if target is not None:
            return "mse" if target.is_floating_point() else "cross_entropy"
        if LABELS_KEY in named:
            return "model"
        raise InputsError(f"{source}: no 'target' tensor (for cross_entropy or mse) and no 'labels' (for the model's "
                          f"own loss); keys found: {keys}")
    if loss in ("cross_entropy", "mse") and target is None:
        raise InputsError(f"{source}: loss {loss} needs a 'target' tensor; keys found: {keys}")
    if loss == "cross_entropy" and target.is_floating_point():
        raise InputsError(f"{source}: cross_entropy needs integer class indices in 'target', got "
                          f"{str(target.dtype).removeprefix('torch.')}")
    if loss == "mse" and not target.is_floating_point():
        raise InputsError(f"{source}: mse needs a float 'target', got {str(target.dtype).removeprefix('torch.')}")
    return loss


def _batch_len(batch: Batch) -> int:
    args, kwargs = batch
    first = args[0] if args else next(iter(kwargs.values()))
    return int(first.shape[0])


# --------------------------------------------------------------------------- the loss
def prediction(output: Any) -> torch.Tensor:
    """The tensor a target is compared with: the output itself, its ``logits``, or its first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    named = {k: v for k, v in flatten_outputs(output).items() if k != "loss"}
    if not named:
        raise InputsError("the model returned no tensor to compare with the target")
    return named.get("logits", next(iter(named.values())))


def run_on_batch(module: torch.nn.Module, cal: "Calibration", i: int, args: tuple, kwargs: dict) -> Any:
    """``module(*args, **kwargs)`` on calibration batch ``i``; the model's own error becomes one
    :class:`InputsError` naming the data file and the batch."""
    try:
        return module(*args, **kwargs)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputsError(f"{cal.source}: the model failed on calibration batch {i + 1} "
                          f"({type(exc).__name__}: {detail})") from None


def batch_loss(output: Any, target: torch.Tensor | None, loss: str, source: str) -> torch.Tensor:
    """The mean loss of one batch; :class:`InputsError` when target and output do not fit."""
    if loss == "model":
        outs = flatten_outputs(output)
        if "loss" not in outs:
            raise InputsError(f"{source}: the model returned no 'loss' (outputs: {', '.join(outs) or 'none'}); "
                              "store a 'target' and use loss cross_entropy or mse")
        return outs["loss"]
    pred = prediction(output)
    if loss == "mse":
        if tuple(target.shape) != tuple(pred.shape):
            raise InputsError(f"{source}: 'target' has shape {list(target.shape)}, the model's output {list(pred.shape)}; "
                              "mse needs them equal")
        return F.mse_loss(pred, target.to(pred.dtype))
    if pred.dim() >= 2 and tuple(target.shape) == tuple(pred.shape[:-1]):
        logits, labels = pred.reshape(-1, pred.shape[-1]), target.reshape(-1)  # classes last (token models)
    elif pred.dim() >= 2 and tuple(target.shape) == tuple(pred.shape[:1] + pred.shape[2:]):
        logits, labels = pred, target  # classes in dim 1 (torch's convention, e.g. segmentation)
    else:
        raise InputsError(f"{source}: 'target' has shape {list(target.shape)}; for cross_entropy with output "
                          f"{list(pred.shape)} it must be the output's shape without its class dimension")
    classes = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise InputsError(f"{source}: 'target' holds class {int(labels.max()) if int(labels.max()) >= classes else int(labels.min())}"
                          f" but the model outputs {classes} classes (0..{classes - 1})")
    return F.cross_entropy(logits, labels.long())


# --------------------------------------------------------------------------- the runner's side
def request_from_options(options: dict[str, Any]) -> DataRequest | None:
    """The data a step's options ask for, or ``None``; malformed values are left to spec validation."""
    path = options.get("data")
    if not isinstance(path, str) or not path:
        return None
    loss = options.get("loss", "auto")
    batches, size = options.get("data_batches"), options.get("batch_size")
    if not isinstance(loss, str) or not (batches is None or isinstance(batches, int)) or \
            not (size is None or isinstance(size, int)):
        return None
    return DataRequest(path, loss, batches, size)


def attach(ctx, gm, step_options: Iterable[dict[str, Any]]) -> None:
    """Load the calibration data every step asks for into ``ctx.data`` (once per distinct request).

    This is the I/O half of gradient-informed steps; the runner calls it before the steps.
    """
    for options in step_options:
        request = request_from_options(options)
        if request is not None and request not in ctx.data:
            check_loss(request.loss)
            ctx.data[request] = load_calibration(request, gm.inputs, gm.kind)


def lookup(ctx, spec) -> Calibration:
    """The calibration data ``spec`` (with ``data``, ``loss``, ``data_batches``, ``batch_size``) asks for.

    In-memory data may also be stored under the plain name ``spec.data``. Raises
    :class:`UsageError` when nothing was loaded (a library caller skipped :func:`attach`).
    """
    request = DataRequest(spec.data, spec.loss, spec.data_batches, spec.batch_size)
    found = ctx.data.get(request, ctx.data.get(spec.data))
    if found is None:
        raise UsageError(f"calibration data {spec.data!r} was not loaded for this run; run the step through "
                         "growcli.run.runner.grow, or call growcli.analysis.calibration.attach(ctx, model, [options]) first")
    return found
