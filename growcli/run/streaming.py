"""Streaming execution of a step: a Hugging Face checkpoint rewritten tensor by tensor, never loaded whole.

One of the runner's execution modes (:func:`growcli.run.runner.grow` chooses it, see
:func:`choose_streaming`); the report it feeds has the in-memory run's schema. This module holds
``stack``'s executor and what every executor shares (choosing the mode, block-wise checks); the
others are in their own modules, and :mod:`growcli.run.stream_executors` lists them all.

The model is built on the meta device (no memory) only to find the stack, its residual
writers and the config changes — the same :func:`growcli.transforms.stack.plan_stack` the
in-memory path uses. The output shards are written by :mod:`growcli.io.shards`, copying each
tensor's bytes from the input files (zeroed writers left as holes that read back as zeros):
memory does not grow with the model, and every output tensor is byte-for-byte the one the
in-memory path writes. Then the written directory is checked: the new config must rebuild
exactly the written tensors, and outputs up to ``verify_limit`` bytes are read back from disk
(``from_pretrained``) and run against the input model loaded from disk
(:class:`growcli.verification.readback.Readback`). Larger outputs are run block by block
(:func:`blockwise_check`, :mod:`growcli.verification.blockwise`): one block of one model in
memory at a time, compared with the input at every block boundary through the stack's map.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from growcli.analysis.blocks import find_stack
from growcli.core.edits import set_config_json
from growcli.core.errors import NotGrowableError, UsageError, VerificationFailed
from growcli.core.inputs import Batch, make_batches
from growcli.core.units import parse_size
from growcli.io.atomic import atomic_output
from growcli.io.formats import load_inputs_file
from growcli.io.hf_dir import hf_input_spec, sample_batch
from growcli.io.load import load_model
from growcli.io.save import output_format
from growcli.io.shards import (OutTensor, TensorRef, checkpoint_bytes, pack_shards, read_tensors, shard_names,
                               weight_files, write_index, write_shard)
from growcli.io.sidefiles import copy_side_files
from growcli.run.steps import VerifySettings, verification_batches
from growcli.run.stream_names import CheckpointNames, meta_model, stack_names, structure_check
from growcli.transforms.deepen_blocks import copies_order
from growcli.transforms.stack import StackPlan, StackSpec, layout, plan_stack, post_ln_reason, step_report
from growcli.verification.blockwise import BlockwiseReport, verify_blockwise
from growcli.verification.compare import VerifyReport
from growcli.verification.ondisk import OnDisk
from growcli.verification.readback import Readback
from growcli.verification.stream_map import StreamMap, compose, compose_tilings, identity, stacked

STREAMING_THRESHOLD = 1 << 30  # checkpoints larger than this (bytes of safetensors) stream by default
VERIFY_LIMIT = 512 << 20  # outputs up to this size are also verified by running both models
DEFAULT_SHARD_SIZE = "5GB"

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def parse_shard_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count → bytes; :class:`UsageError` naming ``--shard-size``."""
    try:
        return parse_size(text)
    except ValueError:
        raise UsageError(f"--shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB") from None


def choose_streaming(src: Path, outputs: list[Path], fmt: str | None, forced: bool | None,
                     threshold: int = STREAMING_THRESHOLD) -> bool:
    """Whether to stream ``src``: forced, or auto for large HF safetensors → one HF directory.

    Raises :class:`UsageError` when streaming is forced for inputs or outputs it cannot handle.
    """
    src = Path(src)
    fits = (src.is_dir() and (src / "config.json").is_file() and bool(weight_files(src)) and len(outputs) == 1
            and output_format(outputs[0], fmt) == "hf")
    if forced is None:
        return fits and checkpoint_bytes(src) > threshold
    if forced and not fits:
        raise UsageError("--streaming needs a Hugging Face directory of safetensors as input and one output "
                         "directory (-o DIR)")
    return forced


