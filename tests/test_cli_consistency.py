"""Consistency of the CLI and the Python API (issue 11, parts 5 and 6).

A failed step leaves the model as it was; widening layers that share a concatenating
consumer uses up-to-date offsets; ``--version`` and ``--quiet`` everywhere; a step that is
not function-preserving by design reports a measured divergence, not a failure; ``inspect``
never cuts a module name and lists identical blocks once; Hugging Face outputs carry the
tokenizer and other side files, never stale weights of the input.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from torch import nn

import growcli
from growcli import zoo
from growcli.core.errors import VerificationFailed
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.transforms import catalog, registry


def _mlp_model() -> GrowModel:
    torch.manual_seed(0)
    module = zoo.mlp().double().eval()
    return GrowModel(module, "state_dict", Path("mem"), "0", spec_from_batch(((torch.randn(2, 16, dtype=torch.float64),), {})))


def _state(gm: GrowModel) -> tuple:
    m = gm.module
    structure = [(name, type(sub).__name__, repr(sub)) for name, sub in m.named_modules()]
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    return structure, weights, json.dumps(gm.steps, default=str), json.dumps(gm.edits.records, default=str)


def _assert_same(gm: GrowModel, module: nn.Module, before: tuple) -> None:
    assert gm.module is module  # the object the caller holds is the one restored
    structure, weights, steps, edits = _state(gm)
    assert structure == before[0]
    assert weights.keys() == before[1].keys()
    assert all(torch.equal(weights[k], before[1][k]) for k in weights)
    assert (steps, edits) == before[2:]


# --------------------------------------------------------------------------- 1. a failed step changes nothing
def _corrupting(monkeypatch, fail_with: type[Exception] | None = None):
    """Make ``widen`` widen fc1 and then corrupt a weight (or raise ``fail_with`` after widening)."""
    original = catalog.get_transform("widen")

    def apply(gm, spec, ctx):
        report = original.apply(gm, spec, ctx)
        if fail_with is not None:
            raise fail_with("boom after widening")
        with torch.no_grad():
            gm.module.fc3.weight.add_(1.0)
        return report

    monkeypatch.setitem(registry.REGISTRY, "widen", registry.Transform(
        original.name, original.spec, apply, original.exact, original.help, original.candidates))


def test_a_step_that_fails_verification_leaves_the_model_unchanged(monkeypatch):
    gm = _mlp_model()
    growcli.apply(gm, "widen", layer="fc2", by=4)  # an earlier, successful step is kept
    module, before = gm.module, _state(gm)
    assert len(gm.steps) == 1 and tuple(gm.module.fc2.weight.shape) == (28, 32)
    _corrupting(monkeypatch)
    with pytest.raises(VerificationFailed, match=r"step 2 \(widen\) changed the function"):
        growcli.apply(gm, "widen", layer="fc1", by=8)
    _assert_same(gm, module, before)
    assert tuple(gm.module.fc1.weight.shape) == (32, 16) and gm.module.fc1.out_features == 32
    # still usable: the next (real) step applies to the restored model
    monkeypatch.undo()
    report = growcli.apply(gm, "widen", layer="fc1", by=8)
    assert report.verification["passed"] and report.verification["max_abs_diff"] <= 1e-10
    assert tuple(gm.module.fc1.weight.shape) == (40, 16) and len(gm.steps) == 2


def test_a_step_that_raises_leaves_the_model_unchanged(monkeypatch):
    gm = _mlp_model()
    module, before = gm.module, _state(gm)
    _corrupting(monkeypatch, fail_with=RuntimeError)
    with pytest.raises(RuntimeError, match="boom after widening"):
        growcli.apply(gm, "widen", layer="fc1", by=8)
    _assert_same(gm, module, before)


def test_a_failed_step_on_a_loaded_program_restores_its_graph(monkeypatch):
    gm = growcli.load_model(FIXTURES / "mlp.pt2")
    module, before = gm.module, _state(gm)
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = module(x)
    original = catalog.get_transform("widen")

    def apply(g, spec, ctx):
        report = original.apply(g, spec, ctx)
        with torch.no_grad():
            g.module.get_parameter(next(n for n, _ in g.module.named_parameters() if n.endswith("weight"))).mul_(3)
        return report

    monkeypatch.setitem(registry.REGISTRY, "widen", registry.Transform(
        original.name, original.spec, apply, original.exact, original.help, original.candidates))
    with pytest.raises(VerificationFailed):
        growcli.apply(gm, "widen", layer="fc1", by=8)
    _assert_same(gm, module, before)
    with torch.no_grad():
        assert torch.equal(gm.module(x), expected)


# --------------------------------------------------------------------------- 2. shared concatenating consumer
class DenseBlock(nn.Module):
    """DenseNet-style: every conv reads the concatenation of all earlier features; one head reads them all."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.convs = nn.ModuleList([nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(7, 5, 3, padding=1)])
        self.head = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        feats = [torch.relu(self.stem(x))]
        for conv in self.convs:
            feats.append(torch.relu(conv(torch.cat(feats, 1))))
        return self.head(torch.cat(feats, 1)).mean((2, 3))


