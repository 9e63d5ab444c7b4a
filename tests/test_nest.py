"""NeST: masked layers, exact connection and neuron growth, magnitude pruning, and the grow-and-prune driver.

Real float64 models with random weights (the zoo's MLP), data generated with torch (Gaussian
blobs). Growth steps are verified by the pipeline and compared again here; masks are checked
after save and reload (safetensors replayed by load_grown, a torch.export .pt2, ONNX run with
onnxruntime) and through training with real optimizers.
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

import growcli
from growcli import zoo
from growcli.analysis.calibration import from_tensors
from growcli.core.errors import NoMatchingModuleError, NotGrowableError, UsageError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.nn import MaskedConv2d, MaskedLinear
from growcli.nn.masks import keep_masked_zero, zero_masked_
from growcli.run.steps import run_step
from growcli.train.nest import NestSettings, nest, nonzero_parameters
from growcli.transforms.catalog import build_spec
from growcli.transforms.nest_neurons import find_consumer
from growcli.transforms.registry import Context

LAYERS = ["fc1", "fc2", "fc3"]
CENTRES = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2


def blobs(n: int, seed: int, noise: float = 1.0) -> dict[str, torch.Tensor]:
    """Four Gaussian blobs in 16 dimensions, labelled by blob."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return {"input": CENTRES[y] + noise * torch.randn(n, 16, generator=g, dtype=torch.float64), "target": y}


def mlp_gm(seed: int = 0) -> GrowModel:
    torch.manual_seed(seed)
    module = zoo.MLP().double().eval()
    return GrowModel(module, "state_dict", Path("mem"), "0",
                     spec_from_batch(((torch.randn(4, 16, dtype=torch.float64),), {})))


def ctx_with(gm: GrowModel, data: dict[str, torch.Tensor]) -> Context:
    ctx = Context(seed=0)
    ctx.data["train"] = from_tensors(data, gm.inputs)
    return ctx


