"""GradMax (Evci et al. 2022): new units whose outgoing weights maximise their incoming gradient.

New units get zero incoming weights, so they output a constant and the function is
unchanged; their outgoing weights (the consumer's new columns) are the top-``k`` left
singular vectors of ``M = Σ δ hᵀ``, where ``h`` is the layer's input and ``δ = ∂L/∂z`` the
gradient at the consumer's output, measured on calibration data. The gradient of the new
incoming weights is then ``φ'·W_newᵀ M``, as large as it can be for outgoing weights of that
norm. Convolutions (1-, 2- or 3-d, either side possibly transposed) use patches: ``M`` pairs
``(consumer channel, consumer tap)`` with ``(input channel, producer tap)``; the units' dim of each
weight is :func:`growcli.analysis.trace.conv_weight_dims`'s (dim 1 of a transposed producer, dim 0 of
a transposed consumer). Recipe: docs/recipes.md#widen-gradmax-init.

Where GradMax applies is :mod:`growcli.transforms.gradmax_site`, the measurement of ``M``
:mod:`growcli.transforms.gradmax_measure`; this module decides how the new units sit on the
activation, picks their directions and writes them.

Where exactness ends: a unit with zero incoming weights outputs ``φ(0)``; growcli refuses
when that is not 0 (sigmoid, softplus…). ReLU has ``φ(0) = 0`` but autograd's ReLU
gradient at exactly 0 is 0, so such units would never learn (the reference counts it as 1);
growcli gives them a small positive bias ε instead (on ReLU's linear side) and subtracts
their constant output from the consumer's bias, which is exact for a Linear consumer and for
an unpadded convolution, and refused for a zero-padded one (its border taps see fewer copies
of the constant).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from growcli.analysis.calibration import lookup
from growcli.analysis.coupled_group import Group
from growcli.analysis.trace import BATCH_NORM, Trace, op_name, where
from growcli.core.origins import AxisMap, Origin
from growcli.transforms.gradmax_measure import Probe, measure, unit_major
from growcli.transforms.gradmax_site import Site, find_site, refusal
from growcli.transforms.resize import sync_attributes

EPS_REL = 0.01  # ReLU shift, relative to the RMS of the consumer's input on the calibration data


# --------------------------------------------------------------------------- the new units' activation
def new_unit_value(site: Site, pre: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """What a new unit whose pre-activation is ``pre`` feeds the consumer (element-wise).

    New units' BatchNorm statistics make it the identity (mean 0, variance 1, ``γ = √(1 + eps)``);
    ``beta`` is the β of the first BatchNorm that has one (where a ReLU shift goes when the
    layer has no bias).
    """
    x = pre
    placed = False
    for node in site.chain:
        if node.target in BATCH_NORM:
            norm = site.norms[node.name]
            shift = beta if norm.bias and not placed else 0.0
            placed = placed or bool(norm.bias)
            params = [_one(v, x.dtype) if fqn else None for v, fqn in zip(norm.new_values(shift), norm.fqns())]
            out = node.target(x.reshape(-1, 1), *params, *node.args[5:], **node.kwargs)
            x = (out[0] if isinstance(out, tuple) else out).reshape(pre.shape)
        else:
            x = node.target(x, *node.args[1:], **node.kwargs)
    return x


def _one(value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((1,), value, dtype=dtype)


def value_and_slope(site: Site, at: float, where_: str) -> tuple[float, float]:
    """The new units' constant output and its slope w.r.t. their pre-activation, shifted by ``at``."""
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    v = new_unit_value(site, x + at, 0.0) if where_ == "bias" else new_unit_value(site, x, at)
    (g,) = torch.autograd.grad(v.sum(), x, allow_unused=True)
    return float(v.detach()), float(g) if g is not None else 0.0


@dataclass
class Activation:
    """How the new units sit on the activation: their shift, constant output and slope."""

    shift: float  # added to the new units' bias (or first BatchNorm β); 0 unless the activation is flat at 0
    shift_at: str | None  # "bias" | "norm" | None
    value: float  # the constant each new unit feeds the consumer
    slope: float  # d(value)/d(pre-activation): the φ' in the incoming gradient φ'·W_newᵀ M


