"""growcli search: architecture search by exact growth steps (NASH hill-climbing, an EAS-style controller).

Everything runs the real search on the bundled MLP fixture (16 → 32 → 24 → 4) with four Gaussian
blobs written to safetensors files: children are made by the registered transforms, verified,
trained for one short SGDR cycle and compared. The tests assert the measured numbers: each child
starts at its parent's float64 validation loss (|Δ| ≤ 1e-10), the chosen child has the best
validation accuracy, the plan replays to the same shapes, ``--jobs 1`` and ``--jobs 2`` give
bit-identical results, the controller's REINFORCE update and saved state, exit codes and messages.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import save_file

import growcli
from growcli import zoo
from growcli.io.load import load_model
from growcli.search import (Controller, SearchSettings, TrainSettings, data_from_tensors, enumerate_moves, evaluate,
                            load_policy_state, plan_text, reward, save_policy_state, search)

MLP = ("--arch", "growcli.zoo:mlp")


def blobs(n: int, seed: int, noise: float = 2.0) -> dict[str, torch.Tensor]:
    """Four Gaussian blobs in 16 dimensions (fixed centres), ``n`` samples drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 1.5
    y = torch.randint(0, 4, (n,), generator=g)
    return {"input": (centres[y] + noise * torch.randn(n, 16, generator=g)).contiguous(), "target": y}


@pytest.fixture(scope="module")
def tensors():
    return blobs(96, 1), blobs(48, 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tensors):
    d = tmp_path_factory.mktemp("search-data")
    save_file(tensors[0], str(d / "train.safetensors"))
    save_file(tensors[1], str(d / "val.safetensors"))
    return d / "train.safetensors", d / "val.safetensors"


@pytest.fixture(scope="module")
def base():
    return load_model(FIXTURES / "mlp.pt", arch="growcli.zoo:mlp")


def data_of(gm, tensors):
    return data_from_tensors(*tensors, gm.inputs, batch_size=16)


TRAIN = TrainSettings(epochs=1, lr=0.05)


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- one round, measured
def test_round_makes_k_distinct_children_starting_at_the_parents_loss(base, tensors):
    data = data_of(base, tensors)
    before = {k: v.clone() for k, v in base.module.state_dict().items()}
    parent_loss = evaluate(base.module, data.val, torch.float64).loss
    result = search(base, data, SearchSettings(rounds=1, children=4, seed=3), TRAIN)
    [record] = result.rounds
    kids = record.children
    assert len(kids) == 4 and len({c.move for c in kids}) == 4  # K distinct moves
    assert all(c.status == "trained" for c in kids)
    for c in kids:
        assert c.parent_loss == parent_loss
        assert c.start_diff <= 1e-10, (c.move.label(), c.start_diff)  # function preserved, measured in float64
        assert c.step_max_abs_diff <= 1e-10
        assert c.params >= base.num_parameters()  # a concat branch splits a layer: same count
        assert c.val.loss < parent_loss  # trained
    best = max(kids, key=lambda c: (c.val.accuracy, -c.val.loss))
    assert record.chosen == best.index
    assert result.best_score == best.val and result.path == [best]
    again = evaluate(result.best.module, data.val)  # the kept model is the one that was scored
    assert (again.loss, again.accuracy) == (best.val.loss, best.val.accuracy)
    assert all(torch.equal(before[k], v) for k, v in base.module.state_dict().items())  # the input is untouched


def test_moves_come_from_the_transforms_candidates(base):
    found = enumerate_moves(base)
    labels = {m.label() for m in found.moves}
    assert {"widen fc1 x2", "widen fc2 x1.25", "deepen fc1 identity", "deepen fc3 identity"} <= labels
    assert not any(m.transform == "widen" and m.target == "fc3" for m in found.moves)  # fc3 writes the output
    assert "output" in found.skipped["widen fc3"]


def test_budget_stops_the_search_and_refuses_a_smaller_one(base, tensors):
    data = data_of(base, tensors)
    n = base.num_parameters()
    result = search(base, data, SearchSettings(rounds=3, children=3, budget_params=n + 200, seed=0,
                                               transforms=("widen",)), TRAIN)
    assert result.stop == "budget"
    for c in result.rounds[0].children:  # every widen adds more than 200 parameters here
        assert c.status == "over budget" and c.val is None and c.params > n + 200
    with pytest.raises(growcli.core.errors.UsageError, match=r"--budget-params 100 is smaller than the model "
                                                              r"\(1,436 parameters\)"):
        search(base, data, SearchSettings(budget_params=100), TRAIN)


