"""What a model takes as input, and how to make sample batches of it.

An :class:`InputSpec` describes positional and keyword tensor arguments without holding
data, so it can be stored in safetensors metadata and regenerated deterministically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from growcli.errors import InputsError, UsageError

Batch = tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TensorSpec:
    """One input tensor: its shape (leading dim = batch), dtype name, and integer range."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    high: int | None = None  # exclusive upper bound for integer inputs (token ids)

    @property
    def is_float(self) -> bool:
        return getattr(torch, self.dtype).is_floating_point


@dataclass(frozen=True)
class InputSpec:
    args: tuple[TensorSpec, ...] = ()
    kwargs: tuple[tuple[str, TensorSpec], ...] = ()
    example: Batch | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        parts = [f"{list(t.shape)} {t.dtype}" for t in self.args]
        parts += [f"{k}={list(t.shape)} {t.dtype}" for k, t in self.kwargs]
        return ", ".join(parts) if parts else "(none)"

    def to_json(self) -> str:
        return json.dumps({"args": [asdict(t) for t in self.args],
                           "kwargs": {k: asdict(t) for k, t in self.kwargs}})

    @classmethod
    def from_json(cls, text: str) -> "InputSpec":
        data = json.loads(text)
        mk = lambda d: TensorSpec(tuple(d["shape"]), d.get("dtype", "float32"), d.get("high"))  # noqa: E731
        return cls(tuple(mk(d) for d in data.get("args", [])),
                   tuple((k, mk(d)) for k, d in data.get("kwargs", {}).items()))

    @property
    def empty(self) -> bool:
        return not self.args and not self.kwargs


def spec_from_batch(batch: Batch, high: dict[str, int] | None = None) -> InputSpec:
    args, kwargs = batch
    def ts(t: torch.Tensor, name: str | None = None) -> TensorSpec:
        h = None
        if not t.is_floating_point():
            h = (high or {}).get(name or "", int(t.max().item()) + 1 if t.numel() else 1)
        return TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."), h)
    return InputSpec(tuple(ts(a) for a in args), tuple((k, ts(v, k)) for k, v in kwargs.items()),
                     example=batch)


def parse_input_shape(text: str) -> InputSpec:
    """Parse ``--input-shape``: ``1,3,32,32`` or several tensors ``2,16;2,4``; ``:int64`` suffix allowed."""
    specs = []
    for part in text.split(";"):
        part = part.strip()
        dtype = "float32"
        if ":" in part:
            part, dtype = part.split(":", 1)
        try:
            shape = tuple(int(x) for x in part.replace("x", ",").split(",") if x.strip())
        except ValueError:
            raise UsageError(f"--input-shape {text!r}: expected comma-separated integers like 1,3,32,32") from None
        if not shape or any(d <= 0 for d in shape):
            raise UsageError(f"--input-shape {text!r}: every dimension must be a positive integer")
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise UsageError(f"--input-shape {text!r}: unknown dtype {dtype!r}")
        specs.append(TensorSpec(shape, dtype, 2 if not getattr(torch, dtype).is_floating_point else None))
    return InputSpec(tuple(specs))


def make_batches(spec: InputSpec, n: int = 3, seed: int = 0, dtype: torch.dtype | None = None) -> list[Batch]:
    """``n`` deterministic batches following ``spec``; the spec's own example, if any, comes first.

    Float tensors are standard normal (cast to ``dtype`` when given); integer tensors are
    uniform in ``[0, high)``.
    """
    if spec.empty:
        raise InputsError("no input shape is known for this model; pass --input-shape (e.g. 1,3,32,32) or --inputs FILE")
    gen = torch.Generator().manual_seed(seed)
    batches: list[Batch] = []
    if spec.example is not None:
        batches.append(spec.example)

    def one(t: TensorSpec) -> torch.Tensor:
        torch_dtype = getattr(torch, t.dtype)
        if torch_dtype.is_floating_point:
            return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(torch_dtype)
        if torch_dtype == torch.bool:
            return torch.randint(0, 2, t.shape, generator=gen).bool()
        return torch.randint(0, max(int(t.high or 2), 1), t.shape, generator=gen, dtype=torch_dtype)

    while len(batches) < n:
        batches.append((tuple(one(t) for t in spec.args), {k: one(t) for k, t in spec.kwargs}))
    if dtype is not None:
        batches = [cast_batch(b, dtype) for b in batches]
    return batches


def cast_batch(batch: Batch, dtype: torch.dtype) -> Batch:
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    return tuple(cast(a) for a in batch[0]), {k: cast(v) for k, v in batch[1].items()}


def load_inputs_file(path: str | Path, spec: InputSpec | None = None) -> Batch:
    """Read one batch from a .safetensors or .pt file of tensors.

    Keys ``"0"``, ``"1"``, … are positional arguments in that order; any other key is a
    keyword argument of ``forward``. Shapes are checked against ``spec`` (batch dim free).
    """
    from growcli.io.formats import read_tensor_file

    tensors = read_tensor_file(Path(path), what="inputs file")
    if not tensors:
        raise InputsError(f"{path}: the inputs file holds no tensors")
    positional = sorted((k for k in tensors if k.isdigit()), key=int)
    if positional and [int(k) for k in positional] != list(range(len(positional))):
        raise InputsError(f"{path}: positional input keys must be 0..N-1, got {positional}")
    batch: Batch = (tuple(tensors[k] for k in positional),
                    {k: v for k, v in tensors.items() if not k.isdigit()})
    if spec is not None and not spec.empty:
        expected = [("arg " + str(i), t) for i, t in enumerate(spec.args)] + list(spec.kwargs)
        got = [("arg " + str(i), a) for i, a in enumerate(batch[0])] + list(batch[1].items())
        exp_map = dict(expected)
        for name, tensor in got:
            want = exp_map.get(name)
            if want is not None and tuple(tensor.shape[1:]) != tuple(want.shape[1:]):
                raise InputsError(
                    f"{path}: input {name} has shape {list(tensor.shape)}, the model expects "
                    f"[batch, {', '.join(map(str, want.shape[1:]))}]")
    return batch
