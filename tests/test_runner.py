"""The runner: how a conversion is verified, how the execution mode is chosen, and transactional saves.

A conversion (no step) has nothing to compare in memory: its verification is the read-back
of the first output from disk run against the input model as loaded, and the report says so.
A writer (growcli's own function) that perturbs one weight is caught, whatever the flags,
and leaves nothing behind. The Python API's saves commit all outputs or none.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES

import growcli
import growcli.io.save as save
from growcli.api import save_models
from growcli.core.errors import OutputError, UsageError, VerificationFailed
from growcli.io.formats import safetensors_metadata
from growcli.run.runner import Output, Source, Step, execution_mode, grow
from growcli.run.steps import VerifySettings


def _bump_first_float(tensors: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    tensors = dict(tensors)
    k = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel())
    t = tensors[k].clone()
    t.view(-1)[0] += by
    tensors[k] = t
    return tensors


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.rglob("*"))


def test_convert_verification_is_the_readback_of_the_first_output(tmp_path):
    a, b = tmp_path / "m.safetensors", tmp_path / "m.pt2"
    report = grow(Source(FIXTURES / "mlp.pt2"), [], [Output(a), Output(b)])
    v = report["verification"]
    first = report["outputs"][0]
    assert v["against"] == f"readback of {a}"
    assert {k: x for k, x in v.items() if k != "against"} == first["readback"]
    assert v["passed"] and v["dtype"] == "float64" and v["batches"] == 3
    assert v["outputs"] and v["outputs"][0]["scale"] > 0 and v["max_abs_diff"] == 0.0
    assert "growcli.io.load.load_model" in v["note"]  # what loaded it back, not a model compared with itself
    assert report["steps"] == [] and report["execution"] == "memory"
    assert [c.split(" with ")[0] for c in report["checked"]] == [f"read back {a}", f"read back {b}"]
    written = json.loads((tmp_path / "m.growth_report.json").read_text())
    assert written["verification"] == v


@pytest.mark.parametrize("allow_mismatch", [False, True])
def test_convert_catches_a_writer_that_perturbs_one_weight(tmp_path, monkeypatch, allow_mismatch):
    real = save.write_safetensors
    monkeypatch.setattr(save, "write_safetensors", lambda t, path, meta: real(_bump_first_float(t, 1e-3), path, meta))
    with pytest.raises(VerificationFailed, match="m.safetensors: the written file, loaded back with") as info:
        grow(Source(FIXTURES / "mlp.pt2"), [], [Output(tmp_path / "m.pt2"), Output(tmp_path / "m.safetensors")],
             settings=VerifySettings(allow_mismatch=allow_mismatch))
    assert info.value.report.max_abs_diff > 1e-6 and not info.value.report.passed
    assert _leftovers(tmp_path) == []  # the good .pt2 written first is not committed either


def test_a_growth_step_keeps_its_own_verification(tmp_path):
    report = grow(Source(FIXTURES / "mlp.pt2"), [Step("widen", {"layer": "fc1", "to": 40})],
                  [Output(tmp_path / "w.safetensors")])
    assert report["verification"]["against"] == "the model before step 1 (the input), in memory"
    step = report["steps"][0]["verification"]
    assert {k: x for k, x in report["verification"].items() if k != "against"} == step
    assert report["checked"][0].startswith("step 1 (widen): ran the model before and after the step: equal")
    # The safetensors metadata records that verification.
    assert json.loads(safetensors_metadata(tmp_path / "w.safetensors")["growcli.verification"]) == step


def test_execution_mode_follows_transform_modes(tmp_path):
    src = Source(FIXTURES / "llama-tiny")
    out = [Output(tmp_path / "o")]
    assert execution_mode(src, [Step("stack", {})], out, None) == "memory"  # small: in memory
    assert execution_mode(src, [Step("stack", {})], out, True) == "streaming"
    assert execution_mode(src, [Step("stack", {})], out, False) == "memory"
    assert execution_mode(src, [Step("widen", {})], out, None) == "memory"
    with pytest.raises(UsageError, match=r"^--streaming: branch cannot run streaming \(its execution modes: memory\)"):
        execution_mode(src, [Step("stack", {}), Step("branch", {})], out, True)
    with pytest.raises(UsageError, match=r"^--streaming: deepen cannot run streaming with these options \(deepen streams "
                                         r"only block copies: block: true\) in step 2 of 2; drop --streaming$"):
        execution_mode(src, [Step("stack", {}), Step("deepen", {})], out, True)
    # a chain whose steps all stream streams as one (growcli.run.stream_chain)
    assert execution_mode(src, [Step("stack", {}), Step("deepen", {"after": "x", "block": True})], out, True) == "streaming"
    # deepen streams only block copies: a layer insertion stays in memory unless streaming is forced
    assert execution_mode(src, [Step("deepen", {"after": "x"})], out, None) == "memory"
    with pytest.raises(UsageError, match="--streaming needs a Hugging Face directory"):
        execution_mode(src, [Step("stack", {})], [Output(tmp_path / "o.safetensors")], True)


def test_api_save_models_commits_all_or_nothing(tmp_path):
    gm = growcli.load_model(FIXTURES / "mlp.pt2")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    with pytest.raises(OutputError, match="cannot write here"):
        save_models(gm, [(tmp_path / "good.safetensors", None, None), (tmp_path / "good.pt2", None, None),
                                     (blocker / "bad.pt2", None, None)])
    assert _leftovers(tmp_path) == ["a-file"]
    assert blocker.read_text() == "not a directory\n"
    entries = save_models(gm, [(tmp_path / "good.safetensors", None, None), (tmp_path / "good.pt2", None, None)])
    assert [e["max_abs_diff"] for e in entries] == [0.0, 0.0]
    assert _leftovers(tmp_path) == ["a-file", "good.pt2", "good.safetensors"]


def test_api_save_model_leaves_nothing_when_the_readback_fails(tmp_path, monkeypatch):
    gm = growcli.load_model(FIXTURES / "mlp.pt2")
    real = save.write_safetensors
    monkeypatch.setattr(save, "write_safetensors", lambda t, path, meta: real(_bump_first_float(t, 1e-2), path, meta))
    with pytest.raises(VerificationFailed, match="differs from the model in memory"):
        growcli.save_model(gm, tmp_path / "sub" / "m.safetensors")
    assert _leftovers(tmp_path) == []  # the directory made for it is gone too


def test_api_save_models_refuses_two_outputs_at_one_path(tmp_path):
    gm = growcli.load_model(FIXTURES / "mlp.pt2")
    with pytest.raises(UsageError, match="give each output its own path"):
        save_models(gm, [(tmp_path / "m.pt2", None, None), (tmp_path / "m.pt2", None, None)])
    assert _leftovers(tmp_path) == []
