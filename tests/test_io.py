"""Round trips: every fixture in every input format it has → every output format that applies.

Each source is loaded and written once (one ``runner.grow`` with all its outputs, module-
scoped), then every output is reloaded and compared with the source the way
``growcli verify`` does it. Acceptance: max abs diff ≤ 1e-6 for every cell.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES

import growcli
from growcli import zoo
from growcli.run.compare import compare_checkpoints
from growcli.io.formats import safetensors_metadata, sha256_of
from growcli.io.load import load_model
from growcli.run.steps import VerifySettings
from growcli.run.runner import Output, Source, grow

ROUND_TRIP_ATOL = 1e-6

# source id → (Source, its output formats). Every fixture × every input format it ships in.
# The .pt and .safetensors state_dicts load into the very module the pickled one holds (same
# class, bit-identical weights: test_same_module_from_every_input_format), so their exports
# would repeat the pickled module's byte for byte. ONNX, the slowest step here, runs once per
# distinct model (pickled module, .pt2 program, HF directory); .pt2 once more from the .pt.
SOURCES: dict[str, tuple[Source, tuple[str, ...]]] = {}
for _name in ("mlp", "cnn", "resnet"):
    _arch = f"growcli.zoo:{_name}"
    SOURCES[f"{_name}.pt"] = (Source(FIXTURES / f"{_name}.pt", arch=_arch), ("safetensors", "pt2"))
    SOURCES[f"{_name}.safetensors"] = (Source(FIXTURES / f"{_name}.safetensors", arch=_arch), ("safetensors",))
    SOURCES[f"{_name}.pt2"] = (Source(FIXTURES / f"{_name}.pt2"), ("safetensors", "pt2", "onnx"))
    SOURCES[f"{_name}_module.pt"] = (Source(FIXTURES / f"{_name}_module.pt", trust_pickle=True),
                                     ("safetensors", "pt2", "onnx", "pt"))
SOURCES["bert-tiny"] = (Source(FIXTURES / "bert-tiny"), ("safetensors", "pt2", "onnx", "hf"))
SOURCES["llama-tiny"] = (Source(FIXTURES / "llama-tiny"), ("safetensors", "pt2", "onnx", "hf"))

CELLS = [(src, fmt) for src, (_, fmts) in SOURCES.items() for fmt in fmts]
SUFFIX = {"safetensors": ".safetensors", "pt2": ".pt2", "onnx": ".onnx", "pt": ".pt", "hf": ""}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``convert(source_id)`` → (report, {format: path}); each source is written once per module."""
    cache: dict[str, tuple[dict, dict[str, Path]]] = {}
    hashes_before = {sid: sha256_of(src.path) for sid, (src, _) in SOURCES.items()}

    def convert(sid: str):
        if sid not in cache:
            source, fmts = SOURCES[sid]
            out_dir = tmp_path_factory.mktemp(sid.replace(".", "_"))
            paths = {fmt: out_dir / f"out{SUFFIX[fmt]}" for fmt in fmts}
            report = grow(source, [], [Output(p) for p in paths.values()], seed=0)
            cache[sid] = (report, paths)
        return cache[sid]

    yield convert
    # The input is never modified, whatever was written from it.
    for sid in cache:
        assert sha256_of(SOURCES[sid][0].path) == hashes_before[sid], sid


@pytest.mark.parametrize("sid,fmt", CELLS, ids=[f"{s}->{f}" for s, f in CELLS])
def test_round_trip_verifies(converted, sid, fmt):
    source, _ = SOURCES[sid]
    report, paths = converted(sid)
    out = paths[fmt]
    assert out.exists()
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] == 0.0
    first = report["outputs"][0]
    assert report["verification"]["against"] == f"readback of {first['path']}"
    assert report["verification"]["outputs"] == first["readback"]["outputs"]

    result = compare_checkpoints(source, out, VerifySettings())
    assert result.passed, result.summary()
    assert result.max_abs_diff <= ROUND_TRIP_ATOL
    assert result.outputs and all(o.passed and not o.note for o in result.outputs)
    if fmt == "onnx":
        # onnxruntime runs float32: the export check and the reload agree to float32 rounding.
        check = next(o for o in report["outputs"] if o["format"] == "onnx")["check"]
        assert check["passed"] and check["max_abs_diff"] <= 1e-5
        assert result.dtype == "float32"
    else:
        # Same weights, same graph: bit-identical outputs.
        assert result.max_abs_diff == 0.0


