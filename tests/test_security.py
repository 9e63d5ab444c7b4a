"""No code from files, ever, without consent (issue 11).

A hostile file must execute nothing: a canary file that its code would create never
appears, and growcli exits 1 with one line on stderr. Code runs only from ``--arch``
factories named on the command line, ``--trust-pickle`` and models passed in Python.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

import growcli
from growcli import zoo
from growcli.core.replay import replay
from growcli.core.errors import FormatError, GrowError
from growcli.core.inputs import InputSpec

MLP = "growcli.zoo:mlp"
CANARY = "canary.txt"


@pytest.fixture
def evil_dir(tmp_path, monkeypatch):
    """The current directory holds evilmod.py, which creates the canary when imported."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "evilmod", raising=False)
    canary = tmp_path / CANARY
    (tmp_path / "evilmod.py").write_text(
        f"open({str(canary)!r}, 'w').write('pwned')\n"
        "import torch\n"
        "class Evil(torch.nn.Module):\n"
        "    def __init__(self, **kw):\n"
        f"        open({str(canary)!r}, 'w').write('pwned')\n"
        "        super().__init__()\n"
        "def build(**kw):\n"
        f"    open({str(canary)!r}, 'w').write('pwned')\n"
        "    return torch.nn.Linear(16, 32)\n")
    yield tmp_path
    assert not canary.exists(), "a hostile file ran code"
    assert "evilmod" not in sys.modules
    sys.modules.pop("evilmod", None)


def hostile_arches(canary: Path) -> dict[str, dict]:
    c = str(canary)
    return {
        "os:system": {"factory": "os:system", "kwargs": {"command": f"touch {c}"}},
        "subprocess:run": {"factory": "subprocess:run", "kwargs": {"args": ["touch", c]}},
        "builtins:exec": {"factory": "builtins:exec", "kwargs": {"source": f"open({c!r}, 'w')"}},
        "importlib:import_module": {"factory": "importlib:import_module", "kwargs": {"name": "evilmod"}},
        "evilmod:build": {"factory": "evilmod:build", "kwargs": {}},
    }


HOSTILE_TYPES = ["os:system", "subprocess:run", "builtins:exec", "importlib:import_module", "evilmod:Evil",
                 "torch.nn:Module", "torch.nn.modules.linear:Linear", "growcli.zoo:MLP", "growcli.nn:ACTIVATIONS"]


def write_with_meta(path: Path, **meta) -> Path:
    tensors = load_file(str(FIXTURES / "mlp.safetensors"))
    save_file(tensors, str(path), metadata={k.replace("_", "."): v for k, v in meta.items()})
    return path


def one_line_error(r, code: int = 1) -> str:
    assert r.code == code, (r.code, r.out, r.err)
    assert "Traceback" not in r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    return lines[0]


def plan_file(d: Path) -> Path:
    plan = d / "plan.yaml"
    plan.write_text("version: 1\nsteps:\n  - widen: {layer: fc1, by: 2}\n")
    return plan


def run_command(cli, command: str, evil: Path, d: Path, *extra: str):
    if command == "inspect":
        return cli("inspect", evil, *extra)
    if command == "verify":
        return cli("verify", FIXTURES / "mlp.pt", evil, "--arch", MLP)
    if command == "convert":
        return cli("convert", evil, *extra, "-o", d / "out.pt2")
    if command == "grow":
        return cli("grow", evil, *extra, "--plan", plan_file(d), "-o", d / "out.safetensors")
    raise AssertionError(command)


# --- growcli.arch in the metadata is never imported -----------------------------------------

@pytest.mark.parametrize("factory", list(hostile_arches(Path("x"))))
@pytest.mark.parametrize("command", ["inspect", "convert", "grow"])
def test_recorded_factory_is_never_imported(cli, evil_dir, factory, command):
    arch = hostile_arches(evil_dir / CANARY)[factory]
    evil = write_with_meta(evil_dir / "evil.safetensors", growcli_arch=json.dumps(arch), growcli_edits="[]")
    line = one_line_error(run_command(cli, command, evil, evil_dir))
    assert f"--arch {factory}" in line and "evil.safetensors" in line
    assert not (evil_dir / "out.pt2").exists() and not (evil_dir / "out.safetensors").exists()


@pytest.mark.parametrize("factory", list(hostile_arches(Path("x"))))
def test_verify_against_original_ignores_recorded_factory(cli, evil_dir, factory):
    # With an original to compare against, its architecture is used; the recorded factory never is.
    arch = hostile_arches(evil_dir / CANARY)[factory]
    evil = write_with_meta(evil_dir / "evil.safetensors", growcli_arch=json.dumps(arch), growcli_edits="[]")
    r = cli("verify", FIXTURES / "mlp.pt", evil, "--arch", MLP)
    assert r.code == 0, r.err


