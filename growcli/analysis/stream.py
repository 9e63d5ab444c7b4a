"""The residual stream: every tensor that carries a transformer's hidden size, and how it grows.

Growing the hidden size from ``d`` to ``d' = k·d + r`` (GROWTH.md section 6) makes every
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

The two phases live in :mod:`growcli.analysis.stream_tensors` (which tensors) and
:mod:`growcli.analysis.stream_plan` (how each grows); :func:`plan_stream` runs both, and their names are
re-exported here, where the rest of growcli imports them from.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from growcli.core.errors import NotGrowableError
# Re-exported: growcli.analysis.stream stays the one import for the residual-stream analysis.
from growcli.analysis.stream_tensors import (NORMS, PRODUCERS, RMS_NORM, STAT_POWER, StreamAnalysis, _attr,  # noqa: F401
                                     _data_of, _flat, _module_of, _reduce_dims, _weight_of, stream_start)
from growcli.analysis.stream_plan import (FINITE, LINEAR_UNARY, MEAN, MEANS, POSITIVE_HOMOGENEOUS, SUMS, ZERO,  # noqa: F401
                                 ZERO_TO_ZERO, Constant, EpsFix, ParamPlan, StreamPlan, _owner_name, _param_dim,
                                 _param_dim_of, _Planner, _scalar_buffer, _St, _Stat)
from growcli.analysis.trace import Trace

aten = torch.ops.aten


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
    return _Planner(root, analysis, new_size, pad).run()
