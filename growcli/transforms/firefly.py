"""Firefly (Wu, Liu, Stone, Liu 2020): keep the candidate units that promise the largest loss decrease.

Two kinds of candidate are scored on calibration data (:mod:`growcli.transforms.firefly_measure`)
for every layer grown, and the best are kept under one budget:

- a **new unit**: random incoming weights (the spread of the existing ones, bias 0) and outgoing
  weights ``ε·r·u`` with ``r`` the mean norm of the existing outgoing columns and ``u = −g/‖g‖``
  the steepest-descent direction of its outgoing gradient ``g``. To first order the loss falls
  by ``ε·r·‖g‖``.
- a **split** of an existing unit ``i`` (splitting steepest descent, Liu, Wu, Wang 2019): two
  copies with incoming weights ``w̃_i ± ε‖w̃_i‖·v`` (``w̃`` = weights and bias) and half the
  outgoing weights each; ``v`` is the eigenvector of the unit's splitting matrix ``S_i`` with
  the smallest eigenvalue ``λ_i``. The first-order change vanishes (the copies move in opposite
  directions); the second-order change is ``½ (ε‖w̃_i‖)² λ_i``, a decrease when ``λ_i < 0``.

Both gains are predicted at the same relative step ``ε`` (option ``eps``) and ranked together:
per layer (``to``/``by``/``factor``) or across all the layers matched (``budget``).

Exactness: the grown model is written at ``ε = 0`` — new units with zero outgoing weights, splits
as exact copies (``δ = 0``) sharing the outgoing weights half and half, which is exact in any
floating-point dtype (halving is exact). ``firefly_steps > 0`` then starts every kept candidate at
``ε`` and runs that many gradient steps on the vector of ``ε`` (one per kept candidate) on the
calibration loss, as the paper does; that changes the function on purpose and the step is
reported as approximate with the measured deviation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from growcli.analysis.calibration import Calibration, batch_loss, lookup
from growcli.analysis.coupled_group import Group
from growcli.analysis.trace import Trace
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import cast_batch
from growcli.core.origins import AxisMap, Origin
from growcli.transforms.firefly_measure import FireflyProbe
from growcli.transforms.gradmax import outgoing_norm
from growcli.transforms.gradmax_measure import measure, unit_major
from growcli.transforms.gradmax_site import Site, find_site
from growcli.transforms.resize import sync_attributes

SALT = 18  # ctx.generator salt of the candidates' incoming weights


@dataclass(frozen=True)
class Candidate:
    """One scored candidate: ``kind`` "split" (``index`` = the unit split) or "new" (``index`` = candidate)."""

    layer: str
    kind: str
    index: int
    gain: float  # predicted loss decrease at step eps (first order for new units, second order for splits)


@dataclass
class LayerScores:
    """Everything measured for one layer: the candidates and what building the kept ones needs."""

    site: Site
    probe: FireflyProbe
    radius: float  # r: mean norm of the existing outgoing columns
    new: list[Candidate]
    splits: list[Candidate]
    directions: torch.Tensor  # [units, D] unit-norm split directions v_i (weights, then bias)
    scales: torch.Tensor  # [units] ‖w̃_i‖
    keep_split: list[int] = field(default_factory=list)
    keep_new: list[int] = field(default_factory=list)


def firefly_error(exc: NotGrowableError) -> NotGrowableError:
    """A site refusal (worded for GradMax, whose site rules Firefly shares) worded for Firefly."""
    return NotGrowableError(str(exc).replace("gradmax", "firefly"))


def score(gm, trace: Trace, groups: list[Group], spec, ctx) -> tuple[list[LayerScores], float, Calibration]:
    """Measure every candidate of every group's layer on the calibration data; returns the scores,
    the mean calibration loss and the data. The model is not changed."""
    try:
        sites = [find_site(trace, g, any_conv=True) for g in groups]
    except NotGrowableError as exc:
        raise firefly_error(exc) from None
    cal = lookup(ctx, spec)
    gen = ctx.generator(salt=SALT)
    probes = [FireflyProbe(site, gm.module, spec.candidates, gen) for site in sites]
    try:
        loss = measure(gm.module, probes, cal)
    except NotGrowableError as exc:
        raise firefly_error(exc) from None
    out = []
    for site, pr in zip(sites, probes):
        radius = outgoing_norm(site, gm.module) or 1.0
        gnorm = pr.g.norm(dim=1) if pr.g is not None else torch.zeros(0, dtype=torch.float64)
        new = [Candidate(site.layer, "new", j, spec.eps * radius * float(n)) for j, n in enumerate(gnorm)]
        evals, evecs = torch.linalg.eigh(pr.s)  # ascending eigenvalues, per unit
        w = unit_major(pr.pw.detach().double(), site.producer_axis).reshape(site.size, -1)
        if site.producer_b:
            w = torch.cat([w, gm.module.get_parameter(site.producer_b).detach().double()[:, None]], dim=1)
        scales = w.norm(dim=1)
        splits = [Candidate(site.layer, "split", i, -0.5 * (spec.eps * float(scales[i])) ** 2 * float(evals[i, 0]))
                  for i in range(site.size)]
        out.append(LayerScores(site, pr, radius, new, splits, evecs[:, :, 0].clone(), scales))
    return out, loss, cal


def ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Best first; splits that do not lower the loss (λ ≥ 0) are not candidates. Ties: layer order, then index."""
    pool = [c for c in candidates if c.kind == "new" or c.gain > 0]
    return sorted(pool, key=lambda c: -c.gain)  # stable: the input order breaks ties