@dataclass
class Streamed:
    """What a streaming executor hands the runner: the pieces of the common report."""

    step: dict[str, Any]
    verification: VerifyReport | None
    params_before: int
    params_after: int
    output: dict[str, Any]
    checked: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plan_tensors(refs: dict[str, TensorRef], plan: StackPlan, names: CheckpointNames) -> list[OutTensor]:
    """Every output tensor: layer keys renamed to their new positions, new copies' writers zeroed."""
    pattern = re.compile(rf"{re.escape(names.prefix)}\.(\d+)\.(.+)")
    blocks: dict[int, dict[str, TensorRef]] = {i: {} for i in range(plan.length)}
    out: list[OutTensor] = []
    for name, ref in refs.items():
        m = pattern.fullmatch(name)
        if m and int(m.group(1)) < plan.length:
            blocks[int(m.group(1))][m.group(2)] = ref
        else:
            out.append(OutTensor(name, ref, False))
    copies = set(plan.copies)
    for p, i in enumerate(plan.order):
        zero = set()
        if p in copies:
            for w in plan.writers.get(i, ()):
                suffix = names.suffixes.get(w)
                if suffix not in blocks[i]:
                    raise NotGrowableError(f"stack: the checkpoint has no tensor for {plan.container}.{i}.{w} to zero")
                zero.add(suffix)
        out += [OutTensor(f"{names.prefix}.{p}.{s}", ref, s in zero) for s, ref in blocks[i].items()]
    return sorted(out, key=lambda t: _natural(t.name))


def stream_stack(src: Path, out: Path, spec: StackSpec, *, shard_size: int, settings: VerifySettings | None = None,
                 seed: int = 0, progress: Progress | None = None, verify_limit: int = VERIFY_LIMIT) -> Streamed:
    """Stack the HF directory ``src`` into the HF directory ``out`` without loading its weights.

    Run inside the runner's transaction: the directory is staged, not committed (the runner
    adds the report and commits). Outputs up to ``verify_limit`` bytes are read back and run
    against the input (identity init must be exact: :class:`VerificationFailed` otherwise,
    and nothing is written); larger ones are run against it block by block from disk
    (:func:`blockwise_check`, the per-block differences in the output's ``blockwise``), held
    to the same rule. ``checked`` says which.
    """
    settings = settings or VerifySettings()
    started = time.perf_counter()
    refs = read_tensors(src)
    module = meta_model(src)

    def sample() -> Batch:
        return sample_batch(module, seed, settings.inputs[0] if settings.inputs else None)

    plan = plan_stack(module, spec, sample)
    names = stack_names(module, plan.container, refs)
    tensors = plan_tensors(refs, plan, names)
    total = sum(t.ref.nbytes for t in tensors)
    small = total <= verify_limit
    post_ln = spec.init == "identity" and bool(plan.post_norms)
    if post_ln and not spec.allow_inexact and not small:
        raise NotGrowableError(f"stack --init identity: {post_ln_reason(plan)}. Pass --allow-mismatch to write it "
                               "anyway (reported as not function-preserving), or use --init copy")
    report = step_report(spec, plan, sum(r.numel for r in refs.values()), sum(t.ref.numel for t in tensors))
    shards = pack_shards(tensors, shard_size)
    files = shard_names(len(shards))
    advance = byte_progress(total, progress)
    checked: list[str] = []
    timing = {"plan": time.perf_counter() - started}
    output: dict[str, Any] = {"path": str(out), "format": "hf", "shards": len(shards), "bytes": total,
                              "loaded_with": None, "max_abs_diff": None, "readback": None}
    verification = None
    with atomic_output(out, directory=True) as tmp:
        for file, group in zip(files, shards):
            write_shard(tmp / file, group, advance)
        timing["write"] = time.perf_counter() - started - timing["plan"]
        if len(shards) > 1:
            write_index(tmp, files, shards)
        config = json.loads((src / "config.json").read_text())
        for key, value in plan.config.items():  # dotted keys name a nested sub-config's entry
            set_config_json(config, key, value)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(src, tmp)  # tokenizer, generation config…; never the input's (stale) weights
        new_config = module.config.__class__.from_pretrained(str(tmp), local_files_only=True)
        checked.append(structure_check(type(module), new_config, names, tensors))

        def refuse(verification: VerifyReport) -> None:
            if post_ln and not spec.allow_inexact:
                raise NotGrowableError(f"stack --init identity: {post_ln_reason(plan)}; measured: "
                                       f"{verification.summary()}. Pass --allow-mismatch to write it anyway (reported "
                                       "as not function-preserving), or use --init copy")

        verification = verify_written(src, tmp, out, "stack", report, output, checked, settings, seed, total=total,
                                      verify_limit=verify_limit, stream_map=stacked(plan.order, plan.copies), refuse=refuse)
        timing["check"] = time.perf_counter() - started - timing["plan"] - timing["write"]
    return Streamed(report.to_dict(), verification, report.params_before, report.params_after, output, checked,
                    {k: round(v, 3) for k, v in timing.items()})


