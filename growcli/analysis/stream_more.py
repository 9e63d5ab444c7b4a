"""Phase 2 of the residual-stream analysis, continued: rows of a parameter gathered as hidden states.

:class:`MoreRules` adds to :class:`growcli.analysis.stream_rules.Planner` the rules its module has no room for.

- ``weight[ids]`` (``index.Tensor``, ``index_select``) of a parameter whose hidden dimension is not indexed
  (Whisper's decoder positions, ``self.weight[position_ids]``): each gathered row is a row of the weight, so
  the result is hidden states exactly as an embedding lookup's are, and the weight grows like an
  embedding's (:meth:`MoreRules.gathered_rows`): tiled, padded like the stream.
- ``cat`` of whole hidden vectors side by side along the hidden dimension (Dinov2's classifier reads
  ``cat([cls, mean(patches)])``, ``2·d`` features): the grown tensor is the grown parts side by side, so
  a Linear reading it is a reader of each part on its own columns, every block tiled and divided by
  ``k`` like any reader's columns (zero on padded entries); blocks of parts without hidden states stay.
  Between the ``cat`` and its readers only ops that keep every entry's ratio to the original pass
  (dropout, clones, casts, scalar products); anything else is refused (:meth:`MoreRules.concat_op`). A
  ``cat`` along another dimension joins hidden states with hidden states or with a parameter grown like
  them (a class token, :meth:`MoreRules.cat_op`).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from growcli.analysis.layouts import CORE
from growcli.analysis.stream_plan import LINEAR_UNARY, _owner_name
from growcli.analysis.stream_tensors import ROW_OPS, row_dim
from growcli.analysis.trace import ADDMM, Refuse, attr_of, module_of, op_name, shape, where

aten = torch.ops.aten


class MoreRules:
    """Rules of :class:`growcli.analysis.stream_rules.Planner` (a :class:`growcli.analysis.stream_plan.PlanBook`)
    kept in their own module."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Hidden vectors concatenated along the hidden dim → (old size, α or None) of each block, in order.
        self.cats: dict[fx.Node, tuple[tuple[int, float | None], ...]] = {}

    def cat_op(self, node: fx.Node, dim: int) -> None:
        """``cat`` along another dimension than the hidden one (a class token before the patches)."""
        parts = [self.operand(a, node, dim) for a in node.args[0]]
        cores = [s for kind, s in parts if kind == "core"]
        alpha = cores[0].alpha if cores else 1.0
        pads = self.mode
        for c in cores:
            if not math.isclose(c.alpha, alpha, rel_tol=1e-12):
                self.refuse(f"cat{where(node)} joins hidden states of different scales")
            pads = pads & c.pads
        for kind, p in parts:
            if kind == "param":
                self.param(p[0], p[1], "added", alpha, node, (p[2], p[3]))
            elif kind != "core":
                self.refuse(f"cat{where(node)} joins the hidden states with a tensor growcli cannot grow")
        self.set(node, alpha, pads, cores)

    def concat_op(self, node: fx.Node) -> None:
        """``node`` is, or reads, hidden vectors concatenated along the hidden dimension (see the module docstring)."""
        derived = self.a.derived.get(node)
        if node.target == aten.cat.default and derived is not None:
            blocks = []
            for arg, part in zip(node.args[0], derived[1].parts):
                if part is CORE and arg not in self.st:
                    self.refuse(f"cat{where(node)} concatenates along the hidden dimension a tensor growcli cannot follow")
                blocks.append((self.d, self.st[arg].alpha) if part is CORE else (part.size, None))
            self.cats[node] = tuple(blocks)
            return
        src = next((x for x in node.all_input_nodes if x in self.cats), None)
        if src is None:
            self.refuse(f"{op_name(node)}{where(node)} concatenates or flattens the hidden dimension with another one")
        what = f"hidden states concatenated along the hidden dimension (by {op_name(src)}{where(src)})"
        t, rank, dim = node.target, len(shape(src)), self.a.derived[src][0]
        if t in LINEAR_UNARY and node.args[0] is src and node in self.a.derived:
            self.cats[node] = self.cats[src]
            return
        if t == aten.linear.default and node.args[0] is src and dim == rank - 1 and attr_of(node.args[1]):
            weight, cdim = attr_of(node.args[1]), 1
        elif t == ADDMM and node.args[1] is src and dim == 1 and attr_of(node.args[2]):
            weight, cdim = attr_of(node.args[2]), 0
        else:
            self.refuse(f"{op_name(node)}{where(node)} uses {what} and growcli has no rule for it")
        key = (_owner_name(self.root, self.named, weight, node), weight)
        prev = self.plans.get(key)
        if prev is None:
            self.param(weight, cdim, "consumer", 1.0, node)
            self.plans[key].blocks = self.cats[src]
        elif (prev.dim, prev.kind, prev.blocks) == (cdim, "consumer", self.cats[src]):
            self.handled.setdefault(weight, set()).add(node)
        else:
            self.refuse(f"parameter {key[0]} reads {what} and is used in another way too")
        self.plan.consumers.append(module_of(node))

    def gathered_rows(self, node: fx.Node, dim: int) -> bool:
        """Plan ``node`` when it gathers rows of a parameter along dimensions other than the hidden one (``dim`` of
        the result), as an embedding lookup: the parameter is a writer of the stream. False when ``node`` is not
        such a gather (the caller refuses it)."""
        weight = node.args[0] if node.args else None
        fqn = attr_of(weight)
        if node.target not in ROW_OPS or fqn is None:
            return False
        found = []
        for d in range(len(shape(weight))):
            try:
                if row_dim(node, weight, d) == dim:
                    found.append(d)
            except Refuse:  # d is an indexed dimension: the hidden one cannot be there
                continue
        if len(found) != 1:
            return False
        key = self.param(fqn, found[0], "producer", 1.0, node)
        self.set(node, 1.0, self.mode, [])
        self.producer_of[node] = [key]
        self.plan.producers.append(module_of(node))
        return True