def select(layers: list[LayerScores], counts: dict[str, int] | None, budget: int | None) -> None:
    """Mark the kept candidates: the best ``counts[layer]`` of each layer, or the best ``budget`` of all."""
    pools = {ls.site.layer: ranked(ls.splits + ls.new) for ls in layers}
    if budget is not None:
        every = ranked([c for ls in layers for c in ls.splits + ls.new])
        if budget > len(every):
            raise NotGrowableError(f"firefly: a budget of {budget} new units, but the layers offer only {len(every)} "
                                   "candidates (raise candidates, or grow in several steps)")
        chosen = every[:budget]
    else:
        chosen = []
        for ls in layers:
            k, pool = counts[ls.site.layer], pools[ls.site.layer]
            if k > len(pool):
                raise NotGrowableError(f"'{ls.site.layer}': firefly: asked for {k} new units, but it offers only "
                                       f"{len(pool)} candidates ({len(ls.new)} new, {len(pool) - len(ls.new)} splits "
                                       "that lower the loss); raise candidates, or grow in several steps")
            chosen += pool[:k]
    by_layer = {ls.site.layer: ls for ls in layers}
    for c in chosen:
        (by_layer[c.layer].keep_split if c.kind == "split" else by_layer[c.layer].keep_new).append(c.index)
    for ls in layers:
        ls.keep_split.sort()
        ls.keep_new.sort()


