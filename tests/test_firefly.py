"""widen --init firefly: the best new or split units under one budget, exact at ε = 0.

The scores are checked against brute force: every candidate is built into a copy of the tiny
float64 model by hand (new unit: its incoming row and outgoing column ``−ε·r·g/‖g‖`` with ``g``
from autograd; split: ``w̃ ± ε‖w̃‖v`` and halved outgoing weights) and the actual loss decrease is
measured. Growth is verified by the pipeline in float64 and measured again here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

import growcli
from growcli import zoo
from growcli.analysis.calibration import from_tensors
from growcli.analysis.coupling import analyze
from growcli.analysis.trace import trace_model
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import make_batches, spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms import firefly
from growcli.transforms.catalog import build_spec
from growcli.transforms.registry import Context


class TanhMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class BnCNN(nn.Module):
    """conv → BatchNorm → GELU → strided padded conv: splits copy the BatchNorm statistics."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.fc = nn.Conv2d(6, 5, 3, padding=1, stride=2), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.gelu(self.bn(self.c1(x))))).mean((2, 3)))


def build(name: str, n: int = 40):
    torch.manual_seed(0)
    m = {"TanhMLP": TanhMLP, "BnCNN": BnCNN, "zoo:MLP": zoo.MLP}[name]().double().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn((n, 3, 8, 8) if name == "BnCNN" else (n, m.fc1.in_features), dtype=torch.float64)
    with torch.no_grad():
        classes = m(x).shape[-1]
    return m, {"input": x, "target": torch.randint(0, classes, (n,))}


def setup(name: str, seed: int = 0):
    module, tensors = build(name)
    gm = GrowModel(copy.deepcopy(module), "state_dict", Path("mem"), "0", spec_from_batch(((tensors["input"][:2],), {})))
    ctx = Context(seed=seed)
    ctx.data["calib"] = from_tensors(tensors, gm.inputs, batch_size=16)
    return module, gm, ctx, tensors


def loss_of(module: nn.Module, tensors: dict, params: dict | None = None) -> float:
    out = functional_call(module, params or {}, (tensors["input"],))
    return float(F.cross_entropy(out, tensors["target"]))


# ---------------------------------------------------------------- scores against brute force
def brute_force(module: nn.Module, tensors: dict, layer: str, consumer: str, c: firefly.Candidate,
                ls: firefly.LayerScores, eps: float) -> float:
    """The actual loss decrease of candidate ``c`` built by hand at step ``eps``."""
    w, b = module.get_parameter(f"{layer}.weight").detach(), module.get_parameter(f"{layer}.bias").detach()
    cw = module.get_parameter(f"{consumer}.weight").detach()
    if c.kind == "new":
        col = torch.zeros(cw.shape[0], 1, dtype=torch.float64, requires_grad=True)
        params = {f"{layer}.weight": torch.cat([w, ls.probe.cand[c.index:c.index + 1]]),
                  f"{layer}.bias": torch.cat([b, b.new_zeros(1)]), f"{consumer}.weight": torch.cat([cw, col], 1)}
        out = functional_call(module, params, (tensors["input"],))
        (g,) = torch.autograd.grad(F.cross_entropy(out, tensors["target"]), col)
        r = float(cw.norm(dim=0).mean())
        params[f"{consumer}.weight"] = torch.cat([cw, -eps * r * g / g.norm()], 1)
    else:
        i = c.index
        wt = torch.cat([w, b[:, None]], 1)
        v = ls.directions[i]
        d = eps * float(wt[i].norm()) * v
        plus, minus = wt.clone(), wt[i] - d
        plus[i] = wt[i] + d
        full = torch.cat([plus, minus[None]])
        half = cw.clone()
        half[:, i] = cw[:, i] / 2
        params = {f"{layer}.weight": full[:, :-1], f"{layer}.bias": full[:, -1],
                  f"{consumer}.weight": torch.cat([half, half[:, i:i + 1]], 1)}
    return loss_of(module, tensors) - loss_of(module, tensors, params)


