"""Path-level branching (Cai et al. 2018): a layer or a block becomes N parallel branches.

Recipe: docs/recipes.md#branch. The module matched by ``layer`` is replaced by a
:class:`growcli.nn.Branches` holding N branches:

- ``add``: every branch is an exact copy of the module and the outputs are summed with merge
  weights ``w`` (``Σ w = 1``): ``Σ w_i·f(x) = f(x)``. Each ``w_i·f(x)`` is exact when ``w_i`` is a
  power of two, and the partial sums are added smallest weights first, which pairs equal
  weights (``x + x = 2x``), so power-of-two weights (N = 2: ½, ½; N = 4: ¼ each; N = 3:
  ½, ¼, ¼) are exact bit for bit in every dtype. Other weights (the default 1/3 for N = 3)
  round once per product and sum: a few units in the last place of the output's dtype.
- ``concat``: branch ``i`` is a copy whose final Linear/Conv keeps only its share of the
  output channels (rows of ``W`` and ``b``; columns of a transposed conv's ``[in, out, k…]`` ``W``,
  :func:`~growcli.analysis.trace.conv_weight_dims`); concatenating the shares rebuilds the output.
  Each output channel is computed by the same weights: exact in any dtype, each branch unique.
  For a block the final op must be that Linear/Conv, followed only by ops acting on each
  channel alone (element-wise activations; BatchNorms, sliced too); the trace says which ops
  they are, never the names.

What the trace must show before anything changes: the module is called once, returns one
tensor, and its parameters are read only inside its own forward (and shared with no other
module). Every change goes through ``gm.edits``, so :func:`growcli.load_grown` replays it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from growcli.analysis.depth import INDEX_NAMES
from growcli.analysis.trace import CONV, CONV_TRANSPOSE, METADATA_CHECKS, UNARY, Trace, attr_of, conv_groups, \
    conv_weight_dims, in_scope, op_name, shape, trace_model, where
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import Batch, cast_batch, make_batches
from growcli.core.model import GrowModel
from growcli.core.origins import AxisMap, Origin
from growcli.core.select import select
from growcli.nn import Branches
from growcli.transforms.registry import Context, StepReport, option, register

aten = torch.ops.aten
LINEAR = {aten.linear.default}
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class BranchSpec:
    """Replace each module matched by ``layer`` by ``branches`` parallel branches merged by ``merge``."""

    layer: str | list[str] = option(help="Layer or block to branch (a Linear, a Conv, or a module returning one "
                                         "tensor): name, dotted suffix, glob or regex; a list branches each.")
    merge: Literal["add", "concat"] = option(help="add (copies whose outputs are summed with merge weights that sum "
                                                  "to 1) or concat (each branch computes its share of the output "
                                                  "channels; the shares are concatenated).")
    branches: int = option(2, "Number of branches (at least 2).")
    weights: list[float] | None = option(None, "add only: merge weights, one per branch, positive, summing to 1 "
                                               "(default: 1/N each; powers of two such as 0.5, 0.25, 0.25 are exact "
                                               "in every dtype).")
    sizes: list[int] | None = option(None, "concat only: output channels of each branch (default: as even as "
                                           "possible).")

    def __post_init__(self):
        problems = []
        if self.branches < 2:
            problems.append(f"branches {self.branches}: need at least 2")
        if self.weights is not None:
            if self.merge != "add":
                problems.append("weights are for merge add (concat branches are not weighted)")
            elif len(self.weights) != self.branches:
                problems.append(f"{len(self.weights)} weights for {self.branches} branches (one weight per branch; "
                                f"set branches to {len(self.weights)})")
            elif any(not w > 0 or math.isinf(w) for w in self.weights):
                problems.append(f"weights {list(self.weights)}: every merge weight must be positive and finite")
            elif abs(math.fsum(self.weights) - 1.0) > 1e-12:
                problems.append(f"weights {list(self.weights)} sum to {math.fsum(self.weights)!r}, not 1, so the "
                                "branches would not add up to the layer")
        if self.sizes is not None:
            if self.merge != "concat":
                problems.append("sizes are for merge concat")
            elif len(self.sizes) != self.branches:
                problems.append(f"{len(self.sizes)} sizes for {self.branches} branches (one size per branch)")
            elif any(s < 1 for s in self.sizes):
                problems.append(f"sizes {list(self.sizes)}: every branch needs at least one output channel")
        if problems:
            raise UsageError("; ".join(problems))

    def merge_weights(self) -> list[float] | None:
        if self.merge != "add":
            return None
        return [float(w) for w in self.weights] if self.weights is not None else [1.0 / self.branches] * self.branches


@dataclass
class Site:
    """A module to branch, as the trace shows it."""

    name: str
    module: nn.Module
    out_layer: str | None = None  # concat: the Linear/Conv (path inside the site, "" = the site) computing its output
    norms: list[str] = dataclasses.field(default_factory=list)  # concat: BatchNorms after it (paths inside the site)
    channels: int = 0  # concat: output channels of that layer
    dim: int = -1  # concat: the dimension holding them (-1 Linear features, 1 conv channels)
    axis: int = 0  # concat: the dim of that layer's weight holding them (1 for a transposed conv)
    concat_refusal: str | None = None  # why concat is impossible here


def _sample(gm: GrowModel) -> Batch:
    """One input batch in the dtype of the model's weights (a float64 model cannot be traced on float32 inputs)."""
    batch = make_batches(gm.inputs, 1)[0]
    dtype = next((p.dtype for p in gm.module.parameters() if p.is_floating_point()), None)
    return cast_batch(batch, dtype) if dtype is not None else batch


