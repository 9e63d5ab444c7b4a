"""widen --init gradmax: exact growth whose new units get the largest incoming gradient.

Every case builds a real float64 model with random weights and real calibration data, widens
one layer through the registered transform (verified in float64 by the pipeline), and then
measures independently: the function is unchanged to 1e-10, the new incoming weights are
zero but get a non-zero gradient on the calibration batch, that gradient is exactly
``φ'·W_newᵀ M``, and it is at least as large as with random unit-norm outgoing weights.
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

from growcli import zoo
from growcli.analysis.calibration import from_tensors
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context
from growcli.transforms.catalog import build_spec


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 16), nn.Linear(16, 10), nn.Linear(10, 4)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class GeluCNN(nn.Module):
    """conv → BatchNorm → GELU → strided padded conv: patches on both sides of M."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.fc = nn.Conv2d(6, 5, 3, padding=1, stride=2), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.gelu(self.bn(self.c1(x))))).mean((2, 3)))


class ReluValidCNN(nn.Module):
    """ReLU between two convs, the consumer unpadded: the ReLU shift is compensated in its bias."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


class SigmoidMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=24, max_position_embeddings=16, num_labels=3))


def build(name: str):
    """(float64 eval module, calibration tensors) for a case; targets are integer classes."""
    torch.manual_seed(0)
    n = 24
    if name == "hf:bert":
        m = _bert()
        return m.double().eval(), {"input_ids": torch.randint(0, 50, (n, 8)), "labels": torch.randint(0, 3, (n,))}
    m = {"zoo:MLP": zoo.MLP, "GeluMLP": GeluMLP, "GeluCNN": GeluCNN, "ReluValidCNN": ReluValidCNN,
         "SigmoidMLP": SigmoidMLP, "zoo:SmallCNN": zoo.SmallCNN, "zoo:ResNetTiny": zoo.ResNetTiny}[name]()
    for mod in m.modules():  # non-trivial statistics, so the new channels' own values matter
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    first = next(p for p in m.parameters() if p.dim() > 1)
    shape = (n, 3, 8, 8) if first.dim() == 4 else (n, first.shape[1])
    if name in ("zoo:SmallCNN", "zoo:ResNetTiny"):
        shape = (n, 3, 16, 16)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        classes = m.double()(x).shape[-1]
    return m.eval(), {"input": x, "target": torch.randint(0, classes, (n,))}


def grow_model(name: str, layer: str, options: dict, seed: int = 1):
    """Widen ``layer`` of case ``name`` with gradmax; returns (before, gm, report, calibration tensors)."""
    module, tensors = build(name)
    args = (tensors["input"][:2],) if "input" in tensors else ()
    kwargs = {} if "input" in tensors else {"input_ids": tensors["input_ids"][:2]}
    gm = GrowModel(copy.deepcopy(module), "state_dict", Path("mem"), "0", spec_from_batch((args, kwargs)))
    ctx = Context(seed=seed)
    ctx.data["calib"] = from_tensors(tensors, gm.inputs, batch_size=len(next(iter(tensors.values()))))
    report = run_step(gm, "widen", {"layer": layer, "init": "gradmax", "data": "calib", **options}, ctx,
                      VerifySettings(batches=2))
    return module, gm, report, tensors


def first_batch_loss(model: nn.Module, tensors: dict) -> torch.Tensor:
    if "input" in tensors:
        return F.cross_entropy(model(tensors["input"]), tensors["target"])
    return model(input_ids=tensors["input_ids"], labels=tensors["labels"]).loss


# (case, layer, options, consumer, activation slope φ' at the new units)
CASES = [
    ("zoo:MLP", "fc1", {"by": 4}, "fc2", 1.0),  # ReLU: shifted by ε, compensated in fc2.bias
    ("GeluMLP", "fc1", {"by": 5}, "fc2", 0.5),
    ("GeluMLP", "fc2", {"to": 13}, "fc3", 0.5),  # fc3 has 4 outputs, but cross-entropy's δ spans only 3
    ("GeluCNN", "c1", {"by": 3}, "c2", 0.5),  # BatchNorm between, strided padded consumer
    ("ReluValidCNN", "c1", {"by": 3}, "c2", 1.0),  # ReLU shift compensated in a conv's bias
    ("hf:bert", "bert.encoder.layer.0.intermediate.dense", {"by": 4}, "bert.encoder.layer.0.output.dense", 0.5),
]
IDS = [f"{c[0]}-{c[1].rsplit('.', 2)[-2] if 'bert' in c[1] else c[1]}" for c in CASES]


@pytest.fixture(scope="module")
def grown():
    cache = {}

    def get(i):
        if i not in cache:
            case, layer, options, _, _ = CASES[i]
            cache[i] = grow_model(case, layer, options)
        return cache[i]

    return get


def _params(model: nn.Module, layer: str):
    return model.get_submodule(layer).weight


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_gradmax_widening_is_exact_in_float64(grown, i):
    case, layer, options, consumer, _ = CASES[i]
    before, gm, report, tensors = grown(i)
    assert report.exact and report.verification["passed"]
    batch = {"input": tensors["input"]} if "input" in tensors else {"input_ids": tensors["input_ids"]}
    with torch.no_grad():
        a, b = before(**{k: v for k, v in batch.items() if k != "input"}) if "input" not in batch else before(batch["input"]), \
            gm.module(**batch) if "input" not in batch else gm.module(batch["input"])
    a = a.logits if hasattr(a, "logits") else a
    b = b.logits if hasattr(b, "logits") else b
    rel = float((a - b).abs().max() / a.abs().max())
    assert rel <= 1e-10, rel
    old = _params(before, layer).shape[0]
    new_w = _params(gm.module, layer)
    assert new_w.shape[0] > old
    assert torch.count_nonzero(new_w[old:]) == 0  # zero incoming weights
    out_cols = _params(gm.module, consumer)[:, old:].detach().transpose(0, 1).reshape(new_w.shape[0] - old, -1)
    old_cols = _params(before, consumer).detach().transpose(0, 1).reshape(old, -1)
    torch.testing.assert_close(out_cols.norm(dim=1), torch.full((len(out_cols),), 0.5 * float(old_cols.norm(dim=1).mean()),
                                                               dtype=torch.float64), rtol=1e-9, atol=0)


def measured_m(model: nn.Module, layer: str, consumer: str, unit: int, tensors: dict) -> torch.Tensor:
    """``φ'·M`` measured by autograd alone: row ``j`` is the incoming gradient of new unit ``unit``
    when its outgoing weights are the ``j``-th one-hot vector (independent of growcli's patches)."""
    w_out, b_out = _params(model, consumer), model.get_submodule(consumer).bias
    # The unit outputs a constant: its bias (ε for ReLU units, else 0); moving its outgoing weights
    # moves the consumer's output by a constant, taken off the consumer's bias as growcli does.
    const = float(model.get_submodule(layer).bias[unit])
    saved_w, saved_b = w_out[:, unit].detach().clone(), b_out.detach().clone() if b_out is not None else None
    rows = []
    for j in range(saved_w.numel()):
        with torch.no_grad():
            w_out[:, unit] = torch.nn.functional.one_hot(torch.tensor(j), saved_w.numel()).view(saved_w.shape).double()
            if const:
                b_out.copy_(saved_b - (w_out[:, unit] - saved_w).reshape(len(saved_b), -1).sum(1) * const)
        (g,) = torch.autograd.grad(first_batch_loss(model, tensors), _params(model, layer))
        rows.append(g[unit].flatten())
    with torch.no_grad():
        w_out[:, unit] = saved_w
        if saved_b is not None:
            b_out.copy_(saved_b)
    return torch.stack(rows)


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_new_incoming_weights_get_the_gradmax_gradient(grown, i):
    """Non-zero gradient on the first batch, equal to ``W_newᵀ·φ'M`` with ``W_new`` the top singular
    vectors (so each unit's is ``r·σ_i``), and at least that of random unit-norm outgoing weights."""
    case, layer, options, consumer, _ = CASES[i]
    before, gm, report, tensors = grown(i)
    old = _params(before, layer).shape[0]
    w = _params(gm.module, layer)
    (g,) = torch.autograd.grad(first_batch_loss(gm.module, tensors), w)
    k = len(g) - old
    g_new = g[old:].reshape(k, -1)
    per_unit = g_new.norm(dim=1)
    assert bool((per_unit > 0).all()), per_unit
    m = measured_m(gm.module, layer, consumer, old, tensors)  # [rows, fan-in], φ' included
    cols = _params(gm.module, consumer)[:, old:].detach().transpose(0, 1).reshape(k, -1)
    torch.testing.assert_close(g_new, cols @ m, rtol=1e-9, atol=1e-14 * float(g_new.abs().max()))
    radius = float(cols.norm(dim=1)[0])
    sigma = torch.linalg.svdvals(m)[:k]
    torch.testing.assert_close(per_unit, radius * sigma, rtol=1e-8, atol=1e-12 * float(per_unit.max()))
    gradmax_norm = float(per_unit.pow(2).sum())
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):  # random orthonormal outgoing weights of the same length, on the same data
        rnd = torch.linalg.qr(torch.randn(cols.shape[1], k, generator=gen, dtype=torch.float64))[0].T * radius
        assert gradmax_norm >= float((rnd @ m).pow(2).sum()) * (1 - 1e-12)
        one = rnd[0]  # and the first unit against any single unit-norm direction
        assert float(per_unit[0]) >= float((one @ m).norm()) * (1 - 1e-12)


