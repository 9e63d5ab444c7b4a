"""widen: exact Net2WiderNet on real architectures, driven by one table of cases.

Each case builds a real model with random weights, widens one layer through the registered
transform (which verifies it in float64), and the test then re-measures the difference
itself: float64 models must agree to 1e-10, float32 models to 1e-5 of the output scale.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES

from growcli import zoo
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context
from growcli.transforms.widen import widen_candidates
from growcli.verification.compare import flatten_outputs


def _hf(name: str):
    import transformers as T

    if name == "resnet":
        return T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")), \
            {"pixel_values": torch.randn(2, 3, 32, 32)}
    if name == "regnet":
        return T.RegNetModel(T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4)), \
            {"pixel_values": torch.randn(2, 3, 32, 32)}
    if name == "mobilenetv2":
        m = T.MobileNetV2Model(T.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_channels=3))
        return m, {"pixel_values": torch.randn(2, 3, 32, 32)}
    if name == "vit":
        return T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                      image_size=16, patch_size=8)), {"pixel_values": torch.randn(2, 3, 16, 16)}
    if name == "bert":
        return T.BertModel(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=32)), \
            {"input_ids": torch.randint(0, 100, (2, 8))}
    raise KeyError(name)


def build(name: str):
    """(module, batch) for a case name: ``zoo:Class`` or ``hf:family``."""
    torch.manual_seed(0)
    kind, _, what = name.partition(":")
    if kind == "zoo":
        m = getattr(zoo, what)()
        for mod in m.modules():  # non-trivial BatchNorm statistics: copying them must matter
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
        return m.eval(), (m.example_inputs(), {})
    m, kwargs = _hf(what)
    for mod in m.modules():  # He init: small-std HF inits shrink deep conv nets' outputs to denormals
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight)
    return m.eval(), ((), kwargs)


def as_model(module, batch, dtype) -> GrowModel:
    module = copy.deepcopy(module).to(dtype).eval()
    args, kwargs = batch
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    batch = (tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()})
    return GrowModel(module, "state_dict", Path("mem"), "0", spec_from_batch(batch))


# (case, layer, options, layers expected to grow in the same coupled group)
EXACT_CASES = [
    ("zoo:MLP", "fc1", {"to": 48}, []),
    ("zoo:MLP", "fc2", {"factor": 2.0}, []),
    ("zoo:SmallCNN", "conv1", {"to": 13}, []),
    ("zoo:SmallCNN", "conv2", {"by": 5}, []),  # flatten into the Linear: each channel owns 16 columns
    ("zoo:ResNetTiny", "stem", {"to": 12}, ["layer1.0.conv2", "layer1.1.conv2"]),  # residual adds
    ("zoo:ResNetTiny", "layer1.0.conv1", {"to": 11}, []),
    ("zoo:ResNetTiny", "layer2.0.shortcut.0", {"to": 20}, ["layer2.0.conv2", "layer2.1.conv2"]),
    ("zoo:DenseNetTiny", "stem", {"by": 3}, []),  # concatenation at offset 0
    ("zoo:DenseNetTiny", "convs.1", {"by": 3}, []),  # concatenation at an offset
    ("zoo:MobileNetBlock", "expand", {"to": 24}, []),  # depthwise conv in between
    ("zoo:MobileNetBlock", "stem", {"to": 12}, ["project"]),
    ("zoo:SENet", "conv", {"to": 12}, ["se_expand"]),  # channel-wise multiply by a gate
    ("zoo:SENet", "se_reduce", {"to": 6}, []),
    ("zoo:TinyTransformer", "blocks.0.up", {"factor": 1.5}, []),
    ("hf:resnet", "embedder.embedder.convolution", {"to": 12}, ["encoder.stages.0.layers.0.layer.1.convolution"]),
    ("hf:resnet", "encoder.stages.1.layers.0.layer.0.convolution", {"to": 20}, []),
    ("hf:regnet", "encoder.stages.0.layers.0.layer.0.convolution", {"to": 12}, []),  # grouped conv (2 groups)
    ("hf:regnet", "encoder.stages.0.layers.0.layer.3.convolution", {"to": 12}, ["encoder.stages.0.layers.0.shortcut.convolution"]),
    ("hf:mobilenetv2", "conv_stem.first_conv.convolution", {"by": 4}, []),
    ("hf:mobilenetv2", "layer.0.expand_1x1.convolution", {"by": 4}, []),
    ("hf:vit", "layers.0.mlp.fc1", {"factor": 2.0}, []),
    ("hf:bert", "encoder.layer.1.intermediate.dense", {"factor": 2.0}, []),
]


@pytest.fixture(scope="module")
def models():
    cache: dict[str, tuple] = {}

    def get(name):
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


def _measure(before: torch.nn.Module, after: torch.nn.Module, batch, dtype) -> float:
    """max |a - b| / max |a| over every output, measured here independently of growcli.verification.compare."""
    args, kwargs = batch
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    with torch.no_grad():
        a = flatten_outputs(before(*args, **kwargs))
        b = flatten_outputs(after(*args, **kwargs))
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, k
        worst = max(worst, float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-30)))
    return worst


@pytest.mark.parametrize("case,layer,options,coupled", EXACT_CASES, ids=[f"{c[0]}-{c[1]}" for c in EXACT_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_widen_is_exact(models, case, layer, options, coupled, dtype):
    module, batch = models(case)
    gm = as_model(module, batch, dtype)
    before = copy.deepcopy(gm.module)
    old_size = before.get_parameter(f"{layer}.weight").shape[0 if "embed" not in layer else 1]
    report = run_step(gm, "widen", {"layer": layer, **options}, Context(seed=1), VerifySettings(batches=2))
    new_size = gm.module.get_parameter(f"{layer}.weight").shape[0]
    assert new_size > old_size
    for other in coupled:  # every producer of the coupled group grew to the same size
        assert gm.module.get_parameter(f"{other}.weight").shape[0] == new_size, other
    assert report.verification["passed"]
    rel = _measure(before, gm.module, make_fresh_batch(batch), dtype)
    assert rel <= (1e-10 if dtype == torch.float64 else 1e-5), rel
    assert gm.num_parameters() > sum(p.numel() for p in before.parameters())


def make_fresh_batch(batch):
    """A batch growcli has not seen: same shapes, new values."""
    gen = torch.Generator().manual_seed(123)
    args, kwargs = batch
    new = lambda t: torch.randn(t.shape, generator=gen) if t.is_floating_point() else t  # noqa: E731
    return tuple(new(a) for a in args), {k: new(v) for k, v in kwargs.items()}


EVERY_LAYER_MODELS = ["zoo:MLP", "zoo:SmallCNN", "zoo:ResNetTiny", "zoo:DenseNetTiny", "zoo:MobileNetBlock", "zoo:SENet",
                      "hf:resnet", "hf:regnet", "hf:mobilenetv2", "hf:vit", "hf:bert"]


@pytest.mark.parametrize("case", EVERY_LAYER_MODELS)
def test_every_widenable_layer_is_exact_in_float64(models, case):
    """Each layer inspect calls widenable really widens exactly; the rest say why not."""
    module, batch = models(case)
    gm = as_model(module, batch, torch.float64)
    candidates = widen_candidates(gm)
    widenable = [layer for layer, reason in candidates.items() if reason is None]
    assert widenable, candidates
    for layer in widenable:
        grown = as_model(module, batch, torch.float64)
        report = run_step(grown, "widen", {"layer": layer, "factor": 2.0}, Context(seed=4), VerifySettings(batches=2))
        assert report.verification["max_abs_diff"] <= 1e-10 * max(1.0, report.verification["outputs"][0]["scale"]), layer
    assert all(isinstance(reason, str) and reason for reason in candidates.values() if reason is not None)


NOT_WIDENABLE = [
    ("zoo:MLP", "fc3", "reach the model's output"),
    ("zoo:MobileNetBlock", "depthwise", "depthwise convolution's channels follow its input"),
    ("zoo:TinyTransformer", "blocks.0.down", "LayerNorm"),
    ("hf:vit", "layers.0.attention.q_proj", "splits the grown dimension"),
    ("hf:bert", "encoder.layer.0.output.dense", "LayerNorm"),
]


@pytest.mark.parametrize("case,layer,reason", NOT_WIDENABLE, ids=[f"{c[0]}-{c[1]}" for c in NOT_WIDENABLE])
def test_not_widenable_is_refused_with_reason(models, case, layer, reason):
    module, batch = models(case)
    gm = as_model(module, batch, torch.float32)
    assert reason in widen_candidates(gm)[layer]
    with pytest.raises(NotGrowableError, match=reason):
        run_step(gm, "widen", {"layer": layer, "by": 2}, Context(), VerifySettings())


def test_grouped_conv_needs_a_multiple_of_the_groups(models):
    module, batch = models("hf:regnet")
    gm = as_model(module, batch, torch.float32)
    with pytest.raises(NotGrowableError, match="multiple of 2"):
        run_step(gm, "widen", {"layer": "encoder.stages.0.layers.0.layer.0.convolution", "to": 11}, Context(), VerifySettings())


def test_bn_statistics_of_new_channels_are_copied_from_their_source(models):
    module, batch = models("zoo:SmallCNN")
    gm = as_model(module, batch, torch.float64)
    run_step(gm, "widen", {"layer": "conv1", "to": 16, "split": "uniform"}, Context(seed=3), VerifySettings())
    bn, conv = gm.module.bn1, gm.module.conv1
    for j in range(8, 16):  # find each new channel's source by its (copied) filter
        src = next(k for k in range(8) if torch.equal(conv.weight[j], conv.weight[k]))
        assert bn.running_mean[j] == bn.running_mean[src] and bn.running_var[j] == bn.running_var[src]
    assert bn.num_features == 16 and conv.out_channels == 16 and gm.module.conv2.in_channels == 16


@pytest.mark.parametrize("split", ["asymmetric", "uniform"])
def test_split_of_outgoing_weights_sums_to_the_source(models, split):
    module, batch = models("zoo:MLP")
    gm = as_model(module, batch, torch.float64)
    old = gm.module.fc2.weight.detach().clone()
    run_step(gm, "widen", {"layer": "fc1", "to": 64, "split": split}, Context(seed=5), VerifySettings())
    w1, w2 = gm.module.fc1.weight.detach(), gm.module.fc2.weight.detach()
    sums = torch.zeros_like(old)
    sources = [next(k for k in range(32) if torch.equal(w1[j], w1[k])) for j in range(64)]
    counts = torch.bincount(torch.tensor(sources), minlength=32)
    off_uniform = 0
    for j, src in enumerate(sources):
        sums[:, src] += w2[:, j]
        off_uniform += abs(float(w2[0, j] / old[0, src]) - 1 / int(counts[src])) > 1e-9
    torch.testing.assert_close(sums, old, rtol=0, atol=1e-12)
    assert (off_uniform > 0) == (split == "asymmetric")


def test_zero_init_new_units_have_zero_outgoing_and_random_incoming(models):
    module, batch = models("zoo:MLP")
    gm = as_model(module, batch, torch.float64)
    run_step(gm, "widen", {"layer": "fc1", "by": 8, "init": "zero"}, Context(seed=2), VerifySettings())
    assert torch.count_nonzero(gm.module.fc2.weight[:, 32:]) == 0
    assert torch.count_nonzero(gm.module.fc1.weight[32:]) == 8 * 16
    assert not any(torch.equal(gm.module.fc1.weight[32], gm.module.fc1.weight[k]) for k in range(32))


def test_noise_is_approximate_and_reported(models):
    module, batch = models("zoo:MLP")
    gm = as_model(module, batch, torch.float64)
    report = run_step(gm, "widen", {"layer": "fc1", "by": 8, "noise": 0.1}, Context(seed=2), VerifySettings())
    assert report.exact is False
    assert report.verification["max_abs_diff"] > 1e-6  # the deviation is measured ...
    assert any("not function-preserving" in n for n in report.notes)  # ... and reported, not raised


# ---------------------------------------------------------------- through the CLI and every format
def test_cli_widen_writes_every_format_and_each_reloads_and_verifies(cli, tmp_path):
    out = tmp_path / "cnn"
    r = cli("widen", FIXTURES / "cnn.pt2", "--layer", "conv2", "--by", "4", "-o", f"{out}.safetensors",
            "-o", f"{out}.pt2", "-o", f"{out}.onnx", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verification"]["passed"] and report["steps"][0]["matched"] == ["conv2"]
    assert report["params_after"] - report["params_before"] == 4 * 8 * 9 + 4 + 4 * 2 + 5 * 4 * 16
    for suffix in (".safetensors", ".pt2", ".onnx"):
        v = cli("verify", FIXTURES / "cnn.pt2", f"{out}{suffix}", "--json")
        assert v.code == 0, (suffix, v.err)
        assert json.loads(v.out)["max_abs_diff"] <= 1e-5
    assert (tmp_path / "cnn.growth_report.json").exists()


def test_load_grown_rebuilds_the_widened_architecture(cli, tmp_path):
    import growcli

    out = tmp_path / "mlp.safetensors"
    assert cli("widen", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--layer", "fc1", "--to", "40", "-o", out).code == 0
    model = growcli.load_grown(zoo.MLP(), out)
    assert model.fc1.out_features == 40 and model.fc2.in_features == 40
    ref = zoo.MLP()
    ref.load_state_dict(torch.load(FIXTURES / "mlp.pt", weights_only=True))
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), ref.eval()(x), rtol=1e-5, atol=1e-6)


def test_same_seed_gives_byte_identical_output(cli, tmp_path):
    outs = []
    for i, seed in enumerate([7, 7, 8]):
        path = tmp_path / f"r{i}.safetensors"
        assert cli("widen", FIXTURES / "resnet.pt2", "--layer", "stem", "--to", "13", "--seed", seed, "-o", path).code == 0
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_cli_refusal_exits_1_and_writes_nothing(cli, tmp_path):
    out = tmp_path / "never.safetensors"
    r = cli("widen", FIXTURES / "mlp.pt2", "--layer", "fc3", "--to", "8", "-o", out)
    assert r.code == 1
    assert r.err.count("\n") == 1 and "reach the model's output" in r.err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_unknown_layer_lists_near_misses(cli, tmp_path):
    r = cli("widen", FIXTURES / "mlp.pt2", "--layer", "fc", "--to", "8", "-o", tmp_path / "x.safetensors")
    assert r.code == 1 and "matches nothing" in r.err and "fc1" in r.err


def test_cli_size_not_larger_is_refused(cli, tmp_path):
    r = cli("widen", FIXTURES / "mlp.pt2", "--layer", "fc1", "--to", "32", "-o", tmp_path / "x.safetensors")
    assert r.code == 1 and "not larger" in r.err


def test_pattern_widens_every_matched_layer_and_updates_hf_config(cli, tmp_path):
    out = tmp_path / "bert"
    r = cli("widen", FIXTURES / "bert-tiny", "--layer", "encoder.layer.*.intermediate.dense", "--factor", "2", "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["steps"][0]["matched"] == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 128
    from transformers import AutoModel

    AutoModel.from_pretrained(out)  # loads without size mismatches
    v = cli("verify", FIXTURES / "bert-tiny", out, "--json")
    assert v.code == 0 and json.loads(v.out)["passed"]


def test_inspect_marks_layers_widenable_or_not(cli):
    r = cli("inspect", FIXTURES / "cnn.pt2", "--json")
    assert r.code == 0, r.err
    growable = json.loads(r.out)["growable"]["widen"]
    assert growable["conv1"] is None and growable["conv2"] is None
    assert "output" in growable["fc"]


class DataDependent(torch.nn.Module):
    """Python control flow on tensor values: torch.export fails, growcli falls back to draft_export."""

    def __init__(self, gate_on_hidden: bool):
        super().__init__()
        self.gate_on_hidden = gate_on_hidden
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if (h if self.gate_on_hidden else x).sum() > 0:
            h = h * 2
        return self.b(h)


def test_fallback_tracer_handles_data_dependent_control_flow():
    x = torch.ones(3, 4)
    gm = as_model(DataDependent(gate_on_hidden=False), ((x,), {}), torch.float64)
    report = run_step(gm, "widen", {"layer": "a", "to": 12}, Context(), VerifySettings())
    assert gm.module.a.out_features == 12 and report.verification["passed"]


def test_fallback_tracer_refuses_when_the_branch_depends_on_the_channels():
    x = torch.ones(3, 4)
    gm = as_model(DataDependent(gate_on_hidden=True), ((x,), {}), torch.float64)
    with pytest.raises(NotGrowableError, match="reduces over the grown dimension"):
        run_step(gm, "widen", {"layer": "a", "to": 12}, Context(), VerifySettings())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("split", ["asymmetric", "uniform"])
def test_low_precision_splits_sum_exactly_in_the_dtype(dtype, split):
    # Split parts are made so that they add up to the weight bit for bit (Sterbenz): the grown
    # low-precision model, run in float64, equals the original up to summation order. Rounding
    # w·s to the dtype instead gave 1.1e-3 (bf16) and 1.2e-8 (float32) relative.
    import copy

    torch.manual_seed(0)
    module = zoo.mlp().to(dtype)
    reference = copy.deepcopy(module).double()
    x = torch.randn(64, 16, dtype=torch.float64)
    gm = as_model(module, ((x[:2],), {}), dtype)  # the model stays in its dtype
    run_step(gm, "widen", {"layer": "fc1", "factor": 3.0, "split": split}, Context(seed=1), VerifySettings())
    w_old, w2 = reference.fc2.weight.detach(), gm.module.fc2.weight.detach()
    w1 = gm.module.fc1.weight.detach()
    sources = [next(k for k in range(32) if torch.equal(w1[j], w1[k])) for j in range(96)]
    sums = torch.zeros(w_old.shape, dtype=torch.float64)
    for j, src in enumerate(sources):  # a few dtype values sum without rounding in float64
        sums[:, src] += w2[:, j].double()
    assert torch.equal(sums, w_old)  # the parts add up to the weight exactly
    a, b = reference(x), copy.deepcopy(gm.module).double()(x)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-14
