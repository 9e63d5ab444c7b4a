"""What a streaming step reads: a checkpoint's config and tensors, on disk or as planned by the steps before it.

A :class:`Stage` is a checkpoint as a step sees it: a directory holding its ``config.json``
(the input's own, or a scratch directory holding only the config a planned step produced) and,
per tensor name, an :class:`~growcli.run.upcycle_stream.Entry` saying how its bytes are made
from the INPUT checkpoint — pieces that are byte ranges of the input shards (a copy or a
rename), zeros, or values computed when written (a rewrite, which reads the tensors it depends
on through :func:`read_entry` at that moment). A step planned on a stage yields entries in the
same terms, so a chain of steps composes into one map from the input's tensors to the final
ones, and no intermediate tensor is ever written or held beyond the one being computed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from growcli.io.shards import ITEMSIZE, OutTensor, TensorRef, read_tensors
from growcli.run.upcycle_stream import DTYPES, Entry


class Stage:
    """A checkpoint: ``directory`` (its ``config.json``) and ``tensors`` (checkpoint name → :class:`Entry`)."""

    def __init__(self, directory: Path, tensors: dict[str, Entry]):
        self.directory = Path(directory)
        self.tensors = tensors

    @classmethod
    def from_dir(cls, src: Path) -> "Stage":
        """The input checkpoint: every tensor one byte range of its shard (headers read, no values)."""
        return cls(src, {n: Entry(n, r.dtype, r.shape, [r]) for n, r in read_tensors(src).items()})

    @property
    def config(self) -> dict:
        return json.loads((self.directory / "config.json").read_text())


def numel(entry: Entry | TensorRef) -> int:
    return math.prod(entry.shape)


def whole_ref(entry: Entry) -> TensorRef | None:
    """The one input byte range ``entry`` is, unchanged (a copy or a rename), else ``None``."""
    if len(entry.pieces) == 1 and isinstance(entry.pieces[0], TensorRef):
        ref = entry.pieces[0]
        if ref.dtype == entry.dtype and tuple(ref.shape) == tuple(entry.shape):
            return ref
    return None


def read_entry(entry: Entry) -> torch.Tensor:
    """``entry``'s values: its pieces (input bytes, zeros, computed tensors) concatenated in order."""
    dtype = DTYPES[entry.dtype]
    parts: list[torch.Tensor] = []
    for piece in entry.pieces:
        if isinstance(piece, int):
            parts.append(torch.zeros(piece // ITEMSIZE[entry.dtype], dtype=dtype))
        elif isinstance(piece, TensorRef):
            with open(piece.file, "rb") as fh:
                fh.seek(piece.start)
                raw = bytearray(fh.read(piece.nbytes))
            parts.append(torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype))
        else:
            parts.append(piece().detach().reshape(-1).to(dtype))
    flat = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(0, dtype=dtype)
    return flat.reshape(entry.shape)


def from_out(t: OutTensor) -> Entry:
    """A stack executor's output tensor (a renamed stage entry, or its zeros) as an :class:`Entry`."""
    src: Entry = t.ref  # type: ignore[assignment] — the stack planners run on stage entries
    return Entry(t.name, src.dtype, tuple(src.shape), [src.nbytes] if t.zero else list(src.pieces))


def as_out(entry: Entry) -> OutTensor | None:
    """``entry`` as a byte-level shard tensor (a copy of one input range, or zeros), else ``None``."""
    ref = whole_ref(entry)
    if ref is not None:
        return OutTensor(entry.name, ref, False)
    if len(entry.pieces) == 1 and isinstance(entry.pieces[0], int) and entry.pieces[0] == entry.nbytes:
        return OutTensor(entry.name, TensorRef(Path(""), entry.dtype, tuple(entry.shape), 0, entry.nbytes), True)
    return None
