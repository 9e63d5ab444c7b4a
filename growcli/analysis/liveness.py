"""Dead ops: traced ops whose result the model never uses.

``torch.export`` keeps ops whose result has no users: Hugging Face's BART encoder reads
``inputs_embeds[:, :, -1]`` only to take its shape (``embed_positions(input_shape)``), and the
``select`` stays in the graph with no users. Such an op is not a use of the channels it reads:
nothing the model computes depends on its result, so no growth rule applies to it. An op is dead
when it has no side effects (its schema mutates no argument) and every user is dead, so a chain of
ops that ends nowhere is dead as a whole.
"""

from __future__ import annotations

import torch
from torch import fx


def dead_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The ``call_function`` nodes of ``graph`` whose results reach neither the output nor an op with side
    effects (an in-place op, a mutation of an input)."""
    dead: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.op == "call_function" and not _mutates(node) and all(u in dead for u in node.users):
            dead.add(node)
    return dead


def _mutates(node: fx.Node) -> bool:
    """Whether the op may have side effects: an ATen op whose schema writes an argument, or any target that is
    not an ATen overload or a plain Python item access (kept, rather than guessed pure)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return bool(target._schema.is_mutable)
    return getattr(target, "__module__", None) != "_operator"
