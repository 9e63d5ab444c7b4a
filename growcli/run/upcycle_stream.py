"""Streaming execution of ``upcycle``: a dense Hugging Face checkpoint rewritten as a mixture of experts, tensor by tensor.

The dense model is built on the meta device only to plan the step — the same
:func:`growcli.transforms.upcycle_target.plan_upcycle` the in-memory path uses. The names and
shapes the MoE checkpoint has on disk are read off transformers' own save conversion
(:mod:`growcli.transforms.upcycle_saved`), so the files are the ones ``save_pretrained``
writes. Every tensor outside the FFNs is a byte copy from the input shards; an expert that is
a plain copy of the dense FFN is a byte copy of the dense tensor (one per expert); zero
tensors are holes; routers, noisy or re-initialised experts and
the shared expert's doubled down projection are computed by the in-memory path's own
functions (:mod:`growcli.transforms.upcycle`) from one FFN's tensors at a time, so memory
stays at about one FFN and both paths write the same tensors. Outputs up to ``verify_limit``
bytes are then loaded back from disk and run against the input, in float64; larger ones are run
against it block by block from disk (:func:`growcli.run.streaming.blockwise_check`: each dense
block against its MoE block, the fused 3-D expert tensors read through transformers' own load
conversion), held to the same rule.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from growcli.core.errors import FormatError, NotGrowableError
from growcli.core.memory import reuse_freed
from growcli.io.atomic import atomic_output
from growcli.io.load import load_model
from growcli.io.shards import (INDEX, ITEMSIZE, TensorRef, aligned_padding, copy_range, read_tensors, shard_names,
                               write_all)
from growcli.io.sidefiles import copy_side_files
from growcli.run.stream_names import checkpoint_names, meta_model
from growcli.run.steps import VerifySettings, verification_batches
from growcli.run.streaming import VERIFY_LIMIT, Progress, Streamed, byte_progress, verify_written
from growcli.transforms.upcycle import (UpcycleSpec, expert_part, router_kind, router_weight, shared_part,
                                        step_report)
from growcli.transforms.upcycle_saved import Saved, real_layout
from growcli.transforms.upcycle_target import Block, UpcyclePlan, meta_build, plan_upcycle
from growcli.verification.compare import VerifyReport, verify_models

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class Entry:
    """One output tensor and how its bytes are made: pieces copied from a file, computed, or zeros."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: list[Any]  # TensorRef (copy), Callable[[], torch.Tensor] (computed), int (that many zero bytes)

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


class _Reader:
    """Dense tensors read from the input shards, one FFN's at a time."""

    def __init__(self, refs: dict[str, TensorRef], disk: dict[str, str]):
        self.refs, self.disk, self.cache = refs, disk, {}

    def ref(self, param: str) -> TensorRef:
        name = self.disk.get(param, param)
        if name not in self.refs:
            raise FormatError(f"the checkpoint has no tensor {name} (for {param})")
        return self.refs[name]

    def tensor(self, param: str) -> torch.Tensor:
        if param not in self.cache:
            if len(self.cache) >= 3:  # one FFN (gate, up, down) at a time
                self.cache.clear()
            ref = self.ref(param)
            with open(ref.file, "rb") as fh:
                fh.seek(ref.start)
                raw = bytearray(fh.read(ref.nbytes))
            self.cache[param] = torch.frombuffer(raw, dtype=DTYPES[ref.dtype]).reshape(ref.shape) if raw else \
                torch.empty(ref.shape, dtype=DTYPES[ref.dtype])
        return self.cache[param]


def plan_entries(plan: UpcyclePlan, spec: UpcycleSpec, seed: int, reader: _Reader, layout: list[Saved]) -> list[Entry]:
    """Every output tensor with its pieces; computed ones are made only when written."""
    blocks: dict[str, tuple[Block, str]] = {}
    for b in plan.blocks:
        for key, name in b.experts.items():
            blocks[name] = (b, key)
        blocks[b.router] = (b, "router")
        for role, name in b.shared.items():
            blocks[name] = (b, f"shared_{role}")
        if b.shared_gate:
            blocks[b.shared_gate] = (b, "sigmoid_gate")
    dtype = reader.ref(plan.blocks[0].dense["gate"]).dtype
    entries = []
    for s in layout:
        if s.param not in blocks:  # a dense tensor under its own name: bytes copied
            ref = reader.ref(s.param)
            entries.append(Entry(s.name, ref.dtype, ref.shape, [ref]))
            continue
        block, what = blocks[s.param]
        entries.append(_new_entry(plan, spec, seed, reader, s, block, what, dtype))
    return entries


