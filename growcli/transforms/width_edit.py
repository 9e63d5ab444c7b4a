"""The planned edit of a transformer-width step and how it is written into the model.

A width step (:mod:`growcli.transforms.heads`, :mod:`growcli.transforms.hidden`) plans, on the
trace of :func:`trace_width`, one :class:`DimMap` per grown dimension of each parameter,
collected in an :class:`Edit` with the ``eps`` fixes; :func:`apply_edit` rewrites every planned
tensor and records it through ``gm.edits``, unties tied weights that now differ and keeps module
attributes in step. :func:`check_shared` refuses a plan that misses a use of a weight it changes.

Copies are computed in float64 and stored in the tensor's dtype; the parts of a split (the tiles
of a reader, the output columns of a copied head) are built to sum to the original exactly in
that dtype. Every rewritten tensor is then checked against its float64 values, and the step's
report says whether it is exact in the dtype (``report.exact_in_dtype``), which sets the
verification tolerance (:func:`growcli.verification.compare.verify_models`).

Planning never reads a weight's value, so a step can also run on a meta-device model: inside
:func:`deferred_rewrites`, :func:`apply_edit` installs meta tensors of the new shapes and returns
one :class:`Rewrite` per tensor (its maps and the generator state it would have been computed
with); :func:`growcli.run.width_stream.apply_rewrite` later computes each from the tensor read
from disk, bit for bit what the in-memory path computes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from growcli.analysis.trace import METADATA_CHECKS, REINDEX, UNARY, VIEW, module_of, trace_model
from growcli.core.errors import NotGrowableError
from growcli.core.origins import AxisMap, Origin
from growcli.core.inputs import make_batches
from growcli.core.model import GrowModel
from growcli.transforms.registry import StepReport
from growcli.transforms.resize import sync_attributes
from growcli.transforms.splits import (BITS, along, gather, has_nan, identity_splits, negative_zeros, positive_zeros,
                                      put, share_out, split_columns)
from growcli.transforms.splits import map_positions as _positions


# --------------------------------------------------------------------------- how one dimension changes
@dataclass
class DimMap:
    """New positions along ``dim``: ``old[idx] · scale + shift``; positions with ``idx = -1`` are padded
    with the mean over the old positions (``pad="mean"``) or zero instead of ``old[idx]``.
    ``noise_tiles`` > 1 asks for paired ±noise on that many tiles of the old size. With ``split``
    the positions copying one old position are its parts (readers of a tiled vector, output
    columns of a copied head): they are built to sum to it exactly in the tensor's dtype
    (:func:`growcli.transforms.splits.split_columns`); otherwise they are copies."""

    dim: int
    idx: list[int]
    scale: list[float]
    pad: str = "zero"
    noise_tiles: int = 0
    shift: float = 0.0
    split: bool = False  # positions sharing an old index share it out (their scales sum to its total)


@dataclass
class Edit:
    """All planned changes of a step: parameter name → dimension maps, and ``eps`` fixes."""

    maps: dict[str, list[DimMap]] = field(default_factory=dict)
    eps: list = field(default_factory=list)
    planned_ops: dict[str, set] = field(default_factory=dict)  # trace parameter → modules whose use of it is planned

    def add(self, name: str, m: DimMap) -> None:
        """Plan ``m`` for parameter ``name``; a different plan for the same dimension is refused."""
        maps = self.maps.setdefault(name, [])
        same = [x for x in maps if x.dim == m.dim]
        if same and (same[0].idx, same[0].scale, same[0].shift) != (m.idx, m.scale, m.shift):
            raise NotGrowableError(f"parameter {name} would grow in two different ways along dim {m.dim} "
                                   "(is it shared between layers?)")
        if not same:
            maps.append(m)


def rewrite(old: torch.Tensor, maps: list[DimMap], noise: float,
             gen: torch.Generator) -> tuple[torch.Tensor, list[DimMap], str]:
    """Apply ``maps`` to ``old``, returning a tensor of ``old``'s dtype, the maps with the scales the
    positions actually got, and why the result is not exact in that dtype ("" when it is: every copy
    equals its float64 value and the parts of every split sum to it bit for bit)."""
    t = old.detach()
    done: list[DimMap] = []
    why = ""
    for m in sorted(maps, key=lambda m: m.dim):
        t, m, reason = _rewrite_dim(t, m, noise, gen)
        done.append(m)
        why = why or reason
    return t, done, why


def _ideal(t64: torch.Tensor, m: DimMap) -> torch.Tensor:
    """``m`` applied to ``t64`` in float64: the values the dtype should hold."""
    idx = torch.tensor(m.idx)
    new = t64.index_select(m.dim, idx.clamp(min=0))
    padded = along(new, m.dim, idx < 0).bool()
    if bool(padded.any()):
        fill = t64.mean(m.dim, keepdim=True) if m.pad == "mean" else torch.zeros_like(t64.narrow(m.dim, 0, 1))
        new = torch.where(padded, fill.expand_as(new), new)
    return new * along(new, m.dim, torch.tensor(m.scale, dtype=torch.float64)) + m.shift


def _rewrite_dim(t: torch.Tensor, m: DimMap, noise: float, gen: torch.Generator) -> tuple[torch.Tensor, DimMap, str]:
    """One dimension of :func:`rewrite`: the split positions (``m.split``) exact in ``t``'s dtype. Bit for bit
    :func:`_rewrite_dim_float64`, by position class: copies (scale 1, no shift) are ``index_select`` in the dtype
    (a float64 ``+ 0.0`` makes ``-0`` ``+0``: so does this), zero padding is one value, the rest is float64 on its
    own columns. Mean padding (a reduction) and paired noise (drawn on whole tiles) stay whole in float64."""
    idx, scale, src, counts, multi, total = _positions(t, m)
    if (not t.is_floating_point() or t.element_size() not in BITS or (m.noise_tiles > 1 and noise > 0)
            or (m.pad == "mean" and bool((idx < 0).any())) or (bool(multi.any()) and m.shift != 0)
            or has_nan(t)):  # a NaN: float64 writes the canonical one
        return _rewrite_dim_float64(t, m, noise, gen)
    new = gather(t.detach(), m.dim, idx)  # padded positions are set below
    if (negative_zero := negative_zeros(t)) and math.copysign(1.0, m.shift) > 0:
        positive_zeros(new)
    if not negative_zero and bool(multi.any()):
        multi = multi & ~identity_splits(t, idx, scale, counts, multi)  # parts = copies
    single, split = "", ""
    pads = torch.nonzero(idx < 0).flatten()
    if len(pads):  # a zero-padded position holds 0·scale + shift all along: one value, computed once
        fill64 = torch.zeros(len(pads), dtype=torch.float64) * scale[pads] + m.shift
        fill, block = fill64.to(t.dtype), new.narrow(m.dim, 0, len(pads))
        put(new, m.dim, pads, along(block, m.dim, fill).expand_as(block))
        single = "" if torch.equal(fill.to(torch.float64), fill64) else "rounded"
    computed = torch.nonzero(~multi & (idx >= 0) & ((scale != 1.0) | torch.tensor(m.shift != 0))).flatten()
    if len(computed):
        part64 = t.index_select(m.dim, src[computed]).to(torch.float64)
        part64 = part64 * along(part64, m.dim, scale[computed]) + m.shift
        put(new, m.dim, computed, part := part64.to(t.dtype))
        single = single or ("" if torch.equal(part.to(torch.float64), part64) else "rounded")
    where = torch.nonzero(multi).flatten()
    if len(where):  # each old position's total shared out among its copies exactly in the dtype
        parts, got, exact = share_out(t, m.dim, src[where], scale[where], total)
        put(new, m.dim, where, parts)
        m = dataclasses.replace(m, scale=scale.index_copy(0, where, got).tolist())
        split = "" if exact else "split of a rescaled total"
    if single:
        odd = sorted({s for s in m.scale if s != 1.0 and math.frexp(s)[0] != 0.5})
        return new, m, f"scaled by {odd[0]:.6g}" if odd else "rounded"
    return new, m, split


def _rewrite_dim_float64(t: torch.Tensor, m: DimMap, noise: float, gen: torch.Generator
                         ) -> tuple[torch.Tensor, DimMap, str]:
    """:func:`_rewrite_dim` on the whole tensor in float64 (the reference the fast path equals)."""
    t64 = t.to(torch.float64)
    new64 = _ideal(t64, m)
    idx, scale, src, counts, multi, total = _positions(t, m)
    new = new64.to(t.dtype)
    if bool(multi.any()) and t.is_floating_point() and m.shift == 0:
        # Each old position's total (its copies' scales sum to it; 1 unless a constant is absorbed),
        # shared out among its copies exactly in the dtype.
        base = (t64 * along(t64, m.dim, torch.where(counts > 1, total, 1.0))).to(t.dtype)
        parts, got = split_columns(base, m.dim, src, scale / total[src], multi)
        new = torch.where(along(new, m.dim, multi).bool(), parts, new)
        scale = torch.where(multi, got * total[src], scale)
        m = dataclasses.replace(m, scale=scale.tolist())
    if m.noise_tiles > 1 and noise > 0:
        new = _paired_noise(new.to(torch.float64), m, t64.std().item() * noise, gen).to(t.dtype)
    return new, m, _inexact(new, new64, t64, m, multi, total, noise)


def _inexact(new: torch.Tensor, new64: torch.Tensor, t64: torch.Tensor, m: DimMap, multi: torch.Tensor,
             total: torch.Tensor, noise: float) -> str:
    """Why ``new`` is not ``m`` applied to ``t64`` exactly ("" when it is): copies must equal their float64
    value, the parts of each split position must sum (in float64) to the old value times its total."""
    got = new.to(torch.float64)
    single = along(got, m.dim, ~multi).bool().expand_as(got)
    if not torch.equal(got[single], new64[single]):
        idx = torch.tensor(m.idx)
        if bool((idx < 0).any()) and m.pad == "mean":
            return "mean padding rounded"
        odd = sorted({s for s in m.scale if s != 1.0 and math.frexp(s)[0] != 0.5})
        return f"scaled by {odd[0]:.6g}" if odd else "rounded"
    if bool(multi.any()):
        src = torch.tensor(m.idx).clamp(min=0)
        sums = torch.zeros_like(t64).index_add_(m.dim, src[multi], got.index_select(m.dim, torch.nonzero(multi).flatten()))
        hit = torch.unique(src[multi])
        want = (t64 * along(t64, m.dim, total)).index_select(m.dim, hit)
        if not torch.equal(sums.index_select(m.dim, hit), want):
            return "paired ±noise" if m.noise_tiles > 1 and noise > 0 else "split of a rescaled total"
    return ""


def map_origin(maps: list[DimMap]) -> Origin:
    """The origin of a tensor rewritten by ``maps``: padded positions are fresh, shifts and noise ignored."""
    return Origin(tuple(AxisMap(m.dim, tuple(m.idx), tuple(float(x) for x in m.scale))
                              for m in sorted(maps, key=lambda m: m.dim)))


def _paired_noise(t: torch.Tensor, m: DimMap, std: float, gen: torch.Generator) -> torch.Tensor:
    """+N on tile 2i, −N on tile 2i+1: their sum, hence the function, is unchanged (HyperCloning)."""
    size = sum(1 for i in m.idx if i >= 0) // m.noise_tiles
    t = t.clone()
    for i in range(0, m.noise_tiles - 1, 2):
        a = t.narrow(m.dim, i * size, size)
        b = t.narrow(m.dim, (i + 1) * size, size)
        n = torch.randn(a.shape, generator=gen, dtype=torch.float64) * std
        a += n
        b -= n
    return t


# --------------------------------------------------------------------------- deferred application
@dataclass
class Rewrite:
    """One planned tensor whose values are computed later (streaming):
    :func:`growcli.run.width_stream.apply_rewrite` gives exactly what :func:`apply_edit` would have
    stored, ``state`` being its generator's state then."""

    name: str
    maps: list[DimMap]
    noise: float
    state: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    before: tuple[int, ...]
    fn: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, str]] | None = None  # instead of ``maps``
    slices: tuple[int, ...] = ()  # with ``fn``: dimensions along which ``fn`` of a slice is that slice of ``fn``
    rows: tuple[int, ...] | None = None  # the result is, bit for bit, the tensor's rows at these indices (dim 0)