def test_interrupt_keeps_the_finished_rounds(base, tensors):
    data = data_of(base, tensors)

    def stop(result):
        raise KeyboardInterrupt

    result = search(base, data, SearchSettings(rounds=3, children=2, seed=1), TRAIN, on_round=stop)
    assert result.interrupted and result.stop == "interrupted"
    assert len(result.rounds) == 1 and result.path and result.best is result.path[-1].gm


# --------------------------------------------------------------------------- the controller
def test_reward_is_eas_tangent_clipped():
    assert reward(0.5) == pytest.approx(1.0, abs=1e-12)  # tan(π/4)
    assert reward(0.0) == 0.0
    assert reward(1.0) == pytest.approx(math.tan(0.99 * math.pi / 2), abs=1e-9)  # clipped: finite


def test_controller_learns_saves_and_resumes(base, tensors, tmp_path):
    data = data_of(base, tensors)
    settings = SearchSettings(rounds=1, children=3, policy="controller", seed=2)
    result = search(base, data, settings, TRAIN)
    info = result.rounds[0].policy
    accs = [c.val.accuracy for c in result.rounds[0].children]
    assert info["rewards"] == [reward(a) for a in accs]
    assert info["baseline"] == pytest.approx(sum(info["rewards"]) / 3, abs=1e-12)  # first round: the mean
    state = result.policy_state
    assert state["updates"] == 1 and state["baseline"] == pytest.approx(info["baseline"], abs=1e-12)
    fresh = Controller(state["transforms"], seed=2)
    moved = sum(float((fresh.net.state_dict()[k] - v).abs().max()) for k, v in state["net"].items())
    assert moved > 0  # one Adam step moved the weights
    path = tmp_path / "policy.pt"
    save_policy_state(state, path)
    loaded = load_policy_state(path)
    assert all(torch.equal(loaded["net"][k], v) for k, v in state["net"].items())
    resumed = search(base, data, settings, TRAIN, policy_state=loaded)
    assert resumed.policy_state["updates"] == 2


def test_controller_needs_class_targets(base):
    x = torch.randn(32, 16)
    data = data_from_tensors({"input": x, "target": torch.randn(32, 4)}, {"input": x, "target": torch.randn(32, 4)},
                             base.inputs)
    with pytest.raises(growcli.core.errors.UsageError, match="needs integer class targets"):
        search(base, data, SearchSettings(policy="controller"), TRAIN)


