"""NeST (Dai, Yin, Jha 2018): masked connections that grow by gradient and are pruned by magnitude.

The layers are :mod:`growcli.nn.masks`' masked Linear/Conv/ConvTranspose layers: ``weight * mask`` with the mask
saved as a buffer. The transforms, each a pure model edit:

- ``mask``: replace a ``torch.nn`` Linear/Conv/ConvTranspose by its masked version holding the *same* weight
  and bias; the mask is ones, or (default) zero exactly where the weight is zero, so
  ``weight · mask = weight`` bit for bit: exact.
- ``grow_connections``: activate the missing connections (mask 0) whose ``|∂L/∂(w·m)|`` on the
  calibration data is largest — NeST's ``|δ_m x_n|`` for a Linear, summed over the batch and
  positions for a conv — the top ``connections`` fraction of each layer's missing ones. They
  start at weight 0, so the function is unchanged: exact; training then moves them.
- ``grow_neurons`` (:mod:`growcli.transforms.nest_neurons`): new units between two masked
  Linear layers, exact because their outgoing weights start at zero.
- ``magnitude_prune``: mask out the connections with the smallest ``|w|`` until a fraction
  ``sparsity`` of each layer's connections is missing; approximate (the runner measures it).

Every transform keeps the stored weight entries under a zero mask at 0. Recipe: docs/recipes.md#nest.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from growcli.analysis.calibration import lookup
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.model import GrowModel
from growcli.core.select import select
from growcli.nn.masks import MASKED, MASKED_TYPES
from growcli.transforms.nest_measure import (BATCH_SIZE_HELP, DATA_BATCHES_HELP, DATA_HELP, LAYER_HELP, LOSS_HELP, measure,
                                             select_masked)
from growcli.transforms.nest_neurons import grow_neurons  # noqa: F401  (registers itself)
from growcli.transforms.registry import Context, StepReport, option, register


def check_data_options(spec) -> None:
    if not spec.data:
        raise UsageError("data: FILE (--data FILE) is needed: the gradient comes from it")
    for key in ("data_batches", "batch_size"):
        if getattr(spec, key) is not None and getattr(spec, key) < 1:
            raise UsageError(f"{key} must be a positive integer, got {getattr(spec, key)}")


@dataclass(frozen=True)
class MaskSpec:
    """Replace the Linear/Conv layers matched by ``layer`` by masked layers computing the same function."""

    layer: str | list[str] = option(help=LAYER_HELP)
    dense: bool = option(False, "Start from a mask of ones; by default weights that are exactly zero start masked out "
                                "(missing connections).")


@dataclass(frozen=True)
class GrowConnectionsSpec:
    """Activate the missing connections of masked layers with the largest gradient on the data (at weight 0)."""

    layer: str | list[str] = option(help=LAYER_HELP)
    data: str = option(help=DATA_HELP)
    connections: float = option(0.1, "Fraction of each layer's missing connections to grow: those with the largest "
                                     "|∂L/∂w| on the data (NeST's top percentile); they start at weight 0.")
    loss: Literal["auto", "cross_entropy", "mse", "model"] = option("auto", LOSS_HELP)
    data_batches: int | None = option(None, DATA_BATCHES_HELP)
    batch_size: int | None = option(None, BATCH_SIZE_HELP)

    def __post_init__(self):
        check_data_options(self)
        if not 0 < self.connections <= 1:
            raise UsageError(f"connections must be a fraction in (0, 1], got {self.connections}")


@dataclass(frozen=True)
class MagnitudePruneSpec:
    """Mask out the smallest-magnitude connections of masked layers down to a target sparsity."""

    layer: str | list[str] = option(help=LAYER_HELP)
    sparsity: float = option(help="Fraction of each layer's connections missing (mask 0) after pruning, in [0, 1); "
                                  "the smallest |w| go first.")

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise UsageError(f"sparsity must be a fraction in [0, 1), got {self.sparsity}")


# --------------------------------------------------------------------------- mask
def _refuse_program(gm: GrowModel, op: str) -> None:
    if isinstance(gm.module, fx.GraphModule):
        raise NotGrowableError(f"{op}: a .pt2 program has no layer modules to replace (its forward is one flat graph); "
                               "load the weights with --arch, or the Hugging Face directory")


def _maskable(root: nn.Module) -> dict[str, str | None]:
    """Every Linear/Conv/ConvTranspose layer → ``None`` if ``mask`` applies, else why not."""
    uses: dict[int, int] = {}
    for _, p in root.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    out: dict[str, str | None] = {}
    for name, m in root.named_modules():
        if isinstance(m, MASKED_TYPES):
            out[name] = "already masked"
        elif type(m) in MASKED:
            tied = uses.get(id(m.weight), 0) > 1
            out[name] = ("its weight is shared with another module (tied), so masking it here would not mask the other "
                         "use" if tied else None)
    return out


def mask_candidates(gm: GrowModel) -> dict[str, str | None]:
    if isinstance(gm.module, fx.GraphModule):
        return {}
    return _maskable(gm.module)


def masked_version(layer: nn.Module, dense: bool) -> nn.Module:
    """The masked layer holding ``layer``'s own weight and bias (the same Parameter objects)."""
    cls = MASKED[type(layer)]
    new = cls(**cls.growcli_spec(layer), device="meta")
    new.weight, new.bias = layer.weight, layer.bias
    with torch.no_grad():
        mask = torch.ones_like(layer.weight) if dense else (layer.weight != 0).to(layer.weight.dtype)
    new.mask = mask.detach()
    new.train(layer.training)
    return new


@register("mask", MaskSpec, exact=True, candidates=mask_candidates,
          help="NeST: make Linear/Conv layers masked (weight * mask, mask saved with the model); exact")