_DEFERRED: contextvars.ContextVar[list[Rewrite] | None] = contextvars.ContextVar("growcli_deferred", default=None)


def deferring() -> list[Rewrite] | None:
    """The list planned rewrites go to inside :func:`deferred_rewrites`, else None (compute now)."""
    return _DEFERRED.get()


@contextlib.contextmanager
def deferred_rewrites() -> Iterator[list[Rewrite]]:
    """Within the block, :func:`apply_edit` plans instead of computing: every planned tensor becomes a
    meta tensor of its new shape (so config and attributes follow as usual) and a :class:`Rewrite`
    appended to the yielded list, in the order the in-memory path computes them."""
    jobs: list[Rewrite] = []
    token = _DEFERRED.set(jobs)
    try:
        yield jobs
    finally:
        _DEFERRED.reset(token)


def planned_shape(shape, maps: list[DimMap]) -> tuple[int, ...]:
    """The shape of a tensor of ``shape`` rewritten by ``maps``."""
    out = list(shape)
    for m in maps:
        out[m.dim] = len(m.idx)
    return tuple(out)


def _skip_noise(shape, maps: list[DimMap], noise: float, gen: torch.Generator) -> None:
    """Advance ``gen`` exactly as :func:`rewrite` would (the same draws, in the same order and shapes)."""
    t = list(shape)
    for m in sorted(maps, key=lambda m: m.dim):
        t[m.dim] = len(m.idx)
        if m.noise_tiles > 1 and noise > 0:
            tile = list(t)
            tile[m.dim] = sum(1 for i in m.idx if i >= 0) // m.noise_tiles
            for _ in range(0, m.noise_tiles - 1, 2):
                torch.randn(tile, generator=gen, dtype=torch.float64)


