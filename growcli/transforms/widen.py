"""Net2WiderNet: grow a layer's output units/channels, keeping the function exact.

The coupled group from :mod:`growcli.analysis.coupling` says which parameter dimensions follow the
layer's channels; this module chooses the channel map ``g`` (new unit → source unit) and
the split of each consumer column among a source's replicas, and rewrites the tensors.
Recipes: docs/recipes.md#widen. Init net2net and zero also stream (:mod:`growcli.run.width_stream`):
inside :func:`growcli.transforms.width_edit.deferred_rewrites`, :func:`widen_group` plans each
tensor (shape, generator state) and computes it later from the tensor on disk.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from growcli.analysis.coupled_group import Group
from growcli.analysis.coupling import analyze, producer_layers
from growcli.analysis.trace import trace_model
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import make_batches
from growcli.core.model import GrowModel
from growcli.core.origins import AxisMap, Origin
from growcli.core.select import select
from growcli.transforms.channels import channel_map, copy_groups, new_units, remap, split_factors  # noqa: F401 (re-exported)
from growcli.transforms.firefly import widen_firefly
from growcli.transforms.gradmax import widen_gradmax
from growcli.transforms.hfconfig import fit_sizes
from growcli.transforms.registry import Context, StepReport, option, register
from growcli.transforms.resize import sync_attributes
from growcli.transforms.splits import along, split_columns
from growcli.transforms.sizes import check_one_size, target_size
from growcli.transforms.width_edit import Rewrite, deferring

INITS = ("net2net", "zero", "gradmax", "firefly")
DATA_INITS = ("gradmax", "firefly")  # the inits that read calibration data


@dataclass(frozen=True)
class WidenSpec:
    """Grow ``layer`` (a name, pattern or list) to ``to`` units, by ``by`` units, or by ``factor``
    (init firefly: or share ``budget`` units among the layers)."""

    layer: str | list[str] = option(help="Module name, dotted suffix, glob or regex; a list grows several layers.")
    to: int | None = option(None, "New number of units/channels.")
    by: int | None = option(None, "Number of units/channels to add.")
    factor: float | None = option(None, "Multiply the number of units by F.")
    init: Literal["net2net", "zero", "gradmax", "firefly"] = option(
        "net2net", "net2net (copy units, split outgoing weights), zero (random incoming, zero outgoing weights), gradmax "
                   "(zero incoming, outgoing from the gradient on data) or firefly (the best new or split units by their "
                   "loss decrease on data).")
    split: Literal["asymmetric", "uniform"] = option("asymmetric", "asymmetric (random shares summing to 1) or uniform.")
    noise: float = option(0.0, "Net2Net noise on the copies' incoming weights (relative to the weights' std); makes "
                               "the step approximate.")
    # init gradmax (docs/recipes.md#widen-gradmax-init): outgoing norm relative to the existing units', and the
    # calibration data the gradient comes from (see growcli.analysis.calibration; loaded by the runner; firefly too).
    scale: float = option(0.5, "gradmax: new outgoing weights' norm relative to the mean of the existing ones.")
    data: str | None = option(None, "gradmax, firefly: calibration data, .safetensors/.pt with 'input' and 'target'.")
    loss: Literal["auto", "cross_entropy", "mse", "model"] = option("auto", "gradmax, firefly: auto, cross_entropy, mse or model.")
    data_batches: int | None = option(None, "gradmax, firefly: use only the first N calibration batches.")
    batch_size: int | None = option(None, "gradmax, firefly: samples per calibration batch (default 32).")
    # init firefly (docs/recipes.md#widen-firefly-init)
    candidates: int = option(32, "firefly: new units with random incoming weights scored per layer (besides a split of "
                                 "every existing unit).")
    budget: int | None = option(None, "firefly: new units shared among all the layers by score, instead of to, by or "
                                      "factor per layer.")
    eps: float = option(0.1, "firefly: the candidates' step ε, relative to the existing weights' norms (new units' "
                             "outgoing weights, splits' offsets); scores are the loss decrease predicted at ε.")
    firefly_steps: int = option(0, "firefly: gradient steps on the kept candidates' ε after selection; 0 keeps ε = 0 "
                                   "(exact), more makes the step approximate.")
    firefly_lr: float = option(1.0, "firefly: learning rate of the steps on ε (halved when a step raises the loss).")

    def __post_init__(self):
        if self.budget is None:
            check_one_size(self, ("to", "by", "factor"))
        elif self.init != "firefly":
            raise UsageError(f"budget is used only by init firefly (init is {self.init}); give to, by or factor")
        elif (self.to, self.by, self.factor) != (None, None, None):
            raise UsageError("budget shares the new units among the layers; give it instead of to, by or factor")
        elif not isinstance(self.budget, int) or self.budget < 1:
            raise UsageError(f"budget must be a positive integer, got {self.budget!r}")
        if self.noise < 0:
            raise UsageError(f"noise must be non-negative, got {self.noise}")
        if self.init in DATA_INITS and not self.data:
            raise UsageError(f"init {self.init} needs calibration data: data: FILE (--data FILE), see growcli.analysis.calibration")
        if self.init in DATA_INITS and self.noise:
            raise UsageError(f"noise applies to net2net copies; init {self.init} does not copy units")
        if self.init not in DATA_INITS and self.data is not None:
            raise UsageError(f"data is used only by init gradmax and firefly (init is {self.init})")
        if self.scale <= 0:
            raise UsageError(f"scale must be positive, got {self.scale}")
        for key in ("data_batches", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UsageError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.candidates < 0:
            raise UsageError(f"candidates must be zero or more, got {self.candidates}")
        if self.eps <= 0 or self.firefly_lr <= 0:
            raise UsageError(f"eps and firefly_lr must be positive, got {self.eps} and {self.firefly_lr}")
        if self.firefly_steps < 0:
            raise UsageError(f"firefly_steps must be zero or more, got {self.firefly_steps}")
        if self.init != "firefly" and self.firefly_steps:
            raise UsageError(f"firefly_steps is used only by init firefly (init is {self.init})")

    def target(self, current: int) -> int:
        return target_size(self, current)


# --------------------------------------------------------------------------- tensor rewriting
def _get(root: nn.Module, fqn: str) -> torch.Tensor:
    owner_name, _, leaf = fqn.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    return getattr(owner, leaf)


def widen_group(gm: GrowModel, group: Group, new_size: int, spec: WidenSpec, gen: torch.Generator,
                report: StepReport) -> None:
    """Rewrite every tensor of ``group`` for ``new_size`` channels (in place, through ``gm.edits``)."""
    root = gm.module
    blocks = copy_groups(group, new_size, spec.init)  # norms over the channels: whole copies, or refused
    g = channel_map(group.size, new_size, blocks, gen, whole=bool(group.norms))
    if group.norms:
        names = ", ".join(n.describe() for n in group.norms[:3]) + (", …" if len(group.norms) > 3 else "")
        report.notes.append(f"'{group.layer}': {len(group.norms)} norm(s) over the channels ({names}): every channel "
                            f"copied {new_size // group.size} times, so their statistics stay the same")
    fresh = new_units(g)
    factors = split_factors(g, group.size, spec.split, spec.init, gen)
    jobs = deferring()
    tied = _tied_names(root) if jobs is None else {}
    for use in group.uses:
        old = _get(root, use.fqn).detach()
        if jobs is None:
            new, origin = _rewrite_use(old, use, g, fresh, factors, group, spec, gen)
        else:  # planning a stream: the shape now, the values from the tensor on disk later
            shape = _use_shape(tuple(old.shape), use, g, group)
            rows = None  # a producer along dim 0 whose new units are plain copies: a gather of its rows
            copies = spec.init == "net2net" and not (spec.noise > 0 and old.dim() > 1)  # as _init_new_units
            if use.role == "producer" and use.dim == 0 and (copies or not bool(fresh.any())):
                rows = tuple(remap(use.layout, g, group.size)[0].tolist())
            jobs.append(Rewrite(use.fqn, [], spec.noise, gen.get_state(), shape, old.dtype, tuple(old.shape),
                                fn=functools.partial(_deferred_use, use=use, g=g, fresh=fresh, factors=factors,
                                                     group=group, spec=spec),
                                slices=_slice_dims(shape, use, fresh, spec), rows=rows))
            _skip_init(shape, use, fresh, spec, gen)
            new, origin = torch.empty(shape, dtype=old.dtype, device="meta"), None
        for name in (use.fqn, *tied.get(use.fqn, ())):  # one tensor under several names: each, then tied again
            gm.edits.param(root, name, new.to(old.dtype), origin)
        for name in tied.get(use.fqn, ()):
            owner, _, leaf = name.rpartition(".")
            root.get_submodule(owner)._parameters[leaf] = _get(root, use.fqn)
        report.changes.append({"name": use.fqn, "role": use.role, "before": list(old.shape), "after": list(new.shape)})
    for name in group.depthwise:  # the module's attribute and, in a .pt2 program, the graph's literal
        gm.edits.groups(root, name, new_size)
    for name in sorted({n.rpartition(".")[0] for u in group.uses for n in (u.fqn, *tied.get(u.fqn, ()))}):
        sync_attributes(gm, name)
    _resize_plain_norms(gm, group, new_size)
    _patch_views(gm, group, g)


SHAPED_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _resize_plain_norms(gm: GrowModel, group: Group, new_size: int) -> None:
    """A norm module without affine tensors (no use of the group resizes it) still holds the channel count that
    its forward passes to the op: ``normalized_shape`` (at the channels' index) or ``num_channels``."""
    for norm in group.norms:
        try:
            m = gm.module.get_submodule(norm.module) if norm.module else None
        except AttributeError:  # a loaded .pt2 program: the graph's literal is patched instead
            continue
        if m is None or getattr(m, "weight", None) is not None:
            continue  # affine: sync_attributes follows its weight
        if isinstance(m, nn.GroupNorm) and m.num_channels == group.size:
            gm.edits.attr(gm.module, norm.module, "num_channels", new_size)
        elif isinstance(m, SHAPED_NORMS) and tuple(m.normalized_shape)[norm.dim] == group.size:
            shape = list(m.normalized_shape)
            shape[norm.dim] = new_size
            gm.edits.attr(gm.module, norm.module, "normalized_shape", tuple(shape))


def _tied_names(root: nn.Module) -> dict[str, tuple[str, ...]]:
    """Name of a parameter held by several modules (one Parameter, a layer shared across depths by reference)
    → its other names; the trace sees one of them."""
    names: dict[int, list[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n: tuple(m for m in group if m != n) for group in names.values() if len(group) > 1 for n in group}


def _rewrite_use(old: torch.Tensor, use, g: list[int], fresh: torch.Tensor, factors: torch.Tensor, group: Group,
                 spec: WidenSpec, gen: torch.Generator, want_origin: bool = True) -> tuple[torch.Tensor, Origin | None]:
    """One use of the group's channels rewritten for the channel map ``g``, and its origin (None unless
    ``want_origin``: a streamed tensor's origin is recorded when it is planned, not when it is written)."""
    origin = None  # grouped consumers: no single axis map; their optimizer state starts fresh
    if use.role == "producer":  # rows of every part of a fused projection follow g (use.layout)
        idx, chan = remap(use.layout, g, group.size)
        new = old.index_select(use.dim, idx)  # its own storage: the new units are written into it
        fresh_at = fresh[chan]
        if fresh_at.any():
            new = _init_new_units(new, old, use, fresh_at, spec, gen)
        random = fresh_at & torch.tensor(spec.init == "zero")
        if want_origin:
            origin = axis_origin(use.dim, torch.where(random, -1, idx), torch.ones(len(idx), dtype=torch.float64))
    elif use.role == "grouped_consumer":
        new = _grouped_consumer(old, g, factors, group, use.groups)
    else:
        idx, chan = remap(use.layout, g, group.size)
        if use.role == "consumer":  # columns of replicated units: shared out, exactly in the dtype
            new, scale = split_columns(old, use.dim, idx, factors[chan.clamp(min=0)], chan >= 0)
        else:
            new, scale = old.index_select(use.dim, idx), torch.ones(len(chan), dtype=torch.float64)
        if want_origin:
            origin = axis_origin(use.dim, idx, scale)
    return new, origin


def _deferred_use(old: torch.Tensor, gen: torch.Generator, *, use, g, fresh, factors, group, spec) -> tuple[torch.Tensor, str]:
    new, _ = _rewrite_use(old, use, g, fresh, factors, group, spec, gen, want_origin=False)
    return new.to(old.dtype), ""


def _use_shape(shape: tuple[int, ...], use, g: list[int], group: Group) -> tuple[int, ...]:
    """The shape :func:`_rewrite_use` gives a tensor of ``shape`` (computed without its values)."""
    out = list(shape)
    if use.role == "grouped_consumer":
        out[1] = len(g) // use.groups
    else:
        out[use.dim] = len(use.layout.keys(g))
    return tuple(out)


def _slice_dims(shape: tuple[int, ...], use, fresh: torch.Tensor, spec: WidenSpec) -> tuple[int, ...]:
    """Dimensions along which :func:`_rewrite_use` of a slice is that slice of the result: every one but the
    channels' own, except for grouped consumers and for new units drawn at random (their std is the whole
    tensor's, their draws the whole block's). A producer's copied rows need no float64 temporaries: sliced
    only along dimensions before its channels' (runs of bytes), as one gather otherwise."""
    random = bool(fresh.any()) and (spec.init == "zero" or spec.noise > 0)
    if use.role == "grouped_consumer" or (use.role == "producer" and random):
        return ()
    if use.role == "producer":
        return tuple(range(use.dim))
    return tuple(d for d in range(len(shape)) if d != use.dim)


def _skip_init(shape: tuple[int, ...], use, fresh: torch.Tensor, spec: WidenSpec, gen: torch.Generator) -> None:
    """Advance ``gen`` as :func:`_init_new_units` would for this use (the same draws, same shapes)."""
    if use.role != "producer" or not bool(fresh.any()):
        return
    drawn = list(shape)
    drawn[use.dim] = sum(bool(fresh[c]) for c, _ in use.layout.keys(list(range(len(fresh)))))
    if (spec.init == "zero" and len(shape) != 1) or (spec.init != "zero" and spec.noise > 0 and len(shape) > 1):
        torch.randn(drawn, generator=gen, dtype=torch.float64)


def axis_origin(dim: int, index: torch.Tensor, scale: torch.Tensor) -> Origin:
    """The origin of a tensor whose positions along ``dim`` are ``old[index] · scale`` (-1: fresh)."""
    return Origin((AxisMap(dim, tuple(int(i) for i in index), tuple(float(x) for x in scale)),))


def _init_new_units(new: torch.Tensor, old: torch.Tensor, use, fresh: torch.Tensor, spec: WidenSpec,
                    gen: torch.Generator) -> torch.Tensor:
    """Incoming weights of new units: copies (net2net, optionally with noise) or random (zero init)."""
    sel = [slice(None)] * new.dim()
    sel[use.dim] = fresh
    if spec.init != "zero" and not (spec.noise > 0 and old.dim() > 1):
        return new  # net2net copies: no draws, no statistics
    std = float(old.float().std()) if old.numel() > 1 else 1.0
    if spec.init == "zero":
        is_bias = old.dim() == 1
        rnd = torch.zeros_like(new[tuple(sel)]) if is_bias else \
            torch.randn(new[tuple(sel)].shape, generator=gen, dtype=torch.float64).to(new.dtype) * std
        new[tuple(sel)] = rnd
    elif spec.noise > 0 and old.dim() > 1:
        noise = torch.randn(new[tuple(sel)].shape, generator=gen, dtype=torch.float64).to(new.dtype)
        new[tuple(sel)] = new[tuple(sel)] + noise * spec.noise * std
    return new


def _grouped_consumer(old: torch.Tensor, g: list[int], factors: torch.Tensor, group: Group, groups: int) -> torch.Tensor:
    """Input columns of a grouped convolution: each group reads only its own (grown) channels."""
    out_per = old.shape[0] // groups
    per_old, per_new = group.size // groups, len(g) // groups
    blocks = []
    for k in range(groups):
        rows = old[k * out_per:(k + 1) * out_per]
        src = torch.tensor([g[j] - k * per_old for j in range(k * per_new, (k + 1) * per_new)])
        f = factors[k * per_new:(k + 1) * per_new]
        cols = rows.index_select(1, src)
        blocks.append(cols * along(cols, 1, f))
    return torch.cat(blocks, 0)


def _patch_views(gm: GrowModel, group: Group, g: list[int]) -> None:
    """Literal sizes in a loaded ``.pt2`` program's view/reshape ops follow the new channel count."""
    if not group.patches:
        return
    graph = gm.module.graph
    nodes = {n.name: n for n in graph.nodes}
    for patch in group.patches:
        node = nodes[patch.node]
        sizes = list(node.args[1])
        if sizes[patch.out_dim] != -1:
            sizes[patch.out_dim] = len(patch.layout.keys(g))
            gm.edits.graph_arg(gm.module, patch.node, 1, sizes)


# --------------------------------------------------------------------------- the transform
def widen_candidates(gm: GrowModel) -> dict[str, str | None]:
    """Every Linear/Conv/Embedding layer → None if widenable, else the reason."""
    trace = trace_model(gm.module, make_batches(gm.inputs, 1)[0])
    result: dict[str, str | None] = {}
    for layer in producer_layers(trace):
        try:
            analyze(trace, layer)
            result[layer] = None
        except NotGrowableError as exc:
            result[layer] = str(exc).split(": ", 1)[-1]
    return result


def _trace(gm: GrowModel):
    """The model traced on one generated batch, moved to the model's device (meta when planning a stream)."""
    device = next((p.device for p in gm.module.parameters()), torch.device("cpu"))
    args, kwargs = make_batches(gm.inputs, 1)[0]
    if device.type != "meta":
        return trace_model(gm.module, (args, kwargs))
    return trace_model(gm.module, (tuple(a.to(device) for a in args), {k: v.to(device) for k, v in kwargs.items()}))


@register("widen", WidenSpec, exact=lambda spec: spec.noise == 0 and not (spec.init == "firefly" and spec.firefly_steps > 0),
          help="Net2WiderNet: grow a layer's units or channels",
          candidates=widen_candidates, modes=("memory", "streaming"))
def widen(gm: GrowModel, spec: WidenSpec, ctx: Context) -> StepReport:
    """Widen every layer matched by ``spec.layer``; layers in one coupled group grow together once."""
    report = StepReport("widen", dataclasses.asdict(spec), params_before=gm.num_parameters())
    trace = _trace(gm)
    layers = select(spec.layer, producer_layers(trace))
    gen = ctx.generator(salt=1)
    done: set[frozenset[str]] = set()
    sizes: dict[int, int] = {}
    touched: set[str] = set()  # tensors earlier groups rewrote
    firefly: list[Group] = []  # init firefly: every group is scored first, then grown together
    for layer in layers:
        if any(layer in key for key in done):
            continue
        group = analyze(trace, layer)
        if touched & {use.fqn for use in group.uses} and spec.init != "firefly":
            # An earlier group grew a tensor this one uses too (a consumer of both, e.g. after torch.cat):
            # its offsets moved, so analyse again on the model as it is now.
            trace = _trace(gm)
            group = analyze(trace, layer)
        key = frozenset(group.producers)
        if key in done:
            continue
        done.add(key)
        touched |= {use.fqn for use in group.uses}
        if group.applications > 1 and spec.init in DATA_INITS:  # their measure is taken at one use
            raise NotGrowableError(f"'{layer}': {spec.init}: its weights run {group.applications} times in the "
                                   f"forward pass (shared weights) and {spec.init} measures one use; use init net2net "
                                   "or zero")
        if spec.init == "firefly":
            firefly.append(group)
            continue
        if group.applications > 1:
            report.notes.append(f"'{layer}': its weights run {group.applications} times in the forward pass "
                                "(shared weights); every use grows by the same map")
        new_size = spec.target(group.size)
        if new_size <= group.size:
            raise NotGrowableError(f"'{layer}' has {group.size} units; the new size {new_size} is not larger")
        if spec.init == "gradmax":
            widen_gradmax(gm, trace, group, new_size, spec, ctx, report)
        else:
            widen_group(gm, group, new_size, spec, gen, report)
        sizes[group.size] = new_size
        report.matched.append(layer if len(group.producers) == 1 else f"{layer} (with {', '.join(p for p in group.producers if p != layer)})")
    if firefly:
        sizes = widen_firefly(gm, trace, firefly, spec, ctx, report)
    for change in fit_sizes(gm, sizes, sorted(set(sizes.values()))):
        report.notes.append(f"config {change}")
    if spec.noise > 0:
        report.notes.append(f"noise {spec.noise} on the copies' incoming weights makes the step approximate")
    # Copies and exact splits (growcli.transforms.splits) sum to the original bit for bit in the stored dtype;
    # a grouped consumer's columns are scaled by a factor that rounds.
    report.exact_in_dtype = (spec.init == "net2net" and spec.noise == 0
                             and not any(c.get("role") == "grouped_consumer" for c in report.changes))
    report.params_after = gm.num_parameters()
    return report
