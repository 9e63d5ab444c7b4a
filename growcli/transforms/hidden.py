"""``hidden``: a larger hidden size, keeping the function exact.

The hidden size grows from ``d`` to ``d' = k·d + r``; every hidden vector becomes
``[x, …, x, p]`` (docs/recipes.md#hidden; see :mod:`growcli.analysis.stream` for the analysis and the
padding rules). Where the model's config ties the attention width to the hidden size (BERT,
GPT-2, ViT: ``heads × head_dim = hidden_size``), heads grow with it, planned by
:mod:`growcli.transforms.heads`.
Planning reads no weight values, so the step also streams (:mod:`growcli.run.width_stream`):
planned on the meta device, its tensors computed one at a time from disk.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from growcli.analysis.attention import AttentionSite, attention_sites
from growcli.analysis.stream import plan_stream, stream_size, stream_start
from growcli.analysis.stream_plan import MEAN, StreamPlan
from growcli.analysis.stream_tensors import PRODUCERS
from growcli.analysis.trace import module_of, weight_of
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import make_batches
from growcli.core.model import GrowModel
from growcli.core.origins import AxisMap
from growcli.transforms.heads import (check_layout, kv_keys, output_width, plan_heads, probe_heads, size_map,
                                      uniform_shape)
from growcli.transforms.hfconfig import set_new_keys, sync_config, with_config
from growcli.transforms.hfconfig_heads import head_count_keys
from growcli.transforms.registry import Context, StepReport, option, register
from growcli.transforms.sizes import check_one_size, target_size
from growcli.transforms.width_edit import DimMap, Edit, apply_edit, check_shared, trace_width
from growcli.verification.compare import flatten_outputs


@dataclass(frozen=True)
class HiddenSpec:
    """Grow the hidden size to ``to`` or by ``factor``; ``heads`` sets the new number of query heads.

    ``noise`` (relative to each weight's std) adds ``+N``/``−N`` to paired tiles of the
    matrices that read the hidden states: exact, and the tiles train apart. ``start`` names the
    module that writes the residual stream first (default: the first embedding).
    """

    to: int | None = option(None, "New hidden size.")
    factor: float | None = option(None, "Multiply the hidden size by F (e.g. 2).")
    heads: int | None = option(None, "Number of query heads after the step (default: scaled with the hidden size when"
                                     " head_dim is kept).")
    noise: float = option(0.0, "+N/-N noise on paired tiles of the matrices reading the hidden states, relative to "
                               "each weight's std (exact; breaks symmetry).")
    split: Literal["asymmetric", "uniform"] = option("asymmetric", "How columns reading a tiled hidden vector are shared between its tiles: asymmetric or uniform.")
    start: str | None = option(None, "The module that writes the residual stream first (default: the first "
                                     "embedding).")

    def __post_init__(self):
        check_one_size(self, ("to", "factor"))
        if self.noise < 0:
            raise UsageError(f"noise must be non-negative, got {self.noise}")
        if self.heads is not None and self.heads < 1:
            raise UsageError(f"heads must be a positive integer, got {self.heads}")

    def target(self, size: int) -> int:
        return target_size(self, size)


@dataclass
class HiddenReport(StepReport):
    """The step's report, with the residual stream's width before and after (``[d, d']``): what
    block-wise verification composes into the map between the streams after several hidden steps."""

    stream_widths: list[int] | None = None


PAD_OF_KIND = {"consumer": "zero", "scale": "mean", "norm_weight": "mean", "norm_bias": "zero"}


def _output_maps(gm: GrowModel, plans: list[StreamPlan]) -> dict[str, AxisMap]:
    """Hidden states the model returns (an embedding model's outputs) → how the grown ones map to the old.

    Along the hidden dim, tile position ``i`` holds ``alpha · old[i mod d]``; padded positions
    are fresh (zero after a final norm, the per-token mean on an un-normalised stream).
    """
    outputs = [out for plan in plans for out in plan.outputs]
    if not outputs:
        return {}
    device = next((p.device for p in gm.module.parameters()), torch.device("cpu"))  # meta when planning a stream
    args, kwargs = make_batches(gm.inputs, 1)[0]
    args, kwargs = tuple(a.to(device) for a in args), {k: v.to(device) for k, v in kwargs.items()}
    with torch.no_grad():
        names = list(flatten_outputs(gm.module(*args, **kwargs)))
    d, k, r = plans[0].size, plans[0].k, plans[0].r
    index = tuple(range(d)) * k + (-1,) * r
    return {names[i]: AxisMap(dim, index, (alpha,) * (k * d) + (1.0,) * r) for i, dim, alpha in outputs
            if i < len(names)}


def _plan_stream(edit: Edit, plan: StreamPlan, noise: float) -> None:
    """Add the tiling maps of every parameter in ``plan`` to ``edit`` (see :class:`growcli.analysis.stream_plan.ParamPlan`)."""
    d, k, r = plan.size, plan.k, plan.r
    idx = list(range(d)) * k + [-1] * r
    stream_pad = "mean" if plan.pad == MEAN else "zero"
    for p in plan.params:
        if p.blocks:  # a reader of hidden vectors concatenated along the hidden dim: each block a reader's columns
            idx, scale = _block_positions(p.blocks, d, k, r)
            edit.add(p.name, DimMap(p.dim, idx, scale, "zero", 0, 0.0, split=True))
            continue
        scale = p.factor / k if p.kind == "consumer" else p.factor
        pad = PAD_OF_KIND.get(p.kind, stream_pad)
        tiles = k if p.kind == "consumer" and noise > 0 else 0
        edit.add(p.name, DimMap(p.dim, idx, [scale] * len(idx), pad, tiles, p.shift, split=p.kind == "consumer"))
    for fqn, ops in plan.handled.items():
        edit.planned_ops.setdefault(fqn, set()).update(module_of(n) for n in ops)
    edit.eps += plan.eps


def _block_positions(blocks, d: int, k: int, r: int) -> tuple[list[int], list[float]]:
    """New positions (old index, -1 for zero padding) and scales of a dim made of ``blocks``: a hidden block
    ``(d, α)`` is tiled ``k`` times and divided by ``k·α``, then padded with ``r`` zeros; ``(size, None)`` is kept."""
    idx: list[int] = []
    scale: list[float] = []
    offset = 0
    for size, alpha in blocks:
        if alpha is None:
            idx += range(offset, offset + size)
            scale += [1.0] * size
        else:
            idx += list(range(offset, offset + d)) * k + [-1] * r
            scale += [1.0 / (k * alpha)] * (k * d + r)
        offset += size
    return idx, scale


def hidden_candidates(gm: GrowModel) -> dict[str, str | None]:
    """The module starting the residual stream → None if the hidden size can grow (×2), else the reason."""
    try:
        trace = trace_width(gm)
        start = stream_start(trace)
    except NotGrowableError as exc:
        return {"hidden size": str(exc)}
    name = module_of(start)
    try:
        plan_stream(gm.module, trace, start, 2 * stream_size(trace, start))
        return {name: None}
    except NotGrowableError as exc:
        return {name: str(exc)}


@register("hidden", HiddenSpec, exact=True, help="grow the hidden size (tiling; LayerNorm/RMSNorm padding recipes)",
          candidates=hidden_candidates, modes=("memory", "streaming"))
def grow_hidden(gm: GrowModel, spec: HiddenSpec, ctx: Context) -> StepReport:
    """Grow the hidden size of a transformer exactly, with every tensor that carries it."""
    report = HiddenReport("hidden", dataclasses.asdict(spec), params_before=gm.num_parameters())
    trace = trace_width(gm)
    start = stream_start(trace, spec.start)
    d = stream_size(trace, start)
    new_d = spec.target(d)
    report.stream_widths = [d, new_d]
    plan = plan_stream(gm.module, trace, start, new_d)
    edit = Edit()
    sites = attention_sites(trace, required=False)
    updates: dict[str, int] = {"hidden_size": new_d}
    sizes: dict[int, set[int]] = {d: {new_d}}
    protected: dict[int, str] = {}
    if sites:
        h, kv, hd = uniform_shape(sites)
        new_h, explicit = _heads_for_hidden(gm, sites[0], spec.heads, h, kv, hd, d, new_d)
        updates.update(explicit)
        if new_h != h:
            shapes = {k: tuple(v.shape) for k, v in gm.module.state_dict().items()}
            new_kv = plan_heads(edit, sites, new_h, spec.split, ctx.generator(salt=71), shapes)
            updates.update({"num_attention_heads": new_h, **dict.fromkeys(kv_keys(gm), new_kv)})
            for old, new in size_map(h, kv, hd, new_h, new_kv).items():
                sizes.setdefault(old, set()).update(new)
            # keys the attribute_map does not send num_attention_heads to (BART's decoder_attention_heads)
            updates.update(head_count_keys(gm, {s.module for s in sites}, updates, {h: new_h, kv: new_kv}, sizes))
            check_layout(gm, sites, updates, trace)  # a reshape by a constant (CodeGen) would move the grown heads
            report.notes.append(f"heads {h} → {new_h} (head_dim {hd} kept)")
        protected[hd] = "head_dim"
    constants = _hidden_constants(gm, plan, updates)
    _plan_stream(edit, plan, spec.noise)
    extra = _extra_groups(gm, trace, edit, plan, updates, spec.noise)
    output_maps = _output_maps(gm, [plan, *extra])  # names from a run of the model before it changes
    _follow_unused_names(gm, trace, edit)
    check_shared(gm, trace, edit)
    apply_edit(gm, edit, spec.noise, ctx.generator(salt=72), report)
    for module, attr, old, new, buffer in constants:
        gm.edits.attr(gm.module, module, attr, new)
        value = torch.full_like(gm.module.get_buffer(buffer), new)
        gm.edits.param(gm.module, buffer, value)
        if value.numel() and float(value.flatten()[0]) != new:  # the buffer cannot hold the new constant
            report.exact_in_dtype = False
            report.notes.append(f"not exact in {str(value.dtype).removeprefix('torch.')}: {buffer} holds "
                                f"{float(value.flatten()[0]):.6g} for {new:.6g}: verified at that dtype's rounding")
        report.notes.append(f"{module}.{attr}: {old:.6g} → {new:.6g} (set by the new config); the layers writing what it "
                            f"scales are multiplied by {old / new:.6g}")
    set_new_keys(gm, updates, report.notes)
    sync_config(gm, updates, sizes, protected, plan.eps, report.notes)
    _note_casts(report, plan)
    report.output_maps = output_maps
    if output_maps:
        report.notes.append(f"the model returns hidden states ({', '.join(output_maps)}): they grow too, and are "
                            "compared through the map (tiles against the original, padded entries not compared)")
    report.matched = [f"{d} → {new_d} (the residual stream from '{module_of(start)}')"]
    if start.target != torch.ops.aten.embedding.default and spec.start is None:
        report.notes.append(f"factorised embedding: the embeddings write a smaller size, projected by '{module_of(start)}'"
                            ", whose rows grow; the embeddings keep theirs")
    k, r = plan.k, plan.r
    how = f"tiled ×{k}" + (f" + {r} padded ({'mean' if plan.pad == MEAN else 'zero'} padding, eps × {k * d / new_d:.6g}, "
                           f"γ × {math.sqrt(k * d / new_d):.6g})" if r else "")
    report.notes.insert(0, f"{how}; {len(plan.producers)} writers, {len(plan.consumers)} readers, "
                           f"{len(set(plan.norms))} norms")
    if spec.noise > 0:
        report.notes.append(f"paired ±noise {spec.noise} on the tiles of every reader: exact, breaks the symmetry")
    report.params_after = gm.num_parameters()
    return report


def _follow_unused_names(gm: GrowModel, trace, edit: Edit) -> None:
    """Another name of a planned tensor, owned by a module the forward never runs (BART's ``model.shared``, read
    only through ``encoder.embed_tokens``), grows like a name that runs, writers first: its value cannot change
    what the model computes, and a model built from the new config gives it the new size."""
    ran = {module_of(n) for n in trace.graph.nodes if n.op == "call_function"}
    named = dict(gm.module.named_parameters(remove_duplicate=False))
    names: dict[int, list[str]] = {}
    for name, p in named.items():
        names.setdefault(id(p), []).append(name)
    for name in sorted(edit.maps, key=lambda n: any(m.split for m in edit.maps[n])):
        for other in names.get(id(named.get(name)), []):
            if other not in edit.maps and other.rpartition(".")[0] not in ran:
                edit.maps[other] = list(edit.maps[name])


def _note_casts(report: StepReport, plan: StreamPlan) -> None:
    """Say that the step is exact only to the dtype in which the model computes some norms (OLMo's LayerNorm
    casts to float32 whatever the weights): there a norm over ``d'`` entries rounds differently from one
    over ``d``, although the grown model equals the original in exact arithmetic."""
    if not plan.casts:
        return
    report.exact_in_dtype = False
    more = f" and {len(plan.casts) - 1} more" if len(plan.casts) > 1 else ""
    report.notes.append(f"not exact in the weights' dtype: the model computes the norm of {plan.casts[0]}{more} in a "
                        "less precise dtype (a cast inside the model), where a norm over the grown hidden size rounds "
                        "differently: verified at that dtype's rounding (exact in exact arithmetic)")


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


def _heads_for_hidden(gm: GrowModel, site: AttentionSite, want: int | None, h: int, kv: int, hd: int, d: int,
                      new_d: int) -> tuple[int, dict[str, int]]:
    """The number of query heads after growing the hidden size: ``want``, else what the config allows; and
    the config keys to add (an explicit ``head_dim`` where the attention reads one and ``want`` needs it).

    Models whose config derives ``head_dim = hidden_size / num_attention_heads`` need
    ``heads = new_d / head_dim``; others keep their heads.
    """
    if not gm.is_hf or getattr(gm.module, "config", None) is None:
        return want or h, {}
    # grouped-query attention (or query heads in their key/value head's block) grows in whole groups
    group = h // kv if 1 < kv < h or site.q.members > 1 else 1
    candidates = [want] if want else [h] + ([new_d // hd] if new_d % hd == 0 and new_d // hd != h else [])
    tried = []
    # A count the config's validators accept first (so the output saves as a Hugging Face directory), else
    # any the model can be built with (the report then says the directory cannot be written).
    for validate in (True, False):
        for new_h in candidates:
            if new_h % group:
                tried.append(f"{new_h} heads: not a multiple of the {group} query heads per key/value head")
                continue
            new_kv = 1 if kv == 1 and h > 1 and site.q.members == 1 else new_h // group
            got, why, used = probe_heads(gm, site, {"hidden_size": new_d, "num_attention_heads": new_h,
                                                     **dict.fromkeys(kv_keys(gm), new_kv)}, validate, hd if want else None)
            reads = output_width(gm, site, used) if got == new_h * hd else None
            if got == new_h * hd and reads == new_h * hd:
                return new_h, {k: v for k, v in used.items() if k == "head_dim"}
            if not validate:
                tried.append(f"{new_h} heads: {why or f'the config would give {got} query features, not {new_h} × {hd}'}"
                             if got != new_h * hd else f"{new_h} heads: the config would give the output projection "
                                                       f"{reads} input features, not {new_h} × {hd}")
    if not want and new_d % hd:
        tried.append(f"the config ties heads × head_dim to hidden_size and {new_d} is not a multiple of head_dim {hd}")
    raise NotGrowableError(f"no number of attention heads fits hidden size {new_d} with head_dim {hd} "
                           f"({'; '.join(tried)})")


def _extra_groups(gm: GrowModel, trace, edit: Edit, plan: StreamPlan, updates: dict[str, int],
                  noise: float) -> list[StreamPlan]:
    """Other hidden-size dimensions the config ties to ``hidden_size`` (a pooler, an MLM head's transform)."""
    if not gm.is_hf or getattr(gm.module, "config", None) is None:
        return []
    extras = []
    want = {k: tuple(v.shape) for k, v in with_config(gm, updates).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in gm.module.state_dict().items()}
    done = set(plan.producers)
    for node in trace.graph.nodes:
        if node.op != "call_function" or node.target not in PRODUCERS or weight_of(node) is None:
            continue
        weight = weight_of(node)
        out_dim = 1 if node.target in (torch.ops.aten.addmm.default, torch.ops.aten.embedding.default) else 0
        if module_of(node) in done or weight not in have or weight not in want:
            continue
        planned = [m for m in edit.maps.get(weight, []) if m.dim == out_dim]
        if planned or want[weight][out_dim] != plan.new_size or have[weight][out_dim] != plan.size:
            continue
        extra = plan_stream(gm.module, trace, node, plan.new_size, plan.pad)
        _plan_stream(edit, extra, noise)
        done.update(extra.producers)
        extras.append(extra)
    return extras
