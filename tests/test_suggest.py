"""growcli suggest: rank layers by the loss decrease one added unit promises, and write it as a plan.

The synthetic task has a deliberate bottleneck: a 2-unit hidden layer between two wide ones,
briefly trained on a 10-class problem the bottleneck cannot represent. The ranking (by the
GradMax first-step decrease) must put that layer first, and the plan it writes must run
through ``growcli grow`` exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES
from safetensors.torch import save_file
from torch import nn

from growcli.analysis.calibration import from_tensors
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.plan import parse_plan
from growcli.advise.suggest import allocate, suggest


class Bottleneck(nn.Module):
    """16 → 64 → 2 → 64 → 10 with ReLU: ``fc2`` (2 units) is the bottleneck."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(16, 64), nn.Linear(64, 2), nn.Linear(2, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc4(F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))))


def task(seed: int = 0, n: int = 256):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    y = (x @ torch.randn(16, 10, generator=gen)).argmax(1)
    return x, y


def trained(seed: int = 0) -> Bottleneck:
    torch.manual_seed(seed)
    model = Bottleneck()
    x, y = task(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("suggest")
    torch.save(trained().state_dict(), d / "bottleneck.pt")
    x, y = task()
    save_file({"input": x, "target": y}, str(d / "calib.safetensors"))
    save_file({"input": x, "target": y[:10]}, str(d / "bad.safetensors"))
    return d


@pytest.mark.parametrize("seed", [0, 1])
def test_bottleneck_is_ranked_first(seed):
    model = trained(seed)
    x, y = task(seed)
    gm = GrowModel(model, "state_dict", Path("mem"), "0", spec_from_batch(((x[:2],), {})))
    result = suggest(gm, from_tensors({"input": x, "target": y}, gm.inputs), budget=4, seed=seed)
    ranked = [s.layer for s in result.scores]
    assert ranked[0] == "fc2", [(s.layer, s.gain) for s in result.scores]
    assert result.scores[0].gain > 10 * result.scores[1].gain
    assert result.allocation == {"fc2": 4}
    assert result.not_scored == {"fc4": "the channels reach the model's output (widening would change the output shape)"}


def test_gradmax_gain_is_the_first_step_loss_decrease():
    """lr·(φ'·r·σ₁)² matches the loss drop of one small SGD step on the new unit's incoming weights."""
    from growcli.run.steps import VerifySettings, run_step
    from growcli.transforms.registry import Context

    model = trained().double()
    x, y = task()
    gm = GrowModel(model, "state_dict", Path("mem"), "0", spec_from_batch(((x[:2].double(),), {})))
    cal = from_tensors({"input": x.double(), "target": y}, gm.inputs, batch_size=256)
    lr = 1e-3
    predicted = suggest(gm, cal, lr=lr, budget=1).scores[0]
    ctx = Context()
    ctx.data["c"] = cal
    run_step(gm, "widen", {"layer": "fc2", "by": 1, "init": "gradmax", "data": "c"}, ctx, VerifySettings())
    w = gm.module.fc2.weight
    loss0 = F.cross_entropy(gm.module(x.double()), y)
    (g,) = torch.autograd.grad(loss0, w)
    with torch.no_grad():
        w[2] -= lr * g[2]  # one SGD step on the new unit's incoming weights only
    drop = float(loss0 - F.cross_entropy(gm.module(x.double()), y))
    assert drop == pytest.approx(predicted.gain, rel=1e-2)


def test_allocation_shares_the_budget_by_per_unit_gain():
    from growcli.advise.suggest import LayerScore

    def score(layer, gains, ok=True):
        return LayerScore(layer, 8, "c", [], gains, 0.0, 0.0, 0.0, 1.0, 1.0, ok)

    scores = [score("a", [9, 5, 1]), score("b", [6, 4]), score("c", [100], ok=False)]
    assert allocate(scores, 4) == {"a": 2, "b": 2}
    assert allocate(scores, 10) == {"a": 3, "b": 2}  # no more than M's non-zero directions


def test_cli_suggest_json_and_plan_that_grow_runs(cli, files, tmp_path, monkeypatch):
    monkeypatch.chdir(files)
    plan = tmp_path / "plan.yaml"
    arch = "test_suggest:Bottleneck"
    r = cli("suggest", "bottleneck.pt", "--arch", arch, "--data", "calib.safetensors", "--budget", "5",
            "--plan-out", plan, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["layers"][0]["layer"] == "fc2" and report["allocation"] == {"fc2": 5}
    assert report["samples"] == 256 and report["loss"] == "cross_entropy" and report["plan"] == str(plan)
    assert {"gradmax_gain", "firefly_gain", "nest_max_gradient", "singular_values"} <= set(report["layers"][0])
    parsed, problems = parse_plan(plan.read_text(), str(plan))
    assert problems == [] and parsed.steps[0].options["init"] == "gradmax"
    g = cli("grow", "bottleneck.pt", "--arch", arch, "--plan", plan, "-o", tmp_path / "grown.safetensors", "--json")
    assert g.code == 0, g.err
    grown = json.loads(g.out)
    assert grown["function_preserving"] and grown["verification"]["passed"]
    assert grown["steps"][0]["changes"][0] == {"name": "fc2.weight", "role": "producer", "before": [2, 64], "after": [7, 64]}


def test_cli_suggest_table_on_a_pt2_program(cli, tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "c.safetensors"
    save_file({"input": torch.randn(10, 16, generator=gen), "target": torch.randint(0, 4, (10,), generator=gen)}, str(data))
    r = cli("suggest", FIXTURES / "mlp.pt2", "--data", data)
    assert r.code == 0, r.err
    assert "10 samples" in r.out and "5 batches" in r.out  # the program's fixed batch of 2
    assert "fc1" in r.out and "fc2" in r.out and "not scored: fc3" in r.out


@pytest.mark.parametrize("args,message", [
    (["--data", "bad.safetensors"], "'target' has 10 samples"),
    (["--data", "nothing.safetensors"], "not found"),
])
def test_cli_suggest_bad_data_is_one_line_exit_1(cli, files, monkeypatch, args, message):
    monkeypatch.chdir(files)
    r = cli("suggest", "bottleneck.pt", "--arch", "test_suggest:Bottleneck", *args)
    assert r.code == 1 and r.err.count("\n") == 1 and message in r.err, r.err


def test_cli_suggest_bad_option_is_usage(cli, files, monkeypatch):
    monkeypatch.chdir(files)
    r = cli("suggest", "bottleneck.pt", "--arch", "test_suggest:Bottleneck", "--data", "calib.safetensors", "--loss", "hinge")
    assert r.code == 2 and "hinge" in r.err
