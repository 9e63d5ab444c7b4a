"""Rules of the coupled-channel analysis for indexed writes and reads along other dims than the channels.

``out = x.index_put(indices, values, accumulate)`` (``out[indices] = values``, ``+=`` with ``accumulate=True``;
``x[idx] += v`` in place), ``x[idx]`` (``aten.index``) and ``x.index_add(axis, index, source)``: when no index
touches the dimension of the channels, every position along it stays where it is, so ``x``, ``values`` (or
``source``) and ``out`` carry the same channels (``values`` at the dim broadcasting against them; size 1 there:
the same value for every channel). An index along the channels, or channels used as an index, is refused,
naming the op. :class:`IndexRules` is a base of :class:`growcli.analysis.coupling_forward.ForwardRules`; the
backward rules of :class:`growcli.analysis.coupling.Analysis` call its ``*_operands`` and ``_index_back``.
"""

from __future__ import annotations

from torch import fx

from growcli.analysis.coupled_group import GroupWalk
from growcli.analysis.trace import Refuse, attr_of, index_result_dim, op_name, shape, where


def index_put_values_dim(node: fx.Node, dim: int) -> int | None:
    """The dim of an ``index_put``'s ``values`` broadcast against ``x``'s dim ``dim`` (None: ``dim`` is indexed, or
    ``values`` has no such dim and is broadcast along it)."""
    at = index_result_dim(node.args[1], len(shape(node.args[0])), dim)
    if at is None or not isinstance(node.args[2], fx.Node):
        return None
    v_dim = at[0] - (at[1] - len(shape(node.args[2])))
    return v_dim if v_dim >= 0 else None


class IndexRules(GroupWalk):
    """The indexing rules of the walk (see module docstring)."""

    def _index_put(self, src: fx.Node, node: fx.Node, dim: int) -> None:
        """``out = x; out[indices] = values`` (``+=`` with ``accumulate=True``): channels in a dim no index touches
        stay where they are in ``x`` and ``out`` and are read by ``values`` at the matching dim (or broadcast there);
        an index along the channels, or channels used as an index, is refused."""
        x, values = node.args[0], node.args[2]
        if src is not x and src is not values:
            raise Refuse(f"{op_name(node)}{where(node)} uses the channels as indices")
        if src not in self.core:
            raise Refuse(f"{op_name(node)}{where(node)} writes concatenated or flattened channels")
        x_dim = dim if src is x else next((d for d in range(len(shape(x))) if index_put_values_dim(node, d) == dim), None)
        if x_dim is None:
            raise Refuse(f"{op_name(node)}{where(node)} writes values carrying the channels along a dimension it indexes")
        self._index_put_operands(node, x_dim)
        self._mark(node, x_dim, backward=False)

    def _index_put_operands(self, node: fx.Node, dim: int) -> None:
        """``x`` and ``values`` of an ``index_put`` whose output carries the channels in ``dim`` carry them too."""
        x, values = node.args[0], node.args[2]
        if index_result_dim(node.args[1], len(shape(x)), dim) is None:
            raise Refuse(f"{op_name(node)}{where(node)} indexes along the grown dimension")
        v_dim = index_put_values_dim(node, dim)
        for arg, d in ((x, dim), (values, v_dim)):
            if d is not None and isinstance(arg, fx.Node) and shape(arg)[d] != 1:  # size 1: broadcast, every channel alike
                self._carries(arg, d)

    def _index_add(self, src: fx.Node, node: fx.Node, dim: int) -> None:
        """``out = x; out.index_add_(axis, index, source)``: along another axis than the channels, ``x``, ``source``
        and ``out`` carry them in the same dim."""
        if src is node.args[2] or node.args[1] % len(shape(node)) == dim:
            raise Refuse(f"{op_name(node)}{where(node)} adds entries along the grown dimension or uses the channels "
                         "as indices")
        if src not in self.core:
            raise Refuse(f"{op_name(node)}{where(node)} adds concatenated or flattened channels")
        self._index_add_operands(node, dim)
        self._mark(node, dim, backward=False)

    def _index_add_operands(self, node: fx.Node, dim: int) -> None:
        if node.args[1] % len(shape(node)) == dim:
            raise Refuse(f"{op_name(node)}{where(node)} adds entries along the grown dimension")
        for arg in (node.args[0], node.args[3]):
            if isinstance(arg, fx.Node) and shape(arg)[dim] != 1:
                self._carries(arg, dim)

    def _index_back(self, node: fx.Node, dim: int) -> None:
        """``x[idx]`` must carry the channels in ``dim``: so must ``x``, in the dim no index touches that lands there."""
        x = node.args[0]
        found = [d for d in range(len(shape(x))) if (index_result_dim(node.args[1], len(shape(x)), d) or (None,))[0] == dim]
        if len(found) != 1:
            raise Refuse(f"index{where(node)} makes a tensor that must share the channels by indexing along them")
        self._carries(x, found[0])

    def _carries(self, arg: fx.Node, dim: int) -> None:
        """``arg`` must carry the channels in ``dim``: a parameter is copied along it, a computed tensor followed back."""
        if attr_of(arg) is not None:
            self._use(attr_of(arg), dim, "copy")
        else:
            self._mark(arg, dim, backward=True)
