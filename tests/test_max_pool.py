"""Max pooling over positions is a per-channel op: a widened conv's new channels pass through it.

Small real torch CNNs end in global or adaptive max pooling (``AdaptiveMaxPool2d(1)``, ``x.amax((2, 3))``,
``torch.max(x.flatten(2), -1)``, ``x.max(dim=-1, keepdim=True)``, ``AdaptiveMaxPool1d``, ``MaxPool1d`` with
``return_indices``) and a Linear head; each is widened, verified by growcli in float64 and re-measured here on
inputs growcli has not seen (max |Δ| ≤ 1e-10). Pooling or a max over the channels, and a use of the indices,
are refused naming the op; a residual add after the pooling ties the channels back to the conv before it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import growcli
from growcli.analysis.coupling import analyze
from growcli.analysis.trace import trace_model
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context

TOL = 1e-10
IMAGE = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
SIGNAL = torch.randn(2, 3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


class AdaptiveMax2d(nn.Module):
    """conv → ReLU → AdaptiveMaxPool2d(1) → flatten → Linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.AdaptiveMaxPool2d(1), nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.pool(F.relu(self.conv(x))).flatten(1))


class GlobalMax(nn.Module):
    """Global max pooling three ways on one conv's output, each feeding its own head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.a, self.b, self.c = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        rows = h.max(dim=-1, keepdim=True).values  # [N, C, H, 1]: per channel and row
        return (self.a(h.amax((2, 3))) + self.b(torch.max(h.flatten(2), -1).values)
                + self.c(torch.max(rows, dim=2).values.squeeze(-1)))


class Max1d(nn.Module):
    """A 1-D conv net: MaxPool1d with indices (unused), a second conv, AdaptiveMaxPool1d(2), flatten, Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(3, 5, 3, padding=1), nn.Conv1d(5, 7, 3, padding=1)
        self.pool, self.out = nn.AdaptiveMaxPool1d(2), nn.Linear(14, 3)

    def forward(self, x):
        h, _ = F.max_pool1d(F.relu(self.conv1(x)), 2, return_indices=True)
        return self.out(self.pool(F.relu(self.conv2(h))).flatten(1))


class PooledResidual(nn.Module):
    """A max-pooled conv added to another conv: growing either ties the other one to the same channels."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        pooled = F.adaptive_max_pool2d(self.conv1(x), 3)
        return self.head(F.relu(pooled + self.conv2(F.adaptive_avg_pool2d(x, 3))))


class ChannelMax(nn.Module):
    """The max over the channels: a new channel could win it, so widening is refused."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.max(self.conv(x), dim=1).values.mean(1))


class Unpool(nn.Module):
    """Max pooling whose indices are used (max_unpool2d): refused, naming the op."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        v, i = F.max_pool2d(self.conv(x), 2, return_indices=True)
        return self.head(F.max_unpool2d(v, i, 2))


def grown(module: nn.Module, x: torch.Tensor, layer: str, to: int) -> tuple[nn.Module, float]:
    """Widen ``layer`` to ``to`` channels (growcli verifies); the max |Δ| measured here on fresh inputs."""
    torch.manual_seed(0)
    module = module.double().eval()
    before = copy.deepcopy(module)
    gm = GrowModel(module, "module", Path("mem"), "0", spec_from_batch(((x,), {})))
    report = run_step(gm, "widen", {"layer": layer, "to": to}, Context(seed=1), VerifySettings(batches=2))
    assert report.exact and report.verification["passed"] and report.verification["dtype"] == "float64"
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        diff = float((before(fresh) - gm.module(fresh)).abs().max())
    assert diff <= TOL
    return gm.module, diff


def test_adaptive_max_pool2d_passes_new_channels_to_the_head():
    m, _ = grown(AdaptiveMax2d(), IMAGE, "conv", 10)
    assert tuple(m.conv.weight.shape) == (10, 3, 3, 3) and tuple(m.head.weight.shape) == (4, 10)


def test_amax_and_max_with_indices_over_positions_pass_new_channels():
    m, _ = grown(GlobalMax(), IMAGE, "conv", 9)
    assert [tuple(h.weight.shape) for h in (m.a, m.b, m.c)] == [(4, 9)] * 3


def test_1d_max_pooling_with_unused_indices_widens_both_convs():
    m, _ = grown(Max1d(), SIGNAL, "conv1", 8)
    assert tuple(m.conv2.weight.shape) == (7, 8, 3)
    m, _ = grown(Max1d(), SIGNAL, "conv2", 11)
    assert tuple(m.out.weight.shape) == (3, 22)  # AdaptiveMaxPool1d(2): each channel gives two features


def test_a_residual_after_max_pooling_ties_the_conv_before_it():
    group = analyze(trace_model(PooledResidual().double().eval(), ((IMAGE,), {})), "conv2")
    assert sorted(group.producers) == ["conv1", "conv2"]
    m, _ = grown(PooledResidual(), IMAGE, "conv2", 10)
    assert tuple(m.conv1.weight.shape) == (10, 3, 3, 3) and tuple(m.head.weight.shape) == (2, 10, 1, 1)


@pytest.mark.parametrize("module, match", [
    (ChannelMax(), r"'conv': max\.dim reduces over the grown dimension"),
    (Unpool(), r"'conv': the indices of max_pool2d_with_indices\.default are used \(max_unpool2d\.default\)"),
], ids=["max-over-channels", "unpool"])
def test_max_over_the_channels_and_used_indices_are_refused(module, match):
    with pytest.raises(NotGrowableError, match=match):
        analyze(trace_model(module.double().eval(), ((IMAGE,), {})), "conv")


def test_cli_widens_an_exported_program_with_adaptive_max_pooling(cli, tmp_path):
    torch.manual_seed(0)
    module = AdaptiveMax2d().double().eval()
    torch.export.save(torch.export.export(module, (IMAGE,)), tmp_path / "cnn.pt2")
    r = cli("widen", tmp_path / "cnn.pt2", "--layer", "conv", "--by", "4", "-o", tmp_path / "out.pt2", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= TOL
    grown_program = growcli.load_model(tmp_path / "out.pt2").module
    fresh = torch.randn(IMAGE.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        assert float((module(fresh) - grown_program(fresh)).abs().max()) <= TOL
