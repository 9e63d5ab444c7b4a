"""Transformer width: more attention heads and a larger hidden size, keeping the function exact.

Recipes: GROWTH.md section 6 (bert2BERT, LEMON, HyperCloning). The FFN intermediate size is
plain Net2WiderNet (``widen`` on the up projection; gated MLPs couple the gate projection).

- ``heads``: whole heads are added, keeping ``head_dim``. A new head copies the q, k and v rows
  of a source head; the output projection's columns of a source and its copies split the
  source's columns (shares summing to 1). With grouped-query attention key/value heads grow
  by the same factor, each new one bringing copies of its source's query heads, so every
  query head keeps its key/value head; multi-query attention keeps its single one.
- ``hidden``: the hidden size grows from ``d`` to ``d' = k·d + r``; every hidden vector
  becomes ``[x, …, x, p]`` (see :mod:`growcli.stream` for the analysis and the padding rules).
  Where the model's config ties the attention width to the hidden size (BERT, GPT-2, ViT:
  ``heads × head_dim = hidden_size``), heads grow with it.

Where a Hugging Face config describes the model, it is updated (``hidden_size``,
``num_attention_heads``, ``num_key_value_heads``, norm ``eps``, and sizes the model derives,
like GPT-2's ``n_inner``), and the size attributes of every module are set to what a model
built from the new config has, so the in-memory model, the saved directory and
``from_pretrained`` agree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from growcli.attention import AttentionSite, attention_sites
from growcli.errors import NotGrowableError, UsageError
from growcli.graph import METADATA_CHECKS, REINDEX, UNARY, VIEW, trace_model
from growcli.hfconfig import config_error, sync_config, with_config
from growcli.inputs import make_batches
from growcli.model import GrowModel
from growcli.stream import MEAN, PRODUCERS, StreamAnalysis, StreamPlan, _weight_of, plan_stream, stream_start
from growcli.transforms.registry import Context, StepReport, register
from growcli.transforms.widen import split_factors, sync_attributes


@dataclass(frozen=True)
class HeadsSpec:
    """Grow every attention to ``to`` query heads, by ``by`` heads, or by ``factor``."""

    to: int | None = None
    by: int | None = None
    factor: float | None = None
    split: Literal["asymmetric", "uniform"] = "asymmetric"

    def __post_init__(self):
        _one_size(self, ("to", "by", "factor"))

    def target(self, heads: int) -> int:
        if self.to is not None:
            return self.to
        if self.by is not None:
            return heads + self.by
        return int(round(heads * self.factor))


@dataclass(frozen=True)
class HiddenSpec:
    """Grow the hidden size to ``to`` or by ``factor``; ``heads`` sets the new number of query heads.

    ``noise`` (relative to each weight's std) adds ``+N``/``−N`` to paired tiles of the
    matrices that read the hidden states: exact, and the tiles train apart. ``start`` names the
    module that writes the residual stream first (default: the first embedding).
    """

    to: int | None = None
    factor: float | None = None
    heads: int | None = None
    noise: float = 0.0
    split: Literal["asymmetric", "uniform"] = "asymmetric"
    start: str | None = None

    def __post_init__(self):
        _one_size(self, ("to", "factor"))
        if self.noise < 0:
            raise UsageError(f"noise must be non-negative, got {self.noise}")
        if self.heads is not None and self.heads < 1:
            raise UsageError(f"heads must be a positive integer, got {self.heads}")

    def target(self, size: int) -> int:
        return self.to if self.to is not None else int(round(size * self.factor))


def _one_size(spec, keys: tuple[str, ...]) -> None:
    given = [k for k in keys if getattr(spec, k) is not None]
    if len(given) != 1:
        raise UsageError(f"give exactly one of {', '.join(keys)}" + (f" (got {', '.join(given)})" if given else ""))
    value = getattr(spec, given[0])
    if given[0] == "factor" and value <= 1:
        raise UsageError(f"factor must be greater than 1, got {value}")
    if given[0] != "factor" and (not isinstance(value, int) or value < 1):
        raise UsageError(f"{given[0]} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- how one dimension changes
@dataclass
class DimMap:
    """New positions along ``dim``: ``old[idx] · scale + shift``; positions with ``idx = -1`` are padded
    with the mean over the old positions (``pad="mean"``) or zero instead of ``old[idx]``.
    ``noise_tiles`` > 1 asks for paired ±noise on that many tiles of the old size."""

    dim: int
    idx: list[int]
    scale: list[float]
    pad: str = "zero"
    noise_tiles: int = 0
    shift: float = 0.0


@dataclass
class _Edit:
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


# --------------------------------------------------------------------------- heads
def _head_maps(site: AttentionSite, new_heads: int, split: str, gen: torch.Generator) -> tuple[dict, int]:
    """One attention grown to ``new_heads``: ``{(weight, dim, offset): (idx, scale, size, bias)}`` — the old
    feature of every new feature of each projection part, its scale (output columns: the copies' shares) —
    and the new number of key/value heads. Refuses sizes grouped-query attention cannot take."""
    h, kv, hd = site.heads, site.kv_heads, site.head_dim
    if new_heads <= h:
        raise NotGrowableError(f"attention in '{site.module}' has {h} heads; the new number {new_heads} is not larger")
    if kv == 1 and h > 1:  # multi-query: every new query head shares the one key/value head
        new_kv, g_kv = 1, [0]
        g_q = list(range(h)) + torch.randint(0, h, (new_heads - h,), generator=gen).tolist()
    else:
        group = h // kv
        if new_heads % group:
            raise NotGrowableError(f"attention in '{site.module}' is grouped-query with {group} query heads per key/value "
                                   f"head; the new number of heads must be a multiple of {group}, got {new_heads}")
        new_kv = new_heads // group
        g_kv = list(range(kv)) + torch.randint(0, kv, (new_kv - kv,), generator=gen).tolist()
        # Query head j·G + i uses key/value head j (Hugging Face's repeat_kv): copies come in whole groups.
        g_q = [g_kv[j] * group + i for j in range(new_kv) for i in range(group)]
    shares = split_factors(g_q, h, split, "net2net", gen).tolist()

    def rows(offset: int, g: list[int]) -> list[int]:
        return [offset + src * hd + t for src in g for t in range(hd)]

    out = {}
    for p, g in ((site.q, g_q), (site.k, g_kv), (site.v, g_kv)):
        out[(p.weight, p.dim, p.offset)] = (rows(p.offset, g), [1.0] * (len(g) * hd), p.size, p.bias)
    o = site.o
    out[(o.weight, o.dim, o.offset)] = (rows(o.offset, g_q), [s for s in shares for _ in range(hd)], o.size, None)
    return out, new_kv


def _plan_heads(edit: _Edit, sites: list[AttentionSite], new_heads: int, split: str, gen: torch.Generator,
                shapes: dict[str, tuple[int, ...]]) -> int:
    """Add the head maps of every attention to ``edit``; returns the new number of key/value heads."""
    segments: dict[tuple[str, int], list] = {}
    new_kv = None
    for site in sites:
        maps, kv = _head_maps(site, new_heads, split, gen)
        new_kv = kv
        for (weight, dim, offset), (idx, scale, size, bias) in maps.items():
            segments.setdefault((weight, dim), []).append((offset, size, idx, scale))
            if bias is not None:
                segments.setdefault((bias, 0), []).append((offset, size, idx, [1.0] * len(idx)))
        for p in (site.q, site.k, site.v, site.o):
            edit.planned_ops.setdefault(p.weight, set()).add(p.module)
            if p.bias:
                edit.planned_ops.setdefault(p.bias, set()).add(p.module)
    for (name, dim), parts in segments.items():
        parts = sorted({p[0]: p for p in parts}.values())  # a fused qkv weight: its three parts in order
        idx: list[int] = []
        scale: list[float] = []
        pos = 0
        for offset, size, i, s in parts:
            if offset != pos:
                raise NotGrowableError(f"parameter {name}: features {pos}..{offset} along dim {dim} belong to no attention head")
            idx += i
            scale += s
            pos = offset + size
        if pos != shapes[name][dim]:
            raise NotGrowableError(f"parameter {name}: features {pos}..{shapes[name][dim]} along dim {dim} belong to no head")
        edit.add(name, DimMap(dim, idx, scale))
    return new_kv


# --------------------------------------------------------------------------- hidden size
PAD_OF_KIND = {"consumer": "zero", "scale": "mean", "norm_weight": "mean", "norm_bias": "zero"}


def _plan_stream(edit: _Edit, plan: StreamPlan, noise: float) -> None:
    """Add the tiling maps of every parameter in ``plan`` to ``edit`` (see :class:`growcli.stream.ParamPlan`)."""
    d, k, r = plan.size, plan.k, plan.r
    idx = list(range(d)) * k + [-1] * r
    stream_pad = "mean" if plan.pad == MEAN else "zero"
    for p in plan.params:
        scale = p.factor / k if p.kind == "consumer" else p.factor
        pad = PAD_OF_KIND.get(p.kind, stream_pad)
        tiles = k if p.kind == "consumer" and noise > 0 else 0
        edit.add(p.name, DimMap(p.dim, idx, [scale] * len(idx), pad, tiles, p.shift))
    for fqn, ops in plan.handled.items():
        edit.planned_ops.setdefault(fqn, set()).update(_module_name(n) for n in ops)
    edit.eps += plan.eps


def _module_name(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _rewrite(old: torch.Tensor, maps: list[DimMap], noise: float, gen: torch.Generator) -> torch.Tensor:
    """Apply ``maps`` to ``old`` (in float64), returning a tensor of ``old``'s dtype."""
    t = old.detach().to(torch.float64)
    for m in sorted(maps, key=lambda m: m.dim):
        idx = torch.tensor(m.idx)
        new = t.index_select(m.dim, idx.clamp(min=0))
        view = [1] * t.dim()
        view[m.dim] = -1
        padded = (idx < 0).view(view)
        if bool(padded.any()):
            fill = t.mean(m.dim, keepdim=True) if m.pad == "mean" else torch.zeros_like(t.narrow(m.dim, 0, 1))
            new = torch.where(padded, fill.expand_as(new), new)
        new = new * torch.tensor(m.scale, dtype=torch.float64).view(view) + m.shift
        if m.noise_tiles > 1 and noise > 0:
            new = _paired_noise(new, m, t.std().item() * noise, gen)
        t = new
    return t.to(old.dtype)


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


# --------------------------------------------------------------------------- applying
def _apply(gm: GrowModel, edit: _Edit, noise: float, gen: torch.Generator, report: StepReport) -> None:
    """Write every planned tensor through ``gm.edits``; unties tied weights that now differ."""
    root = gm.module
    named = dict(root.named_parameters(remove_duplicate=False))
    named.update(dict(root.named_buffers(remove_duplicate=False)))
    by_tensor: dict[int, list[str]] = {}
    for name, t in named.items():
        by_tensor.setdefault(id(t), []).append(name)
    new_tensors: dict[str, torch.Tensor] = {}
    for name, maps in edit.maps.items():
        old = named[name]
        new_tensors[name] = _rewrite(old, maps, noise, gen)
    untied, still_tied = set(), set()
    for name in new_tensors:
        siblings = tuple(sorted(by_tensor[id(named[name])]))
        if len(siblings) > 1:
            missing = [s for s in siblings if s not in new_tensors]
            if missing:
                raise NotGrowableError(f"parameter {name} is shared with {missing[0]}, which the growth does not reach")
            equal = all(torch.equal(new_tensors[s], new_tensors[name]) for s in siblings)
            (still_tied if equal else untied).add(siblings)
    for name, new in new_tensors.items():
        old = named[name]
        gm.edits.param(root, name, new)
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


def _sync_norm(gm: GrowModel, name: str) -> None:
    """torch.nn LayerNorm/RMSNorm keep ``normalized_shape`` equal to their (grown) weight."""
    m = gm.module.get_submodule(name) if name else gm.module
    norm_types = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    if isinstance(m, norm_types) and m.weight is not None and tuple(m.normalized_shape) != tuple(m.weight.shape):
        gm.edits.attr(gm.module, name, "normalized_shape", tuple(m.weight.shape))


def _check_shared(gm: GrowModel, trace, edit: _Edit) -> None:
    """Refuse when a planned parameter is also used by an op the plan did not cover (weights shared elsewhere)."""
    users = trace.weight_users()
    for fqn, modules in edit.planned_ops.items():
        for u in users.get(fqn, []):
            if u.op == "call_function" and _module_name(u) not in modules and not _is_view_of_param(u):
                raise NotGrowableError(f"parameter {fqn} is also used in '{_module_name(u)}', which the growth does "
                                       "not reach (a weight shared across layers)")


def _is_view_of_param(node) -> bool:
    return node.target in REINDEX or node.target in VIEW or node.target in UNARY or node.target in METADATA_CHECKS


def _probe_heads(gm: GrowModel, site: AttentionSite, updates: dict[str, int],
                 validate: bool = False) -> tuple[int | None, str]:
    """The number of query features a model built from ``config + updates`` gives ``site``'s query projection,
    or None and the reason the config rejects these sizes."""
    try:
        shapes = {k: tuple(v.shape) for k, v in with_config(gm, updates, validate).state_dict().items()}
    except Exception as exc:  # the config rejects these sizes (say, hidden_size not divisible by the heads)
        return None, config_error(exc)
    shape = shapes.get(site.q.weight)
    if shape is None:
        return None, f"a model built from the config has no {site.q.weight}"
    total = shape[site.q.dim]
    fused = site.q.weight == site.k.weight  # q, k, v in one weight: its query part is a third (MHA)
    return (total // 3 if fused and site.kv_heads == site.heads else total), ""


# --------------------------------------------------------------------------- the transforms
def _trace(gm: GrowModel):
    if getattr(gm, "kind", None) == "pt2":
        raise NotGrowableError("growing heads or the hidden size of a .pt2 program is not supported (its reshapes "
                               "hard-code the sizes); grow the Hugging Face directory or the state_dict instead")
    return trace_model(gm.module, make_batches(gm.inputs, 1)[0])


def _uniform(sites: list[AttentionSite]) -> tuple[int, int, int]:
    kinds = {(s.heads, s.kv_heads, s.head_dim) for s in sites}
    if len(kinds) != 1:
        raise NotGrowableError(f"the attentions differ in heads (heads, kv heads, head_dim: {sorted(kinds)}); "
                               "growcli grows models whose attentions all have the same shape")
    return kinds.pop()


def heads_candidates(gm: GrowModel) -> dict[str, str | None]:
    """Every attention module → None if its heads can grow, else the reason."""
    try:
        sites = attention_sites(_trace(gm))
        h, kv, hd = _uniform(sites)
    except NotGrowableError as exc:
        return {"attention": str(exc)}
    reason = None
    if gm.is_hf and getattr(gm.module, "config", None) is not None:
        group = h // kv if 1 < kv < h else 1  # grouped-query attention grows in whole groups
        reason = ("the config derives head_dim from hidden_size / num_attention_heads, so heads grow only with "
                  "the hidden size (widen --hidden)")
        for new_h in range(h + group, 4 * h + 1, group):
            got, why = _probe_heads(gm, sites[0], {"num_attention_heads": new_h,
                                                   "num_key_value_heads": 1 if kv == 1 else new_h // group}, True)
            if got == new_h * hd:
                reason = None
                break
            reason = why or reason
    return {s.module: reason for s in sites}


@register("heads", HeadsSpec, exact=True, help="add whole attention heads (q, k, v copied; output columns split)",
          candidates=heads_candidates)
def grow_heads(gm: GrowModel, spec: HeadsSpec, ctx: Context) -> StepReport:
    """Grow every attention to ``spec.target(heads)`` query heads, keeping ``head_dim``."""
    report = StepReport("heads", dataclasses.asdict(spec), params_before=gm.num_parameters())
    trace = _trace(gm)
    sites = attention_sites(trace)
    h, kv, hd = _uniform(sites)
    new_heads = spec.target(h)
    edit = _Edit()
    shapes = {k: tuple(v.shape) for k, v in gm.module.state_dict().items()}
    new_kv = _plan_heads(edit, sites, new_heads, spec.split, ctx.generator(salt=61), shapes)
    if gm.is_hf and getattr(gm.module, "config", None) is not None:
        got, why = _probe_heads(gm, sites[0], {"num_attention_heads": new_heads, "num_key_value_heads": new_kv})
        if got is None:
            raise NotGrowableError(f"a model with {new_heads} attention heads cannot be built from the config: {why}")
        if got != new_heads * hd:
            raise NotGrowableError(f"{type(gm.module).__name__}'s config derives head_dim from hidden_size / "
                                   f"num_attention_heads, so {new_heads} heads of {hd} cannot be described; grow the "
                                   f"hidden size with them (widen --hidden {new_heads * hd} --heads {new_heads})")
    _check_shared(gm, trace, edit)
    _apply(gm, edit, 0.0, ctx.generator(salt=62), report)
    updates = {"num_attention_heads": new_heads, "num_key_value_heads": new_kv}
    sync_config(gm, updates, _size_map(h, kv, hd, new_heads, new_kv), {hd: "head_dim"}, [], report.notes)
    report.matched = [s.module for s in sites]
    report.notes.insert(0, f"{sites[0].kind} attention: heads {h} → {new_heads}, key/value heads {kv} → {new_kv}, "
                           f"head_dim {hd}")
    report.params_after = gm.num_parameters()
    return report


def _size_map(h: int, kv: int, hd: int, new_h: int, new_kv: int) -> dict[int, set[int]]:
    """Old size values → the new values an attribute holding them may take (several sizes can coincide)."""
    sizes: dict[int, set[int]] = {}
    for old, new in ((h, new_h), (kv, new_kv), (h * hd, new_h * hd), (kv * hd, new_kv * hd), (h // kv, new_h // new_kv)):
        sizes.setdefault(old, set()).add(new)
    return sizes


def hidden_candidates(gm: GrowModel) -> dict[str, str | None]:
    """The module starting the residual stream → None if the hidden size can grow (×2), else the reason."""
    try:
        trace = _trace(gm)
        start = stream_start(trace)
    except NotGrowableError as exc:
        return {"hidden size": str(exc)}
    name = _module_name(start)
    try:
        plan_stream(gm.module, trace, start, 2 * _stream_size(trace, start))
        return {name: None}
    except NotGrowableError as exc:
        return {name: str(exc)}


@register("hidden", HiddenSpec, exact=True, help="grow the hidden size (tiling; LayerNorm/RMSNorm padding recipes)",
          candidates=hidden_candidates)
def grow_hidden(gm: GrowModel, spec: HiddenSpec, ctx: Context) -> StepReport:
    """Grow the hidden size of a transformer exactly, with every tensor that carries it."""
    report = StepReport("hidden", dataclasses.asdict(spec), params_before=gm.num_parameters())
    trace = _trace(gm)
    start = stream_start(trace, spec.start)
    d = _stream_size(trace, start)
    new_d = spec.target(d)
    plan = plan_stream(gm.module, trace, start, new_d)
    edit = _Edit()
    sites = attention_sites(trace, required=False)
    updates: dict[str, int] = {"hidden_size": new_d}
    sizes: dict[int, set[int]] = {d: {new_d}}
    protected: dict[int, str] = {}
    if sites:
        h, kv, hd = _uniform(sites)
        new_h = _heads_for_hidden(gm, sites[0], spec.heads, h, kv, hd, d, new_d)
        if new_h != h:
            shapes = {k: tuple(v.shape) for k, v in gm.module.state_dict().items()}
            new_kv = _plan_heads(edit, sites, new_h, spec.split, ctx.generator(salt=71), shapes)
            updates.update({"num_attention_heads": new_h, "num_key_value_heads": new_kv})
            for old, new in _size_map(h, kv, hd, new_h, new_kv).items():
                sizes.setdefault(old, set()).update(new)
            report.notes.append(f"heads {h} → {new_h} (head_dim {hd} kept)")
        protected[hd] = "head_dim"
    constants = _hidden_constants(gm, plan, updates)
    _plan_stream(edit, plan, spec.noise)
    _extra_groups(gm, trace, edit, plan, updates, spec.noise)
    _check_shared(gm, trace, edit)
    _apply(gm, edit, spec.noise, ctx.generator(salt=72), report)
    for module, attr, old, new, buffer in constants:
        gm.edits.attr(gm.module, module, attr, new)
        gm.edits.param(gm.module, buffer, torch.full_like(gm.module.get_buffer(buffer), new))
        report.notes.append(f"{module}.{attr}: {old:.6g} → {new:.6g} (set by the new config); the layers writing what it "
                            f"scales are multiplied by {old / new:.6g}")
    sync_config(gm, updates, sizes, protected, plan.eps, report.notes)
    report.matched = [f"{d} → {new_d} (the residual stream from '{_module_name(start)}')"]
    k, r = plan.k, plan.r
    how = f"tiled ×{k}" + (f" + {r} padded ({'mean' if plan.pad == MEAN else 'zero'} padding, eps × {k * d / new_d:.6g}, "
                           f"γ × {math.sqrt(k * d / new_d):.6g})" if r else "")
    report.notes.insert(0, f"{how}; {len(plan.producers)} writers, {len(plan.consumers)} readers, "
                           f"{len(set(plan.norms))} norms")
    if spec.noise > 0:
        report.notes.append(f"paired ±noise {spec.noise} on the tiles of every reader: exact, breaks the symmetry")
    report.params_after = gm.num_parameters()
    return report


def _hidden_constants(gm: GrowModel, plan: StreamPlan, updates: dict[str, int]) -> list[tuple]:
    """Scalar buffers multiplying the hidden states whose value the new config changes (√hidden_size
    embedding scales): the writers of what they scale absorb the change. Returns the attribute and buffer
    updates ``(module, attr, old, new, buffer)``; refuses when no writer can absorb it."""
    if not plan.constants or not gm.is_hf or getattr(gm.module, "config", None) is None:
        return []
    fresh = dict(with_config(gm, updates).named_modules())
    out = []
    for c in plan.constants:
        owner = c.buffer.rpartition(".")[0]
        mine, theirs = gm.module.get_submodule(owner), fresh.get(owner)
        changed = [(k, getattr(theirs, k)) for k, v in vars(mine).items()
                   if isinstance(v, float) and math.isclose(v, c.value, rel_tol=1e-6)
                   and isinstance(getattr(theirs, k, None), float) and not math.isclose(getattr(theirs, k), v)]
        if not changed:
            continue  # it does not depend on the config
        attr, new = changed[0]
        if not c.producers:
            raise NotGrowableError(f"'{c.module}' multiplies the hidden states by {c.buffer} = {c.value:.6g}, which the new "
                                   f"config makes {new:.6g}, and no layer writing them directly can absorb the change")
        for p in plan.params:
            if (p.name, p.fqn) in c.producers:
                p.factor *= c.value / new
        out.append((owner, attr, c.value, new, c.buffer))
    return out


def _stream_size(trace, start) -> int:
    return StreamAnalysis(trace, start).run().size


def _heads_for_hidden(gm: GrowModel, site: AttentionSite, want: int | None, h: int, kv: int, hd: int, d: int,
                      new_d: int) -> int:
    """The number of query heads after growing the hidden size: ``want``, else what the config allows.

    Models whose config derives ``head_dim = hidden_size / num_attention_heads`` need
    ``heads = new_d / head_dim``; others keep their heads.
    """
    if not gm.is_hf or getattr(gm.module, "config", None) is None:
        return want or h
    group = h // kv if 1 < kv < h else 1  # grouped-query attention grows in whole groups
    candidates = [want] if want else [h] + ([new_d // hd] if new_d % hd == 0 and new_d // hd != h else [])
    tried = []
    # A count the config's validators accept first (so the output saves as a Hugging Face directory), else
    # any the model can be built with (the report then says the directory cannot be written).
    for validate in (True, False):
        for new_h in candidates:
            if new_h % group:
                tried.append(f"{new_h} heads: not a multiple of the {group} query heads per key/value head")
                continue
            new_kv = 1 if kv == 1 and h > 1 else new_h // group
            got, why = _probe_heads(gm, site, {"hidden_size": new_d, "num_attention_heads": new_h,
                                               "num_key_value_heads": new_kv}, validate)
            if got == new_h * hd:
                return new_h
            if not validate:
                tried.append(f"{new_h} heads: {why or f'the config would give {got} query features, not {new_h} × {hd}'}")
    if not want and new_d % hd:
        tried.append(f"the config ties heads × head_dim to hidden_size and {new_d} is not a multiple of head_dim {hd}")
    raise NotGrowableError(f"no number of attention heads fits hidden size {new_d} with head_dim {hd} "
                           f"({'; '.join(tried)})")


def _extra_groups(gm: GrowModel, trace, edit: _Edit, plan: StreamPlan, updates: dict[str, int], noise: float) -> None:
    """Other hidden-size dimensions the config ties to ``hidden_size`` (a pooler, an MLM head's transform)."""
    if not gm.is_hf or getattr(gm.module, "config", None) is None:
        return
    want = {k: tuple(v.shape) for k, v in with_config(gm, updates).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in gm.module.state_dict().items()}
    done = set(plan.producers)
    for node in trace.graph.nodes:
        if node.op != "call_function" or node.target not in PRODUCERS or _weight_of(node) is None:
            continue
        weight = _weight_of(node)
        out_dim = 1 if node.target in (torch.ops.aten.addmm.default, torch.ops.aten.embedding.default) else 0
        if _module_name(node) in done or weight not in have or weight not in want:
            continue
        planned = [m for m in edit.maps.get(weight, []) if m.dim == out_dim]
        if planned or want[weight][out_dim] != plan.new_size or have[weight][out_dim] != plan.size:
            continue
        extra = plan_stream(gm.module, trace, node, plan.new_size, plan.pad)
        _plan_stream(edit, extra, noise)
        done.update(extra.producers)
