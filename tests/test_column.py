"""column: progressive networks (Rusu et al. 2016) — a new column per task, old tasks bit-identical.

Every case runs the registered transform (which verifies task 0 in float64 through the runner
and every old task bit for bit inside the step) and then asserts the numbers: ``torch.equal``
of every old task's output against the model before each step and against the original,
parameter counts, gradients (new column non-zero, old ones ``None``), an optimizer step that
leaves every old tensor bit for bit, BatchNorm statistics that do not move in train mode,
refusals that name the op, the task argument, a ``.pt2`` export with the task as a tensor, and
the round trip through safetensors and ``growcli.load_grown``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FIXTURES
from torch import nn

import growcli
from growcli import zoo
from growcli.core.edits import EditLog
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import make_batches, spec_from_batch
from growcli.core.model import GrowModel
from growcli.io.load import load_model
from growcli.nn import Column, Columns
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context

ARCH = {"mlp": "growcli.zoo:mlp", "cnn": "growcli.zoo:cnn"}
SOURCES = ["mlp.pt", "mlp.pt2", "cnn.pt", "cnn.pt2"]
# Replaying a grown root (the first column wraps the original) needs EditLog.wrap in growcli.core.
REPLAYS_WRAP = hasattr(EditLog, "wrap")
needs_wrap = pytest.mark.skipif(not REPLAYS_WRAP, reason="growcli.core does not replay 'wrap' edits yet")


@pytest.fixture(scope="module")
def bases():
    out = {}
    for name, arch in ARCH.items():
        out[f"{name}.pt"] = load_model(FIXTURES / f"{name}.pt", arch=arch)
        out[f"{name}.pt2"] = load_model(FIXTURES / f"{name}.pt2")
    return out


def module_gm(model: nn.Module) -> GrowModel:
    model.eval()
    return GrowModel(model, "state_dict", FIXTURES / "none", "", spec_from_batch((model.example_inputs(), {})))


def add_column(gm: GrowModel, seed: int = 0, **options):
    return run_step(gm, "column", options, Context(seed=seed), VerifySettings(batches=2))


def batch(gm: GrowModel) -> torch.Tensor:
    x = make_batches(gm.inputs, 1, seed=7)[0][0][0]
    return x.to(next(gm.module.parameters()).dtype)


def outputs(model: nn.Module, x: torch.Tensor, tasks: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x, task=k) if isinstance(model, Columns) else model(x) for k in range(tasks)]


# --------------------------------------------------------------------------- old tasks bit-identical
@pytest.mark.parametrize("source", SOURCES)
def test_two_and_three_columns_keep_every_old_task_bit_identical(bases, source):
    gm = copy.deepcopy(bases[source])
    original = copy.deepcopy(gm.module)
    x = batch(gm)
    want0 = outputs(original, x, 1)[0]
    params0 = gm.num_parameters()
    history = []
    for step in (1, 2):
        before = copy.deepcopy(gm.module)
        report = add_column(gm)
        root = gm.module
        assert isinstance(root, Columns) and root.tasks == step + 1 and root.frozen == step
        assert root.base is not original and root.columns[step - 1].previous == step
        v = report.verification
        assert v["passed"] and v["dtype"] == "float64" and v["max_abs_diff"] == 0.0
        assert [n for n in report.notes if n.startswith("task ")] == [
            f"task {k}: max abs diff 0 against the model before the step (bit-identical)" for k in range(step)]
        old, new = outputs(before, x, step), outputs(root, x, step + 1)
        for k in range(step):
            assert torch.equal(new[k], old[k])
        assert torch.equal(new[0], want0)  # task 0 is the original's output, bit for bit
        assert new[step].shape == want0.shape and not torch.equal(new[step], want0)
        history.append(new)
    for k in range(2):  # task 1 after the third column is task 1 after the second
        assert torch.equal(history[1][k], history[0][k])
    # Each new column has the original's parameters (same layer shapes, BatchNorm included) plus
    # bias-free laterals from every older column into its layers 2…L.
    lateral = {"mlp": 32 * 24 + 24 * 4, "cnn": 8 * 12 * 1 * 1 + 192 * 5}[source.split(".")[0]]
    assert gm.num_parameters() == params0 + (params0 + lateral) + (params0 + 2 * lateral)


def test_mlp_from_module_float64_and_its_plan_follows_the_trace():
    gm = module_gm(zoo.MLP().double())
    add_column(gm)
    plan = json.loads(gm.module.plan)
    assert [(i["kind"], i.get("op"), i.get("weight")) for i in plan] == [
        ("linear", None, "fc1.weight"), ("op", "relu.default", None), ("linear", None, "fc2.weight"),
        ("op", "relu.default", None), ("linear", None, "fc3.weight")]
    col = gm.module.columns[0]
    assert [type(m).__name__ for m in col.items] == ["Linear", "ColumnOp", "Linear", "ColumnOp", "Linear"]
    assert [[tuple(a.weight.shape) for a in lat] for lat in col.laterals] == [[(24, 32)], [(4, 24)]]
    assert all(a.bias is None for lat in col.laterals for a in lat)
    assert all(p.dtype == torch.float64 for p in gm.module.parameters())


def test_cnn_plan_holds_batchnorm_pool_and_flatten_and_the_adapter_choice(bases):
    gm = copy.deepcopy(bases["cnn.pt"])
    add_column(gm, adapter="layer")
    plan = json.loads(gm.module.plan)
    assert [i.get("op", i["kind"]) for i in plan] == ["conv", "bn", "relu.default", "max_pool2d.default", "conv", "bn",
                                                       "relu.default", "max_pool2d.default", "reshape", "linear"]
    lat = gm.module.columns[0].laterals
    assert tuple(lat[0][0].weight.shape) == (12, 8, 3, 3) and lat[0][0].padding == (1, 1)  # the layer's geometry
    gm2 = copy.deepcopy(bases["cnn.pt"])
    add_column(gm2)  # default 1x1
    assert tuple(gm2.module.columns[0].laterals[0][0].weight.shape) == (12, 8, 1, 1)


# --------------------------------------------------------------------------- training: new trains, old frozen
@pytest.mark.parametrize("source", ["mlp.pt", "cnn.pt"])
def test_new_column_trains_and_an_optimizer_step_leaves_old_columns_bit_for_bit(bases, source):
    gm = copy.deepcopy(bases[source])
    add_column(gm)
    add_column(gm)
    root = gm.module
    old = {n: t.detach().clone() for n, t in root.state_dict().items() if not n.startswith("columns.1.")}
    new_names = [n for n, _ in root.named_parameters() if n.startswith("columns.1.")]
    assert all(p.requires_grad == n.startswith("columns.1.") for n, p in root.named_parameters())
    x = batch(gm)
    opt = torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    root.train()
    assert root.training and root.columns[1].training
    assert not root.base.training and not root.columns[0].training  # frozen columns stay in eval mode
    loss = root(x, task=2).square().mean()
    loss.backward()
    grads = dict(root.named_parameters())
    assert all(grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in new_names)
    assert all(p.grad is None for n, p in root.named_parameters() if n not in new_names)
    before_new = {n: grads[n].detach().clone() for n in new_names}
    opt.step()
    after = root.state_dict()
    changed = [n for n, t in old.items() if not torch.equal(after[n], t)]
    assert changed == []  # weights and BatchNorm statistics of columns 0 and 1, bit for bit
    assert all(not torch.equal(grads[n], before_new[n]) for n in new_names)


def test_fixture_pt2_base_is_frozen_too(bases):
    gm = copy.deepcopy(bases["mlp.pt2"])
    add_column(gm)
    assert all(not p.requires_grad for p in gm.module.base.parameters())
    gm.module.train()
    out = gm.module(batch(gm), task=1).sum()
    out.backward()
    assert all(p.grad is None for p in gm.module.base.parameters())
    assert all(p.grad is not None for p in gm.module.columns[0].parameters())


# --------------------------------------------------------------------------- the task argument
def test_task_argument(bases):
    gm = copy.deepcopy(bases["mlp.pt"])
    add_column(gm)
    root, x = gm.module, batch(gm)
    for k in range(2):
        assert torch.equal(root(x, task=torch.tensor(k)), root(x, task=k))
    for bad in (2, -1, True, 1.0):
        with pytest.raises(UsageError, match=r"task .*: expected an int from 0 to 1 \(one per column\)"):
            root(x, task=bad)
    assert torch.equal(root(x), root(x, task=0))


def test_pt2_export_with_the_task_as_a_tensor_keeps_every_task(bases, tmp_path):
    gm = copy.deepcopy(bases["cnn.pt"])
    add_column(gm)
    root, x = gm.module, batch(gm)
    ep = torch.export.export(root, (x,), {"task": torch.tensor(1)}, strict=False)
    torch.export.save(ep, str(tmp_path / "tasks.pt2"))
    program = torch.export.load(str(tmp_path / "tasks.pt2")).module()
    for k in range(2):
        assert torch.equal(program(x, task=torch.tensor(k)), root(x, task=k))
    reason = root.growcli_output_refusal("pt2")
    assert "fix task=0" in reason and "torch.tensor(0)" in reason
    assert root.growcli_output_refusal("onnx") and root.growcli_output_refusal("safetensors") is None


# --------------------------------------------------------------------------- refusals, from the trace
@pytest.mark.parametrize("model,message", [
    (zoo.ResNetTiny(), r"column: the value relu is read by add\.Tensor \(add\), conv2d\.default \(conv2d_1\): a "
                       r"branching or residual graph has no single chain of layers"),
    (zoo.DenseNetTiny(), r"column: the value conv2d in 'stem' is read by cat\.default \(cat\), batch_norm\.default "
                         r"\(batch_norm\): a branching"),
    (zoo.SENet(), r"column: the value relu is read by .*mul\.Tensor \(mul\).*: a branching"),
])
def test_refuses_graphs_without_a_single_chain_naming_the_op(model, message):
    gm = module_gm(model)
    with pytest.raises(NotGrowableError, match=message):
        add_column(gm)
    assert gm.module is model and gm.edits.records == []  # unchanged


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.fc(x) + y

    def example_inputs(self):
        return (torch.randn(2, 4), torch.randn(2, 2))


class Softmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.softmax(x, dim=-1))

    def example_inputs(self):
        return (torch.randn(2, 4),)


class AcrossBatch(nn.Module):
    """Flattens the batch into the features: a column's laterals would mix samples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(x.flatten(0))

    def example_inputs(self):
        return (torch.randn(2, 4),)


