"""Saving and loading CPG networks, and reading a directory of task files.

A CPG network is one safetensors file: its state_dict (shared weights, ``*_owner`` int16 tensors,
boolean ``mask{k}_*`` tensors per task, ``heads.{k}.*``) plus the metadata key ``growcli.cpg``, a
JSON object describing the structure (the chain of stages, the input shape, the number of tasks);
``growcli.cpg.report`` holds the per-task table when there is one. :func:`save_cpg` writes atomically,
reads the file back and checks that every tensor and every task's outputs are bit-identical before
the file is renamed into place, so a failure leaves nothing behind.

Task files (``task0.safetensors``, ``task1.safetensors``, … in a directory, numbered from 0 without
gaps; ``.pt`` holding a dict of tensors works too) hold ``input`` (float ``[N, …]``) and ``target``
(integer class indices ``[N]``), and optionally ``val_input`` and ``val_target``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from growcli.cl.net import CPGNet
from growcli.cl.phases import TaskData
from growcli.core.errors import FormatError, UsageError, VerificationFailed
from growcli.core.version import __version__
from growcli.io.atomic import atomic_output, check_output_path
from growcli.io.formats import read_safetensors, read_tensor_file, require_exists, safetensors_metadata, write_safetensors

META_KEY = "growcli.cpg"
TASK_KEYS = ("input", "target", "val_input", "val_target")
_TASK_FILE = re.compile(r"task(\d+)\.(safetensors|pt|pth)")


def save_cpg(net: CPGNet, path: str | Path, *, overwrite: bool = False, report: list[dict[str, Any]] | None = None,
             inputs: list[Path] | None = None) -> Path:
    """Write ``net`` to ``path`` (.safetensors), verified by reading it back; returns the path.

    ``inputs`` are paths the output must not replace or lie in. Raises
    :class:`VerificationFailed` if the file read back differs (nothing is left behind then).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"{path}: a CPG network is saved as .safetensors")
    if net.tasks == 0:
        raise UsageError("the CPG network has learned no task; there is nothing to save")
    check_output_path(path, inputs or [], overwrite=overwrite)
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    metadata = {META_KEY: json.dumps(net.metadata(), sort_keys=True), "growcli.version": __version__}
    if report is not None:
        metadata[META_KEY + ".report"] = json.dumps(report, sort_keys=True)
    with atomic_output(path) as tmp:
        write_safetensors(state, tmp, metadata)
        check_readback(net, load_cpg(tmp), path)
    return path


def check_readback(net: CPGNet, loaded: CPGNet, path: Path) -> None:
    """The file's network is ``net``: the same tensors bit for bit, the same outputs for every task."""
    ours, theirs = net.state_dict(), loaded.state_dict()
    bad = sorted(k for k in ours.keys() | theirs.keys()
                 if k not in ours or k not in theirs or ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k]))
    if bad:
        raise VerificationFailed(f"{path}: read back, its tensors differ from the network's: {', '.join(bad[:5])}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, *net.input_shape), generator=gen, dtype=torch.float64).to(net.layers[0].weight.dtype)
    net.eval()
    loaded.eval()
    with torch.no_grad():
        for k in range(net.tasks):
            if not torch.equal(net(x, k), loaded(x, k)):
                raise VerificationFailed(f"{path}: read back, task {k}'s outputs differ from the network's")


def load_cpg(path: str | Path) -> CPGNet:
    """Rebuild a CPG network saved by :func:`save_cpg`; ``model(x, task=k)`` computes task ``k``."""
    path = Path(path)
    require_exists(path, "CPG network")
    meta = safetensors_metadata(path)
    if META_KEY not in meta:
        raise FormatError(f"{path}: no {META_KEY} metadata; it is not a CPG network written by growcli")
    try:
        info = json.loads(meta[META_KEY])
        stages, input_shape, tasks = info["stages"], info["input_shape"], int(info["tasks"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{path}: metadata {META_KEY} is not a valid CPG description ({type(exc).__name__}: {exc})") from None
    if info.get("format") != "growcli.cpg" or info.get("version") != 1:
        raise FormatError(f"{path}: CPG format {info.get('format')!r} version {info.get('version')!r}; expected growcli.cpg 1")
    state = read_safetensors(path)
    try:
        net = CPGNet.from_state(stages, input_shape, state, tasks)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{path}: the tensors do not fit its CPG description ({type(exc).__name__}: {exc})") from None
    extra = sorted(set(state) - set(net.state_dict()))
    if extra:
        raise FormatError(f"{path}: tensors the CPG description does not mention: {', '.join(extra[:5])}")
    return net.eval()


def is_cpg_file(path: Path) -> bool:
    try:
        return path.suffix == ".safetensors" and META_KEY in safetensors_metadata(path)
    except (OSError, FormatError):
        return False


def load_task_dir(directory: str | Path) -> list[TaskData]:
    """The tasks in ``directory``: ``task0.safetensors``, ``task1.safetensors``, … (see the module docstring)."""
    directory = Path(directory)
    require_exists(directory, "tasks directory")
    if not directory.is_dir():
        raise UsageError(f"{directory}: --tasks must be a directory holding task0.safetensors, task1.safetensors, …")
    found: dict[int, Path] = {}
    for f in directory.iterdir():
        m = _TASK_FILE.fullmatch(f.name)
        if m:
            if int(m.group(1)) in found:
                raise UsageError(f"{directory}: two files for task {m.group(1)}: {found[int(m.group(1))].name} and {f.name}")
            found[int(m.group(1))] = f
    if not found:
        raise UsageError(f"{directory}: no task files; expected task0.safetensors, task1.safetensors, …")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise UsageError(f"{directory}: task files are numbered from 0 without gaps; task{missing[0]} is missing")
    return [_task(found[i]) for i in sorted(found)]


def _task(path: Path) -> TaskData:
    tensors = read_tensor_file(path, "task file")
    unknown = sorted(set(tensors) - set(TASK_KEYS))
    if "input" not in tensors or "target" not in tensors or unknown:
        raise FormatError(f"{path}: a task file holds input and target (optionally val_input and val_target)"
                          + (f"; unknown keys: {', '.join(unknown)}" if unknown else f"; it has {', '.join(sorted(tensors))}"))
    return TaskData(tensors["input"], tensors["target"], tensors.get("val_input"), tensors.get("val_target"), name=str(path))
