"""deepen with transposed convolutions: an identity conv after a ConvTranspose, and block copies that zero one.

The identity after a transposed conv is a Dirac conv on its output channels (weight dim 1 of the transposed
weight, times its groups): stride 1, "same" padding, odd kernel. A residual block whose branch ends in a
transposed conv starts as the identity with that conv's weight and bias zeroed. Float64 modules with random
weights and BatchNorm statistics, compared with the original on new inputs: max abs difference ≤ 1e-10.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context

TOL = 1e-10


class Res(nn.Module):
    """``x + up(relu(conv(x)))``: the branch's last layer is a stride-1 transposed conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.up = nn.Conv2d(4, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.up(F.relu(self.conv(x)))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(Res(), Res())
        self.dec = nn.ConvTranspose2d(4, 6, 2, stride=2)  # even kernel, upsampling
        self.bn = nn.BatchNorm2d(6)
        self.dec2 = nn.ConvTranspose2d(6, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = F.relu(self.bn(self.dec(self.blocks(self.stem(x)))))
        return self.head(F.relu6(self.dec2(h)))


def build() -> nn.Module:
    torch.manual_seed(0)
    m = Decoder()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2.0)
    return m.double().eval()


def batch(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    with torch.no_grad():
        return max(float((a(batch(s)) - b(batch(s))).abs().max()) for s in (11, 12, 13))


def deepen(model: nn.Module, **spec):
    gm = GrowModel(copy.deepcopy(model), "state_dict", Path("mem"), "0", spec_from_batch(((batch(0),), {})))
    report = run_step(gm, "deepen", spec, Context(seed=1), VerifySettings(batches=2))
    return gm.module, report


@pytest.mark.parametrize("spec,after", [
    ({"after": "dec2"}, "Sequential(ConvTranspose2d(6→8, k=3x3), ReLU6, Conv2d(8→8, k=3x3))"),  # grouped: 8 outputs
    ({"after": "dec", "kernel": 3}, "Sequential(BatchNorm2d, ReLU, Conv2d(6→6, k=3x3))"),  # after its BN and φ
    ({"after": "dec", "init": "morph", "kernel": 1}, "Sequential(ConvTranspose2d(4→6, k=2x2), "
                                                     "ParametricActivation(relu, a=1), Conv2d(6→6, k=1x1))"),
], ids=["grouped", "after-bn", "morph"])
def test_identity_conv_after_a_transposed_conv_is_exact(spec, after):
    original = build()
    grown, report = deepen(original, **spec)
    assert report.verification["passed"] and report.verification["max_abs_diff"] <= TOL
    assert report.changes[0]["after"] == after
    assert max_diff(original, grown) <= TOL


def test_block_whose_branch_ends_in_a_transposed_conv_starts_as_the_identity():
    original = build()
    grown, report = deepen(original, after="blocks.0", block=True)
    assert report.verification["max_abs_diff"] <= TOL
    assert report.changes[0]["after"].endswith("with zeroed residual writers up.bias, up.weight")
    assert len(grown.blocks) == 3 and torch.count_nonzero(grown.blocks[1].up.weight) == 0
    assert max_diff(original, grown) <= TOL


@pytest.mark.parametrize("spec,message", [
    ({"after": "dec"}, "'dec' has an even kernel (2, 2): an identity conv needs an odd kernel"),
    ({"after": "dec2", "init": "morph", "split": "svd"}, "'dec2' is a transposed convolution; a dense split"),
], ids=["even-kernel", "dense-split"])
def test_inexact_insertions_are_refused(spec, message):
    with pytest.raises(NotGrowableError) as err:
        deepen(build(), **spec)
    assert message in str(err.value)


def test_program_deepened_after_a_transposed_conv_reads_back_exactly(cli, tmp_path):
    """A .pt2 program: the new conv is called on the graph node; the written program loaded back."""
    original = build()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(original, (batch(0),), strict=False), str(path))
    out = tmp_path / "g.pt2"
    r = cli("deepen", path, "--after", "dec2", "-o", out)
    assert r.code == 0, r.err
    grown = torch.export.load(str(out)).module()
    assert grown.get_submodule("dec2.deepen.0").weight.shape == (8, 8, 3, 3)
    assert max_diff(original, grown) <= TOL
    r = cli("deepen", path, "--after", "dec", "-o", tmp_path / "never.safetensors")
    assert r.code == 1 and "'dec' has an even kernel (2, 2)" in r.err
    assert not (tmp_path / "never.safetensors").exists()