# --------------------------------------------------------------------------- building the grown tensors
def _get(module: torch.nn.Module, fqn: str) -> torch.Tensor:
    owner, _, leaf = fqn.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def grown_tensors(module: torch.nn.Module, layers: list[LayerScores], eps: torch.Tensor
                  ) -> tuple[dict[str, torch.Tensor], dict[str, list[AxisMap]]]:
    """Every tensor the kept candidates change, as a function of the step ``eps`` (one entry per kept
    candidate, layer by layer, splits then new units), in float64, with the axis maps of their origins.

    Layers are applied last first, so a layer's incoming weights are built on its original inputs and
    an earlier layer that feeds it then maps their columns like any other consumer's.
    """
    work: dict[str, torch.Tensor] = {}
    maps: dict[str, list[AxisMap]] = {}
    offsets, at = [], 0
    for ls in layers:
        offsets.append(at)
        at += len(ls.keep_split) + len(ls.keep_new)

    def cur(fqn: str) -> torch.Tensor:
        return work[fqn] if fqn in work else _get(module, fqn).detach().double()

    def put(fqn: str, tensor: torch.Tensor, amap: AxisMap) -> None:
        work[fqn] = tensor
        maps.setdefault(fqn, []).append(amap)

    for ls, off in reversed(list(zip(layers, offsets))):
        site, s_idx, n_idx = ls.site, ls.keep_split, ls.keep_new
        if not s_idx and not n_idx:
            continue
        k_s, k_n, size = len(s_idx), len(n_idx), site.size
        e_split, e_new = eps[off:off + k_s], eps[off + k_s:off + k_s + k_n]
        src = torch.tensor(s_idx, dtype=torch.long)
        index = tuple(range(size)) + tuple(s_idx) + (-1,) * k_n
        ones = (1.0,) * len(index)
        # δ_i·v_i for each split (weights, then bias); 0 at eps = 0
        offset = (e_split * ls.scales[src])[:, None] * ls.directions[src]
        pa, ca = site.producer_axis, site.consumer_axis  # the units' dims (1 and 0 for transposed convolutions)
        w = unit_major(cur(site.producer_w), pa)
        flat = w.reshape(size, -1)
        d_w = offset[:, :flat.shape[1]]
        plus = flat.index_add(0, src, d_w)
        rows = [plus, flat[src] - d_w, ls.probe.cand[torch.tensor(n_idx, dtype=torch.long)].reshape(k_n, flat.shape[1])]
        put(site.producer_w, torch.cat(rows, 0).reshape(size + k_s + k_n, *w.shape[1:]).movedim(0, pa),
            AxisMap(pa, index, ones))
        if site.producer_b:
            b = cur(site.producer_b)
            d_b = offset[:, flat.shape[1]]
            put(site.producer_b, torch.cat([b.index_add(0, src, d_b), b[src] - d_b, b.new_zeros(k_n)]),
                AxisMap(0, index, ones))
        for norm in site.norms.values():
            for fqn, value in zip(norm.fqns(), norm.new_values()):
                if fqn:
                    t = cur(fqn)
                    put(fqn, torch.cat([t, t[src], t.new_full((k_n,), value)]), AxisMap(0, index, ones))
        cw = unit_major(cur(site.consumer_w), ca)  # [units, consumer outputs, taps…]
        halves = torch.ones(size, dtype=torch.float64)
        halves[src] = 0.5
        old = cw * halves.reshape(-1, *([1] * (cw.dim() - 1)))
        g = ls.probe.g[torch.tensor(n_idx, dtype=torch.long)] if k_n else torch.zeros(0, 1, dtype=torch.float64)
        norms = g.norm(dim=1, keepdim=True)
        u = torch.where(norms > 0, -g / norms.clamp(min=1e-300), torch.zeros_like(g)) * ls.radius  # [k_n, O·taps]
        new_cols = (e_new[:, None] * u).reshape(k_n, -1, *cw.shape[2:])
        if new_cols.shape[1] < cw.shape[1]:  # the consumer grew too (its outputs are appended): they read 0 from these
            pad = new_cols.new_zeros(k_n, cw.shape[1] - new_cols.shape[1], *new_cols.shape[2:])
            new_cols = torch.cat([new_cols, pad], 1)
        put(site.consumer_w, torch.cat([old, old[src], new_cols], 0).movedim(0, ca),
            AxisMap(ca, index, tuple(halves.tolist()) + (0.5,) * k_s + (1.0,) * k_n))
    return work, maps


def write(gm, layers: list[LayerScores], eps: torch.Tensor, report) -> None:
    """Replace every changed tensor once (through ``gm.edits``) and keep the modules' size attributes true."""
    root = gm.module
    work, maps = grown_tensors(root, layers, eps.detach())
    for fqn, tensor in work.items():
        old = _get(root, fqn)
        gm.edits.param(root, fqn, tensor.to(old.dtype), Origin(tuple(maps[fqn])))
        report.changes.append({"name": fqn, "role": "firefly", "before": list(old.shape), "after": list(tensor.shape)})
    names = {ls.site.layer for ls in layers} | {ls.site.consumer for ls in layers}
    names |= {n.mean.rpartition(".")[0] for ls in layers for n in ls.site.norms.values()}
    for name in sorted(names):
        sync_attributes(gm, name)


