"""The coupled group of a layer's channels, and the bookkeeping of the walk that collects it.

A :class:`Group` lists every parameter dimension indexed by a producer layer's output
channels (:class:`TensorUse`: ``producer``, ``copy``, ``consumer`` or ``grouped_consumer``),
the other layers that produce the same channels, the literal view sizes of a ``.pt2``
program that must follow them (:class:`ViewPatch`), and the norms over the channels, which
make the growth exact only by whole copies (:class:`NormSite`, :mod:`growcli.analysis.norms`).
:class:`GroupWalk` is the state of the graph walk that finds them: which nodes carry the channels (``core``: in which dimension;
``derived``: concatenated or flattened, with a :class:`~growcli.analysis.layouts.Layout`),
the work list, and the parameters recorded so far. The rules that decide what each op does
with the channels are in :mod:`growcli.analysis.coupling_forward` and
:mod:`growcli.analysis.coupling`.

A parameter may be read by several ops (a layer applied at several depths, ALBERT's shared
layer). Every op that records a parameter is noted as reaching it (:attr:`GroupWalk.reached`);
the walk's owner is exact only if, once the walk is done, every op reading the parameter was
reached, all with the one dim, role and layout its :class:`TensorUse` has: then the same map
of the parameter is right at every use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from growcli.analysis.layouts import CORE, Layout
from growcli.analysis.trace import Refuse, Trace, op_name, shape, where


@dataclass
class TensorUse:
    """One parameter dimension indexed by the group's channels."""

    fqn: str
    dim: int
    role: str  # producer | copy | consumer | grouped_consumer
    layout: Layout = CORE
    groups: int = 1


@dataclass
class ViewPatch:
    """A view/reshape whose literal target size must follow the group (only in .pt2 programs)."""

    node: str
    out_dim: int
    layout: Layout


@dataclass
class NormSite:
    """A normalisation over the grown channels (LayerNorm, RMSNorm, GroupNorm): its statistics stay those of the
    original only when every channel is copied the same number of times, a GroupNorm's copies inside their group."""

    op: str  # LayerNorm | RMSNorm | GroupNorm
    module: str  # the module it runs in ("" when unknown)
    groups: int = 1  # a GroupNorm's groups
    dim: int = 0  # the channels' index in a LayerNorm's normalized_shape

    def describe(self) -> str:
        return f"{self.op} in '{self.module}'" if self.module else self.op


@dataclass
class Group:
    """Everything that grows together with a layer's output channels."""

    layer: str
    size: int
    producers: list[str] = field(default_factory=list)
    uses: list[TensorUse] = field(default_factory=list)
    groups: int = 1  # channels must grow group by group (grouped convolutions)
    depthwise: list[str] = field(default_factory=list)  # conv modules whose ``groups`` follows the size
    patches: list[ViewPatch] = field(default_factory=list)
    applications: int = 1  # the most ops reading one of its parameters in a forward pass (>1: shared across depths)
    norms: list[NormSite] = field(default_factory=list)  # normalisations over the channels: whole copies only

    def describe(self) -> list[str]:
        return [f"{u.fqn} (dim {u.dim}, {u.role})" for u in self.uses]


