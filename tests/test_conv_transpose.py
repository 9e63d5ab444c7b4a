"""Transposed convolutions as producers and consumers of widened channels.

A ``ConvTranspose`` weight is ``[in, out/groups, k…]``: widening its output grows dim 1 (and the bias), widening
the layer before it grows dim 0 (Net2Net split of the duplicated channels, or zero for init zero). Each case is a
real torch module exported in float64 to a ``.pt2`` program and widened through the CLI; the grown weights are
loaded back onto a fresh module and re-measured here on new inputs: max abs difference ≤ 1e-10.
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
from growcli.analysis.trace import conv_transposed, conv_weight_dims, trace_model
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context

TOL = 1e-10


class AutoEncoder(nn.Module):
    """Conv2d → BN → ReLU → ConvTranspose2d → BN → ReLU → ConvTranspose2d (stride, padding, output padding)."""

    def __init__(self, inplace: bool = False, groups: int = 1):
        super().__init__()
        self.inplace = inplace
        self.enc = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dec1 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=groups)
        self.bn1 = nn.BatchNorm2d(4)
        self.dec2 = nn.ConvTranspose2d(4, 3, 4, stride=2, padding=2, dilation=2, output_padding=1)

    def forward(self, x):
        h = self.bn(self.enc(x))
        h = F.relu(h, inplace=True) if self.inplace else F.relu(h)
        h = self.bn1(self.dec1(h))
        h = F.hardswish(h, inplace=True) if self.inplace else F.hardswish(h)
        h = F.dropout(h, 0.1, training=False, inplace=True) if self.inplace else F.dropout(h, 0.1, training=False)
        return self.dec2(h)

    def example(self):
        return torch.randn(2, 3, 8, 8)


class Vocoder(nn.Module):
    """A 1-D upsampling decoder: Conv1d → BN → ConvTranspose1d ×2 summed (a skip upsampler) → Conv1d → Conv1d."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv1d(4, 8, 5, padding=2)
        self.bn = nn.BatchNorm1d(8)
        self.up = nn.ConvTranspose1d(8, 6, 8, stride=4, padding=2)
        self.skip = nn.ConvTranspose1d(8, 6, 4, stride=4)
        self.res = nn.Conv1d(6, 6, 3, padding=3, dilation=3)
        self.post = nn.Conv1d(6, 1, 7, padding=3)

    def forward(self, x):
        h = F.leaky_relu(self.bn(self.pre(x)), 0.1)
        h = self.up(h) + self.skip(h)  # two transposed co-producers of one channel space
        return torch.tanh(self.post(F.leaky_relu(self.res(F.leaky_relu(h, 0.1)), 0.1)))

    def example(self):
        return torch.randn(2, 4, 10)


class Depthwise(nn.Module):
    """A depthwise transposed convolution (groups = channels) between two convolutions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 6, 2, stride=2, groups=6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.up(F.relu(self.conv(x)))))

    def example(self):
        return torch.randn(2, 3, 6, 6)


class Volume(nn.Module):
    """Conv3d → ConvTranspose3d → Conv3d."""

    def __init__(self):
        super().__init__()
        self.enc, self.up, self.head = nn.Conv3d(2, 4, 3, padding=1), nn.ConvTranspose3d(4, 5, 2, stride=2), nn.Conv3d(5, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.up(F.relu(self.enc(x)))))

    def example(self):
        return torch.randn(1, 2, 4, 4, 4)


def _hifigan():
    import transformers as T

    cfg = T.SpeechT5HifiGanConfig(model_in_dim=8, upsample_initial_channel=16, upsample_rates=[2, 2],
                                  upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
                                  normalize_before=False)
    return T.SpeechT5HifiGan(cfg)


def build(name: str, **kw) -> nn.Module:
    """A float64 eval-mode model with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    m = _hifigan() if name == "hifigan" else {"ae": AutoEncoder, "vocoder": Vocoder, "depthwise": Depthwise,
                                              "volume": Volume}[name](**kw)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m.double().eval()


