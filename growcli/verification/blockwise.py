"""Block-wise verification: two checkpoints compared at every block boundary, never loaded whole.

For models too large to hold twice (and for streamed outputs, :mod:`growcli.run.streaming`),
each model runs the verification batch with its weights on disk (:class:`OnDisk`), every
module's tensors loaded only while it runs: a forward pre-hook reads them from disk in the
verification dtype, a forward hook frees them (for a block, after recording the stream it
leaves). Each tensor is loaded by the module that owns it (a block's projections one at a time,
the embeddings before the blocks, the final norm and head after them); a model that reads a
tensor without calling its module gets its block's tensors for the block's call, or the tensors
outside the blocks for the whole pass (:class:`_Run`). The model's own ``forward`` runs unchanged, so every block gets exactly the
arguments the model passes it (masks, position embeddings, per-layer attention types), and
the outputs are the model's real outputs. One model runs at a time; what is kept is one
module's (at most one block's) weights and the stream at every boundary of the batch
(``blocks + 1`` activations).

Then both runs are compared through the :class:`StreamMap` between the streams: at every
boundary of the grown model (``max|a − b| ≤ atol + rtol · max|a|``, per boundary, the worst
over the batches) and on every final output as :func:`growcli.verification.compare.verify_models`
does. The verdict needs both; the first boundary that differs names the block that broke.
The block stack itself is found by the caller (by the analysis, :mod:`growcli.analysis.blocks`).

The two models may be of different classes with one residual stream, such as a dense decoder
and its upcycled mixture of experts: each is built from its own config, its blocks read their
own tensors (fused 3-D experts through transformers' load conversion, :class:`OnDisk`), and a
router sees only its block's input, so the comparison at each boundary is the same computation
as in the whole models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from growcli.core.errors import GrowError, InputsError, NotGrowableError
from growcli.core.inputs import Batch, cast_batch
from growcli.verification.compare import (DATA_MOVES, DEFAULT_TOL, OutputCheck, VerifyReport, compare_outputs,
                                         default_tolerance, finite_json, flatten_outputs, observing)
from growcli.verification.chunked import chunkable, sliced_forward
from growcli.verification.ondisk import OnDisk
from growcli.verification.stream_map import StreamMap


@dataclass
class BlockCheck:
    """The stream leaving grown block ``block`` (``-1``: entering the first block) vs original boundary ``original``."""

    block: int
    name: str
    original: int
    max_abs_diff: float
    max_rel_diff: float
    scale: float
    tolerance: float
    passed: bool


@dataclass
class BlockwiseReport:
    """Per-boundary and final-output checks; ``first_failing`` names the first block that broke.

    ``map_source``: where the map between the streams came from, ``"recorded"`` (the growth steps:
    the grown directory's ``growth_report.json`` or the plan being written) or ``"inferred"`` (by
    depth, or the hidden axis by width); ``map_note`` says what was inferred and why.
    """

    passed: bool
    dtype: str
    batches: int
    atol: float
    rtol: float
    max_abs_diff: float
    outputs: list[OutputCheck] = field(default_factory=list)
    blocks: list[BlockCheck] = field(default_factory=list)
    first_failing: str | None = None
    note: str = ""
    map_source: str = "inferred"
    map_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return finite_json(asdict(self))

    def summary(self) -> str:
        worst = max(self.blocks, key=lambda b: b.max_abs_diff, default=None)
        where = f"; first breaking: {self.first_failing}" if self.first_failing else ""
        blocks = f", worst boundary {worst.max_abs_diff:.3g} ({worst.name})" if worst else ""
        return (f"{'equal' if self.passed else 'NOT equal'} in {self.dtype} over {self.batches} batches, block by "
                f"block ({self.map_source} map): max abs diff {self.max_abs_diff:.3g} on the outputs{blocks}{where}")

    def verify_report(self) -> VerifyReport:
        """The common report's shape: final outputs, with the verdict and the breaking block included."""
        note = "; ".join(n for n in (f"block-wise over {len(self.blocks) - 1} blocks", self.note,
                                     f"first breaking: {self.first_failing}" if self.first_failing else "") if n)
        return VerifyReport(self.passed, self.dtype, self.batches, self.atol, self.rtol, self.max_abs_diff,
                            list(self.outputs), note)


