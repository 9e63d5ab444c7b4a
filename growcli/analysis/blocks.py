"""Stacks of repeated blocks: the containers progressive stacking and block insertion work on."""

from __future__ import annotations

from typing import Any

from torch import nn


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