def _same_maps(a: list[DimMap], b: list[DimMap], noise: float) -> bool:
    """Whether ``a`` and ``b`` rewrite one tensor into equal tensors whatever its values: the same
    positions, scales and shifts; padding and splitting compared only where they act. Paired noise
    is drawn afresh for every tensor, so tensors that get it never come out equal."""
    if noise > 0 and any(m.noise_tiles > 1 for m in [*a, *b]):
        return False

    def key(m: DimMap) -> tuple:
        pads = -1 in m.idx
        kept = [i for i in m.idx if i >= 0]
        repeats = len(set(kept)) < len(kept)
        return (m.dim, tuple(m.idx), tuple(m.scale), m.shift, m.pad if pads else None, m.split and repeats,
                m.noise_tiles if noise > 0 and m.noise_tiles > 1 else 0)
    return sorted(map(key, a)) == sorted(map(key, b))


# --------------------------------------------------------------------------- applying
def apply_edit(gm: GrowModel, edit: Edit, noise: float, gen: torch.Generator, report: StepReport) -> None:
    """Write every planned tensor through ``gm.edits``; unties tied weights that now differ."""
    root = gm.module
    named = dict(root.named_parameters(remove_duplicate=False))
    named.update(dict(root.named_buffers(remove_duplicate=False)))
    by_tensor: dict[int, list[str]] = {}
    for name, t in named.items():
        by_tensor.setdefault(id(t), []).append(name)
    new_tensors: dict[str, torch.Tensor] = {}
    done: dict[str, list[DimMap]] = {}
    rounded: dict[str, str] = {}
    jobs = _DEFERRED.get()
    for name, maps in edit.maps.items():
        if jobs is None:
            new_tensors[name], done[name], why = rewrite(named[name], maps, noise, gen)
            if why:
                rounded[name] = why
        else:  # planning a stream: shapes now, values later (the generator's state kept for each tensor)
            job = Rewrite(name, maps, noise, gen.get_state(), planned_shape(named[name].shape, maps), named[name].dtype,
                          tuple(named[name].shape))
            _skip_noise(named[name].shape, maps, noise, gen)
            jobs.append(job)
            new_tensors[name], done[name] = torch.empty(job.shape, dtype=job.dtype, device="meta"), maps
    if jobs is None:
        note_rounding(report, rounded, named[min(rounded)].dtype if rounded else torch.float64)
    untied, still_tied = set(), set()
    for name in new_tensors:
        siblings = tuple(sorted(by_tensor[id(named[name])]))
        if len(siblings) > 1:
            missing = [s for s in siblings if s not in new_tensors]
            if missing:
                raise NotGrowableError(f"parameter {name} is shared with {missing[0]}, which the growth does not reach")
            if jobs is None:
                equal = all(torch.equal(new_tensors[s], new_tensors[name]) for s in siblings)
            else:  # no values yet: the same maps of the same tensor give the same result
                equal = all(_same_maps(edit.maps[s], edit.maps[name], noise) for s in siblings)
            (still_tied if equal else untied).add(siblings)
    for name, new in new_tensors.items():
        old = named[name]
        gm.edits.param(root, name, new, map_origin(done[name]))
        report.changes.append({"name": name, "before": list(old.shape), "after": list(new.shape)})
    for group in still_tied:
        # Each name got an equal tensor (that is what replay records); share one Parameter again, as before.
        first = root.get_parameter(group[0])
        for other in group[1:]:
            owner, _, leaf = other.rpartition(".")
            root.get_submodule(owner)._parameters[leaf] = first
    for group in sorted(set(untied)):
        report.notes.append(f"untied {' and '.join(group)}: the embedding keeps its tiles, the output projection "
                            "divides them (tied weights cannot do both)")
    for fix in edit.eps:
        gm.edits.attr(root, fix.module, fix.attr, fix.new)
    for module in sorted({n.rpartition(".")[0] for n in new_tensors}):
        sync_attributes(gm, module)
        _sync_norm(gm, module)
    if untied:
        config = getattr(root, "config", None)
        if gm.is_hf and config is not None and getattr(config, "tie_word_embeddings", False):
            gm.edits.config(root, "tie_word_embeddings", False)
            report.notes.append("config tie_word_embeddings: True → False")