class _MetaUse(NotGrowableError):
    """The forward pass read a tensor that is not loaded (its module was not called)."""


class _NoMeta(TorchDispatchMode):
    """Fail any op on a meta tensor: some ops silently mix a meta operand into a result on the CPU."""

    def __init__(self, who: str):
        super().__init__()
        self.who = who

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tree_leaves((args, kwargs or {}))):
            raise _MetaUse(f"block-wise verification: {self.who} reads a tensor that is not loaded ({func})")
        return func(*args, **(kwargs or {}))


class _Run:
    """One model's forward pass on one batch, its blocks loaded one at a time; the stream at each boundary.

    Every tensor is loaded by the module that owns it, for the time of its call (a block's
    projections one after the other, the embeddings before the blocks, the head after them), so
    memory holds about the largest single tensor, not a block. When the model reads a tensor
    without calling its owner (an op gets a meta tensor, :class:`_NoMeta`), the pass is run again
    with each block's tensors loaded for the block's call, and if that is not enough with the
    tensors outside the blocks held for the whole pass, for this and every later batch.
    """

    def __init__(self, model: OnDisk, container: str, dtype: torch.dtype, who: str):
        self.model, self.container, self.dtype, self.who = model, container, dtype, who
        self.blocks = list(model.module.get_submodule(container))
        self.keys = [model.keys_under(f"{container}.{i}") for i in range(len(self.blocks))]
        inside = {k for keys in self.keys for k in keys}
        self.outside = [k for k in model.keys_under("") if k not in inside]
        self.owners = _owners(model, self.outside)
        self.inner = [_owners(model, keys) for keys in self.keys]
        self.leafwise = True  # each block's tensors loaded by their owners (else by the block)
        self.lazy = True  # the tensors outside the blocks loaded by their owners (else for the whole pass)

    def __call__(self, batch: Batch) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        while True:
            try:
                return self._forward(batch)
            except _MetaUse:
                if not (self.leafwise or self.lazy):
                    raise
                if self.leafwise:
                    self.leafwise = False  # next: each block's tensors for the block's call
                else:
                    self.lazy = False  # next: the tensors outside the blocks for the whole pass

    def _forward(self, batch: Batch) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        model = self.model
        model.module.to(self.dtype)  # buffers (rotary frequencies…) in the verification dtype, as verify_models
        stream: list[torch.Tensor | None] = [None] * (len(self.blocks) + 1)
        calls = [0] * len(self.blocks)
        handles = []
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(self._enter(i, stream), with_kwargs=True))
            handles.append(block.register_forward_hook(self._leave(i, stream, calls)))
        owners = (list(self.owners.values()) if self.lazy else []) + \
            ([o for inner in self.inner for o in inner.values()] if self.leafwise else [])
        sliced = []  # owners run with their weight read from disk in slices (verification.chunked)
        for owner, keys in owners:
            weight = chunkable(model, owner, keys, self.dtype)
            if weight is not None:
                owner.forward = sliced_forward(model, owner, weight, self.dtype)
                sliced.append(owner)
                keys = [k for k in keys if k != weight]
            handles.append(owner.register_forward_pre_hook(lambda m, a, keys=keys: model.load(keys, self.dtype)))
            handles.append(owner.register_forward_hook(lambda m, a, o, keys=keys: model.release(keys)))
        try:
            if not self.lazy:
                model.load(self.outside, self.dtype)
            args, kwargs = cast_batch(batch, self.dtype)
            with torch.no_grad(), _NoMeta(model.name):
                outputs = flatten_outputs(model.module(*args, **kwargs))
        except GrowError:
            raise
        except Exception as exc:  # as run_model reports it: who failed, on what, why
            shapes = ", ".join([str(list(t.shape)) for t in batch[0]] +
                               [f"{k}={list(v.shape)}" for k, v in batch[1].items()])
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise InputsError(f"{self.who} failed block by block on inputs of shape {shapes} "
                              f"({type(exc).__name__}: {detail})") from None
        finally:
            for h in handles:
                h.remove()
            for owner in sliced:
                del owner.forward
            model.release()
        ran = [i for i, n in enumerate(calls) if n != 1]
        if ran or stream[0] is None:
            i = ran[0] if ran else 0
            raise NotGrowableError(f"block-wise verification: {model.name} called {self.container}.{i} "
                                   f"{calls[i]} times in one forward pass; blocks must run once each, in order")
        return outputs, stream

    def _enter(self, i: int, stream: list):
        def hook(block, args, kwargs):
            entering = _first_float(list(args) + list(kwargs.values()))
            if i == 0:
                stream[0] = entering.clone() if entering is not None else None
            elif entering is None or stream[i] is None or not torch.equal(entering, stream[i]):
                # the boundary between two blocks must be one stream: what one leaves, the next gets
                raise NotGrowableError(f"block-wise verification: {self.container}.{i} of {self.model.name} does not "
                                       f"get the stream {self.container}.{i - 1} leaves; its blocks are not one "
                                       "residual stream")
            if not self.leafwise:
                self.model.load(self.keys[i], self.dtype)
        return hook

    def _leave(self, i: int, stream: list, calls: list):
        def hook(block, args, output):
            calls[i] += 1
            hidden = _hidden(output)
            if hidden is None or stream[i] is None or hidden.shape != stream[i].shape:
                got = list(hidden.shape) if hidden is not None else type(output).__name__
                given = list(stream[i].shape) if stream[i] is not None else "?"
                raise NotGrowableError(f"block-wise verification: {self.container}.{i} of {self.model.name} returns "
                                       f"{got} from a stream of {given}; its output is not the residual stream")
            stream[i + 1] = hidden.detach().clone()
            self.model.release(self.keys[i])
        return hook