def effective_grad(module: nn.Module, name: str, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """∂L/∂(w·m) of one masked layer, computed independently: the layer runs with a leaf copy of w·m."""
    layer = module.get_submodule(name)
    leaf = (layer.weight * layer.mask).detach().requires_grad_(True)
    handle = layer.register_forward_hook(lambda m, i, o: F.linear(i[0], leaf, m.bias))
    try:
        loss = F.cross_entropy(module(data["input"]), data["target"])
        (grad,) = torch.autograd.grad(loss, [leaf])
    finally:
        handle.remove()
    return grad


def fresh_inputs(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(123), dtype=torch.float64)


# --------------------------------------------------------------------------- mask
def test_mask_is_exact_keeps_zeros_missing_and_keeps_the_parameters():
    gm = mlp_gm()
    with torch.no_grad():
        gm.module.fc2.weight[3, :5] = 0
    weight = gm.module.fc2.weight
    x = fresh_inputs()
    before = gm.module(x)
    report = run_step(gm, "mask", {"layer": LAYERS}, Context())
    assert report.exact and report.verification["max_abs_diff"] == 0.0
    fc2 = gm.module.fc2
    assert type(fc2) is MaskedLinear and fc2.weight is weight  # the same Parameter: optimizers keep it
    assert int((fc2.mask == 0).sum()) == 5 and bool((fc2.mask[3, :5] == 0).all())
    assert torch.equal(gm.module(x), before)
    assert [c["density"] for c in report.changes] == [1.0, round(1 - 5 / (24 * 32), 6), 1.0]
    gm2 = mlp_gm()
    with torch.no_grad():
        gm2.module.fc2.weight[0, 0] = 0
    run_step(gm2, "mask", {"layer": "fc2", "dense": True}, Context())
    assert bool((gm2.module.fc2.mask == 1).all())


def test_mask_conv_is_exact():
    module = zoo.SmallCNN().double().eval()
    gm = GrowModel(module, "state_dict", Path("mem"), "0",
                   spec_from_batch(((torch.randn(2, 3, 16, 16, dtype=torch.float64),), {})))
    report = run_step(gm, "mask", {"layer": ["conv1", "conv2", "fc"]}, Context())
    assert type(module.conv2) is MaskedConv2d and module.conv2.mask.shape == (12, 8, 3, 3)
    assert report.verification["max_abs_diff"] == 0.0 and report.verification["passed"]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_mask_refuses_tied_weights_programs_and_unknown_layers():
    module = Tied()
    gm = GrowModel(module, "state_dict", Path("mem"), "0", spec_from_batch(((torch.zeros(2, 3, dtype=torch.long),), {})))
    with pytest.raises(NotGrowableError, match=r"mask: 'head': its weight is shared with another module \(tied\)"):
        run_step(gm, "mask", {"layer": "head"}, Context())
    assert type(module.head) is nn.Linear  # unchanged
    program = growcli.load_model(FIXTURES / "mlp.pt2")
    with pytest.raises(NotGrowableError, match=r"mask: a \.pt2 program has no layer modules to replace"):
        growcli.apply(program, "mask", layer="fc1")
    with pytest.raises(NoMatchingModuleError, match=r"layer 'fc9' matches nothing; did you mean fc3, fc2, fc1\?"):
        run_step(mlp_gm(), "mask", {"layer": "fc9"}, Context())


# --------------------------------------------------------------------------- grow_connections
def test_grow_connections_activates_the_top_gradient_missing_connections_at_zero():
    gm = mlp_gm()
    data = blobs(64, 1)
    ctx = ctx_with(gm, data)
    run_step(gm, "mask", {"layer": LAYERS}, ctx)
    run_step(gm, "magnitude_prune", {"layer": LAYERS, "sparsity": 0.5}, ctx)
    fc2 = gm.module.fc2
    missing = (fc2.mask == 0).clone()
    assert int(missing.sum()) == 384
    grad = effective_grad(gm.module, "fc2", data).abs()
    x = fresh_inputs()
    before = gm.module(x)
    report = run_step(gm, "grow_connections", {"layer": "fc2", "data": "train", "connections": 0.1}, ctx)
    assert report.exact and report.verification["max_abs_diff"] == 0.0
    assert torch.equal(gm.module(x), before)
    grown = missing & (fc2.mask == 1)
    assert int(grown.sum()) == 39 == report.changes[0]["grown"]  # ceil(0.1 · 384)
    assert bool((fc2.weight[grown] == 0).all())  # new connections start at weight 0
    # they are the 39 missing connections with the largest |∂L/∂(w·m)|, measured here independently
    threshold = grad[grown].min()
    assert bool((grad[missing & ~grown] <= threshold).all())
    assert float(grad[grown].min()) > 0
    # and training can now move them: their gradient is not zero
    out = F.cross_entropy(gm.module(data["input"]), data["target"])
    (g,) = torch.autograd.grad(out, [fc2.weight])
    assert bool((g[grown] != 0).all()) and bool((g[fc2.mask == 0] == 0).all())


def test_grow_connections_refusals():
    gm = mlp_gm()
    ctx = ctx_with(gm, blobs(32, 1))
    with pytest.raises(NotGrowableError, match=r"grow_connections: the model has no masked layer; add a mask step first"):
        run_step(gm, "grow_connections", {"layer": "fc1", "data": "train"}, ctx)
    run_step(gm, "mask", {"layer": "fc1"}, ctx)
    with pytest.raises(NotGrowableError, match=r"grow_connections: 'fc2' is not masked; add a mask step for it first"):
        run_step(gm, "grow_connections", {"layer": "fc2", "data": "train"}, ctx)
    with pytest.raises(NotGrowableError, match=r"no missing connection of fc1 has a nonzero gradient"):
        run_step(gm, "grow_connections", {"layer": "fc1", "data": "train"}, ctx)
    with pytest.raises(UsageError, match=r"connections must be a fraction in \(0, 1\], got 1.5"):
        build_spec("grow_connections", {"layer": "fc1", "data": "x", "connections": 1.5})


# --------------------------------------------------------------------------- magnitude_prune
def test_magnitude_prune_removes_the_smallest_weights_to_the_target_and_is_approximate():
    gm = mlp_gm()
    ctx = Context()
    run_step(gm, "mask", {"layer": LAYERS}, ctx)
    w = gm.module.fc1.weight.detach().abs().clone()
    report = run_step(gm, "magnitude_prune", {"layer": LAYERS, "sparsity": 0.75}, ctx)
    assert not report.exact and report.verification["max_abs_diff"] > 1e-3
    assert report.notes[-1].startswith("not function-preserving by design; measured: NOT equal in float64")
    fc1 = gm.module.fc1
    assert int((fc1.mask == 0).sum()) == 384 == report.changes[0]["pruned"]  # 0.75 · 32 · 16
    assert float(w[fc1.mask == 0].max()) <= float(w[fc1.mask == 1].min())
    assert [c["sparsity_after"] for c in report.changes] == [0.75, 0.75, 0.75]
    assert zero_masked_(gm.module) == 0  # the stored entries under the mask are zero
    again = run_step(gm, "magnitude_prune", {"layer": "fc1", "sparsity": 0.5}, ctx)
    assert again.changes[0]["pruned"] == 0 and "already 0.750 sparse; nothing pruned" in again.notes[0]


# --------------------------------------------------------------------------- grow_neurons
def test_grow_neurons_is_exact_and_wires_the_top_gradient_pairs():
    gm = mlp_gm()
    data = blobs(64, 1)
    ctx = ctx_with(gm, data)
    run_step(gm, "mask", {"layer": LAYERS}, ctx)
    assert find_consumer(gm, "fc1") == "fc2" and find_consumer(gm, "fc2") == "fc3"
    old_fc1 = gm.module.fc1.weight.detach().clone()
    row_norm = float(old_fc1.norm(dim=1).mean())
    x = fresh_inputs()
    before = gm.module(x)
    report = run_step(gm, "grow_neurons", {"layer": "fc1", "data": "train", "neurons": 3, "pairs": 0.02}, ctx)
    assert report.exact and report.verification["max_abs_diff"] <= 1e-10
    assert (gm.module(x) - before).abs().max() <= 1e-12
    fc1, fc2 = gm.module.fc1, gm.module.fc2
    assert type(fc1) is MaskedLinear and type(fc2) is MaskedLinear
    assert fc1.weight.shape == (35, 16) and fc2.weight.shape == (24, 35) and fc1.mask.shape == (35, 16)
    assert torch.equal(fc1.weight[:32].detach(), old_fc1)
    for unit in report.changes:
        j = unit["unit"]
        assert torch.nonzero(fc1.mask[j]).reshape(-1).tolist() == unit["inputs"]
        assert torch.nonzero(fc2.mask[:, j]).reshape(-1).tolist() == unit["outputs"]
        assert bool((fc2.weight[:, j] == 0).all()) and float(fc1.bias[j]) == 0.0
        assert abs(float(fc1.weight[j].norm()) - row_norm) <= 1e-12
        assert bool((fc1.weight[j][fc1.mask[j] == 0] == 0).all())
    # the new outgoing weights get a gradient (training grows them)
    loss = F.cross_entropy(gm.module(data["input"]), data["target"])
    (g,) = torch.autograd.grad(loss, [fc2.weight])
    assert float(g[:, 32:][fc2.mask[:, 32:] == 1].abs().max()) > 0


def test_grow_neurons_needs_a_masked_consumer():
    gm = mlp_gm()
    ctx = ctx_with(gm, blobs(32, 1))
    run_step(gm, "mask", {"layer": ["fc2"]}, ctx)
    with pytest.raises(NotGrowableError, match=r"grow_neurons: 'fc3' reads the units of 'fc2' but is not masked; add a mask step for it first"):
        run_step(gm, "grow_neurons", {"layer": "fc2", "data": "train"}, ctx)
    assert gm.module.fc2.weight.shape == (24, 32) and type(gm.module.fc2) is MaskedLinear  # unchanged


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
                                  lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01)],
                         ids=["adam", "sgd-momentum"])
