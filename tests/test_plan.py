"""YAML growth plans: schema validation, safe loading, dry runs, execution and provenance.

Two small transforms registered only for this module (and removed after it) exercise the
plan machinery on a real model without depending on the built-in transforms: ``tpad``
grows a convolution's kernel by zero-padding it (exact) and ``tscale`` scales a layer's
weights and adds seeded noise (not exact, or falsely claimed exact to provoke a verification
failure). The acceptance tests use the built-in widen, deepen and stack; a missing one fails them.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import FIXTURES, ROOT
from torch import nn

import growcli
from growcli.core.errors import NotGrowableError
from growcli.io.formats import read_safetensors, safetensors_metadata
from growcli.core.units import parse_size
from growcli.run.plan import load_plan, parse_plan, read_plan
from growcli.run.planschema import PlanError
from growcli.core.safeyaml import MAX_BYTES
from growcli.core.select import select
from growcli.transforms.registry import REGISTRY, Context, StepReport, register
from growcli.transforms.catalog import all_transforms
from growcli.zoo import SmallCNN

CNN = (FIXTURES / "cnn.pt", "--arch", "growcli.zoo:cnn")
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


# --------------------------------------------------------------------------- test transforms
@dataclass(frozen=True)
class PadSpec:
    """Grow the kernels of the convolutions matched by ``layer`` to ``kernel`` (zero-padded: exact)."""

    layer: str
    kernel: int

    def __post_init__(self):
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")


def pad_kernel(gm, spec: PadSpec, ctx: Context) -> StepReport:
    root = gm.module
    names = select(spec.layer, [n for n, m in root.named_modules() if isinstance(m, nn.Conv2d)], "convolution")
    for name in names:  # refuse before changing anything
        k = root.get_submodule(name).kernel_size[0]
        if spec.kernel <= k:
            raise NotGrowableError(f"{name} has kernel {k}; the new kernel {spec.kernel} is not larger")
    report = StepReport("tpad", dataclasses.asdict(spec), matched=names, params_before=gm.num_parameters())
    for name in names:
        conv = root.get_submodule(name)
        p = (spec.kernel - conv.kernel_size[0]) // 2
        gm.edits.param(root, f"{name}.weight", F.pad(conv.weight.detach(), (p, p, p, p)))
        gm.edits.attr(root, name, "kernel_size", (spec.kernel, spec.kernel))
        gm.edits.attr(root, name, "padding", (conv.padding[0] + p, conv.padding[1] + p))
    report.params_after = gm.num_parameters()
    return report


@dataclass(frozen=True)
class ScaleSpec:
    """Multiply the weights of ``layer`` by ``factor`` and add seeded noise; ``claim`` says what it promises."""

    layer: str = "fc"
    factor: float = 1.0
    noise: float = 0.0
    claim: Literal["exact", "approx"] = "approx"


def scale_weights(gm, spec: ScaleSpec, ctx: Context) -> StepReport:
    root = gm.module
    names = select(spec.layer, [n for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))])
    gen = ctx.generator(11)
    for name in names:
        w = root.get_submodule(name).weight.detach()
        gm.edits.param(root, f"{name}.weight", w * spec.factor + spec.noise * torch.randn(w.shape, generator=gen))
    return StepReport("tscale", dataclasses.asdict(spec), matched=names, params_before=gm.num_parameters(),
                      params_after=gm.num_parameters())


TEST_TRANSFORMS = {"tpad": (PadSpec, pad_kernel, True), "tscale": (ScaleSpec, scale_weights, lambda s: s.claim == "exact")}


@pytest.fixture(scope="module", autouse=True)
def test_transforms():
    for name, (spec, fn, exact) in TEST_TRANSFORMS.items():
        register(name, spec, exact=exact)(fn)
    yield
    for name in TEST_TRANSFORMS:
        REGISTRY.pop(name, None)


def transforms_in(example: Path) -> set[str]:
    """The transform names an example plan uses (read without validating it)."""
    return {next(iter(s)) if isinstance(s, dict) else s for s in yaml.safe_load(example.read_text())["steps"]}


def write(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def same_tensors(a: Path, b: Path) -> float:
    """Max abs difference over all tensors of two safetensors files with the same keys and shapes."""
    ta, tb = read_safetensors(a), read_safetensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].shape == tb[k].shape, k
    return max(float((ta[k].double() - tb[k].double()).abs().max()) if ta[k].numel() else 0.0 for k in ta)


# --------------------------------------------------------------------------- invalid plans
P = "version: 1\nsteps:\n"  # two lines of preamble: a step written after it is on line 3

INVALID = [
    # id, plan text, line, column, message fragment
    ("unknown-transform", P + "  - tpda: {layer: conv1, kernel: 5}\n", 3, 5,
     "step 1: unknown transform 'tpda'; did you mean 'tpad'?"),
    ("unknown-option", P + "  - tpad: {layer: conv1, kernl: 5}\n", 3, 26,
     "step 1 (tpad): unknown option 'kernl' for tpad; did you mean 'kernel'?"),
    ("wrong-type", P + "  - tpad: {layer: conv1, kernel: five}\n", 3, 34, "option 'kernel' of tpad expects int, got 'five'"),
    ("wrong-type-float", P + "  - tscale: {layer: fc, factor: [2]}\n", 3, 33, "option 'factor' of tscale expects float, got [2]"),
    ("wrong-literal", P + "  - tscale: {layer: fc, claim: sure}\n", 3, 32, "expects one of 'exact', 'approx', got 'sure'"),
    ("missing-option", P + "  - tpad: {layer: conv1}\n", 3, 5, "tpad needs option 'kernel'"),
    ("spec-refuses", P + "  - tpad:\n      layer: conv1\n      kernel: 4\n", 5, 15, "kernel must be a positive odd number, got 4"),
    ("missing-version", "steps:\n  - tpad: {layer: conv1, kernel: 5}\n", 1, 1, "missing 'version: 1'"),
    ("newer-version", "version: 2\nsteps:\n  - tpad: {layer: conv1, kernel: 5}\n", 1, 10,
     "unsupported plan version 2; this growcli reads version 1"),
    ("version-not-int", "version: one\nsteps: [tscale]\n", 1, 10, "expected the integer 1, got 'one'"),
    ("unknown-top-key", "version: 1\nstep:\n  - tpad: {layer: conv1, kernel: 5}\n", 2, 1, "unknown key 'step'; did you mean 'steps'?"),
    ("steps-not-list", "version: 1\nsteps:\n  tpad: {layer: conv1, kernel: 5}\n", 3, 3, "expected a list of steps"),
    ("no-steps", "version: 1\nsteps: []\n", 2, 8, "the plan has no steps"),
    ("options-not-indented", P + "  - tpad:\n    layer: conv1\n    kernel: 5\n", 3, 5,
     "got keys 'tpad', 'layer', 'kernel'; indent its options under 'tpad:'"),
    ("options-not-mapping", P + "  - tpad: conv1\n", 3, 11, "the options of tpad must be a mapping"),
    ("step-not-a-name", P + "  - 5\n", 3, 5, "expected a transform name with its options"),
    ("option-key-not-text", P + "  - tscale: {layer: fc, 1: 2}\n", 3, 25, "option names are text, got 1"),
    ("bad-dtype", P + "  - tscale\nverify: {dtype: float16}\n", 4, 17, "dtype: expected float64 or float32, got 'float16'"),
    ("bad-batches", P + "  - tscale\nverify:\n  batches: 0\n", 5, 12, "batches: expected a positive integer, got 0"),
    ("bad-atol", P + "  - tscale\nverify:\n  atol: tiny\n", 5, 9, "atol: expected a non-negative number like 1e-10, got 'tiny'"),
    ("verify-typo", P + "  - tscale\nverify:\n  rtl: 1e-5\n", 5, 3, "unknown key 'rtl'; did you mean 'rtol'?"),
    ("missing-inputs-file", P + "  - tscale\nverify:\n  inputs: no/such/batch.safetensors\n", 5, 11,
     "inputs: no such file no/such/batch.safetensors"),
    ("bad-format", P + "  - tscale\noutput: {path: out.bin, format: zip}\n", 4, 33, "format: expected one of safetensors"),
    ("bad-output-suffix", P + "  - tscale\noutput:\n  path: out.zip\n", 5, 9, "unknown output format .zip"),
    ("shard-size-not-hf", P + "  - tscale\noutput:\n  path: out.safetensors\n  shard_size: 1GB\n", 6, 3,
     "shard_size applies to Hugging Face directory outputs, not safetensors"),
    ("bad-shard-size", P + "  - tscale\noutput:\n  path: out/\n  shard_size: lots\n", 6, 15, "expected a size like 2GB"),
    ("bad-seed", "version: 1\nseed: -1\nsteps: [tscale]\n", 2, 7, "seed: expected a non-negative integer, got -1"),
    ("yaml-syntax", P + "  - tpad: {layer: conv1, kernel: 5\n  - tscale\n", 5, 1,
     "invalid YAML: expected ',' or '}', but got '<stream end>' (while parsing a flow mapping at line 3, column 11)"),
    ("yaml-tab", P + "\t- tscale\n", 3, 1, "found character '\\t' that cannot start any token"),
    ("python-tag", P + "  - tscale: !!python/object/apply:os.system ['echo pwned']\n", 3, 13,
     "the tag !!python/object/apply:os.system is not allowed"),
    ("custom-tag", P + "  - tscale: !include other.yaml\n", 3, 13, "the tag !include is not allowed"),
    ("billion-laughs", "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n", 1, 35, "expands to more than 10,000 values"),
    ("recursive-alias", "version: 1\nsteps: &s [*s]\n", 2, 8, "nested deeper than 50 levels"),
    ("duplicate-key", "version: 1\nsteps: [tscale]\nsteps: [tpad]\n", 3, 1, "duplicate key 'steps' (first written at line 2)"),
    ("two-documents", "version: 1\nsteps: [tscale]\n---\nversion: 1\n", 3, 1, "expected a single document"),
    ("not-a-mapping", "- tpad: {layer: conv1, kernel: 5}\n", 1, 1, "expected a mapping with 'version: 1' and 'steps:', got a list"),
    ("empty", "", 1, 1, "got an empty file"),
]


@pytest.mark.parametrize("text,line,column,fragment", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_plan_is_rejected_at_its_line(text, line, column, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan, problems = parse_plan(text, "plan.yaml")
    hits = [p for p in problems if fragment in str(p)]
    assert hits, f"no problem mentions {fragment!r}: {[str(p) for p in problems]}"
    assert (hits[0].loc.line, hits[0].loc.column) == (line, column), str(hits[0])
    assert str(hits[0]).startswith(f"plan.yaml:{line}:{column}: ")


def test_every_problem_is_reported_at_once_in_file_order():
    text = ("version: 1\n"
            "stepz: 3\n"
            "steps:\n"
            "  - tpda: {layer: conv1}\n"
            "  - tpad: {layer: conv1, kernel: 4}\n"
            "  - tscale: {layer: fc, factr: 2}\n"
            "verify: {dtype: half}\n")
    _, problems = parse_plan(text, "p.yaml")
    assert [(p.loc.line, p.where) for p in problems] == [
        (2, "plan"), (4, "step 1"), (5, "step 2 (tpad)"), (6, "step 3 (tscale)"), (7, "verify")]


def test_invalid_plan_error_names_every_problem(tmp_path):
    path = write(tmp_path, "version: 3\nsteps:\n  - tpad: {layer: conv1, kernel: 2}\n")
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert len(info.value.problems) == 2 and info.value.exit_code == 2
    assert f"{path}:1:10: version" in str(info.value) and f"{path}:3:34: step 1 (tpad)" in str(info.value)


def test_oversized_and_binary_files_are_refused_before_parsing(tmp_path):
    big = write(tmp_path, "version: 1\n# " + "x" * MAX_BYTES + "\n", "big.yaml")
    _, problems = read_plan(big)
    assert "a plan may be at most 1,048,576 bytes" in problems[0].message
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"version: 1\nsteps: [\xff\xfe]\n")
    assert "not UTF-8" in read_plan(binary)[1][0].message
    assert "no such file" in read_plan(tmp_path / "missing.yaml")[1][0].message


# --------------------------------------------------------------------------- valid plans
def test_valid_plan_reads_every_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "batch.safetensors").write_bytes(b"")
    text = ("version: 1\nseed: 4\ndescription: grow the CNN\nsteps:\n"
            "  - tpad: {layer: conv1, kernel: 5}\n"
            "  - tscale\n"
            "  - tscale:\n"
            "  - tscale: {layer: conv2, factor: 1e-1, noise: 2.5E-3}\n"
            "verify: {batches: 2, dtype: float32, atol: 1e-6, rtol: 0, inputs: batch.safetensors}\n"
            "output: {path: out/, format: hf, shard_size: 10MiB}\n")
    plan, problems = parse_plan(text, "p.yaml")
    assert problems == []
    assert [(s.index, s.transform, s.options) for s in plan.steps] == [
        (1, "tpad", {"layer": "conv1", "kernel": 5}), (2, "tscale", {}), (3, "tscale", {}),
        (4, "tscale", {"layer": "conv2", "factor": 0.1, "noise": 0.0025})]
    assert plan.seed == 4 and plan.text == text
    assert (plan.verify.batches, plan.verify.dtype, plan.verify.atol, plan.verify.rtol) == (2, "float32", 1e-6, 0.0)
    assert plan.verify.inputs == Path("batch.safetensors")
    assert (plan.output.path, plan.output.format, plan.output.shard_size) == (Path("out"), "hf", 10 * 2**20)
    assert plan.position(plan.steps[3]) == "p.yaml:8:5"


def test_anchors_and_merge_keys_share_options():
    text = "version: 1\nsteps:\n  - tscale: &base {layer: fc, noise: 0.5}\n  - tscale: {<<: *base, noise: 0.25}\n"
    plan, problems = parse_plan(text)
    assert problems == []
    assert [s.options for s in plan.steps] == [{"layer": "fc", "noise": 0.5}, {"layer": "fc", "noise": 0.25}]


@pytest.mark.parametrize("text,size", [(4096, 4096), ("2GB", 2 * 10**9), ("1.5 MiB", 3 * 2**19), ("500kb", 500_000)])
def test_parse_size(text, size):
    assert parse_size(text) == size


TRANSFORM_SPECS = {**{n: t.spec for n, t in all_transforms().items()},
                   **{n: spec for n, (spec, _, _) in TEST_TRANSFORMS.items()}}


@pytest.mark.parametrize("name", sorted(TRANSFORM_SPECS), ids=[TRANSFORM_SPECS[n].__name__ for n in sorted(TRANSFORM_SPECS)])
def test_every_transform_option_round_trips_through_yaml(name):
    """Every registered spec's defaults, written as YAML, read back equal and type-check."""
    listify = lambda v: [listify(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    defaults = {f.name: listify(f.default) for f in dataclasses.fields(TRANSFORM_SPECS[name])
                if f.default is not dataclasses.MISSING}
    text = yaml.safe_dump({"version": 1, "steps": [{name: defaults}]}, sort_keys=False)
    plan, problems = parse_plan(text)
    assert listify(plan.steps[0].options) == defaults
    assert not [p for p in problems if "expects" in p.message or "unknown" in p.message], problems


# --------------------------------------------------------------------------- validate
def test_validate_valid_plan_exits_0(cli, tmp_path):
    path = write(tmp_path, P + "  - tpad: {layer: conv1, kernel: 5}\n  - tscale: {layer: fc}\n")
    r = cli("validate", path)
    assert (r.code, r.err) == (0, "")
    assert r.out.strip() == f"{path}: valid plan (version 1, 2 steps: tpad, tscale)"
    r = cli("validate", path, "--model", *CNN)
    assert r.code == 0 and r.out.strip().endswith(f"every step applies to {FIXTURES / 'cnn.pt'}")


def test_validate_with_model_finds_missing_layers_and_shrinking_sizes(cli, tmp_path):
    path = write(tmp_path, P +
                 "  - tpad: {layer: conv9, kernel: 5}\n"   # 3: no such layer
                 "  - tpad:\n"
                 "      layer: conv1\n"
                 "      kernel: 5\n"                       # 6: fine: conv1 becomes 5x5
                 "  - tpad:\n"
                 "      layer: conv1\n"
                 "      kernel: 3\n"                       # 9: 3 after 5 shrinks
                 "  - tscale: {layer: fc}\n"
                 "output: {path: out/}\n")                 # 11: an HF directory for a state_dict model
    r = cli("validate", path, "--model", *CNN)
    assert r.code == 2, r.err
    lines = r.err.splitlines()
    assert lines[0].startswith(f"{path}:3:19: step 1 (tpad): no match: convolution 'conv9' matches nothing; did you mean")
    assert "conv1" in lines[0] and "conv2" in lines[0]
    assert lines[1] == (f"{path}:9:15: step 3 (tpad): not growable: conv1 has kernel 5; the new kernel 3 is not larger "
                        "(checked without step 1, which could not be applied)")
    assert lines[2].startswith(f"{path}:11:16: output: ") and "Hugging Face directory" in lines[2]
    assert lines[3] == f"growcli: usage: {path}: invalid plan (3 problems)"
    # Without a model only the schema is checked, and this plan's schema is fine.
    assert cli("validate", path).code == 0


def test_validate_with_model_real_widen_refuses_a_smaller_size(cli, tmp_path):
    path = write(tmp_path, P + "  - widen: {layer: fc1, to: 48}\n  - widen:\n      layer: fc1\n      to: 40\n")
    r = cli("validate", path, "--model", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp")
    assert r.code == 2
    assert r.err.startswith(f"{path}:6:11: step 2 (widen): not growable:") and "40" in r.err.splitlines()[0]


def test_validate_json(cli, tmp_path):
    path = write(tmp_path, P + "  - tpad: {layer: conv1, kernel: 4}\n")
    r = cli("validate", path, "--json")
    assert r.code == 2
    data = json.loads(r.out)
    assert data["valid"] is False and data["steps"] == ["tpad"]
    assert [(p["line"], p["column"], p["where"], p["option"]) for p in data["problems"]] == [(3, 34, "step 1 (tpad)", "kernel")]


# --------------------------------------------------------------------------- grow
PLAN_OK = (P +
           "  - tpad: {layer: conv1, kernel: 5}\n"
           "  - tscale: {layer: fc, noise: 0.01}\n"
           "  - tpad:\n"
           "      layer: conv2\n"
           "      kernel: 5\n"
           "verify: {batches: 1}\n")  # one batch keeps float64 convolutions cheap


def test_grow_writes_output_with_plan_and_report(cli, tmp_path):
    plan = write(tmp_path, PLAN_OK + "seed: 5\n")
    out = tmp_path / "grown" / "cnn.safetensors"
    r = cli("grow", *CNN, "--plan", plan, "-o", out)
    assert r.code == 0, r.err
    assert "step 2: tscale fc — not function-preserving by design" in r.out
    meta = safetensors_metadata(out)
    assert meta["growcli.plan"] == plan.read_text()
    report = json.loads((tmp_path / "grown" / "cnn.growth_report.json").read_text())
    assert report["plan"] == plan.read_text()
    assert [s["transform"] for s in report["steps"]] == ["tpad", "tscale", "tpad"]
    assert [s["exact"] for s in report["steps"]] == [True, False, True]
    assert report["steps"][0]["verification"]["max_abs_diff"] <= 1e-10
    assert report["params_after"] - report["params_before"] == 8 * 3 * (25 - 9) + 12 * 8 * (25 - 9)
    assert json.loads(meta["growcli.steps"]) == report["steps"]

    # The file reloads onto a fresh original and computes what the plan's model computed.
    torch.manual_seed(0)
    original = growcli.load_model(FIXTURES / "cnn.pt", arch="growcli.zoo:cnn").module.double()
    grown = growcli.load_grown(SmallCNN(), out).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    scale = float(original(x).abs().max())
    diff = float((original(x) - grown(x)).abs().max())
    assert 1e-6 < diff / scale < 0.5  # tscale's noise is there, and not overwhelming
    assert grown.conv1.weight.shape == (8, 3, 5, 5) and grown.conv2.weight.shape == (12, 8, 5, 5)


def test_plan_equals_steps_applied_one_by_one(cli, tmp_path):
    plan = write(tmp_path, PLAN_OK)
    r = cli("grow", *CNN, "--plan", plan, "--seed", "3", "-o", tmp_path / "plan.safetensors")
    assert r.code == 0, r.err
    gm = growcli.load_model(FIXTURES / "cnn.pt", arch="growcli.zoo:cnn")
    for step in load_plan(plan).steps:
        growcli.apply(gm, step.transform, seed=3, **step.options)
    growcli.save_model(gm, tmp_path / "apart.safetensors")
    assert same_tensors(tmp_path / "plan.safetensors", tmp_path / "apart.safetensors") == 0.0


def test_same_seed_same_bytes_and_cli_seed_overrides_plan_seed(cli, tmp_path):
    plan = write(tmp_path, PLAN_OK + "seed: 1\n")
    outs = {name: tmp_path / f"{name}.safetensors" for name in ("a", "b", "c")}
    for name, extra in (("a", ()), ("b", ()), ("c", ("--seed", "2"))):
        assert cli("grow", *CNN, "--plan", plan, "-o", outs[name], *extra).code == 0
    assert outs["a"].read_bytes() == outs["b"].read_bytes()
    assert json.loads(safetensors_metadata(outs["c"])["growcli.steps"])[1]["verification"]["max_abs_diff"] > 0
    assert same_tensors(outs["a"], outs["c"]) > 1e-4  # the noise differs


def test_output_path_from_plan_and_override(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = write(tmp_path, PLAN_OK + "output: {path: out/from-plan.safetensors}\n")
    assert cli("grow", *CNN, "--plan", plan).code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["from-plan.growth_report.json", "from-plan.safetensors"]
    assert cli("grow", *CNN, "--plan", plan, "-o", "cli.safetensors").code == 0
    assert (tmp_path / "cli.safetensors").is_file() and (tmp_path / "cli.growth_report.json").is_file()
    r = cli("grow", *CNN, "--plan", write(tmp_path, PLAN_OK, "no-output.yaml"))
    assert r.code == 2 and "no-output.yaml has no output.path; pass -o OUTPUT" in r.err


FAILURES = [
    # id, steps, exit code, expected stderr (after "growcli: ")
    ("false-claim", "  - tpad: {layer: conv1, kernel: 5}\n  - tscale: {layer: conv2, factor: 2, claim: exact}\n"
     "  - tpad: {layer: conv2, kernel: 5}\n", 3, "verification failed: {plan}:4:5: step 2 (tscale) changed the function"),
    ("not-growable", "  - tpad: {layer: conv1, kernel: 5}\n  - tpad:\n      layer: conv1\n      kernel: 3\n", 1,
     "not growable: {plan}:4:5: step 2 (tpad): conv1 has kernel 5; the new kernel 3 is not larger"),
    ("no-match", "  - tpad: {layer: 'conv[3-9]', kernel: 5}\n", 1,
     "no match: {plan}:3:5: step 1 (tpad): convolution 'conv[3-9]' matches nothing"),
]


@pytest.mark.parametrize("steps,code,message", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
def test_grow_stops_at_the_failing_step_and_writes_nothing(cli, tmp_path, steps, code, message):
    plan = write(tmp_path, P + steps)
    r = cli("grow", *CNN, "--plan", plan, "-o", tmp_path / "out" / "cnn.safetensors")
    assert r.code == code
    assert r.err.startswith("growcli: " + message.format(plan=plan)), r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]


def test_grow_refuses_an_invalid_plan_before_loading_the_model(cli, tmp_path):
    plan = write(tmp_path, P + "  - tpad: {layer: conv1, kernel: 4}\n  - tscale: {lyer: fc}\n")
    r = cli("grow", FIXTURES / "no-such-model.pt", "--plan", plan, "-o", tmp_path / "x.safetensors")
    assert r.code == 2
    assert r.err.startswith(f"growcli: usage: {plan}: invalid plan (2 problems): {plan}:3:34: step 1 (tpad): ")
    assert f"{plan}:4:14: step 2 (tscale): unknown option 'lyer'" in r.err


def test_errors_outside_steps_are_not_blamed_on_a_step(cli, tmp_path):
    plan = write(tmp_path, PLAN_OK)
    r = cli("grow", *CNN, "--plan", plan, "-o", tmp_path / "hf-dir")
    assert r.code == 2 and ": step " not in r.err and "Hugging Face directory" in r.err


# --------------------------------------------------------------------------- dry run
def test_dry_run_shows_each_step_and_writes_nothing(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = write(tmp_path, PLAN_OK + "output: {path: out/cnn.safetensors}\n")
    r = cli("grow", *CNN, "--plan", plan, "--dry-run")
    assert r.code == 0, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]
    params = 2105
    grown = params + 8 * 3 * (25 - 9) + 12 * 8 * (25 - 9)
    expected = [
        f"step 1: tpad {{layer: conv1, kernel: 5}}  [{plan}:3:5]",
        "  matched: conv1",
        "  conv1.weight: [8, 3, 3, 3] → [8, 3, 5, 5]",
        f"  params: {params:,} → {params + 384:,}",
        "  function-preserving: yes; measured max abs diff ",
        f"step 2: tscale {{layer: fc, noise: 0.01}}  [{plan}:4:5]",
        "  matched: fc",
        f"  params: {params + 384:,} → {params + 384:,}",
        "  function-preserving: no, by design; measured max abs diff ",
        "  note: not function-preserving by design; measured: NOT equal in float64",
        f"step 3: tpad {{layer: conv2, kernel: 5}}  [{plan}:5:5]",
        "  matched: conv2",
        "  conv2.weight: [12, 8, 3, 3] → [12, 8, 5, 5]",
        f"params: {params:,} → {grown:,}; function-preserving overall: no",
        "would write: out/cnn.safetensors [safetensors]",
    ]
    lines = r.out.splitlines()
    position = 0
    for want in expected:  # in this order, each the start of a line
        found = [i for i, line in enumerate(lines) if i >= position and line.startswith(want)]
        assert found, f"missing {want!r} after line {position} in:\n{r.out}"
        position = found[0] + 1


def test_dry_run_json_is_one_object(cli, tmp_path):
    plan = write(tmp_path, PLAN_OK)
    r = cli("grow", *CNN, "--plan", plan, "--dry-run", "--json", "-o", tmp_path / "x.safetensors")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["dry_run"] is True and data["written"] == [] and not (tmp_path / "x.safetensors").exists()
    assert data["outputs"] == [{"path": str(tmp_path / "x.safetensors"), "format": "safetensors"}]
    first = data["steps"][0]
    assert first["changes"] == [{"name": "conv1.weight", "before": [8, 3, 3, 3], "after": [8, 3, 5, 5]}]
    assert first["exact"] is True and first["verification"]["passed"] and first["verification"]["max_abs_diff"] <= 1e-10
    assert [s["exact"] for s in data["steps"]] == [True, False, True] and data["function_preserving"] is False


def test_dry_run_of_a_failing_plan_shows_every_step_and_exits_like_the_run(cli, tmp_path):
    plan = write(tmp_path, P + FAILURES[0][1])
    r = cli("grow", *CNN, "--plan", plan, "--dry-run", "-o", tmp_path / "x.safetensors")
    assert r.code == 3
    assert r.err.startswith(f"growcli: verification failed: {plan}:4:5: step 2 (tscale) changed the function")
    assert "  FAILS: verification failed:" in r.out
    assert "  function-preserving: promised, but NOT equal; measured max abs diff " in r.out
    assert "step 3: tpad" in r.out and "  note: checked without step 2, which could not be applied" in r.out
    assert "function-preserving overall: no" in r.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]


# --------------------------------------------------------------------------- examples and acceptance
def _run_line(example: Path) -> list[str]:
    """The example's documented command (its ``# run:`` comment), without the leading ``growcli``."""
    for line in example.read_text().splitlines():
        if line.startswith("# run: growcli "):
            return shlex.split(line.removeprefix("# run: growcli "))
    raise AssertionError(f"{example} has no '# run: growcli …' line")


def _flags(options: dict) -> list[str]:
    """A step's options as its command's flags: plans and commands share the spec's field names."""
    args: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            args += [flag] if v is True else [flag, str(v)]
    return args


def test_the_examples_are_found():
    """The example test below is parametrised over examples/*.yaml; an empty glob would run nothing."""
    assert {"bert", "cnn", "mlp"} <= {e.stem for e in EXAMPLES}


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_example_plan_runs_and_equals_its_steps_run_as_commands(example, cli, tmp_path, monkeypatch):
    """Every example runs as its ``# run:`` line documents, and gives the same tensors as its
    steps run one by one as commands with the plan's seed (the acceptance test: bert.yaml is
    widen FFN + stack + deepen on the tiny BERT, cnn.yaml widen + deepen on the CNN)."""
    monkeypatch.chdir(ROOT)
    assert transforms_in(example) <= set(all_transforms())  # a missing transform fails here, by name
    plan = load_plan(example.relative_to(ROOT))
    args = _run_line(example)
    assert args[0] == "grow"
    for flag in ("-o", "--plan"):  # the test's own output; the model's arguments stay
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    model = args[1:]
    out = tmp_path / f"plan{Path(plan.output.path).suffix}"
    r = cli("grow", *model, "--plan", example.relative_to(ROOT), "-o", out)
    assert r.code == 0, r.err
    assert safetensors_metadata(out)["growcli.plan"] == example.read_text()

    current = model
    for step in plan.steps:
        last = step is plan.steps[-1]
        # Intermediate results in a format that reloads on its own: a Hugging Face directory
        # for a Hugging Face model, else safetensors (which records --arch).
        step_out = tmp_path / f"step{step.index}{out.suffix if last or not Path(model[0]).is_dir() else ''}"
        r = cli(step.transform, *current, *_flags(step.options), "--seed", str(plan.seed or 0), "-o", step_out)
        assert r.code == 0, f"{step.label}: {r.err}"
        current = [step_out]
    assert same_tensors(out, current[0]) == 0.0


def test_the_documented_plans_are_valid():
    """The plans docs/plans.md shows parse with no problem and hold the steps the text says."""
    blocks = [b.split("```", 1)[0] for b in (ROOT / "docs" / "plans.md").read_text().split("```yaml\n")[1:]]
    parsed = [parse_plan(b, "docs/plans.md") for b in blocks]
    assert [problems for _, problems in parsed] == [[]] * len(blocks)
    steps = [[(s.transform, s.options) for s in plan.steps] for plan, _ in parsed]
    assert steps[0] == [("widen", {"layer": "conv1", "to": 12}), ("deepen", {"after": "conv1"}), ("stack", {})]
    assert steps[1] == [("widen", {"layer": "fc1", "factor": 2, "split": "uniform"}),
                        ("widen", {"layer": "fc2", "factor": 2, "split": "uniform"})]  # anchors and merge keys


def test_ci_recipe_grow_then_verify(cli, tmp_path):
    """The README's CI steps: validate (0), grow (0), verify in a separate call (0; 3 when not equal)."""
    exact = write(tmp_path, P + "  - tpad: {layer: conv1, kernel: 5}\n", "exact.yaml")
    assert cli("validate", exact, "--model", *CNN).code == 0
    assert cli("grow", *CNN, "--plan", exact, "-o", tmp_path / "exact.safetensors").code == 0
    r = cli("verify", *CNN, tmp_path / "exact.safetensors")
    assert r.code == 0 and "equal in float64" in r.out
    approx = write(tmp_path, PLAN_OK, "approx.yaml")
    assert cli("grow", *CNN, "--plan", approx, "-o", tmp_path / "approx.safetensors").code == 0
    assert cli("verify", *CNN, tmp_path / "approx.safetensors").code == 3


def test_hf_directory_output_with_shard_size(cli, tmp_path):
    plan = write(tmp_path, P + "  - tscale: {layer: pooler.dense, claim: exact}\n"
                 f"verify: {{batches: 1}}\noutput: {{path: {tmp_path / 'bert'}, shard_size: 50kB}}\n")
    r = cli("grow", FIXTURES / "bert-tiny", "--plan", plan)
    assert r.code == 0, r.err
    shards = sorted(p.name for p in (tmp_path / "bert").glob("*.safetensors"))  # 22,496 float32 parameters
    assert len(shards) == 2 and (tmp_path / "bert" / "model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "bert" / "growth_report.json").read_text())["plan"] == plan.read_text()
    assert cli("verify", FIXTURES / "bert-tiny", tmp_path / "bert").code == 0


def test_help_shows_an_example(cli):
    for command in ("grow", "validate"):
        r = cli(command, "--help")
        assert r.code == 0 and f"Example: growcli {command} " in r.out
