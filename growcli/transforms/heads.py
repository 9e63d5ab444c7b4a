"""``heads``: more attention heads, keeping ``head_dim`` and the function exact.

Whole heads are added (docs/recipes.md#heads). A new head copies the q, k and v rows of a
source head; the output projection's columns of a source and its copies split the source's
columns (shares summing to 1, built to sum to them exactly in the weights' dtype, see
:mod:`growcli.transforms.splits`). With grouped-query attention key/value heads grow by the same
factor, each new one bringing copies of its source's query heads, so every query head keeps
its key/value head; multi-query attention keeps its single one, unless each key/value head's rows
form one block with its query heads' (Falcon's new decoder architecture): blocks are copied whole, key/value
heads growing with them. A learned table a per-head bias is looked up from (T5's relative position buckets)
grows along its heads with the same map: a copy of head ``h`` gets column ``h``, in every attention sharing it.
The head planning here is also used by ``hidden`` when the config ties the attention width to the hidden size.
Planning reads no weight values, so the step also streams (:mod:`growcli.run.width_stream`):
planned on the meta device, its tensors computed one at a time from disk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from growcli.analysis.attention import AttentionSite, attention_sites
from growcli.analysis.attention_inputs import index_constants, known_constants
from growcli.core.errors import NotGrowableError
from growcli.core.model import GrowModel
from growcli.transforms.hfconfig import config_error, get_key, key_paths, set_new_keys, sync_config, with_config
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


def _head_maps(site: AttentionSite, new_heads: int, split: str, gen: torch.Generator,
               picks: tuple[list[int], list[int]] | None = None) -> tuple[dict, int, tuple[list[int], list[int]]]:
    """One attention grown to ``new_heads``: ``{(weight, dim, offset): (idx, scale, size, bias)}`` — the old
    feature of every new feature of each projection part (and per-feature parameter), its scale (output
    columns: the copies' shares) —, the new number of key/value heads, and the source of every new query and
    key/value head ``(g_q, g_kv)``: ``picks`` when given (another attention's, sharing a bias table), else drawn.
    Refuses sizes grouped-query attention cannot take, and uneven copies where a norm's statistic spans all heads."""
    h, kv, hd = site.heads, site.kv_heads, site.head_dim
    if new_heads <= h:
        raise NotGrowableError(f"attention in '{site.module}' has {h} heads; the new number {new_heads} is not larger")
    even = bool(site.stats)  # every head copied equally often keeps a mean over all heads' features
    if even and new_heads % h:
        raise NotGrowableError(f"attention in '{site.module}': {', '.join(site.stats)} normalises all heads' features "
                               f"together, which keeps its statistic only when every head is copied the same number "
                               f"of times; the new number of heads must be a multiple of {h}, got {new_heads}")
    pick = lambda n, extra: list(range(n)) + ([j % n for j in range(extra)] if even  # noqa: E731
                                              else torch.randint(0, n, (extra,), generator=gen).tolist())
    if (members := site.q.members) > 1 and members != h // kv:  # > 1: a key/value head's query heads in its block
        raise NotGrowableError(f"attention in '{site.module}': {site.q.weight} holds {members} query heads per block, "
                               f"not the {h // kv} of each key/value head")
    if kv == 1 and h > 1 and members == 1:  # multi-query: every new query head shares the one key/value head
        new_kv, g_kv = 1, [0]
        g_q = pick(h, new_heads - h)
    else:  # grouped-query, or query heads in their key/value head's block: whole groups are copied
        group = h // kv
        if new_heads % group:
            raise NotGrowableError(f"attention in '{site.module}' is grouped-query with {group} query heads per key/value "
                                   f"head; the new number of heads must be a multiple of {group}, got {new_heads}")
        new_kv = new_heads // group
        g_kv = pick(kv, new_kv - kv)
        # Query head j·G + i uses key/value head j (Hugging Face's repeat_kv): copies come in whole groups.
        g_q = [g_kv[j] * group + i for j in range(new_kv) for i in range(group)]
    if picks is not None and len(picks[0]) == len(g_q) and len(picks[1]) == len(g_kv):
        g_q, g_kv = picks
    shares = split_factors(g_q, h, split, "net2net", gen).tolist()
    g_of = {"q": g_q, "k": g_kv, "v": g_kv}

    def rows(p, g: list[int]) -> list[int]:
        block = p.head_size or hd  # a per-head fused qkv: the head's q, k and v rows together
        return [p.offset + src * block + t for src in _blocks(site, p, g) for t in range(block)]

    out: dict = {}
    parts = [(site.q, g_q, site.q.bias), (site.k, g_kv, site.k.bias), (site.v, g_kv, site.v.bias)]
    parts += [(p, g_of[name], None) for name, p in site.params]  # a norm's γ over all heads' features
    for p, g, bias in parts:
        idx = rows(p, g)
        key = (p.weight, p.dim, p.offset)
        if key in out and out[key][0] != idx:
            raise NotGrowableError(f"attention in '{site.module}': {p.weight} holds query and key/value heads in one "
                                   "block, which cannot grow by different numbers of heads")
        out[key] = (idx, [1.0] * len(idx), p.size, bias)
    o = site.o
    out[(o.weight, o.dim, o.offset)] = (rows(o, g_q), [s for s in shares for _ in range(hd)], o.size, None)
    return out, new_kv, (g_q, g_kv)


def _blocks(site: AttentionSite, p, g: list[int]) -> list[int]:
    """The source block of every new block of ``p`` when its heads come from ``g``: the heads themselves, or, for
    blocks of ``p.members`` heads (a whole group), the group each run of ``members`` new heads copies."""
    m = p.members
    if m == 1:
        return g
    blocks = [g[j] // m for j in range(0, len(g), m)]
    if len(g) % m or g != [b * m + i for b in blocks for i in range(m)]:
        raise NotGrowableError(f"attention in '{site.module}': {p.weight} holds the query heads of each key/value head "
                               f"in one block with it, {m} of them, so heads grow only by copying whole blocks")
    return blocks


def plan_heads(edit: Edit, sites: list[AttentionSite], new_heads: int, split: str, gen: torch.Generator,
                shapes: dict[str, tuple[int, ...]]) -> int:
    """Add the head maps of every attention to ``edit``; returns the new number of key/value heads."""
    segments: dict[tuple[str, int], list] = {}
    splits = {(s.o.weight, s.o.dim) for s in sites}  # output columns are shared out; q, k, v rows are copies
    new_kv = None
    groups = _table_groups(sites)
    picks: dict[int, tuple[list[int], list[int]]] = {}
    tables: dict[tuple[str, int], tuple[list[int], str, set[str]]] = {}  # table → (g_q, first site, lookup modules)
    for i, site in enumerate(sites):
        maps, kv, picks[groups[i]] = _head_maps(site, new_heads, split, gen, picks.get(groups[i]))
        new_kv = kv
        for t in site.tables:
            g_q, first, modules = tables.setdefault((t.fqn, t.dim), (picks[groups[i]][0], site.module, set()))
            if g_q != picks[groups[i]][0]:
                raise NotGrowableError(f"the bias table {t.fqn} is shared by the attentions in '{first}' and "
                                       f"'{site.module}', whose heads cannot grow from the same source heads")
            if shapes[t.fqn][t.dim] != site.heads:
                raise NotGrowableError(f"the bias table {t.fqn} holds {shapes[t.fqn][t.dim]} columns along dim "
                                       f"{t.dim}, not one per head of the {site.heads} heads of '{site.module}'")
            modules.add(t.module)
        for (weight, dim, offset), (idx, scale, size, bias) in maps.items():
            segments.setdefault((weight, dim), []).append((offset, size, idx, scale))
            if bias is not None:
                segments.setdefault((bias, 0), []).append((offset, size, idx, [1.0] * len(idx)))
        for p in (site.q, site.k, site.v, site.o, *(p for _, p in site.params)):
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
    for (name, dim), (g_q, _, modules) in tables.items():  # a copy of head h reads column h
        edit.add(name, DimMap(dim, list(g_q), [1.0] * len(g_q)))
        edit.planned_ops.setdefault(name, set()).update(modules)
    return new_kv


def _table_groups(sites: list[AttentionSite]) -> list[int]:
    """For every site, the smallest index of the sites it shares a bias table with, directly or through others."""
    root = list(range(len(sites)))

    def find(i: int) -> int:
        while root[i] != i:
            i = root[i]
        return i

    first: dict[tuple[str, int], int] = {}
    for i, site in enumerate(sites):
        for t in site.tables:
            a, b = find(i), find(first.setdefault((t.fqn, t.dim), i))
            root[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(sites))]


def query_features(site: AttentionSite, rows: int, kv_heads: int) -> int:
    """How many query features ``rows`` rows of ``site``'s query weight hold when it has ``kv_heads`` key/value
    heads, laid out as now: a fused ``qkv`` weight also holds the key and value parts (``kv_heads`` heads each,
    unless they share the query's per-head block)."""
    hd = site.head_dim
    others = {p.offset: p for p in (site.k, site.v) if p.weight == site.q.weight and p.offset != site.q.offset}
    rest = rows - sum(kv_heads * (p.head_size or hd) for p in others.values())
    if site.q.members > 1:  # blocks of a whole group: members query heads each
        return rest // site.q.head_size * site.q.members * hd
    return rest * hd // (site.q.head_size or hd)


def check_layout(gm: GrowModel, sites: list[AttentionSite], updates: dict[str, int], trace=None) -> None:
    """Refuse when a model built from ``config + updates`` places its heads' features elsewhere than ``sites`` say.

    Heads grow where the trace of the model as it is puts them; that is exact only if the grown model reads them
    from the same places, with more heads. A reshape by a constant that is not the number of heads (CodeGen's
    fixed four head groups) moves them when the heads grow, which only a trace of the grown model shows. A model
    that cannot be built or traced on the meta device is left to the verification. Constants the meta-device trace
    cannot hold (Falcon's index ``[-2]`` picking the key head) are read from ``trace``, the model's own trace.
    """
    if not gm.is_hf or getattr(gm.module, "config", None) is None:
        return
    constants = index_constants(trace) if trace is not None else {}
    try:
        fresh = with_config(gm, updates)
        fresh_trace = trace_width(GrowModel(fresh, gm.kind, gm.source, gm.source_sha256, gm.inputs))
    except Exception:  # noqa: BLE001 — no trace of the grown model: the verification still decides
        return
    heads = updates.get("num_attention_heads")
    try:
        with known_constants(constants):
            grown = attention_sites(fresh_trace, required=False)
    except NotGrowableError as exc:
        raise NotGrowableError(f"a model with {heads} attention heads computes its attention in another way than this "
                               f"one ({exc}), so copying whole heads in place would not be exact") from None
    for old, new in zip(sites, grown):
        if _layout(old) != _layout(new) or len(grown) != len(sites) or heads not in (None, new.heads):
            raise NotGrowableError(f"attention in '{old.module}': a model with {heads} attention heads reads its query, "
                                   "key and value features from other places than this one (a reshape by a constant "
                                   "that is not the number of heads), so copying whole heads in place would not be exact")


def _layout(site: AttentionSite) -> tuple:
    """Where q, k and v sit in their weights, independent of the number of heads."""
    parts = (site.q, site.k, site.v)
    order = {w: sorted({p.offset for p in parts if p.weight == w}) for w in {p.weight for p in parts}}
    return tuple((p.weight, p.dim, order[p.weight].index(p.offset), (p.head_size or site.head_dim) / site.head_dim,
                  p.members) for p in parts) + ((site.o.weight, site.o.dim),)


def probe_heads(gm: GrowModel, site: AttentionSite, updates: dict[str, int], validate: bool = False,
                head_dim: int | None = None) -> tuple[int | None, str, dict[str, int]]:
    """The number of query features a model built from ``config + updates`` gives ``site``'s query projection,
    or None and the reason the config rejects these sizes; and the updates that gave it.

    With ``head_dim``, a config that does not give ``updates["num_attention_heads"] × head_dim`` query
    features is tried again with an explicit ``head_dim`` key: many attentions read ``config.head_dim``
    and derive ``hidden_size // num_attention_heads`` only when it is unset. Whether the key works is
    decided by the shapes of the model built from it, never by the family.
    """
    tries = [updates]
    if head_dim is not None and "head_dim" not in updates and getattr(gm.module.config, "head_dim", None) is None:
        tries.append({**updates, "head_dim": head_dim})
    first = None
    for tried in tries:
        got, why = _probe(gm, site, tried, validate)
        first = first or (got, why, tried)
        if head_dim is None or got == updates.get("num_attention_heads", site.heads) * head_dim:
            return got, why, tried
    return first


def _probe(gm: GrowModel, site: AttentionSite, updates: dict[str, int], validate: bool) -> tuple[int | None, str]:
    """:func:`probe_heads` for one set of updates; a config giving a count per stage (Swin's ``num_heads: [2, 2]``,
    all equal, as in a model whose attentions all have one shape) is probed with the new count in every stage."""
    probed = {}
    for key, value in updates.items():
        listed = _listed(gm, key, updates)
        probed[key] = value if listed is None else [value] * len(listed)
    updates = probed
    try:
        shapes = {k: tuple(v.shape) for k, v in with_config(gm, updates, validate).state_dict().items()}
    except Exception as exc:  # the config rejects these sizes (say, hidden_size not divisible by the heads)
        return None, config_error(exc)
    shape = shapes.get(site.q.weight)
    if shape is None:
        return None, f"a model built from the config has no {site.q.weight}"
    return query_features(site, shape[site.q.dim], updates.get("num_key_value_heads", site.kv_heads)), ""


def _listed(gm: GrowModel, key: str, updates: dict) -> list | None:
    """The list the config holds for ``key`` (one value per stage), None when it holds a number or nothing."""
    values = [get_key(gm.module.config, path) for path in key_paths(gm.module.config, key, updates)]
    return next((list(v) for v in values if isinstance(v, (list, tuple))), None)


# Names configs give the number of key/value heads (Falcon's ``num_kv_heads``, read only by a reshape in its
# attention, so no weight shape tells the config fitter that it is stale).
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads")


def kv_keys(gm: GrowModel) -> list[str]:
    """The config keys of the number of key/value heads: ``num_key_value_heads`` and every synonym the config sets."""
    config = getattr(gm.module, "config", None)
    return ["num_key_value_heads"] + [k for k in KV_HEAD_KEYS[1:] if getattr(config, k, None) is not None]


def output_width(gm: GrowModel, site: AttentionSite, updates: dict[str, int]) -> int | None:
    """How many attention features the output projection of a model built from ``config + updates`` reads (None
    when it cannot be built): a config may size it by ``hidden_size`` rather than by heads × head_dim (Helium's
    ``o_proj``), and then only the number of heads that makes the two equal describes the grown model."""
    try:
        weight = with_config(gm, updates).state_dict().get(site.o.weight)
    except Exception:  # noqa: BLE001 — the query probe already said why these sizes do not build
        return None
    have = gm.module.state_dict().get(site.o.weight)
    extra = int(have.shape[site.o.dim]) - site.o.size if have is not None else 0  # a fused output's other columns
    return None if weight is None else int(weight.shape[site.o.dim]) - extra


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
        # grouped-query attention (or query heads in their key/value head's block) grows in whole groups
        group = h // kv if 1 < kv < h or sites[0].q.members > 1 else 1
        derived = ("the config derives head_dim from hidden_size / num_attention_heads, so heads grow only with "
                   "the hidden size (widen --hidden)")
        built, rejected = False, ""
        for new_h in range(h + group, 4 * h + 1, group):
            got, why, used = probe_heads(gm, sites[0], {"num_attention_heads": new_h, **dict.fromkeys(
                kv_keys(gm), 1 if kv == 1 and sites[0].q.members == 1 else new_h // group)}, True, hd)
            reads = output_width(gm, sites[0], used) if got == new_h * hd else None
            if got == new_h * hd and reads == new_h * hd:
                break
            if got == new_h * hd:
                reason = _sized_by_hidden(gm, sites[0], new_h, hd, reads)
                break
            built, rejected = built or got is not None, why or rejected
        else:  # a config that builds with the wrong shapes derives head_dim; one that never builds says why
            reason = derived if built or not rejected else rejected
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
        got, why, updates = probe_heads(gm, sites[0], {"num_attention_heads": new_heads,
                                                       **dict.fromkeys(kv_keys(gm), new_kv)}, head_dim=hd)
        if got is None:
            raise NotGrowableError(f"a model with {new_heads} attention heads cannot be built from the config: {why}")
        if got != new_heads * hd:
            raise NotGrowableError(f"{type(gm.module).__name__}'s config derives head_dim from hidden_size / "
                                   f"num_attention_heads (an explicit head_dim key does not change its projections), so "
                                   f"{new_heads} heads of {hd} cannot be described; grow the hidden size with them "
                                   f"(widen --hidden {new_heads * hd} --heads {new_heads})")
        reads = output_width(gm, sites[0], updates)
        if reads != new_heads * hd:
            raise NotGrowableError(_sized_by_hidden(gm, sites[0], new_heads, hd, reads))
        listed = [k for k in updates if _listed(gm, k, updates) is not None]
        if listed:
            raise NotGrowableError(f"{type(gm.module).__name__}'s config gives {listed[0]} per stage as a list, which "
                                   "growcli does not rewrite")
    else:
        updates = {"num_attention_heads": new_heads, "num_key_value_heads": new_kv}
    check_layout(gm, sites, updates, trace)
    check_shared(gm, trace, edit)
    apply_edit(gm, edit, 0.0, ctx.generator(salt=62), report)
    set_new_keys(gm, updates, report.notes)
    sync_config(gm, updates, size_map(h, kv, hd, new_heads, new_kv), {hd: "head_dim"}, [], report.notes)
    report.matched = [s.module for s in sites]
    report.notes.insert(0, f"{sites[0].kind} attention: heads {h} → {new_heads}, key/value heads {kv} → {new_kv}, "
                           f"head_dim {hd}")
    report.params_after = gm.num_parameters()
    return report


def _sized_by_hidden(gm: GrowModel, site: AttentionSite, new_heads: int, hd: int, reads: int | None) -> str:
    return (f"{type(gm.module).__name__}'s config gives the output projection {site.o.weight} {reads} input features "
            f"whatever the number of heads (it sizes them by hidden_size, not by heads × head_dim), so {new_heads} heads "
            f"of {hd} cannot be described by the config; grow the hidden size with them "
            f"(widen --hidden {new_heads * hd} --heads {new_heads})")


def size_map(h: int, kv: int, hd: int, new_h: int, new_kv: int) -> dict[int, set[int]]:
    """Old size values → the new values an attribute holding them may take (several sizes can coincide)."""
    sizes: dict[int, set[int]] = {}
    for old, new in ((h, new_h), (kv, new_kv), (h * hd, new_h * hd), (kv * hd, new_kv * hd), (h // kv, new_h // new_kv)):
        sizes.setdefault(old, set()).add(new)
    return sizes