def test_pruned_weights_stay_zero_through_training(make):
    gm = mlp_gm()
    data = blobs(64, 1)
    run_step(gm, "mask", {"layer": LAYERS}, Context())
    model = gm.module
    optimizer = make(model.parameters())
    for _ in range(3):  # momentum and moments build up on every entry before pruning
        optimizer.zero_grad()
        F.cross_entropy(model(data["input"]), data["target"]).backward()
        optimizer.step()
    run_step(gm, "magnitude_prune", {"layer": LAYERS, "sparsity": 0.6}, Context())
    masks = {n: model.get_submodule(n).mask.clone() for n in LAYERS}
    hook = keep_masked_zero(optimizer, model)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(data["input"]), data["target"]).backward()
        for n in LAYERS:  # the gradient of a masked entry is exactly zero
            layer = model.get_submodule(n)
            assert bool((layer.weight.grad[layer.mask == 0] == 0).all())
        optimizer.step()
    hook.remove()
    for n in LAYERS:
        layer = model.get_submodule(n)
        assert torch.equal(layer.mask, masks[n])
        assert int((layer.weight[layer.mask == 0] != 0).sum()) == 0
        assert int((layer.weight[layer.mask == 1] != 0).sum()) == int(layer.mask.sum())  # the rest trained
    x = fresh_inputs()
    plain = F.linear(F.relu(F.linear(F.relu(F.linear(x, model.fc1.weight, model.fc1.bias)), model.fc2.weight,
                                     model.fc2.bias)), model.fc3.weight, model.fc3.bias)
    assert torch.equal(model(x), plain)


