"""Depthwise convolutions (groups == channels) inside ``.pt2`` programs follow a widened layer.

In a program the ``groups`` of a convolution is a literal argument of its graph node (index 6 of
``conv1d``/``conv2d``, 8 of the decomposed ``convolution``); widen rewrites it with the weights. Each case is a
float64 torch module exported to a ``.pt2``, widened through the CLI, and read back from the written files
(the safetensors replayed onto the program, the written ``.pt2`` loaded with ``torch.export.load``): max abs
difference against the original module on new inputs ≤ 1e-10.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import growcli
from growcli.io.formats import safetensors_metadata

TOL = 1e-10


class Separable(nn.Module):
    """A MobileNet-style block: pointwise → BN → ReLU6 → depthwise 3×3 → BN → ReLU6 → pointwise (1-D or 2-D)."""

    def __init__(self, dims: int = 2):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.dims = dims
        self.expand, self.bn1 = conv(3, 6, 1), bn(6)
        self.dw, self.bn2 = conv(6, 6, 3, padding=1, stride=2, groups=6), bn(6)
        self.project = conv(6, 4, 1)

    def forward(self, x):
        h = F.relu6(self.bn1(self.expand(x)))
        return self.project(F.relu6(self.bn2(self.dw(h))))


def build(dims: int) -> nn.Module:
    torch.manual_seed(0)
    m = Separable(dims)
    for mod in (m.bn1, m.bn2):
        mod.running_mean.uniform_(-0.5, 0.5)
        mod.running_var.uniform_(0.5, 2.0)
    return m.double().eval()


def batch(dims: int, seed: int) -> torch.Tensor:
    return torch.randn((2, 3, 8, 8) if dims == 2 else (2, 3, 12), generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def max_diff(a: nn.Module, b: nn.Module, dims: int) -> float:
    worst = 0.0
    for seed in (11, 12, 13):
        with torch.no_grad():
            ya, yb = a(batch(dims, seed)), b(batch(dims, seed))
        assert ya.shape == yb.shape
        worst = max(worst, float((ya - yb).abs().max()))
    return worst


def groups_literals(program: nn.Module) -> list[int]:
    """The ``groups`` argument of every convolution node reading ``dw.weight``."""
    out = []
    for node in program.graph.nodes:
        if node.op == "call_function" and len(node.args) > 1 and getattr(node.args[1], "target", None) == "dw.weight":
            out.append(node.args[8 if node.target == torch.ops.aten.convolution.default else 6])
    return out


@pytest.mark.parametrize("dims,decomposed,index", [(2, False, 6), (1, False, 6), (2, True, 8)],
                         ids=["conv2d", "conv1d", "convolution"])
def test_widen_before_depthwise_conv_in_program_is_exact(cli, tmp_path, dims, decomposed, index):
    original = build(dims)
    ep = torch.export.export(original, (batch(dims, 0),), strict=False)
    if decomposed:
        ep = ep.run_decompositions()
    path = tmp_path / "m.pt2"
    torch.export.save(ep, str(path))
    weights, program_out = tmp_path / "g.safetensors", tmp_path / "g.pt2"
    r = cli("widen", path, "--layer", "expand", "--to", 10, "-o", weights, "-o", program_out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= TOL

    edits = json.loads(safetensors_metadata(weights)["growcli.edits"])
    assert {"op": "attr", "module": "dw", "attr": "groups", "value": 10} in edits
    assert [(e["index"], e["value"]) for e in edits if e["op"] == "graph_arg"] == [(index, 10)]

    replayed = growcli.load_grown(torch.export.load(str(path)).module(), weights)
    written = torch.export.load(str(program_out)).module()
    for grown in (replayed, written):
        assert groups_literals(grown) == [10]
        assert tuple(grown.get_parameter("dw.weight").shape) == ((10, 1, 3, 3) if dims == 2 else (10, 1, 3))
        assert max_diff(original, grown, dims) <= TOL