@pytest.mark.parametrize("sid,fmt", CELLS, ids=[f"{s}->{f}" for s, f in CELLS])
def test_output_loads_with_its_own_tools(converted, sid, fmt):
    """Each output is usable without growcli's help where the format allows it."""
    _, paths = converted(sid)
    out = paths[fmt]
    if fmt == "safetensors":
        from safetensors.torch import load_file

        meta = safetensors_metadata(out)
        assert meta["growcli.version"] == growcli.__version__
        assert meta["growcli.source_sha256"] == sha256_of(SOURCES[sid][0].path)
        assert json.loads(meta["growcli.edits"]) == []
        # A conversion has no growth to record; the file's own read-back is in the report, not in itself.
        assert json.loads(meta["growcli.verification"]) is None
        assert load_file(str(out))
    elif fmt == "pt2":
        ep = torch.export.load(str(out))
        assert ep.example_inputs is not None
    elif fmt == "onnx":
        import onnx

        onnx.checker.check_model(str(out))
        assert [p.name for p in out.parent.iterdir() if p.name.endswith(".data")] == []  # weights inside the file
    elif fmt == "hf":
        from transformers import AutoModel

        assert (out / "config.json").is_file()
        assert AutoModel.from_pretrained(str(out)) is not None
    elif fmt == "pt":
        assert isinstance(torch.load(out, weights_only=False), torch.nn.Module)
    assert not [p for p in out.parent.iterdir() if "growcli-tmp" in p.name]


@pytest.mark.parametrize("sid", ["mlp.pt", "cnn.safetensors", "resnet.pt"])
def test_load_grown_rebuilds_a_safetensors_output(converted, sid):
    _, paths = converted(sid)
    name = sid.split(".")[0]
    original = load_model(SOURCES[sid][0].path, arch=f"growcli.zoo:{name}")
    rebuilt = growcli.load_grown(getattr(zoo, name)(), paths["safetensors"])
    x = original.inputs.example[0][0]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original.module(x))


def test_same_module_from_every_input_format():
    """.pt, .safetensors and the pickled module are one model: same weights, bit for bit."""
    for name in ("mlp", "cnn", "resnet"):
        arch = f"growcli.zoo:{name}"
        ref = load_model(FIXTURES / f"{name}.pt", arch=arch).module.state_dict()
        for other in (load_model(FIXTURES / f"{name}.safetensors", arch=arch),
                      load_model(FIXTURES / f"{name}_module.pt", trust_pickle=True),
                      load_model(FIXTURES / f"{name}.pt2")):
            state = other.module.state_dict()
            assert set(state) == set(ref), (name, other.kind)
            assert all(torch.equal(state[k], ref[k]) for k in ref), (name, other.kind)


def test_pt2_output_accepts_other_batch_sizes(converted):
    """Written programs keep the batch dimension free where the model allows (fixture: CNN)."""
    _, paths = converted("cnn_module.pt")
    program = torch.export.load(str(paths["pt2"])).module()
    original = load_model(FIXTURES / "cnn_module.pt", trust_pickle=True).module
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(program(x), original(x))


def test_hf_pt2_loads_in_a_fresh_interpreter(converted):
    """A .pt2 of a Hugging Face model returns a ModelOutput class, which torch.export can only
    deserialise once its module is imported: a fresh ``python -m growcli`` must manage alone."""
    import subprocess
    import sys

    _, paths = converted("bert-tiny")
    proc = subprocess.run([sys.executable, "-m", "growcli", "inspect", str(paths["pt2"]), "--json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert data["kind"] == "pt2" and data["total_parameters"] == 22_496
    assert proc.stderr == ""


def test_convert_twice_gives_identical_bytes(cli, tmp_path):
    """Same input, same seed → byte-identical .safetensors, .pt2 and .onnx, across runs in one process."""
    files = ("m.safetensors", "m.pt2", "m.onnx")
    digests = []
    for run in ("a", "b"):
        r = cli("convert", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--quiet",
                *[arg for f in files for arg in ("-o", tmp_path / run / f)])
        assert r.code == 0 and r.err == "", r.err
        digests.append([hashlib.sha256((tmp_path / run / f).read_bytes()).hexdigest() for f in files])
        torch.randn(100)  # the global RNG moves between runs; outputs must not depend on it
    assert digests[0] == digests[1]


def test_outputs_get_the_usual_file_mode(converted, tmp_path):
    """safetensors writes its files private (0600); growcli's outputs get the mode a plain write gives."""
    _, paths = converted("mlp.pt")
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert paths["safetensors"].stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
