"""What is in a checkpoint: modules, parameters, inputs, block stacks, growable layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from growcli.model import GrowModel
from growcli.transforms.registry import all_transforms


def block_stacks(module: nn.Module, min_len: int = 2) -> list[dict[str, Any]]:
    """Containers (``ModuleList``/``Sequential``) of ``min_len``+ same-typed blocks with parameters, longest first."""
    stacks = []
    for name, m in module.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < min_len:
            continue
        children = list(m)
        types = {type(c) for c in children}
        if len(types) == 1 and any(True for _ in children[0].parameters()) and not isinstance(children[0], (nn.Linear, nn.Conv2d)):
            stacks.append({"name": name, "type": type(children[0]).__name__, "length": len(children),
                           "params_per_block": sum(p.numel() for p in children[0].parameters())})
    return sorted(stacks, key=lambda s: (-s["length"], s["name"]))


def inspect_model(gm: GrowModel, growable: bool = True) -> dict[str, Any]:
    """A JSON-able description of ``gm``; ``growable`` asks every transform which layers it can grow."""
    modules = []
    for name, m in gm.module.named_modules():
        params = {k: list(p.shape) for k, p in m.named_parameters(recurse=False)}
        if not params and name:
            continue
        modules.append({"name": name or "(root)", "type": type(m).__name__, "params": params,
                        "count": sum(p.numel() for p in m.parameters(recurse=False))})
    report: dict[str, Any] = {
        "path": str(gm.source),
        "kind": gm.kind,
        "class": gm.hf_class or type(gm.module).__name__,
        "total_parameters": gm.num_parameters(),
        "inputs": gm.inputs.describe(),
        "modules": modules,
        "block_stacks": block_stacks(gm.module),
        "growable": {},
    }
    if growable:
        for name, t in sorted(all_transforms().items()):
            if t.candidates is not None:
                try:
                    report["growable"][name] = t.candidates(gm)
                except Exception as exc:  # analysis failure is itself information for the user
                    report["growable"][name] = {"(model)": f"analysis failed: {type(exc).__name__}: {exc}"}
    return report
