"""Attention sites in a traced model: which projection rows and columns belong to which head.

Growing attention heads (docs/recipes.md#heads) needs, for every attention, the query, key and
value projections, the output projection, and how their features split into heads. This module
finds them from the ``torch.export`` trace, never from module names: it starts at each
``scaled_dot_product_attention`` op, walks back from its query, key and value inputs to the
Linear (or Conv1D ``addmm``) that produced them (:mod:`growcli.analysis.attention_inputs`), and
forward from its output to the projection that reads it. Every op on those paths must be one it
understands; anything else makes heads not growable, with the op and module named.

Features are head-major inside a projection: the view that splits them into heads,
``[..., H·block] → [..., H, block]`` in row-major order, gives head ``h`` the features
``[h·block, (h+1)·block)``, ``block`` being ``head_dim`` or, for a per-head fused ``qkv``, the
head's query, key and value together; the walk checks that this view is the only reshape that
mixes heads with anything else. A site also lists the per-feature parameters met on the
features before that split (a norm's ``γ`` over all heads, which grows with them) and the norms
whose statistic spans all heads (exact under growth only if every head is copied equally often),
and the learned tables a per-head bias on the scores is looked up from (an eager attention's
operands, an ``attn_mask`` given to ``scaled_dot_product_attention``): they grow with the heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from growcli.analysis.attention_bias import BiasTable
from growcli.analysis.attention_eager import AttentionCall, eager_calls, score_operand_tables
from growcli.analysis.attention_features import Projection, projection_in
from growcli.analysis.attention_inputs import MOVES, projection_outputs, walk_input
from growcli.analysis.matmuls import param_matmul
from growcli.analysis.trace import (ADDMM, METADATA_CHECKS, Refuse, Trace, UNARY, VIEW, attr_of, merge_groups,
                                    module_of, op_name, shape, source_dim, where)
from growcli.core.errors import NotGrowableError

aten = torch.ops.aten
SDPA = {aten.scaled_dot_product_attention.default}
# Attention kernels that hide their projections (torch.nn.MultiheadAttention's fast path).
FUSED_ATTENTION = {aten._native_multi_head_attention.default} if hasattr(aten, "_native_multi_head_attention") else set()


@dataclass
class AttentionSite:
    """One attention: projections, number of query heads, key/value heads and head size."""

    module: str
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    heads: int
    kv_heads: int
    head_dim: int
    # Per-feature parameters on the q/k/v features before the head split (a norm's γ over all heads), as
    # ("q" | "k" | "v", features): they grow with the heads of that input.
    params: list[tuple[str, Projection]] = field(default_factory=list)
    # Norms whose statistic is over all heads' features (OLMo-2's q_norm): exact only when every head is
    # copied the same number of times.
    stats: list[str] = field(default_factory=list)
    # Learned tables a per-head bias on the scores is looked up from (T5's relative_attention_bias): their head
    # dim grows with the query heads.
    tables: tuple[BiasTable, ...] = ()

    @property
    def kind(self) -> str:
        if self.kv_heads == self.heads:
            return "multi-head"
        return "multi-query" if self.kv_heads == 1 else "grouped-query"


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in METADATA_CHECKS)]


def _forward_output(node: fx.Node) -> Projection:
    """From the attention output ``[B, H, L, hd]`` to the projection that reads its features."""
    h, d = 1, 3
    cur = node
    feat: int | None = None
    while True:
        users = _users(cur)
        if len(users) != 1:
            raise Refuse(f"the attention output{where(cur)} is used {len(users)} times")
        user = users[0]
        t = user.target
        if user.op != "call_function":
            raise Refuse(f"the attention output{where(cur)} reaches {user.op} {user.target}")
        if feat is None and t in MOVES | VIEW:
            ins, outs = shape(cur), shape(user)
            if t in VIEW and ins != outs:
                runs = [(c, e) for (a, b), (c, e) in merge_groups(ins, outs) or [] if (a, b) == (h, d + 1)]
                if d != h + 1 or not runs or runs[0][1] - runs[0][0] != 1:
                    raise Refuse(f"{op_name(user)}{where(user)} reshapes the attention output in a way growcli cannot follow")
                feat = runs[0][0]
            elif t not in VIEW:
                rank = len(outs)
                back = {source_dim(user, k): k for k in range(rank)}
                if h not in back or d not in back:
                    raise Refuse(f"{op_name(user)}{where(user)} moves the attention heads in a way growcli cannot follow")
                h, d = back[h], back[d]
            cur = user
            continue
        if t in UNARY and user.args[0] is cur:
            cur = user
            continue
        if feat is not None and t in VIEW:
            back = {source_dim(user, k): k for k in range(len(shape(user)))}
            if feat not in back:
                raise Refuse(f"{op_name(user)}{where(user)} reshapes the attention features")
            feat, cur = back[feat], user
            continue
        size = shape(cur)[feat] if feat is not None else None
        if feat is not None and t == aten.linear.default and user.args[0] is cur and feat == len(shape(cur)) - 1 \
                and attr_of(user.args[1]):
            return Projection(attr_of(user.args[1]), 1, None, 0, size, module_of(user))
        if feat is not None and t == ADDMM and user.args[1] is cur and feat == 1 and attr_of(user.args[2]):
            return Projection(attr_of(user.args[2]), 0, None, 0, size, module_of(user))
        if feat is not None and (m := param_matmul(user)) is not None and m.data is cur and feat == m.data_dim:
            return Projection(m.fqn, m.weight_in, None, 0, size, module_of(user))  # x @ W.T
        raise Refuse(f"{op_name(user)}{where(user)} reads the attention output and growcli has no rule for it")


# --------------------------------------------------------------------------- entry
def attention_sites(trace: Trace, required: bool = True) -> list[AttentionSite]:
    """Every attention in the trace with its projections and head counts.

    Raises :class:`NotGrowableError` naming the op and module when an attention's inputs or
    output pass through an op this module has no rule for, or, if ``required``, when the
    model computes attention without ``scaled_dot_product_attention`` (else that gives ``[]``).
    """
    data = projection_outputs(trace)
    params = {name for name, _ in trace.gm.named_parameters()}
    nodes = [AttentionCall(module_of(n), *n.args[:3], n, _mask_tables(n, data, params)) for n in trace.graph.nodes
             if n.op == "call_function" and n.target in SDPA]
    nodes += eager_calls(trace)
    if not nodes and not required:
        return []
    if not nodes:
        other = next((n for n in trace.graph.nodes if n.op == "call_function" and n.target in FUSED_ATTENTION), None)
        hint = f" (it uses {op_name(other)}{where(other)})" if other is not None else \
            " (load Hugging Face models with attn_implementation='sdpa')"
        raise NotGrowableError("growing attention heads needs attention computed by torch's "
                               f"scaled_dot_product_attention, and the traced model has none{hint}")
    return [_site(n, data) for n in nodes]


def _mask_tables(node: fx.Node, data: set[fx.Node], params: set[str]) -> tuple[BiasTable, ...]:
    """The tables the ``attn_mask`` of ``scaled_dot_product_attention`` ``node`` is looked up from along its heads
    (a relative position bias passed as an additive mask); refuses any other mask that differs per head."""
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if not isinstance(mask, fx.Node):
        return ()
    try:
        return tuple(score_operand_tables(mask, node, data, params))
    except Refuse as exc:
        raise NotGrowableError(f"attention in '{module_of(node)}' (its attn_mask): {exc}") from None


def _site(call: AttentionCall, data: set[fx.Node]) -> AttentionSite:
    module, node = call.module, call.out
    try:
        q, k, v = call.q, call.k, call.v
        hq, hk, hv = shape(q)[1], shape(k)[1], shape(v)[1]
        hd = shape(q)[3]
        found, params, stats = {}, [], set()
        for name, arg in (("q", q), ("k", k), ("v", v)):
            walk = walk_input(arg, data)
            if len(walk.found) != 1:
                raise Refuse(f"the attention's {name} comes from {len(walk.found)} projections")
            (proj, offset, block), = walk.found
            heads = shape(arg)[1] // (walk.repeat[0] if walk.repeat else 1)
            blocks, members = heads // walk.members, walk.members  # a block holds `members` heads (a whole group)
            if heads % members:
                raise Refuse(f"the attention's {name} has {heads} heads, not whole groups of {members}")
            found[name] = (projection_in(proj, offset, blocks * block, block if block != hd else None, members), heads)
            if block % hd:
                raise Refuse(f"the attention's {name} reads heads of {block} features, not a multiple of head_dim {hd}")
            params += [(name, Projection(p, dim, None, off, blocks * b, where_, b if b != hd else None, members))
                       for p, dim, off, b, where_ in sorted(walk.params)]
            stats |= walk.stats
        if not (found["k"][1] == found["v"][1] and hq % found["k"][1] == 0 and hk == hv):
            raise Refuse(f"key and value heads ({found['k'][1]}, {found['v'][1]}) do not divide the {hq} query heads")
        o = _forward_output(node)
        if o.size != hq * hd:
            raise Refuse(f"the output projection reads {o.size} features, not {hq} heads × {hd}")
    except Refuse as exc:
        raise NotGrowableError(f"attention in '{module}': {exc}") from None
    return AttentionSite(module, found["q"][0], found["k"][0], found["v"][0], o, hq, found["k"][1], hd, params,
                         sorted(stats), call.tables)