def test_without_the_hook_momentum_moves_stored_entries_but_not_the_function():
    gm = mlp_gm()
    data = blobs(64, 1)
    run_step(gm, "mask", {"layer": ["fc1"]}, Context())
    model = gm.module
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(data["input"]), data["target"]).backward()
        optimizer.step()
    run_step(gm, "magnitude_prune", {"layer": "fc1", "sparsity": 0.5}, Context())
    optimizer.zero_grad()
    F.cross_entropy(model(data["input"]), data["target"]).backward()
    optimizer.step()
    moved = int((model.fc1.weight[model.fc1.mask == 0] != 0).sum())
    assert moved > 0  # why keep_masked_zero exists
    x = fresh_inputs()
    out = model(x)
    assert zero_masked_(model) == moved
    assert torch.equal(model(x), out)  # the function was the masked one all along


def test_grow_live_keeps_the_optimizer():
    torch.manual_seed(0)
    model = zoo.MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = [id(p) for p in model.parameters()]
    report = growcli.grow_(model, "mask", optimizer, torch.randn(4, 16), layer=["fc1", "fc2"])
    assert report.steps[0]["verification"]["max_abs_diff"] == 0.0
    assert [id(p) for p in model.parameters()] == ids and type(model.fc1) is MaskedLinear


# --------------------------------------------------------------------------- the driver
def test_nest_driver_undoes_a_pruning_step_below_min_accuracy():
    gm = mlp_gm()
    train = from_tensors(blobs(64, 1, noise=4.0), gm.inputs)
    val = from_tensors(blobs(64, 2, noise=4.0), gm.inputs)
    settings = NestSettings(layer=LAYERS, sparsity=0.9, neurons=0, epochs=1, prune_steps=2, min_accuracy=1.0)
    rows = nest(gm, settings, train, val, "train")
    assert [r["phase"] for r in rows] == ["input", "mask", "grow connections", "prune 1/2"]
    assert rows[-1]["note"].startswith(f"undone: accuracy {rows[-1]['val_accuracy']:.4f} < 1.0 after retraining")
    assert rows[-1]["sparsity"] == pytest.approx(0.45, abs=1e-3)
    # the model kept is the one before the pruning step: every mask entry is 1 again
    assert all(bool((gm.module.get_submodule(n).mask == 1).all()) for n in LAYERS)
    assert rows[1]["nonzero"] == nonzero_parameters(gm.module) == 1436