def _dense_cases(tmp_path: Path) -> dict[str, GrowModel]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    memory = DenseBlock().double().eval()
    program = DenseBlock().double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(program, (x,)), str(tmp_path / "dense.pt2"))
    return {"module": GrowModel(memory, "state_dict", Path("mem"), "0", spec_from_batch(((x,), {}))),
            "pt2": growcli.load_model(tmp_path / "dense.pt2")}


@pytest.mark.parametrize("kind", ["module", "pt2"])
def test_widening_two_layers_that_share_a_concatenating_consumer(tmp_path, kind):
    gm = _dense_cases(tmp_path)[kind]
    report = growcli.apply(gm, "widen", layer=["convs.0", "convs.1"], by=2)
    assert report.matched == ["convs.0", "convs.1"]
    assert report.verification["passed"] and report.verification["dtype"] == "float64"
    assert report.verification["max_abs_diff"] <= 1e-10
    shapes = {k: tuple(v.shape) for k, v in gm.module.state_dict().items()}
    assert shapes["convs.0.weight"] == (5, 4, 3, 3)
    assert shapes["convs.1.weight"] == (7, 9, 3, 3)  # reads stem (4) + the widened convs.0 (5)
    assert shapes["head.weight"] == (6, 16, 1, 1)  # 4 + 5 + 7


def test_widening_a_loaded_program_twice_uses_its_new_shapes():
    gm = growcli.load_model(FIXTURES / "cnn.pt2")
    for _ in range(2):  # the second step's analysis must see conv1's new width
        report = growcli.apply(gm, "widen", layer="conv1", by=2)
        assert report.verification["passed"], report.verification
    assert tuple(gm.module.state_dict()["conv1.weight"].shape)[0] == 12


# --------------------------------------------------------------------------- 3. --version, --quiet
COMMANDS = ["inspect", "verify", "convert", "widen", "grow", "validate", "stack", "deepen", "branch", "column", "upcycle", "vocab",
            "prune", "nest", "cpg", "suggest", "search"]


def test_version(cli):
    r = cli("--version")
    assert (r.code, r.out, r.err) == (0, f"growcli {growcli.__version__}\n", "")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_accepts_quiet(cli, command):
    from growcli.cli.commands import COMMAND_MODULES

    assert sorted(COMMAND_MODULES) == sorted(COMMANDS)
    r = cli(command, "--quiet", "--help")  # an unknown option is a usage error (2) before --help runs
    assert r.code == 0, r.err
    assert "--quiet" in r.out and "-q" in r.out
    assert cli(command, "-q", "--help").code == 0


def test_quiet_runs(cli, tmp_path):
    out = tmp_path / "w.safetensors"
    r = cli("widen", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--layer", "fc1", "--by", "4", "-o", out, "--quiet")
    assert r.code == 0, r.err
    assert out.is_file() and "PASSED" in r.out


# --------------------------------------------------------------------------- 4. inexact by design: a measurement
def test_stack_copy_reports_measured_divergence_not_failure(cli, tmp_path):
    r = cli("stack", FIXTURES / "bert-tiny", "--init", "copy", "-o", tmp_path / "out")
    assert r.code == 0, r.err
    assert "FAILED" not in r.out + r.err
    [line] = [line for line in r.out.splitlines() if line.startswith("verification (")]
    assert line.startswith("verification (float64, 3 batches): measured divergence, max abs diff ")
    assert line.endswith("(not function-preserving by design)")
    assert float(line.split("max abs diff ")[1].split()[0]) > 1e-3
    report = json.loads((tmp_path / "out" / "growth_report.json").read_text())
    assert report["function_preserving"] is False


def test_exact_step_still_reports_passed(cli, tmp_path):
    r = cli("widen", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--layer", "fc2", "--by", "8",
            "-o", tmp_path / "w.safetensors")
    assert r.code == 0, r.err
    assert "verification (float64, 3 batches): PASSED, max abs diff " in r.out


# --------------------------------------------------------------------------- 5. inspect: full names, blocks once
BERT_LAYER = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]


def test_inspect_piped_shows_full_names_and_collapses_blocks(cli):
    r = cli("inspect", FIXTURES / "bert-tiny")  # captured: not a terminal, like a pipe
    assert r.code == 0 and r.err == ""
    table = [line for line in r.out.splitlines() if line.startswith(" ")]
    assert table and not any("…" in line for line in table)
    rows = [line.split() for line in table]
    names = [row[0] for row in rows]
    assert ["encoder.layer.0-1", "×", "2", "BertLayer", "17,088"] == rows[names.index("encoder.layer.0-1")][:5]
    assert [n for n in names if n.startswith("encoder.layer.")] == \
        ["encoder.layer.0-1"] + [f"encoder.layer.0-1.{leaf}" for leaf in BERT_LAYER]
    row = rows[names.index("encoder.layer.0-1.attention.output.LayerNorm")]
    assert row[1:] == ["LayerNorm", "weight", "[32],", "bias", "[32]", "64"]
    assert "identical blocks listed once: encoder.layer.0-1 (--all lists every module)" in r.out.splitlines()


