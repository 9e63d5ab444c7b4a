"""``growcli verify`` and ``growcli.verification.compare.verify_models``: equal models pass, different ones fail (exit 3).

The comparison is element-wise absolute (a signed sum would let errors cancel), a NaN or
an infinity where the original has a number fails, and every output is reported.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FIXTURES
from torch import nn

import growcli
from growcli.io.load import load_model
from growcli.verification.compare import DEFAULT_TOL, compare_outputs, verify_models

MLP = "growcli.zoo:mlp"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The MLP fixture re-saved as .pt2/.onnx/.safetensors, and a copy whose fc3 bias moved by 1e-3."""
    d = tmp_path_factory.mktemp("verify")
    gm = load_model(FIXTURES / "mlp.pt", arch=MLP)
    growcli.save_model(gm, d / "copy.pt2")
    growcli.save_model(gm, d / "copy.onnx")
    growcli.save_model(gm, d / "copy.safetensors")
    with torch.no_grad():
        gm.module.fc3.bias[1] += 1e-3
    growcli.save_model(gm, d / "moved.pt2")
    torch.save({k: v.clone() for k, v in gm.module.state_dict().items()}, d / "moved.pt")
    return d


def _one_json_object(text: str) -> dict:
    assert text.count("\n") == 1 and text.endswith("\n"), text  # exactly one object, one line
    return json.loads(text)


