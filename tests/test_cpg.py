"""Continual learning by Compacting, Picking and Growing (growcli.cl, ``growcli cpg``).

Tiny synthetic classification tasks made with torch; every earlier task's outputs must stay
bit-identical (``torch.equal``) after the later tasks are learned, grown layers included.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import save_file
from torch import nn

from growcli import zoo
from growcli.cl import CPGConfig, CPGNet, TaskData, learn_tasks, load_cpg, load_task_dir, save_cpg, to_cpg
from growcli.cl.phases import prune_schedule
from growcli.core.errors import NotGrowableError, OutputError, UsageError, VerificationFailed
from growcli.io.formats import safetensors_metadata


def blobs(seed: int, shape=(16,), classes: int = 4, n: int = 96, n_val: int = 32, noise: float = 1.0) -> TaskData:
    """Gaussian blobs around random class centres; ``noise`` large makes the task hard."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, *shape, generator=g) * 2
    y = torch.randint(0, classes, (n + n_val,), generator=g)
    x = centres[y] + noise * torch.randn(n + n_val, *shape, generator=g)
    return TaskData(x[:n], y[:n], x[n:], y[n:])


def random_labels(seed: int, n: int = 64) -> TaskData:
    """A task no small network fits in a few epochs: its accuracy goal of 1.0 makes CPG grow."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return TaskData(x, y)


FAST = dict(epochs=3, prune_steps=2, prune_epochs=1)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.MLP(16, 32, 24, 4)


def learn_recording(net: CPGNet, tasks, config):
    """learn_tasks, recording every task's outputs on a probe right after it is learned."""
    probe = torch.randn(8, *net.input_shape, generator=torch.Generator().manual_seed(5))
    recorded = {}

    def on_task(report):
        with torch.no_grad():
            recorded[report.task] = net(probe, report.task).clone()
    net, reports = learn_tasks(net, tasks, config, on_task=on_task)
    return net, reports, probe, recorded


# --------------------------------------------------------------------------- the acceptance test
def test_three_tasks_keep_earlier_outputs_bit_identical_through_growth():
    tasks = [blobs(1), random_labels(2), blobs(3, classes=6)]
    net = to_cpg(mlp(), tasks[0].input)
    config = CPGConfig(**FAST, accuracy_goal=1.0, grow_by=4, max_grows=1)
    net, reports, probe, recorded = learn_recording(net, tasks, config)
    assert [r.task for r in reports] == [0, 1, 2]
    assert reports[1].grows == 1 and reports[1].units_added == 8  # two hidden layers, 4 units each
    assert 0.0 <= reports[1].grow_max_abs_diff <= 1e-12  # the exact widen, verified on task 1's network (float64)
    with torch.no_grad():
        for k in range(3):
            assert torch.equal(net(probe, k), recorded[k]), f"task {k} changed"
    # task 0 reads the layers as they were (32 and 24 units); task 2 reads the grown ones
    assert tuple(net.layers[0].mask(0, "weight").shape) == (32, 16)
    assert tuple(net.layers[1].mask(0, "weight").shape) == (24, 32)
    assert tuple(net.layers[0].weight.shape) == (32 + 4 * (reports[2].grows + 1), 16)
    assert tuple(net.layers[1].mask(2, "weight").shape) == tuple(net.layers[1].weight.shape)
    assert [h.in_features for h in net.heads][:2] == [24, 28]
    assert [h.out_features for h in net.heads] == [4, 4, 6]  # a head per task, sized by its classes
    # earlier tasks' accuracies now are their accuracies right after they were learned
    assert reports[2].earlier == [reports[0].accuracy, reports[1].accuracy]
    assert reports[1].earlier == [reports[0].accuracy]
    assert reports[0].accuracy == 1.0