def test_inspect_all_lists_every_module(cli):
    r = cli("inspect", FIXTURES / "bert-tiny", "--all")
    assert r.code == 0
    table = [line for line in r.out.splitlines() if line.startswith(" ")]
    assert not any("…" in line for line in table)
    names = [line.split()[0] for line in table]
    assert [n for n in names if n.startswith("encoder.layer.")] == \
        [f"encoder.layer.{i}.{leaf}" for i in range(2) for leaf in BERT_LAYER]
    assert "0-1" not in r.out


def test_inspect_lists_blocks_that_differ():
    from growcli.cli.commands.inspect import module_rows

    modules = [{"name": f"blocks.{i}.fc", "type": "Linear", "params": {"weight": [4 + i, 4]}, "count": 4 * (4 + i)}
               for i in range(2)]
    stack = [{"name": "blocks", "type": "Block", "length": 2, "params_per_block": 16}]
    rows, collapsed = module_rows(modules, stack)
    assert collapsed == [] and [r[0] for r in rows[1:]] == ["blocks.0.fc", "blocks.1.fc"]
    same = [dict(m, params={"weight": [4, 4]}, count=16) for m in modules]
    rows, collapsed = module_rows(same, stack)
    assert collapsed == ["blocks.0-1"] and [r[0] for r in rows[1:]] == ["blocks.0-1 × 2", "blocks.0-1.fc"]


# --------------------------------------------------------------------------- 6. side files, never stale weights
SIDE = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "special_tokens_map.json": "{}",
        "generation_config.json": '{"max_length": 7}', "spm.model": "sp", "vocab.txt": "a\nb\n", "README.md": "hi"}
STALE = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
         "consolidated.00.pth", "adapter_model.safetensors", "tf_model.h5", "growth_report.json"]


def _hf_with_side_files(tmp_path: Path, stale: list[str] = STALE) -> Path:
    src = tmp_path / "bert"
    shutil.copytree(FIXTURES / "bert-tiny", src)
    for name, text in SIDE.items():
        (src / name).write_text(text)
    for name in stale:
        (src / name).write_text("stale")
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_text("stale")
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("kept")
    (src / "extra" / "model.safetensors").write_text("stale")
    return src


def test_side_files_list(tmp_path):
    from growcli.io.sidefiles import copy_side_files, side_files

    src = _hf_with_side_files(tmp_path)
    names = [p.name for p in side_files(src)]
    assert names == sorted([*SIDE, "extra"])
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "generation_config.json").write_text('{"max_length": 9}')  # written for the grown model: kept
    copied = copy_side_files(src, dst)
    assert "generation_config.json" not in copied
    assert json.loads((dst / "generation_config.json").read_text()) == {"max_length": 9}
    assert sorted(p.name for p in dst.iterdir()) == sorted([*SIDE, "extra"])
    assert [p.name for p in (dst / "extra").iterdir()] == ["notes.txt"]


def test_streaming_stack_carries_side_files_not_stale_weights(cli, tmp_path):
    stale = [n for n in STALE if not n.endswith(".safetensors")]  # a second one would make the input ambiguous
    src = _hf_with_side_files(tmp_path, stale)
    out = tmp_path / "out"
    r = cli("stack", src, "--init", "copy", "--streaming", "-o", out, "--json")
    assert r.code == 0, r.err
    names = {p.name for p in out.iterdir()}
    assert set(SIDE) <= names and "extra" in names
    assert not names & (set(stale) - {"growth_report.json"}) and "original" not in names
    assert sorted(n for n in names if n.endswith(".safetensors")) == ["model.safetensors"]
    assert {p.name for p in (out / "extra").iterdir()} == {"notes.txt"}
    assert (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "growth_report.json").read_text())["streaming"] is True


def test_in_memory_hf_output_carries_side_files_not_stale_weights(cli, tmp_path):
    stale = [n for n in STALE if not n.endswith(".safetensors")]
    src = _hf_with_side_files(tmp_path, stale)
    out = tmp_path / "out"
    r = cli("stack", src, "--init", "copy", "-o", out, "--json")
    assert r.code == 0, r.err
    names = {p.name for p in out.iterdir()}
    assert set(SIDE) <= names and "extra" in names
    assert not names & (set(stale) - {"growth_report.json"}) and "original" not in names
    assert sorted(n for n in names if n.endswith(".safetensors")) == ["model.safetensors"]
    assert (out / "tokenizer.json").read_text() == "{}"