def byte_progress(total: int, progress: Callable[[int, int], None] | None) -> Callable[[int], None]:
    """An ``advance(n)`` callback for the shard writers: bytes written so far, reported as ``progress(done, total)``."""
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    return advance


def verify_written(src: Path, tmp: Path, out: Path, name: str, report, output: dict[str, Any], checked: list[str],
                   settings: VerifySettings, seed: int, *, total: int, verify_limit: int,
                   stream_map: StreamMap | None = None,
                   read_back: Callable[[], tuple[str, VerifyReport | None]] | None = None,
                   refuse: Callable[[VerifyReport], None] | None = None,
                   label: str | None = None, exact_in_dtype: bool | None = None) -> VerifyReport | None:
    """Run the written directory ``tmp`` against the input ``src``, record it, and fail a broken exact step.

    Up to ``verify_limit`` bytes the output is loaded whole from disk (``read_back``, default
    ``from_pretrained`` against the input loaded from disk); above it, block by block
    (:func:`blockwise_check` with ``stream_map``). The result goes into ``report``, ``output``
    and ``checked``; ``refuse`` may raise first (a refusal that needs the measurement). An exact
    step that differs raises :class:`VerificationFailed` (its message starts with ``label``, default
    ``step 1 (name)``), unless ``settings.allow_mismatch``. Block by block, a step exact in its dtype
    (``exact_in_dtype``, default the report's own when it is exact) is held to the same exact tolerance as the
    whole read-back.
    """
    if exact_in_dtype is None and report.exact:
        exact_in_dtype = getattr(report, "exact_in_dtype", None)
    blockwise = None
    if total <= verify_limit:
        loaded_with, verification = read_back() if read_back else _read_back(src, tmp, out, settings, seed)
        output.update(loaded_with=loaded_with)
    else:
        blockwise = blockwise_check(src, tmp, settings, seed, stream_map, exact_in_dtype=exact_in_dtype)
        verification = blockwise.verify_report()
        output.update(loaded_with=BLOCKWISE, blockwise=blockwise.to_dict())
    if verification is None:
        checked.append("not run: there were no verification batches")
        return None
    report.verification = verification.to_dict()
    output.update(max_abs_diff=verification.max_abs_diff, readback=report.verification)
    summary = verification.summary() if blockwise is None else blockwise.summary()
    checked.append(f"ran both models from disk: {summary}" if blockwise is None else
                   f"ran both models from disk, block by block (the output, {_size(total)}, is above the "
                   f"{_size(verify_limit)} limit for loading both): {summary}")
    if not report.exact:
        report.notes.append(f"not function-preserving by design; measured: {verification.summary()}")
    if refuse:
        refuse(verification)
    if report.exact and not verification.passed and not settings.allow_mismatch:
        raise VerificationFailed(f"{label or f'step 1 ({name})'} changed the function: {summary}", verification)
    return verification

def _read_back(src: Path, tmp: Path, out: Path, settings: VerifySettings, seed: int) -> tuple[str, VerifyReport | None]:
    """The written directory loaded back from disk and run against the input model, also loaded from disk."""
    original = load_model(src)
    batches = verification_batches(original, settings, seed)
    readback = Readback(original, batches, dtype=settings.dtype, atol=settings.atol, rtol=settings.rtol,
                        reference="the input model")
    return readback.measure("hf", tmp, out)


BLOCKWISE = "growcli.verification.blockwise (block by block from disk)"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def blockwise_check(original: Path, grown: Path, settings: VerifySettings | None = None, seed: int = 0,
                    stream_map: StreamMap | None = None, inputs_file: Path | None = None,
                    exact_in_dtype: bool | None = None) -> BlockwiseReport:
    """Compare two HF directories block by block, never holding either model whole.

    Each model's block stack is found by :func:`growcli.analysis.blocks.find_stack`. The map
    between the streams is ``stream_map``, else the one ``grown``'s ``growth_report.json``
    records (:func:`recorded_map`: its depth and hidden maps), else same depth; a hidden axis the
    map does not give is mapped by width (identity, or hidden growth's tiling), and the report's
    ``map_source`` says which (``"recorded"`` or ``"inferred"``). Batches: ``settings.inputs``, ``inputs_file``, or
    generated from the original's config with ``seed``. The two may be of different classes with
    one residual stream (a dense decoder and its upcycled mixture of experts: same depth, identity
    map). Raises :class:`UsageError` when either path is not a Hugging Face directory of safetensors.
    """
    settings = settings or VerifySettings()
    for path in (original, grown):
        path = Path(path)
        if not (path.is_dir() and (path / "config.json").is_file() and weight_files(path)):
            raise UsageError(f"{path}: --blockwise compares Hugging Face directories (config.json and safetensors)")
    a, b = OnDisk(original), OnDisk(grown)
    blocks_a, blocks_b = find_stack(a.module, None), find_stack(b.module, None)
    if stream_map is None:
        stream_map = recorded_map(Path(grown), len(a.module.get_submodule(blocks_a)))
    spec = hf_input_spec(a.module)
    if settings.inputs is not None:
        batches = settings.inputs
    elif inputs_file is not None:
        batches = [load_inputs_file(inputs_file, spec)]
    else:
        batches = make_batches(spec, settings.batches, seed=seed, seq_len=settings.seq_len)
    return verify_blockwise(a, b, batches, original_blocks=blocks_a, grown_blocks=blocks_b, stream_map=stream_map,
                            dtype=settings.dtype, atol=settings.atol, rtol=settings.rtol, exact_in_dtype=exact_in_dtype)


def recorded_map(grown: Path, length: int) -> StreamMap | None:
    """The map of the growth steps ``grown/growth_report.json`` records, ``None`` without a report.

    Each ``stack`` step's layout is recomputed from its recorded options
    (:func:`growcli.transforms.stack.layout`) and the maps are composed in order; steps that
    keep the depth map it onto itself. The ``hidden`` steps' recorded stream widths are composed
    into the hidden map (:func:`growcli.verification.stream_map.compose_tilings`); a report
    written before the widths were recorded maps the hidden axis by width, and the map says so
    (``source`` ``"inferred"``). A grown directory without a report maps by depth.
    """
    try:
        report = json.loads((grown / "growth_report.json").read_text())
        steps = [s for s in report.get("steps") or [] if isinstance(s, dict)]
    except (OSError, ValueError, AttributeError):
        return None
    result = identity(length)
    widths: list[tuple[int, int]] = []
    unrecorded: list[str] = []
    for n, step in enumerate(steps, 1):
        spec = step.get("spec") or {}
        if step.get("transform") == "hidden":
            pair = step.get("stream_widths")
            if isinstance(pair, list) and len(pair) == 2 and all(isinstance(w, int) for w in pair):
                widths.append((pair[0], pair[1]))
            else:
                unrecorded.append(f"step {n}")
            continue
        if step.get("transform") not in ("stack", "deepen") or (step["transform"] == "deepen"
                                                                and not spec.get("block")):
            continue  # the depth is kept (deepen's inserted layers live inside blocks)
        order = (copies_order(length, step.get("matched") or []) if step["transform"] == "deepen"
                 else layout(StackSpec(**{k: v for k, v in spec.items() if k in StackSpec.__dataclass_fields__}), length))
        copies = StackPlan("", length, order).copies
        result = compose(result, stacked(order, copies))
        length = len(order)
    if unrecorded:
        return StreamMap(result.depth, None, "inferred", f"hidden axis by width: growth_report.json records no stream "
                         f"widths for {', '.join(unrecorded)} (hidden; written by an older growcli)")
    return StreamMap(result.depth, compose_tilings(widths)) if widths else result


