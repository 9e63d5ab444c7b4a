"""Products by a parameter: matmuls whose one operand is a weight, seen through the ops that move its dims.

A Linear is not always ``aten.linear``: Falcon computes ``x @ W.T`` (``matmul`` of ``numpy_T(W)``), others
``torch.mm(x, W.t())``, and fused experts multiply rows by ``w[expert_ids]`` (``bmm``) or per group of rows
(grouped matmuls). :func:`param_matmul` reads any of these as one :class:`ParamMatmul`: which parameter,
which operand is the data, which of the data's dims is contracted with which of the parameter's dims, which
parameter dim becomes which output dim, and which other data dims pass through unchanged. The coupled-channel
analysis (:mod:`growcli.analysis.coupling`) and the residual-stream analysis
(:mod:`growcli.analysis.stream_tensors`) apply one rule to all of them: a consumer along the contracted dim, a
producer along the output dim, exactly as for a Linear's columns and rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from growcli.analysis.trace import attr_of, shape

aten = torch.ops.aten

# ``grouped_mm(x [S, in], w [E, in, out], offs)``: the rows of x in group e (``offs`` are cumulative row counts)
# are multiplied by ``w[e]``: a Linear per group of rows, the fused experts of a mixture-of-experts layer.
GROUPED_MM = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}
# How a parameter reaches a matmul as its weight: dims moved (``w.t()``, ``w.T``, ``w.mT``), or gathered per row
# (``w[expert_ids]``).
WEIGHT_MOVES = {aten.transpose.int, aten.t.default, aten.permute.default, aten.index.Tensor, aten.numpy_T.default,
                aten.mT.default}
# Matrix products of two operands that broadcast like ``torch.matmul``: ``a [..., n, m] @ b [m, p]``.
MATMULS = {aten.matmul.default, aten.mm.default}


def is_grouped_mm(node: fx.Node) -> bool:
    packet = getattr(node.target, "overloadpacket", None)
    return node.op == "call_function" and packet is not None and packet.__name__ in GROUPED_MM


def weight_param(arg) -> tuple[str, list[int]] | None:
    """``(fqn, dims)`` when ``arg`` is a parameter seen through :data:`WEIGHT_MOVES`: ``arg``'s dim ``k`` is the
    parameter's dim ``dims[k]`` (-1: gathered by one index vector, ``w[expert_ids]``); else ``None``."""
    dims: list[int] | None = None
    while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in WEIGHT_MOVES:
        rank = len(shape(arg))
        if arg.target == aten.index.Tensor:
            idx = arg.args[1]
            if len(idx) != 1 or not isinstance(idx[0], fx.Node) or len(shape(idx[0]) or ()) != 1:
                return None
            step = [-1] + list(range(1, rank))
        elif arg.target == aten.permute.default:
            step = [d % rank for d in arg.args[1]]
        elif arg.target == aten.numpy_T.default:
            step = list(range(rank))[::-1]
        else:
            a, b = ((arg.args[1] % rank, arg.args[2] % rank) if arg.target == aten.transpose.int
                    else (rank - 2, rank - 1) if arg.target == aten.mT.default else (0, 1))
            step = list(range(rank))
            step[a], step[b] = b, a
        dims = [step[d] if d >= 0 else -1 for d in dims] if dims is not None else step
        arg = arg.args[0]
    fqn = attr_of(arg)
    if fqn is None:
        return None
    return fqn, dims if dims is not None else list(range(len(shape(arg))))


def bmm_weight(node: fx.Node) -> tuple[int, str, list[int]] | None:
    """``(operand, fqn, dims)`` when ``bmm`` ``node`` multiplies by each row's expert matrix ``w[ids]``, else None."""
    for k in (0, 1):
        found = weight_param(node.args[k])
        if found is not None and found[1][0] == -1:
            return (k,) + found
    return None


@dataclass(frozen=True)
class ParamMatmul:
    """A product by parameter ``fqn``: it multiplies ``data``, contracting ``data``'s dim ``data_dim`` with the
    parameter's dim ``weight_in``; the parameter's dim ``weight_out`` becomes the output's dim ``out_dim``, and
    each data dim in ``kept`` is the output dim of the same index (rows of ``x [..., n, in]``); the data's
    other dims (an expert's batch of rows) cannot carry channels."""

    fqn: str
    data: fx.Node
    data_dim: int
    weight_in: int
    weight_out: int
    out_dim: int
    kept: tuple[int, ...] = ()


def param_matmul(node: fx.Node) -> ParamMatmul | None:
    """The product by a parameter ``node`` is, else None: ``matmul``/``mm`` of the data by a 2-D weight on
    either side (``x @ W.T``, ``W @ x``), ``bmm(w[expert_ids], x)``, ``bmm(x, w[expert_ids])``, or a grouped
    matmul of ``x`` by ``w`` (possibly transposed)."""
    if node.op != "call_function":
        return None
    if is_grouped_mm(node) and isinstance(node.args[0], fx.Node):
        found = weight_param(node.args[1])
        if found is None:
            return None
        fqn, dims = found
        return ParamMatmul(fqn, node.args[0], len(shape(node.args[0])) - 1, dims[1], dims[2], len(shape(node)) - 1)
    if node.target == aten.bmm.default and (found := bmm_weight(node)) is not None:
        k, fqn, dims = found
        if k == 0:  # bmm(w[ids] [S, out, in], x [S, in, n])
            return ParamMatmul(fqn, node.args[1], 1, dims[2], dims[1], 1, (2,))
        return ParamMatmul(fqn, node.args[0], 2, dims[1], dims[2], 2, (1,))  # bmm(x [S, n, in], w[ids] [S, in, out])
    if node.target in MATMULS:
        return _plain_matmul(node)
    return None


def _plain_matmul(node: fx.Node) -> ParamMatmul | None:
    """``x @ W`` (``W`` [in, out] after its moves) or ``W @ x`` (``W`` [out, in]) with a 2-D parameter ``W`` and a
    computed ``x``; the data's rank is kept (``matmul`` broadcasts ``W`` over ``x``'s leading dims)."""
    a, b = node.args[:2]
    out = shape(node)
    for k, (weight, data) in enumerate(((b, a), (a, b))):
        found = weight_param(weight)
        if found is None or attr_of(data) is not None or not isinstance(data, fx.Node):
            continue
        fqn, dims = found
        rank = len(shape(data) or ())
        if len(dims) != 2 or -1 in dims or rank == 0 or out is None or len(out) != rank:
            return None
        if k == 0:  # x [..., n, in] @ W [in, out]
            return ParamMatmul(fqn, data, rank - 1, dims[0], dims[1], rank - 1, tuple(range(rank - 1)))
        if rank == 1:  # W [out, in] @ v [in]
            return ParamMatmul(fqn, data, 0, dims[1], dims[0], 0)
        # W [out, in] @ x [..., in, n]
        return ParamMatmul(fqn, data, rank - 2, dims[1], dims[0], rank - 2, tuple(range(rank - 2)) + (rank - 1,))
    return None
