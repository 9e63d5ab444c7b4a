"""Output paths never destroy data (issue 11, part 2).

An output that is, contains or lies inside an input, or that already exists, is refused
before any work (exit 2, one line) with every file byte-identical; ``--overwrite`` replaces
only files and directories growcli wrote. A failure leaves no file at any final path and
no temporary behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import save_file

DEAD_PID = 4_194_304 + 4242  # above Linux's largest pid_max: never a running process


def snapshot(root: Path) -> dict[str, str]:
    """Every file and symlink under ``root`` (hidden ones too) → its sha256 (or link target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def models(tmp_path):
    """tmp_path/models/llama: a copy of fixtures/llama-tiny, with a neighbour file in models/."""
    d = tmp_path / "models"
    shutil.copytree(FIXTURES / "llama-tiny", d / "llama")
    (d / "notes.txt").write_text("keep me\n")
    return d


def refused(r, words: str) -> None:
    assert r.code == 2, r.err
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("growcli: usage: ") and words in lines[0], r.err
    assert r.out == "" and "Traceback" not in r.err


@pytest.mark.parametrize("argv", [
    ["stack", "{llama}", "--factor", "2", "-o", "{models}"],
    ["stack", "{llama}", "--factor", "2", "-o", "{models}/"],
    ["stack", "{llama}", "--factor", "2", "--streaming", "-o", "{models}"],
    ["stack", "{llama}", "--factor", "2", "--overwrite", "-o", "{models}"],
    ["widen", "{llama}", "--hidden", "2x", "-o", "{models}"],
    ["convert", "{llama}", "-o", "{tmp}"],
], ids=["stack", "stack-slash", "stack-streaming", "stack-overwrite", "widen", "convert-grandparent"])
def test_output_containing_the_input_is_refused(cli, models, tmp_path, argv):
    before = snapshot(tmp_path)
    r = cli(*[a.format(llama=models / "llama", models=models, tmp=tmp_path) for a in argv])
    refused(r, "would contain the input")
    assert snapshot(tmp_path) == before


def test_existing_non_empty_directory_is_refused(cli, models, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"\x00" * 100)
    before = snapshot(tmp_path)
    r = cli("stack", models / "llama", "--factor", "2", "-o", other)
    refused(r, "exists and is not empty")
    r = cli("stack", models / "llama", "--factor", "2", "--streaming", "-o", other)
    refused(r, "exists and is not empty")
    # --overwrite replaces growcli's own directories only.
    r = cli("stack", models / "llama", "--factor", "2", "--overwrite", "-o", other)
    refused(r, "not written by growcli")
    assert snapshot(tmp_path) == before


def test_symlink_to_the_input_is_refused(cli, models, tmp_path):
    (tmp_path / "link").symlink_to(models / "llama")
    shutil.copy(FIXTURES / "mlp.pt2", tmp_path / "mlp.pt2")
    (tmp_path / "link.pt2").symlink_to(tmp_path / "mlp.pt2")
    before = snapshot(tmp_path)
    refused(cli("stack", models / "llama", "--factor", "2", "-o", tmp_path / "link"), "is the input")
    refused(cli("stack", models / "llama", "--factor", "2", "--overwrite", "-o", tmp_path / "link"), "is the input")
    refused(cli("convert", tmp_path / "mlp.pt2", "--overwrite", "-o", tmp_path / "link.pt2"), "is the input")
    refused(cli("convert", tmp_path / "link.pt2", "-o", tmp_path / "mlp.pt2"), "is the input")
    assert snapshot(tmp_path) == before


def _calibration(path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    save_file({"input": torch.randn(10, 16, generator=gen), "target": torch.randint(0, 4, (10,), generator=gen)},
              str(path))


def test_plan_out_never_replaces_the_model_or_the_data(cli, tmp_path):
    model = tmp_path / "mlp.pt2"
    shutil.copy(FIXTURES / "mlp.pt2", model)
    data = tmp_path / "calib.safetensors"
    _calibration(data)
    (tmp_path / "plan.yaml").write_text("mine\n")
    (tmp_path / "plans").mkdir()
    before = snapshot(tmp_path)
    refused(cli("suggest", model, "--data", data, "--plan-out", model), "is the input")
    refused(cli("suggest", model, "--data", data, "--plan-out", model, "--overwrite"), "is the input")
    refused(cli("suggest", model, "--data", data, "--plan-out", data), "is the input")
    refused(cli("suggest", model, "--data", data, "--plan-out", tmp_path / "plan.yaml"), "--overwrite")
    refused(cli("suggest", model, "--data", data, "--plan-out", tmp_path / "plans"), "is a directory")
    assert snapshot(tmp_path) == before
    r = cli("suggest", model, "--data", data, "--budget", "4", "--plan-out", tmp_path / "plan.yaml", "--overwrite")
    assert r.code == 0, r.err
    assert (tmp_path / "plan.yaml").read_text() != "mine\n"


def test_overwrite_replaces_a_growcli_output_directory(cli, models, tmp_path):
    out = tmp_path / "grown"
    r = cli("stack", models / "llama", "--factor", "2", "-o", out)
    assert r.code == 0, r.err
    first = snapshot(out)
    assert json.loads((out / "growth_report.json").read_text())["params_after"] > 0
    before = snapshot(tmp_path)
    refused(cli("stack", models / "llama", "--factor", "2", "-o", out), "--overwrite")
    assert snapshot(tmp_path) == before
    r = cli("stack", models / "llama", "--to", "3", "--overwrite", "-o", out)
    assert r.code == 0, r.err
    assert snapshot(out) != first and json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grown", "models"]  # no temporaries or old copies
    assert snapshot(models) == {k[len("models/"):]: v for k, v in before.items() if k.startswith("models/")}


def test_existing_file_needs_overwrite(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"not a model")
    before = snapshot(tmp_path)
    refused(cli("convert", FIXTURES / "mlp.pt2", "-o", out), "exists")
    assert snapshot(tmp_path) == before
    # The report beside the file follows the same rule.
    out.unlink()
    (tmp_path / "m.growth_report.json").write_text("{}")
    refused(cli("convert", FIXTURES / "mlp.pt2", "-o", out), "m.growth_report.json: exists")
    assert not out.exists()
    r = cli("convert", FIXTURES / "mlp.pt2", "-o", out, "--overwrite")
    assert r.code == 0, r.err
    assert out.stat().st_size > 100 and json.loads((tmp_path / "m.growth_report.json").read_text())["outputs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.growth_report.json", "m.safetensors"]


def test_same_output_twice_is_refused(cli, tmp_path):
    refused(cli("convert", FIXTURES / "mlp.pt2", "-o", tmp_path / "a.safetensors", "-o", tmp_path / "a.safetensors"),
            "give each output its own path")
    refused(cli("convert", FIXTURES / "llama-tiny", "-o", tmp_path / "d", "-o", tmp_path / "d" / "m.safetensors"),
            "give each output its own path")
    assert list(tmp_path.iterdir()) == []


def test_directory_names_with_dots_are_directories(cli, tmp_path):
    for name in ("llama-3.2-2b", "llama-3.2-2b-slash/"):
        r = cli("stack", FIXTURES / "llama-tiny", "--factor", "2", "-o", f"{tmp_path}/{name}")
        assert r.code == 0, r.err
        out = tmp_path / name.rstrip("/")
        assert (out / "config.json").is_file() and (out / "growth_report.json").is_file()
    # A trailing / asks for a directory even with a file suffix; a non-HF input cannot have one.
    r = cli("convert", FIXTURES / "mlp.pt2", "-o", f"{tmp_path}/m.safetensors/")
    refused(r, "Hugging Face")
    # A suffix of a file format growcli does not write is still an error, not a directory.
    refused(cli("convert", FIXTURES / "llama-tiny", "-o", tmp_path / "m.bin"), "unknown output format .bin")


def test_a_failing_report_leaves_no_output(cli, tmp_path, monkeypatch):
    """The report is part of the same all-or-nothing commit as the models."""
    import growcli.run.runner as runner

    real = runner.write_report

    def failing(*args, **kwargs):
        real(*args, **kwargs)
        raise runner.OutputError("report: cannot write (injected)")

    monkeypatch.setattr(runner, "write_report", failing)
    r = cli("convert", FIXTURES / "mlp.pt2", "-o", tmp_path / "out" / "a.safetensors", "-o", tmp_path / "out" / "a.pt2")
    assert r.code == 1 and "injected" in r.err
    r = cli("convert", FIXTURES / "llama-tiny", "-o", tmp_path / "hf")
    assert r.code == 1 and "injected" in r.err
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_a_dead_run_are_cleaned(cli, tmp_path):
    (tmp_path / f".m.growcli-tmp-{DEAD_PID}.safetensors").write_bytes(b"partial")
    (tmp_path / f".hf.growcli-tmp-{DEAD_PID}").mkdir()
    (tmp_path / f".hf.growcli-tmp-{DEAD_PID}" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".old.growcli-old-{DEAD_PID}").mkdir()
    alive = tmp_path / f".x.growcli-tmp-{os.getppid()}.pt2"  # a running process's: kept
    alive.write_bytes(b"in progress")
    r = cli("convert", FIXTURES / "mlp.pt2", "-o", tmp_path / "m.safetensors")
    assert r.code == 0, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "m.growth_report.json", "m.safetensors"])


def test_full_disk_leaves_nothing(cli, tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        # Refused from the estimate, before writing (torch.export's writer aborts the process on ENOSPC).
        r = cli("stack", FIXTURES / "llama-tiny", "--factor", "2", "-o", disk / "out")  # ~200 kB of weights
        assert r.code == 1, r.err
        lines = r.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("growcli: error: ") and "no space left" in lines[0], r.err
        assert list(disk.iterdir()) == []
        # The disk filling up during the write: the same one line, nothing left behind.
        import growcli.run.runner as runner

        monkeypatch.setattr(runner, "ensure_space", lambda needs: None)
        for argv in (["stack", FIXTURES / "llama-tiny", "--factor", "2", "-o", disk / "out"],
                     ["convert", FIXTURES / "llama-tiny", "-o", disk / "a.safetensors", "-o", disk / "b.safetensors"]):
            r = cli(*argv)
            assert r.code == 1, r.err
            lines = r.err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("growcli: error: ") and "no space left" in lines[0], r.err
            assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
