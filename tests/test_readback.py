"""Every output is verified as written (issue 11): loaded back from its temporary path the way
its user would load it, run on the verification batches and compared with the model in memory.

A fault injected into a writer (the file on disk differs from the model) exits 3 and leaves
nothing behind: no output, no report, no temporary.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import FIXTURES

import growcli.io.save as save
from growcli.core.errors import VerificationFailed
from growcli.run.runner import Output, Source, grow


def _bump(t: torch.Tensor, by: float = 1e-3) -> torch.Tensor:
    t = t.detach().clone()
    t.view(-1)[0] += by
    return t


def _first_float(state: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in state.items() if v.is_floating_point() and v.numel())


def _leftovers(directory):
    return sorted(p.name for p in directory.rglob("*"))


def test_convert_reports_what_each_output_was_loaded_with(cli, tmp_path):
    outs = [tmp_path / "m.safetensors", tmp_path / "m.pt2", tmp_path / "m.onnx"]
    r = cli("convert", FIXTURES / "mlp.pt2", *[a for o in outs for a in ("-o", o)], "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    by_format = {o["format"]: o for o in report["outputs"]}
    assert by_format["pt2"]["loaded_with"] == "torch.export.load"
    assert by_format["safetensors"]["loaded_with"].startswith("growcli.io.load.load_model")
    assert by_format["onnx"]["loaded_with"] == "onnxruntime.InferenceSession"
    for fmt, entry in by_format.items():
        rb = entry["readback"]
        assert rb["passed"], fmt
        assert entry["max_abs_diff"] == rb["max_abs_diff"]
        assert rb["outputs"] and all(o["max_abs_diff"] <= o["tolerance"] for o in rb["outputs"]), fmt
        if fmt != "onnx":  # same weights, same graph, float64
            assert rb["dtype"] == "float64" and entry["max_abs_diff"] == 0.0, fmt
    assert all(o.exists() for o in outs)
    assert not [p for p in tmp_path.iterdir() if "growcli-tmp" in p.name]
    # The written report carries the same per-output entries.
    written = json.loads((tmp_path / "m.growth_report.json").read_text())
    assert [o["loaded_with"] for o in written["outputs"]] == [o["loaded_with"] for o in report["outputs"]]


def test_hf_and_safetensors_outputs_of_a_hf_model_are_read_back(tmp_path):
    report = grow(Source(FIXTURES / "llama-tiny"), [],
                  [Output(tmp_path / "hf", "hf"), Output(tmp_path / "w.safetensors")])
    hf, st = report["outputs"]
    assert hf["loaded_with"] == "transformers.LlamaForCausalLM.from_pretrained"
    assert st["loaded_with"] == "growcli.io.load.load_model (edits replayed on llama-tiny)"
    for entry in (hf, st):
        rb = entry["readback"]
        assert rb["passed"] and rb["dtype"] == "float64" and rb["batches"] == 3
        assert entry["max_abs_diff"] == 0.0
        assert all(o["max_abs_diff"] <= o["tolerance"] for o in rb["outputs"])


def test_state_dict_safetensors_is_rebuilt_from_its_recorded_arch(tmp_path):
    report = grow(Source(FIXTURES / "cnn.safetensors", arch="growcli.zoo:cnn"), [], [Output(tmp_path / "c.safetensors")])
    (entry,) = report["outputs"]
    assert entry["loaded_with"] == "growcli.io.load.load_model (arch growcli.zoo:cnn, edits replayed)"
    assert entry["readback"]["passed"] and entry["max_abs_diff"] == 0.0


def _fails_cleanly(r, tmp_path):
    assert r.code == 3, (r.code, r.err)
    assert "verification failed" in r.err and "loaded back" in r.err
    assert _leftovers(tmp_path) == []  # no output, no report, no temporary


def test_corrupt_safetensors_is_caught(cli, tmp_path, monkeypatch):
    real = save.write_safetensors

    def corrupt(tensors, path, metadata):
        tensors = dict(tensors)
        k = _first_float(tensors)
        tensors[k] = _bump(tensors[k])
        real(tensors, path, metadata)

    monkeypatch.setattr(save, "write_safetensors", corrupt)
    # A good .pt2 output written first is not committed either.
    r = cli("convert", FIXTURES / "mlp.pt2", "-o", tmp_path / "m.pt2", "-o", tmp_path / "m.safetensors")
    _fails_cleanly(r, tmp_path)
    assert "m.safetensors" in r.err


def test_corrupt_pt2_is_caught(cli, tmp_path, monkeypatch):
    real = save.export_program

    def corrupt(gm):
        twin = dataclasses.replace(gm, module=copy.deepcopy(gm.module))
        with torch.no_grad():
            p = next(p for p in twin.module.parameters() if p.is_floating_point())
            p.view(-1)[0] += 1e-3
        return real(twin)

    monkeypatch.setattr(save, "export_program", corrupt)
    r = cli("convert", FIXTURES / "cnn.pt2", "-o", tmp_path / "c.pt2")
    _fails_cleanly(r, tmp_path)
    assert "torch.export.load" in r.err


def test_corrupt_hf_directory_is_caught(cli, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    real = save._save_hf

    def corrupt(gm, tmp, shard_size=None):
        real(gm, tmp, shard_size)
        f = tmp / "model.safetensors"
        state = load_file(str(f))
        k = _first_float(state)
        state[k] = _bump(state[k], 1e-2)
        save_file(state, str(f), metadata={"format": "pt"})

    monkeypatch.setattr(save, "_save_hf", corrupt)
    r = cli("convert", FIXTURES / "llama-tiny", "-o", tmp_path / "out", "--format", "hf")
    _fails_cleanly(r, tmp_path)
    assert "from_pretrained" in r.err


def test_unloadable_output_is_a_verification_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(save, "_save_pt2", lambda gm, tmp: tmp.write_bytes(b"not a zip"))
    with pytest.raises(VerificationFailed, match="cannot be loaded back with torch.export.load"):
        grow(Source(FIXTURES / "mlp.pt2"), [], [Output(tmp_path / "m.pt2")])
    assert _leftovers(tmp_path) == []