def _calls(root: nn.Module, batch: Batch) -> dict[int, tuple[int, bool]]:
    """id(module) → (how often one forward pass calls it, whether every call returned one tensor)."""
    seen: dict[int, tuple[int, bool]] = {}

    def hook(mod, _inputs, output):
        count, tensor = seen.get(id(mod), (0, True))
        seen[id(mod)] = (count + 1, tensor and isinstance(output, torch.Tensor))

    hooks = [m.register_forward_hook(hook) for _, m in root.named_modules() if m is not root]
    modes = [(m, m.training) for m in root.modules()]
    try:
        args, kwargs = batch
        root.eval()  # in training mode the run would update BatchNorm statistics: the model must not change
        with torch.no_grad():
            root(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
    return seen


def site_names(root: nn.Module) -> list[str]:
    """Every submodule with parameters: the modules branch may replace (the trace decides which it can)."""
    return [n for n, m in root.named_modules() if n and next(m.parameters(), None) is not None]


def _data_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target not in METADATA_CHECKS]


def _users(trace: Trace, fqn: str) -> list[fx.Node]:
    return [u for n in trace.graph.nodes if n.op == "get_attr" and str(n.target) == fqn for u in _data_users(n)]


def _inside(fqn: str, site: str) -> bool:
    return fqn == site or fqn.startswith(site + ".")


def _relative(fqn: str, site: str) -> str:
    return fqn[len(site) + 1:] if fqn != site else ""


def analyse(trace: Trace, root: nn.Module, name: str, calls: dict[int, tuple[int, bool]]) -> Site:
    """What branching ``name`` needs; :class:`NotGrowableError` naming the obstacle when even add cannot be exact."""
    module = root.get_submodule(name)
    count, tensor = calls.get(id(module), (0, True))
    if count == 0:
        raise NotGrowableError(f"'{name}' is never called by the forward pass; branch replaces a module called "
                               "exactly once (a ModuleList has no forward of its own: branch one of its elements)")
    if count != 1:
        raise NotGrowableError(f"'{name}' is called {count} times in one forward pass (a shared module); branch "
                               "replaces a module called exactly once")
    if not tensor:
        raise NotGrowableError(f"'{name}' returns something other than one tensor; branches are merged by adding "
                               "or concatenating tensors")
    mine = {id(p) for p in module.parameters()}
    for fqn, p in root.named_parameters(remove_duplicate=False):
        if id(p) in mine and not _inside(fqn, name):
            raise NotGrowableError(f"'{name}' shares a parameter with '{fqn}' (tied weights); branching would "
                                   "untie the copies")
    inner = {f"{name}.{n}" for n, _ in module.named_parameters(remove_duplicate=False)}
    inner |= {f"{name}.{n}" for n, _ in module.named_buffers()}
    for node in trace.graph.nodes:
        if node.op == "get_attr" and str(node.target) in inner:
            for user in _data_users(node):
                if not in_scope(user, name):
                    raise NotGrowableError(f"'{name}''s {str(node.target)[len(name) + 1:]} is read by "
                                           f"{op_name(user)}{where(user)}, outside its forward; a branch copy "
                                           "would not be used there")
    for sub, m in module.named_modules():
        for attr in INDEX_NAMES:
            if type(getattr(m, attr, None)) is int:
                path = ".".join(p for p in (sub, attr) if p)
                raise NotGrowableError(f"'{name}' holds a KV-cache index ({path} = {getattr(m, attr)}): its copies "
                                       "would share one cache slot, so generation with a cache would change; branch "
                                       "its projections or MLP instead")
    site = Site(name, module)
    try:
        site.out_layer, site.norms, site.channels, site.dim, site.axis = _output_layer(trace, root, name)
    except NotGrowableError as exc:
        site.concat_refusal = str(exc)
    return site