def plan_activation(site: Site, consumer_rms: float) -> Activation:
    """Decide where the new units sit; refuses when they would change the function or never learn."""
    value, slope = value_and_slope(site, 0.0, "bias")
    if value != 0.0:
        culprit = _first_nonzero(site)
        raise refusal(site.layer, f"{culprit} between it and '{site.consumer}' maps 0 to {value:.4g}, so units with "
                                  "zero incoming weights would change the output (gradmax needs φ(0) = 0; "
                                  "use init net2net or zero)")
    if slope != 0.0:
        return Activation(0.0, None, 0.0, slope)
    # Flat at 0 in autograd (ReLU): shift the new units onto the linear side and compensate.
    where_ = "bias" if site.producer_b else ("norm" if any(n.bias for n in site.norms.values()) else None)
    if where_ is None:
        raise refusal(site.layer, "the activation's gradient at 0 is 0 (ReLU), so new units need a small positive bias "
                                  "to learn, and the layer has neither a bias nor a BatchNorm β to hold it")
    eps = EPS_REL * consumer_rms if consumer_rms > 0 else EPS_REL
    value, slope = value_and_slope(site, eps, where_)
    if slope == 0.0:
        raise refusal(site.layer, "the activation has zero gradient at and just above 0, so new units would never learn")
    if site.consumer_b is None:
        raise refusal(site.layer, f"the activation's gradient at 0 is 0 (ReLU); new units get a bias ε > 0 and their "
                                  f"constant output must be subtracted from the bias of '{site.consumer}', which has none")
    if site.is_conv and not site.consumer_conv.uniform_on_constants():
        q = site.consumer_conv
        why = f"'{site.consumer}' zero-pads its input" if not q.transposed else \
            (f"'{site.consumer}' is a transposed convolution (stride {list(q.stride)}, padding {list(q.padding)}) whose "
             "outputs do not all receive every tap (borders, or between strides)")
        raise refusal(site.layer, f"the activation's gradient at 0 is 0 (ReLU); new units get a bias ε > 0, and "
                                  f"{why}, so their constant output cannot be compensated exactly in its bias "
                                  "(a GELU/SiLU/tanh network, or an unpadded consumer, works)")
    return Activation(eps, where_, value, slope)


def _first_nonzero(site: Site) -> str:
    """The first op on the chain that turns the new units' 0 into something else (for the message)."""
    x = torch.zeros(1, dtype=torch.float64)
    for i, node in enumerate(site.chain):
        if float(new_unit_value(dataclasses.replace(site, chain=site.chain[: i + 1]), x)) != 0.0:
            return f"{op_name(node)}{where(node)}"
    return "an operation"