# --------------------------------------------------------------------------- optimising ε (approximate)
def calibration_loss(module: torch.nn.Module, tensors: dict[str, torch.Tensor], cal: Calibration) -> torch.Tensor:
    """The mean loss over every calibration sample with ``tensors`` in place of the module's own."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    total = cal.samples
    loss = torch.zeros((), dtype=torch.float64)
    for batch, target in cal.batches:
        args, kwargs = cast_batch(batch, dtype)
        n = int((args[0] if args else next(iter(kwargs.values()))).shape[0])
        out = functional_call(module, {k: v.to(dtype) for k, v in tensors.items()}, args, kwargs, strict=False)
        loss = loss + batch_loss(out, target, cal.loss, cal.source).double() * (n / total)
    return loss


def optimise(module: torch.nn.Module, layers: list[LayerScores], spec, cal: Calibration) -> tuple[torch.Tensor, list[str]]:
    """``spec.firefly_steps`` gradient steps on ``ε`` from ``spec.eps`` (a step that raises the loss is
    retried with half the learning rate, up to 10 times); returns ``ε`` and notes with the losses."""
    k = sum(len(ls.keep_split) + len(ls.keep_new) for ls in layers)
    eps = torch.full((k,), float(spec.eps), dtype=torch.float64)
    lr = float(spec.firefly_lr)

    def loss_at(e: torch.Tensor) -> torch.Tensor:
        return calibration_loss(module, grown_tensors(module, layers, e)[0], cal)

    with torch.enable_grad():
        e = eps.clone().requires_grad_(True)
        current = loss_at(e)
        start = float(current.detach())
        for _ in range(spec.firefly_steps):
            (grad,) = torch.autograd.grad(current, e)
            for _ in range(10):
                trial = (e.detach() - lr * grad).requires_grad_(True)
                value = loss_at(trial)
                if float(value.detach()) <= float(current.detach()):
                    break
                lr /= 2
            else:
                break
            e, current = trial, value
    note = (f"firefly: {spec.firefly_steps} gradient steps on ε (from {spec.eps}, learning rate {spec.firefly_lr}): "
            f"calibration loss {start:.6g} at ε = {spec.eps} → {float(current.detach()):.6g}; ε now in "
            f"[{float(e.detach().min()):.3g}, {float(e.detach().max()):.3g}]" if k else "firefly: no candidates kept, nothing to optimise")
    return e.detach(), [note]


# --------------------------------------------------------------------------- the transform's part
def widen_firefly(gm, trace: Trace, groups: list[Group], spec, ctx, report) -> dict[int, int]:
    """Grow ``groups``' layers with the best Firefly candidates (in place, through ``gm.edits``).

    ``spec`` is a :class:`~growcli.transforms.widen.WidenSpec` with ``init="firefly"``; with
    ``spec.budget`` the candidates of all layers compete for that many units, otherwise each layer
    gets ``spec.target(size) − size``. Returns ``{old size: new size}`` of the layers grown. Refuses
    (:class:`NotGrowableError`) where the site rules (GradMax's) do not hold or the candidates run out.
    """
    layers, loss, cal = score(gm, trace, groups, spec, ctx)
    counts = None
    if spec.budget is None:
        counts = {}
        for ls in layers:
            new_size = spec.target(ls.site.size)
            if new_size <= ls.site.size:
                raise NotGrowableError(f"'{ls.site.layer}' has {ls.site.size} units; the new size {new_size} is not larger")
            counts[ls.site.layer] = new_size - ls.site.size
    select(layers, counts, spec.budget)
    k = sum(len(ls.keep_split) + len(ls.keep_new) for ls in layers)
    eps = torch.zeros(k, dtype=torch.float64)
    notes = []
    if spec.firefly_steps > 0 and k:
        eps, notes = optimise(gm.module, layers, spec, cal)
    write(gm, layers, eps, report)
    sizes = {}
    for ls in layers:
        kept = len(ls.keep_split) + len(ls.keep_new)
        gains = sorted([c.gain for c in ls.splits if c.index in ls.keep_split] +
                       [c.gain for c in ls.new if c.index in ls.keep_new], reverse=True)
        curv = "" if any(c.gain for c in ls.splits) else " (the activation has no curvature there, so no split lowers " \
                                                           "the loss to second order)"
        report.notes.append(
            f"firefly '{ls.site.layer}': kept {kept} ({len(ls.keep_new)} new, {len(ls.keep_split)} splits"
            f"{' of units ' + ', '.join(map(str, ls.keep_split)) if ls.keep_split else ''}) of {len(ls.new)} new and "
            f"{len(ls.splits)} split candidates"
            f"{curv}; predicted loss decrease at ε = {spec.eps}: {sum(gains):.3g} (best {gains[0] if gains else 0:.3g})")
        if kept:
            sizes[ls.site.size] = ls.site.size + kept
            report.matched.append(ls.site.layer)
    report.notes.insert(0, f"firefly: scored on {cal.describe()}, mean loss {loss:.6g}")
    if spec.firefly_steps == 0:
        report.notes.append("firefly: written at ε = 0 (new units' outgoing weights 0, splits as copies with half the "
                            "outgoing weights each): exact")
    report.notes.extend(notes)
    return sizes