def test_scores_and_selection_agree_with_brute_force():
    module, gm, ctx, tensors = setup("TanhMLP")
    eps, budget = 0.1, 10
    spec = build_spec("widen", {"layer": ["fc1", "fc2"], "budget": budget, "init": "firefly", "data": "calib",
                                "candidates": 4, "eps": eps})
    trace = trace_model(gm.module, make_batches(gm.inputs, 1)[0])
    layers, _, _ = firefly.score(gm, trace, [analyze(trace, "fc1"), analyze(trace, "fc2")], spec, ctx)
    consumers = {"fc1": "fc2", "fc2": "fc3"}
    predicted, actual = {}, {}
    for ls in layers:
        for c in ls.splits + ls.new:
            key = (c.layer, c.kind, c.index)
            predicted[key] = c.gain
            actual[key] = brute_force(module, tensors, c.layer, consumers[c.layer], c, ls, eps)
    # first order for new units (relative error O(ε): 5.6% measured), second order for splits (O(ε²): 1.6%)
    for key in predicted:
        tol = 0.1 if key[1] == "new" else 0.04
        assert abs(predicted[key] - actual[key]) <= tol * abs(actual[key]) + 1e-12, (key, predicted[key], actual[key])
    assert {k[1] for k in predicted if predicted[k] > 0} == {"new", "split"}
    by_actual = sorted(actual, key=lambda k: -actual[k])
    by_score = [(c.layer, c.kind, c.index) for c in firefly.ranked([c for ls in layers for c in ls.splits + ls.new])]
    assert actual[by_actual[budget - 1]] > 1.1 * actual[by_actual[budget]]  # a clear cut at the budget
    firefly.select(layers, None, budget)
    kept = {(ls.site.layer, "split", i) for ls in layers for i in ls.keep_split} | \
           {(ls.site.layer, "new", j) for ls in layers for j in ls.keep_new}
    assert kept == set(by_actual[:budget]) == set(by_score[:budget])
    assert {k[1] for k in kept} == {"new", "split"}  # both kinds compete under the one budget
    # every pair of candidates whose actual decreases differ by more than 10% is ranked the same way
    pos = {k: i for i, k in enumerate(by_score)}
    for a in actual:
        for b in actual:
            if actual[a] > 1.1 * actual[b] > 0 and predicted[b] > 0:
                assert pos[a] < pos[b], (a, b)


def test_splitting_matrix_is_the_second_derivative_along_any_direction():
    """½ δ² vᵀ S v against (L(δ) − L(0)) for random v, with the split built by hand."""
    module, gm, ctx, tensors = setup("TanhMLP")
    spec = build_spec("widen", {"layer": "fc1", "by": 1, "init": "firefly", "data": "calib", "candidates": 0})
    trace = trace_model(gm.module, make_batches(gm.inputs, 1)[0])
    [ls], _, _ = firefly.score(gm, trace, [analyze(trace, "fc1")], spec, ctx)
    gen = torch.Generator().manual_seed(3)
    for i in range(3):
        v = torch.randn(7, generator=gen, dtype=torch.float64)
        v /= v.norm()
        ls.directions[i] = v
        c = firefly.Candidate("fc1", "split", i, 0.0)
        delta = 1e-2
        got = -brute_force(module, tensors, "fc1", "fc2", c, ls, delta / float(ls.scales[i]))
        want = 0.5 * delta ** 2 * float(v @ ls.probe.s[i] @ v)
        assert abs(got - want) <= 1e-3 * abs(want), (i, got, want)


# ---------------------------------------------------------------- exact growth
CASES = [
    ("TanhMLP", {"layer": ["fc1", "fc2"], "budget": 10, "candidates": 4, "eps": 0.3}),  # splits and new units
    ("zoo:MLP", {"layer": "fc1", "by": 3}),  # ReLU: no curvature, only new units
    ("BnCNN", {"layer": "c1", "by": 4, "candidates": 2}),  # conv, BatchNorm copied for splits
]


@pytest.mark.parametrize("name,options", CASES, ids=[c[0] for c in CASES])
def test_firefly_widening_is_exact_in_float64(name, options):
    module, gm, ctx, tensors = setup(name)
    report = run_step(gm, "widen", {"init": "firefly", "data": "calib", **options}, ctx, VerifySettings(batches=2))
    assert report.exact and report.verification["passed"]
    assert report.verification["max_abs_diff"] <= 1e-12
    x = torch.randn_like(tensors["input"])
    with torch.no_grad():
        assert float((gm.module(x) - module(x)).abs().max()) <= 1e-12
    assert report.matched and any("exact" in n for n in report.notes)
    grown = gm.module
    for layer in report.matched:
        before, after = module.get_submodule(layer), grown.get_submodule(layer)
        assert after.weight.shape[0] > before.weight.shape[0]


