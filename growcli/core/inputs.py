"""What a model takes as input, and how to make sample batches of it.

An :class:`InputSpec` describes positional and keyword tensor arguments without holding
data, so it can be stored in safetensors metadata and regenerated deterministically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import torch

from growcli.core.errors import InputsError, UsageError

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
    # How batches vary (not stored in to_json: a stored spec regenerates fixed shapes).
    # ``seq``: inputs whose dim 1 is a sequence that may change length from batch to batch
    # (``"0"``, ``"1"``, … for positional arguments, else keyword names); only set where the
    # model accepts any length (specs generated for Hugging Face models).
    seq: tuple[str, ...] = ()
    max_seq: int | None = None  # upper bound for those lengths (max_position_embeddings)
    mask: str | None = None  # keyword argument that is an attention mask (1 = token, 0 = padding)
    pad_id: int | None = None  # token id written at padded positions (random ids when None)
    # Further attention masks (an encoder-decoder's ``decoder_attention_mask``): ones, padded like ``mask``.
    masks: tuple[str, ...] = ()
    reason: str | None = None  # why an empty spec is empty (growcli cannot generate the inputs), for the error

    def describe(self) -> str:
        parts = [f"{list(t.shape)} {t.dtype}" for t in self.args]
        parts += [f"{k}={list(t.shape)} {t.dtype}" for k, t in self.kwargs]
        return ", ".join(parts) if parts else "(none)"

    def to_json(self) -> str:
        return json.dumps({"args": [asdict(t) for t in self.args],
                           "kwargs": {k: asdict(t) for k, t in self.kwargs}})

    @classmethod
    def from_json(cls, text: str) -> "InputSpec":
        """Parse :meth:`to_json` output; anything malformed or absurdly large raises ``FormatError``.

        The text comes from a file's metadata, so it is checked before any tensor is made:
        at most 64 tensors of at most 8 dims, 2**28 elements in all, dtypes named by torch.
        """
        from growcli.core.errors import FormatError

        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError, TypeError) as exc:
            raise FormatError(f"growcli.inputs is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
        if not isinstance(data, dict) or not isinstance(data.get("args", []), list) \
                or not isinstance(data.get("kwargs", {}), dict):
            raise FormatError("growcli.inputs: expected an object with an 'args' list and a 'kwargs' object")
        entries = [(f"arg {i}", d) for i, d in enumerate(data.get("args", []))] + list(data.get("kwargs", {}).items())
        if len(entries) > 64:
            raise FormatError(f"growcli.inputs describes {len(entries)} tensors; at most 64 are accepted")
        total = 0
        specs = []
        for name, d in entries:
            shape = d.get("shape") if isinstance(d, dict) else None
            if not isinstance(shape, list) or len(shape) > 8 or not all(
                    isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 2**28 for n in shape):
                raise FormatError(f"growcli.inputs: input {name} has a malformed shape {shape!r}")
            dtype, high = d.get("dtype", "float32"), d.get("high")
            if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise FormatError(f"growcli.inputs: input {name} has unknown dtype {dtype!r}")
            if high is not None and (not isinstance(high, int) or isinstance(high, bool)):
                raise FormatError(f"growcli.inputs: input {name} has a malformed 'high' {high!r}")
            numel = 1
            for n in shape:
                numel *= n
            total += numel
            if total > 2**28:
                raise FormatError(f"growcli.inputs: the inputs hold more than 2**28 elements (input {name} {shape})")
            specs.append((name, TensorSpec(tuple(shape), dtype, high)))
        n_args = len(data.get("args", []))
        return cls(tuple(t for _, t in specs[:n_args]), tuple(specs[n_args:]))

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
    mask = next((k for k, v in kwargs.items() if k == "attention_mask" and not v.is_floating_point()), None)
    return InputSpec(tuple(ts(a) for a in args), tuple((k, ts(v, k)) for k, v in kwargs.items()),
                     example=batch, mask=mask)


def with_example(spec: InputSpec, batch: Batch, dtype: torch.dtype | None = None) -> InputSpec:
    """``spec`` with ``batch`` (the user's ``--inputs``) as its example: the batch the model is traced on and the
    first of :func:`make_batches`. An empty spec (no input shape known) becomes :func:`spec_from_batch` of it.

    ``dtype`` (the model's floating dtype, :func:`floating_dtype`) casts the batch's floating-point tensors to it
    first, integer and boolean ones untouched: a float32 file for a float64 or bfloat16 model is traced and
    verified in the model's dtype, as the model would cast them itself (rounding to bfloat16 is silent)."""
    if dtype is not None:
        batch = cast_batch(batch, dtype)
    if spec.empty:
        return spec_from_batch(batch)
    return replace(spec, example=batch)


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


# Sequence length of batch i, as a fraction of the base length: batches differ in length.
SEQ_FACTORS = (1.0, 0.5, 1.5, 0.75, 1.25, 0.25)


def seq_lengths(spec: InputSpec, n: int, seq_len: int | None = None) -> list[int]:
    """The sequence length of each of ``n`` batches (all equal when the spec has no variable sequence)."""
    named = dict(spec.kwargs) | {str(i): t for i, t in enumerate(spec.args)}
    shapes = [named[k].shape for k in spec.seq if k in named and len(named[k].shape) > 1]
    if not shapes:
        return []
    base = seq_len or shapes[0][1]
    top = spec.max_seq or max(base, 1) * 2
    base = max(1, min(base, top))
    return [max(1, min(top, round(base * SEQ_FACTORS[i % len(SEQ_FACTORS)]))) for i in range(n)]


def make_batches(spec: InputSpec, n: int = 3, seed: int = 0, dtype: torch.dtype | None = None,
                 seq_len: int | None = None) -> list[Batch]:
    """``n`` deterministic batches following ``spec``; the spec's own example, if any, comes first.

    Float tensors are standard normal (cast to ``dtype`` when given); integer tensors are
    uniform in ``[0, high)`` (token ids over the whole vocabulary). Where the spec marks a
    variable sequence (``spec.seq``), batch ``i`` has length ``seq_len`` (default: the spec's)
    times 1, ½, 1½, ¾, … bounded by ``spec.max_seq``. Where it names an attention mask,
    batch 0 is unpadded and later batches right-pad every other row to a random length
    (mask 0 and ``pad_id`` there), so a model that mishandles padding shows a difference; further masks
    (``spec.masks``) are the same mask. An empty spec raises :class:`InputsError` (``spec.reason`` when set).
    """
    if spec.empty:
        raise InputsError(spec.reason or "no input shape is known for this model; pass --input-shape (e.g. 1,3,32,32) "
                          "or --inputs FILE")
    if seq_len is not None and seq_len < 1:
        raise UsageError(f"--seq-len {seq_len}: must be a positive integer")
    gen = torch.Generator().manual_seed(seed)
    batches: list[Batch] = []
    if spec.example is not None:
        batches.append(spec.example)
    lengths = seq_lengths(spec, n, seq_len)
    # A stored spec (to_json) keeps the attention_mask tensor but not the flag: still a mask, not noise.
    mask_name = spec.mask or next((k for k, t in spec.kwargs if k == "attention_mask" and not t.is_float), None)
    extra = spec.masks or [k for k, t in spec.kwargs if k == "decoder_attention_mask" and not t.is_float]
    masks = tuple(k for k in extra if k != mask_name)

    def one(t: TensorSpec, name: str, i: int) -> torch.Tensor:
        shape = t.shape
        if lengths and name in spec.seq and len(shape) > 1:
            shape = (shape[0], lengths[i], *shape[2:])
        torch_dtype = getattr(torch, t.dtype)
        if torch_dtype.is_floating_point:
            return torch.randn(shape, generator=gen, dtype=torch.float64).to(torch_dtype)
        if torch_dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=gen).bool()
        if name in masks:
            return torch.ones(shape, dtype=torch_dtype)  # padded in pad() with the main mask, never random
        return torch.randint(0, max(int(t.high or 2), 1), shape, generator=gen, dtype=torch_dtype)

    def pad(batch: Batch, i: int) -> Batch:
        """Right-pad every other row of batch ``i`` (none in batch 0): mask 0, ``pad_id`` there."""
        args, kwargs = batch
        mask = kwargs.get(mask_name) if mask_name else None
        if mask is None or mask.dim() < 2:
            return batch
        mask = torch.ones_like(mask)
        rows, length = mask.shape[0], mask.shape[1]
        padded = [r for r in range(rows) if i > 0 and (r + i) % 2 == 0 and length > 1]
        kwargs = dict(kwargs)
        for r in padded:
            keep = int(torch.randint(max(1, (length + 1) // 2), length, (1,), generator=gen))
            mask[r, keep:] = 0
            if spec.pad_id is not None:
                for k, v in kwargs.items():
                    if k != mask_name and k in spec.seq and not v.is_floating_point() and v.dim() == 2:
                        v[r, keep:] = spec.pad_id
        kwargs[mask_name] = mask
        for k in masks:
            if k in kwargs and kwargs[k].shape == mask.shape:
                kwargs[k] = mask.clone()
        return args, kwargs

    while len(batches) < n:
        i = len(batches)
        batch = (tuple(one(t, str(j), i) for j, t in enumerate(spec.args)), {k: one(t, k, i) for k, t in spec.kwargs})
        batches.append(pad(batch, i))
    if dtype is not None:
        batches = [cast_batch(b, dtype) for b in batches]
    return batches


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """``batch`` with every tensor on ``device``."""
    return tuple(a.to(device) for a in batch[0]), {k: v.to(device) for k, v in batch[1].items()}


def floating_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point parameter (or buffer); None when it has neither."""
    tensors = list(module.parameters()) + list(module.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def cast_batch(batch: Batch, dtype: torch.dtype) -> Batch:
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    return tuple(cast(a) for a in batch[0]), {k: cast(v) for k, v in batch[1].items()}
