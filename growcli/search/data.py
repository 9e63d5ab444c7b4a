"""The search's data: a training and a validation file in the calibration format, and what a model scores on them.

Both files hold tensors that share their leading (sample) dimension, laid out as for
``widen --init gradmax`` (:mod:`growcli.analysis.calibration`): ``input`` (or ``0``, ``1``, …, or
``forward``'s argument names) and ``target`` (integer class indices for ``cross_entropy``, a
float tensor of the output's shape for ``mse``). The two files must hold the same keys with
the same per-sample shapes and dtypes; otherwise :class:`InputsError` names the difference.

:func:`evaluate` is the one measurement the search makes of a model: the sample-weighted mean
loss and, for class targets, the accuracy (the fraction of samples whose arg-max class is the
target).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from growcli.analysis.calibration import Calibration, batch_loss, from_tensors, prediction
from growcli.core.errors import InputsError
from growcli.core.inputs import InputSpec, cast_batch
from growcli.core.model import eval_mode


@dataclass
class SearchData:
    """Training and validation batches (``(model inputs, target)`` each) and the loss they use."""

    train: Calibration
    val: Calibration

    @property
    def loss(self) -> str:
        return self.train.loss

    @property
    def classification(self) -> bool:
        return self.loss == "cross_entropy"

    def example(self):
        """The first validation batch, as ``(args, kwargs)``: what every growth step is verified on first."""
        return self.val.batches[0][0]


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from growcli.io.formats import read_tensor_file

    return read_tensor_file(Path(path), what=what)


def check_same_layout(train: dict[str, torch.Tensor], val: dict[str, torch.Tensor], train_name: str,
                      val_name: str) -> None:
    """Same keys, per-sample shapes and dtypes in both files, else one :class:`InputsError` line."""
    if set(train) != set(val):
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        parts = ([f"{train_name} alone has {', '.join(only_train)}"] if only_train else []) + \
                ([f"{val_name} alone has {', '.join(only_val)}"] if only_val else [])
        raise InputsError(f"the training and validation data hold different keys: {'; '.join(parts)}")
    for key in sorted(train):
        a, b = train[key], val[key]
        if a.dtype != b.dtype or tuple(a.shape[1:]) != tuple(b.shape[1:]):
            raise InputsError(f"'{key}' is [N, {', '.join(map(str, a.shape[1:]))}] {str(a.dtype).removeprefix('torch.')} "
                              f"in {train_name} but [N, {', '.join(map(str, b.shape[1:]))}] "
                              f"{str(b.dtype).removeprefix('torch.')} in {val_name}")


def load_search_data(train_path: Path, val_path: Path, spec: InputSpec | None, *, loss: str = "auto",
                     batch_size: int = 32, kind: str = "state_dict") -> SearchData:
    """Read both files, check they agree with each other and with the model's inputs, and batch them.

    ``kind`` is how the model was loaded: a ``.pt2`` program runs only its exported batch size,
    so batches then have that size (a remainder is left out).
    """
    train_t = read_tensors(train_path, "training data file")
    val_t = read_tensors(val_path, "validation data file")
    return data_from_tensors(train_t, val_t, spec, loss=loss, batch_size=None if kind == "pt2" else batch_size,
                             train_name=str(train_path), val_name=str(val_path), fixed_batch=kind == "pt2")


def data_from_tensors(train: dict[str, torch.Tensor], val: dict[str, torch.Tensor], spec: InputSpec | None = None, *,
                      loss: str = "auto", batch_size: int | None = 32, train_name: str = "training data",
                      val_name: str = "validation data", fixed_batch: bool = False) -> SearchData:
    """:class:`SearchData` from tensors in memory, laid out as in the files."""
    check_same_layout(train, val, train_name, val_name)
    tr = from_tensors(train, spec, loss=loss, batch_size=batch_size, fixed_batch=fixed_batch, source=train_name)
    va = from_tensors(val, spec, loss=tr.loss, batch_size=batch_size, fixed_batch=fixed_batch, source=val_name)
    return SearchData(tr, va)


@dataclass(frozen=True)
class Score:
    """A model's validation loss (sample-weighted mean) and accuracy (``None`` for non-class targets)."""

    loss: float
    accuracy: float | None

    def to_dict(self) -> dict:
        return {"loss": self.loss, "accuracy": self.accuracy}


@torch.no_grad()
def evaluate(module: torch.nn.Module, cal: Calibration, dtype: torch.dtype | None = None) -> Score:
    """Loss and accuracy of ``module`` on every batch of ``cal``, in eval mode.

    ``dtype`` (e.g. ``torch.float64``) runs a copy of the model and the float inputs in that dtype;
    the module itself is left in the mode it was in.
    """
    import copy

    was_training = module.training
    model = copy.deepcopy(module).to(dtype) if dtype is not None else module
    eval_mode(model)
    total, correct, count = 0.0, 0, 0
    try:
        for batch, target in cal.batches:
            if dtype is not None:
                batch = cast_batch(batch, dtype)
            args, kwargs = batch
            out = model(*args, **kwargs)
            n = _samples(batch)
            total += float(batch_loss(out, target, cal.loss, cal.source)) * n
            count += n
            if cal.loss == "cross_entropy":
                pred = prediction(out)
                classes = pred.argmax(-1) if tuple(target.shape) == tuple(pred.shape[:-1]) else pred.argmax(1)
                correct += int((classes == target).sum())
    finally:
        set_mode(module, was_training)
    accuracy = None
    if cal.loss == "cross_entropy":
        accuracy = correct / max(1, _targets(cal))
    return Score(total / max(1, count), accuracy)


def set_mode(module: torch.nn.Module, training: bool) -> None:
    """Train or eval mode; a program loaded from ``.pt2`` keeps the mode it was exported in."""
    try:
        module.train(training)
    except NotImplementedError:
        pass


def _samples(batch) -> int:
    args, kwargs = batch
    first = args[0] if args else next(iter(kwargs.values()))
    return int(first.shape[0])


def _targets(cal: Calibration) -> int:
    return sum(int(t.numel()) for _, t in cal.batches if t is not None)