def test_relu_units_get_a_compensated_bias():
    before, gm, report, tensors = grow_model("zoo:MLP", "fc1", {"by": 4})
    eps = gm.module.fc1.bias[32:].detach()
    assert bool((eps > 0).all()) and torch.unique(eps).numel() == 1
    shift = gm.module.fc2.bias.detach() - before.fc2.bias.detach()
    torch.testing.assert_close(shift, -(gm.module.fc2.weight[:, 32:].detach() @ eps), rtol=1e-12, atol=1e-15)
    assert any("ReLU" in n and "fc2.bias" in n for n in report.notes)


def test_batch_norm_of_new_channels_is_the_identity():
    _, gm, _, _ = grow_model("GeluCNN", "c1", {"by": 3})
    bn = gm.module.bn
    assert bn.num_features == 9 and gm.module.c1.out_channels == 9 and gm.module.c2.in_channels == 9
    torch.testing.assert_close(bn.running_mean[6:], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(bn.running_var[6:], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(bn.weight[6:].detach(), torch.full((3,), (1 + bn.eps) ** 0.5, dtype=torch.float64))


REFUSALS = [
    ("SigmoidMLP", "fc1", {"by": 2}, "maps 0 to 0.5"),
    ("zoo:ResNetTiny", "layer1.0.conv1", {"by": 2}, "has none"),  # ReLU, consumer conv without bias
    ("zoo:ResNetTiny", "stem", {"by": 2}, "single producer"),  # residual sum
    ("zoo:SmallCNN", "conv1", {"by": 2}, "max_pool2d"),
    ("zoo:SmallCNN", "conv2", {"by": 2}, "flatten"),
    ("GeluMLP", "fc2", {"by": 5}, "at most 4 units"),  # M has 4 rows (fc3's outputs)
]


@pytest.mark.parametrize("case,layer,options,reason", REFUSALS, ids=[f"{r[0]}-{r[1]}" for r in REFUSALS])
def test_gradmax_refuses_with_the_reason(case, layer, options, reason):
    with pytest.raises(NotGrowableError, match=reason):
        grow_model(case, layer, options)


def test_relu_before_a_padded_conv_is_refused():
    class PaddedRelu(ReluValidCNN):
        def __init__(self):
            super().__init__()
            self.c2 = nn.Conv2d(6, 5, 3, padding=1)

    module = PaddedRelu().double().eval()
    gm = GrowModel(module, "state_dict", Path("mem"), "0", spec_from_batch(((torch.randn(2, 3, 8, 8, dtype=torch.float64),), {})))
    ctx = Context()
    ctx.data["calib"] = from_tensors({"input": torch.randn(8, 3, 8, 8), "target": torch.randint(0, 4, (8,))}, gm.inputs)
    with pytest.raises(NotGrowableError, match="zero-pads its input"):
        run_step(gm, "widen", {"layer": "c1", "by": 2, "init": "gradmax", "data": "calib"}, ctx, VerifySettings())


@pytest.mark.parametrize("options,message", [
    ({"layer": "fc1", "by": 2, "init": "gradmax"}, "needs calibration data"),
    ({"layer": "fc1", "by": 2, "data": "x.safetensors"}, "only by init gradmax"),
    ({"layer": "fc1", "by": 2, "init": "gradmax", "data": "x", "noise": 0.1}, "noise"),
    ({"layer": "fc1", "by": 2, "init": "gradmax", "data": "x", "scale": 0}, "scale must be positive"),
    ({"layer": "fc1", "by": 2, "init": "gradmax", "data": "x", "loss": "hinge"}, "loss"),
])
def test_gradmax_options_are_validated(options, message):
    with pytest.raises(UsageError, match=message):
        build_spec("widen", options)


def test_data_not_loaded_is_a_clear_error():
    module = zoo.MLP().eval()
    gm = GrowModel(module, "state_dict", Path("mem"), "0", spec_from_batch(((torch.randn(2, 16),), {})))
    with pytest.raises(UsageError, match="was not loaded"):
        run_step(gm, "widen", {"layer": "fc1", "by": 2, "init": "gradmax", "data": "nowhere"}, Context(), VerifySettings())


# ---------------------------------------------------------------- through the CLI, plans and formats
@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 16, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    save_file({"input": x, "target": y}, str(d / "good.safetensors"))
    torch.save({"0": x, "target": y}, d / "good.pt")
    save_file({"x": x, "target": y}, str(d / "no_input.safetensors"))
    save_file({"input": x}, str(d / "no_target.safetensors"))
    save_file({"input": x[:, :15].contiguous(), "target": y}, str(d / "wrong_shape.safetensors"))
    save_file({"input": x, "target": y[:30]}, str(d / "wrong_count.safetensors"))
    save_file({"input": x, "target": y + 4}, str(d / "bad_class.safetensors"))
    save_file({"input": x, "target": torch.randn(40, 3)}, str(d / "mse_shape.safetensors"))
    save_file({"input": x, "target": y.float()}, str(d / "float_target.safetensors"))
    (d / "garbage.safetensors").write_bytes(b"not a safetensors file")
    return d


def test_cli_gradmax_widen_writes_a_verified_reloadable_model(cli, tmp_path, calib_dir):
    import growcli

    out = tmp_path / "mlp.safetensors"
    r = cli("widen", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--layer", "fc1", "--by", "6", "--init", "gradmax",
            "--data", calib_dir / "good.safetensors", "--batch-size", "16", "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verification"]["passed"] and report["steps"][0]["spec"]["init"] == "gradmax"
    assert any("40 samples" in n and "3 batches" in n for n in report["steps"][0]["notes"])
    model = growcli.load_grown(zoo.MLP(), out)
    assert model.fc1.out_features == 38 and model.fc2.in_features == 38
    assert cli("verify", FIXTURES / "mlp.pt", out, "--arch", "growcli.zoo:mlp").code == 0


def test_cli_gradmax_on_a_pt2_program_uses_its_batch_size(cli, tmp_path, calib_dir):
    r = cli("widen", FIXTURES / "mlp.pt2", "--layer", "fc2", "--by", "3", "--init", "gradmax", "--data",
            calib_dir / "good.pt", "-o", tmp_path / "m.pt2", "--json")
    assert r.code == 0, r.err
    assert any("in 20 batches" in n for n in json.loads(r.out)["steps"][0]["notes"])  # fixed batch of 2


def test_same_seed_and_data_give_byte_identical_output(cli, tmp_path, calib_dir):
    outs = []
    for i in range(2):
        path = tmp_path / f"r{i}.safetensors"
        assert cli("widen", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--layer", "fc1", "--by", "4",
                   "--init", "gradmax", "--data", calib_dir / "good.safetensors", "-o", path).code == 0
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]


def test_plan_with_a_gradmax_step_runs_and_previews(cli, tmp_path, calib_dir, monkeypatch):
    monkeypatch.chdir(calib_dir)  # data paths in a plan are relative to the current directory
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nsteps:\n  - widen: {layer: fc1, by: 4, init: gradmax, data: good.safetensors, scale: 0.25}\n"
                    "  - widen: {layer: fc2, by: 2, init: gradmax, data: good.safetensors, loss: cross_entropy}\n")
    r = cli("grow", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--plan", plan, "-o", tmp_path / "g.safetensors", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["function_preserving"] and report["params_after"] == 1436 + 4 * 16 + 4 + 4 * 24 + 2 * 36 + 2 + 2 * 4
    d = cli("grow", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--plan", plan, "--dry-run", "--json")
    assert d.code == 0, d.err
    assert all(s["error"] is None and s["exact"] for s in json.loads(d.out)["steps"])


BAD_DATA = [
    ("missing.safetensors", "not found"),
    ("garbage.safetensors", "garbage.safetensors"),
    ("no_input.safetensors", "missing the model's input 'input'"),
    ("no_target.safetensors", "no 'target' tensor"),
    ("wrong_shape.safetensors", "'input' has shape [40, 15]; the model expects [batch, 16]"),
    ("wrong_count.safetensors", "'target' has 30 samples"),
    ("bad_class.safetensors", "holds class 7 but the model outputs 4 classes"),
    ("mse_shape.safetensors", "mse needs them equal"),
]


@pytest.mark.parametrize("name,message", BAD_DATA, ids=[b[0].split(".")[0] for b in BAD_DATA])
def test_bad_data_file_is_one_clear_line_and_exit_1(cli, tmp_path, calib_dir, name, message):
    out = tmp_path / "never.safetensors"
    r = cli("widen", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--layer", "fc1", "--by", "2", "--init", "gradmax",
            "--data", calib_dir / name, "-o", out)
    assert r.code == 1, r.err
    assert r.err.count("\n") == 1 and message in r.err, r.err
    assert not out.exists()


def test_float_target_with_cross_entropy_is_refused(cli, tmp_path, calib_dir):
    r = cli("widen", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--layer", "fc1", "--by", "2", "--init", "gradmax",
            "--data", calib_dir / "float_target.safetensors", "--loss", "cross_entropy", "-o", tmp_path / "x.safetensors")
    assert r.code == 1 and "integer class indices" in r.err and r.err.count("\n") == 1
