"""Two rule gaps the CNN coverage table found (issue 15): string-padding convolutions and ``reshape_as``.

1. ``nn.Conv*d(padding="same"/"valid")`` traces as ``aten.conv*d.padding``; every convolution rule
   (widen's coupled channels, deepen's layer reading) takes it like ``conv*d.default``.
2. ``a.reshape_as(b)`` / ``view_as`` / ``expand_as`` (LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``)
   follow the rule of the view or expand they equal; ``b`` only lends its shape.

Every growth is checked in float64: a widen splits a duplicated unit's outgoing weights, so the
outputs agree to a few roundings (≤ 1e-10); an identity layer is exact to the same bound.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import as_grow_model
from torch import nn

import growcli
from growcli.analysis.trace import CONV, op_name, trace_model
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import make_batches
from growcli.io.load import load_model
from growcli.transforms.widen import widen_candidates

TOL = 1e-10
CONV_CLS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN_CLS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _diff(a: nn.Module, b: nn.Module, *args, **kwargs) -> float:
    with torch.no_grad():
        out_a, out_b = a(*args, **kwargs), b(*args, **kwargs)
    if not isinstance(out_a, torch.Tensor):
        out_a, out_b = out_a.logits, out_b.logits
    return float((out_a - out_b).abs().max())


def _noisy_bn(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so no γ, β, mean or variance is trivially 0 or 1."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.eval()


# -- 1. convolutions with string padding -----------------------------------------------------------------------------

class PaddedConvs(nn.Module):
    """conv → BN → ReLU → conv → ReLU → conv, every conv with ``padding=pad`` (a string)."""

    def __init__(self, dims: int, pad: str):
        super().__init__()
        conv, bn = CONV_CLS[dims], BN_CLS[dims]
        self.c1, self.bn, self.c2, self.c3 = conv(3, 4, 3, padding=pad), bn(4), conv(4, 5, 3, padding=pad), conv(5, 2, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))))


def _padded(dims: int, pad: str):
    torch.manual_seed(0)
    model = _noisy_bn(PaddedConvs(dims, pad).double())
    x = torch.randn(2, 3, *([7] * dims), dtype=torch.float64)
    return model, x


CASES = [(2, "same"), (2, "valid"), (1, "same"), (3, "valid")]


@pytest.mark.parametrize("dims,pad", CASES, ids=[f"conv{d}d-{p}" for d, p in CASES])
def test_string_padding_convs_trace_as_convolutions_and_widen_exactly(dims, pad):
    model, x = _padded(dims, pad)
    ref = copy.deepcopy(model)
    gm = as_grow_model(model, (x,))
    trace = trace_model(gm.module, make_batches(gm.inputs, 1)[0])
    convs = [n for n in trace.graph.nodes if n.op == "call_function" and n.target in CONV]
    assert [op_name(n) for n in convs] == [f"conv{dims}d.padding"] * 2 + [f"conv{dims}d.default"]
    assert widen_candidates(gm) == {"c1": None, "c2": None, "c3": "the channels reach the model's output "
                                                                  "(widening would change the output shape)"}
    growcli.apply(gm, "widen", layer="c1", to=9)
    growcli.apply(gm, "widen", layer="c2", to=7)
    m = gm.module
    assert (m.c1.out_channels, m.bn.num_features, m.c2.in_channels, m.c2.out_channels, m.c3.in_channels) == (9, 9, 9, 7, 7)
    assert m.c1.padding == pad and m.c2.padding == pad
    assert _diff(m, ref, x) <= TOL


@pytest.mark.parametrize("dims,pad", CASES, ids=[f"conv{d}d-{p}" for d, p in CASES])
def test_deepen_after_a_string_padding_conv_inserts_an_exact_identity(dims, pad):
    model, x = _padded(dims, pad)
    ref = copy.deepcopy(model)
    gm = as_grow_model(model, (x,))
    report = growcli.apply(gm, "deepen", after="c1")
    assert report.verification["passed"] and report.verification["max_abs_diff"] <= TOL
    # inserted after the BatchNorm, where the ReLU reads: BN → ReLU → identity conv (then the old ReLU)
    wrapped = gm.module.bn
    assert [type(m) for m in wrapped] == [BN_CLS[dims], nn.ReLU, CONV_CLS[dims]]
    assert wrapped[2].weight.shape == (4, 4) + (3,) * dims and wrapped[2].padding == (1,) * dims
    assert _diff(gm.module, ref, x) <= TOL
    assert gm.module(x).shape == ref(x).shape


@pytest.fixture(scope="module")
def efficientnet():
    from transformers import EfficientNetConfig, EfficientNetForImageClassification
    torch.manual_seed(0)
    cfg = EfficientNetConfig(image_size=32, width_coefficient=1.0, depth_coefficient=1.0, kernel_sizes=[3, 3],
                             in_channels=[32, 8], out_channels=[8, 16], strides=[1, 2], num_block_repeats=[1, 1],
                             expand_ratios=[1, 4], hidden_dim=1280, depthwise_padding=[], num_hidden_layers=2,
                             num_labels=5)
    model = _noisy_bn(EfficientNetForImageClassification(cfg).double())
    return model, torch.randn(2, 3, 32, 32, dtype=torch.float64)


def test_efficientnet_stem_widens_and_its_projection_deepens_exactly(efficientnet):
    """EfficientNet's convs all use ``padding="same"``/``"valid"``: before the fix widen listed none of them."""
    model, x = efficientnet
    stem, proj = "efficientnet.embeddings.convolution", "efficientnet.encoder.blocks.0.projection.project_conv"
    gm = as_grow_model(copy.deepcopy(model), {"pixel_values": x})
    assert model.get_submodule(stem).padding == "valid"
    growcli.apply(gm, "widen", layer=stem, to=40)
    assert gm.module.get_submodule(stem).out_channels == 40
    assert gm.module.get_submodule("efficientnet.encoder.blocks.0.depthwise_conv.depthwise_conv").groups == 40
    assert _diff(gm.module, model, pixel_values=x) <= TOL
    gm = as_grow_model(copy.deepcopy(model), {"pixel_values": x})
    report = growcli.apply(gm, "deepen", after=proj)
    assert report.verification["max_abs_diff"] <= TOL
    assert _diff(gm.module, model, pixel_values=x) <= TOL


