"""What is in a checkpoint: modules, parameters, inputs, block stacks, growable layers."""

from __future__ import annotations

from typing import Any

from growcli.analysis.blocks import block_stacks
from growcli.core.model import GrowModel
from growcli.transforms.catalog import all_transforms


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