# --------------------------------------------------------------------------- the directions
def directions(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` left singular vectors of ``m`` (columns, unit norm, sign fixed so the largest
    entry is positive) and all singular values, largest first."""
    u, s, _ = torch.linalg.svd(m, full_matrices=True)
    u = u[:, :k].clone()
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, s


def outgoing_norm(site: Site, module: torch.nn.Module) -> float:
    """Mean L2 norm of the existing units' outgoing weights (the consumer's columns)."""
    w = module.get_parameter(site.consumer_w).detach().double()
    cols = unit_major(w, site.consumer_axis)
    cols = cols.reshape(cols.shape[0], -1)
    return float(cols.norm(dim=1).mean()) if cols.numel() else 0.0


# --------------------------------------------------------------------------- the transform's part
def widen_gradmax(gm, trace: Trace, group: Group, new_size: int, spec, ctx, report) -> None:
    """Add ``new_size − group.size`` GradMax units to ``group``'s layer (in place, through ``gm.edits``).

    ``spec`` is a :class:`~growcli.transforms.widen.WidenSpec` with ``init="gradmax"``; its
    calibration data must be in ``ctx`` (:func:`growcli.analysis.calibration.lookup`). Refuses
    (:class:`NotGrowableError`) where GradMax does not apply or cannot be exact, and when
    asked for more units than ``M`` has rows (independent directions).
    """
    site = find_site(trace, group, any_conv=True)
    cal = lookup(ctx, spec)
    root = gm.module
    probe = Probe(site, root)
    loss = measure(root, [probe], cal)
    act = plan_activation(site, probe.consumer_rms)
    k = new_size - group.size
    rows = probe.m.shape[0]
    if k > rows:
        taps = " × taps" if site.is_conv else ""
        raise refusal(site.layer, f"it can add at most {rows} units in one step (one per direction of M, whose rows are "
                                  f"'{site.consumer}'s outputs{taps}); asked for {k}: grow in several steps")
    dirs, sv = directions(probe.m, k)
    radius = spec.scale * (outgoing_norm(site, root) or 1.0)
    old_cw = root.get_parameter(site.consumer_w).detach()
    # [k, consumer outputs, taps…]: the new outgoing slices, unit-major (rows of M are in that order)
    w_new = (dirs * radius).T.reshape(k, *unit_major(old_cw, site.consumer_axis).shape[1:])

    def put(fqn: str, new: torch.Tensor, dim: int, role: str) -> None:
        old = root.get_parameter(fqn) if fqn in dict(root.named_parameters()) else root.get_buffer(fqn)
        grown = torch.cat([old.detach(), new.to(old.dtype)], dim=dim)
        size = old.shape[dim]  # the old positions keep their values; the new ones are fresh
        gm.edits.param(root, fqn, grown, Origin((AxisMap(dim, tuple(range(size)) + (-1,) * new.shape[dim],
                                                         (1.0,) * (size + new.shape[dim])),)))
        report.changes.append({"name": fqn, "role": role, "before": list(old.shape), "after": list(grown.shape)})

    old_pw = root.get_parameter(site.producer_w).detach()
    zeros = torch.zeros((k, *unit_major(old_pw, site.producer_axis).shape[1:]), dtype=torch.float64)
    put(site.producer_w, zeros.movedim(0, site.producer_axis), site.producer_axis, "producer")
    if site.producer_b:
        put(site.producer_b, torch.full((k,), act.shift if act.shift_at == "bias" else 0.0, dtype=torch.float64), 0, "producer")
    placed = act.shift_at != "norm"
    for norm in site.norms.values():
        shift = act.shift if norm.bias and not placed else 0.0
        placed = placed or bool(norm.bias)
        for fqn, value in zip(norm.fqns(), norm.new_values(shift)):
            if fqn:
                put(fqn, torch.full((k,), value, dtype=torch.float64), 0, "copy")
    put(site.consumer_w, w_new.movedim(0, site.consumer_axis), site.consumer_axis, "consumer")
    notes = []
    if act.shift_at is not None:
        # Every new unit feeds the consumer the same constant on every input; take it off the bias.
        constant = w_new.reshape(k, w_new.shape[1], -1).sum(dim=(0, 2)) * act.value
        old_cb = root.get_parameter(site.consumer_b).detach()
        gm.edits.param(root, site.consumer_b, (old_cb.double() - constant).to(old_cb.dtype), Origin())
        where_ = "bias" if act.shift_at == "bias" else "BatchNorm β"
        notes.append(f"the activation's autograd gradient at 0 is 0 (ReLU), so the new units' {where_} is "
                     f"ε = {act.shift:.3g} (their linear side) and their constant output is subtracted from "
                     f"'{site.consumer_b}'")
    for name in sorted({site.layer, site.consumer} | {n.mean.rpartition(".")[0] for n in site.norms.values()}):
        sync_attributes(gm, name)
    top = ", ".join(f"{float(v):.3g}" for v in sv[:min(k, 4)])
    notes.insert(0, f"gradmax '{site.layer}': M ({rows}×{probe.m.shape[1]}) from {cal.describe()}, mean loss {loss:.4g}; "
                    f"top singular values {top}; new outgoing columns have norm {radius:.3g} "
                    f"({spec.scale} × the mean of the existing ones)")
    rank = int((sv > sv[0] * 1e-12).sum()) if len(sv) and sv[0] > 0 else 0
    if k > rank:
        notes.append(f"{k - rank} of the {k} new units got directions with zero gradient (M has rank {rank})")
    report.notes.extend(notes)
