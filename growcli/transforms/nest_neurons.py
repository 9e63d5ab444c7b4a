"""NeST neuron growth: new units between two masked Linear layers, connected where ``G = Σ δ xᵀ`` is large.

For a masked Linear ``P`` (the layer that gains units) whose outputs reach one masked Linear
``C`` through element-wise ops only (read from the ``torch.export`` trace), ``G[m, n] = Σ δ_m x_n``
pairs ``C``'s output ``m`` (``δ = ∂L/∂z_C``) with ``P``'s input ``n``, on the calibration data.
The qualifying pairs ``Q`` are the top ``pairs`` fraction of entries by ``|G|`` (at least one
per new unit). New unit ``j`` takes the ``j``-th strongest pair ``(m_j, n_j)`` of ``Q`` whose
output is not already another unit's, and connects

- from the inputs ``N_j = {n : (m_j, n) ∈ Q}`` with ``u_n ∝ sign(G[m_j, n]) · √|G[m_j, n]|``,
  scaled to the mean norm of ``P``'s existing rows (bias 0); its other incoming entries are masked;
- to the outputs ``M_j = {m : (m, n_j) ∈ Q}`` with weight **0** (mask 1); its other outgoing
  entries are masked.

The outgoing weights are zero, so ``C`` computes what it did: exact, whatever the activation
does with the new unit. The incoming weights make the first gradient of a new outgoing weight,
``∂L/∂v_m = Σ δ_m φ(uᵀx)``, large: in φ's linear regime it is ``Σ_n u_n G[m, n]``, which for
``m = m_j`` is ``Σ |G|^{3/2}`` up to scale. The units are added by ``widen`` (init ``zero``) on
the two layers made plain for the edit and masked again after it, so the coupled-group
analysis applies unchanged. Recipe: docs/recipes.md#nest.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from growcli.analysis.calibration import lookup
from growcli.analysis.trace import UNARY, attr_of, trace_model
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import cast_batch, make_batches
from growcli.core.model import GrowModel
from growcli.nn.masks import MaskedLinear
from growcli.transforms.nest_measure import (BATCH_SIZE_HELP, DATA_BATCHES_HELP, DATA_HELP, LAYER_HELP, LOSS_HELP, measure,
                                             select_masked)
from growcli.transforms.registry import Context, StepReport, option, register
from growcli.transforms.widen import WidenSpec, widen

aten = torch.ops.aten


@dataclass(frozen=True)
class GrowNeuronsSpec:
    """Add ``neurons`` units to each masked Linear matched by ``layer``, wired by the gradient on the data."""

    layer: str | list[str] = option(help=LAYER_HELP)
    data: str = option(help=DATA_HELP)
    neurons: int = option(1, "New units per layer, each connected to the (input, output) pairs with the largest "
                             "|δ_m x_n| on the data; outgoing weights start at 0 (exact).")
    pairs: float = option(0.05, "Fraction of a layer's (input, output) pairs, largest |δ_m x_n| first, that new units "
                                "may connect (NeST's top percentile).")
    loss: Literal["auto", "cross_entropy", "mse", "model"] = option("auto", LOSS_HELP)
    data_batches: int | None = option(None, DATA_BATCHES_HELP)
    batch_size: int | None = option(None, BATCH_SIZE_HELP)

    def __post_init__(self):
        if not self.data:
            raise UsageError("data: FILE (--data FILE) is needed: the gradient comes from it")
        for key in ("data_batches", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UsageError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if not isinstance(self.neurons, int) or self.neurons < 1:
            raise UsageError(f"neurons must be a positive integer, got {self.neurons!r}")
        if not 0 < self.pairs <= 1:
            raise UsageError(f"pairs must be a fraction in (0, 1], got {self.pairs}")


def _masked_weight_layer(node: fx.Node) -> str | None:
    """The layer whose ``weight * mask`` a ``linear`` node computes with, else ``None``."""
    if node.op != "call_function" or node.target != aten.linear.default or len(node.args) < 2:
        return None
    w = node.args[1]
    if not isinstance(w, fx.Node) or w.target != aten.mul.Tensor or len(w.args) != 2:
        return None
    a, b = attr_of(w.args[0]), attr_of(w.args[1])
    if a and b and a.endswith(".weight") and b == a[: -len("weight")] + "mask":
        return a[: -len(".weight")]
    return None


def find_consumer(gm: GrowModel, layer: str) -> str:
    """The masked Linear that reads ``layer``'s units through element-wise ops only; refuses anything else."""
    batch = make_batches(gm.inputs, 1)[0]
    dtype = next((p.dtype for p in gm.module.parameters() if p.is_floating_point()), None)
    trace = trace_model(gm.module, cast_batch(batch, dtype) if dtype is not None else batch)
    calls = [n for n in trace.graph.nodes if _masked_weight_layer(n) == layer]
    if len(calls) != 1:
        raise NotGrowableError(f"grow_neurons: '{layer}' is not a masked Linear called once in the forward pass "
                               f"(found {len(calls)} calls); neuron growth needs masked Linear → activation → masked Linear")
    node = calls[0]
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise NotGrowableError(f"grow_neurons: the units of '{layer}' are read by {len(users)} operations; neuron "
                                   "growth needs one path, through element-wise ops, to one masked Linear")
        user = users[0]
        consumer = _masked_weight_layer(user)
        if consumer is not None and user.args[0] is node:
            return consumer
        plain = attr_of(user.args[1]) if user.target == aten.linear.default and len(user.args) > 1 else None
        if plain is not None and user.args[0] is node:
            raise NotGrowableError(f"grow_neurons: '{plain.rpartition('.')[0]}' reads the units of '{layer}' but is not "
                                   "masked; add a mask step for it first")
        if user.op != "call_function" or user.target not in UNARY or user.args[0] is not node:
            what = getattr(user.target, "__name__", str(user.target))
            raise NotGrowableError(f"grow_neurons: the units of '{layer}' reach {what} before a masked Linear; neuron "
                                   "growth needs masked Linear → element-wise activation → masked Linear")
        node = user


