"""Constants a model's forward creates from Python literals, with their values in a meta-device trace.

A streamed run traces the model on the meta device (no weights in memory). A tensor the forward
builds from a literal on the device of its inputs — ``torch.tensor([..], device=x.device)``,
``x.new_tensor(..)``, the list index of ``x[..., [-2], :]`` — is then a meta tensor: ``torch.export``
lifts it as a constant that holds no values, and an analysis that must read it (a head picked by a
constant index) could only refuse. The values come from the Python code, not from the weights, so
they are the same on any device: :func:`literal_values` records them while tracing (a
``TorchFunctionMode`` that sees the literal at the call that builds the tensor), and
:meth:`Literals.fill` puts CPU tensors holding them in place of the meta constants of the traced
module. Only literals are recorded, up to :data:`LIMIT` elements each: no weight, no buffer and no tensor
computed in the model gains values, so planning still allocates nothing of the model's size. A constant
whose values were not recorded stays a meta tensor, and the analyses that need its values refuse as before.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx
from torch.overrides import TorchFunctionMode

LIMIT = 1 << 16  # elements: a literal written in model code is small; a larger one stays without values
FACTORIES = {torch.tensor: 0, torch.as_tensor: 0, torch.Tensor.new_tensor: 1}  # function → position of the data
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _literal(data: Any) -> bool:
    """Whether ``data`` is a Python number or a (nested) list or tuple of them: a value known without running."""
    if isinstance(data, (list, tuple)):
        return all(_literal(d) for d in data)
    return isinstance(data, (bool, int, float))


def _int_list(index: Any) -> bool:
    """Whether ``index`` is a flat list of ints (``[-2]``), which indexing turns into an integer index tensor."""
    return isinstance(index, list) and bool(index) and all(type(i) is int for i in index)


class Literals(TorchFunctionMode):
    """Records every meta tensor built from a literal while active; :meth:`fill` gives traced constants their values."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, tuple[torch.Tensor, Any]] = {}  # id → (the meta tensor, kept alive; its literal)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in INDEXING and len(args) > 1 and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            args = (args[0], self._index(args[1], args[0].device), *args[2:])
        out = func(*args, **kwargs)
        at = FACTORIES.get(func)
        if at is not None and len(args) > at and _literal(args[at]):
            self._keep(out, args[at])
        return out

    def _index(self, index: Any, device: torch.device) -> Any:
        """``index`` with each flat list of ints made the integer tensor indexing would make of it, recorded."""
        if _int_list(index):
            return self._made(index, device)
        if isinstance(index, tuple):
            return tuple(self._made(i, device) if _int_list(i) else i for i in index)
        return index

    def _made(self, values: list[int], device: torch.device) -> torch.Tensor:
        out = torch.tensor(values, dtype=torch.long, device=device)
        self._keep(out, values)
        return out

    def _keep(self, out: Any, data: Any) -> None:
        if isinstance(out, torch.Tensor) and out.is_meta and out.numel() <= LIMIT:
            self.seen[id(out)] = (out, data)

    def fill(self, gm: fx.GraphModule) -> list[str]:
        """Replace each meta constant of ``gm`` recorded here by a CPU tensor of its values; returns their names."""
        filled = []
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            owner_name, _, leaf = str(node.target).rpartition(".")
            owner = operator.attrgetter(owner_name)(gm) if owner_name else gm
            value = getattr(owner, leaf, None)
            meta, data = self.seen.get(id(value), (None, None))
            if meta is None or meta is not value:
                continue
            real = torch.tensor(data, dtype=value.dtype)
            if real.shape != value.shape:
                continue  # not the tensor the literal made: kept without values
            if leaf in owner._buffers:
                owner._buffers[leaf] = real
            else:
                setattr(owner, leaf, real)
            filled.append(str(node.target))
        return filled


def on_meta(module: torch.nn.Module, tensors: list[Any]) -> bool:
    """Whether a trace of ``module`` on ``tensors`` runs on the meta device (a streamed run's plan)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers())) \
        or any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)


@contextmanager
def literal_values(active: bool) -> Iterator[Literals | None]:
    """Within the block (when ``active``), meta tensors built from literals are recorded; ``None`` when not active."""
    if not active:
        yield None
        return
    with Literals() as mode:
        yield mode
