"""Large embedding and linear layers run from disk a slice at a time during block-wise verification.

A model's largest tensors are usually outside its blocks: the token embedding and the LM head
(a 32k × 3k vocabulary matrix is 0.8 GB in float64; grown ×1.5, 1.2 GB). Loading them whole in
the verification dtype would make them the peak of a block-wise run, not one block. So a module
whose ``forward`` is torch's own ``nn.Embedding.forward`` or ``nn.Linear.forward`` (a subclass
that overrides it is left alone: it may compute something else), whose weight is saved as one
tensor and is larger than :data:`CHUNK_BYTES` in the verification dtype, runs with its weight
read from disk in row slices: an embedding reads only the rows of the tokens it looks up (the
gather is the same, value for value); a linear layer computes its outputs ``CHUNK_BYTES`` of
weight rows at a time into one preallocated output. An embedding with ``max_norm`` (which
rewrites its weight when it runs) is left whole.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from growcli.verification import ondisk
from growcli.verification.ondisk import OnDisk

CHUNK_BYTES = 64 << 20  # weight bytes, in the verification dtype, above which a layer runs in slices


def chunkable(model: OnDisk, owner: nn.Module, keys: list[str], dtype: torch.dtype) -> str | None:
    """The key of ``owner``'s weight when ``owner`` runs in slices (see the module docstring), else None."""
    if type(owner).forward not in (nn.Embedding.forward, nn.Linear.forward):
        return None
    if isinstance(owner, nn.Embedding) and owner.max_norm is not None:
        return None
    weight = next((k for k in keys if any(o is owner and a == "weight" for o, a, _ in model.slots[k])), None)
    if weight is None or weight not in model.disk or len(model.refs[model.disk[weight]].shape) != 2:
        return None
    rows, cols = model.refs[model.disk[weight]].shape
    return weight if rows * cols * dtype.itemsize > CHUNK_BYTES else None


def read_rows(model: OnDisk, key: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``start:stop`` of the 2-D tensor ``key``, read from its file alone, floats converted to ``dtype``."""
    t = ondisk.read_rows(model.refs[model.disk[key]], start, stop)
    return t.to(dtype) if t.is_floating_point() else t


def sliced_forward(model: OnDisk, owner: nn.Module, weight: str, dtype: torch.dtype) -> Callable:
    """A ``forward`` for ``owner`` (an embedding or a linear layer) that reads its weight from disk in slices;
    its other tensors (a bias) are expected loaded by the caller."""
    rows, cols = model.refs[model.disk[weight]].shape
    step = max(1, CHUNK_BYTES // (cols * dtype.itemsize))

    if isinstance(owner, nn.Embedding):
        def embed(ids: torch.Tensor) -> torch.Tensor:
            flat = ids.reshape(-1)
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
                raise IndexError(f"index out of range in self (ids outside 0…{rows - 1})")
            uniq, inverse = torch.unique(flat, return_inverse=True)
            table = torch.empty(len(uniq), cols, dtype=dtype)
            runs = runs_of(uniq.tolist())
            at = 0
            for a, n in runs:  # consecutive ids: one read
                table[at:at + n] = read_rows(model, weight, a, a + n, dtype)
                at += n
            return F.embedding(inverse, table).reshape(*ids.shape, cols)
        return embed

    def linear(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*x.shape[:-1], rows, dtype=torch.result_type(x, torch.empty(0, dtype=dtype)))
        bias = owner.bias
        for a in range(0, rows, step):
            b = min(rows, a + step)
            out[..., a:b] = F.linear(x, read_rows(model, weight, a, b, dtype), None if bias is None else bias[a:b])
        return out
    return linear


def runs_of(ids) -> list[tuple[int, int]]:
    """``(first, length)`` of each run of consecutive values (``i, i + 1, …``) of ``ids``, in order."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs
