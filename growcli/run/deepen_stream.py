"""Streaming execution of ``deepen --block``: block copies inserted into a Hugging Face checkpoint, tensor by tensor.

Inserting a zeroed copy after block ``i`` is, as a checkpoint rewrite, a stack with the layer
map ``[0, …, i, i, i+1, …]`` whose new copy has its residual writers zeroed. The model is
built on the meta device (no memory) only to plan it —
:func:`growcli.transforms.deepen.plan_streamed_blocks`, the in-memory path's own analysis —
and the output is written by the stack executor's machinery
(:func:`growcli.run.streaming.plan_tensors`, :mod:`growcli.io.shards`): every tensor is a byte
copy from the input shards, a zeroed writer a hole that reads back as zeros, so peak memory is
a few buffers, not the model, and every output tensor is the one the in-memory path writes.
The written directory is then checked like a streamed stack: the new config must rebuild
exactly the written tensors, outputs up to ``verify_limit`` bytes are read back from disk and
run against the input loaded from disk, larger ones block by block
(:func:`growcli.run.streaming.blockwise_check`) through the layer map.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from growcli.core.edits import set_config_json
from growcli.io.atomic import atomic_output
from growcli.io.hf_dir import sample_batch
from growcli.io.shards import pack_shards, read_tensors, shard_names, write_index, write_shard
from growcli.io.sidefiles import copy_side_files
from growcli.run.steps import VerifySettings
from growcli.run.stream_names import meta_model, stack_names, structure_check
from growcli.run.streaming import VERIFY_LIMIT, Progress, Streamed, byte_progress, plan_tensors, verify_written
from growcli.transforms.deepen import DeepenSpec, plan_streamed_blocks
from growcli.verification.stream_map import stacked


def streamable(options: dict[str, Any]) -> bool:
    """Whether a ``deepen`` step with these options can stream: only block copies (``block: true``) do."""
    return bool(options.get("block"))


def stream_deepen(src: Path, out: Path, spec: DeepenSpec, *, shard_size: int, settings: VerifySettings | None = None,
                  seed: int = 0, progress: Progress | None = None, verify_limit: int = VERIFY_LIMIT) -> Streamed:
    """Insert the block copies ``spec`` asks for into the HF directory ``src``, writing the HF directory ``out``.

    Run inside the runner's transaction (the directory is staged; the runner adds the report
    and commits). ``progress(done, total)`` follows the bytes written. Raises
    :class:`UsageError` unless ``spec.block``; :class:`NotGrowableError` where the in-memory
    path refuses (post-LN blocks, no config value for the new depth) or the checkpoint's names
    are not regular; :class:`VerificationFailed` when the written model differs from the
    input (nothing is kept), unless ``settings.allow_mismatch``.
    """
    settings = settings or VerifySettings()
    started = time.perf_counter()
    refs = read_tensors(src)
    module = meta_model(src)
    batch = sample_batch(module, seed, settings.inputs[0] if settings.inputs else None)
    plan, report = plan_streamed_blocks(module, spec, batch)
    names = stack_names(module, plan.container, refs)
    tensors = plan_tensors(refs, plan, names)
    total = sum(t.ref.nbytes for t in tensors)
    report.params_before = sum(r.numel for r in refs.values())
    report.params_after = sum(t.ref.numel for t in tensors)
    shards = pack_shards(tensors, shard_size)
    files = shard_names(len(shards))
    advance = byte_progress(total, progress)

    checked: list[str] = []
    timing = {"plan": time.perf_counter() - started}
    output: dict[str, Any] = {"path": str(out), "format": "hf", "shards": len(shards), "bytes": total,
                              "loaded_with": None, "max_abs_diff": None, "readback": None}
    with atomic_output(out, directory=True) as tmp:
        for file, group in zip(files, shards):
            write_shard(tmp / file, group, advance)
        if len(shards) > 1:
            write_index(tmp, files, shards)
        config = json.loads((src / "config.json").read_text())
        for key, value in plan.config.items():  # dotted keys name a nested sub-config's entry
            set_config_json(config, key, value)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(src, tmp)  # tokenizer, generation config…; never the input's weights
        timing["write"] = time.perf_counter() - started - timing["plan"]
        new_config = module.config.__class__.from_pretrained(str(tmp), local_files_only=True)
        checked.append(structure_check(type(module), new_config, names, tensors))
        verification = verify_written(src, tmp, out, "deepen", report, output, checked, settings, seed, total=total,
                                      verify_limit=verify_limit, stream_map=stacked(plan.order, plan.copies))
        timing["check"] = time.perf_counter() - started - timing["plan"] - timing["write"]
    return Streamed(report.to_dict(), verification, report.params_before, report.params_after, output, checked,
                    {k: round(v, 3) for k, v in timing.items()})
