"""The checkpoint names of a streamed width step, including tensors transformers converts when it loads and saves.

transformers 5 holds some parameters in another form than the checkpoint stores them: a mixture
of experts' fused 3-D ``experts.gate_up_proj`` ``[E, 2I, H]`` is built on load from one ``w1`` and
one ``w3`` per expert, and split back on save (its ``WeightConverter`` mapping). A streamed width
step (:mod:`growcli.run.width_stream`) plans on the meta model, so its rewrites are of the fused
parameters; here each such parameter's *group* — the saved tensors that feed it, as transformers'
own load conversion collects them (:class:`growcli.verification.ondisk._LoadConversion`) — is read
when its first tensor is written, converted to the parameter exactly as ``from_pretrained`` does,
rewritten by the step's own :class:`~growcli.transforms.width_edit.Rewrite` (the in-memory
path's computation, bit for bit), converted back by transformers' save conversion
(``revert_weight_conversion``, what ``save_pretrained`` runs) and written as the saved tensors it
gives. A group is held only until its last tensor is written: memory is one layer's experts.

Checked before any byte is read, on meta placeholders: the load conversion runs and builds each
parameter in its planned shape, and the save conversion of the input-shaped parameters gives back
exactly the group's names and shapes. When a group is read, the save conversion of what was loaded
must give back the very tensors read (``torch.equal``): a conversion whose reverse is not exact is
refused, naming the parameter. A group the step leaves alone (the experts, when only attention heads
grow) is a byte copy of its saved tensors — what ``save_pretrained`` writes, as that round trip on
the real tensors of the first such group of each converter shows before anything is written. A
converted parameter tied to another one is refused.
Checkpoints without conversions go on exactly as before (:func:`saved_tensors` returns the
one-to-one names). Chains of streamed steps (:mod:`growcli.run.stream_chain`) still refuse them.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from growcli.core.errors import NotGrowableError
from growcli.core.model import GrowModel
from growcli.io.shards import TensorRef
from growcli.run.stream_names import checkpoint_names, meta_model, one_to_one_names, saved_shapes
from growcli.run.upcycle_stream import Entry
from growcli.run.width_output import _structure, saved_names
from growcli.transforms.width_edit import Rewrite
from growcli.verification.ondisk import _LoadConversion, read_tensor

_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
Rounded = Callable[[str, str, torch.dtype], None]
Rewriter = Callable[[torch.Tensor, Rewrite], tuple[torch.Tensor, str]]


@dataclass
class Group:
    """Parameters transformers builds from several saved tensors, and what the grown ones are saved as."""

    key: str  # the load conversion's group (its first target)
    params: list[str]  # the parameters the group makes
    sources: dict[str, tuple[str, tuple[int, ...]]]  # saved name read → (dtype code, shape)
    outputs: dict[str, tuple[str, tuple[int, ...]]]  # saved name written → (dtype code, shape)
    jobs: dict[str, Rewrite]  # parameter → its rewrite (a parameter without one goes through both conversions)


@dataclass
class SavedTensors:
    """What a streamed width step writes under which name: ``disk`` and ``keep`` as
    :func:`growcli.run.width_stream.plan_entries` takes them (tensors saved one to one), ``groups``
    the converted parameters, written by :meth:`entries`; :meth:`structure` checks the written directory."""

    disk: dict[str, str]
    keep: set[str]
    groups: list[Group] = field(default_factory=list)
    load: _LoadConversion | None = None
    grown: torch.nn.Module | None = None
    source: torch.nn.Module | None = None

    def entries(self, plain: list[Entry], on_rounded: Rounded, rewrite: Rewriter) -> list[Entry]:
        """``plain`` (the one-to-one tensors) and every converted group's saved tensors, in natural name order;
        ``rewrite`` applies a planned rewrite to the tensor read (:func:`growcli.run.width_stream.apply_rewrite`)."""
        if not self.groups:
            return plain
        made: list[Entry] = []
        for group in self.groups:
            held = _Held(self, group, on_rounded, rewrite)
            made += [Entry(name, code, shape, [held.taker(name)]) for name, (code, shape) in group.outputs.items()]
        return sorted(plain + made, key=lambda e: _natural(e.name))

    def structure(self, tmp: Path, written: dict[str, tuple[int, ...]]) -> str:
        """The written config rebuilds (on the meta device) exactly the written tensors, converted ones included."""
        if self.load is None:  # nothing converted
            return _structure(tmp, written)
        want = saved_shapes(meta_model(tmp))
        bad = [f"{k} {list(s)} vs config {list(want[k])}" for k, s in written.items() if k in want and want[k] != tuple(s)]
        bad += [f"unexpected {k}" for k in written if k not in want]
        if bad:
            raise NotGrowableError(f"the written tensors do not fit the new config ({bad[0]})")
        return f"the new config rebuilds {len(want)} tensors; all {len(written)} written ones match in name and shape"

    def loaded(self, group: Group) -> dict[str, torch.Tensor]:
        """``group``'s parameters as ``from_pretrained`` builds them, each saved tensor read once; refused
        (naming the parameter) when the save conversion of them does not give back the very tensors read."""
        from transformers.core_model_loading import revert_weight_conversion

        items = self.load.groups[group.key]
        read = {key: read_tensor(self.load.refs[key]) for key, _ in items}
        converter = copy.deepcopy(self.load.converters[items[0][1]])
        for key, pattern in items:
            converter.add_tensor(group.key, key, pattern, lambda t=read[key]: t)
        made = converter.convert(group.key, model=self.source, config=self.source.config)
        loaded = {k: v[0] if isinstance(v, list) else v for k, v in made.items() if k in group.params}
        back = revert_weight_conversion(self.source, dict(loaded))
        if set(back) != set(read) or not all(_same(back[n], read[n]) for n in read):
            raise NotGrowableError(f"--streaming: transformers' save conversion of {group.params[0]} does not give "
                                   "back the tensors it was loaded from (its reverse is not exact); use --no-streaming")
        return loaded

    def compute(self, group: Group, on_rounded: Rounded, apply_rewrite: Rewriter) -> dict[str, torch.Tensor]:
        """``group``'s saved tensors after the step: read, loaded, rewritten, saved back (see the module docstring)."""
        from transformers.core_model_loading import revert_weight_conversion

        loaded = self.loaded(group)
        new = {}
        for param, tensor in loaded.items():
            job = group.jobs.get(param)
            if job is None:
                new[param] = tensor
                continue
            new[param], why = apply_rewrite(tensor, job)
            if why:
                on_rounded(job.name, why, job.dtype)
        saved = revert_weight_conversion(self.grown, new)
        got = {k: (_CODES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in saved.items()}
        if got != group.outputs:
            raise NotGrowableError(f"--streaming: transformers' save conversion of the grown {group.params[0]} gives "
                                   f"other tensors than planned on the meta device; use --no-streaming")
        return saved


class _Held:
    """One group's saved tensors, computed when the first is written and each dropped once written."""

    def __init__(self, names: SavedTensors, group: Group, on_rounded: Rounded, rewrite: Rewriter):
        self.names, self.group, self.on_rounded, self.rewrite = names, group, on_rounded, rewrite
        self.tensors: dict[str, torch.Tensor] = {}

    def taker(self, name: str) -> Callable[[], torch.Tensor]:
        def take() -> torch.Tensor:
            if name not in self.tensors:  # the group's first tensor written (or one asked for again)
                self.tensors = self.names.compute(self.group, self.on_rounded, self.rewrite)
            return self.tensors.pop(name).contiguous()
        return take


def saved_tensors(src: Path, gm: GrowModel, refs: dict[str, TensorRef], jobs: list[Rewrite],
                  siblings: dict[str, list[str]]) -> SavedTensors:
    """How the step's output is named: one-to-one names as before, and the groups of converted parameters.

    Raises :class:`NotGrowableError` (the one-to-one refusal) when the checkpoint has tensors transformers
    merges or splits but no load conversion of the model's class collects them, or when a converted group
    fails one of the meta-device checks of the module docstring.
    """
    module = gm.module
    try:
        disk = checkpoint_names(module)
        return SavedTensors(disk, saved_names(gm, disk))
    except Exception as exc:  # merged or split tensors (refused), or a save conversion that fails on meta tensors
        refused = exc
    source = meta_model(src).to(next(module.parameters()).dtype)
    load = _LoadConversion(source, refs, set(), str(src), purpose="--streaming")
    if not load.targets:
        raise refused
    try:
        disk = one_to_one_names(module, skip=load.targets)
    except Exception as exc:
        raise NotGrowableError(f"--streaming: transformers' save conversion of {type(module).__name__}'s other "
                               f"weights cannot run on meta placeholders ({type(exc).__name__}: {str(exc)[:120]}); "
                               "use --no-streaming") from None
    by_name = {j.name: j for j in jobs}
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    groups = []
    for key in load.groups:
        made = [p for p, g in load.targets.items() if g == key]
        tied = next((p for p in made if len(siblings.get(p, [p])) > 1), None)
        if tied is not None:
            raise NotGrowableError(f"--streaming: {tied} is converted by transformers when saved and tied to "
                                   f"{[s for s in siblings[tied] if s != tied][0]}; use --no-streaming")
        sources = {k: (refs[k].dtype, tuple(refs[k].shape)) for k, _ in load.groups[key]}
        placeholders = {p: torch.empty(source.get_parameter(p).shape, dtype=source.get_parameter(p).dtype,
                                       device="meta") for p in made}
        grown = {p: torch.empty(module.get_parameter(p).shape, dtype=module.get_parameter(p).dtype, device="meta")
                 for p in made}
        try:
            back, outputs = _meta_revert(source, placeholders), _meta_revert(module, grown)
        except Exception as exc:  # a save conversion that needs real values
            raise NotGrowableError(f"--streaming: transformers' save conversion of {made[0]} cannot run on meta "
                                   f"placeholders ({type(exc).__name__}: {str(exc)[:120]}); use --no-streaming") from None
        if back != sources:
            raise NotGrowableError(f"--streaming: transformers' save conversion of {made[0]} does not give back the "
                                   "tensors it is loaded from (names, dtypes or shapes); use --no-streaming")
        groups.append(Group(key, made, sources, outputs, {p: by_name[p] for p in made if p in by_name}))
    missing = [p for p in params if p not in disk and p not in load.targets]
    if missing:
        raise NotGrowableError(f"--streaming: the checkpoint has no tensor for {missing[0]} (transformers' load "
                               "conversion builds it from none); use --no-streaming")
    copied = [g for g in groups if not g.jobs and g.outputs == g.sources]
    names = SavedTensors(disk, saved_names(gm, disk), [g for g in groups if g not in copied], load, module, source)
    # A group the step leaves alone is a byte copy of its saved tensors, which is what save_pretrained writes when
    # the conversion's round trip is exact: checked on the real tensors of the first such group per converter.
    kinds: set[str] = set()
    for group in copied:
        kind = load.groups[group.key][0][1]
        if kind not in kinds:
            names.loaded(group)
            kinds.add(kind)
        names.keep |= set(group.outputs)
    return names


def _meta_revert(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    from transformers.core_model_loading import revert_weight_conversion

    return {k: (_CODES.get(v.dtype, str(v.dtype)), tuple(v.shape))
            for k, v in revert_weight_conversion(module, dict(state)).items()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(a, b)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
