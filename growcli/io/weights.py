"""Loading weights-only checkpoints: state_dicts, pickled modules and (grown) safetensors files.

Weights need an architecture: ``--arch package.module:factory`` builds it (:func:`build_arch`);
a grown ``.safetensors`` replays its recorded edits onto it (or onto the original it is compared
against), and may name one of growcli's own zoo factories, the only code a file can make growcli
import. Weights are loaded strictly (:func:`load_state_dict_strict`), and inputs come from the file,
the model's ``example_inputs()`` or its first layer (:func:`infer_input_spec`).
:func:`growcli.io.load.load_model` dispatches here by file suffix.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growcli.core.edits import parent_of
from growcli.core.errors import ArchitectureError, FormatError, UsageError
from growcli.core.inputs import InputSpec, TensorSpec, spec_from_batch
from growcli.core.model import GrowModel
from growcli.core.replay import check_records, replay
from growcli.io.formats import load_torch_file, read_safetensors, safetensors_metadata, sha256_of


def import_factory(spec: str):
    """Resolve ``package.module:attr`` (the current directory is importable, as with ``python -m``)."""
    if ":" not in spec:
        raise UsageError(f"--arch {spec!r}: expected package.module:factory")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:
        raise ArchitectureError(f"--arch {spec}: cannot import {mod_name} ({type(exc).__name__}: {exc})") from None
    obj = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ArchitectureError(f"--arch {spec}: module {mod_name} has no attribute {attr!r}")
    return obj


def bundled_factory(spec: str):
    """The model factory ``growcli.zoo:<name>`` names, if it is one of growcli's own; else ``None``.

    A recorded architecture may name these without ``--arch``: resolving one imports only
    growcli's own ``growcli.zoo`` (never a module named in a file) and checks the function
    is defined there.
    """
    mod_name, _, attr = spec.partition(":")
    if mod_name != "growcli.zoo" or not attr.isidentifier() or attr.startswith("_"):
        return None
    from growcli import zoo

    obj = getattr(zoo, attr, None)
    if not callable(obj) or getattr(obj, "__module__", None) != "growcli.zoo":
        return None
    return obj


def build_arch(arch_spec: dict[str, Any], factory=None) -> nn.Module:
    factory = factory if factory is not None else import_factory(arch_spec["factory"])
    try:
        module = factory(**arch_spec.get("kwargs", {}))
    except Exception as exc:
        raise ArchitectureError(f"--arch {arch_spec['factory']}: building the model failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(module, nn.Module):
        raise ArchitectureError(f"--arch {arch_spec['factory']}: returned {type(module).__name__}, not a torch.nn.Module")
    return module


def load_state_dict_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load weights strictly; mismatches become one line naming the first offending keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:3]}{' …' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:3]}{' …' if len(unexpected) > 3 else ''}")
    if shapes:
        problems.append(f"shape mismatch {shapes[:2]}{' …' if len(shapes) > 2 else ''}")
    if problems:
        raise ArchitectureError(f"{path}: the weights do not fit the architecture: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def load_replayed(module: nn.Module, edits: list[dict], path: Path) -> nn.Module:
    """Replay ``edits`` onto ``module`` (a freshly built original), then load the weights of the safetensors file
    ``path`` strictly; returns the grown root. The edits are checked before the weights are read.

    Tensors the edits made (inserted layers, resized tensors) take the dtype the file holds them in, so
    they load unrounded: a float64 file gives float64 inserted layers, whatever torch's default dtype. Where
    the model holds the file's other tensors of that dtype in one other dtype (a float32 model given a
    bfloat16 file), they take that dtype instead, so the model computes in one dtype throughout. Tensors
    without a saved value (non-persistent buffers) keep the dtype of the layer they join (see
    :func:`growcli.core.replay.replay`). Raises like :func:`replay` and :func:`load_state_dict_strict`.
    """
    kept = {id(t): t for t in module.state_dict(keep_vars=True).values()}  # held, so no id is reused meanwhile
    module = replay(module, edits, str(path))
    state = read_safetensors(path)
    own = module.state_dict(keep_vars=True)
    floats = [k for k in own if k in state and own[k].is_floating_point() and state[k].is_floating_point()]
    held: dict[torch.dtype, set[torch.dtype]] = {}
    for k in floats:
        if id(own[k]) in kept:
            held.setdefault(state[k].dtype, set()).add(own[k].dtype)
    made: dict[int, torch.Tensor] = {}  # one replacement per tensor, so tied tensors stay tied
    for k in floats:
        old, want = own[k], state[k].dtype
        if len(held.get(want, ())) == 1:
            want = next(iter(held[want]))
        if id(old) in kept or old.dtype == want:
            continue
        if id(old) not in made:
            new = torch.empty(old.shape, dtype=want, device=old.device)
            made[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        owner, leaf = parent_of(module, k)
        (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = made[id(old)]
    load_state_dict_strict(module, state, path)
    return module


def infer_input_spec(module: nn.Module) -> InputSpec:
    """Input spec from the model itself: an ``example_inputs()`` method, or a leading Linear/Embedding."""
    fn = getattr(module, "example_inputs", None)
    if callable(fn):
        # example_inputs() usually draws random tensors: seed it so every load verifies on the
        # same batch (and outputs are reproducible), without touching the caller's RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            ex = fn()
        return spec_from_batch((tuple(ex), {}) if not isinstance(ex, tuple) or not isinstance(ex[-1], dict) else (tuple(ex[:-1]), ex[-1]))
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return InputSpec((TensorSpec((2, m.in_features)),))
        if isinstance(m, nn.Embedding):
            return InputSpec((TensorSpec((2, 8), "int64", m.num_embeddings),))
        if any(True for _ in m.parameters(recurse=False)):
            break
    return InputSpec()


def load_torch(path: Path, arch_spec: dict | None, trust_pickle: bool, base: GrowModel | None = None) -> GrowModel:
    obj = load_torch_file(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return GrowModel(obj, "pickle", path, sha256_of(path), infer_input_spec(obj))
    state = _unwrap_state_dict(obj)
    if state is None:
        raise FormatError(f"{path}: holds a {type(obj).__name__}, expected a state_dict (name → tensor) or a whole nn.Module")
    if arch_spec is None and base is not None:
        # A state_dict compared against its original (growcli verify ORIGINAL WEIGHTS.pt): the
        # original's architecture is the only one it can mean.
        module = copy.deepcopy(base.module)
        load_state_dict_strict(module, state, path)
        return GrowModel(module, "state_dict", path, sha256_of(path), base.inputs, arch=base.arch)
    if arch_spec is None:
        raise UsageError(f"{path}: a state_dict holds only weights; pass --arch package.module:factory to build the model")
    module = build_arch(arch_spec)
    load_state_dict_strict(module, state, path)
    return GrowModel(module, "state_dict", path, sha256_of(path), infer_input_spec(module), arch=arch_spec)


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    return None


def _metadata_json(meta: dict[str, str], key: str, path: Path, default: Any) -> Any:
    """A JSON value of the file's metadata; one-line :class:`FormatError` when it does not parse."""
    text = meta.get(key)
    if not text:
        return default
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{path}: metadata {key} is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None


