"""Transposed convolutions in the data-driven widen inits (gradmax, firefly), in branch concat and in columns.

A ``ConvTranspose`` weight is ``[in, out/groups, k…]``: its units are dim 1 as a producer and dim 0 as a
consumer. Each gradmax case grows a real float64 module on real calibration data and checks, independently
of growcli's measurement: the function is unchanged (max abs difference ≤ 1e-10 on new inputs: the new
units' incoming weights are zero and GELU/tanh map 0 to 0, so every output is the same sum of the same
float64 products plus exact zeros — only the float64 rounding of reordered sums remains), the new incoming
weights (along the right dim) are zero, and their gradient on the calibration batch is exactly
``W_newᵀ·φ'M`` with ``M`` measured by autograd alone (one one-hot outgoing slice at a time), the new units'
outgoing slices being the top singular vectors of ``M`` (so each unit's gradient norm is ``r·σ_i``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

import growcli
from growcli.analysis.calibration import from_tensors
from growcli.analysis.coupling import analyze
from growcli.analysis.trace import trace_model
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import make_batches, spec_from_batch
from growcli.core.model import GrowModel
from growcli.core.replay import replay
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms import firefly
from growcli.transforms.catalog import build_spec
from growcli.transforms.registry import Context

TOL = 1e-10


class TanhAE(nn.Module):
    """Conv2d → BN → tanh → ConvTranspose2d (stride 2, output padding) → GELU → ConvTranspose2d (dilation 2)."""

    def __init__(self):
        super().__init__()
        self.enc, self.bn = nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5)
        self.dec1 = nn.ConvTranspose2d(5, 4, 3, stride=2, padding=1, output_padding=1)
        self.dec2 = nn.ConvTranspose2d(4, 2, 4, stride=2, padding=2, dilation=2, output_padding=1)

    def forward(self, x):
        return self.dec2(F.gelu(self.dec1(torch.tanh(self.bn(self.enc(x))))))

    def example(self, n):
        return torch.randn(n, 3, 6, 6, dtype=torch.float64)


class Upsampler1d(nn.Module):
    """ConvTranspose1d (stride 4) → tanh → padded Conv1d → tanh → Conv1d: a 1-D vocoder's upsampling stage."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose1d(4, 6, 8, stride=4, padding=2)
        self.res = nn.Conv1d(6, 3, 5, padding=2)
        self.post = nn.Conv1d(3, 1, 1)

    def forward(self, x):
        return self.post(torch.tanh(self.res(torch.tanh(self.up(x)))))

    def example(self, n):
        return torch.randn(n, 4, 5, dtype=torch.float64)


class Volume(nn.Module):
    """Conv3d → GELU → ConvTranspose3d (stride 2) → Conv3d 1×1×1."""

    def __init__(self):
        super().__init__()
        self.enc, self.up, self.head = nn.Conv3d(2, 3, 3, padding=1), nn.ConvTranspose3d(3, 2, 2, stride=2), nn.Conv3d(2, 1, 1)

    def forward(self, x):
        return self.head(self.up(F.gelu(self.enc(x))))

    def example(self, n):
        return torch.randn(n, 2, 3, 3, 3, dtype=torch.float64)


class ReluUp(nn.Module):
    """ConvTranspose2d → ReLU → ConvTranspose2d; ``stride=1, padding=2`` (k = 3: every output reads every tap)
    lets the ReLU shift be compensated in the consumer's bias, ``stride=2`` does not."""

    def __init__(self, stride: int = 1, padding: int = 2):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(4, 2, 3, stride=stride, padding=padding)

    def forward(self, x):
        return self.up2(F.relu(self.up1(x)))

    def example(self, n):
        return torch.randn(n, 3, 5, 5, dtype=torch.float64)


MODELS = {"ae": TanhAE, "up1d": Upsampler1d, "volume": Volume, "relu": ReluUp}


def build(name: str, n: int = 12):
    """(float64 eval module, calibration tensors with an mse target of the output's shape)."""
    torch.manual_seed(0)
    m = MODELS[name]().double().eval()
    for mod in m.modules():  # non-trivial statistics, so the new channels' own values matter
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    x = m.example(n)
    with torch.no_grad():
        y = m(x)
    return m, {"input": x, "target": torch.randn_like(y)}