@pytest.mark.parametrize("model,message", [
    (TwoInputs(), r"column: the model takes 2 tensor inputs; progressive columns need exactly one"),
    (Softmax(), r"column: softmax\.int \(softmax\) cannot be placed in a column; progressive columns need a chain of "
                r"Linear/Conv layers with per-sample ops between them"),
    (AcrossBatch(), r"column: flatten\.using_ints \(flatten\) reshapes \[2, 4\] to \[8\] across the batch dimension"),
])
def test_refuses_what_it_cannot_place(model, message):
    with pytest.raises(NotGrowableError, match=message):
        add_column(module_gm(model))


def test_seeded_and_deterministic(bases):
    a, b, c = (copy.deepcopy(bases["mlp.pt"]) for _ in range(3))
    add_column(a, seed=3)
    add_column(b, seed=3)
    add_column(c, seed=4)
    sa, sb, sc = (m.module.columns[0].state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["items.0.weight"], sc["items.0.weight"])


def test_candidates(bases):
    from growcli.transforms.column import column_candidates

    assert column_candidates(bases["cnn.pt"]) == {"model": None}
    assert "add.Tensor" in column_candidates(module_gm(zoo.ResNetTiny()))["model"]


# --------------------------------------------------------------------------- save → load_grown, CLI
@needs_wrap
def test_safetensors_round_trip_rebuilds_columns_and_frozen_state(bases, tmp_path):
    gm = copy.deepcopy(bases["cnn.pt"])
    add_column(gm)
    add_column(gm)
    out = tmp_path / "cnn3.safetensors"
    result = growcli.save_model(gm, out)
    assert result["max_abs_diff"] == 0.0
    model = growcli.load_grown(zoo.SmallCNN(), out)
    assert isinstance(model, Columns) and model.tasks == 3 and model.frozen == 2
    assert all(isinstance(c, Column) for c in model.columns)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in gm.module.parameters()]
    x = batch(gm)
    for k in range(3):
        assert torch.equal(model(x, task=k), gm.module(x, task=k))