def note_rounding(report: StepReport, rounded: dict[str, str], dtype: torch.dtype) -> None:
    """Say on ``report`` whether the step is exact in the weights' dtype (``report.exact_in_dtype``, which
    verification reads to choose its tolerance) and, if not, which tensors were rounded and why."""
    exact = not rounded and getattr(report, "exact_in_dtype", None) is not False
    report.exact_in_dtype = exact
    if rounded:
        reasons = sorted(set(rounded.values()))
        names = sorted(rounded)
        report.notes.append(f"not exact in {str(dtype).removeprefix('torch.')}: {len(names)} tensors rounded "
                            f"({'; '.join(reasons)}; e.g. {', '.join(names[:2])}): verified at that dtype's rounding")


def _sync_norm(gm: GrowModel, name: str) -> None:
    """torch.nn LayerNorm/RMSNorm keep ``normalized_shape`` equal to their (grown) weight."""
    m = gm.module.get_submodule(name) if name else gm.module
    norm_types = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    if isinstance(m, norm_types) and m.weight is not None and tuple(m.normalized_shape) != tuple(m.weight.shape):
        gm.edits.attr(gm.module, name, "normalized_shape", tuple(m.weight.shape))


def check_shared(gm: GrowModel, trace, edit: Edit) -> None:
    """Refuse when a planned parameter is also used by an op the plan did not cover (weights shared elsewhere)."""
    users = trace.weight_users()
    for fqn, modules in edit.planned_ops.items():
        for u in users.get(fqn, []):
            if u.op == "call_function" and module_of(u) not in modules and not _is_view_of_param(u):
                raise NotGrowableError(f"parameter {fqn} is also used in '{module_of(u)}', which the growth does "
                                       "not reach (a weight shared across layers)")


def _is_view_of_param(node) -> bool:
    return node.target in REINDEX or node.target in VIEW or node.target in UNARY or node.target in METADATA_CHECKS


def trace_width(gm: GrowModel):
    """The trace a width step plans on; refuses ``.pt2`` programs, whose reshapes hard-code the sizes."""
    if getattr(gm, "kind", None) == "pt2":
        raise NotGrowableError("growing heads or the hidden size of a .pt2 program is not supported (its reshapes "
                               "hard-code the sizes); grow the Hugging Face directory or the state_dict instead")
    device = next((p.device for p in gm.module.parameters()), torch.device("cpu"))  # meta when planning a stream
    args, kwargs = make_batches(gm.inputs, 1)[0]
    return trace_model(gm.module, (tuple(a.to(device) for a in args), {k: v.to(device) for k, v in kwargs.items()}))
