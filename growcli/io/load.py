"""One entry point to load any supported checkpoint: :func:`load_model`."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growcli.core.edits import check_records, replay
from growcli.core.errors import ArchitectureError, FormatError, InputsError, MissingDependencyError, UsageError
from growcli.core.inputs import InputSpec, TensorSpec, parse_input_shape, spec_from_batch
from growcli.io.formats import (
    load_torch_file,
    read_safetensors,
    require_exists,
    safetensors_header,
    safetensors_metadata,
    sha256_of,
)
from growcli.core.model import GrowModel, eval_mode

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
    names no architecture of its own. Never modifies ``path``. Raises a
    :class:`~growcli.core.errors.GrowError` subclass for anything the user can fix.
    """
    path = Path(path)
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
        gm = _load_hf(path)
    elif path.suffix == ".pt2":
        gm = _load_pt2(path)
    elif path.suffix == ".safetensors":
        gm = _load_safetensors(path, arch_spec, base)
    elif path.suffix in TORCH_SUFFIXES:
        gm = _load_torch(path, arch_spec, trust_pickle, base)
    else:
        raise UsageError(f"{path}: unknown checkpoint format {path.suffix or '(no suffix)'}; expected {KNOWN_INPUTS}")
    eval_mode(gm.module)
    if input_shape:
        gm.inputs = parse_input_shape(input_shape)
    return gm


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


def _load_torch(path: Path, arch_spec: dict | None, trust_pickle: bool, base: GrowModel | None = None) -> GrowModel:
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


def _load_safetensors(path: Path, arch_spec: dict | None, base: GrowModel | None) -> GrowModel:
    """Load a (grown) safetensors file.

    Nothing named in the file's metadata is imported: a recorded architecture factory is
    built only when the user names the same factory with ``--arch`` (the recorded kwargs,
    plain JSON, are used when the user gives none), and recorded edits name only
    allowlisted module classes (:func:`growcli.core.edits.replay`).
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
    state = read_safetensors(path)
    replay(module, edits, str(path))
    load_state_dict_strict(module, state, path)
    if inputs is None:
        inputs = infer_input_spec(module)
    if base is not None and inputs.empty:
        inputs = base.inputs
    kind = "state_dict" if kind not in ("hf", "pt2") else kind
    return GrowModel(module, kind, path, sha256_of(path), inputs, arch=arch_spec, hf_class=hf_class, base_edits=edits)


def _load_hf(path: Path) -> GrowModel:
    if not (path / "config.json").is_file():
        raise FormatError(f"{path}: directory has no config.json; expected a Hugging Face model directory")
    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if not shards and not index.exists():
        raise FormatError(f"{path}: no model.safetensors (or sharded index) beside config.json")
    for shard in shards:
        safetensors_header(shard)
    transformers, config = load_hf_config(path)
    # Caches are for generation; verification and export run whole sequences without them.
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise FormatError(f"{path}/config.json: names no class in 'architectures'")
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise FormatError(f"{path}/config.json: transformers {transformers.__version__} has no class {archs[0]} "
                          "(custom code is never loaded)")
    try:
        module, info = cls.from_pretrained(str(path), config=config, local_files_only=True, output_loading_info=True)
    except Exception as exc:
        raise FormatError(f"{path}: transformers could not load it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        bad = list(info.get("missing_keys") or []) + [str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or []]
        raise ArchitectureError(f"{path}: the weights do not fit {archs[0]}: missing or mismatched {bad[:3]}")
    gm = GrowModel(module, "hf", path, sha256_of(path), hf_input_spec(module), hf_class=archs[0])
    gm.hf_saved_config = {"use_cache": use_cache} if use_cache is not None else {}
    return gm


def load_hf_config(path: Path):
    """``(transformers, config)`` for an HF directory; one-line errors when either is unusable."""
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("reading Hugging Face directories needs transformers: pip install 'growcli[hf]'") from None
    check_no_remote_code(path)
    quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise FormatError(f"{path}/config.json: not a usable Hugging Face config ({str(exc).splitlines()[0][:200]})") from None
    return transformers, config


_CUSTOM_CODE = ("modeling_*.py", "configuration_*.py", "tokenization_*.py", "processing_*.py",
                "image_processing_*.py", "feature_extraction_*.py")


def check_no_remote_code(path: Path) -> None:
    """Refuse an HF directory that ships its own model code: growcli never runs it.

    ``auto_map`` in config.json, or ``modeling_*.py``-style files beside it, are what
    ``trust_remote_code`` would import; growcli never passes that flag and says so here,
    before transformers reads anything.
    """
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{config_file}: not a usable Hugging Face config ({getattr(exc, 'msg', type(exc).__name__)})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{config_file}: not a usable Hugging Face config (expected a JSON object)")
    if "auto_map" in config:
        raise FormatError(f"{config_file}: has 'auto_map', i.e. the model needs its own Python code; growcli never runs "
                          "code from a model directory (trust_remote_code is never used)")
    code = sorted(p.name for pattern in _CUSTOM_CODE for p in path.glob(pattern))
    if code:
        raise FormatError(f"{path}: holds custom model code ({', '.join(code[:3])}); growcli never runs code from a "
                          "model directory (trust_remote_code is never used); remove it to load the standard class")


def quiet_transformers() -> None:
    """Keep transformers' progress bars and advice off stderr (growcli reports for itself)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def hf_input_spec(module: nn.Module, batch: int = 2, seq: int = 8, mask: bool = True) -> InputSpec:
    """Inputs generated from a Hugging Face config: token ids for text models, pixels for vision.

    Token ids span the whole vocabulary and their length varies from batch to batch (up to
    ``max_position_embeddings``); when ``forward`` takes ``attention_mask`` (and ``mask``),
    later batches are right-padded with a mask of zeros there (see ``make_batches``).
    """
    import inspect

    config = module.config
    name = getattr(module, "main_input_name", "input_ids")
    if name == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return InputSpec(kwargs=(("pixel_values", TensorSpec((batch, getattr(config, "num_channels", 3), size, size))),))
    if name == "input_ids":
        max_seq = getattr(config, "max_position_embeddings", None) or None
        seq = min(seq, max_seq or seq)
        kwargs = [("input_ids", TensorSpec((batch, seq), "int64", config.vocab_size))]
        try:
            takes_mask = "attention_mask" in inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            takes_mask = False
        if mask and takes_mask:
            kwargs.append(("attention_mask", TensorSpec((batch, seq), "int64", 2)))
        pad_id = getattr(config, "pad_token_id", None)
        pad_id = pad_id if isinstance(pad_id, int) and 0 <= pad_id < config.vocab_size else None
        return InputSpec(kwargs=tuple(kwargs), seq=tuple(k for k, _ in kwargs), max_seq=max_seq,
                         mask="attention_mask" if mask and takes_mask else None, pad_id=pad_id)
    raise InputsError(f"growcli cannot generate inputs named {name!r}; pass --inputs FILE")