def test_split_copies_and_new_units_are_what_the_recipe_says():
    module, gm, ctx, _ = setup("TanhMLP")
    report = run_step(gm, "widen", {"layer": "fc1", "by": 5, "init": "firefly", "data": "calib", "candidates": 2,
                                    "eps": 0.3}, ctx, VerifySettings(batches=2))
    note = next(n for n in report.notes if n.startswith("firefly 'fc1'"))
    splits = [int(i) for i in note.split("splits of units ")[1].split(")")[0].split(", ")]
    n_new = 5 - len(splits)
    assert len(splits) >= 1 and n_new >= 1
    w0, c0 = module.fc1.weight.detach(), module.fc2.weight.detach()
    w1, c1 = gm.module.fc1.weight.detach(), gm.module.fc2.weight.detach()
    assert w1.shape == (13, 6) and c1.shape == (5, 13)
    for k, i in enumerate(splits):  # copies at δ = 0, half the outgoing weights each (exactly)
        assert torch.equal(w1[8 + k], w0[i]) and torch.equal(w1[i], w0[i])
        assert torch.equal(c1[:, i], c0[:, i] / 2) and torch.equal(c1[:, 8 + k], c0[:, i] / 2)
    assert torch.equal(c1[:, 8 + len(splits):], torch.zeros(5, n_new))  # new units: zero outgoing
    assert float(w1[8 + len(splits):].abs().min()) > 0  # random incoming


def test_same_seed_same_growth_other_seed_other_candidates():
    outs = []
    for seed in (0, 0, 1):
        _, gm, ctx, _ = setup("TanhMLP", seed=seed)
        run_step(gm, "widen", {"layer": "fc1", "by": 3, "init": "firefly", "data": "calib", "candidates": 4}, ctx,
                 VerifySettings(batches=1))
        outs.append(gm.module.fc1.weight.detach().clone())
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


# ---------------------------------------------------------------- ε steps: approximate, reported
def test_steps_on_eps_lower_the_calibration_loss_and_are_reported_approximate():
    module, gm, ctx, tensors = setup("TanhMLP")
    report = run_step(gm, "widen", {"layer": ["fc1", "fc2"], "budget": 6, "init": "firefly", "data": "calib",
                                    "candidates": 4, "firefly_steps": 3}, ctx, VerifySettings(batches=2))
    assert not report.exact
    diff = report.verification["max_abs_diff"]
    assert diff > 1e-6 and any(f"max abs diff {diff:.3g}" in n for n in report.notes)
    before, after = loss_of(module, tensors), loss_of(gm.module, tensors)
    assert after < before - 1e-4
    note = next(n for n in report.notes if "gradient steps on ε" in n)
    assert f"→ {after:.6g}" in note


# ---------------------------------------------------------------- options and refusals
@pytest.mark.parametrize("options,message", [
    ({"layer": "fc1", "by": 2, "init": "firefly"}, "init firefly needs calibration data"),
    ({"layer": "fc1", "budget": 4, "data": "x"}, "budget is used only by init firefly"),
    ({"layer": "fc1", "budget": 4, "by": 2, "init": "firefly", "data": "x"}, "instead of to, by or factor"),
    ({"layer": "fc1", "budget": 0, "init": "firefly", "data": "x"}, "budget must be a positive integer"),
    ({"layer": "fc1", "by": 2, "firefly_steps": 2}, "firefly_steps is used only by init firefly"),
    ({"layer": "fc1", "by": 2, "init": "firefly", "data": "x", "eps": 0}, "eps and firefly_lr must be positive"),
    ({"layer": "fc1", "by": 2, "init": "firefly", "data": "x", "noise": 0.1}, "noise applies to net2net"),
])
def test_firefly_options_are_validated(options, message):
    with pytest.raises(UsageError, match=message):
        build_spec("widen", options)


def test_more_units_than_candidates_is_refused():
    _, gm, ctx, _ = setup("zoo:MLP")  # ReLU: splits do not lower the loss, so only the 4 new candidates count
    with pytest.raises(NotGrowableError, match=r"'fc1': firefly: asked for 5 new units, but it offers only 4 candidates"):
        run_step(gm, "widen", {"layer": "fc1", "by": 5, "init": "firefly", "data": "calib", "candidates": 4}, ctx)
    assert gm.module.fc1.out_features == 32