def as_gm(module: nn.Module, tensors: dict) -> GrowModel:
    return GrowModel(copy.deepcopy(module), "state_dict", Path("mem"), "0", spec_from_batch(((tensors["input"][:2],), {})))


def grow(name: str, options: dict, seed: int = 1):
    module, tensors = build(name)
    gm = as_gm(module, tensors)
    ctx = Context(seed=seed)
    ctx.data["calib"] = from_tensors(tensors, gm.inputs, batch_size=len(tensors["input"]))
    report = run_step(gm, "widen", {"data": "calib", **options}, ctx, VerifySettings(batches=2))
    return module, gm, report, tensors


def loss_of(model: nn.Module, tensors: dict, params: dict | None = None) -> torch.Tensor:
    return F.mse_loss(functional_call(model, params or {}, (tensors["input"],)), tensors["target"])


def max_diff(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for seed in (5, 6):
        torch.manual_seed(seed)
        x = a.example(3)
        with torch.no_grad():
            ya, yb = a(x), b(x)
        assert ya.shape == yb.shape
        worst = max(worst, float((ya - yb).abs().max()))
    return worst


def axes(model: nn.Module, layer: str, consumer: str) -> tuple[int, int]:
    """The units' dims of the producer's and the consumer's weights, from the module types (the test's own rule)."""
    t = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return (1 if isinstance(model.get_submodule(layer), t) else 0), (0 if isinstance(model.get_submodule(consumer), t) else 1)


def units(w: torch.Tensor, axis: int, start: int) -> torch.Tensor:
    """Units ``start…`` of ``w`` along ``axis``, one flattened row each."""
    u = w.movedim(axis, 0)[start:]
    return u.reshape(u.shape[0], -1)


def measured_m(model: nn.Module, layer: str, consumer: str, unit: int, tensors: dict) -> torch.Tensor:
    """``φ'·M`` by autograd alone: row ``j`` is the incoming gradient of unit ``unit`` when its outgoing
    slice is the ``j``-th one-hot tensor (the unit outputs 0, so its outgoing weights change nothing else)."""
    pa, ca = axes(model, layer, consumer)
    w_out = model.get_submodule(consumer).weight
    slot = w_out.detach().movedim(ca, 0)[unit]
    saved = slot.clone()
    rows = []
    for j in range(slot.numel()):
        with torch.no_grad():
            w_out.movedim(ca, 0)[unit] = F.one_hot(torch.tensor(j), slot.numel()).view(slot.shape).double()
        (g,) = torch.autograd.grad(loss_of(model, tensors), model.get_submodule(layer).weight)
        rows.append(g.movedim(pa, 0)[unit].flatten())
    with torch.no_grad():
        w_out.movedim(ca, 0)[unit] = saved
    return torch.stack(rows)


# ---------------------------------------------------------------- gradmax
# (model, layer, consumer, options, old size)
GRADMAX = [
    ("ae", "enc", "dec1", {"by": 3}, 5),  # Conv2d producer, transposed consumer (dim 0), BatchNorm between
    ("ae", "dec1", "dec2", {"by": 4}, 4),  # transposed both sides: producer dim 1, consumer dim 0 (dilation 2)
    ("up1d", "up", "res", {"by": 3}, 6),  # ConvTranspose1d producer (stride 4), padded Conv1d consumer
    ("volume", "enc", "up", {"by": 2}, 3),  # Conv3d producer, ConvTranspose3d consumer
]


@pytest.fixture(scope="module")
def gradmax_grown():
    cache = {}

    def get(i):
        if i not in cache:
            name, layer, _, options, _ = GRADMAX[i]
            cache[i] = grow(name, {"layer": layer, "init": "gradmax", **options})
        return cache[i]

    return get


@pytest.mark.parametrize("i", range(len(GRADMAX)), ids=[f"{c[0]}-{c[1]}" for c in GRADMAX])
def test_gradmax_through_transposed_convs_is_exact_and_takes_the_top_singular_vectors(gradmax_grown, i):
    name, layer, consumer, options, old = GRADMAX[i]
    before, gm, report, tensors = gradmax_grown(i)
    assert report.exact and report.verification["passed"] and report.verification["max_abs_diff"] <= TOL
    assert max_diff(before, gm.module) <= TOL
    pa, ca = axes(gm.module, layer, consumer)
    w = gm.module.get_submodule(layer).weight
    k = options["by"]
    assert w.shape[pa] == old + k and gm.module.get_submodule(consumer).weight.shape[ca] == old + k
    assert torch.count_nonzero(units(w.detach(), pa, old)) == 0  # zero incoming weights, along the units' dim
    (g,) = torch.autograd.grad(loss_of(gm.module, tensors), w)
    g_new = units(g, pa, old)
    per_unit = g_new.norm(dim=1)
    assert bool((per_unit > 0).all()), per_unit  # the new units learn
    m = measured_m(gm.module, layer, consumer, old, tensors)  # [outgoing slice, incoming slice]
    cols = units(gm.module.get_submodule(consumer).weight.detach(), ca, old)
    torch.testing.assert_close(g_new, cols @ m, rtol=1e-9, atol=1e-14 * float(g_new.abs().max()))
    radius = float(cols.norm(dim=1)[0])
    old_cols = units(before.get_submodule(consumer).weight.detach(), ca, 0)
    assert abs(radius - 0.5 * float(old_cols.norm(dim=1).mean())) <= 1e-12 * radius
    torch.testing.assert_close(per_unit, radius * torch.linalg.svdvals(m)[:k], rtol=1e-8, atol=1e-12 * float(per_unit.max()))


def test_a_short_step_on_the_new_gradmax_units_lowers_the_loss(gradmax_grown):
    _, gm, _, tensors = gradmax_grown(1)  # ae-dec1: transposed on both sides
    w = gm.module.dec1.weight
    before = float(loss_of(gm.module, tensors))
    (g,) = torch.autograd.grad(loss_of(gm.module, tensors), w)
    mask = torch.zeros_like(w)
    mask[:, 4:] = 1.0  # only the new units' incoming weights move
    step = -1e-3 * g * mask
    after = float(loss_of(gm.module, tensors, {"dec1.weight": w.detach() + step}))
    predicted = float((g * step).sum())  # first order: −lr·‖g_new‖²
    assert after < before and predicted < 0
    assert abs((after - before) - predicted) <= 0.05 * abs(predicted)


def test_relu_shift_is_compensated_through_a_transposed_consumer_that_reads_every_tap():
    before, gm, report, tensors = grow("relu", {"layer": "up1", "by": 2, "init": "gradmax"})
    assert report.exact and max_diff(before, gm.module) <= TOL
    eps = gm.module.up1.bias[4:].detach()
    assert bool((eps > 0).all())
    shift = gm.module.up2.bias.detach() - before.up2.bias.detach()
    new_out = gm.module.up2.weight[4:].detach()  # [2 new, 2 outputs, 3, 3]: dim 0 holds the units
    torch.testing.assert_close(shift, -(new_out * eps[:, None, None, None]).sum((0, 2, 3)), rtol=1e-12, atol=1e-15)
    (g,) = torch.autograd.grad(loss_of(gm.module, tensors), gm.module.up1.weight)
    assert float(g[:, 4:].norm()) > 0


def test_relu_before_a_strided_transposed_consumer_is_refused():
    module, tensors = build("relu")
    module = ReluUp(stride=2, padding=1).double().eval()
    gm = as_gm(module, tensors)
    ctx = Context()
    y = module(tensors["input"]).detach()
    ctx.data["calib"] = from_tensors({"input": tensors["input"], "target": torch.randn_like(y)}, gm.inputs)
    with pytest.raises(NotGrowableError, match=r"'up1': gradmax: .*'up2' is a transposed convolution \(stride \[2, 2\]"):
        run_step(gm, "widen", {"layer": "up1", "by": 2, "init": "gradmax", "data": "calib"}, ctx, VerifySettings())


def _export(tmp_path, module: nn.Module, tensors: dict) -> tuple[Path, Path]:
    path, data = tmp_path / "model.pt2", tmp_path / "calib.safetensors"
    torch.export.save(torch.export.export(module, (tensors["input"][:2],), strict=False), str(path))
    save_file({"input": tensors["input"], "target": tensors["target"]}, str(data))
    return path, data


def test_cli_gradmax_on_a_pt2_program_with_transposed_convs(cli, tmp_path):
    module, tensors = build("ae")
    path, data = _export(tmp_path, module, tensors)
    out = tmp_path / "grown.safetensors"
    r = cli("widen", path, "--layer", "dec1", "--by", "3", "--init", "gradmax", "--data", data, "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= TOL
    grown = growcli.load_grown(copy.deepcopy(module), out)
    assert tuple(grown.dec1.weight.shape) == (5, 7, 3, 3) and tuple(grown.dec2.weight.shape) == (7, 2, 4, 4)
    assert torch.count_nonzero(grown.dec1.weight[:, 4:]) == 0 and torch.count_nonzero(grown.dec2.weight[4:]) > 0
    assert max_diff(module, grown) <= TOL


def test_cli_gradmax_refusal_names_the_layer_and_exits_1(cli, tmp_path):
    module = ReluUp(stride=2, padding=1).double().eval()
    torch.manual_seed(0)
    x = module.example(8)
    path, data = _export(tmp_path, module, {"input": x, "target": torch.randn_like(module(x).detach())})
    r = cli("widen", path, "--layer", "up1", "--by", "2", "--init", "gradmax", "--data", data, "-o", tmp_path / "o.pt2")
    assert r.code == 1
    assert "'up1'" in r.err and "transposed convolution" in r.err and "not all receive every tap" in r.err
    assert not (tmp_path / "o.pt2").exists()


# ---------------------------------------------------------------- firefly
FIREFLY = [
    ("ae", {"layer": ["enc", "dec1"], "budget": 6, "candidates": 4, "eps": 0.3}),  # both layers, splits and new units
    ("up1d", {"layer": "up", "by": 4, "candidates": 3}),
    ("volume", {"layer": "enc", "by": 2, "candidates": 2}),
]


@pytest.mark.parametrize("name,options", FIREFLY, ids=[c[0] for c in FIREFLY])
def test_firefly_through_transposed_convs_is_exact_at_eps_0(name, options):
    before, gm, report, _ = grow(name, {"init": "firefly", **options})
    assert report.exact and report.verification["passed"] and report.verification["max_abs_diff"] <= TOL
    assert max_diff(before, gm.module) <= TOL
    grown = sum(gm.module.get_submodule(layer).weight.numel() - before.get_submodule(layer).weight.numel()
                for layer in ([options["layer"]] if isinstance(options["layer"], str) else options["layer"]))
    assert grown > 0


def test_cli_firefly_budget_across_a_conv_and_a_transposed_conv_of_a_pt2_program(cli, tmp_path):
    module, tensors = build("ae")
    path, data = _export(tmp_path, module, tensors)
    out = tmp_path / "ff.safetensors"
    r = cli("widen", path, "--layer", "enc", "--layer", "dec1", "--budget", "5", "--init", "firefly", "--candidates", "3",
            "--data", data, "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= TOL
    grown = growcli.load_grown(copy.deepcopy(module), out)
    added = (grown.enc.weight.shape[0] - 5) + (grown.dec1.weight.shape[1] - 4)
    assert added == 5 and grown.dec1.weight.shape[1] == grown.dec2.weight.shape[0]  # dim 1 of dec1, dim 0 of dec2
    assert grown.enc.weight.shape[0] == grown.dec1.weight.shape[0] == grown.bn.running_mean.shape[0]
    assert max_diff(module, grown) <= TOL


def _scores(name: str, layer: str, candidates: int):
    module, tensors = build(name)
    gm = as_gm(module, tensors)
    ctx = Context(seed=0)
    ctx.data["calib"] = from_tensors(tensors, gm.inputs, batch_size=len(tensors["input"]))
    spec = build_spec("widen", {"layer": layer, "by": 1, "init": "firefly", "data": "calib", "candidates": candidates})
    trace = trace_model(gm.module, make_batches(gm.inputs, 1)[0])
    [ls], _, _ = firefly.score(gm, trace, [analyze(trace, layer)], spec, ctx)
    return module, tensors, ls


def _with_unit(module, layer, consumer, incoming: torch.Tensor, bias, outgoing: torch.Tensor) -> dict:
    """Parameters of ``module`` with one more unit (unit-major slices) appended along the units' dims."""
    pa, ca = axes(module, layer, consumer)
    w, cw = module.get_submodule(layer).weight.detach(), module.get_submodule(consumer).weight
    b = module.get_submodule(layer).bias.detach()
    return {f"{layer}.weight": torch.cat([w, incoming.unsqueeze(pa)], pa), f"{layer}.bias": torch.cat([b, bias.reshape(1)]),
            f"{consumer}.weight": torch.cat([cw.detach(), outgoing.unsqueeze(ca)], ca)}


@pytest.mark.parametrize("name,layer,consumer", [("ae", "dec1", "dec2"), ("up1d", "up", "res"), ("ae", "enc", "dec1")])
def test_firefly_new_unit_gradient_matches_autograd(name, layer, consumer):
    """``g_j`` (the probe's) against autograd: a candidate with its incoming slice along the units' dim
    and a zero outgoing slice; the loss gradient w.r.t. that outgoing slice."""
    module, tensors, ls = _scores(name, layer, 3)
    if name == "ae" and layer == "enc":  # a BatchNorm between: a new channel's statistics are the identity
        bn = module.bn
        extra = {"bn.running_mean": torch.cat([bn.running_mean, torch.zeros(1, dtype=torch.float64)]),
                 "bn.running_var": torch.cat([bn.running_var, torch.ones(1, dtype=torch.float64)]),
                 "bn.weight": torch.cat([bn.weight.detach(), torch.full((1,), (1 + bn.eps) ** 0.5, dtype=torch.float64)]),
                 "bn.bias": torch.cat([bn.bias.detach(), torch.zeros(1, dtype=torch.float64)])}
    else:
        extra = {}
    _, ca = axes(module, layer, consumer)
    slot = module.get_submodule(consumer).weight.detach().movedim(ca, 0)[0]
    for j in range(3):
        col = torch.zeros_like(slot, requires_grad=True)
        params = _with_unit(module, layer, consumer, ls.probe.cand[j], torch.zeros((), dtype=torch.float64), col) | extra
        (g,) = torch.autograd.grad(loss_of(module, tensors, params), col)
        torch.testing.assert_close(ls.probe.g[j], g.flatten(), rtol=1e-9, atol=1e-14 * float(g.abs().max()))
        assert float(g.norm()) > 0


@pytest.mark.parametrize("name,layer,consumer", [("ae", "dec1", "dec2"), ("up1d", "up", "res")])
def test_firefly_splitting_matrix_of_a_transposed_producer_is_the_second_derivative(name, layer, consumer):
    """½ δ² vᵀ S v against L(δ) − L(0) for random v, the split of unit ``i`` built by hand along dim 1."""
    module, tensors, ls = _scores(name, layer, 0)
    pa, ca = axes(module, layer, consumer)
    assert pa == 1
    w, b = module.get_submodule(layer).weight.detach(), module.get_submodule(layer).bias.detach()
    cw = module.get_submodule(consumer).weight.detach()
    base = float(loss_of(module, tensors))
    gen = torch.Generator().manual_seed(3)
    for i in range(2):
        wt = torch.cat([w.movedim(pa, 0)[i].flatten(), b[i:i + 1]])
        v = torch.randn(wt.numel(), generator=gen, dtype=torch.float64)
        v /= v.norm()
        delta = 1e-2
        plus, minus = wt + delta * v, wt - delta * v
        new_w = w.clone()
        new_w.movedim(pa, 0)[i] = plus[:-1].reshape(w.movedim(pa, 0)[i].shape)
        new_b = b.clone()
        new_b[i] = plus[-1]
        half = cw.clone()
        half.movedim(ca, 0)[i] /= 2
        params = {f"{layer}.weight": torch.cat([new_w, minus[:-1].reshape(w.movedim(pa, 0)[i].shape).unsqueeze(pa)], pa),
                  f"{layer}.bias": torch.cat([new_b, minus[-1:]]),
                  f"{consumer}.weight": torch.cat([half, half.movedim(ca, 0)[i].unsqueeze(ca)], ca)}
        got = float(loss_of(module, tensors, params)) - base
        want = 0.5 * delta ** 2 * float(v @ ls.probe.s[i] @ v)
        assert abs(got - want) <= 1e-3 * abs(want), (i, got, want)


def test_firefly_steps_on_eps_lower_the_loss_through_a_transposed_conv():
    before, gm, report, tensors = grow("ae", {"layer": "dec1", "by": 3, "init": "firefly", "candidates": 4,
                                              "firefly_steps": 2})
    assert not report.exact  # the steps move ε off 0 on purpose
    assert float(loss_of(gm.module, tensors)) < float(loss_of(before, tensors))


# ---------------------------------------------------------------- branch (path-level)
class UpBlock(nn.Module):
    """A block whose output is a ConvTranspose1d's, through a BatchNorm and a GELU (sliced with it in concat)."""

    def __init__(self):
        super().__init__()
        self.up, self.bn = nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1), nn.BatchNorm1d(6)

    def forward(self, x):
        return F.gelu(self.bn(self.up(x)))


class BranchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre, self.block, self.post = nn.Conv1d(2, 4, 3, padding=1), UpBlock(), nn.ConvTranspose1d(6, 3, 3, stride=2)

    def forward(self, x):
        return self.post(self.block(torch.tanh(self.pre(x))))

    def example(self, n):
        return torch.randn(n, 2, 7, dtype=torch.float64)


def _branch(layer: str, merge: str, **options):
    torch.manual_seed(0)
    module = BranchNet().double().eval()
    module.block.bn.running_mean.uniform_(-0.5, 0.5)
    module.block.bn.running_var.uniform_(0.5, 2.0)
    gm = as_gm(module, {"input": module.example(2)})
    report = run_step(gm, "branch", {"layer": layer, "merge": merge, **options}, Context(seed=0), VerifySettings(batches=2))
    return module, gm, report


@pytest.mark.parametrize("layer,sizes", [("post", [1, 2]), ("block", [4, 2])])
def test_branch_concat_splits_a_transposed_convs_output_channels_along_dim_1(layer, sizes):
    before, gm, report = _branch(layer, "concat", sizes=sizes)
    assert report.verification["passed"] and report.exact_in_dtype
    # The same weights compute each output channel, but the backend's transposed-conv kernel may sum the taps in
    # another order for another channel count: a reordered float64 sum (5.6e-17 measured), not bit-identity.
    assert max_diff(before, gm.module) <= TOL
    conv = "" if layer == "post" else ".up"
    w = before.get_submodule(layer + conv).weight.detach()
    start = 0
    for i, size in enumerate(sizes):
        part = gm.module.get_submodule(f"{layer}.branches.{i}{conv}")
        assert tuple(part.weight.shape) == (w.shape[0], size, *w.shape[2:]) and part.out_channels == size
        assert torch.equal(part.weight.detach(), w[:, start:start + size])
        if layer == "block":
            bn = gm.module.get_submodule(f"block.branches.{i}.bn")
            assert bn.num_features == size and torch.equal(bn.running_mean, before.block.bn.running_mean[start:start + size])
        start += size


def test_branch_add_of_a_transposed_conv_is_exact():
    before, gm, report = _branch("post", "add", branches=2)
    assert report.verification["passed"] and max_diff(before, gm.module) == 0.0  # ½x + ½x of equal outputs: bit-exact


# ---------------------------------------------------------------- progressive columns
class Decoder(nn.Module):
    """Linear → reshape → ConvTranspose2d (stride 2) → BN → ReLU → ConvTranspose2d (stride 2, output padding)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4 * 3 * 3)
        self.up1, self.bn = nn.ConvTranspose2d(4, 5, 4, stride=2, padding=1), nn.BatchNorm2d(5)
        self.up2 = nn.ConvTranspose2d(5, 2, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        h = self.fc(x).reshape(x.shape[0], 4, 3, 3)
        return self.up2(torch.relu(self.bn(self.up1(h))))

    def example(self, n):
        return torch.randn(n, 6, dtype=torch.float64)


def _columns(adapter: str):
    torch.manual_seed(0)
    module = Decoder().double().eval()
    module.bn.running_mean.uniform_(-0.5, 0.5)
    module.bn.running_var.uniform_(0.5, 2.0)
    gm = as_gm(module, {"input": module.example(2)})
    report = run_step(gm, "column", {"adapter": adapter}, Context(seed=0), VerifySettings(batches=2))
    return module, gm, report


@pytest.mark.parametrize("adapter,laterals", [("1x1", [(4, 5, 1, 1), (5, 2, 1, 1)]), ("layer", [(4, 5, 4, 4), (5, 2, 3, 3)])])
def test_a_column_copies_transposed_convs_and_its_laterals_upsample_alike(adapter, laterals):
    before, gm, report = _columns(adapter)
    assert report.verification["passed"] and report.verification["max_abs_diff"] == 0.0
    torch.manual_seed(9)
    x = before.example(3)
    with torch.no_grad():
        want, old, new = before(x), gm.module(x, task=0), gm.module(x, task=1)
    assert torch.equal(old, want)  # the old task runs the very same weights: bit-identical
    assert new.shape == want.shape and float((new - want).abs().max()) > 1e-3  # a fresh column: another function
    col = gm.module.columns[0]
    ups = [m for m in col.items if isinstance(m, nn.ConvTranspose2d)]
    assert [tuple(m.weight.shape) for m in ups] == [(4, 5, 4, 4), (5, 2, 3, 3)] and ups[1].output_padding == (1, 1)
    # laterals from column 0's inputs of up1 and up2 into column 1's: [in, out, k…] with the layer's stride; a 1×1
    # one gets the output padding that makes its (h − 1)·2 + 1 positions the layer's 2h (its own is 1 and 1 too)
    assert [tuple(lat[0].weight.shape) for lat in col.laterals] == laterals
    assert all(isinstance(lat[0], nn.ConvTranspose2d) and lat[0].stride == (2, 2) for lat in col.laterals)
    assert [lat[0].output_padding for lat in col.laterals] == ([(1, 1), (1, 1)] if adapter == "1x1" else [(0, 0), (1, 1)])
    # the new column trains: its loss on a random target falls after a step, the old column's weights stay
    frozen = {n: p.detach().clone() for n, p in gm.module.base.named_parameters()}
    opt = torch.optim.SGD([p for p in gm.module.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn_like(new)
    first = F.mse_loss(gm.module(x, task=1), target)
    first.backward()
    opt.step()
    assert float(F.mse_loss(gm.module(x, task=1), target)) < float(first)
    assert all(torch.equal(p, frozen[n]) for n, p in gm.module.base.named_parameters())
    again = replay(Decoder().double(), gm.edits.records)  # the recorded plan rebuilds the transposed layers
    again.load_state_dict(gm.module.state_dict())  # strict: every shape matches
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x, task=1), gm.module.eval()(x, task=1)) and torch.equal(again(x, task=0), want)


# ---------------------------------------------------------------- NeST: masks of transposed convolutions
def test_nest_mask_of_transposed_convs_is_exact():
    module, tensors = build("ae")
    gm = as_gm(module, tensors)
    report = run_step(gm, "mask", {"layer": ["enc", "dec1", "dec2"]}, Context(), VerifySettings())
    assert [c["after"] for c in report.changes] == ["MaskedConv2d", "MaskedConvTranspose2d", "MaskedConvTranspose2d"]
    assert report.verification["passed"] and report.verification["max_abs_diff"] == 0.0
