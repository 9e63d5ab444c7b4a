"""``heads``: more attention heads, keeping ``head_dim`` and the function exact.

Whole heads are added (docs/recipes.md#heads). A new head copies the q, k and v rows of a
source head; the output projection's columns of a source and its copies split the source's
columns (shares summing to 1, built to sum to them exactly in the weights' dtype, see
:mod:`growcli.transforms.splits`). With grouped-query attention key/value heads grow by the same
factor, each new one bringing copies of its source's query heads, so every query head keeps
its key/value head; multi-query attention keeps its single one. The head planning here is
also used by ``hidden`` when the config ties the attention width to the hidden size.
Planning reads no weight values, so the step also streams (:mod:`growcli.run.width_stream`):
planned on the meta device, its tensors computed one at a time from disk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from growcli.analysis.attention import AttentionSite, attention_sites
from growcli.core.errors import NotGrowableError
from growcli.core.model import GrowModel
from growcli.transforms.hfconfig import config_error, sync_config, with_config
from growcli.transforms.registry import Context, StepReport, option, register
from growcli.transforms.sizes import check_one_size, target_size
from growcli.transforms.widen import split_factors
from growcli.transforms.width_edit import DimMap, Edit, apply_edit, check_shared, trace_width


@dataclass(frozen=True)
class HeadsSpec:
    """Grow every attention to ``to`` query heads, by ``by`` heads, or by ``factor``."""

    to: int | None = option(None, "Grow every attention to N query heads (whole heads, head_dim kept).")
    by: int | None = option(None, "Number of query heads to add to every attention.")
    factor: float | None = option(None, "Multiply every attention's number of query heads by F.")
    split: Literal["asymmetric", "uniform"] = option("asymmetric", "How the output projection's columns of a copied head are shared: asymmetric (random shares summing to 1) or uniform.")

    def __post_init__(self):
        check_one_size(self, ("to", "by", "factor"))

    def target(self, heads: int) -> int:
        return target_size(self, heads)


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


def plan_heads(edit: Edit, sites: list[AttentionSite], new_heads: int, split: str, gen: torch.Generator,
                shapes: dict[str, tuple[int, ...]]) -> int:
    """Add the head maps of every attention to ``edit``; returns the new number of key/value heads."""
    segments: dict[tuple[str, int], list] = {}
    splits = {(s.o.weight, s.o.dim) for s in sites}  # output columns are shared out; q, k, v rows are copies
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
        edit.add(name, DimMap(dim, idx, scale, split=(name, dim) in splits))
    return new_kv


def probe_heads(gm: GrowModel, site: AttentionSite, updates: dict[str, int],
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


def uniform_shape(sites: list[AttentionSite]) -> tuple[int, int, int]:
    kinds = {(s.heads, s.kv_heads, s.head_dim) for s in sites}
    if len(kinds) != 1:
        raise NotGrowableError(f"the attentions differ in heads (heads, kv heads, head_dim: {sorted(kinds)}); "
                               "growcli grows models whose attentions all have the same shape")
    return kinds.pop()


def heads_candidates(gm: GrowModel) -> dict[str, str | None]:
    """Every attention module → None if its heads can grow, else the reason."""
    try:
        sites = attention_sites(trace_width(gm))
        h, kv, hd = uniform_shape(sites)
    except NotGrowableError as exc:
        return {"attention": str(exc)}
    reason = None
    if gm.is_hf and getattr(gm.module, "config", None) is not None:
        group = h // kv if 1 < kv < h else 1  # grouped-query attention grows in whole groups
        reason = ("the config derives head_dim from hidden_size / num_attention_heads, so heads grow only with "
                  "the hidden size (widen --hidden)")
        for new_h in range(h + group, 4 * h + 1, group):
            got, why = probe_heads(gm, sites[0], {"num_attention_heads": new_h,
                                                   "num_key_value_heads": 1 if kv == 1 else new_h // group}, True)
            if got == new_h * hd:
                reason = None
                break
            reason = why or reason
    return {s.module: reason for s in sites}


@register("heads", HeadsSpec, exact=True, help="add whole attention heads (q, k, v copied; output columns split)",
          candidates=heads_candidates, modes=("memory", "streaming"))
def grow_heads(gm: GrowModel, spec: HeadsSpec, ctx: Context) -> StepReport:
    """Grow every attention to ``spec.target(heads)`` query heads, keeping ``head_dim``."""
    report = StepReport("heads", dataclasses.asdict(spec), params_before=gm.num_parameters())
    trace = trace_width(gm)
    sites = attention_sites(trace)
    h, kv, hd = uniform_shape(sites)
    new_heads = spec.target(h)
    edit = Edit()
    shapes = {k: tuple(v.shape) for k, v in gm.module.state_dict().items()}
    new_kv = plan_heads(edit, sites, new_heads, spec.split, ctx.generator(salt=61), shapes)
    if gm.is_hf and getattr(gm.module, "config", None) is not None:
        got, why = probe_heads(gm, sites[0], {"num_attention_heads": new_heads, "num_key_value_heads": new_kv})
        if got is None:
            raise NotGrowableError(f"a model with {new_heads} attention heads cannot be built from the config: {why}")
        if got != new_heads * hd:
            raise NotGrowableError(f"{type(gm.module).__name__}'s config derives head_dim from hidden_size / "
                                   f"num_attention_heads, so {new_heads} heads of {hd} cannot be described; grow the "
                                   f"hidden size with them (widen --hidden {new_heads * hd} --heads {new_heads})")
    check_shared(gm, trace, edit)
    apply_edit(gm, edit, 0.0, ctx.generator(salt=62), report)
    updates = {"num_attention_heads": new_heads, "num_key_value_heads": new_kv}
    sync_config(gm, updates, size_map(h, kv, hd, new_heads, new_kv), {hd: "head_dim"}, [], report.notes)
    report.matched = [s.module for s in sites]
    report.notes.insert(0, f"{sites[0].kind} attention: heads {h} → {new_heads}, key/value heads {kv} → {new_kv}, "
                           f"head_dim {hd}")
    report.params_after = gm.num_parameters()
    return report


def size_map(h: int, kv: int, hd: int, new_h: int, new_kv: int) -> dict[int, set[int]]:
    """Old size values → the new values an attribute holding them may take (several sizes can coincide)."""
    sizes: dict[int, set[int]] = {}
    for old, new in ((h, new_h), (kv, new_kv), (h * hd, new_h * hd), (kv * hd, new_kv * hd), (h // kv, new_h // new_kv)):
        sizes.setdefault(old, set()).add(new)
    return sizes
