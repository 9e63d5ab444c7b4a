"""A Hugging Face checkpoint's model on the meta device, and the names its tensors have on disk.

Streaming execution never loads the weights: the model is built from ``config.json`` on the
meta device (no memory) to plan a step, and the plan — in the model's parameter names — is
mapped to the names ``save_pretrained`` wrote (which transformers 5 may rename). After the
checkpoint was written, :func:`structure_check` rebuilds the model from the new config (on
the meta device again) and checks the written tensors are exactly the ones it has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from growcli.core.errors import FormatError, NotGrowableError
from growcli.io.hf_dir import load_hf_config, saved_names
from growcli.io.shards import OutTensor, TensorRef


def meta_model(src: Path) -> torch.nn.Module:
    """The HF model of ``src`` built on the meta device from its config (no weights, no memory)."""
    transformers, config = load_hf_config(src)
    if getattr(config, "use_cache", None) is not None:
        config.use_cache = False
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise FormatError(f"{src}/config.json: names no class transformers {transformers.__version__} has "
                          f"({archs[0] if archs else 'architectures is empty'}; custom code is never loaded)")
    with torch.device("meta"):
        module = cls(config)
    return module.eval()


def checkpoint_names(module: torch.nn.Module) -> dict[str, str]:
    """Model parameter name → the name ``save_pretrained`` writes it under (:func:`growcli.io.hf_dir.saved_names`);
    a conversion that merges or splits tensors cannot be streamed tensor by tensor: refused."""
    return saved_names(module, lambda saved: NotGrowableError(
        f"--streaming: transformers converts {type(module).__name__}'s weights when saving ({saved} is computed "
        "from several tensors); use --no-streaming"))


def saved_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every name ``save_pretrained`` writes for ``module`` → its shape, converted tensors included (fused experts
    saved one tensor per expert): transformers' save conversion run on meta placeholders, so no memory."""
    state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in module.state_dict().items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 stores weights under the model's own names
        return {k: tuple(v.shape) for k, v in state.items()}
    return {k: tuple(v.shape) for k, v in revert_weight_conversion(module, dict(state)).items()}


def one_to_one_names(module: torch.nn.Module, skip: Iterable[str] = ()) -> dict[str, str]:
    """:func:`checkpoint_names` of the tensors saved as themselves (renamed at most), ``skip`` (converted
    parameters, fused experts) left out of the save conversion; any other parameter transformers saves as
    several tensors, or merges with others, is left out instead of refused."""
    skip = set(skip)
    state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in module.state_dict().items()
             if k not in skip}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {k: k for k in state}
    by_id = {id(v): k for k, v in state.items()}
    return {by_id[id(t)]: saved for saved, t in revert_weight_conversion(module, dict(state)).items() if id(t) in by_id}


@dataclass(frozen=True)
class CheckpointNames:
    """How a checkpoint names the stack: ``{prefix}.{i}.{suffix}``; ``suffixes`` maps model-relative names."""

    prefix: str
    suffixes: dict[str, str]
    dropped: str = ""  # a base-model prefix the checkpoint leaves out of every name ("transformer.")


def stack_names(module: torch.nn.Module, container: str, refs: dict[str, TensorRef]) -> CheckpointNames:
    """Find the checkpoint names of ``container``'s blocks; :class:`NotGrowableError` when they are not regular."""
    names = checkpoint_names(module)
    length = len(module.get_submodule(container))
    first = {k[len(container) + 3:]: v for k, v in names.items() if k.startswith(f"{container}.0.")}
    if not first:
        raise NotGrowableError(f"--streaming: {container}.0 has no parameters to stream")
    sample = next(iter(first.values()))
    prefix = next((sample[:m.start()] for m in re.finditer(r"\.0\.", sample)
                   if all(v.startswith(sample[:m.start()] + ".0.") for v in first.values())), None)
    if prefix is None:
        raise NotGrowableError(f"--streaming: the checkpoint names of {container}.0 share no prefix; use --no-streaming")
    suffixes = {k: v[len(prefix) + 3:] for k, v in first.items()}
    for i in range(length):
        for rel, suffix in suffixes.items():
            if names.get(f"{container}.{i}.{rel}") != f"{prefix}.{i}.{suffix}":
                raise NotGrowableError(f"--streaming: block {i} of {container} is named differently on disk "
                                       "from block 0; use --no-streaming")
    if any(k.startswith(prefix + ".0.") for k in refs):
        return CheckpointNames(prefix, suffixes)
    base = getattr(module, "base_model_prefix", "")
    if base and prefix.startswith(base + ".") and any(k.startswith(prefix[len(base) + 1:] + ".0.") for k in refs):
        return CheckpointNames(prefix[len(base) + 1:], suffixes, base + ".")
    raise NotGrowableError(f"--streaming: the checkpoint has no tensors named {prefix}.0.*; use --no-streaming")


def structure_check(module_cls: type, config: Any, names: CheckpointNames, written: list[OutTensor]) -> str:
    """Check the new config describes the written tensors (names and shapes); returns what was checked."""
    with torch.device("meta"):
        fresh = module_cls(config)
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    want = {saved: shapes[k] for k, saved in checkpoint_names(fresh).items()}
    got = {(t.name if t.name in want else names.dropped + t.name): t.ref.shape for t in written}
    bad = [f"{k} {list(s)} vs config {list(want[k])}" for k, s in got.items() if k in want and want[k] != s]
    bad += [f"unexpected {k}" for k in got if k not in want]
    if bad:
        raise NotGrowableError(f"--streaming: the written tensors do not fit the new config ({bad[0]})")
    return f"the new config rebuilds {len(want)} tensors; all {len(got)} written ones match in name and shape"
