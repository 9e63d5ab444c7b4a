"""Structured pruning: remove units or channels of a layer — widen's inverse step.

The coupled group (:mod:`growcli.analysis.coupling`) says which parameter dimensions follow the
layer's channels, as for widening; pruning keeps a subset of the channels in all of them. Two
kinds of unit can go without changing the function (``criterion: exact``):

- **dead** units: every consumer's weights for the unit are zero (it feeds nothing), or — when
  the layer has one direct consumer with only per-unit ops between — its incoming weights are
  zero and the constant it then outputs (its bias through the activation chain, its own
  BatchNorm statistics included) is exactly 0 (ReLU with a bias ≤ 0), or its input is a ReLU's
  output (≥ 0), it is followed by a ReLU alone, and its weights and bias are all ≤ 0.
- **duplicate** units: identical incoming weights, bias and per-channel parameters (BatchNorm,
  PReLU…: every tensor that is not a consumer's), bit for bit, so their activations are
  identical on every input. One is kept and the consumers' weights of the others are added to its
  own (exact up to one rounding per weight): the units a Net2Net widen copied merge back.

``criterion: magnitude`` removes the units with the smallest ``‖incoming‖·‖outgoing‖`` (or the
ones listed) and is approximate; the runner reports the measured deviation. Duplicates of a kept
unit are still merged into it. Recipe: docs/recipes.md#prune.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from growcli.analysis.coupled_group import Group
from growcli.analysis.coupling import analyze, producer_layers
from growcli.analysis.trace import Trace, aten, trace_model
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import make_batches
from growcli.core.model import GrowModel
from growcli.core.origins import AxisMap, Origin
from growcli.core.select import select
from growcli.transforms.firefly_measure import unit_values
from growcli.transforms.gradmax_site import find_site
from growcli.transforms.hfconfig import fit_sizes
from growcli.transforms.registry import Context, StepReport, option, register
from growcli.transforms.resize import sync_attributes
from growcli.transforms.widen import _patch_views, remap, widen_candidates


@dataclass(frozen=True)
class PruneSpec:
    """Remove units of ``layer``: down to ``to``, the ``remove`` list, or (exact) every dead or duplicate unit."""

    layer: str | list[str] = option(help="Module name, dotted suffix, glob or regex; a list prunes several layers.")
    to: int | None = option(None, "Keep N units (default with criterion exact: remove every dead or duplicate unit).")
    remove: int | list[int] | None = option(None, "Indices of the units to remove (one layer only).")
    criterion: Literal["exact", "magnitude"] = option("exact", "exact (only dead units, and duplicates merged into a "
                                                               "twin) or magnitude (the smallest ‖incoming‖·‖outgoing‖; "
                                                               "approximate).")

    def __post_init__(self):
        if self.to is not None and self.remove is not None:
            raise UsageError("give to or remove, not both")
        if self.to is not None and (not isinstance(self.to, int) or self.to < 1):
            raise UsageError(f"to must be a positive integer, got {self.to!r}")
        if self.remove is not None:
            units = self.units()
            if not units or len(set(units)) != len(units) or any(not isinstance(i, int) or i < 0 for i in units):
                raise UsageError(f"remove must list distinct unit indices (0, 1, …), got {self.remove!r}")
        if self.criterion == "magnitude" and self.to is None and self.remove is None:
            raise UsageError("criterion magnitude needs to (units to keep) or remove (units to remove)")

    def units(self) -> list[int]:
        """``remove`` as a list (a plan may give one index)."""
        return [self.remove] if isinstance(self.remove, int) else list(self.remove or [])


@dataclass
class Units:
    """What the decision needs about one group's units."""

    size: int
    incoming: torch.Tensor  # [units, ·] every non-consumer tensor's entries of the unit, float64
    outgoing: torch.Tensor  # [units, ·] every consumer's entries of the unit
    dead: dict[int, str]  # unit → why it is dead
    twins: list[list[int]]  # classes of units with bit-identical incoming entries (2 or more)


def _tensor(root: torch.nn.Module, fqn: str) -> torch.Tensor:
    owner, _, leaf = fqn.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, leaf).detach()


def _positions(use, size: int) -> dict[int, list[int]]:
    """Channel → its positions along ``use.dim`` (flattened or concatenated layouts own several)."""
    out: dict[int, list[int]] = {c: [] for c in range(size)}
    for pos, (c, _) in enumerate(use.layout.keys(list(range(size)))):
        if c >= 0:
            out[c].append(pos)
    return out