class GroupWalk:
    """The walk's state over ``trace`` for the channels of ``layer``; subclasses add the op rules
    (``_forward(src, node)`` for a user of a node carrying the channels, ``_backward(node)`` for a
    node that must carry them)."""

    # Ops through which a parameter reaches the op that reads it as a weight (``w.t()``, ``w[expert_ids]``).
    weight_moves: frozenset = frozenset()

    def __init__(self, trace: Trace, layer: str):
        self.trace = trace
        self.layer = layer
        self.users = trace.weight_users()
        self.core: dict[fx.Node, int] = {}
        self.derived: dict[fx.Node, tuple[int, Layout]] = {}
        self.work: list[tuple[str, fx.Node]] = []
        self.pending: dict[fx.Node, int] = {}  # concatenations along the channels, laid out when the walk is done
        self.group: Group | None = None
        self._uses: dict[str, TensorUse] = {}
        self._at: fx.Node | None = None  # the op whose rule runs now
        self.reached: dict[str, set[fx.Node]] = {}  # parameter → the ops reading it that the walk reached

    def _forward(self, src: fx.Node, node: fx.Node) -> None:
        raise NotImplementedError

    def _backward(self, node: fx.Node) -> None:
        raise NotImplementedError

    def _use(self, fqn: str, dim: int, role: str, layout: Layout = CORE, groups: int = 1) -> None:
        prev = self._uses.get(fqn)
        if prev is not None:
            if (prev.dim, prev.role) != (dim, role):
                raise Refuse(f"parameter {fqn} is tied to the channels in two ways ({prev.role} dim {prev.dim}, {role} dim {dim})")
            if (prev.layout, prev.groups) != (layout, groups):
                raise Refuse(f"parameter {fqn} reads the channels in two different layouts at two of its uses")
        else:
            self._uses[fqn] = TensorUse(fqn, dim, role, layout, groups)
        self.reached.setdefault(fqn, set()).update(self._owners_at(fqn))

    def _owners_at(self, fqn: str) -> list[fx.Node]:
        """The ops reading parameter ``fqn`` that the current rule accounts for: the op itself, an op it reads
        (a native batch norm seen through its ``getitem``) or the weight moves in between; every op reading it
        when the parameter itself carries the channels (its every use is then followed)."""
        at = self._at
        owners = [u for u in self.users.get(fqn, []) if u.op == "call_function"]
        if at is None:
            return []
        if at.op == "get_attr":
            return owners if str(at.target) == fqn else []
        near, todo = {at}, list(at.all_input_nodes)
        while todo:
            node = todo.pop()
            if node not in near and node.op == "call_function":
                near.add(node)
                if node.target in self.weight_moves:
                    todo.extend(node.all_input_nodes)
        return [u for u in owners if u in near]

    def _mark(self, node: fx.Node, dim: int, backward: bool) -> None:
        if node in self.core:
            if self.core[node] != dim:
                raise Refuse(f"{op_name(node)}{where(node)} carries the channels in two different dimensions")
            return
        if node in self.derived:
            raise Refuse(f"{op_name(node)}{where(node)} mixes concatenated or flattened channels with the group")
        size = shape(node)
        if size is None or dim >= len(size) or size[dim] != self.group.size:
            raise Refuse(f"{op_name(node)}{where(node)} does not carry the {self.group.size} channels in dimension {dim}")
        self.core[node] = dim
        self.work.append(("fwd", node))
        if backward:
            self.work.append(("bwd", node))

    def _mark_derived(self, node: fx.Node, dim: int, layout: Layout) -> None:
        if node in self.core or node in self.derived:
            raise Refuse(f"{op_name(node)}{where(node)} is reached by the channels twice")
        self.derived[node] = (dim, layout)
        self.work.append(("fwd", node))

    def _lay_out_cat(self, node: fx.Node, dim: int) -> None:
        raise NotImplementedError

    def _drain(self) -> None:
        while self.work or self.pending:
            if not self.work:
                node = next(iter(self.pending))
                self._lay_out_cat(node, self.pending.pop(node))
                continue
            kind, node = self.work.pop(0)
            if kind == "fwd":
                for user in list(node.users):
                    self._at = user
                    self._forward(node, user)
            else:
                self._at = node
                self._backward(node)

    def _state(self, node: fx.Node) -> tuple[int, Layout] | None:
        if node in self.core:
            return self.core[node], CORE
        return self.derived.get(node)

    def _propagate(self, src: fx.Node, dst: fx.Node, dim: int) -> None:
        """``dst`` carries ``src``'s positions (core or derived) at ``dim``."""
        if src in self.core:
            self._mark(dst, dim, backward=False)
        else:
            self._mark_derived(dst, dim, self.derived[src][1])

    def group_groups(self, groups: int) -> None:
        if self.group.groups not in (1, groups):
            raise Refuse(f"grouped convolutions with {self.group.groups} and {groups} groups share the channels")
        else:
            self.group.groups = groups