def _new_entry(plan: UpcyclePlan, spec: UpcycleSpec, seed: int, reader: _Reader, s: Saved, block: Block, what: str,
               dtype: str) -> Entry:
    torch_dtype = DTYPES[dtype]
    if what == "router" and router_kind(spec) == "zero":
        return Entry(s.name, dtype, (plan.experts, plan.hidden), [plan.experts * plan.hidden * ITEMSIZE[dtype]])
    if what == "router":
        return Entry(s.name, dtype, (plan.experts, plan.hidden), [lambda: router_weight(plan, spec, seed, block, torch_dtype)])
    if what == "sigmoid_gate":
        return Entry(s.name, dtype, (1, plan.hidden), [plan.hidden * ITEMSIZE[dtype]])
    if what.startswith("shared_"):  # gate and up copied; down doubled (--shared) or zero
        role = what.removeprefix("shared_")
        ref = reader.ref(block.dense[role])
        if role != "down":
            piece: Any = ref
        elif spec.shared:
            piece = lambda: shared_part(spec, role, reader.tensor(block.dense[role]))  # noqa: E731
        else:
            piece = ref.nbytes
        return Entry(s.name, dtype, ref.shape, [piece])
    # An expert's rows: gate_up is [gate; up] (I rows each), down is one matrix.
    roles = ("gate", "up") if what == "gate_up" else ("down",)
    lo, hi = s.rows
    pieces, shape_rows, cols = [], 0, None
    for k, role in enumerate(roles):
        ref = reader.ref(block.dense[role])
        a, b = max(lo - k * ref.shape[0], 0), min(hi - k * ref.shape[0], ref.shape[0])
        if a >= b:
            continue
        cols = ref.shape[1]
        shape_rows += b - a
        pieces.append(_expert_piece(plan, spec, seed, reader, block, s.expert, role, ref, a, b))
    return Entry(s.name, dtype, (shape_rows, cols), pieces)


def _expert_piece(plan, spec, seed, reader: _Reader, block: Block, expert: int, role: str, ref: TensorRef,
                  a: int, b: int):
    """Rows ``a:b`` of expert ``expert``'s ``role`` matrix: bytes of the dense tensor, zeros, or computed."""
    row = ref.nbytes // ref.shape[0]
    if spec.shared and role == "down":
        return (b - a) * row
    if not (spec.noise > 0 or (spec.drop > 0 and round(spec.drop * plan.intermediate) > 0)):
        return TensorRef(ref.file, ref.dtype, (b - a, *ref.shape[1:]), ref.start + a * row, (b - a) * row)
    return lambda: expert_part(plan, spec, seed, block, expert, role, reader.tensor(block.dense[role]))[a:b]


def write_file(path: Path, entries: list[Entry], advance: Callable[[int], None]) -> None:
    """One safetensors file: header, then each tensor's pieces in order (holes for zeros)."""
    entries = sorted(entries, key=lambda e: -ITEMSIZE[e.dtype])  # keeps every tensor aligned to its element size
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * aligned_padding(len(raw), _copies(entries, header))
    # unbuffered: kernel-side copies write at the file's position; computed tensors reuse freed memory
    with open(path, "wb", buffering=0) as out, reuse_freed():
        out.write(struct.pack("<Q", len(raw)) + raw)
        for e in entries:
            written = 0
            for piece in e.pieces:
                written += _write_piece(out, piece, advance)
            if written != e.nbytes:
                raise NotGrowableError(f"upcycle --streaming: {e.name} came out {written} bytes, not {e.nbytes}")
        out.truncate(8 + len(raw) + offset)  # a hole at the very end still counts


def _copies(entries: list[Entry], header: dict[str, Any]) -> Iterator[tuple[int, int, int]]:
    """``(data offset, input offset, bytes)`` of every byte copy of ``entries`` whose position is known
    before writing (after a computed piece of unknown size, none of its tensor's)."""
    for e in entries:
        at = header[e.name]["data_offsets"][0]
        for piece in e.pieces:
            if isinstance(piece, TensorRef):
                yield at, piece.start, piece.nbytes
                at += piece.nbytes
            elif isinstance(piece, int):
                at += piece
            elif hasattr(piece, "nbytes"):  # a computed piece that knows its size (width streaming's)
                at += piece.nbytes
            else:
                break


def _write_piece(out, piece, advance: Callable[[int], None]) -> int:
    if isinstance(piece, int):  # zeros: a hole, which reads back as zeros
        out.seek(piece, os.SEEK_CUR)
        advance(piece)
        return piece
    if isinstance(piece, TensorRef):
        _copy(piece, out, advance)
        return piece.nbytes
    written = 0
    for tensor in piece.parts() if hasattr(piece, "parts") else [piece()]:  # a computed tensor, maybe in runs
        written += _write_tensor(out, tensor)
        advance(tensor.nbytes)
    return written