def _entries(root, uses, size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per unit, its entries of ``uses`` flattened: a float64 matrix and the raw rows (bitwise checks)."""
    rows: list[list[torch.Tensor]] = [[] for _ in range(size)]
    for use in uses:
        t = _tensor(root, use.fqn)
        for c, pos in _positions(use, size).items():
            rows[c].append(t.index_select(use.dim, torch.tensor(pos)).reshape(-1))
    raw = [torch.cat(r) if r else torch.zeros(0) for r in rows]
    return torch.stack([r.double() for r in raw]), raw


def describe_units(gm: GrowModel, trace: Trace, group: Group) -> Units:
    """Find the dead units and the classes of duplicates of ``group`` (nothing is changed)."""
    root = gm.module
    if group.groups != 1 or group.depthwise or any(u.role == "grouped_consumer" for u in group.uses):
        raise NotGrowableError(f"'{group.layer}': prune: grouped or depthwise convolutions follow its channels; "
                               "pruning them is not supported")
    if group.norms:  # a dead or duplicate channel still counts in the norm's mean and variance
        raise NotGrowableError(f"'{group.layer}': prune: {group.norms[0].describe()} normalises over its channels; "
                               "removing channels would change its statistics")
    inside = [u for u in group.uses if u.role != "consumer"]
    consumers = [u for u in group.uses if u.role == "consumer"]
    incoming, raw = _entries(root, inside, group.size)
    outgoing, _ = _entries(root, consumers, group.size)
    dead = {i: "its outgoing weights are zero" for i in range(group.size) if consumers and not outgoing[i].any()}
    dead.update({i: why for i, why in _dead_by_incoming(root, trace, group).items() if i not in dead})
    classes: dict[bytes, list[int]] = {}
    for i, r in enumerate(raw):
        classes.setdefault(r.numpy().tobytes() + str(r.dtype).encode(), []).append(i)
    twins = [c for c in classes.values() if len(c) > 1]
    return Units(group.size, incoming, outgoing, dead, twins)


def _dead_by_incoming(root, trace: Trace, group: Group) -> dict[int, str]:
    """Units whose incoming weights are zero and whose constant output is exactly 0 (one direct consumer only)."""
    try:
        site = find_site(trace, group)
    except NotGrowableError:
        return {}  # not provable here: the channels go through more than per-unit ops
    w = _tensor(root, site.producer_w).double().reshape(site.size, -1)
    b = _tensor(root, site.producer_b).double() if site.producer_b else torch.zeros(site.size, dtype=torch.float64)
    z = b.reshape(1, -1, 1, 1) if site.is_conv else b.reshape(1, -1)
    with torch.no_grad():
        out = unit_values(site, root, z).reshape(-1)
    dead = {i: "its incoming weights are zero and it always outputs 0" for i in range(site.size)
            if not w[i].any() and out[i] == 0}
    if _reads_relu_output(trace, site) and [n.target for n in site.chain] in RELU_ONLY:
        # inputs ≥ 0, weights ≤ 0, bias ≤ 0: the pre-activation is ≤ 0 on every input, so ReLU gives 0
        dead.update({i: "its input is a ReLU's output (≥ 0) and its weights and bias are ≤ 0, so its ReLU is always 0"
                     for i in range(site.size) if i not in dead and bool((w[i] <= 0).all()) and float(b[i]) <= 0})
    return dead


RELU_ONLY = [[aten.relu.default], [aten.relu_.default]]


def _reads_relu_output(trace: Trace, site) -> bool:
    """Whether the layer's input is the output of a ReLU (so every entry is ≥ 0, zero padding included)."""
    users = trace.weight_users().get(site.producer_w, [])
    call = next((u for u in users if u.op == "call_function"), None)
    src = call.args[0] if call is not None and call.args else None
    return isinstance(src, fx.Node) and src.target in (aten.relu.default, aten.relu_.default)


def choose(units: Units, spec: PruneSpec, layer: str) -> tuple[list[int], dict[int, int]]:
    """The units to remove (sorted) and the merges (removed duplicate → the kept twin that takes its weights)."""
    size = units.size
    if spec.remove is not None:
        bad = [i for i in spec.units() if i >= size]
        if bad:
            raise NotGrowableError(f"'{layer}': prune: it has {size} units (0..{size - 1}); cannot remove {bad}")
        removed = sorted(spec.units())
    elif spec.criterion == "exact":
        # every class of twins keeps its first live member; the others can merge into it
        removable = sorted(units.dead) + [i for c in units.twins for i in [j for j in c if j not in units.dead][1:]]
        want = len(removable) if spec.to is None else size - spec.to
        if spec.to is not None and spec.to >= size:
            raise NotGrowableError(f"'{layer}': prune: it has {size} units; keeping {spec.to} removes none")
        if want > len(removable):
            dup = len(removable) - len(units.dead)
            raise NotGrowableError(f"'{layer}': prune: only {len(removable)} of its {size} units can go exactly "
                                   f"({len(units.dead)} dead, {dup} duplicates), {want} asked; use criterion magnitude "
                                   "to remove more approximately")
        removed = sorted(removable[:want])
    else:
        if spec.to >= size:
            raise NotGrowableError(f"'{layer}': prune: it has {size} units; keeping {spec.to} removes none")
        score = units.incoming.norm(dim=1) * units.outgoing.norm(dim=1)
        order = sorted(range(size), key=lambda i: (float(score[i]), i))
        removed = sorted(order[:size - spec.to])
    if len(removed) >= size:
        raise NotGrowableError(f"'{layer}': prune: removing all {size} units would leave none")
    gone = set(removed)
    merges: dict[int, int] = {}
    for cls in units.twins:
        kept = [i for i in cls if i not in gone]
        for i in cls:
            if i in gone and kept and i not in units.dead:
                merges[i] = kept[0]
    if spec.criterion == "exact":
        loose = [i for i in removed if i not in units.dead and i not in merges]
        if loose:
            raise NotGrowableError(f"'{layer}': prune: unit{'s' if len(loose) > 1 else ''} {', '.join(map(str, loose))} "
                                   "neither dead nor a duplicate of a kept unit, so removing it changes the function; "
                                   "use criterion magnitude to remove it approximately")
    return removed, merges


def prune_group(gm: GrowModel, group: Group, removed: list[int], merges: dict[int, int], report: StepReport) -> None:
    """Keep the other channels of ``group`` in every tensor; merged duplicates add their consumer weights to their twin."""
    root = gm.module
    kept = [i for i in range(group.size) if i not in set(removed)]
    for use in group.uses:
        old = _tensor(root, use.fqn)
        t = old
        if use.role == "consumer" and merges:
            pos = _positions(use, group.size)
            src = torch.tensor([p for d in sorted(merges) for p in pos[d]])
            dst = torch.tensor([p for d in sorted(merges) for p in pos[merges[d]]])
            t = old.clone().index_add_(use.dim, dst, old.index_select(use.dim, src))
        idx, _ = remap(use.layout, kept, group.size)
        new = t.index_select(use.dim, idx)
        gm.edits.param(root, use.fqn, new, Origin((AxisMap(use.dim, tuple(int(i) for i in idx), (1.0,) * len(idx)),)))
        report.changes.append({"name": use.fqn, "role": use.role, "before": list(old.shape), "after": list(new.shape)})
    for name in sorted({u.fqn.rpartition(".")[0] for u in group.uses}):
        sync_attributes(gm, name)
    _patch_views(gm, group, kept)


@register("prune", PruneSpec, exact=lambda spec: spec.criterion == "exact",
          help="Remove units or channels: dead ones and merged duplicates exactly, or by magnitude",
          candidates=widen_candidates)
def prune(gm: GrowModel, spec: PruneSpec, ctx: Context) -> StepReport:
    """Prune every layer matched by ``spec.layer`` (layers in one coupled group together, once)."""
    report = StepReport("prune", dataclasses.asdict(spec), params_before=gm.num_parameters())
    trace = trace_model(gm.module, make_batches(gm.inputs, 1)[0])
    layers = select(spec.layer, producer_layers(trace))
    groups: list[Group] = []
    for layer in layers:
        group = analyze(trace, layer)
        if not any(set(group.producers) == set(g.producers) for g in groups):
            groups.append(group)
    if spec.remove is not None and len(groups) > 1:
        raise UsageError(f"remove lists unit indices of one layer; {spec.layer!r} matches {len(groups)}: "
                         f"{', '.join(g.layer for g in groups)}")
    sizes: dict[int, int] = {}
    total = 0
    for i, group in enumerate(groups):
        if i:  # an earlier group may have changed tensors this one uses: analyse the model as it is now
            trace = trace_model(gm.module, make_batches(gm.inputs, 1)[0])
            group = analyze(trace, group.layer)
        units = describe_units(gm, trace, group)
        removed, merges = choose(units, spec, group.layer)
        if not removed:
            report.notes.append(f"prune '{group.layer}': no unit is dead or a duplicate; nothing removed")
            continue
        prune_group(gm, group, removed, merges, report)
        total += len(removed)
        sizes[group.size] = group.size - len(removed)
        report.matched.append(group.layer)
        dead = [i for i in removed if i in units.dead]
        parts = [f"dead {dead}"] if dead else []
        if merges:
            parts.append("duplicates merged into their twin " + ", ".join(f"{d}→{r}" for d, r in sorted(merges.items())))
        other = [i for i in removed if i not in units.dead and i not in merges]
        if other:
            parts.append(f"by {spec.criterion} {other}")
        report.notes.append(f"prune '{group.layer}': {group.size} → {group.size - len(removed)} units; " + "; ".join(parts))
    if not total:
        raise NotGrowableError(f"prune: no unit of {', '.join(g.layer for g in groups)} is dead or a duplicate, so "
                               "nothing can be removed exactly; use criterion magnitude with to or remove")
    for change in fit_sizes(gm, sizes, sorted(set(sizes.values()))):
        report.notes.append(f"config {change}")
    report.params_after = gm.num_parameters()
    return report
