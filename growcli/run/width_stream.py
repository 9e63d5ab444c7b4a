"""Streaming execution of the width steps ``hidden``, ``heads`` and FFN ``widen``: a Hugging Face checkpoint widened tensor by tensor.

The model is built on the meta device (no memory) and the step runs on it exactly as in
memory — the same trace-based analysis, the same head choices drawn from the same seeded
generator, the same config updates — except that :func:`growcli.transforms.width_edit.apply_edit`
only plans (:func:`deferred_rewrites`): every tensor it would rewrite becomes a
:class:`~growcli.transforms.width_edit.Rewrite` (its dimension maps and the generator state
the in-memory path would have at that tensor). Then each output tensor is written on its own:
a tensor the step does not change is a byte copy from the input shards; one that gathers its own rows
(FFN ``widen``'s up and gate projections) is byte copies of long runs of rows (:mod:`growcli.run.width_rows`); a rewritten one is read
from disk, rewritten by :func:`apply_rewrite` (the in-memory path's own code; large tensors in
slices along a dimension no map touches) and written (the next ones computed meanwhile on a worker thread: :mod:`growcli.run.width_ahead`),
so peak memory is about two tensors and a bounded queue, not the model, and every written tensor equals, bit for bit, the one the in-memory path saves. FFN
``widen`` defers the same way (:func:`growcli.transforms.widen.widen_group`); its data-driven
inits (gradmax, firefly) are refused. A tied weight the step unties (the output projection of a tied
embedding) is computed from the one tensor the checkpoint stores for both.

Outputs up to ``verify_limit`` bytes are loaded back from disk and run against the input, also
loaded from disk, at the tolerance the in-memory step would use (exact in the dtype or not);
larger outputs are run block by block from disk (:func:`growcli.run.streaming.blockwise_check`,
which maps the hidden axis of a grown hidden size by its tiling).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from growcli.core.errors import FormatError, GrowError, NotGrowableError, UsageError
from growcli.core.model import GrowModel
from growcli.io.atomic import atomic_output
from growcli.io.hf_dir import hf_inputs
from growcli.io.shards import INDEX, ITEMSIZE, TensorRef, read_tensors, shard_names
from growcli.io.sidefiles import copy_side_files
from growcli.run.steps import VerifySettings
from growcli.run.stream_names import meta_model
from growcli.run.stream_source import read_entry, whole_ref
from growcli.run.streaming import VERIFY_LIMIT, Progress, Streamed, byte_progress, verify_written
from growcli.run.upcycle_stream import DTYPES, Entry, pack, write_file
from growcli.run.width_fused import saved_tensors
from growcli.run.width_ahead import Ahead as _Ahead
from growcli.run.width_rows import RowGather, row_pieces
from growcli.run.width_output import _run_both, _structure, saved_names  # noqa: F401 (saved_names, _structure: re-exported)
from growcli.transforms.catalog import get_transform
from growcli.transforms.hfconfig import config_error, mismatches, validate_config
from growcli.transforms.registry import Context, StepReport
from growcli.transforms.width_edit import Rewrite, deferred_rewrites, note_rounding, rewrite


CHUNK = 1 << 22  # elements of output per piece when a tensor is rewritten in pieces (float64 temporaries: 32 MB)


def apply_rewrite(old: torch.Tensor, job: Rewrite, chunk: int | None = None) -> tuple[torch.Tensor, str]:
    """``job`` applied to the tensor it planned for (read from disk): the new tensor, and why it is not
    exact in its dtype ("" when it is); bit for bit what :func:`growcli.transforms.width_edit.apply_edit`
    computes in memory.

    A tensor of more than ``chunk`` output elements (default :data:`CHUNK`) is rewritten in slices
    along the dimension :func:`_slice_dim` picks: every step of the rewrite acts on each such slice
    on its own, so the slices are the whole result's and the float64 temporaries stay small. The
    slices are copied into one preallocated output (no concatenation of a second copy).
    """
    pieces = rewrite_pieces(old, job, chunk)
    return _assemble(job, next(pieces), pieces)


def _assemble(job: Rewrite, first: tuple, rest: Iterator[tuple]) -> tuple[torch.Tensor, str]:
    """The result of :func:`rewrite_pieces`' slices (``first``, then ``rest``), and why it is not exact."""
    if first[0] is None:  # not sliced: the one piece is the result
        new, why = first[2], first[3]
    else:
        new = torch.empty(job.shape, dtype=first[2].dtype)
        why = ""
        for d, a, piece, reason in [first, *rest]:
            new.narrow(d, a, piece.shape[d]).copy_(piece)
            why = why or reason
    if tuple(new.shape) != tuple(job.shape):
        raise NotGrowableError(f"{job.name}: came out {list(new.shape)}, planned {list(job.shape)}")
    return new, why