@needs_wrap
def test_cli_writes_safetensors_and_refuses_a_pt2_output(cli, tmp_path):
    out = tmp_path / "mlp2.safetensors"
    r = cli("column", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] == 0.0
    assert report["steps"][0]["notes"][0] == "task 0: max abs diff 0 against the model before the step (bit-identical)"
    assert report["outputs"][0]["max_abs_diff"] == 0.0
    r = cli("column", FIXTURES / "mlp.pt2", "-o", tmp_path / "program.pt2")
    assert r.code == 2 and "would fix task=0" in r.err and len(r.err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp2.growth_report.json", "mlp2.safetensors"]


def test_cli_usage_errors(cli, tmp_path):
    r = cli("column", FIXTURES / "mlp.pt2", "--adapter", "3x3", "-o", tmp_path / "x.safetensors")
    assert r.code == 2 and "adapter" in r.err and not (tmp_path / "x.safetensors").exists()
    r = cli("column", FIXTURES / "resnet.pt2", "-o", tmp_path / "r.safetensors")
    assert r.code == 1 and "residual graph" in r.err and len(r.err.strip().splitlines()) == 1


@needs_wrap
@pytest.mark.parametrize("record,message", [
    ({"op": "wrap", "spec": {"type": "growcli.nn:Columns", "kwargs": {}}, "child": "__class__"}, "not a plain submodule"),
    ({"op": "wrap", "spec": {"type": "growcli.nn:Columns", "kwargs": {}}, "child": "a.b"}, "not a plain submodule"),
    ({"op": "wrap", "spec": {"type": "os:system", "kwargs": {}}, "child": "base"}, "which growcli does not rebuild"),
])
def test_a_recorded_wrap_names_a_plain_child_and_an_allowlisted_class(record, message):
    from growcli.core.errors import FormatError
    from growcli.core.replay import check_records

    with pytest.raises(FormatError, match=message):
        check_records([record], "grown.safetensors")


def test_a_recorded_column_op_outside_the_table_is_refused():
    from growcli.core.errors import FormatError
    from growcli.core.module_specs import build_module

    plan = json.dumps([{"kind": "linear", "weight": "w", "bias": None, "in": 2, "out": 2},
                       {"kind": "op", "op": "_foreach_exp", "args": []}])
    with pytest.raises(FormatError, match="column op '_foreach_exp' is not one growcli runs"):
        build_module({"type": "growcli.nn:Column", "kwargs": {"plan": plan, "previous": 1}}, nn.Module())


@needs_wrap
def test_inputs_can_pass_the_task_to_the_runner_comparison(cli, tmp_path):
    """On a model that already has columns, an --inputs file's "task" tensor selects the task the runner compares."""
    from safetensors.torch import save_file

    two = tmp_path / "cnn2.safetensors"
    assert cli("column", FIXTURES / "cnn.pt", "--arch", "growcli.zoo:cnn", "-o", two).code == 0
    inputs = tmp_path / "task1.safetensors"
    save_file({"x": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), "task": torch.tensor(1)},
              str(inputs))
    r = cli("column", two, "--arch", "growcli.zoo:cnn", "--inputs", inputs, "-o", tmp_path / "cnn3.safetensors", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verification"]["max_abs_diff"] == 0.0 and report["outputs"][0]["max_abs_diff"] == 0.0
    assert report["steps"][0]["notes"][:2] == [
        f"task {k}: max abs diff 0 against the model before the step (bit-identical)" for k in range(2)]
    model = growcli.load_grown(zoo.SmallCNN(), tmp_path / "cnn3.safetensors")
    assert model.tasks == 3 and model.frozen == 2
