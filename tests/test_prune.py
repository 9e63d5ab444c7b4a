"""prune: widen's inverse. Dead and duplicate units go exactly; magnitude pruning is reported approximate.

Real float64 models with random weights; every step is verified by the pipeline, and the
function is compared again here on fresh inputs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES
from torch import nn

import growcli
from growcli import zoo
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.catalog import build_spec
from growcli.transforms.registry import Context


class BnCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.fc = nn.Conv2d(6, 5, 3, padding=1), nn.Linear(5 * 4 * 4, 4)

    def forward(self, x):  # flatten consumer: each channel owns 16 columns of fc
        return self.fc(F.relu(self.c2(F.relu(self.bn(self.c1(x))))).flatten(1))


def gm_of(module: nn.Module, shape) -> GrowModel:
    return GrowModel(module, "state_dict", Path("mem"), "0", spec_from_batch(((torch.randn(*shape, dtype=torch.float64),), {})))


def max_diff(a: nn.Module, b: nn.Module, shape) -> float:
    x = torch.randn(8, *shape[1:], dtype=torch.float64)
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


@pytest.mark.parametrize("name,layer,by,shape", [
    ("MLP", "fc1", 8, (2, 16)),
    ("MLP", "fc2", 5, (2, 16)),
    ("BnCNN", "c2", 3, (2, 3, 4, 4)),  # consumer through a flatten
    ("BnCNN", "c1", 4, (2, 3, 4, 4)),  # BatchNorm statistics are per-channel copies
])
def test_pruning_duplicates_of_a_net2net_widen_gives_back_the_original(name, layer, by, shape):
    torch.manual_seed(0)
    original = (zoo.MLP() if name == "MLP" else BnCNN()).double().eval()
    for m in original.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    gm = gm_of(copy.deepcopy(original), shape)
    run_step(gm, "widen", {"layer": layer, "by": by}, Context(seed=3), VerifySettings(batches=2))  # asymmetric split
    size = original.get_submodule(layer).weight.shape[0]
    assert gm.module.get_submodule(layer).weight.shape[0] == size + by
    report = run_step(gm, "prune", {"layer": layer}, Context(), VerifySettings(batches=2))
    assert report.exact and report.verification["passed"] and report.verification["max_abs_diff"] <= 1e-12
    assert any(f"{size + by} → {size} units" in n and "duplicates merged" in n for n in report.notes)
    assert max_diff(original, gm.module, shape) <= 1e-12
    # the kept units are the original ones, their consumer weights the sum of the copies' shares
    for fqn, p in original.state_dict().items():
        got = gm.module.state_dict()[fqn]
        assert got.shape == p.shape, fqn
        torch.testing.assert_close(got, p, rtol=0, atol=1e-15)


def test_dead_units_are_removed_exactly():
    torch.manual_seed(0)
    model = zoo.MLP().double().eval()
    with torch.no_grad():
        model.fc2.weight[:, 3] = 0  # fc1 unit 3 feeds nothing
        model.fc1.weight[7] = 0  # fc1 unit 7: zero incoming, bias < 0 → ReLU always 0
        model.fc1.bias[7] = -0.5
        model.fc1.weight[9] = 0  # unit 9: zero incoming but bias > 0 → constant 0.5, not dead
        model.fc1.bias[9] = 0.5
    gm = gm_of(copy.deepcopy(model), (2, 16))
    report = run_step(gm, "prune", {"layer": "fc1"}, Context(), VerifySettings(batches=2))
    assert gm.module.fc1.out_features == 30 and gm.module.fc2.in_features == 30
    assert report.verification["max_abs_diff"] <= 1e-12 and max_diff(model, gm.module, (2, 16)) <= 1e-12
    assert any("dead [3, 7]" in n for n in report.notes)
    assert torch.equal(gm.module.fc1.weight[7], model.fc1.weight[9]) and float(gm.module.fc1.bias[7]) == 0.5  # unit 9 kept


def test_a_relu_unit_reading_relu_outputs_with_non_positive_weights_is_dead():
    torch.manual_seed(0)
    model = zoo.MLP().double().eval()
    with torch.no_grad():  # fc2 reads ReLU(fc1(x)) ≥ 0: unit 4 with weights and bias ≤ 0 is always 0 after its ReLU
        model.fc2.weight[4] = -model.fc2.weight[4].abs()
        model.fc2.bias[4] = -0.1
        model.fc2.weight[6] = -model.fc2.weight[6].abs()  # unit 6: one positive weight keeps it alive
        model.fc2.weight[6, 0] = 0.01
        model.fc2.bias[6] = -0.1
    gm = gm_of(copy.deepcopy(model), (2, 16))
    report = run_step(gm, "prune", {"layer": "fc2"}, Context(), VerifySettings(batches=2))
    assert gm.module.fc2.out_features == 23 and any("dead [4]" in n for n in report.notes)
    assert report.verification["max_abs_diff"] <= 1e-12 and max_diff(model, gm.module, (2, 16)) <= 1e-12
    gm = gm_of(copy.deepcopy(model), (2, 16))
    with pytest.raises(NotGrowableError, match="only 1 of its 24 units can go exactly"):  # unit 6 is not provably dead
        run_step(gm, "prune", {"layer": "fc2", "to": 22}, Context())
    with torch.no_grad():  # fc1 reads the raw input, which may be negative: the same weights prove nothing there
        gm.module.fc1.weight[2] = -gm.module.fc1.weight[2].abs()
        gm.module.fc1.bias[2] = -0.1
    with pytest.raises(NotGrowableError, match="nothing can be removed exactly"):
        run_step(gm, "prune", {"layer": "fc1"}, Context())


def test_removing_a_live_unit_exactly_is_refused_with_the_reason():
    torch.manual_seed(0)
    gm = gm_of(zoo.MLP().double().eval(), (2, 16))
    with pytest.raises(NotGrowableError, match=r"'fc1': prune: unit 2 neither dead nor a duplicate.*criterion magnitude"):
        run_step(gm, "prune", {"layer": "fc1", "remove": [2]}, Context())
    with pytest.raises(NotGrowableError, match=r"only 0 of its 32 units can go exactly \(0 dead, 0 duplicates\), 4 asked"):
        run_step(gm, "prune", {"layer": "fc1", "to": 28}, Context())
    with pytest.raises(NotGrowableError, match="nothing can be removed exactly"):
        run_step(gm, "prune", {"layer": "fc1"}, Context())
    assert gm.module.fc1.out_features == 32


def test_magnitude_pruning_is_approximate_and_reports_the_measured_difference():
    torch.manual_seed(0)
    model = zoo.MLP().double().eval()
    gm = gm_of(copy.deepcopy(model), (2, 16))
    report = run_step(gm, "prune", {"layer": "fc1", "to": 24, "criterion": "magnitude"}, Context(), VerifySettings(batches=2))
    assert not report.exact and gm.module.fc1.out_features == 24
    diff = report.verification["max_abs_diff"]
    assert diff > 1e-3 and any(f"max abs diff {diff:.3g}" in n for n in report.notes)
    # the 8 units removed have the smallest ‖incoming‖·‖outgoing‖
    w = torch.cat([model.fc1.weight, model.fc1.bias[:, None]], 1).detach()
    score = w.norm(dim=1) * model.fc2.weight.detach().norm(dim=0)
    kept = sorted(score.argsort(descending=True)[:24].tolist())
    assert torch.equal(gm.module.fc1.weight, model.fc1.weight[kept])


@pytest.mark.parametrize("options,message", [
    ({"layer": "fc1", "to": 4, "remove": [1]}, "not both"),
    ({"layer": "fc1", "remove": [1, 1]}, "distinct"),
    ({"layer": "fc1", "criterion": "magnitude"}, "needs to"),
    ({"layer": "fc1", "to": 0}, "positive"),
])
def test_prune_options_are_validated(options, message):
    with pytest.raises(UsageError, match=message):
        build_spec("prune", options)


def test_cli_prune_after_widen_and_magnitude(cli, tmp_path):
    wide = tmp_path / "wide.safetensors"
    assert cli("widen", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--layer", "fc1", "--by", "6",
               "-o", wide).code == 0
    back = tmp_path / "back.safetensors"
    r = cli("prune", wide, "--arch", "growcli.zoo:mlp", "--layer", "fc1", "-o", back, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= 1e-12
    model = growcli.load_grown(zoo.MLP(), back)
    assert model.fc1.out_features == 32
    assert cli("verify", FIXTURES / "mlp.pt", back, "--arch", "growcli.zoo:mlp").code == 0
    r = cli("prune", FIXTURES / "mlp.pt2", "--layer", "fc1", "--remove", "0", "--remove", "5", "--criterion", "magnitude",
            "-o", tmp_path / "m.pt2", "--json")
    assert r.code == 0, r.err
    assert not json.loads(r.out)["function_preserving"]
    r = cli("prune", FIXTURES / "mlp.pt2", "--layer", "fc1", "--remove", "2", "-o", tmp_path / "n.pt2")
    assert r.code == 1 and "neither dead nor a duplicate" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "n.pt2").exists()


def test_live_model_widens_and_prunes_back_with_its_optimizer():
    torch.manual_seed(0)
    model = zoo.MLP().double().eval()
    before = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 16, dtype=torch.float64)
    growcli.grow_(model, "widen", opt, x, layer="fc2", to=30)
    report = growcli.grow_(model, "prune", opt, x, layer="fc2", to=24)
    assert model.fc2.out_features == 24 and max_diff(before, model, (2, 16)) <= 1e-12
    assert report.steps[0]["exact"] and {tuple(p.shape) for p in opt.param_groups[0]["params"]} >= {(24, 32), (4, 24)}


def test_plan_widens_and_prunes_back(cli, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nsteps:\n  - widen: {layer: fc2, to: 30}\n  - prune: {layer: fc2, to: 24}\n")
    out = tmp_path / "g.safetensors"
    r = cli("grow", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--plan", plan, "-o", out, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["function_preserving"] and growcli.load_grown(zoo.MLP(), out).fc2.out_features == 24


def test_one_grow_call_that_resizes_a_tensor_twice_carries_the_optimizer():
    """widen then prune in one call: the optimizer's state maps compose per dimension (final → original)."""
    torch.manual_seed(0)
    model = zoo.MLP().double().eval()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, 16, dtype=torch.float64)
    model(x).sum().backward()
    opt.step()
    before = copy.deepcopy(model)
    moment = opt.state[model.fc2.weight]["exp_avg"].clone()
    growcli.grow_(model, [{"transform": "widen", "options": {"layer": "fc2", "to": 30}},
                          {"transform": "prune", "options": {"layer": "fc2", "to": 24}}], opt, x)
    assert model.fc2.out_features == 24 and max_diff(before, model, (2, 16)) <= 1e-12
    state = opt.state[model.fc2.weight]["exp_avg"]
    assert state.shape == (24, 32) and torch.equal(state, moment)  # back to the original units, state and all