def test_conv_chain_grows_channels_through_flatten_and_keeps_earlier_tasks():
    class ConvChain(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(2, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 6, 3, padding=1)
            self.fc = nn.Linear(6 * 3 * 3, 3)

        def forward(self, x):
            x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
            return self.fc(torch.tanh(self.c2(x)).flatten(1))

    torch.manual_seed(0)
    tasks = [blobs(s, shape=(2, 6, 6), classes=3, n=48, n_val=16, noise=3.0) for s in (1, 2, 3)]
    net = to_cpg(ConvChain(), tasks[0].input)
    config = CPGConfig(**FAST, accuracy_goal=1.0, grow_by=2, max_grows=1)
    net, reports, probe, recorded = learn_recording(net, tasks, config)
    assert [s["op"] for s in net.stages] == ["conv", "act", "pool", "conv", "act", "flatten", "linear"]
    grown = [r.task for r in reports if r.grows]
    assert grown, [r.to_dict() for r in reports]
    with torch.no_grad():
        for k in range(3):
            assert torch.equal(net(probe, k), recorded[k])
    # a new channel of c2 owns its 3·3 flattened columns of the head
    grows = [sum(r.grows for r in reports[:k + 1]) for k in range(3)]
    assert [h.in_features for h in net.heads] == [54 + 9 * 2 * g for g in grows]
    assert tuple(net.layers[1].mask(0, "weight").shape) == (6 + 2 * grows[0], 4 + 2 * grows[0], 3, 3)


class ConvPools(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 5, 3, stride=2), nn.Linear(5, 3)

    def forward(self, x):
        x = torch.nn.functional.avg_pool2d(torch.nn.functional.leaky_relu(self.c1(x), 0.1), 2)
        x = torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.silu(self.c2(x)), 2)
        return self.fc(torch.relu(x).mean((2, 3)))


CHAINS = {
    "mlp": (lambda: zoo.MLP(16, 32, 24, 4), (16,), 4),
    "sequential": (lambda: nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Dropout(0.5), nn.Linear(12, 10), nn.ELU(0.5),
                                         nn.Linear(10, 8), nn.Hardtanh(-2, 2), nn.Linear(8, 3)), (16,), 3),
    "conv-pools": (ConvPools, (2, 8, 8), 3),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_untrained_task_0_is_the_model_itself(name):
    """With no training and no pruning, task 0 computes exactly what the model computes: the chain read from the
    trace (stages, tensors, ops between layers) is the model, bit for bit."""
    factory, shape, classes = CHAINS[name]
    torch.manual_seed(0)
    model = factory().eval()
    task = blobs(1, shape=shape, classes=classes, n=16, n_val=8)
    net, [report] = learn_tasks(model, [task], CPGConfig(epochs=0, prune_ratio=0.0))
    x = torch.randn(6, *shape)
    with torch.no_grad():
        assert torch.equal(net(x, task=0), model(x))
    assert report.released == 0.0 and report.owned == sum(p.numel() for p in model.parameters()) - \
        sum(p.numel() for p in list(model.parameters())[-2:])


def test_compaction_releases_the_scheduled_fraction_and_the_next_task_gets_it():
    tasks = [blobs(1), blobs(2)]
    net = to_cpg(mlp(), tasks[0].input)
    net, reports = learn_tasks(net, tasks, CPGConfig(**FAST, prune_ratio=0.5))
    # 16·32 + 32·24 = 1280 hidden weights (56 biases, never pruned): half released after task 0
    assert prune_schedule(0.5, 2) == [0.5 * (1 - 0.5 ** 3), 0.5]
    assert reports[0].released == 0.5 and reports[0].owned == 1280 // 2 + 56 and reports[0].free == 640
    assert reports[1].owned == 320 and reports[1].free == 320  # task 1 owned the 640 released, pruned half
    layer = net.layers[0]
    released = layer.owner("weight") == 0
    assert torch.equal(layer.weight.detach()[released], torch.zeros(int(released.sum())))
    # task 1's mask holds every entry it owns and only earlier entries otherwise
    mask = layer.mask(1, "weight")
    owner = layer.owner("weight")
    assert bool(mask[owner == 2].all()) and not bool(mask[owner == 0].any())
    assert 0 < reports[1].picked < 1