def test_differing_models_exit_3(cli, models):
    r = cli("verify", FIXTURES / "mlp.pt2", models / "moved.pt2")
    assert r.code == 3, r.err
    assert "FAIL" in r.out and "NOT equal" in r.out

    r = cli("verify", FIXTURES / "mlp.pt2", models / "moved.pt2", "--json")
    assert r.code == 3
    data = _one_json_object(r.out)
    assert data["passed"] is False
    assert data["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)  # the bias moved by 1e-3 in float32
    [out] = data["outputs"]
    assert out["name"] == "output" and out["shape"] == [2, 4] and out["passed"] is False
    assert out["max_abs_diff"] > out["tolerance"]


def test_state_dicts_compare_with_the_originals_architecture(cli, models):
    r = cli("verify", FIXTURES / "mlp.pt", models / "moved.pt", "--arch", MLP, "--json")
    assert r.code == 3 and _one_json_object(r.out)["passed"] is False
    r = cli("verify", FIXTURES / "mlp.pt", FIXTURES / "mlp.pt", "--arch", MLP, "--json")
    assert r.code == 0 and _one_json_object(r.out)["passed"] is True


@pytest.mark.parametrize("copy", ["copy.pt2", "copy.safetensors", "copy.onnx"])
def test_model_and_its_resaved_copy_exit_0(cli, models, copy):
    r = cli("verify", FIXTURES / "mlp.pt2", models / copy, "--json")
    assert r.code == 0, r.err
    data = _one_json_object(r.out)
    assert data["passed"] is True and data["batches"] == 3
    assert data["max_abs_diff"] <= 1e-6
    assert data["dtype"] == ("float32" if copy.endswith(".onnx") else "float64")
    assert {"name", "shape", "max_abs_diff", "max_rel_diff", "tolerance", "passed"} <= set(data["outputs"][0])


def test_pt2_against_onnx(cli, models):
    r = cli("verify", models / "copy.pt2", models / "copy.onnx")
    assert r.code == 0, r.err
    assert "pass" in r.out and "equal in float32" in r.out


def test_inputs_file_is_used(cli):
    r = cli("verify", FIXTURES / "mlp.pt", FIXTURES / "mlp.safetensors", "--arch", MLP,
            "--inputs", FIXTURES / "mlp_inputs.safetensors", "--json")
    assert r.code == 0, r.err
    data = _one_json_object(r.out)
    assert data["batches"] == 1 and data["outputs"][0]["shape"] == [4, 4]


def test_tolerance_options(cli, models):
    """A 1e-3 change passes once the user allows it, and --dtype float32 is honoured."""
    r = cli("verify", FIXTURES / "mlp.pt2", models / "moved.pt2", "--atol", "2e-3", "--json")
    assert r.code == 0 and _one_json_object(r.out)["atol"] == 2e-3
    r = cli("verify", FIXTURES / "mlp.pt2", models / "copy.pt2", "--dtype", "float32", "--batches", "2", "--json")
    data = _one_json_object(r.out)
    assert r.code == 0 and data["dtype"] == "float32" and data["batches"] == 2


# --- verify_models on its own ----------------------------------------------------------------

class Fixed(nn.Module):
    """Returns ``x`` plus a fixed tensor (whose dtype follows the model's, as a buffer)."""

    def __init__(self, offset: torch.Tensor):
        super().__init__()
        self.register_buffer("offset", offset.clone())

    def forward(self, x):
        return x + self.offset


BATCH = [((torch.zeros(1, 4),), {})]


def test_errors_of_opposite_sign_do_not_cancel():
    """+d and -d in one output sum to 0; an element-wise check still sees d."""
    d = 1e-3
    report = verify_models(Fixed(torch.zeros(4)), Fixed(torch.tensor([d, -d, 0.0, 0.0])), BATCH)
    assert not report.passed
    assert report.max_abs_diff == pytest.approx(d)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_the_grown_output_fails(bad):
    report = verify_models(Fixed(torch.zeros(4)), Fixed(torch.tensor([0.0, bad, 0.0, 0.0])), BATCH)
    assert not report.passed and report.max_abs_diff == math.inf
    assert json.dumps(report.to_dict())  # inf is reported as a string, the JSON stays valid
    assert report.to_dict()["max_abs_diff"] == "inf"


def test_nan_in_the_original_only_fails():
    report = verify_models(Fixed(torch.tensor([math.nan, 0.0, 0.0, 0.0])), Fixed(torch.zeros(4)), BATCH)
    assert not report.passed


def test_identical_non_finite_values_are_equal():
    """The same NaN/inf in both outputs is the same function, not a difference."""
    offset = torch.tensor([math.nan, math.inf, -math.inf, 1.0])
    report = verify_models(Fixed(offset), Fixed(offset), BATCH)
    assert report.passed and report.max_abs_diff == 0.0


def test_tolerance_is_atol_plus_rtol_times_output_scale():
    ref = Fixed(torch.tensor([100.0, 0.0, 0.0, 0.0]))
    tol = 1e-6 + 1e-5 * 100.0
    just_in = verify_models(ref, Fixed(torch.tensor([100.0, 0.9 * tol, 0.0, 0.0])), BATCH, atol=1e-6, rtol=1e-5)
    just_out = verify_models(ref, Fixed(torch.tensor([100.0, 1.1 * tol, 0.0, 0.0])), BATCH, atol=1e-6, rtol=1e-5)
    assert just_in.passed and not just_out.passed
    assert just_out.outputs[0].tolerance == pytest.approx(tol)
    assert just_out.outputs[0].max_rel_diff == pytest.approx(1.1 * tol / 100.0)


def test_float64_defaults_are_tight():
    atol, rtol = DEFAULT_TOL[torch.float64]
    assert atol <= 1e-10 and rtol <= 1e-10
    a = nn.Linear(4, 3).double()
    b = nn.Linear(4, 3).double()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.bias[0] += 1e-9  # invisible in float32, caught in float64
    report = verify_models(a, b, [((torch.randn(2, 4, dtype=torch.float64),), {})])
    assert report.dtype == "float64" and not report.passed


def test_worst_batch_decides():
    checks = {}
    compare_outputs({"y": torch.zeros(3)}, {"y": torch.tensor([0.0, 1e-3, 0.0])}, 1e-6, 0.0, checks)
    compare_outputs({"y": torch.zeros(3)}, {"y": torch.zeros(3)}, 1e-6, 0.0, checks)
    assert checks["y"].max_abs_diff == pytest.approx(1e-3) and not checks["y"].passed


def test_missing_extra_and_reshaped_outputs_fail_with_a_note():
    checks = compare_outputs({"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(2)},
                             {"a": torch.zeros(2), "b": torch.zeros(3), "d": torch.zeros(2)}, 1e-6, 1e-5)
    assert checks["a"].passed
    assert not checks["b"].passed and "shape [2] vs [3]" in checks["b"].note
    assert not checks["c"].passed and "missing from the grown model" in checks["c"].note
    assert not checks["d"].passed and "not in the original model" in checks["d"].note


class Float32Only(nn.Module):
    """Holds its weight as a plain attribute, so ``.double()`` cannot convert it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return (x @ self.w) * self.scale


def test_falls_back_to_float32_and_says_so():
    m = Float32Only()
    report = verify_models(m, m, [((torch.randn(2, 4),), {})])
    assert report.passed and report.dtype == "float32"
    assert "float64 not supported" in report.note


def test_a_model_that_returns_nothing_does_not_pass():
    class Nothing(nn.Module):
        def forward(self, x):
            return None

    report = verify_models(Nothing(), Nothing(), BATCH)
    assert not report.passed and "no tensors" in report.note


def test_verify_leaves_the_models_untouched():
    a = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    report = verify_models(a, a, BATCH)
    assert report.passed  # eval mode: dropout off, so the same model equals itself
    assert a.training and a[0].weight.dtype == torch.float32
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())


def test_module_edits_are_not_replayed_onto_a_pt2_program(cli, tmp_path):
    # grown from the eager module (a deepen inserts a module): its original is cnn.pt, not cnn.pt2
    grown = tmp_path / "cnn.safetensors"
    plan = FIXTURES.parent / "examples" / "cnn.yaml"
    assert cli("grow", FIXTURES / "cnn.pt", "--arch", "growcli.zoo:cnn", "--plan", plan, "-o", grown).code == 0
    r = cli("verify", FIXTURES / "cnn.pt2", grown)
    assert r.code == 2 and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    assert "cannot be replayed onto the torch.export program cnn.pt2" in r.err
    ok = cli("verify", FIXTURES / "cnn.pt", grown, "--arch", "growcli.zoo:cnn")
    assert ok.code == 0, ok.err


def test_verification_on_a_named_device_moves_models_and_batches_and_compares_on_the_cpu():
    """``device=`` runs both models there (here the CPU named explicitly, which takes the moving path) and
    gives the same report as the default."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b[2].bias += 1e-3
    batches = [((torch.randn(3, 4),), {}) for _ in range(2)]
    here = verify_models(a, b, batches)
    moved = verify_models(a, b, batches, device=torch.device("cpu"))
    assert not here.passed and not moved.passed
    assert moved.max_abs_diff == here.max_abs_diff and abs(moved.max_abs_diff - 1e-3) < 1e-7  # float32 bias + 1e-3
    assert a[0].weight.device.type == "cpu"  # the models given are not moved: verification works on copies


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_usage_error(cli):
    r = cli("verify", FIXTURES / "mlp.pt2", FIXTURES / "mlp.pt2", "--device", "cuda")
    assert r.code == 2 and r.err.startswith("growcli: usage: --device cuda: torch finds no CUDA device")
    r = cli("verify", FIXTURES / "mlp.pt2", FIXTURES / "mlp.pt2", "--device", "tpu")
    assert r.code == 2 and "--device 'tpu': expected cpu or cuda" in r.err
    r = cli("verify", FIXTURES / "mlp.pt2", FIXTURES / "mlp.pt2", "--device", "cpu", "--json")
    assert r.code == 0 and json.loads(r.out)["passed"]