def mask(gm: GrowModel, spec: MaskSpec, ctx: Context) -> StepReport:
    """Replace every layer matched by ``spec.layer`` by its masked version (same weights); refuses tied weights."""
    _refuse_program(gm, "mask")
    root = gm.module
    report = StepReport("mask", dataclasses.asdict(spec), params_before=gm.num_parameters())
    verdicts = _maskable(root)
    report.matched = select(spec.layer, [n for n in verdicts if n], "layer")
    for name in report.matched:  # every layer is checked before any is changed
        if verdicts[name] is not None:
            raise NotGrowableError(f"mask: '{name}': {verdicts[name]}")
    for name in report.matched:
        old = root.get_submodule(name)
        new = masked_version(old, spec.dense)
        gm.edits.module(root, name, new)
        report.changes.append({"name": name, "before": type(old).__name__, "after": type(new).__name__,
                               "density": round(new.density(), 6)})
    report.exact_in_dtype = True  # w·1 = w and 0·0 = 0 in every dtype: the layers compute with the same numbers
    report.params_after = gm.num_parameters()
    return report


# --------------------------------------------------------------------------- connection growth
def masked_candidates(gm: GrowModel) -> dict[str, str | None]:
    if isinstance(gm.module, fx.GraphModule):
        return {}
    return {n: None if isinstance(m, MASKED_TYPES) else "not masked: add a mask step for it first"
            for n, m in gm.module.named_modules() if isinstance(m, MASKED_TYPES) or type(m) in MASKED}


def top_entries(score: torch.Tensor, eligible: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """Flat indices of the ``count`` eligible entries with the largest (or smallest) score; ties by index."""
    idx = torch.nonzero(eligible.reshape(-1)).reshape(-1)
    values = score.reshape(-1)[idx]
    order = torch.argsort(-values if largest else values, stable=True)
    return idx[order[:count]]


@register("grow_connections", GrowConnectionsSpec, exact=True, candidates=masked_candidates,
          help="NeST: grow the missing connections with the largest gradient on data, at weight 0; exact")
def grow_connections(gm: GrowModel, spec: GrowConnectionsSpec, ctx: Context) -> StepReport:
    """Activate, in each matched masked layer, the top ``spec.connections`` of its missing connections by
    ``|∂L/∂(w·m)|`` (those with a nonzero gradient), at weight 0."""
    _refuse_program(gm, "grow_connections")
    root = gm.module
    report = StepReport("grow_connections", dataclasses.asdict(spec), params_before=gm.num_parameters())
    report.matched = select_masked(root, spec.layer, "grow_connections")
    grads, _ = measure(root, report.matched, lookup(ctx, spec))
    grown = 0
    for name in report.matched:
        layer = root.get_submodule(name)
        missing = layer.mask == 0
        n_missing = int(missing.sum())
        score = grads[name].abs()
        eligible = missing & (score > 0)
        count = min(math.ceil(spec.connections * n_missing), int(eligible.sum()))
        before = layer.density()
        if count:
            picked = top_entries(score, eligible, count, largest=True)
            with torch.no_grad():
                layer.weight.view(-1)[picked] = 0  # a new connection starts at 0: the function is unchanged
                layer.mask.view(-1)[picked] = 1
        grown += count
        report.changes.append({"name": name, "grown": count, "missing_before": n_missing,
                               "density_before": round(before, 6), "density_after": round(layer.density(), 6)})
        if count < math.ceil(spec.connections * n_missing):
            report.notes.append(f"grow_connections '{name}': {count} of {n_missing} missing connections have a nonzero "
                                "gradient on the data; only those grew")
    if not grown:
        raise NotGrowableError(f"grow_connections: no missing connection of {', '.join(report.matched)} has a nonzero "
                               "gradient on the data (every mask entry may be 1: prune first)")
    report.exact_in_dtype = True  # the new connections hold w = 0: the products are the same numbers
    report.params_after = gm.num_parameters()
    return report


# --------------------------------------------------------------------------- magnitude pruning
@register("magnitude_prune", MagnitudePruneSpec, exact=False, candidates=masked_candidates,
          help="NeST: mask out the smallest-magnitude connections to a target sparsity; approximate")
def magnitude_prune(gm: GrowModel, spec: MagnitudePruneSpec, ctx: Context) -> StepReport:
    """Prune each matched masked layer's connections with the smallest ``|w|`` until ``spec.sparsity`` of them are missing."""
    _refuse_program(gm, "magnitude_prune")
    root = gm.module
    report = StepReport("magnitude_prune", dataclasses.asdict(spec), params_before=gm.num_parameters())
    report.matched = select_masked(root, spec.layer, "magnitude_prune")
    for name in report.matched:
        layer = root.get_submodule(name)
        total = layer.mask.numel()
        missing = int((layer.mask == 0).sum())
        target = math.floor(spec.sparsity * total + 0.5)
        count = max(target - missing, 0)
        largest_pruned = 0.0
        if count:
            picked = top_entries(layer.weight.detach().abs(), layer.mask != 0, count, largest=False)
            largest_pruned = float(layer.weight.detach().reshape(-1)[picked].abs().max())
            with torch.no_grad():
                layer.weight.view(-1)[picked] = 0
                layer.mask.view(-1)[picked] = 0
        else:
            report.notes.append(f"magnitude_prune '{name}': already {missing / total:.3f} sparse; nothing pruned")
        report.changes.append({"name": name, "pruned": count, "sparsity_before": round(missing / total, 6),
                               "sparsity_after": round(1 - layer.density(), 6), "largest_pruned_abs": largest_pruned})
    report.params_after = gm.num_parameters()
    return report
