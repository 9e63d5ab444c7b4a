"""The residual stream: every tensor that carries a transformer's hidden size, and how it grows.

Growing the hidden size from ``d`` to ``d' = k·d + r`` (docs/recipes.md#hidden) makes every
hidden vector ``x`` the vector ``[x, …, x, p]``: ``k`` tiles of ``x`` and ``r`` padded entries
``p``. The padded entries are the per-token mean of ``x`` when the model normalises with
LayerNorm (LEMON's mean padding) and zero with RMSNorm; with ``r = 0`` there are none.

Finding the stream is a coupled-channel analysis (:class:`growcli.analysis.coupling.Analysis`) started at the
embedding, in *stream mode*: normalisations over the hidden dimension do not stop it. A
LayerNorm/RMSNorm op joins the stream; a decomposed norm (``x · rsqrt(mean(x²) + eps)``, as Hugging
Face writes RMSNorm) is followed through its per-token statistic.

A second pass walks the stream in graph order and tracks, for every hidden tensor, a scale ``α``
(the grown tensor's tiles equal ``α`` times the original) and what is known about its padded
entries (equal to the mean of the tiles, zero, both, or neither). From these it decides, per
parameter, how it grows (:class:`ParamPlan`) and which ``eps`` constants must be rescaled
(:class:`EpsFix`): a mean over ``d'`` entries of a zero-padded vector is ``k·d/d'`` times the
original mean, which the ``eps`` it is added to must follow, and the norm's ``γ`` is multiplied by
``√(k·d/d')`` to restore the scale. Whatever breaks these invariants is refused,
naming the op and the module — e.g. post-LN with a size that is not a multiple of ``d``: the
LayerNorm's output is the stream, and its padded entries cannot stay the per-token mean.

Mixture-of-experts layers need no rule of their own beyond their ops': a router is a Linear reading the
stream (its columns split, so ``W̃x̃ = Wx``: the same logits, the same experts, the same routing weights);
the experts' fused parameters are read and written through per-expert matmuls (``bmm`` of
``w[expert_ids]``, grouped matmuls), ``gate_up_proj``'s hidden dim as a reader's columns and
``down_proj``'s as a writer's rows, in every expert; tokens reach their experts and come back through ops
that move or sum whole hidden vectors along other dimensions (``x[ids]``, ``repeat_interleave``, a sum over
each token's top-k rows, ``index_add_``, ``scatter_add_``), which keep the scale and both paddings.

The two phases live in :mod:`growcli.analysis.stream_tensors` (which tensors) and
:mod:`growcli.analysis.stream_plan` with :mod:`growcli.analysis.stream_rules` (how each grows);
this module finds where the stream starts (:func:`stream_start`) and runs both
(:func:`plan_stream`).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from growcli.analysis.stream_plan import MEAN, StreamPlan, ZERO
from growcli.analysis.stream_rules import Planner
from growcli.analysis.stream_tensors import PRODUCERS, StreamAnalysis
from growcli.analysis.trace import Trace, data_of, module_of, weight_of
from growcli.core.errors import NotGrowableError

aten = torch.ops.aten


def stream_start(trace: Trace, layer: str | None = None) -> fx.Node:
    """The op that starts the residual stream: the first embedding (or, failing that, the first
    Linear/Conv) in graph order, or the one in module ``layer``.

    Raises :class:`NotGrowableError` when there is none.
    """
    candidates = [n for n in trace.graph.nodes if n.op == "call_function" and n.target in PRODUCERS and weight_of(n)]
    if layer is not None:
        hits = [n for n in candidates if module_of(n) == layer]
        if not hits:
            raise NotGrowableError(f"hidden size: '{layer}' is not a Linear, Conv or Embedding in the traced model")
        return hits[0]
    embeddings = [n for n in candidates if n.target == aten.embedding.default]
    if embeddings:
        return past_factorisation(trace, embeddings[0], candidates)
    if not candidates:
        raise NotGrowableError("hidden size: the traced model has no Embedding, Linear or Conv to start the hidden states from")
    return candidates[0]


def past_factorisation(trace: Trace, start: fx.Node, producers: list[fx.Node]) -> fx.Node:
    """``start``, or the projection after it when the embedding is factorised (ALBERT: ``embedding_size``
    128 → ``embeddings_project`` → ``hidden_size``).

    The residual stream is the group that has a residual add (``x + F(x)``: one operand computed from the
    other). When the group ``start`` writes has none, and exactly one layer reading it writes a group that
    has one, that layer starts the stream: growing it grows the projection's rows, not the embedding.
    """
    try:
        analysis = StreamAnalysis(trace, start)
        analysis.run()
    except NotGrowableError:  # the embedding's group cannot be followed: plan_stream says why
        return start
    if has_residual(analysis.core):
        return start
    readers = [n for n in producers if n not in analysis.core and data_of(n) in analysis.core]
    found = {}
    for node in readers:
        try:
            after = StreamAnalysis(trace, node)
            after.run()
        except NotGrowableError:
            continue
        if has_residual(after.core):
            found.setdefault(module_of(node), node)
    return next(iter(found.values())) if len(found) == 1 else start


def has_residual(core: dict[fx.Node, int]) -> bool:
    """Whether an add of two tensors of the group has one operand computed from the other (``x + F(x)``),
    rather than independent terms (word + position embeddings)."""
    order = {n: i for i, n in enumerate(next(iter(core)).graph.nodes)} if core else {}
    for node in core:
        if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.add_.Tensor):
            continue
        a, b = (node.args + (None, None))[:2]
        if a in core and b in core and (_reaches(a, b, order) or _reaches(b, a, order)):
            return True
    return False


def _reaches(src: fx.Node, dst: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether ``dst`` is computed from ``src`` (walking ``dst``'s inputs back to ``src``'s position)."""
    if order[src] >= order[dst]:
        return False
    seen, work = set(), [dst]
    while work:
        node = work.pop()
        for arg in node.all_input_nodes:
            if arg is src:
                return True
            if arg not in seen and order.get(arg, -1) > order[src]:
                seen.add(arg)
                work.append(arg)
    return False


def stream_size(trace: Trace, start: fx.Node) -> int:
    """The hidden size: the size of the stream that ``start`` writes into."""
    return StreamAnalysis(trace, start).run().size


def plan_stream(root: nn.Module, trace: Trace, start: fx.Node, new_size: int, pad: str | None = None) -> StreamPlan:
    """Find the hidden-state group that ``start`` writes into and plan its growth to ``new_size``.

    ``pad`` is MEAN (LayerNorm models) or ZERO (RMSNorm models) when ``new_size`` is not a
    multiple of the current size; None picks MEAN if a LayerNorm op reads the group, else ZERO.
    Raises :class:`NotGrowableError` naming the op and module that prevent exact growth.
    """
    analysis = StreamAnalysis(trace, start)
    group = analysis.run()
    if new_size <= group.size:
        raise NotGrowableError(f"hidden size: the new size {new_size} is not larger than {group.size}")
    if new_size % group.size == 0:
        pad = None
    elif pad is None:
        has_ln = any(n.target == aten.layer_norm.default and n.args[0] in analysis.core for n in analysis.core)
        pad = MEAN if has_ln else ZERO
    return Planner(root, analysis, new_size, pad).run()
