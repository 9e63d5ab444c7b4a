"""branch: a layer or block becomes N parallel branches, merged by a weighted sum or a concatenation.

Every case runs the registered transform (which verifies itself in float64) and the test then
asserts the measured numbers: float64 max abs diff ≤ 1e-10, bit-for-bit equality in float32,
bfloat16 and float16 for power-of-two merge weights, the rounding bound for other weights,
parameter counts and branch shapes, that refusals name the operation, that later growth
(widen) inside a branch stays exact, and that every output format reloads and re-verifies.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from torch import nn

import growcli
from growcli import zoo
from growcli.core.errors import ArchitectureError, NoMatchingModuleError, NotGrowableError, UsageError
from growcli.core.inputs import make_batches, spec_from_batch
from growcli.core.model import GrowModel
from growcli.core.module_specs import build_module
from growcli.io.load import load_model
from growcli.nn import Branches
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.catalog import all_transforms, build_spec
from growcli.transforms.registry import Context
from growcli.verification.compare import verify_models

ARCH = {"mlp": "growcli.zoo:mlp", "cnn": "growcli.zoo:cnn", "resnet": "growcli.zoo:resnet"}
FACTORY = {"mlp": zoo.MLP, "cnn": zoo.SmallCNN, "resnet": zoo.ResNetTiny}


@pytest.fixture(scope="module")
def bases():
    return {name: load_model(FIXTURES / f"{name}.pt", arch=arch) for name, arch in ARCH.items()}


def grow(base: GrowModel, transform: str = "branch", **options):
    """Apply ``transform`` to a copy of ``base``; the step verifies itself in float64 on 2 batches."""
    gm = copy.deepcopy(base)
    return gm, run_step(gm, transform, options, Context(seed=0), VerifySettings(batches=2))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def out_channels(module: nn.Module) -> int:
    return module.weight.shape[0]


# --------------------------------------------------------------------------- exact on every model
CASES = [
    # model, layer, merge, branches, path of the sliced layer inside a branch (concat)
    ("mlp", "fc1", "add", 2, None), ("mlp", "fc1", "add", 3, None), ("mlp", "fc3", "concat", 3, ""),
    ("mlp", "fc2", "concat", 2, ""),
    ("cnn", "conv1", "add", 4, None), ("cnn", "conv2", "concat", 3, ""), ("cnn", "conv1", "concat", 2, ""),
    ("cnn", "fc", "add", 2, None), ("cnn", "bn2", "add", 2, None),
    ("resnet", "stem", "concat", 2, ""), ("resnet", "layer2.0.conv1", "concat", 3, ""),
    ("resnet", "layer1.0", "add", 2, None), ("resnet", "layer2.0", "add", 3, None), ("resnet", "layer1", "add", 2, None),
    ("resnet", "layer2.0.shortcut.0", "add", 2, None),
]


@pytest.mark.parametrize("model,layer,merge,n,sliced", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}{c[3]}" for c in CASES])
def test_branching_is_exact(bases, model, layer, merge, n, sliced):
    base = bases[model]
    original = base.module.get_submodule(layer)
    gm, report = grow(base, layer=layer, merge=merge, branches=n)
    v = report.verification
    assert v["passed"] and v["dtype"] == "float64" and v["max_abs_diff"] <= 1e-10
    assert report.exact_in_dtype and v["basis"].startswith("exact in float32")  # held to float64-level tolerances
    new = gm.module.get_submodule(layer)
    assert isinstance(new, Branches) and new.merge == merge and len(new.branches) == n
    assert report.matched == [layer] and report.changes[0]["name"] == layer
    if merge == "add":
        assert new.weights == [1 / n] * n
        assert report.params_after - report.params_before == (n - 1) * n_params(original)
        for b in new.branches:  # exact copies, each with its own storage
            for (k, p), q in zip(b.state_dict().items(), original.state_dict().values()):
                assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), k
    else:
        c = out_channels(original)
        sizes = [out_channels(b.get_submodule(sliced)) for b in new.branches]
        assert sum(sizes) == c and max(sizes) - min(sizes) <= 1
        rows = torch.cat([b.get_submodule(sliced).weight for b in new.branches])
        assert torch.equal(rows, original.weight)  # every output channel lives in exactly one branch
        assert report.params_after == report.params_before  # a leaf layer's rows are shared out, not copied


def test_uneven_sizes_and_weights(bases):
    gm, report = grow(bases["cnn"], layer="conv2", merge="concat", branches=3, sizes=[2, 3, 7])
    assert [b.out_channels for b in gm.module.conv2.branches] == [2, 3, 7]
    assert report.verification["max_abs_diff"] <= 1e-10
    assert report.changes[0]["after"] == "3 branches of 2+3+7 output channels, concatenated"
    gm, report = grow(bases["mlp"], layer="fc2", merge="add", branches=3, weights=[0.5, 0.25, 0.25])
    assert gm.module.fc2.weights == [0.5, 0.25, 0.25] and report.notes == []
    assert report.verification["max_abs_diff"] == 0.0
    _, report = grow(bases["mlp"], layer="fc2", merge="add", branches=3)
    assert report.verification["max_abs_diff"] <= 1e-15 and "not all powers of two" in report.notes[0]


def test_list_of_layers(bases):
    gm, report = grow(bases["resnet"], layer=["layer1.0.conv1", "layer1.1.conv2"], merge="concat")
    assert report.matched == ["layer1.0.conv1", "layer1.1.conv2"] and len(report.changes) == 2
    assert isinstance(gm.module.layer1[1].conv2, Branches) and report.verification["max_abs_diff"] <= 1e-10


def _sequential_model(dtype=torch.float64):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 10), nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 9), nn.Tanh()),
                          nn.Linear(9, 3)).to(dtype)
    x = torch.randn(4, 6, dtype=dtype)
    return GrowModel(model, "state_dict", Path("mem"), "0", spec_from_batch(((x,), {})))


def test_block_concat_slices_the_final_layer_read_from_the_trace():
    """A block whose output is its last Linear (through tanh): each branch keeps a share of that Linear's rows."""
    gm, report = grow(_sequential_model(), layer="1", merge="concat", branches=3)
    new = gm.module[1]
    assert isinstance(new, Branches) and new.dim == -1
    assert [b[2].out_features for b in new.branches] == [3, 3, 3] and all(b[0].out_features == 12 for b in new.branches)
    assert report.verification["max_abs_diff"] <= 1e-10


