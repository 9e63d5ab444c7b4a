"""Bad input gives one line on stderr and the documented exit code, writes nothing, changes nothing.

One table of cases drives the CLI in-process (the real entry point). Every case checks:
exit code 1 or 2 as documented, exactly one line on stderr naming the problem, nothing on
stdout, no traceback, no output file (nor a temporary one), and the inputs byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES

from growcli.core.errors import (
    MESSAGE_TABLE,
    CheckpointNotFoundError,
    FormatError,
    GrowError,
    NotGrowableError,
    OutputError,
    UnsafePickleError,
    UsageError,
    VerificationFailed,
    format_error,
)
from growcli.io.formats import sha256_of

MLP = "growcli.zoo:mlp"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A directory of good and bad inputs; cases read from it and must leave it as it was."""
    d = tmp_path_factory.mktemp("inputs")
    for name in ("mlp.pt", "mlp.pt2", "mlp.safetensors", "mlp_module.pt"):
        shutil.copy(FIXTURES / name, d / name)
    shutil.copytree(FIXTURES / "bert-tiny", d / "bert")
    (d / "empty_dir").mkdir()
    (d / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    header = b'{"w": nope}'
    (d / "bad_header.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    full = (FIXTURES / "mlp.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(full[: len(full) // 2])
    (d / "empty.safetensors").write_bytes(b"")
    (d / "empty.pt").write_bytes(b"")
    (d / "garbage.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    shutil.copy(FIXTURES / "mlp.pt", d / "weights.weird")
    torch.save([1, 2, 3], d / "a_list.pt")
    torch.save({"0": torch.randn(4, 7)}, d / "wrong_shape_inputs.pt")
    (d / "a_file").write_text("a regular file, not a directory\n")
    for name, config in [("unknown_class", {"architectures": ["NoSuchModelForAnything"], "model_type": "bert"}),
                         ("no_weights", json.loads((FIXTURES / "bert-tiny" / "config.json").read_text()))]:
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps(config))
    shutil.copy(FIXTURES / "bert-tiny" / "model.safetensors", d / "unknown_class" / "model.safetensors")
    (d / "bad_config").mkdir()
    (d / "bad_config" / "config.json").write_text("{not json")
    shutil.copy(FIXTURES / "bert-tiny" / "model.safetensors", d / "bad_config" / "model.safetensors")
    return d


# (id, argv with {in} = inputs dir and {out} = a fresh output dir, exit code, words stderr must contain)
CASES = [
    ("missing-file", "convert {in}/nosuch.pt2 -o {out}/m.safetensors", 1, "no such file"),
    ("dir-without-config", "convert {in}/empty_dir -o {out}/m.safetensors", 1, "no config.json"),
    ("corrupt-safetensors", f"convert {{in}}/junk.safetensors --arch {MLP} -o {{out}}/m.safetensors", 1, "corrupt safetensors header"),
    ("safetensors-header-not-json", f"convert {{in}}/bad_header.safetensors --arch {MLP} -o {{out}}/m.safetensors", 1, "not JSON"),
    ("truncated-safetensors", f"convert {{in}}/truncated.safetensors --arch {MLP} -o {{out}}/m.safetensors", 1, "truncated"),
    ("empty-safetensors", f"convert {{in}}/empty.safetensors --arch {MLP} -o {{out}}/m.safetensors", 1, "only 0 bytes"),
    ("empty-pt", f"convert {{in}}/empty.pt --arch {MLP} -o {{out}}/m.safetensors", 1, "not a readable torch checkpoint"),
    ("garbage-pt2", "convert {in}/garbage.pt2 -o {out}/m.safetensors", 1, "not a readable torch.export program"),
    ("pt-holding-a-list", f"convert {{in}}/a_list.pt --arch {MLP} -o {{out}}/m.safetensors", 1, "holds a list"),
    ("arch-missing-attribute", "convert {in}/mlp.pt --arch growcli.zoo:nosuch -o {out}/m.safetensors", 1, "has no attribute 'nosuch'"),
    ("arch-module-not-importable", "convert {in}/mlp.pt --arch nosuchpkg.models:net -o {out}/m.safetensors", 1, "cannot import nosuchpkg.models"),
    ("arch-without-colon", "convert {in}/mlp.pt --arch growcli.zoo -o {out}/m.safetensors", 2, "expected package.module:factory"),
    ("state-dict-keys-do-not-match", "convert {in}/mlp.pt --arch growcli.zoo:cnn -o {out}/m.safetensors", 1, "missing keys"),
    ("state-dict-shapes-do-not-match", f"convert {{in}}/mlp.safetensors --arch {MLP} --arch-kwargs {{\"hidden\":7}} -o {{out}}/m.safetensors", 1, "shape mismatch"),
    ("arch-kwargs-bad-json", f"convert {{in}}/mlp.pt --arch {MLP} --arch-kwargs {{hidden: -o {{out}}/m.safetensors", 2, "not valid JSON"),
    ("arch-kwargs-not-an-object", f"convert {{in}}/mlp.pt --arch {MLP} --arch-kwargs [64] -o {{out}}/m.safetensors", 2, "expected a JSON object"),
    ("arch-kwargs-unknown-argument", f"convert {{in}}/mlp.pt --arch {MLP} --arch-kwargs {{\"depth\":3}} -o {{out}}/m.safetensors", 1, "unexpected keyword argument 'depth'"),
    ("state-dict-without-arch", "convert {in}/mlp.pt -o {out}/m.safetensors", 2, "pass --arch"),
    ("pickled-module-untrusted", "convert {in}/mlp_module.pt -o {out}/m.safetensors", 1, "--trust-pickle"),
    ("output-equal-to-input", "convert {in}/mlp.pt2 -o {in}/mlp.pt2", 2, "the output path is the input"),
    ("output-inside-input-dir", "convert {in}/bert -o {in}/bert/grown.safetensors", 2, "inside the input directory"),
    ("output-dir-unwritable", "convert {in}/mlp.pt2 -o {in}/a_file/sub/m.safetensors", 1, "cannot write here"),
    ("unknown-output-suffix", "convert {in}/mlp.pt2 -o {out}/m.weird", 2, "unknown output format .weird"),
    ("unknown-format-option", "convert {in}/mlp.pt2 -o {out}/m.bin --format zip", 2, "--format 'zip'"),
    ("unknown-input-format", "convert {in}/weights.weird -o {out}/m.safetensors", 2, "unknown checkpoint format .weird"),
    ("hf-output-for-non-hf-input", "convert {in}/mlp.pt2 -o {out}/hfdir --format hf", 2, "only be written for a Hugging Face input"),
    ("pickle-output-for-non-pickle-input", "convert {in}/mlp.pt2 -o {out}/m.pt", 2, "only written when the input was one"),
    ("input-shape-not-integers", "convert {in}/mlp.pt2 --input-shape 2,abc -o {out}/m.safetensors", 2, "--input-shape '2,abc'"),
    ("input-shape-zero-dim", "convert {in}/mlp.pt2 --input-shape 2,0 -o {out}/m.safetensors", 2, "positive integer"),
    ("input-shape-unknown-dtype", "convert {in}/mlp.pt2 --input-shape 2,16:float99 -o {out}/m.safetensors", 2, "unknown dtype 'float99'"),
    ("input-shape-wrong-for-model", f"convert {{in}}/mlp.pt --arch {MLP} --input-shape 2,5 -o {{out}}/m.safetensors", 1, "failed on inputs of shape [2, 5]"),
    ("inputs-file-wrong-shapes", "convert {in}/mlp.pt2 --inputs {in}/wrong_shape_inputs.pt -o {out}/m.safetensors", 1, "the model expects [batch, 16]"),
    ("inputs-file-missing", "convert {in}/mlp.pt2 --inputs {in}/nosuch.safetensors -o {out}/m.safetensors", 1, "inputs file"),
    ("hf-config-unknown-class", "convert {in}/unknown_class -o {out}/m.safetensors", 1, "has no class NoSuchModelForAnything"),
    ("hf-config-not-json", "convert {in}/bad_config -o {out}/m.safetensors", 1, "not a usable Hugging Face config"),
    ("hf-dir-without-weights", "convert {in}/no_weights -o {out}/m.safetensors", 1, "no model.safetensors"),
    ("bad-dtype", "convert {in}/mlp.pt2 --dtype float16 -o {out}/m.safetensors", 2, "--dtype 'float16'"),
    ("convert-without-output", "convert {in}/mlp.pt2", 2, "at least one -o"),
    ("verify-grown-missing", "verify {in}/mlp.pt2 {in}/nosuch.pt2", 1, "grown checkpoint"),
    ("verify-zero-batches", "verify {in}/mlp.pt2 {in}/mlp.pt2 --batches 0", 2, "--batches"),
    ("inspect-corrupt", "inspect {in}/truncated.safetensors --arch growcli.zoo:mlp", 1, "truncated"),
    ("unknown-option", "convert {in}/mlp.pt2 -o {out}/m.safetensors --no-such-option", 2, "No such option"),
    ("unknown-command", "enlarge {in}/mlp.pt2", 2, "No such command"),
]


# The offending thing each case's message must name: the path or flag (with its value) that is wrong.
NAMES = {
    'missing-file': '{in}/nosuch.pt2',
    'dir-without-config': '{in}/empty_dir',
    'corrupt-safetensors': '{in}/junk.safetensors',
    'safetensors-header-not-json': '{in}/bad_header.safetensors',
    'truncated-safetensors': '{in}/truncated.safetensors',
    'empty-safetensors': '{in}/empty.safetensors',
    'empty-pt': '{in}/empty.pt',
    'garbage-pt2': '{in}/garbage.pt2',
    'pt-holding-a-list': '{in}/a_list.pt',
    'arch-missing-attribute': '--arch growcli.zoo:nosuch',
    'arch-module-not-importable': '--arch nosuchpkg.models:net',
    'arch-without-colon': "--arch 'growcli.zoo'",
    'state-dict-keys-do-not-match': '{in}/mlp.pt',
    'state-dict-shapes-do-not-match': '{in}/mlp.safetensors',
    'arch-kwargs-bad-json': '--arch-kwargs',
    'arch-kwargs-not-an-object': '--arch-kwargs',
    'arch-kwargs-unknown-argument': "'depth'",
    'state-dict-without-arch': '{in}/mlp.pt',
    'pickled-module-untrusted': '{in}/mlp_module.pt',
    'output-equal-to-input': '{in}/mlp.pt2',
    'output-inside-input-dir': '{in}/bert/grown.safetensors',
    'output-dir-unwritable': '{in}/a_file/sub/m.safetensors',
    'unknown-output-suffix': '{out}/m.weird',
    'unknown-format-option': "--format 'zip'",
    'unknown-input-format': '{in}/weights.weird',
    'hf-output-for-non-hf-input': '{out}/hfdir',
    'pickle-output-for-non-pickle-input': '{out}/m.pt',
    'input-shape-not-integers': "--input-shape '2,abc'",
    'input-shape-zero-dim': "--input-shape '2,0'",
    'input-shape-unknown-dtype': "'float99'",
    'input-shape-wrong-for-model': '[2, 5]',
    'inputs-file-wrong-shapes': '{in}/wrong_shape_inputs.pt',
    'inputs-file-missing': '{in}/nosuch.safetensors',
    'hf-config-unknown-class': '{in}/unknown_class/config.json',
    'hf-config-not-json': '{in}/bad_config/config.json',
    'hf-dir-without-weights': '{in}/no_weights',
    'bad-dtype': "--dtype 'float16'",
    'convert-without-output': '-o',
    'verify-grown-missing': '{in}/nosuch.pt2',
    'verify-zero-batches': "'--batches'",
    'inspect-corrupt': '{in}/truncated.safetensors',
    'unknown-option': '--no-such-option',
    'unknown-command': "'enlarge'",
}


@pytest.mark.parametrize("case,argv,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(cli, inputs, tmp_path, case, argv, code, words):
    out_dir = tmp_path / "out"
    fill = lambda text: text.replace("{in}", str(inputs)).replace("{out}", str(out_dir))  # noqa: E731
    before = sha256_of(inputs)
    fixtures_before = sha256_of(FIXTURES / "mlp.pt2")
    r = cli(*[fill(a) for a in argv.split(" ")])
    assert r.code == code, r.err
    lines = r.err.splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("growcli: ") and words in lines[0], lines[0]
    # The category names the exit code: "usage:" is exactly the exit-2 kind (growcli.core.errors.MESSAGE_TABLE).
    assert lines[0].startswith("growcli: usage: ") == (code == 2), lines[0]
    assert fill(NAMES[case]) in lines[0], f"the message does not name {fill(NAMES[case])!r}: {lines[0]}"
    assert "Traceback" not in r.err and "internal error" not in r.err
    assert r.out == ""
    assert not out_dir.exists()  # nothing written, not even the parent directory
    assert sha256_of(inputs) == before  # inputs unchanged, no stray temporary files beside them
    assert sha256_of(FIXTURES / "mlp.pt2") == fixtures_before


class _WritesAFile:
    """Unpickling this calls ``open(path, "w")``: code from the file runs at load time."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("payload", ["state_dict", "object"])
def test_malicious_pickle_is_refused_and_never_runs(cli, tmp_path, payload):
    target = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    obj = _WritesAFile(str(target))
    torch.save({"fc1.weight": torch.zeros(2), "x": obj} if payload == "state_dict" else obj, evil)
    digest = sha256_of(evil)

    r = cli("convert", evil, "--arch", MLP, "-o", tmp_path / "out.safetensors")
    assert r.code == 1
    assert r.err.count("\n") == 1 and r.err.startswith("growcli: refused: ")
    assert "io.open" in r.err or "builtins.open" in r.err  # names what it would import
    assert "--trust-pickle" in r.err
    assert not target.exists()
    assert not (tmp_path / "out.safetensors").exists()
    assert sha256_of(evil) == digest

    r = cli("inspect", evil)
    assert r.code == 1 and "refused" in r.err and not target.exists()

    # The payload is real: trusting the file runs it (and growcli then refuses what it got).
    r = cli("inspect", evil, "--trust-pickle")
    assert target.exists()
    assert r.code == 1 and r.err.count("\n") == 1


def test_trusted_pickle_loads(cli):
    r = cli("inspect", FIXTURES / "mlp_module.pt", "--trust-pickle", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["kind"] == "pickle"


def test_debug_env_shows_the_traceback(cli, monkeypatch, tmp_path):
    missing = tmp_path / "missing.pt2"
    r = cli("inspect", missing)
    assert r.code == 1 and "Traceback" not in r.err and r.err.count("\n") == 1

    monkeypatch.setenv("GROWCLI_DEBUG", "1")
    r = cli("inspect", missing)
    assert r.code == 1
    assert "Traceback (most recent call last)" in r.err and "CheckpointNotFoundError" in r.err
    assert r.err.rstrip().splitlines()[-1] == f"growcli: not found: {missing}: no such file or directory (checkpoint)"


def test_bare_command_prints_help_and_exits_2(cli):
    r = cli()
    assert r.code == 2
    assert "Usage:" in r.err and "convert" in r.err and "Traceback" not in r.err


def _command_names() -> list[str]:
    import typer

    from growcli.cli.app import get_app

    return sorted(typer.main.get_command(get_app()).commands)


def test_the_help_cases_cover_every_command():
    """The parametrised help test below runs once per registered command; none may be missing."""
    assert _command_names() == sorted(["branch", "column", "convert", "cpg", "deepen", "grow", "inspect", "nest", "prune",
                                       "search", "stack", "suggest", "upcycle", "validate", "verify", "vocab", "widen"])


@pytest.mark.parametrize("command", _command_names())
def test_every_help_shows_an_example(cli, command):
    r = cli(command, "--help")
    assert r.code == 0, r.err
    assert any(line.strip().startswith("Example:") and "growcli " + command in line for line in r.out.splitlines()), r.out


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "growcli", "--help"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and "verify" in proc.stdout and "convert" in proc.stdout
    assert proc.stderr == ""


# --- growcli.core.errors on its own ---------------------------------------------------------------

@pytest.mark.parametrize("exc,code,prefix", [
    (VerificationFailed("outputs differ"), 3, "verification failed: outputs differ"),
    (UnsafePickleError("m.pt", ["evil.Thing"]), 1, "refused: m.pt: loading it would unpickle"),
    (NotGrowableError("GELU after fc1 is not idempotent"), 1, "not growable: GELU after fc1"),
    (CheckpointNotFoundError("x.pt2: no such file"), 1, "not found: x.pt2"),
    (UsageError("--to 3: must be larger"), 2, "usage: --to 3"),
    (FormatError("x.safetensors: truncated"), 1, "error: x.safetensors: truncated"),
    (OutputError("out/: cannot write here"), 1, "error: out/: cannot write here"),
    (ValueError("boom"), 1, "internal error: ValueError: boom (set GROWCLI_DEBUG=1 for the traceback)"),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None)
def test_format_error(exc, code, prefix):
    got_code, message = format_error(exc)
    assert got_code == code
    assert message.startswith(prefix), message


def test_format_error_keeps_one_line():
    code, message = format_error(FormatError("first line\n  second line\n\nthird"))
    assert (code, message) == (1, "error: first line second line third")
    code, message = format_error(KeyError("multi\nline"))
    assert "\n" not in message and message.startswith("internal error: KeyError")


def test_unsafe_pickle_message_lists_at_most_six_imports():
    names = [f"pkg.mod.Class{i}" for i in range(9)]
    _, message = format_error(UnsafePickleError("m.pt", names))
    assert "pkg.mod.Class5" in message and "pkg.mod.Class6" not in message and "(+3 more)" in message


def test_message_table_has_no_unreachable_rows():
    """A row after one of its base classes could never match: the table is ordered subclass first."""
    classes = [cls for cls, _ in MESSAGE_TABLE]
    for i, earlier in enumerate(classes):
        for later in classes[i + 1:]:
            assert not issubclass(later, earlier), f"{later.__name__} is shadowed by {earlier.__name__}"
    assert classes[-1] is GrowError


def test_exception_tree_replaces_builtin_types():
    assert issubclass(UsageError, ValueError) and issubclass(CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(OutputError, OSError) and issubclass(NotGrowableError, ValueError)
    assert all(issubclass(cls, GrowError) for cls, _ in MESSAGE_TABLE)


def test_outputs_are_written_together_or_not_at_all(cli, tmp_path, monkeypatch):
    """A later output that fails (an ONNX export failure, injected) leaves no earlier one behind."""
    import growcli.io.save as save

    def failing_export(*args, **kwargs):
        raise save.FormatError("ONNX export failed (injected for the test)")

    monkeypatch.setattr(save, "_save_onnx", failing_export)
    r = cli("convert", FIXTURES / "mlp.pt2", "-o", tmp_path / "first.safetensors", "-o", tmp_path / "second.onnx")
    assert r.code == 1 and "ONNX export failed" in r.err
    assert list(tmp_path.iterdir()) == []