def example(name: str, model: nn.Module, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(1, 6, 8) if name == "hifigan" else model.example()
    return x.double()


def export(tmp_path, name: str, **kw):
    model = build(name, **kw)
    path = tmp_path / f"{name}.pt2"
    torch.export.save(torch.export.export(model, (example(name, model, 0),), strict=False), str(path))
    return model, path


def widen_cli(cli, tmp_path, path, layer: str, to: int, *extra) -> tuple[dict, object]:
    out = tmp_path / f"{layer.replace('.', '_')}{''.join(extra).replace('-', '_')}.safetensors"
    r = cli("widen", path, "--layer", layer, "--to", to, "-o", out, "--json", *extra)
    assert r.code == 0, r.err
    return json.loads(r.out), out


def max_diff(a: nn.Module, b: nn.Module, name: str) -> float:
    worst = 0.0
    for seed in (11, 12, 13):
        x = example(name, a, seed)
        with torch.no_grad():
            ya, yb = a(x), b(x)
        assert ya.shape == yb.shape
        worst = max(worst, float((ya - yb).abs().max()))
    return worst


# (model, layer, new size, {parameter: shape after}, {module: (in_channels, out_channels) after})
CASES = [
    ("ae", "enc", 10, {"enc.weight": (10, 3, 3, 3), "bn.running_var": (10,), "dec1.weight": (10, 4, 3, 3)},
     {"dec1": (10, 4)}),  # ConvTranspose2d as the consumer: dim 0 of its weight
    ("ae", "dec1", 9, {"dec1.weight": (6, 9, 3, 3), "dec1.bias": (9,), "bn1.running_mean": (9,), "dec2.weight": (9, 3, 4, 4)},
     {"dec1": (6, 9), "dec2": (9, 3)}),  # producer (dim 1) and a transposed consumer (dim 0)
    ("vocoder", "pre", 12, {"pre.weight": (12, 4, 5), "up.weight": (12, 6, 8), "skip.weight": (12, 6, 4)},
     {"up": (12, 6), "skip": (12, 6)}),
    ("vocoder", "up", 10, {"up.weight": (8, 10, 8), "skip.weight": (8, 10, 4), "res.weight": (6, 10, 3)},
     {"up": (8, 10), "skip": (8, 10), "res": (10, 6)}),
    ("depthwise", "conv", 9, {"up.weight": (9, 1, 2, 2), "up.bias": (9,), "head.weight": (2, 9, 1, 1)}, {"up": (9, 9)}),
    ("volume", "enc", 7, {"up.weight": (7, 5, 2, 2, 2)}, {"up": (7, 5)}),
    ("volume", "up", 8, {"up.weight": (4, 8, 2, 2, 2), "head.weight": (2, 8, 1, 1, 1)}, {"up": (4, 8)}),
    ("hifigan", "conv_pre", 24, {"conv_pre.weight": (24, 8, 7), "upsampler.0.weight": (24, 8, 4)}, {"upsampler.0": (24, 8)}),
    # the residual blocks' adds: every convs2 is a co-producer, every convs1 a consumer
    ("hifigan", "upsampler.0", 12, {"upsampler.0.weight": (16, 12, 4), "resblocks.0.convs1.0.weight": (8, 12, 3),
                                    "resblocks.0.convs2.1.weight": (12, 8, 3), "upsampler.1.weight": (12, 4, 4)},
     {"upsampler.0": (16, 12), "upsampler.1": (12, 4)}),
]


def _shapes(model: nn.Module, shapes: dict) -> None:
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for fqn, want in shapes.items():
        assert tuple(params[fqn].shape) == want, fqn


CLI_CASES = CASES
# A depthwise convolution's ``groups`` is also a literal of the program's graph (a ``graph_arg`` edit): those
# grown weights load onto the program they were grown from, not onto a fresh torch module.
PROGRAM_ONLY = {"depthwise"}


@pytest.mark.parametrize("name,layer,to,shapes,channels", CLI_CASES, ids=[f"{c[0]}-{c[1]}" for c in CLI_CASES])
def test_cli_widen_through_transposed_convs_is_exact(cli, tmp_path, name, layer, to, shapes, channels):
    """A ``.pt2`` program through ``growcli widen``; the safetensors loaded onto the program and onto a fresh module."""
    original, path = export(tmp_path, name)
    report, out = widen_cli(cli, tmp_path, path, layer, to)
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= TOL
    onto = [torch.export.load(str(path)).module()] + ([] if name in PROGRAM_ONLY else [copy.deepcopy(original)])
    for fresh in onto:
        grown = growcli.load_grown(fresh, out)
        _shapes(grown, shapes)
        assert max_diff(original, grown, name) <= TOL


@pytest.mark.parametrize("name,layer,to,shapes,channels", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_api_widen_zero_init_keeps_module_attributes_in_step(name, layer, to, shapes, channels):
    """A torch module through the Python API, init zero: shapes, ``in_channels``/``out_channels`` and exactness."""
    original = build(name)
    gm = GrowModel(copy.deepcopy(original), "state_dict", Path("mem"), "0",
                   spec_from_batch(((example(name, original, 0),), {})))
    report = run_step(gm, "widen", {"layer": layer, "to": to, "init": "zero"}, Context(seed=1), VerifySettings(batches=2))
    assert report.verification["passed"] and report.verification["max_abs_diff"] <= TOL
    _shapes(gm.module, shapes)
    for mod, (c_in, c_out) in channels.items():
        m = gm.module.get_submodule(mod)
        assert (m.in_channels, m.out_channels) == (c_in, c_out), mod
    assert max_diff(original, gm.module, name) <= TOL


def test_transposed_consumer_columns_are_split_or_zero(cli, tmp_path):
    """Net2Net: the rows of the transposed consumer's weight that copy one channel sum to its row; zero init: 0."""
    original, path = export(tmp_path, "ae")
    _, out = widen_cli(cli, tmp_path, path, "enc", 12, "--split", "uniform")
    grown = growcli.load_grown(copy.deepcopy(original), out)
    enc, w = grown.enc.weight.detach(), grown.dec1.weight.detach()
    sums = torch.zeros_like(original.dec1.weight)
    for j in range(12):
        src = next(k for k in range(6) if torch.equal(enc[j], enc[k]))
        sums[src] += w[j]
    assert float((sums - original.dec1.weight).abs().max()) <= 1e-15
    _, out = widen_cli(cli, tmp_path, path, "enc", 12, "--init", "zero")
    grown = growcli.load_grown(copy.deepcopy(original), out)
    assert torch.count_nonzero(grown.dec1.weight[6:]) == 0 and torch.equal(grown.dec1.weight[:6], original.dec1.weight)


def test_inplace_ops_grow_like_their_out_of_place_forms(cli, tmp_path):
    """relu_, hardswish_ and an in-place dropout between the layers: the same grown weights as the functional ops."""
    ops = {str(n.target) for n in trace_model(build("ae", inplace=True), ((example("ae", build("ae"), 0),), {})).graph.nodes}
    assert {"aten.relu_.default", "aten.hardswish_.default"} <= ops
    weights = []
    for inplace in (False, True):
        (tmp_path / str(inplace)).mkdir()
        original, path = export(tmp_path / str(inplace), "ae", inplace=inplace)
        for layer, to in (("enc", 9), ("dec1", 7)):
            report, out = widen_cli(cli, tmp_path / str(inplace), path, layer, to)
            assert report["verification"]["max_abs_diff"] <= TOL
            grown = growcli.load_grown(copy.deepcopy(original), out)
            assert max_diff(original, grown, "ae") <= TOL
            weights.append({k: v.detach().clone() for k, v in grown.state_dict().items()})
    for plain, inplace in zip(weights[:2], weights[2:]):
        assert plain.keys() == inplace.keys() and all(torch.equal(plain[k], inplace[k]) for k in plain)


def test_decomposed_program_with_convolution_transposed_is_exact(cli, tmp_path):
    """A program decomposed to ``aten.convolution(transposed=True)`` grows like one with ``conv_transpose2d``."""
    model = build("ae")
    ep = torch.export.export(model, (example("ae", model, 0),), strict=False).run_decompositions()
    convs = [n for n in ep.module().graph.nodes if n.target == torch.ops.aten.convolution.default]
    assert [conv_transposed(n) for n in convs] == [False, True, True]
    assert [conv_weight_dims(n) for n in convs] == [(0, 1), (1, 0), (1, 0)]
    path = tmp_path / "ae_decomposed.pt2"
    torch.export.save(ep, str(path))
    for layer, to in (("enc", 8), ("dec1", 6)):
        report, out = widen_cli(cli, tmp_path, path, layer, to)
        assert report["verification"]["max_abs_diff"] <= TOL
        assert max_diff(model, growcli.load_grown(copy.deepcopy(model), out), "ae") <= TOL


@pytest.mark.parametrize("layer,message", [
    ("enc", "transposed convolution in 'dec1' reads the channels in 2 groups"),
    ("dec1", "'dec1': transposed convolution in 'dec1' has 2 groups"),
])
def test_grouped_transposed_conv_is_refused_naming_the_layer(cli, tmp_path, layer, message):
    _, path = export(tmp_path, "ae", groups=2)
    out = tmp_path / "never.safetensors"
    r = cli("widen", path, "--layer", layer, "--to", 8, "-o", out)
    assert r.code == 1 and message in r.err, r.err
    assert not out.exists()


def test_inspect_lists_transposed_convs_as_widenable(cli, tmp_path):
    _, path = export(tmp_path, "ae")
    r = cli("inspect", path, "--json")
    assert r.code == 0, r.err
    widen = json.loads(r.out)["growable"]["widen"]
    assert widen["enc"] is None and widen["dec1"] is None
    assert "output" in widen["dec2"]