# --------------------------------------------------------------------------- the command
def test_command_writes_best_model_plan_plot_and_log_and_the_plan_replays(cli, files, tensors, base, tmp_path):
    """With --jobs 2 (children trained in 2 spawned processes), compared with the same search in this process."""
    train, val = files
    out = tmp_path / "best.safetensors"
    plan, plot = tmp_path / "plan.yaml", tmp_path / "plot.png"
    r = cli("search", FIXTURES / "mlp.pt", *MLP, "--data", train, "--val", val, "--rounds", "2", "--children", "2",
            "--epochs", "1", "--seed", "4", "--batch-size", "16", "--lr", "0.05", "--jobs", "2", "-o", out,
            "--plan-out", plan, "--plot", plot, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    # same seed, --jobs 1 (in this process): the same children, bit for bit (moves, seeds, losses, scores)
    here = search(base, data_of(base, tensors), SearchSettings(rounds=2, children=2, seed=4, jobs=1), TRAIN)
    strip = lambda rows: [{**c, "seconds": 0} for c in rows]  # noqa: E731
    assert [strip(x["children"]) for x in report["rounds"]] == \
        [strip(json.loads(json.dumps([c.to_dict() for c in x.children]))) for x in here.rounds]
    assert all(torch.equal(v, here.best.module.state_dict()[k])
               for k, v in growcli.load_grown(zoo.mlp(), out).state_dict().items())
    assert [len(x["children"]) for x in report["rounds"]] == [2, 2]
    assert all(c["start_diff"] <= 1e-10 for x in report["rounds"] for c in x["children"])
    assert report["outputs"][0]["readback"]["passed"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((tmp_path / "best.search.json").read_text())
    assert log["rounds"] == report["rounds"] and log["params_after"] == report["params_after"]
    text = plan.read_text()
    assert "does not rebuild its weights" in text and text.count("\n  - ") == len(report["path"])
    replay = tmp_path / "replay.safetensors"
    g = cli("grow", FIXTURES / "mlp.pt", *MLP, "--plan", plan, "-o", replay)
    assert g.code == 0, g.err
    best, rebuilt = growcli.load_grown(zoo.mlp(), out), growcli.load_grown(zoo.mlp(), replay)
    assert shapes(best) == shapes(rebuilt) and sum(p.numel() for p in best.parameters()) == report["params_after"]
    vals = data_from_tensors(*(blobs(96, 1), blobs(48, 2)), batch_size=16).val
    assert abs(evaluate(best, vals).loss - report["best"]["loss"]) <= 1e-6  # the file holds the trained weights


def test_command_prints_a_leaderboard(cli, files, tmp_path):
    train, val = files
    r = cli("search", FIXTURES / "mlp.pt", *MLP, "--data", train, "--val", val, "--rounds", "1", "--children", "2",
            "--epochs", "1", "--transform", "deepen", "-o", tmp_path / "b.safetensors")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].startswith("round 1: parent 1,436 parameters, validation loss ")
    rows = [line for line in lines if "deepen" in line]
    assert len(rows) == 2 and sum(line.startswith("  *") for line in rows) == 1
    assert any(line.startswith("best: ") for line in lines)


@pytest.mark.parametrize("case, code, message", [
    ("keys", 1, "error: the training and validation data hold different keys: "),
    ("budget", 2, "usage: --budget-params 10 is smaller than the model (1,436 parameters)"),
    ("nothing", 1, "not growable: search: no registered transform can grow this model exactly (widen "),
    ("policy", 2, "usage: policy 'greedy': expected one of random, controller"),
    ("pt2-jobs", 2, "usage: --jobs: the model cannot be sent to worker processes (AttributeError: "),
])
def test_bad_input_is_one_line(cli, files, tmp_path, case, code, message):
    train, val = files
    model, extra = FIXTURES / "mlp.pt", [*MLP]
    if case == "keys":
        bad = tmp_path / "val.safetensors"
        save_file({"input": blobs(8, 3)["input"], "labels": blobs(8, 3)["target"]}, str(bad))
        val = bad
    if case == "budget":
        extra += ["--budget-params", "10"]
    if case == "nothing":  # a single Linear: widening it changes the output shape
        model = tmp_path / "linear.pt"
        torch.save(torch.nn.Linear(16, 4).state_dict(), model)
        extra = ["--arch", "torch.nn:Linear", "--arch-kwargs", '{"in_features": 16, "out_features": 4}',
                 "--input-shape", "2,16", "--transform", "widen"]
    if case == "policy":
        extra += ["--policy", "greedy"]
    if case == "pt2-jobs":  # a loaded .pt2 program cannot be pickled to a worker: refused before any worker starts
        model, extra = FIXTURES / "mlp.pt2", ["--jobs", "2"]
    out = tmp_path / "b.safetensors"
    r = cli("search", model, *extra, "--data", train, "--val", val, "-o", out)
    assert r.code == code
    assert r.err.startswith(f"growcli: {message}") and r.err.count("\n") == 1, r.err
    assert not out.exists() and not list(tmp_path.glob("*.search.json"))


def test_ctrl_c_writes_the_best_so_far_and_exits_130(cli, files, tmp_path):
    """A real SIGINT during a running search: the best model of the finished rounds and the log are written."""
    train, val = files
    out, state = tmp_path / "best.safetensors", tmp_path / "policy.pt"

    def interrupt_after_first_round():
        deadline = time.monotonic() + 60
        while not state.exists() and time.monotonic() < deadline:  # the state is written after every round
            time.sleep(0.01)
        if state.exists():  # never outside the search (a stray Ctrl-C would stop pytest itself)
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_first_round, daemon=True).start()
    r = cli("search", FIXTURES / "mlp.pt", *MLP, "--data", train, "--val", val, "--rounds", "60", "--children", "1",
            "--epochs", "1", "--policy", "controller", "--policy-state", state, "-o", out)
    assert r.code == 130, r.err
    assert r.err.splitlines()[-1] == "growcli: interrupted; the best model so far and the log were written"
    log = json.loads((tmp_path / "best.search.json").read_text())
    assert log["interrupted"] and log["stop"] == "interrupted" and 1 <= len(log["rounds"]) < 60
    best = growcli.load_grown(zoo.mlp(), out)
    assert sum(p.numel() for p in best.parameters()) == log["params_after"] > 1436
    assert load_policy_state(state)["updates"] == len([x for x in log["rounds"] if x["chosen"] is not None])


def test_plan_text_without_rounds_is_an_empty_plan(base, tensors):
    data = data_of(base, tensors)
    result = search(base, data, SearchSettings(rounds=1, children=1),
                    TRAIN, on_child=lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert result.interrupted and not result.rounds and result.best is base
    assert "steps: []" in plan_text(result, TRAIN)