# --------------------------------------------------------------------------- exactness in the weights' dtype
def _own_dtype_diff(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, **options) -> tuple[float, float]:
    """(max abs diff, max |output|) between the model and its branched copy, both evaluated in ``dtype``."""
    model = model.to(dtype).eval()
    gm = GrowModel(copy.deepcopy(model), "state_dict", Path("mem"), "0", spec_from_batch(((x[:2].to(dtype),), {})))
    run_step(gm, "branch", options, Context(), VerifySettings(batches=1))
    with torch.no_grad():
        a, b = model(x.to(dtype)).double(), gm.module.eval()(x.to(dtype)).double()
    return (a - b).abs().max().item(), a.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", [dict(branches=2), dict(branches=4), dict(branches=3, weights=[0.25, 0.5, 0.25])],
                         ids=["halves", "quarters", "dyadic3"])
@pytest.mark.parametrize("model,layer", [("cnn", "conv2"), ("resnet", "layer1.0")])
def test_power_of_two_weights_are_bit_exact_in_every_dtype(dtype, options, model, layer):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 16, 16)
    diff, _ = _own_dtype_diff(FACTORY[model](), x, dtype, layer=layer, merge="add", **options)
    assert diff == 0.0


@pytest.mark.parametrize("dtype,ulp", [(torch.float32, 2.0 ** -23), (torch.bfloat16, 2.0 ** -7)], ids=str)
def test_other_weights_round_within_a_few_ulps(dtype, ulp):
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    for options in (dict(branches=3), dict(branches=2, weights=[0.7, 0.3])):
        diff, scale = _own_dtype_diff(zoo.MLP(), x, dtype, layer="fc2", merge="add", **options)
        assert diff <= 4 * ulp * scale, (options, diff, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_concat_is_bit_exact_in_low_precision(dtype):
    torch.manual_seed(0)
    diff, _ = _own_dtype_diff(zoo.SmallCNN(), torch.randn(4, 3, 16, 16), dtype, layer="conv2", merge="concat",
                              branches=3)
    assert diff == 0.0


# --------------------------------------------------------------------------- later growth inside branches
WIDEN_INSIDE = [
    # model, branched layer, merge, widened layer, new width
    ("mlp", "fc1", "add", "fc1.branches.0", 40),
    ("mlp", "fc1", "concat", "fc1.branches.0", 40),
    ("cnn", "conv1", "concat", "conv1.branches.1", 10),
    ("resnet", "layer1.0", "add", "layer1.0.branches.1.conv1", 12),
    ("resnet", "layer2.0.conv1", "concat", "layer2.0.conv1.branches.0", 12),
]


@pytest.mark.parametrize("model,layer,merge,widened,to", WIDEN_INSIDE, ids=[f"{c[0]}-{c[3]}" for c in WIDEN_INSIDE])
def test_widen_inside_a_branch_stays_exact_and_replays(bases, tmp_path, model, layer, merge, widened, to):
    gm, _ = grow(bases[model], layer=layer, merge=merge)
    report = run_step(gm, "widen", {"layer": widened, "to": to}, Context(seed=0), VerifySettings(batches=2))
    assert report.verification["max_abs_diff"] <= 1e-10
    assert gm.module.get_submodule(widened).weight.shape[0] == to
    out = tmp_path / "g.safetensors"
    growcli.save_model(gm, out)
    grown = growcli.load_grown(FACTORY[model](), out)  # replays branch, then widen, on a fresh model
    assert grown.get_submodule(widened).weight.shape[0] == to
    assert verify_models(bases[model].module, grown, make_batches(bases[model].inputs, 3)).max_abs_diff <= 1e-10


def test_nested_branches_and_deepen_inside(bases):
    gm, _ = grow(bases["mlp"], layer="fc1", merge="concat")
    report = run_step(gm, "branch", {"layer": "fc1.branches.1", "merge": "add", "branches": 4}, Context(),
                      VerifySettings(batches=2))
    assert len(gm.module.fc1.branches[1].branches) == 4 and report.verification["max_abs_diff"] <= 1e-10
    report = run_step(gm, "deepen", {"after": "fc1.branches.0"}, Context(), VerifySettings(batches=2))
    assert report.verification["max_abs_diff"] <= 1e-10


# --------------------------------------------------------------------------- refusals
class Shared(nn.Module):
    """One Linear called twice, and a Linear whose weight the parent also reads."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)

    def forward(self, x):
        return self.a(self.a(x)) + self.b(x) + x @ self.b.weight.T


def _module_gm(model: nn.Module, x: torch.Tensor) -> GrowModel:
    return GrowModel(model.double(), "state_dict", Path("mem"), "0", spec_from_batch(((x.double(),), {})))


@pytest.mark.parametrize("model,options,error,pattern", [
    ("resnet", dict(layer="layer1.0", merge="concat"), NotGrowableError,
     r"concat: 'layer1.0''s output is computed by add.Tensor in 'layer1.0', not by a Linear or Conv"),
    ("cnn", dict(layer="bn1", merge="concat"), NotGrowableError, r"computed by batch_norm\.default in 'bn1'"),
    ("resnet", dict(layer="layer1", merge="add"), None, None),
    ("resnet", dict(layer="layer1.0*", merge="add"), UsageError, r"'layer1.0' and 'layer1.0.conv1' overlap"),
    ("mlp", dict(layer="fc3", merge="concat", branches=5), NotGrowableError, r"'fc3' has 4 output channels, fewer than 5"),
    ("mlp", dict(layer="fc1", merge="concat", sizes=[10, 10]), UsageError, r"add up to 20, but 'fc1' has 32"),
    ("mlp", dict(layer="fc9", merge="add"), NoMatchingModuleError, r"layer 'fc9' matches nothing; did you mean"),
])
def test_refusals_name_the_reason(bases, model, options, error, pattern):
    if error is None:
        assert grow(bases[model], **options)[1].verification["max_abs_diff"] <= 1e-10
        return
    gm = copy.deepcopy(bases[model])
    before = [(k, v.clone()) for k, v in gm.module.state_dict().items()]
    with pytest.raises(error, match=pattern):
        run_step(gm, "branch", options, Context(), VerifySettings(batches=1))
    assert [(k, v) for k, v in gm.module.state_dict().items()] and gm.edits.records == []
    assert all(torch.equal(v, dict(gm.module.state_dict())[k]) for k, v in before)


def test_refuses_shared_modules_outside_reads_and_grouped_concat():
    gm = _module_gm(Shared(), torch.randn(3, 5))
    with pytest.raises(NotGrowableError, match=r"'a' is called 2 times in one forward pass \(a shared module\)"):
        run_step(gm, "branch", {"layer": "a", "merge": "add"})
    with pytest.raises(NotGrowableError, match=r"'b''s weight is read by \S+, outside its forward"):
        run_step(gm, "branch", {"layer": "b", "merge": "add"})
    mobile = _module_gm(zoo.MobileNetBlock(), torch.randn(2, 3, 8, 8))
    with pytest.raises(NotGrowableError, match=r"'depthwise' is a grouped convolution \(16 groups\)"):
        run_step(mobile, "branch", {"layer": "depthwise", "merge": "concat"})
    report = run_step(mobile, "branch", {"layer": "depthwise", "merge": "add"}, Context(), VerifySettings(batches=2))
    assert report.verification["max_abs_diff"] <= 1e-10


def test_refuses_tied_weights_and_kv_cache_blocks():
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    gm = _module_gm(tied, torch.randn(2, 4))
    with pytest.raises(NotGrowableError, match=r"'0' shares a parameter with '2.weight' \(tied weights\)"):
        run_step(gm, "branch", {"layer": "0", "merge": "add"})
    llama = load_model(FIXTURES / "llama-tiny")
    with pytest.raises(NotGrowableError, match=r"'model.layers.0' holds a KV-cache index \(self_attn.layer_idx = 0\)"):
        run_step(llama, "branch", {"layer": "model.layers.0", "merge": "add"})
    report = run_step(llama, "branch", {"layer": "model.layers.0.mlp.down_proj", "merge": "concat"}, Context(),
                      VerifySettings(batches=2))
    assert report.verification["max_abs_diff"] <= 1e-10


def test_refuses_a_pt2_program():
    gm = load_model(FIXTURES / "mlp.pt2")
    with pytest.raises(NotGrowableError, match=r"a \.pt2 program has no layer modules to replace .* --arch"):
        run_step(gm, "branch", {"layer": "fc1", "merge": "add"})


@pytest.mark.parametrize("options,pattern", [
    (dict(merge="add", branches=1), r"branches 1: need at least 2"),
    (dict(merge="add", weights=[0.5, 0.6]), r"weights \[0.5, 0.6\] sum to 1.1, not 1"),
    (dict(merge="add", weights=[0.5, 0.25, 0.25]), r"3 weights for 2 branches .*set branches to 3"),
    (dict(merge="add", weights=[1.5, -0.5]), r"every merge weight must be positive"),
    (dict(merge="concat", weights=[0.5, 0.5]), r"weights are for merge add"),
    (dict(merge="add", sizes=[1, 2]), r"sizes are for merge concat"),
    (dict(merge="concat", sizes=[0, 3]), r"at least one output channel"),
    (dict(merge="mean"), r"option 'merge' of branch expects one of 'add', 'concat'"),
])
def test_spec_problems(options, pattern):
    with pytest.raises(UsageError, match=pattern):
        build_spec("branch", {"layer": "fc1", **options})


# --------------------------------------------------------------------------- CLI and every output format
@pytest.mark.parametrize("model,extra,suffixes", [
    ("cnn", ["--layer", "conv2", "--merge", "concat", "-n", "3"], [".safetensors", ".pt2", ".onnx"]),
    ("resnet", ["--layer", "layer2.0", "--merge", "add", "--weights", "0.75", "--weights", "0.25"],
     [".safetensors", ".pt2"]),
    ("mlp", ["--layer", "fc1", "--layer", "fc2", "--merge", "add", "-n", "4"], [".safetensors"]),
])
def test_cli_writes_every_format_and_each_reverifies(cli, tmp_path, model, extra, suffixes):
    outs = [tmp_path / f"g{s}" for s in suffixes]
    r = cli("branch", FIXTURES / f"{model}.pt", "--arch", ARCH[model], *extra, *[a for o in outs for a in ("-o", o)],
            "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verification"]["passed"] and report["function_preserving"]
    assert report["verification"]["max_abs_diff"] <= 1e-10
    for out in outs:
        v = cli("verify", FIXTURES / f"{model}.pt", out, "--arch", ARCH[model], "--json")
        assert v.code == 0, (out, v.err)
        assert json.loads(v.out)["passed"]
    grown = growcli.load_grown(FACTORY[model](), outs[0])
    original = load_model(FIXTURES / f"{model}.pt", arch=ARCH[model])
    assert verify_models(original.module, grown, make_batches(original.inputs, 3)).max_abs_diff <= 1e-10
    assert any(isinstance(m, Branches) for m in grown.modules())


def test_pickled_module_in_and_out(cli, tmp_path):
    out = tmp_path / "m.pt"
    r = cli("branch", FIXTURES / "mlp_module.pt", "--trust-pickle", "--layer", "fc3", "--merge", "concat", "-o", out)
    assert r.code == 0, r.err
    v = cli("verify", FIXTURES / "mlp_module.pt", out, "--trust-pickle", "--json")
    assert v.code == 0 and json.loads(v.out)["max_abs_diff"] <= 1e-10, v.err


def test_plan_branch_then_widen(cli, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nsteps:\n  - branch: {layer: conv1, merge: concat, branches: 2}\n"
                    "  - widen: {layer: conv1.branches.0, to: 8}\n")
    out = tmp_path / "g.safetensors"
    r = cli("grow", FIXTURES / "cnn.pt", "--arch", ARCH["cnn"], "--plan", plan, "-o", out, "--json")
    assert r.code == 0, r.err
    grown = growcli.load_grown(zoo.SmallCNN(), out)
    assert [b.out_channels for b in grown.conv1.branches] == [8, 4] and grown.bn1.num_features == 12


@pytest.mark.parametrize("args,code,message", [
    (["--layer", "fc1", "--merge", "add"], 2, "branch needs at least one -o OUTPUT"),
    (["--layer", "fc1", "--merge", "sum", "-o", "x.safetensors"], 2, "option 'merge' of branch expects one of"),
    (["--layer", "fc1", "--merge", "add", "--weights", "0.5", "-o", "x.safetensors"], 2, "1 weights for 2 branches"),
    (["--layer", "nothing", "--merge", "add", "-o", "x.safetensors"], 1, "layer 'nothing' matches nothing"),
    (["--layer", "fc3", "--merge", "concat", "-n", "5", "-o", "x.safetensors"], 1, "fewer than 5 branches"),
])
def test_cli_errors(cli, tmp_path, args, code, message):
    args = [str(tmp_path / a) if a.endswith(".safetensors") else a for a in args]
    r = cli("branch", FIXTURES / "mlp.pt", "--arch", ARCH["mlp"], *args)
    assert r.code == code and message in r.err, r.err
    assert "Traceback" not in r.err and not list(tmp_path.iterdir())


def test_cli_help_has_example(cli):
    r = cli("branch", "--help")
    assert r.code == 0 and "Example: growcli branch" in r.out


def test_candidates_say_what_can_be_branched(bases):
    growable = all_transforms()["branch"].candidates(bases["resnet"])
    assert growable["layer1.0"] is None and growable["layer1.0.conv1"] is None and growable["fc"] is None
    assert growable["layer1"] is None and growable["layer2.0.shortcut"] is None
    program = all_transforms()["branch"].candidates(load_model(FIXTURES / "mlp.pt2"))
    assert list(program) == ["(model)"] and "a .pt2 program has no layer modules" in program["(model)"]


def test_unbatched_conv_concatenates_along_its_channels():
    torch.manual_seed(0)
    gm = _module_gm(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU()), torch.randn(3, 8, 8))
    report = run_step(gm, "branch", {"layer": "0", "merge": "concat"}, Context(), VerifySettings(batches=2))
    assert gm.module[0].dim == 0 and report.verification["max_abs_diff"] <= 1e-10


def test_a_recorded_spec_with_bad_arguments_is_refused():
    with pytest.raises(ArchitectureError, match=r"cannot build growcli.nn:Branches from its recorded arguments "
                                                r"\(ValueError: merge 'mean': expected one of add, concat\)"):
        build_module({"type": "growcli.nn:Branches", "kwargs": {"merge": "mean"}}, nn.Module())
    merged = build_module({"type": "growcli.nn:Branches", "kwargs": {"merge": "add", "weights": [0.5, 0.5]}},
                          nn.Module())
    merged.branches.append(nn.Identity())
    with pytest.raises(ArchitectureError, match="Branches has 1 branches but 2 merge weights"):
        merged(torch.zeros(1))


def test_block_concat_slices_batchnorms_after_the_final_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                          nn.Sequential(nn.Conv2d(8, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU()), nn.Conv2d(10, 4, 1))
    bn = model[1][1]
    for t in (bn.weight, bn.bias, bn.running_mean):
        nn.init.uniform_(t)
    nn.init.uniform_(bn.running_var, 0.5, 2.0)
    gm = _module_gm(model, torch.randn(2, 3, 8, 8))
    running_var = bn.running_var.clone()  # the original module becomes branch 0
    report = run_step(gm, "branch", {"layer": "1", "merge": "concat", "branches": 3}, Context(), VerifySettings(batches=2))
    assert report.matched == ["1"] and report.verification["max_abs_diff"] <= 1e-10
    assert [(b[0].out_channels, b[1].num_features) for b in gm.module[1].branches] == [(4, 4), (3, 3), (3, 3)]
    assert torch.equal(torch.cat([b[1].running_var for b in gm.module[1].branches]), running_var)
    assert report.params_after == report.params_before
    report = run_step(gm, "widen", {"layer": "1.branches.0.0", "to": 7}, Context(), VerifySettings(batches=2))
    assert report.verification["max_abs_diff"] <= 1e-10 and gm.module[1].branches[0][1].num_features == 7


def test_block_concat_refuses_a_batchnorm_over_another_dimension():
    torch.manual_seed(0)
    gm = _module_gm(nn.Sequential(nn.Linear(5, 8), nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))),
                    torch.randn(4, 8, 5))  # BatchNorm1d normalises dimension 1 of [4, 8, 8], not the features
    with pytest.raises(NotGrowableError, match=r"a BatchNorm in '1' normalises dimension 1, not the channels of "
                                               r"'1.0' \(dimension -1 of 3\)"):
        run_step(gm, "branch", {"layer": "1", "merge": "concat"})