def test_keep_accuracy_undoes_a_pruning_step_that_costs_accuracy():
    task = blobs(4, noise=2.5)
    config = CPGConfig(**{**FAST, "prune_steps": 3}, prune_ratio=0.95)
    first, last = prune_schedule(0.95, 3)[0], prune_schedule(0.95, 3)[-1]
    released = lambda f: sum(math.floor(f * n) for n in (512, 768)) / 1280  # noqa: E731
    _, [full] = learn_tasks(mlp(), [task], config)
    assert full.released == released(last) and full.accuracy < full.trained - 0.05  # 0.875 < 0.969 - 0.05
    _, [kept] = learn_tasks(mlp(), [task], dataclasses.replace(config, keep_accuracy=0.05))
    # the first step (66.8 %) kept the accuracy within 0.05; the second did not and was undone, pruning stopped
    assert kept.released == released(first) and kept.trained - 0.05 <= kept.accuracy < kept.trained
    assert kept.trained == full.trained


def test_same_seed_same_network_other_seed_another():
    tasks = [blobs(1), random_labels(2)]

    def run(seed):
        config = CPGConfig(**FAST, accuracy_goal=1.0, grow_by=2, max_grows=1, seed=seed)
        net, reports = learn_tasks(mlp(), tasks, config)
        return net.state_dict(), [r.to_dict() for r in reports]
    (a, ra), (b, rb), (c, _) = run(3), run(3), run(4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and ra == rb
    assert any(a[k].shape != c[k].shape or not torch.equal(a[k], c[k]) for k in a)


def test_a_changed_frozen_weight_fails_verification():
    tasks = [blobs(1), blobs(2), blobs(3)]
    net = to_cpg(mlp(), tasks[0].input)

    def tamper(report):
        if report.task == 1:  # a weight task 0 owns and reads
            layer = net.layers[0]
            idx = ((layer.owner("weight") == 1) & layer.mask(0, "weight")).nonzero()[0]
            with torch.no_grad():
                layer.weight[tuple(idx)] += 1e-3
    with pytest.raises(VerificationFailed, match=r"task 0's outputs changed after learning task 2 \(max abs diff "):
        learn_tasks(net, tasks, CPGConfig(**FAST), on_task=tamper)
    assert net.tasks == 2 and len(net.heads) == 2  # left as it was before task 2
    assert not bool((net.layers[0].owner("weight") == 3).any())


# --------------------------------------------------------------------------- save, load, inference
def test_save_and_load_keep_every_task_bit_identical(tmp_path):
    tasks = [blobs(1), random_labels(2)]
    net, reports = learn_tasks(mlp(), tasks, CPGConfig(**FAST, accuracy_goal=1.0, grow_by=4, max_grows=1))
    out = save_cpg(net, tmp_path / "cpg.safetensors", report=[r.to_dict() for r in reports])
    loaded = load_cpg(out)
    x = torch.randn(5, 16)
    with torch.no_grad():
        for k in range(2):
            assert torch.equal(loaded(x, task=k), net(x, task=k))
    assert loaded.tasks == 2 and set(loaded.state_dict()) == set(net.state_dict())
    meta = safetensors_metadata(out)
    info = json.loads(meta["growcli.cpg"])
    assert (info["format"], info["version"], info["tasks"], info["classes"]) == ("growcli.cpg", 1, 2, [4, 4])
    assert info["stages"][0]["out"] == 36 and json.loads(meta["growcli.cpg.report"])[1]["units_added"] == 8
    assert loaded.layers[0].owner("weight").dtype == torch.int16 and loaded.layers[0].mask(1, "bias").dtype == torch.bool
    with pytest.raises(UsageError, match=r"task 2: this model has learned tasks 0\.\.1"):
        loaded(x, task=2)
    # more tasks on the loaded network: the saved tasks stay as they were
    before = [loaded(x, task=k).detach().clone() for k in range(2)]
    loaded, [third] = learn_tasks(loaded, [blobs(3)], CPGConfig(**FAST))
    assert third.task == 2 and all(torch.equal(loaded(x, task=k), before[k]) for k in range(2))


def test_save_refuses_an_existing_file_and_leaves_nothing_on_failure(tmp_path):
    net, _ = learn_tasks(mlp(), [blobs(1)], CPGConfig(**FAST))
    out = tmp_path / "cpg.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="exists; choose a new path, or pass --overwrite"):
        save_cpg(net, out)
    assert out.read_bytes() == b"keep me"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write here"):
        save_cpg(net, blocker / "sub" / "cpg.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpg.safetensors", "file"]
    save_cpg(net, out, overwrite=True)
    assert load_cpg(out).tasks == 1


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(h + torch.relu(self.fc2(h)))


class SoftmaxMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.softmax(self.fc1(x), -1))