def _write_tensor(out, tensor: torch.Tensor) -> int:
    """``tensor``'s bytes written straight from its storage (one copy only when it is not contiguous)."""
    return write_all(out.fileno(), memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def _copy(ref: TensorRef, out, advance: Callable[[int], None]) -> None:
    """Copy ``ref``'s bytes to ``out`` at its position (:func:`growcli.io.shards.copy_range`)."""
    fd = os.open(ref.file, os.O_RDONLY)
    try:
        copy_range(fd, out.fileno(), ref.start, ref.nbytes, advance, str(ref.file))
    finally:
        os.close(fd)


def pack(entries: list[Entry], shard_size: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _write_index(directory: Path, files: list[str], shards: list[list[Entry]]) -> None:
    total = sum(e.nbytes for group in shards for e in group)
    index = {"metadata": {"total_size": total}, "weight_map": {e.name: f for f, g in zip(files, shards) for e in g}}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_config(plan: UpcyclePlan, src: Path, tmp: Path, dtype: str) -> None:
    """config.json as ``save_pretrained`` writes it: the MoE config, the input's use_cache, the weights' dtype."""
    dense = json.loads((src / "config.json").read_text())
    config = plan.config
    runtime = config.use_cache
    try:
        config.use_cache = dense.get("use_cache", runtime)
        config.architectures = [plan.target_class]
        config.dtype = str(DTYPES[dtype]).removeprefix("torch.")
        config.to_json_file(str(tmp / "config.json"))
    finally:
        config.use_cache = runtime


def _run_both(src: Path, tmp: Path, cls: str, settings: VerifySettings, seed: int,
              exact_in_dtype: bool | None = None) -> tuple[str, VerifyReport]:
    """The written directory loaded back from disk (``from_pretrained``) and run against the input, also from disk,
    at the tolerance the step earns (``exact_in_dtype``: as in memory)."""
    original = load_model(src)
    grown = load_model(tmp)  # its experts run with the batched_mm kernel (growcli.io.hf_dir.float64_experts)
    batches = verification_batches(original, settings, seed)
    result = verify_models(original.module, grown.module, batches, dtype=settings.dtype, atol=settings.atol,
                           rtol=settings.rtol, exact_in_dtype=exact_in_dtype, device=settings.device)
    return f"transformers.{cls}.from_pretrained", result


def stream_upcycle(src: Path, out: Path, spec: UpcycleSpec, *, shard_size: int, settings: VerifySettings | None = None,
                   seed: int = 0, progress: Progress | None = None, verify_limit: int = VERIFY_LIMIT) -> Streamed:
    """Upcycle the HF directory ``src`` into the HF directory ``out`` without loading its weights.

    Run inside the runner's transaction (the directory is staged, not committed). Outputs up to
    ``verify_limit`` bytes are read back and run against the input in ``settings.dtype``, larger
    ones block by block from disk; an exact step that differs raises :class:`VerificationFailed`
    and nothing is written. ``checked`` says which way it ran.
    """
    settings = settings or VerifySettings()
    started = time.perf_counter()
    refs = read_tensors(src)
    dense = meta_model(src)
    plan = plan_upcycle(dense, spec)
    try:
        disk = checkpoint_names(dense)
    except NotGrowableError as exc:
        raise NotGrowableError(f"upcycle --streaming: {str(exc).split(': ', 1)[-1]}") from None
    moe = meta_build(plan.target_class, plan.config)
    tied = set((getattr(moe, "_tied_weights_keys", None) or {}) if plan.config.tie_word_embeddings else ())
    reader = _Reader(refs, disk)
    layout = real_layout(plan, {n: tuple(t.shape) for n, t in moe.state_dict().items() if n not in tied})
    entries = sorted(plan_entries(plan, spec, seed, reader, layout), key=lambda e: _natural(e.name))
    dtype = entries[0].dtype if entries else "F32"
    total = sum(e.nbytes for e in entries)
    report = step_report(plan, spec, type(dense).__name__, sum(r.numel for r in refs.values()),
                         sum(p.numel() for p in moe.parameters()))
    shards = pack(entries, shard_size)
    files = shard_names(len(shards))
    advance = byte_progress(total, progress)

    kinds = [type(p).__name__ for e in entries for p in e.pieces]
    checked = [f"names and shapes as transformers saves {plan.target_class} (its save conversion, probed on a "
               f"two-layer model): {len(entries)} tensors, {kinds.count('TensorRef')} byte copies from the input, "
               f"{kinds.count('int')} zero, {kinds.count('function')} computed"]
    timing = {"plan": time.perf_counter() - started}
    output: dict[str, Any] = {"path": str(out), "format": "hf", "shards": len(shards), "bytes": total,
                              "loaded_with": None, "max_abs_diff": None, "readback": None}
    verification = None
    with atomic_output(out, directory=True) as tmp:
        for file, group in zip(files, shards):
            write_file(tmp / file, group, advance)
        if len(shards) > 1:
            _write_index(tmp, files, shards)
        timing["write"] = time.perf_counter() - started - timing["plan"]
        _write_config(plan, src, tmp, dtype)
        copy_side_files(src, tmp)  # tokenizer, generation config…; never the input's weights
        # up to verify_limit: both loaded whole; above it: block by block from disk (dense block vs MoE block,
        # the same residual stream at every boundary, so the map is the identity)
        verification = verify_written(src, tmp, out, "upcycle", report, output, checked, settings, seed, total=total,
                                      verify_limit=verify_limit,
                                      read_back=lambda: _run_both(src, tmp, plan.target_class, settings, seed,
                                                                  report.exact_in_dtype if report.exact else None))
        timing["check"] = time.perf_counter() - started - timing["plan"] - timing["write"]
    return Streamed(report.to_dict(), verification, report.params_before, report.params_after, output, checked,
                    {k: round(v, 3) for k, v in timing.items()})


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