def _owners(model: OnDisk, keys: list[str]) -> dict[int, tuple[nn.Module, list[str]]]:
    """The modules owning ``keys`` (every alias of a tied tensor), each with the keys it owns."""
    owners: dict[int, tuple[nn.Module, list[str]]] = {}
    for key in keys:
        for owner, _, _ in model.slots[key]:
            owners.setdefault(id(owner), (owner, []))[1].append(key)
    return owners


def _first_float(values: list) -> torch.Tensor | None:
    """The stream entering a block: its first floating-point tensor argument (positional first)."""
    return next((v.detach() for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()), None)


def _hidden(output: Any) -> torch.Tensor | None:
    """The stream a block returns: the output itself, or the first element of a tuple or model output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        return _hidden(output.to_tuple())
    return None


def tolerances(original: OnDisk, grown: OnDisk, dtype: torch.dtype, atol: float | None,
               rtol: float | None) -> tuple[float, float]:
    """growcli's defaults for the least precise of ``dtype``, both checkpoints' stored dtypes and their buffers'.

    As whole-model verification (:func:`growcli.verification.compare.storage_precision`), the
    buffers count as the model makes them: a float64 checkpoint whose model keeps its rotary
    frequencies in float32 is held to float32 rounding by either check.
    """
    stored = original.dtypes() | grown.dtypes() | original.buffer_dtypes | grown.buffer_dtypes
    precision = max({dtype} | stored, key=lambda d: torch.finfo(d).eps)
    d_atol, d_rtol = DEFAULT_TOL.get(precision, DEFAULT_TOL[torch.float32])
    return (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)


def verify_blockwise(original: OnDisk, grown: OnDisk, batches: list[Batch], *, original_blocks: str,
                     grown_blocks: str, stream_map: StreamMap | None = None, dtype: torch.dtype = torch.float64,
                     atol: float | None = None, rtol: float | None = None,
                     exact_in_dtype: bool | None = None) -> BlockwiseReport:
    """Run both checkpoints block by block on ``batches`` and compare every boundary and output.

    ``original_blocks``/``grown_blocks`` name each model's block container; ``stream_map``
    (default: same depth) maps the grown boundaries onto the original's. Raises
    :class:`NotGrowableError` when a model's blocks do not form one residual stream (a block
    run other than once, returning something else than a stream of the shape it got, or not
    getting what the block before it returned) or the map does not fit; :class:`InputsError`
    without batches or when a model fails on them (float64 falls back to float32 first).
    ``exact_in_dtype`` is what the step says, as for :func:`growcli.verification.compare.verify_models`: True
    holds the run to the exact tolerance of the original's arithmetic (rounding stages and the least precise dtype
    it computes in), observed on its first block-by-block pass, loading excepted.
    """
    if not batches:
        raise InputsError("block-wise verification needs at least one batch of inputs")
    note = ""
    try:
        return _measure(original, grown, batches, original_blocks, grown_blocks, stream_map, dtype, atol, rtol, note,
                        exact_in_dtype)
    except InputsError:
        if dtype != torch.float64:
            raise
        note = "float64 not supported by this model; checked in float32"
        return _measure(original, grown, batches, original_blocks, grown_blocks, stream_map, torch.float32, atol, rtol,
                        note, exact_in_dtype)


def _measure(original: OnDisk, grown: OnDisk, batches: list[Batch], original_blocks: str, grown_blocks: str,
             stream_map: StreamMap | None, dtype: torch.dtype, atol: float | None, rtol: float | None,
             note: str, exact_in_dtype: bool | None = None) -> BlockwiseReport:
    run_a = _Run(original, original_blocks, dtype, "the original model")
    run_b = _Run(grown, grown_blocks, dtype, "the grown model")
    la, lb = len(run_a.blocks), len(run_b.blocks)
    if stream_map is None:
        if la != lb:
            raise NotGrowableError(f"block-wise verification: the grown model has {lb} blocks, the original {la}; "
                                   "say how they map (the grown directory's growth_report.json records it)")
        stream_map = StreamMap(tuple(range(la + 1)), source="inferred", note="same depth: no map given or recorded")
    stream_map.check(lb, la)
    map_source, map_notes = stream_map.source, [stream_map.note] if stream_map.note else []
    first = None
    if exact_in_dtype and atol is None and rtol is None:  # the exact bound of the original's own arithmetic
        with observing(dtype, DATA_MOVES) as profile:
            first = run_a(batches[0])
        stored = original.dtypes() | grown.dtypes() | original.buffer_dtypes | grown.buffer_dtypes
        precision = max({dtype} | stored, key=lambda d: torch.finfo(d).eps)
        atol, rtol, _ = default_tolerance(profile, precision, dtype, True)
    atol, rtol = tolerances(original, grown, dtype, atol, rtol)
    outputs: dict[str, OutputCheck] = {}
    bounds: dict[str, OutputCheck] = {}
    names = [f"before {grown_blocks}.0"] + [f"{grown_blocks}.{j}" for j in range(lb)]
    for k, batch in enumerate(batches):
        out_a, stream_a = first if k == 0 and first is not None else run_a(batch)
        out_b, stream_b = run_b(batch)
        index = stream_map.hidden_index(stream_b[0].shape[-1], stream_a[0].shape[-1])
        wide_a, wide_b = stream_a[0].shape[-1], stream_b[0].shape[-1]
        if k == 0 and stream_map.hidden is None and wide_a != wide_b:
            map_source = "inferred"  # the widths differ and nothing says how: growcli's one tiling
            if not any(n.startswith("hidden axis by width") for n in map_notes):
                map_notes.append(f"hidden axis by width: one tiling {wide_a} → {wide_b}")
        keep = torch.tensor([j for j, i in enumerate(index) if i >= 0], dtype=torch.long)
        source = torch.tensor([i for i in index if i >= 0], dtype=torch.long)
        for j, b in enumerate(stream_b):
            a = stream_a[stream_map.depth[j]]
            compare_outputs({names[j]: a.index_select(-1, source)}, {names[j]: b.index_select(-1, keep)}, atol,
                            rtol, bounds)
        compare_outputs(out_a, out_b, atol, rtol, outputs)
        del stream_a, stream_b
    blocks = [BlockCheck(j - 1, names[j], stream_map.depth[j], c.max_abs_diff, c.max_rel_diff, c.scale, c.tolerance,
                         c.passed) for j, c in enumerate(bounds[n] for n in names)]
    first = next((b.name for b in blocks if not b.passed), None)
    finals = list(outputs.values())
    passed = bool(finals) and all(o.passed for o in finals) and first is None
    if first is not None and first == names[0]:
        note = "; ".join(n for n in (note, "the streams differ before the first block (embeddings)") if n)
    return BlockwiseReport(passed, str(dtype).removeprefix("torch."), len(batches), atol, rtol,
                           max((o.max_abs_diff for o in finals), default=math.inf), finals, blocks, first, note,
                           map_source, "; ".join(map_notes))