@pytest.mark.parametrize("factory,shape,message", [
    (lambda: zoo.SmallCNN(size=8), (3, 8, 8), "batch_norm.default in 'bn1' is not one: its statistics and affine "
                                              "parameters would be shared by every task and change with each"),
    (ResidualMLP, (16,), "linear.default in 'fc2' is not one: its input is read by more than one operation (a branch "
                         "or a residual connection)"),
    (SoftmaxMLP, (16,), "softmax.int is not one"),
    (lambda: nn.Sequential(nn.Linear(16, 4)), (16,), "this model has no hidden layer before its output layer to share among tasks"),
], ids=["batchnorm", "residual", "softmax", "no-hidden-layer"])
def test_refuses_models_that_are_not_a_chain(factory, shape, message):
    with pytest.raises(NotGrowableError) as info:
        to_cpg(factory().eval(), torch.randn(2, *shape))
    text = str(info.value)
    assert text.startswith("cpg needs a chain of Linear/Conv layers with element-wise activations, pooling or flatten "
                           "between them and a Linear output layer; ")
    assert text.endswith(message), text


def test_refuses_bad_task_data():
    task = blobs(1)
    with pytest.raises(UsageError, match=r"task 0: target must hold one class index"):
        learn_tasks(mlp(), [TaskData(task.input, task.target.float())], CPGConfig(**FAST))
    with pytest.raises(UsageError, match=r"task 0: input must be a non-empty float tensor of shape \[N, 16\]"):
        learn_tasks(to_cpg(mlp(), task.input), [TaskData(task.input[:, :8], task.target)], CPGConfig(**FAST))
    with pytest.raises(UsageError, match="prune_ratio must be in"):
        CPGConfig(prune_ratio=1.0)


# --------------------------------------------------------------------------- the command
def write_tasks(directory, tasks):
    directory.mkdir()
    for i, t in enumerate(tasks):
        tensors = {"input": t.input, "target": t.target}
        if t.val_input is not None:
            tensors.update(val_input=t.val_input, val_target=t.val_target)
        save_file(tensors, str(directory / f"task{i}.safetensors"))
    return directory