def _recorded_arch(meta: dict[str, str], path: Path) -> dict | None:
    arch = _metadata_json(meta, "growcli.arch", path, None)
    if arch is None:
        return None
    if not isinstance(arch, dict) or not isinstance(arch.get("factory"), str) \
            or not isinstance(arch.get("kwargs", {}), dict):
        raise FormatError(f"{path}: metadata growcli.arch is malformed (expected {{\"factory\": ..., \"kwargs\": {{...}}}})")
    return {"factory": arch["factory"], "kwargs": arch.get("kwargs", {})}


def load_safetensors(path: Path, arch_spec: dict | None, base: GrowModel | None) -> GrowModel:
    """Load a (grown) safetensors file.

    Nothing named in the file's metadata is imported: a recorded architecture factory is
    built only when the user names the same factory with ``--arch`` (the recorded kwargs,
    plain JSON, are used when the user gives none), and recorded edits name only
    allowlisted module classes (:func:`growcli.core.replay.replay`).
    """
    meta = safetensors_metadata(path)
    edits = _metadata_json(meta, "growcli.edits", path, [])
    check_records(edits, str(path))  # before anything is built or read
    recorded_arch = _recorded_arch(meta, path)
    inputs = None
    if meta.get("growcli.inputs"):
        try:
            inputs = InputSpec.from_json(meta["growcli.inputs"])
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from None
    kind, hf_class = "state_dict", meta.get("growcli.hf_class")
    if arch_spec is not None:
        if recorded_arch is not None and arch_spec["factory"] == recorded_arch["factory"] and not arch_spec["kwargs"]:
            arch_spec = recorded_arch  # the user named this factory; its recorded arguments are data
        module = build_arch(arch_spec)
    elif base is not None:
        module = copy.deepcopy(base.module)
        if base.base_edits:  # the base itself was grown: start from its own original
            raise UsageError(f"{path}: compare a grown safetensors against the checkpoint it was grown from")
        structural = sorted({e["op"] for e in edits if e["op"] in ("module", "insert", "wrap")})
        if base.kind == "pt2" and meta.get("growcli.source_kind", "pt2") != "pt2" and structural:
            # Module edits were recorded on a torch.nn module; a .pt2 program has no such modules.
            raise UsageError(f"{path}: was grown from a torch.nn module ({meta.get('growcli.source', '?')}) and its "
                             f"recorded edits ({', '.join(structural)}) cannot be replayed onto the torch.export "
                             f"program {base.source.name}; compare it against the checkpoint it was grown from")
        kind, arch_spec, hf_class = base.kind, base.arch, base.hf_class
    elif recorded_arch is not None and bundled_factory(recorded_arch["factory"]) is not None:
        module = build_arch(recorded_arch, bundled_factory(recorded_arch["factory"]))  # growcli's own zoo
        arch_spec = recorded_arch
    elif recorded_arch is not None:
        factory = recorded_arch["factory"]
        raise ArchitectureError(f"{path}: its metadata names the architecture {factory}, and growcli never imports code "
                                f"named in a file; pass --arch {factory} if you trust it (or compare it against its "
                                "original with growcli verify ORIGINAL GROWN)")
    else:
        raise UsageError(f"{path}: a safetensors file holds only weights; pass --arch package.module:factory "
                         "(or compare it against its original with growcli verify ORIGINAL GROWN)")
    module = load_replayed(module, edits, path)
    if inputs is None:
        inputs = infer_input_spec(module)
    if base is not None and inputs.empty:
        inputs = base.inputs
    kind = "state_dict" if kind not in ("hf", "pt2") else kind
    return GrowModel(module, kind, path, sha256_of(path), inputs, arch=arch_spec, hf_class=hf_class, base_edits=edits)