def rewrite_pieces(old: torch.Tensor, job: Rewrite, chunk: int | None = None
                   ) -> Iterator[tuple[int | None, int, torch.Tensor, str]]:
    """:func:`apply_rewrite` as its slices, in order: ``(dim, start, slice, why)``, where the slice holds the
    result's positions ``start…`` along ``dim``; one ``(None, 0, whole, why)`` when the tensor is not sliced.
    Slices along the first dimension with a size above 1 are consecutive runs of the result's bytes."""
    if tuple(old.shape) != job.before or old.dtype != job.dtype:
        raise NotGrowableError(f"{job.name}: the tensor read is {old.dtype} {list(old.shape)}, planned for "
                               f"{job.dtype} {list(job.before)}")
    gen = torch.Generator()
    gen.set_state(job.state)
    chunk = chunk or CHUNK
    d = _slice_dim(job) if math.prod(job.shape) > chunk else None
    if d is None:
        new, why = job.fn(old, gen) if job.fn is not None else rewrite(old, job.maps, job.noise, gen)[::2]
        yield None, 0, new, why
        return
    step = max(1, chunk * job.shape[d] // math.prod(job.shape))
    mapped = next((m for m in job.maps if m.dim == d), None)
    for a in range(0, job.shape[d], step):
        b = min(a + step, job.shape[d])
        if job.fn is not None:
            piece, why = job.fn(old.narrow(d, a, b - a), gen)
        elif mapped is None:  # a slice of the input gives that slice of the output
            piece, _, why = rewrite(old.narrow(d, a, b - a), job.maps, job.noise, gen)
        else:  # output positions a:b copy old positions of their own: the map restricted to them
            part = dataclasses.replace(mapped, idx=mapped.idx[a:b], scale=mapped.scale[a:b])
            piece, _, why = rewrite(old, [part if m is mapped else m for m in job.maps], job.noise, gen)
        if piece.shape[d] != b - a:
            raise NotGrowableError(f"{job.name}: a slice came out {list(piece.shape)}, planned {b - a} along dim {d}")
        yield d, a, piece, why


def _slice_dim(job: Rewrite) -> int | None:
    """A dimension along which ``job`` can be computed slice by slice with the same result: one no map
    touches, else one whose map copies (no split shared among copies) — or None. Paired noise draws
    whole tiles, so a noisy rewrite is never sliced. A rewrite by ``fn`` slices along ``slices``.
    The leading dimension (of size above 1) comes first when it qualifies: its slices are runs of
    the output's bytes, written as they come."""
    lead = next((d for d in range(len(job.shape)) if job.shape[d] > 1), None)
    if job.fn is not None:
        ok = [d for d in job.slices if job.shape[d] > 1]
        return lead if lead in ok else next(iter(ok), None)
    if job.noise > 0 and any(m.noise_tiles > 1 for m in job.maps):
        return None
    mapped = {m.dim: m for m in job.maps}

    def copies(d: int) -> bool:
        kept = [i for i in mapped[d].idx if i >= 0]
        return not (mapped[d].split and len(set(kept)) < len(kept))
    if lead is not None and (lead not in mapped or copies(lead)):
        return lead
    free = [d for d in range(len(job.shape)) if d not in mapped and job.shape[d] > 1]
    if free:
        return free[0]
    return next((d for d in sorted(mapped) if job.shape[d] > 1 and copies(d)), None)


def read_tensor(ref: TensorRef) -> torch.Tensor:
    """One tensor's values read from its shard (only its bytes, read once straight into the tensor's storage)."""
    raw = torch.empty(ref.nbytes, dtype=torch.uint8)
    if ref.nbytes:
        with open(ref.file, "rb", buffering=0) as fh:
            fh.seek(ref.start)
            view, got = memoryview(raw.numpy()), 0
            while got < ref.nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    raise FormatError(f"{ref.file}: ended early reading {ref.nbytes} bytes at {ref.start}")
                got += n
    return raw.view(DTYPES[ref.dtype]).reshape(ref.shape)


def plan_width(src: Path, name: str, spec: Any, seed: int, tensors: dict[str, Any] | None = None, batch=None
               ) -> tuple[GrowModel, StepReport, list[Rewrite], dict, dict]:
    """Run step ``name`` on ``src``'s meta-device model with its rewrites deferred (``tensors``: the
    checkpoint's tensors when they are not ``src``'s shards, as in a chain of streamed steps; ``batch``: --inputs).

    Returns the grown meta model, the step's report (rounding not yet known), the planned
    rewrites in the in-memory order, the parameter name → names sharing its tensor before
    the step, and the config keys the step changed (new values). Raises :class:`NotGrowableError`
    when the plan needs the weights' values, :class:`UsageError` when no Hugging Face config
    describes the grown model (as saving it in memory would).
    """
    module = meta_model(src)
    floats = [r for r in (tensors or read_tensors(src)).values() if r.dtype in ("F64", "F32", "F16", "BF16")]
    if floats:  # from_pretrained loads the weights in their own dtype, and the step computes in it
        dtype = max({r.dtype for r in floats}, key=lambda d: sum(math.prod(r.shape) for r in floats if r.dtype == d))
        module = module.to(DTYPES[dtype])
    gm = GrowModel(module, "hf", src, "", hf_inputs(module, batch), hf_class=(module.config.architectures or [None])[0])
    shared: dict[int, list[str]] = {}
    for n, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        shared.setdefault(id(t), []).append(n)
    siblings = {n: names for names in shared.values() for n in names}
    config_before = module.config.to_dict()
    try:
        with deferred_rewrites() as jobs:
            report = get_transform(name).apply(gm, spec, Context(seed=seed))
    except GrowError:
        raise
    except Exception as exc:  # an analysis rule that reads a value the meta device does not have
        raise NotGrowableError(f"{name} --streaming: planning on the meta device needs the weights' values "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                               "use --no-streaming") from None
    # The in-memory path refuses the same models when it saves the directory (growcli.io.save), in the same words.
    bad = mismatches(gm.module)
    if bad:
        raise UsageError("the grown model cannot be described by a Hugging Face config (its layers differ from each "
                         f"other: {bad[0]}); write .safetensors (--no-streaming) and load it with growcli.load_grown")
    try:
        validate_config(gm.module.config)
    except Exception as exc:  # e.g. Llama: hidden_size must be a multiple of num_attention_heads
        raise UsageError(f"transformers rejects the grown model's config ({config_error(exc)}); write .safetensors "
                         "(--no-streaming) and load it with growcli.load_grown") from None
    changed = {k: v for k, v in gm.module.config.to_dict().items() if config_before.get(k, object()) != v}
    return gm, report, jobs, siblings, changed


def plan_entries(refs: dict[str, TensorRef], disk: dict[str, str], jobs: list[Rewrite], siblings: dict[str, list[str]],
                 keep: set[str], on_rounded: Callable[[str, str, torch.dtype], None]) -> list[Entry]:
    """Every output tensor: byte copies of unchanged ones, rewritten ones computed when written.

    ``disk`` maps parameter names to checkpoint names; ``keep`` is the set of checkpoint names
    the grown model saves (a tied weight that stays tied is saved once). A rewritten tensor
    the checkpoint does not store (a tied copy) is read through a sibling that it stores.
    """
    by_disk = {disk.get(j.name, j.name): j for j in jobs}
    entries = []
    for disk_name, ref in refs.items():
        if disk_name in by_disk:
            continue
        if disk_name in keep:  # a stage's entry (a chain of steps) keeps its pieces: a rename
            entries.append(Entry(disk_name, ref.dtype, ref.shape, list(ref.pieces) if isinstance(ref, Entry) else [ref]))
    for disk_name, job in by_disk.items():
        if disk_name not in keep:
            continue
        source = next((disk.get(s, s) for s in [job.name, *siblings.get(job.name, [])] if disk.get(s, s) in refs), None)
        if source is None:
            raise NotGrowableError(f"the checkpoint has no tensor for {job.name} (nor for a weight tied to it)")
        ref = refs[source]
        if isinstance(ref, Entry):  # a chain: one input range stays a plain read, else the earlier steps compute it
            ref = whole_ref(ref) or ref
        if isinstance(ref, TensorRef) and job.rows is not None and tuple(ref.shape) == job.before \
                and DTYPES[ref.dtype] == job.dtype:  # runs of the input's rows: byte copies
            entries.append(Entry(disk_name, ref.dtype, job.shape, row_pieces(ref, job.rows)))
            continue
        make = _computed(ref, job, on_rounded) if isinstance(ref, TensorRef) else _recomputed(ref, job, on_rounded)
        entries.append(Entry(disk_name, ref.dtype, job.shape, [make]))
    return sorted(entries, key=lambda e: _natural(e.name))


def _computed(ref: TensorRef, job: Rewrite, on_rounded) -> Callable[[], torch.Tensor]:
    """The rewritten tensor, made when called; the writer asks :meth:`_Computed.parts` instead, for its bytes
    slice by slice."""
    return _Computed(ref, job, on_rounded)


@dataclasses.dataclass
class _Computed:
    ref: TensorRef
    job: Rewrite
    on_rounded: Callable[[str, str, torch.dtype], None]
    ahead: "_Ahead | None" = None  # set by the writer: computed on a worker thread, ahead of the writer

    @property
    def nbytes(self) -> int:
        return math.prod(self.job.shape) * self.job.dtype.itemsize

    def __call__(self) -> torch.Tensor:
        new, why = apply_rewrite(read_tensor(self.ref), self.job)
        self._note(why)
        return new

    def parts(self) -> Iterator[torch.Tensor]:
        """The rewritten tensor as consecutive runs of its bytes (C order): its slices along the leading
        dimension as they are computed (all at once when computed ahead), else the whole tensor."""
        why = ""
        for piece, reason in self.ahead.take(self) if self.ahead is not None else self._runs():
            why = why or reason
            yield piece
        self._note(why)

    def compute(self) -> list[tuple[torch.Tensor, str]]:
        """Every run of :meth:`parts` with why it is not exact (for :class:`_Ahead`'s worker)."""
        return list(self._runs())

    def _runs(self) -> Iterator[tuple[torch.Tensor, str]]:
        old = read_tensor(self.ref)  # read once
        lead = next((d for d, n in enumerate(self.job.shape) if n > 1), None)
        pieces = rewrite_pieces(old, self.job)
        first = next(pieces)
        if first[0] != lead or first[0] is None:  # whole, or slices along an inner dimension: assembled first
            yield _assemble(self.job, first, pieces)
            return
        for _, _, piece, reason in [first, *pieces]:
            yield piece, reason

    def _note(self, why: str) -> None:
        if why:
            self.on_rounded(self.job.name, why, self.job.dtype)


def _recomputed(entry: Entry, job: Rewrite, on_rounded) -> Callable[[], torch.Tensor]:
    """:func:`_computed` for a tensor an earlier step of a chain computes (read when this one is written)."""
    def make() -> torch.Tensor:
        new, why = apply_rewrite(read_entry(entry), job)
        if why:
            on_rounded(job.name, why, job.dtype)
        return new
    return make


def stream_width(name: str, src: Path, out: Path, spec: Any, *, shard_size: int, settings: VerifySettings | None = None,
                 seed: int = 0, progress: Progress | None = None, verify_limit: int = VERIFY_LIMIT) -> Streamed:
    """Grow the HF directory ``src`` into the HF directory ``out`` by width step ``name``, tensor by tensor.

    Run inside the runner's transaction (the directory is staged, not committed). An exact step
    whose written checkpoint differs from the input raises :class:`VerificationFailed` and
    nothing is written.
    """
    settings = settings or VerifySettings()
    started = time.perf_counter()
    refs = read_tensors(src)
    before = json.loads((src / "config.json").read_text())
    gm, report, jobs, siblings, changed = plan_width(src, name, spec, seed, batch=(settings.inputs or [None])[0])
    report.exact = get_transform(name).exact(spec) and report.exact
    names = saved_tensors(src, gm, refs, jobs, siblings)  # also tensors transformers converts (fused experts)
    rounded: dict[str, str] = {}
    dtypes: dict[str, torch.dtype] = {}

    def on_rounded(param: str, why: str, dtype: torch.dtype) -> None:
        rounded[param] = why
        dtypes[param] = dtype

    entries = names.entries(plan_entries(refs, names.disk, jobs, siblings, names.keep, on_rounded), on_rounded, apply_rewrite)
    total = sum(e.nbytes for e in entries)
    shards = pack(entries, shard_size)
    files = shard_names(len(shards))
    advance = byte_progress(total, progress)

    computed = sum(1 for e in entries if any(callable(p) and not isinstance(p, RowGather) for p in e.pieces))
    gathered = sum(1 for e in entries if any(isinstance(p, RowGather) for p in e.pieces))
    checked = [f"{len(entries)} tensors written: {len(entries) - computed - gathered} byte copies from the input, "
               f"{computed} rewritten one at a time from the planned maps"
               + (f", {gathered} gathered from the input's rows (runs of them byte copies)" if gathered else "")]
    timing = {"plan": time.perf_counter() - started}
    output: dict[str, Any] = {"path": str(out), "format": "hf", "shards": len(shards), "bytes": total,
                              "loaded_with": None, "max_abs_diff": None, "readback": None}
    verification = None
    with atomic_output(out, directory=True) as tmp:
        ahead = _Ahead([p for g in shards for e in sorted(g, key=lambda e: -ITEMSIZE[e.dtype]) for p in e.pieces
                        if isinstance(p, (_Computed, RowGather))])  # in the order write_file writes them
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for file, group in zip(files, shards):
                write_file(tmp / file, group, advance)
        finally:
            ahead.close()
            torch.set_num_threads(threads)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {e.name: f for f, g in zip(files, shards) for e in g}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        timing["write"] = time.perf_counter() - started - timing["plan"]
        note_rounding(report, rounded, dtypes[min(rounded)] if rounded else torch.float64)
        before.update(changed)
        (tmp / "config.json").write_text(json.dumps(before, indent=2, sort_keys=True) + "\n")
        copy_side_files(src, tmp)  # tokenizer, generation config…; never the input's weights
        checked.append(names.structure(tmp, {e.name: e.shape for e in entries}))
        verification = verify_written(src, tmp, out, name, report, output, checked, settings, seed, total=total,
                                      verify_limit=verify_limit, read_back=lambda: _run_both(src, tmp, report, settings, seed))
        timing["check"] = time.perf_counter() - started - timing["plan"] - timing["write"]
    return Streamed(report.to_dict(), verification, report.params_before, report.params_after, output, checked,
                    {k: round(v, 3) for k, v in timing.items()})


def stream_widen(src: Path, out: Path, spec: Any, **kwargs) -> Streamed:
    """FFN ``widen`` (init net2net or zero) streamed: see :func:`stream_width`; the data-driven inits are refused."""
    if spec.init in ("gradmax", "firefly"):
        raise NotGrowableError(f"widen --init {spec.init} --streaming: the new units come from gradients on "
                               "calibration data, which needs the model in memory; use --no-streaming")
    return stream_width("widen", src, out, spec, **kwargs)


def stream_hidden(src: Path, out: Path, spec: Any, **kwargs) -> Streamed:
    """``hidden`` streamed: see :func:`stream_width`."""
    return stream_width("hidden", src, out, spec, **kwargs)


def stream_heads(src: Path, out: Path, spec: Any, **kwargs) -> Streamed:
    """``heads`` streamed: see :func:`stream_width`."""
    return stream_width("heads", src, out, spec, **kwargs)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
