"""Attention computed without ``scaled_dot_product_attention``: eager implementations found in the trace.

(Placeholder: finds none yet.) :func:`eager_calls` lists every attention a model computes with
its own ops, each as an :class:`AttentionCall` like the ones :mod:`growcli.analysis.attention`
builds for ``scaled_dot_product_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from growcli.analysis.trace import Trace


@dataclass
class AttentionCall:
    """One attention in the trace: its query, key and value inputs, each ``[B, heads, L, head_dim]``,
    and the node of its output ``[B, heads, L, head_dim]`` (whose users lead to the output projection)."""

    module: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node


def eager_calls(trace: Trace) -> list[AttentionCall]:
    """Every attention computed without ``scaled_dot_product_attention`` (none found yet)."""
    return []
