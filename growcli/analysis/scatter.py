"""Rules of the coupled-channel analysis for row moves along other dims: gather, scatter, index_select, stack, unbind.

Message passing moves whole rows: ``msg = h.index_select(0, src)`` or ``h.gather(0, idx)`` reads rows of ``h``,
``out.scatter_add(0, idx, msg)`` (``scatter``, ``scatter_reduce``, their in-place forms) sums or writes them into
rows of ``out``. Along a dim ``d`` other than the channels' these ops treat every channel on its own:
``out[idx[e, c], c] += msg[e, c]``. So ``x``, ``index``, ``src`` and the result carry the same channels in the
same dim (torch gives them one rank), and a channel map ``g`` is exact when all of them follow it —
``index`` included, whose column ``c`` says where channel ``c``'s rows go. An index that is the same for every
channel (``dst.unsqueeze(-1).expand(-1, C)``, the usual form) is a broadcast: the walk follows it back to its
size-1 dim, and the module's own code expands it to the new ``C`` at run time. An index stored as a buffer or
parameter of ``C`` columns is copied along them like a BatchNorm's statistics. An index with fewer columns
than the channels, an op along the channels' own dim, or channels used as an index is refused, naming the op.
In a ``.pt2`` program the expanded size is a literal of the graph, which widening does not rewrite: an index
``expand``-ed to the channels by a literal is refused, naming the node.

``torch.stack`` along another dim than the channels' needs every part to carry them (like ``cat`` along
another dim) and moves them one dim up where it inserts its dim before them; ``unbind`` along another dim
gives every item the channels (one dim down where it removed its dim before them); ``unbind`` along the
channels' dim (one tensor per channel) is refused. :class:`ScatterRules` is a base of
:class:`growcli.analysis.coupling_forward.ForwardRules`; the backward rules of
:class:`growcli.analysis.coupling.Analysis` call its ``*_back`` methods.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from growcli.analysis.coupled_group import GroupWalk
from growcli.analysis.trace import Refuse, attr_of, in_place, op_name, shape, where

aten = torch.ops.aten


def _with_in_place(ops: set) -> set:
    """``ops`` and the in-place forms (``scatter_add_``) aten has of them."""
    return set(ops) | in_place(ops)


def _ops(*names: tuple[str, str]) -> set:
    return {getattr(getattr(aten, n), o) for n, o in names if hasattr(getattr(aten, n, None), o)}


# ``x.scatter*(dim, index, src | value[, reduce])``: ``self`` at 0, ``dim`` at 1, ``index`` at 2, ``src`` (or a
# scalar) at 3.
SCATTER = _with_in_place(_ops(("scatter", "src"), ("scatter", "value"), ("scatter", "reduce"),
                              ("scatter", "value_reduce"), ("scatter_add", "default"), ("scatter_reduce", "two")))
GATHER = _ops(("gather", "default"))  # x.gather(dim, index): the result has the index's shape
INDEX_SELECT = _ops(("index_select", "default"))  # x.index_select(dim, index), index 1-D
STACK = _ops(("stack", "default"))
UNBIND = _ops(("unbind", "int"))
ROW_MOVES = SCATTER | GATHER | INDEX_SELECT | STACK | UNBIND


def _axis(node: fx.Node, rank: int, at: int = 1, default: int = 0) -> int:
    value = node.args[at] if len(node.args) > at else node.kwargs.get("dim", default)
    return value % rank


class ScatterRules(GroupWalk):
    """The row-move rules of the walk (see module docstring)."""

    def _row_move(self, src: fx.Node, node: fx.Node, dim: int) -> None:
        """Forward: ``src`` carries the channels in ``dim`` and is an operand of ``node`` (one of :data:`ROW_MOVES`)."""
        t = node.target
        if t in UNBIND:
            return self._unbind(src, node, dim)
        if t in STACK:
            return self._stack(src, node, dim)
        if src not in self.core:
            raise Refuse(f"{op_name(node)}{where(node)} moves rows of concatenated or flattened channels")
        if t in INDEX_SELECT:
            if node.args[0] is not src:
                raise Refuse(f"{op_name(node)}{where(node)} uses the channels as indices")
            self._index_select_back(node, dim)
            self._mark(node, dim, backward=False)
            return
        # gather, scatter: every tensor operand and the result carry the channels in ``dim``
        self._gather_scatter_back(node, dim)
        self._mark(node, dim, backward=False)

    def _index_select_back(self, node: fx.Node, dim: int) -> None:
        """``x.index_select(d, index)`` carries the channels in ``dim``: so does ``x`` (``d`` must be another dim)."""
        if _axis(node, len(shape(node))) == dim:
            raise Refuse(f"{op_name(node)}{where(node)} selects along the grown dimension")
        self._must_carry(node.args[0], dim)

    def _gather_scatter_back(self, node: fx.Node, dim: int) -> None:
        """A gather's or scatter's result carries the channels in ``dim``: so do ``x``, ``index`` and ``src``."""
        if _axis(node, len(shape(node))) == dim:
            verb = "gathers" if node.target in GATHER else "scatters"
            raise Refuse(f"{op_name(node)}{where(node)} {verb} along the grown dimension")
        index = node.args[2]
        if self.trace.is_model and isinstance(index, fx.Node) and index.target == aten.expand.default \
                and list(index.args[1])[dim] != -1:
            raise Refuse(f"the index of {op_name(node)}{where(node)} is expanded to the {self.group.size} channels by "
                         f"a literal size (node {index.name}) in this .pt2 program, which widening does not rewrite; "
                         "grow the torch.nn model (weights with --arch) instead")
        operands = [node.args[0], index] + ([node.args[3]] if node.target in SCATTER and len(node.args) > 3 else [])
        for arg in operands:
            if isinstance(arg, fx.Node):
                what = "index" if arg is index else "operand"
                if shape(arg) is None or len(shape(arg)) != len(shape(node)) or shape(arg)[dim] != self.group.size:
                    raise Refuse(f"the {what} {arg.name} of {op_name(node)}{where(node)} does not have the "
                                 f"{self.group.size} channels in dimension {dim} (shape {list(shape(arg) or ())})")
                self._must_carry(arg, dim)

    def _stack(self, src: fx.Node, node: fx.Node, dim: int) -> None:
        if src not in self.core:
            raise Refuse(f"stack{where(node)} stacks concatenated or flattened channels")
        self._stack_back(node, dim + (1 if _axis(node, len(shape(node))) <= dim else 0))

    def _stack_back(self, node: fx.Node, dim: int) -> None:
        """``torch.stack(parts, d)`` carries the channels in ``dim`` (≠ ``d``): every part carries them, in the dim
        below when ``d`` is before them."""
        d = _axis(node, len(shape(node)))
        if d == dim:
            raise Refuse(f"stack{where(node)} stacks tensors into the grown dimension")
        part_dim = dim - (1 if d < dim else 0)
        for part in node.args[0]:
            if isinstance(part, fx.Node):
                self._must_carry(part, part_dim)
        self._mark(node, dim, backward=False)

    def _unbind(self, src: fx.Node, node: fx.Node, dim: int) -> None:
        d = _axis(node, len(shape(src)))
        if d == dim:
            raise Refuse(f"unbind{where(node)} splits the grown dimension into one tensor per channel")
        for u in node.users:
            if u.target != operator.getitem:
                raise Refuse(f"the items of unbind{where(node)} are used whole by {op_name(u)}")
            self._propagate(src, u, dim - (1 if d < dim else 0))

    def _unbind_back(self, item: fx.Node, dim: int) -> None:
        """Item ``item`` of an ``unbind`` carries the channels in ``dim``: its input does, in the dim above where the
        unbind removed its dim at or before them (the forward rule then gives every item the channels)."""
        node = item.args[0]
        d = _axis(node, len(shape(node.args[0])))
        self._must_carry(node.args[0], dim + (1 if d <= dim else 0))

    def _must_carry(self, arg: fx.Node, dim: int) -> None:
        """``arg`` must carry the channels in ``dim``: a parameter or buffer is copied along it, a computed tensor
        followed back (already carrying them: nothing to do)."""
        if arg in self.core:
            if self.core[arg] != dim:
                raise Refuse(f"{op_name(arg)}{where(arg)} carries the channels in two different dimensions")
            return
        if attr_of(arg) is not None:
            self._use(attr_of(arg), dim, "copy")
        else:
            self._mark(arg, dim, backward=True)