def test_nest_driver_run_again_grows_the_connections_it_pruned():
    gm = mlp_gm()
    train = from_tensors(blobs(64, 1), gm.inputs)
    val = from_tensors(blobs(64, 2), gm.inputs)
    first = nest(gm, NestSettings(layer=LAYERS, sparsity=0.5, neurons=0, epochs=1, prune_steps=1), train, val, "train")
    assert first[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    rows = nest(gm, NestSettings(layer=LAYERS, sparsity=0.5, connections=0.2, neurons=0, epochs=0, prune_steps=1),
                train, val, "train")
    assert rows[1]["note"] == "skipped: the layers are masked already"
    grown = gm.steps[-2]
    assert grown["transform"] == "grow_connections" and grown["verification"]["max_abs_diff"] == 0.0
    assert [c["grown"] for c in grown["changes"]] == [52, 77, 10]  # ceil(0.2 · missing) per layer
    assert rows[2]["sparsity"] < rows[1]["sparsity"] and rows[2]["val_loss"] == rows[1]["val_loss"]  # epochs 0
    assert rows[3]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def _write_blobs(tmp: Path) -> tuple[Path, Path]:
    train, val = tmp / "train.safetensors", tmp / "val.safetensors"
    for path, seed in ((train, 1), (val, 2)):
        save_file({k: (v.float() if v.is_floating_point() else v) for k, v in blobs(128, seed).items()}, str(path))
    return train, val


@pytest.fixture(scope="module")
def nest_run(tmp_path_factory):
    """``growcli nest`` on the MLP fixture once: safetensors, .pt2 and ONNX outputs, and its JSON report."""
    from typer.testing import CliRunner

    from growcli.cli.app import get_app

    tmp = tmp_path_factory.mktemp("nest")
    train, val = _write_blobs(tmp)
    outs = [tmp / "sparse.safetensors", tmp / "sparse.pt2", tmp / "sparse.onnx"]
    args = ["nest", str(FIXTURES / "mlp.pt"), "--arch", "growcli.zoo:mlp", "--layer", "fc1", "--layer", "fc2",
            "--layer", "fc3", "--data", str(train), "--val", str(val), "--sparsity", "0.8", "--neurons", "2",
            "--epochs", "1", "--prune-steps", "2", "--json", *[a for o in outs for a in ("-o", str(o))]]
    result = CliRunner().invoke(get_app(), args)
    assert result.exit_code == 0, result.output
    return tmp, outs, json.loads(result.stdout)


def test_nest_command_reports_every_phase(nest_run):
    tmp, outs, report = nest_run
    phases = report["phases"]
    assert [p["phase"] for p in phases] == ["input", "mask", "grow connections", "grow neurons", "prune 1/2", "prune 2/2"]
    assert phases[2]["note"] == "skipped: no connection is missing (the layers are dense)"
    assert phases[0]["parameters"] == 1436 and phases[3]["parameters"] == 1436 + 2 * (16 + 1 + 24) + 2 * (34 + 1 + 4)
    assert phases[-1]["sparsity"] == pytest.approx(0.8, abs=2e-3)
    assert phases[-1]["nonzero"] < phases[3]["nonzero"] < phases[3]["parameters"]
    assert all(isinstance(p["val_accuracy"], float) and p["val_loss"] > 0 for p in phases)
    steps = report["steps"]
    assert [s["transform"] for s in steps] == ["mask", "grow_neurons", "magnitude_prune", "magnitude_prune"]
    assert all(s["verification"]["passed"] and s["verification"]["max_abs_diff"] <= 1e-10 for s in steps if s["exact"])
    assert [o["format"] for o in report["outputs"]] == ["safetensors", "pt2", "onnx"]
    assert all(o["readback"]["passed"] for o in report["outputs"])
    assert (tmp / "sparse.growth_report.json").is_file()


def test_masks_survive_safetensors_pt2_and_onnx(nest_run):
    import onnxruntime

    _, (st, pt2, onnx), report = nest_run
    model = growcli.load_grown(zoo.MLP(), st)
    assert all(type(model.get_submodule(n)) is MaskedLinear for n in LAYERS)
    assert model.fc1.weight.shape == (34, 16) and model.fc2.weight.shape == (26, 34)
    sparsity = 1 - sum(int(model.get_submodule(n).mask.sum()) for n in LAYERS) / sum(
        model.get_submodule(n).mask.numel() for n in LAYERS)
    assert sparsity == pytest.approx(report["phases"][-1]["sparsity"], abs=1e-12)
    assert zero_masked_(model) == 0
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
        program = torch.export.load(str(pt2)).module()
        assert (program(x) - expected).abs().max() <= 1e-6
        assert any(b.endswith("mask") for b, _ in program.named_buffers())
    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert float((torch.from_numpy(got) - expected).abs().max()) <= 1e-5


def test_exports_compute_the_masked_function_even_when_stored_weights_are_not_zero(tmp_path):
    """The mask is part of the exported function, not just zeros in the weights."""
    import onnxruntime

    gm = growcli.load_model(FIXTURES / "mlp.pt", arch="growcli.zoo:mlp")
    growcli.apply(gm, "mask", layer="fc2")
    with torch.no_grad():
        gm.module.fc2.mask[:, ::2] = 0  # weights under it keep their (nonzero) values
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        masked = gm.module(x)
        dense = zoo.MLP()
        dense.load_state_dict({k: v for k, v in gm.module.state_dict().items() if not k.endswith("mask")})
        assert float((dense(x) - masked).abs().max()) > 1e-2
    growcli.save_models(gm, [(tmp_path / "m.pt2", None, None), (tmp_path / "m.onnx", None, None),
                             (tmp_path / "m.safetensors", None, None)])
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert float((got - masked).abs().max()) <= 1e-5
    with torch.no_grad():
        assert float((torch.export.load(str(tmp_path / "m.pt2")).module()(x) - masked).abs().max()) <= 1e-6
        reloaded = growcli.load_grown(zoo.MLP(), tmp_path / "m.safetensors")
        assert torch.equal(reloaded(x), masked) and torch.equal(reloaded.fc2.mask, gm.module.fc2.mask)


def test_nest_command_errors(cli, tmp_path):
    train, val = _write_blobs(tmp_path)
    base = ["--data", train, "--val", val, "-o", tmp_path / "o.safetensors"]
    r = cli("nest", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--layer", "fc1", "--sparsity", "1.5", *base)
    assert r.code == 2 and r.err.strip() == "growcli: usage: sparsity must be a fraction in [0, 1), got 1.5"
    r = cli("nest", FIXTURES / "mlp.pt2", "--layer", "fc1", "--sparsity", "0.5", *base)
    assert r.code == 1 and "mask: a .pt2 program has no layer modules to replace" in r.err
    assert r.err.count("\n") == 1 and "Traceback" not in r.err
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.growth_report.json").exists()


def test_nest_transforms_in_a_plan(cli, tmp_path):
    train, _ = _write_blobs(tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nsteps:\n  - mask: {layer: [fc1, fc2]}\n  - magnitude_prune: {layer: [fc1, fc2], sparsity: 0.5}\n"
                    f"  - grow_connections: {{layer: fc1, data: '{train}', connections: 0.25}}\n"
                    f"  - grow_neurons: {{layer: fc1, data: '{train}', neurons: 2}}\n")
    out = tmp_path / "p.safetensors"
    r = cli("grow", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--plan", plan, "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert [s["transform"] for s in report["steps"]] == ["mask", "magnitude_prune", "grow_connections", "grow_neurons"]
    assert [s["exact"] for s in report["steps"]] == [True, False, True, True]
    assert all(s["verification"]["max_abs_diff"] <= 1e-10 for s in report["steps"] if s["exact"])
    model = growcli.load_grown(zoo.MLP(), out)
    assert model.fc1.mask.shape == (34, 16) and model.fc2.mask.shape == (24, 34)
    assert int((model.fc1.mask[:32] == 0).sum()) == 256 - 64 and int((model.fc2.mask[:, :32] == 0).sum()) == 384
    assert int(model.fc2.mask[:, 32:].sum()) > 0 and not model.fc2.weight[:, 32:].any()