@pytest.mark.parametrize("factory", list(hostile_arches(Path("x"))))
def test_load_grown_ignores_recorded_factory(evil_dir, factory):
    arch = hostile_arches(evil_dir / CANARY)[factory]
    evil = write_with_meta(evil_dir / "evil.safetensors", growcli_arch=json.dumps(arch), growcli_edits="[]")
    model = growcli.load_grown(zoo.mlp(), evil)
    assert isinstance(model, torch.nn.Module)


def test_recorded_factory_is_used_when_the_user_names_it(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "trustedmod", raising=False)
    (tmp_path / "trustedmod.py").write_text("from growcli import zoo\ndef build(**kw):\n    return zoo.mlp(**kw)\n")
    grown = tmp_path / "g.safetensors"
    r = cli("grow", FIXTURES / "mlp.pt", "--arch", "trustedmod:build", "--plan", plan_file(tmp_path), "-o", grown)
    assert r.code == 0, r.err
    sys.modules.pop("trustedmod", None)
    line = one_line_error(cli("inspect", grown))
    assert "pass --arch trustedmod:build if you trust it" in line
    assert "trustedmod" not in sys.modules
    assert cli("inspect", grown, "--arch", "trustedmod:build").code == 0  # same factory: its recorded kwargs are used
    assert cli("verify", FIXTURES / "mlp.pt", grown, "--arch", MLP).code == 0
    sys.modules.pop("trustedmod", None)


def test_growcli_own_zoo_factory_needs_no_arch(cli, tmp_path):
    # growcli.zoo is growcli's own code: a file naming one of its factories imports nothing else.
    grown = tmp_path / "g.safetensors"
    assert cli("grow", FIXTURES / "mlp.pt", "--arch", MLP, "--plan", plan_file(tmp_path), "-o", grown).code == 0
    assert cli("inspect", grown).code == 0
    for name in ("growcli.zoo:torch.load", "growcli.zoo:nn.Linear", "growcli.zoo:_x", "growcli.zooo:mlp"):
        evil = write_with_meta(tmp_path / "e.safetensors", growcli_arch=json.dumps({"factory": name}))
        assert f"--arch {name}" in one_line_error(cli("inspect", evil))


# --- recorded edits name only allowlisted classes --------------------------------------------

def hostile_edits(kind: str, canary: Path) -> str:
    kwargs = {"command": f"touch {canary}", "args": ["touch", str(canary)], "source": f"open({str(canary)!r}, 'w')",
              "name": "evilmod"}
    return json.dumps([{"op": "module", "name": "fc1", "spec": {"type": kind, "kwargs": kwargs}}])


@pytest.mark.parametrize("kind", HOSTILE_TYPES)
@pytest.mark.parametrize("command", ["inspect", "verify", "convert", "grow"])
def test_recorded_edit_type_outside_allowlist(cli, evil_dir, kind, command):
    evil = write_with_meta(evil_dir / "evil.safetensors", growcli_edits=hostile_edits(kind, evil_dir / CANARY))
    line = one_line_error(run_command(cli, command, evil, evil_dir, "--arch", MLP))
    assert kind in line and "evil.safetensors" in line and "recorded edit 0" in line


@pytest.mark.parametrize("kind", HOSTILE_TYPES)
def test_load_grown_refuses_edit_type_outside_allowlist(evil_dir, kind):
    evil = write_with_meta(evil_dir / "evil.safetensors", growcli_edits=hostile_edits(kind, evil_dir / CANARY))
    with pytest.raises(FormatError, match=r"evil\.safetensors: recorded edit 0: names module type"):
        growcli.load_grown(zoo.mlp(), evil)


def test_nested_hostile_type_is_refused(evil_dir):
    spec = {"type": "Sequential", "children": [{"type": "torch.nn:Identity", "kwargs": {}}, {"type": "evilmod:Evil"}]}
    with pytest.raises(FormatError, match="evilmod:Evil"):
        replay(zoo.mlp(), [{"op": "module", "name": "fc1", "spec": spec}], "x.safetensors")


def test_allowlisted_types_still_replay():
    from growcli.nn import ParametricActivation

    model = zoo.mlp()
    replay(model, [{"op": "module", "name": "fc1", "spec": {"type": "Sequential", "children": [
        {"type": "ref", "name": "fc1"}, {"type": "growcli.nn:ParametricActivation", "kwargs": {"activation": "relu"}},
        {"type": "torch.nn:Identity", "kwargs": {}}]}}])
    assert isinstance(model.fc1[1], ParametricActivation)