def test_site_refusals_name_firefly():
    module = zoo.SmallCNN().double().eval()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    gm = GrowModel(module, "state_dict", Path("mem"), "0", spec_from_batch(((x[:2],), {})))
    ctx = Context()
    ctx.data["calib"] = from_tensors({"input": x, "target": torch.randint(0, 5, (8,))}, gm.inputs)
    with pytest.raises(NotGrowableError, match=r"^'conv2': firefly: .*flatten") as info:
        run_step(gm, "widen", {"layer": "conv2", "by": 2, "init": "firefly", "data": "calib"}, ctx)
    assert "gradmax" not in str(info.value)


# ---------------------------------------------------------------- CLI, plan, live model, schedule
@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("ff") / "calib.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({"input": torch.randn(40, 16, generator=gen), "target": torch.randint(0, 4, (40,), generator=gen)}, str(path))
    return path


def test_cli_firefly_budget_across_layers_writes_a_verified_model(cli, tmp_path, calib):
    out = tmp_path / "mlp.safetensors"
    r = cli("widen", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--layer", "fc1", "--layer", "fc2", "--budget", "6",
            "--init", "firefly", "--candidates", "8", "--data", calib, "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    step = report["steps"][0]
    assert report["verification"]["passed"] and step["exact"] and step["spec"]["budget"] == 6
    assert report["verification"]["max_abs_diff"] <= 1e-12
    model = growcli.load_grown(zoo.MLP(), out)
    assert (model.fc1.out_features - 32) + (model.fc2.out_features - 24) == 6
    assert model.fc2.in_features == model.fc1.out_features and model.fc3.in_features == model.fc2.out_features
    assert cli("verify", FIXTURES / "mlp.pt", out, "--arch", "growcli.zoo:mlp").code == 0


def test_cli_firefly_steps_on_a_pt2_program_are_approximate(cli, tmp_path, calib):
    r = cli("widen", FIXTURES / "mlp.pt2", "--layer", "fc1", "--by", "3", "--init", "firefly", "--firefly-steps", "2",
            "--data", calib, "-o", tmp_path / "m.safetensors", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert not report["function_preserving"] and not report["steps"][0]["exact"]
    assert any("gradient steps on ε" in n for n in report["steps"][0]["notes"])


def test_cli_budget_without_firefly_is_a_usage_error(cli, tmp_path, calib):
    r = cli("widen", FIXTURES / "mlp.pt2", "--layer", "fc1", "--budget", "3", "-o", tmp_path / "m.safetensors")
    assert r.code == 2 and "budget is used only by init firefly" in r.err and "Traceback" not in r.err


def test_plan_with_a_firefly_step(cli, tmp_path, calib):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"version: 1\nsteps:\n  - widen: {{layer: [fc1, fc2], budget: 4, init: firefly, data: '{calib}', "
                    f"candidates: 4}}\n")
    r = cli("grow", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--plan", plan, "-o", tmp_path / "g.safetensors",
            "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= 1e-12


def test_grow_live_model_with_in_memory_data():
    model, tensors = build("zoo:MLP")
    before = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    F.cross_entropy(model(tensors["input"]), tensors["target"]).backward()
    opt.step()
    before = copy.deepcopy(model)
    report = growcli.grow_(model, "widen", opt, tensors["input"][:4], layer="fc2", by=3, init="firefly",
                           data={"input": tensors["input"], "target": tensors["target"]}, candidates=6)
    assert model.fc2.out_features == 27 and model.fc3.in_features == 27
    with torch.no_grad():
        assert float((model(tensors["input"]) - before(tensors["input"])).abs().max()) <= 1e-12
    assert report.steps[0]["exact"]
    assert {p.shape for group in opt.param_groups for p in group["params"]} >= {torch.Size([27, 32])}


def test_a_schedule_step_runs_firefly(calib):
    from growcli.train.loop import Grower
    from growcli.train.schedule import schedule_from_dict

    torch.manual_seed(0)
    model = zoo.MLP().eval()
    x = torch.randn(4, 16)
    schedule = schedule_from_dict({"grow": [{"at": [2], "steps": [{"transform": "widen", "options": {
        "layer": "fc1", "by": 2, "init": "firefly", "data": str(calib), "candidates": 4}}]}]})
    grower = Grower(model, None, schedule, x, total_steps=4)
    with torch.no_grad():
        ref = model(x).clone()
    assert grower.step(1) == []
    [report] = grower.step(2)
    assert model.fc1.out_features == 34 and report.steps[0]["exact"]
    with torch.no_grad():
        assert float((model(x) - ref).abs().max()) <= 1e-5  # float32 model