def plan_units(g: torch.Tensor, k: int, fraction: float, layer: str) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """For each new unit: its inputs ``N_j``, its outputs ``M_j`` and ``G[m_j, N_j]`` (see the module docstring)."""
    score = g.abs().reshape(-1)
    q = min(max(k, math.ceil(fraction * score.numel())), int((score > 0).sum()))
    order = torch.argsort(-score, stable=True)[:q]
    chosen = torch.zeros_like(score, dtype=torch.bool)
    chosen[order] = True
    chosen = chosen.reshape(g.shape)
    units, seeds = [], set()
    for flat in order.tolist():
        m, n = divmod(flat, g.shape[1])
        if m in seeds:
            continue
        seeds.add(m)
        ins = torch.nonzero(chosen[m]).reshape(-1).tolist()
        outs = torch.nonzero(chosen[:, n]).reshape(-1).tolist()
        units.append((ins, outs, g[m, ins]))
        if len(units) == k:
            return units
    raise NotGrowableError(f"grow_neurons '{layer}': only {len(units)} outputs have a qualifying pair with a nonzero "
                           f"gradient on the data, {k} new units asked; raise pairs or lower neurons")


def _swap(gm: GrowModel, name: str, masked: bool, mask: torch.Tensor | None = None) -> nn.Module:
    """Replace layer ``name`` by a plain (or masked) Linear holding the same Parameter objects."""
    old = gm.module.get_submodule(name)
    cls = MaskedLinear if masked else nn.Linear
    new = cls(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
    new.weight, new.bias = old.weight, old.bias
    if masked:
        new.mask = mask
    new.train(old.training)
    gm.edits.module(gm.module, name, new)
    return new


def _grow_one(gm: GrowModel, layer: str, spec: GrowNeuronsSpec, ctx: Context, report: StepReport) -> None:
    root = gm.module
    consumer = find_consumer(gm, layer)
    _, cross = measure(root, [], lookup(ctx, spec), pairs=[(layer, consumer)])
    units = plan_units(cross[(layer, consumer)], spec.neurons, spec.pairs, layer)
    p, c = root.get_submodule(layer), root.get_submodule(consumer)
    size = p.out_features
    with torch.no_grad():
        p.weight.mul_(p.mask)  # stored entries under the mask are 0 already; made sure before the layers go plain
        c.weight.mul_(c.mask)
        row_norm = float((p.weight.double() * p.mask).norm(dim=1).mean())
    p_mask, c_mask = p.mask.clone(), c.mask.clone()
    _swap(gm, layer, False)
    _swap(gm, consumer, False)
    sub = widen(gm, WidenSpec(layer=layer, by=spec.neurons, init="zero"), Context(ctx.seed, ctx.data))
    allowed = {f"{layer}.weight", f"{layer}.bias", f"{consumer}.weight"}
    touched = {ch["name"] for ch in sub.changes}
    if not touched <= allowed:
        raise NotGrowableError(f"grow_neurons: growing '{layer}' also changes {', '.join(sorted(touched - allowed))}; "
                               "neuron growth handles a masked Linear read by one masked Linear only")
    p, c = root.get_submodule(layer), root.get_submodule(consumer)
    k = spec.neurons
    new_p_mask = torch.cat([p_mask, torch.zeros(k, p_mask.shape[1], dtype=p_mask.dtype)])
    new_c_mask = torch.cat([c_mask, torch.zeros(c_mask.shape[0], k, dtype=c_mask.dtype)], dim=1)
    scale = row_norm if row_norm > 0 else 1.0
    with torch.no_grad():
        for j, (ins, outs, g) in enumerate(units):
            u = torch.zeros(p.in_features, dtype=torch.float64)
            u[ins] = torch.sign(g) * g.abs().sqrt()
            u = u * (scale / float(u.norm()))
            p.weight[size + j] = u.to(p.weight.dtype)
            if p.bias is not None:
                p.bias[size + j] = 0
            new_p_mask[size + j, ins] = 1
            c.weight[:, size + j] = 0  # outgoing weights 0: the consumer computes what it did
            new_c_mask[outs, size + j] = 1
            report.changes.append({"name": layer, "unit": size + j, "inputs": ins, "outputs": outs})
    _swap(gm, layer, True, new_p_mask)
    _swap(gm, consumer, True, new_c_mask)
    report.matched.append(layer)
    report.notes.append(f"grow_neurons '{layer}': {size} → {size + k} units, read by '{consumer}'")


@register("grow_neurons", GrowNeuronsSpec, exact=True,
          help="NeST: add units wired to the (input, output) pairs with the largest gradient, outgoing weights 0; exact")
def grow_neurons(gm: GrowModel, spec: GrowNeuronsSpec, ctx: Context) -> StepReport:
    """Grow ``spec.neurons`` units in each masked Linear matched by ``spec.layer`` (see the module docstring)."""
    if isinstance(gm.module, fx.GraphModule):
        raise NotGrowableError("grow_neurons: a .pt2 program has no layer modules (its forward is one flat graph); load "
                               "the weights with --arch, or the Hugging Face directory")
    report = StepReport("grow_neurons", dataclasses.asdict(spec), params_before=gm.num_parameters())
    layers = select_masked(gm.module, spec.layer, "grow_neurons")
    for layer in layers:
        if not isinstance(gm.module.get_submodule(layer), MaskedLinear):
            raise NotGrowableError(f"grow_neurons: '{layer}' is a {type(gm.module.get_submodule(layer)).__name__}; "
                                   "neuron growth is implemented for masked Linear layers")
    for layer in layers:
        _grow_one(gm, layer, spec, ctx, report)
    report.params_after = gm.num_parameters()
    return report