@pytest.mark.parametrize("edits", [
    "{not json", '{"op": "param"}', '["x"]', '[{"op": "nope"}]', '[{"op": "param", "name": "fc1.weight"}]',
    '[{"op": "param", "name": "fc1.weight", "shape": [32, 16], "dtype": "load"}]',
    '[{"op": "param", "name": "fc1.weight", "shape": [99999999, 99999999], "dtype": "float32"}]',
    '[{"op": "attr", "module": "fc1", "attr": "forward", "value": 1}]',
    '[{"op": "attr", "module": "fc1", "attr": "x", "value": {"__dtype__": "load"}}]',
    '[{"op": "module", "name": "fc1", "spec": "torch.nn:Linear"}]',
    '[{"op": "module", "name": "fc1", "spec": {"type": "torch.nn:Linear", "kwargs": {"nope": 1}}}]',
    '[{"op": "attr", "module": "nothing.here", "attr": "x", "value": 1}]',
])
def test_malformed_edits_are_one_line(cli, tmp_path, edits):
    bad = write_with_meta(tmp_path / "bad.safetensors", growcli_edits=edits)
    line = one_line_error(cli("inspect", bad, "--arch", MLP))
    assert "bad.safetensors" in line
    with pytest.raises(GrowError):
        growcli.load_grown(zoo.mlp(), bad)


# --- growcli.core.inputs and other metadata ------------------------------------------------------

@pytest.mark.parametrize("inputs", [
    json.dumps({"args": [{"shape": [2**20, 2**20]}]}),
    json.dumps({"args": [{"shape": [2, 16]}] * 65}),
    json.dumps({"args": [{"shape": [2, 16], "dtype": "load"}]}),
    json.dumps({"args": [{"shape": "2,16"}]}),
    json.dumps({"args": [{"shape": [2, -16]}]}),
    json.dumps([1, 2]),
    "{oops",
])
def test_bad_inputs_metadata_is_exit_1(cli, tmp_path, inputs):
    bad = write_with_meta(tmp_path / "bad.safetensors", growcli_edits="[]", growcli_inputs=inputs)
    line = one_line_error(cli("inspect", bad, "--arch", MLP))
    assert "bad.safetensors" in line and "growcli.inputs" in line


def test_inputs_spec_roundtrip_still_works():
    spec = InputSpec.from_json(json.dumps({"args": [{"shape": [2, 16]}], "kwargs": {"m": {"shape": [2], "dtype": "int64", "high": 3}}}))
    assert spec.args[0].shape == (2, 16) and spec.kwargs[0][1].high == 3


@pytest.mark.parametrize("arch", ['{"factory": ', '["os:system"]', '{"factory": 3}'])
def test_malformed_arch_metadata_is_exit_1(cli, tmp_path, arch):
    bad = write_with_meta(tmp_path / "bad.safetensors", growcli_arch=arch)
    assert "growcli.arch" in one_line_error(cli("inspect", bad))


# --- Hugging Face directories never run their own code ---------------------------------------

@pytest.mark.parametrize("variant", ["auto_map", "modeling", "configuration", "both"])
def test_hf_remote_code_is_refused(cli, evil_dir, variant):
    d = evil_dir / "hf"
    shutil.copytree(FIXTURES / "llama-tiny", d)
    if variant in ("auto_map", "both"):
        config = json.loads((d / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.EvilForCausalLM", "AutoConfig": "configuration_x.C"}
        (d / "config.json").write_text(json.dumps(config))
    code = f"open({str(evil_dir / CANARY)!r}, 'w').write('pwned')\n"
    if variant in ("modeling", "both"):
        (d / "modeling_x.py").write_text(code)
    if variant == "configuration":
        (d / "configuration_x.py").write_text(code)
    for r in (cli("inspect", d), cli("convert", d, "-o", evil_dir / "out.safetensors")):
        line = one_line_error(r)
        assert "never runs code" in line


# --- other loaders are weights-only / safe -------------------------------------------------

def test_loaders_never_unpickle_code():
    import inspect as pyinspect

    from growcli.analysis import calibration
    from growcli.core import inputs, safeyaml
    from growcli.io import formats

    src = pyinspect.getsource(formats.load_torch_file)
    assert "weights_only=True" in src and src.index("weights_only=True") < src.index("weights_only=False")
    assert "trust_pickle=False" in pyinspect.getsource(formats.read_tensor_file)
    assert "read_tensor_file" in pyinspect.getsource(formats.load_inputs_file)
    assert "read_tensor_file" in pyinspect.getsource(calibration)
    assert "torch.load" not in pyinspect.getsource(calibration) and "torch.load" not in pyinspect.getsource(inputs)
    assert issubclass(safeyaml.PlanLoader, __import__("yaml").SafeLoader)


def test_inputs_file_with_pickled_code_is_refused(cli, evil_dir):
    class Boom:
        def __reduce__(self):
            return (open, (str(evil_dir / CANARY), "w"))

    torch.save({"0": Boom()}, evil_dir / "evil_inputs.pt")
    r = cli("verify", FIXTURES / "mlp.pt", FIXTURES / "mlp.pt", "--arch", MLP, "--inputs", evil_dir / "evil_inputs.pt")
    one_line_error(r)