# -- 2. reshape_as, view_as, expand_as -------------------------------------------------------------------------------

class LinearBN(nn.Module):
    """LeViT's projection: a Linear over tokens, BatchNorm1d over the flattened rows, back to the Linear's shape."""

    def __init__(self, op: str = "reshape_as"):
        super().__init__()
        self.op, self.fc, self.bn, self.out = op, nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.out(torch.relu(getattr(self.bn(h.flatten(0, 1)), self.op)(h)))


def _tokens() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 5, 4, dtype=torch.float64)


@pytest.mark.parametrize("op", ["reshape_as", "view_as"])
def test_widen_through_reshape_as_after_batchnorm1d(op):
    x = _tokens()
    model = _noisy_bn(LinearBN(op).double())
    ref = copy.deepcopy(model)
    gm = as_grow_model(model, (x,))
    growcli.apply(gm, "widen", layer="fc", to=11)
    assert gm.module.bn.num_features == 11 and gm.module.out.in_features == 11
    assert _diff(gm.module, ref, x) <= TOL


def test_widen_through_reshape_as_in_a_program(tmp_path):
    """In a ``.pt2`` program the shape comes from the other tensor at run time: nothing to patch."""
    x = _tokens()
    model = _noisy_bn(LinearBN().double())
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "m.pt2"))
    gm = load_model(tmp_path / "m.pt2")
    report = growcli.apply(gm, "widen", layer="fc", to=11)
    assert {c["name"]: c["after"] for c in report.changes}["bn.running_var"] == [11]
    assert _diff(gm.module, model, x) <= TOL


class ExpandAs(nn.Module):
    """``expand_as`` of a tensor carrying the channels (a per-channel mean over tokens) and of one broadcast
    along them (a per-token scalar)."""

    def __init__(self):
        super().__init__()
        self.fc, self.tok, self.out = nn.Linear(4, 6), nn.Linear(4, 1), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.out(h * torch.sigmoid(h.mean(1, keepdim=True)).expand_as(h) + self.tok(x).expand_as(h))


def test_widen_through_expand_as():
    x = _tokens()
    model = ExpandAs().double().eval()
    ref = copy.deepcopy(model)
    gm = as_grow_model(model, (x,))
    growcli.apply(gm, "widen", layer="fc", to=11)
    assert gm.module.out.in_features == 11 and gm.module.tok.out_features == 1
    assert _diff(gm.module, ref, x) <= TOL


class MergeAs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(30, 3)

    def forward(self, x):
        h = self.fc(x)
        z = h.flatten(1)
        return self.out(h.reshape_as(z) + z)


def test_reshape_as_that_merges_the_channels_is_refused():
    with pytest.raises(NotGrowableError, match=r"^'fc': reshape_as\.default merges the grown dimension with others$"):
        growcli.apply(as_grow_model(MergeAs().double().eval(), (_tokens(),)), "widen", layer="fc", to=11)


class Block(nn.Module):
    """A residual block whose branch ends in LeViT's Linear + BatchNorm1d projection."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.bn = nn.Linear(6, 8), nn.Linear(8, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x)))
        return x + self.bn(h.flatten(0, 1)).reshape_as(h)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.blocks, self.head = nn.Linear(4, 6), nn.ModuleList([Block(), Block()]), nn.Linear(6, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_deepen_block_zeroes_a_branch_ending_in_reshape_as():
    x = _tokens()
    model = _noisy_bn(Stack().double())
    ref = copy.deepcopy(model)
    gm = as_grow_model(model, (x,))
    report = growcli.apply(gm, "deepen", after="blocks.0", block=True)
    assert len(gm.module.blocks) == 3 and report.verification["max_abs_diff"] <= TOL
    assert _diff(gm.module, ref, x) <= TOL