def test_cli_learns_every_task_file_and_reports_a_table(cli, tmp_path):
    tasks = write_tasks(tmp_path / "tasks", [blobs(1), random_labels(2), blobs(3)])
    out = tmp_path / "cpg.safetensors"
    r = cli("cpg", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--tasks", tasks, "-o", out, "--epochs", "3",
            "--prune-steps", "2", "--accuracy-goal", "1.0", "--grow-by", "4", "--max-grows", "1", "--seed", "1", "--json")
    assert r.code == 0, r.err
    result = json.loads(r.out)
    rows = result["tasks"]
    assert [row["task"] for row in rows] == [0, 1, 2] and result["earlier_tasks_bit_identical"] is True
    assert rows[2]["earlier"] == [rows[0]["accuracy"], rows[1]["accuracy"]]
    assert rows[1]["units_added"] == 8 and 0.0 <= rows[1]["grow_max_abs_diff"] <= 1e-12
    assert set(rows[0]) == {"task", "accuracy", "trained", "earlier", "owned", "units_added", "grows", "released",
                            "picked", "free", "grow_max_abs_diff"}
    net = load_cpg(out)
    assert net.tasks == 3
    assert load_task_dir(tasks)[1].input.shape == (64, 16)
    again = tmp_path / "again.safetensors"  # the same seed writes the same bytes
    r = cli("cpg", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--tasks", tasks, "-o", again, "--epochs", "3",
            "--prune-steps", "2", "--accuracy-goal", "1.0", "--grow-by", "4", "--max-grows", "1", "--seed", "1", "-q")
    assert r.code == 0 and again.read_bytes() == out.read_bytes()
    r = cli("cpg", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--tasks", tasks, "-o", out, "--epochs", "1")
    assert (r.code, r.err) == (2, f"growcli: usage: {out}: exists; choose a new path, or pass --overwrite to replace it\n")
    r = cli("cpg", out, "--tasks", tasks, "-o", tmp_path / "more.safetensors", "--epochs", "1", "--prune-steps", "1")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    r = cli("cpg", out, "--arch", "growcli.zoo:mlp", "--tasks", tasks, "-o", tmp_path / "x.safetensors")
    assert (r.code, r.err) == (2, f"growcli: usage: {out} is a CPG network (it holds its own structure); --arch does "
                                  "not apply\n")
    r = cli("cpg", out, "--tasks", tasks, "-o", tasks / "inside.safetensors")
    assert r.code == 2 and "the output would be written inside the input directory" in r.err
    assert sorted(p.name for p in tasks.iterdir()) == ["task0.safetensors", "task1.safetensors", "task2.safetensors"]
    assert lines[0].split() == ["task", "accuracy", "earlier", "tasks", "now", "owned", "released", "picked", "units", "added"]
    assert [line.split()[0] for line in lines[1:4]] == ["3", "4", "5"]
    assert lines[-1].startswith("every earlier task's outputs verified bit-identical after each task; wrote ")


def test_cli_refuses_a_model_that_is_not_a_chain_and_writes_nothing(cli, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"input": torch.randn(8, 3, 16, 16, generator=g), "target": torch.arange(8) % 5},
              str(tasks / "task0.safetensors"))
    out = tmp_path / "cpg.safetensors"
    r = cli("cpg", FIXTURES / "cnn.pt", "--arch", "growcli.zoo:cnn", "--tasks", tasks, "-o", out)
    assert r.code == 1 and r.err.startswith("growcli: not growable: cpg needs a chain of Linear/Conv layers")
    assert "batch_norm.default in 'bn1' is not one" in r.err and r.err.count("\n") == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tasks"]


@pytest.mark.parametrize("files,message", [
    ({}, "no task files; expected task0.safetensors, task1.safetensors, …"),
    ({"task0": {"input": torch.zeros(2, 16), "target": torch.zeros(2, dtype=torch.int64)},
      "task2": {"input": torch.zeros(2, 16), "target": torch.zeros(2, dtype=torch.int64)}},
     "task files are numbered from 0 without gaps; task1 is missing"),
], ids=["empty", "gap"])
def test_cli_refuses_a_bad_tasks_directory(cli, tmp_path, files, message):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, tensors in files.items():
        save_file(tensors, str(tasks / f"{name}.safetensors"))
    r = cli("cpg", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--tasks", tasks, "-o", tmp_path / "o.safetensors")
    assert (r.code, r.err) == (2, f"growcli: usage: {tasks}: {message}\n")


def test_cli_names_unknown_task_file_keys(cli, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    save_file({"input": torch.zeros(2, 16), "label": torch.zeros(2, dtype=torch.int64)}, str(tasks / "task0.safetensors"))
    r = cli("cpg", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--tasks", tasks, "-o", tmp_path / "o.safetensors")
    assert r.code == 1
    assert r.err == (f"growcli: error: {tasks / 'task0.safetensors'}: a task file holds input and target (optionally "
                     "val_input and val_target); unknown keys: label\n")