def _norm_module(root: nn.Module, node: fx.Node, name: str) -> str | None:
    """The BatchNorm module inside ``name`` whose own weights a traced batch_norm reads, if it is one."""
    reads = [attr_of(a) for a in node.args[1:5]]
    owner = reads[3].rpartition(".")[0] if reads[3] else None
    module = root.get_submodule(owner) if owner is not None and _inside(owner, name) else None
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None
    wanted = [f"{owner}.{t}" if getattr(module, t, None) is not None else None for t in NORM_TENSORS]
    return owner if reads == wanted else None


def _output_layer(trace: Trace, root: nn.Module, name: str) -> tuple[str, list[str], int, int, int]:
    """The Linear/Conv inside ``name`` whose output is ``name``'s output through ops that act on each channel
    alone (element-wise ops, BatchNorms), those BatchNorms, the channels, their dimension and weight dim."""
    outs = [n for n in trace.graph.nodes if n.op == "call_function" and in_scope(n, name)
            and any(u.op == "output" or not in_scope(u, name) for u in _data_users(n))]
    if len(outs) != 1:
        raise NotGrowableError(f"concat: '{name}' has {len(outs)} values leaving it in the trace, not one")
    node, norms = outs[0], []
    while isinstance(node.args[0] if node.args else None, fx.Node) and in_scope(node.args[0], name):
        if node.target in UNARY and not any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            node = node.args[0]
        elif node.target == aten.batch_norm.default and _norm_module(root, node, name) is not None:
            norms.append(_norm_module(root, node, name))
            node = node.args[0]
        else:
            break
    if node.target not in LINEAR | CONV | CONV_TRANSPOSE:
        raise NotGrowableError(f"concat: '{name}''s output is computed by {op_name(node)}{where(node)}, not by a "
                               "Linear or Conv whose output channels could be shared among branches (use merge add)")
    weight = attr_of(node.args[1])
    bias = attr_of(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
    layer = weight.rpartition(".")[0] if weight and weight.endswith(".weight") else None
    owner = root.get_submodule(layer) if layer is not None and _inside(layer, name) else None
    if not isinstance(owner, (nn.Linear,) + CONV_TYPES) or (bias is not None and bias != f"{layer}.bias") \
            or (bias is None and owner.bias is not None):
        raise NotGrowableError(f"concat: the {op_name(node)}{where(node)} computing '{name}''s output does not read "
                               "the weight and bias of one nn.Linear/Conv inside it")
    if len(_users(trace, weight)) != 1:
        raise NotGrowableError(f"concat: '{layer}' is used {len(_users(trace, weight))} times, so its output channels are not only "
                               f"'{name}''s output")
    if node.target not in LINEAR and conv_groups(node) != 1:
        raise NotGrowableError(f"concat: '{layer}' is a grouped convolution ({conv_groups(node)} groups); slicing "
                               "its output channels would break the groups (use merge add)")
    out = shape(node)
    # A Linear's features are its output's last dimension; a conv's channels come before its
    # spatial dimensions (dimension 1 of a batch, 0 of an unbatched input).
    if isinstance(owner, nn.Linear):
        dim = -1
    else:
        dim = len(out) - (owner.weight.dim() - 2) - 1 if out else 1
    if norms and (out is None or dim % len(out) != 1):  # a BatchNorm normalises dimension 1
        raise NotGrowableError(f"concat: a BatchNorm in '{name}' normalises dimension 1, not the channels of "
                               f"'{layer}' (dimension {dim} of {len(out) if out else '?'})")
    for norm in norms:
        if len(_users(trace, f"{norm}.running_mean")) != 1:
            raise NotGrowableError(f"concat: the BatchNorm '{norm}' is used {len(_users(trace, f'{norm}.running_mean'))} "
                                   "times")
    axis = 0 if node.target in LINEAR else conv_weight_dims(node)[0]
    return _relative(layer, name), [_relative(n, name) for n in norms], int(owner.weight.shape[axis]), dim, axis


def _sizes(site: Site, spec: BranchSpec) -> list[int]:
    if spec.sizes is not None:
        if sum(spec.sizes) != site.channels:
            raise UsageError(f"sizes {list(spec.sizes)} add up to {sum(spec.sizes)}, but '{site.name}' has "
                             f"{site.channels} output channels")
        return list(spec.sizes)
    if spec.branches > site.channels:
        raise NotGrowableError(f"concat: '{site.name}' has {site.channels} output channels, fewer than "
                               f"{spec.branches} branches")
    q, r = divmod(site.channels, spec.branches)
    return [q + (1 if i < r else 0) for i in range(spec.branches)]


def _describe(module: nn.Module) -> str:
    sizes = ("in_features", "out_features") if isinstance(module, nn.Linear) else ("in_channels", "out_channels")
    if isinstance(module, (nn.Linear,) + CONV_TYPES):
        return f"{type(module).__name__} {getattr(module, sizes[0])}→{getattr(module, sizes[1])}"
    return type(module).__name__


def branch_site(gm: GrowModel, site: Site, spec: BranchSpec) -> tuple[Branches, list[int]]:
    """Replace ``site`` by its branches, through recorded edits only; returns them and, for concat, their sizes."""
    root, name, module = gm.module, site.name, site.module
    sizes = _sizes(site, spec) if spec.merge == "concat" else []
    merged = Branches(spec.merge, spec.merge_weights(), site.dim if spec.merge == "concat" else -1)
    config = getattr(root, "config", None)  # copies share the model's config object instead of cloning it
    copies = [copy.deepcopy(module, memo={id(config): config} if config is not None else {})
              for _ in range(spec.branches - 1)]
    # The original moves into the new module; the copies are recorded as copies of it, so a
    # replay rebuilds them from the freshly built original (its weights then load strictly).
    holder = nn.Sequential(merged, module)
    gm.edits.module(root, name, holder, refs={id(module): name})
    gm.edits.insert(root, f"{name}.0.branches", 0, module, {"type": "ref", "name": f"{name}.1"})
    for i, twin in enumerate(copies, 1):
        for made, source in zip(twin.parameters(), module.parameters()):
            gm.edits.derive(made, source)
        gm.edits.insert(root, f"{name}.0.branches", i, twin, {"type": "copy", "name": f"{name}.1"})
    gm.edits.module(root, name, merged, refs={id(merged): f"{name}.0"})
    start = 0
    for i, size in enumerate(sizes):  # concat: each branch keeps its rows of the layer and of the BatchNorms after it
        keep = [Origin((AxisMap(a, tuple(range(start, start + size)), (1.0,) * size),)) for a in (0, site.axis)]
        layer = _branch_path(name, i, site.out_layer)
        count = "out_features" if isinstance(root.get_submodule(layer), nn.Linear) else "out_channels"
        for path, attr, tensors in [(layer, count, ("weight", "bias"))] + \
                [(_branch_path(name, i, n), "num_features", NORM_TENSORS) for n in site.norms]:
            module = root.get_submodule(path)
            for t in tensors:
                axis = site.axis if (path, t) == (layer, "weight") else 0
                if getattr(module, t, None) is not None:
                    gm.edits.param(root, f"{path}.{t}", getattr(module, t).narrow(axis, start, size), keep[axis > 0])
            gm.edits.attr(root, path, attr, size)
        start += size
    return merged, sizes


def _branch_path(site: str, i: int, rel: str | None) -> str:
    return ".".join(p for p in (site, "branches", str(i), rel) if p)


def _select(layer: str | list[str], names: list[str]) -> list[str]:
    """Modules matched by ``layer``; a pattern that is a module's full name means that module alone
    (in an ``nn.Sequential``, ``1`` is not also the dotted suffix of ``0.1``)."""
    chosen = {n for p in ([layer] if isinstance(layer, str) else layer)
              for n in ([p] if p in names else select(p, names, "layer"))}
    return [n for n in names if n in chosen]


def _prepare(gm: GrowModel) -> tuple[Trace, dict[int, tuple[int, bool]]]:
    root, batch = gm.module, _sample(gm)
    trace = trace_model(root, batch)
    if trace.is_model:
        raise NotGrowableError("branch: a .pt2 program has no layer modules to replace (its forward is one flat "
                               "graph); load the weights with --arch, or a Hugging Face directory, to branch")
    return trace, _calls(root, batch)


def branch_candidates(gm: GrowModel) -> dict[str, str | None]:
    """Each module with parameters → ``None`` if it can be branched (merge add), else why not."""
    try:
        trace, calls = _prepare(gm)
    except NotGrowableError as exc:
        return {"(model)": str(exc)}
    out: dict[str, str | None] = {}
    for name in site_names(gm.module):
        try:
            analyse(trace, gm.module, name, calls)
            out[name] = None
        except NotGrowableError as exc:
            out[name] = str(exc)
    return out


@register("branch", BranchSpec, exact=True, candidates=branch_candidates,
          help="Replace a layer or block by parallel branches merged by a weighted sum or a concatenation (Cai et al. "
               "2018).")
def branch(gm: GrowModel, spec: BranchSpec, ctx: Context) -> StepReport:
    """Branch every module matched by ``spec.layer``; all are analysed before any is changed.

    Raises :class:`NotGrowableError` naming what makes a branching inexact (a shared module,
    a non-tensor output, parameters read outside the module; for concat, an output not
    computed by a Linear/Conv), and :class:`UsageError` for ``sizes`` that do not fit.
    """
    root = gm.module
    report = StepReport("branch", dataclasses.asdict(spec), params_before=gm.num_parameters())
    trace, calls = _prepare(gm)
    report.matched = _select(spec.layer, site_names(root))
    overlap = next(((a, b) for a in report.matched for b in report.matched if b.startswith(a + ".")), None)
    if overlap:
        raise UsageError(f"'{overlap[0]}' and '{overlap[1]}' overlap (one is inside the other); branch one of them per step")
    sites = [analyse(trace, root, name, calls) for name in report.matched]
    for site in sites if spec.merge == "concat" else []:
        if site.concat_refusal:
            raise NotGrowableError(site.concat_refusal)
        _sizes(site, spec)
    for site in sites:
        before = _describe(site.module)
        merged, sizes = branch_site(gm, site, spec)
        if spec.merge == "add":
            after = f"{spec.branches} copies, outputs summed with weights {', '.join(f'{w:g}' for w in merged.weights)}"
        else:
            after = f"{spec.branches} branches of {'+'.join(map(str, sizes))} output channels, concatenated"
        report.changes.append({"name": site.name, "before": before, "after": after})
    report.exact_in_dtype = True  # branches hold bit copies or row slices of the weights; nothing is rounded
    weights = spec.merge_weights()
    if weights is not None and not all(math.frexp(w)[0] == 0.5 for w in weights):
        report.notes.append(f"merge weights {', '.join(f'{w:.6g}' for w in weights)} are not all powers of two: "
                            "each weighted output and their sum round, a few units in the last place of the output's "
                            "dtype (exact in real arithmetic); powers of two such as 0.5, 0.25, 0.25 are exact "
                            "bit for bit in every dtype")
    report.params_after = gm.num_parameters()
    return report
