"""Module specs: a recordable description of a module a transform creates, and its rebuilding.

:func:`module_spec` describes a ``torch.nn`` leaf layer, a container of them or one of growcli's
own layers (:mod:`growcli.nn`) as plain JSON — class and constructor arguments, weights excluded —
and :func:`build_module` rebuilds it. A recorded spec may name only allowlisted classes
(:func:`check_module_spec`); nothing named in a file is ever imported. Recorded values (tuples,
dtypes) pass through :func:`to_json_value` and :func:`from_json_value`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from growcli.core.errors import ArchitectureError, FormatError, GrowError

# Constructor arguments of the torch.nn leaf modules a transform may create, read back
# from the instance's attributes.
_CTOR_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features"),
    nn.Conv1d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    nn.Conv3d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm3d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine"),
    nn.Identity: (),
    nn.ReLU: (),
    nn.ReLU6: (),
    nn.GELU: ("approximate",),
    nn.Tanh: (),
    nn.SiLU: (),
    nn.Sigmoid: (),
    nn.Hardtanh: ("min_val", "max_val"),
    nn.Dropout: ("p",),
}


def to_json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [to_json_value(v) for v in value]}
    if isinstance(value, list):
        return [to_json_value(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    raise TypeError(f"cannot record attribute value of type {type(value).__name__}")


def dtype_named(name: Any) -> torch.dtype:
    """The torch dtype named ``name`` (``"float32"``); never any other attribute of ``torch``."""
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise FormatError(f"recorded dtype {name!r} is not a torch dtype")
    return value


def from_json_value(value: Any) -> Any:
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(from_json_value(v) for v in value["__tuple__"])
    if isinstance(value, dict) and "__dtype__" in value:
        return dtype_named(value["__dtype__"])
    if isinstance(value, list):
        return [from_json_value(v) for v in value]
    return value


def module_spec(module: nn.Module, refs: dict[int, str] | None = None) -> dict:
    """Describe ``module`` so :func:`build_module` can rebuild it (weights excluded).

    ``refs`` maps ``id(submodule)`` to a name in the model *before* the edit; such
    submodules are recorded as references (``{"type": "ref", "name": ...}``) and moved,
    not rebuilt, on replay.
    """
    refs = refs or {}
    if id(module) in refs:
        return {"type": "ref", "name": refs[id(module)]}
    if type(module) in (nn.Sequential, nn.ModuleList):
        return {"type": type(module).__name__, "children": [module_spec(m, refs) for m in module]}
    if type(module) in _CTOR_ATTRS:
        kwargs = {a: to_json_value(getattr(module, a)) for a in _CTOR_ATTRS[type(module)]}
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kwargs["bias"] = module.bias is not None
        if isinstance(module, nn.LayerNorm):
            kwargs["bias"] = module.bias is not None
        return {"type": f"torch.nn:{type(module).__name__}", "kwargs": kwargs}
    spec_fn = getattr(module, "growcli_spec", None)
    if callable(spec_fn):
        home = type(module).__module__
        home = "growcli.nn" if home.startswith("growcli.nn.") else home  # growcli.nn's submodules record as growcli.nn
        return {"type": f"{home}:{type(module).__qualname__}",
                "kwargs": {k: to_json_value(v) for k, v in spec_fn().items()}}
    raise TypeError(f"growcli cannot record a module of type {type(module).__qualname__}")


# The only module classes a recorded spec may name, by exact "module:qualname": the torch.nn
# leaf classes above (plus the bare "Sequential"/"ModuleList" containers) and growcli's own
# layers. A recorded spec never imports anything: a file cannot make growcli run its code.
_TORCH_CLASSES: dict[str, type] = {f"torch.nn:{cls.__name__}": cls for cls in _CTOR_ATTRS}
_MAX_SPEC_DEPTH = 32


def _growcli_classes() -> dict[str, type]:
    """growcli's own recordable layers: classes that ``growcli.nn`` exports, defined in it or its submodules
    (``growcli.nn.branch``, …), with a ``growcli_spec`` method. Recorded as ``growcli.nn:<qualname>``."""
    from growcli import nn as growcli_nn  # growcli's own package; imports nothing from outside

    return {f"growcli.nn:{cls.__qualname__}": cls for cls in vars(growcli_nn).values()
            if isinstance(cls, type) and issubclass(cls, nn.Module)
            and (cls.__module__ == "growcli.nn" or cls.__module__.startswith("growcli.nn."))
            and callable(getattr(cls, "growcli_spec", None))}


def allowed_module_class(kind: str) -> type | None:
    """The class a recorded spec ``type`` names, if it is on the allowlist; ``None`` otherwise."""
    return _TORCH_CLASSES.get(kind) or _growcli_classes().get(kind)


def check_module_spec(spec: Any, where: str = "recorded edit", depth: int = 0) -> None:
    """Raise :class:`FormatError` unless ``spec`` is well-formed and names only allowlisted classes."""
    if depth > _MAX_SPEC_DEPTH:
        raise FormatError(f"{where}: module spec is nested more than {_MAX_SPEC_DEPTH} levels deep")
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise FormatError(f"{where}: malformed module spec (expected an object with a 'type' string)")
    kind = spec["type"]
    if kind in ("ref", "copy"):
        if not isinstance(spec.get("name"), str):
            raise FormatError(f"{where}: malformed {kind} module spec (expected a 'name' string)")
        return
    if kind in ("Sequential", "ModuleList"):
        children = spec.get("children")
        if not isinstance(children, list):
            raise FormatError(f"{where}: malformed {kind} module spec (expected a 'children' list)")
        for child in children:
            check_module_spec(child, where, depth + 1)
        return
    if allowed_module_class(kind) is None:
        raise FormatError(f"{where}: names module type {kind!r}, which growcli does not rebuild "
                          "(only torch.nn layers and growcli's own; nothing named in a file is imported)")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise FormatError(f"{where}: malformed module spec for {kind} ('kwargs' must be an object)")


def build_module(spec: dict, root: nn.Module, where: str = "recorded edit", *,
                 like: torch.Tensor | None = None) -> nn.Module:
    """Inverse of :func:`module_spec`; ``ref`` entries are looked up in ``root`` (before the edit).

    Only allowlisted classes are built (see :func:`check_module_spec`); nothing is imported.
    Layers built afresh get ``like``'s dtype and device when it is a floating-point tensor (the
    layer they join), unless their spec records a ``dtype`` of its own; ``ref`` and ``copy``
    entries keep the tensors of the module they name.
    """
    check_module_spec(spec, where)
    kind = spec["type"]
    if kind == "ref":
        return root.get_submodule(spec["name"])
    if kind == "copy":
        return copy.deepcopy(root.get_submodule(spec["name"]))
    if kind in ("Sequential", "ModuleList"):
        children = [build_module(c, root, where, like=like) for c in spec["children"]]
        return nn.Sequential(*children) if kind == "Sequential" else nn.ModuleList(children)
    cls = allowed_module_class(kind)
    kwargs = {k: from_json_value(v) for k, v in spec.get("kwargs", {}).items()}
    try:
        built = cls(**kwargs)
        if like is not None and like.is_floating_point() and "dtype" not in kwargs:
            built.to(dtype=like.dtype, device=like.device)  # a fresh layer: only its own floating-point tensors
        return built
    except GrowError:
        raise
    except Exception as exc:
        raise ArchitectureError(f"{where}: cannot build {kind} from its recorded arguments "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None

