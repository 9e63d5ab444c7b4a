"""One entry point to load any supported checkpoint: :func:`load_model`.

It dispatches by what ``path`` is: a Hugging Face directory (:mod:`growcli.io.hf_dir`), a
``torch.export`` program (``.pt2``, loaded here: it is its own architecture), or weights that
need one (``.safetensors``, ``.pt``/``.pth``/``.bin``/``.ckpt``: :mod:`growcli.io.weights`).
A Hub id ``org/name[@revision]`` that is not a local path becomes its cached snapshot
directory first (:mod:`growcli.io.hub`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from growcli.core.errors import FormatError, MissingDependencyError, UsageError
from growcli.core.inputs import InputSpec, parse_input_shape, spec_from_batch
from growcli.core.model import GrowModel, eval_mode
from growcli.io.formats import require_exists, sha256_of
from growcli.io.hf_dir import load_hf_dir
from growcli.io.hub import resolve_path
from growcli.io.weights import load_safetensors, load_torch

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
KNOWN_INPUTS = ".pt2, .safetensors, .pt/.pth/.bin/.ckpt, or a Hugging Face directory"


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | str | None = None,
    trust_pickle: bool = False,
    input_shape: str | None = None,
    base: GrowModel | None = None,
) -> GrowModel:
    """Load a checkpoint into a :class:`GrowModel` in eval mode.

    ``arch``/``arch_kwargs`` build the module for state_dict files; ``base`` is the
    original model onto which a grown ``.safetensors`` replays its recorded edits when it
    names no architecture of its own. ``path`` may be a Hugging Face id ``org/name[@revision]``
    when no such local path exists (:func:`growcli.io.hub.resolve_source`). Never modifies
    ``path``. Raises a :class:`~growcli.core.errors.GrowError` subclass for anything the user can fix.
    """
    path = resolve_path(path)
    require_exists(path)
    if isinstance(arch_kwargs, str):
        try:
            arch_kwargs = json.loads(arch_kwargs) if arch_kwargs.strip() else {}
        except json.JSONDecodeError as exc:
            raise UsageError(f"--arch-kwargs: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(arch_kwargs, dict):
            raise UsageError("--arch-kwargs: expected a JSON object like '{\"hidden\": 64}'")
    arch_spec = {"factory": arch, "kwargs": arch_kwargs or {}} if arch else None

    if path.is_dir():
        gm = load_hf_dir(path)
    elif path.suffix == ".pt2":
        gm = _load_pt2(path)
    elif path.suffix == ".safetensors":
        gm = load_safetensors(path, arch_spec, base)
    elif path.suffix in TORCH_SUFFIXES:
        gm = load_torch(path, arch_spec, trust_pickle, base)
    else:
        raise UsageError(f"{path}: unknown checkpoint format {path.suffix or '(no suffix)'}; expected {KNOWN_INPUTS}")
    eval_mode(gm.module)
    if input_shape:
        gm.inputs = parse_input_shape(input_shape)
    return gm


# Output classes of Hugging Face models, as torch.export records them in a program's tree specs.
_HF_OUTPUT_TYPE = re.compile(rb"transformers\.(?:modeling_outputs|models\.[a-z0-9_]+\.modeling_[a-z0-9_]+)\.[A-Z][A-Za-z0-9_]*")


def register_hf_output_types(path: Path) -> None:
    """Import the transformers modules whose output classes a ``.pt2`` program returns.

    torch.export stores a model's output structure by class name, and a ``ModelOutput``
    subclass is only deserialisable once its module is imported (that registers it as a
    pytree node). Only modules inside the installed ``transformers`` package are imported;
    without transformers this does nothing and loading fails with a clear message.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(".json") and "/models/" in f"/{n}"]
            found = {m.decode() for n in names for m in _HF_OUTPUT_TYPE.findall(zf.read(n))}
    except (OSError, zipfile.BadZipFile):
        return  # torch.export.load reports the unreadable file itself
    if not found:
        return
    if importlib.util.find_spec("transformers") is None:
        raise MissingDependencyError(f"{path}: the program returns Hugging Face outputs; reading it needs transformers: "
                                     "pip install 'growcli[hf]'")
    for module_name in sorted({name.rpartition(".")[0] for name in found}):
        try:
            importlib.import_module(module_name)
        except ImportError:
            pass  # a newer transformers moved it; torch.export.load names the type that is missing


def _load_pt2(path: Path) -> GrowModel:
    register_hf_output_types(path)
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        raise FormatError(f"{path}: not a readable torch.export program ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    module = ep.module()
    inputs = InputSpec()
    example = getattr(ep, "example_inputs", None)
    if example is not None:
        args, kwargs = example
        inputs = spec_from_batch((tuple(args), dict(kwargs)))
    return GrowModel(module, "pt2", path, sha256_of(path), inputs)
