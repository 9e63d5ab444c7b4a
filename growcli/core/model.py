"""The in-memory model growcli works on: the module plus what is known about where it came from."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from growcli.core.edits import EditLog
from growcli.core.inputs import InputSpec

KINDS = ("pt2", "hf", "pickle", "state_dict")


@contextlib.contextmanager
def weights_default_dtype(module: nn.Module) -> Iterator[None]:
    """Run with torch's default dtype set to ``module``'s float64 weights' dtype (else unchanged).

    Model code that makes tensors without a dtype (``torch.full((), finfo(x.dtype).min)``) makes
    them in the default dtype; for a model growcli runs in float64 that would be float32, and such
    a model fails (a float64 minimum overflows float32) or silently computes a part in float32.
    """
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype != torch.float64 or torch.get_default_dtype() == dtype:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def eval_mode(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode; programs loaded from ``.pt2`` are fixed in the mode they were exported in."""
    try:
        module.eval()
    except NotImplementedError:
        pass
    return module


@dataclass
class GrowModel:
    """A loaded checkpoint.

    ``kind`` is how it was loaded (one of :data:`KINDS`) and decides which output formats
    apply; ``arch`` (``{"factory": "pkg.mod:fn", "kwargs": {...}}``) is how a state_dict
    model is rebuilt; ``edits`` records every structural change since loading (on top of
    ``base_edits`` already present in a grown checkpoint); ``steps`` holds one report per
    applied transform.
    """

    module: nn.Module
    kind: str
    source: Path
    source_sha256: str
    inputs: InputSpec
    arch: dict[str, Any] | None = None
    hf_class: str | None = None
    edits: EditLog = field(default_factory=EditLog)
    base_edits: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    hf_saved_config: dict[str, Any] = field(default_factory=dict)  # config values restored when saving

    @property
    def is_hf(self) -> bool:
        return self.kind == "hf"

    def all_edits(self) -> list[dict]:
        return self.base_edits + self.edits.records

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())
