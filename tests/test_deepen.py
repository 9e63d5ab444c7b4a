"""deepen: layers and residual blocks that start as the identity (Net2DeeperNet, Network Morphism).

Every case runs the registered transform (which verifies itself in float64) and the test then
asserts the measured numbers: float64 max abs diff ≤ 1e-10 where the weights allow it (exactly
0 for identity layers on float32 fixtures), parameter counts, what was inserted, that the
new parameters are trainable, that refusals name the operation, and that every output
format reloads and re-verifies.
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
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import make_batches, spec_from_batch
from growcli.io.load import load_model
from growcli.core.model import GrowModel
from growcli.nn import ParametricActivation
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context
from growcli.verification.compare import verify_models

ARCH = {"mlp": "growcli.zoo:mlp", "cnn": "growcli.zoo:cnn", "resnet": "growcli.zoo:resnet"}


@pytest.fixture(scope="module")
def bases():
    """Every fixture, loaded once: state_dict (modules) and .pt2 (graph programs)."""
    out = {}
    for name, arch in ARCH.items():
        out[f"{name}.pt"] = load_model(FIXTURES / f"{name}.pt", arch=arch)
        out[f"{name}.pt2"] = load_model(FIXTURES / f"{name}.pt2")
    return out


def grow(base: GrowModel, **options):
    """Deepen a copy of ``base``; the step verifies itself in float64 on 2 batches (what the tests assert on)."""
    gm = copy.deepcopy(base)
    return gm, run_step(gm, "deepen", options, Context(seed=0), VerifySettings(batches=2))


def layer_params(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Output channels and kernel of every Linear/Conv weight (2-D or more) by parameter name."""
    return {n: tuple(p.shape) for n, p in module.named_parameters() if n.endswith("weight") and p.dim() >= 2}


def identity_cost(shape: tuple[int, ...], kernel: tuple[int, ...] | None = None) -> int:
    """Parameters of a square identity layer after a layer with weight ``shape`` (weight + bias)."""
    c = shape[0]
    k = kernel if kernel is not None else shape[2:]
    return c * c * int(torch.tensor(k).prod()) + c if k else c * c + c


# --------------------------------------------------------------------------- every layer, exact
@pytest.mark.parametrize("source", ["mlp.pt", "mlp.pt2", "cnn.pt", "cnn.pt2", "resnet.pt", "resnet.pt2"])
@pytest.mark.parametrize("init", ["identity", "morph"])
def test_after_every_layer_is_exact(bases, source, init):
    base = bases[source]
    shapes = layer_params(base.module)
    _, report = grow(base, after=".*", init=init)
    v = report.verification
    assert v["passed"] and v["dtype"] == "float64" and v["max_abs_diff"] <= 1e-10
    assert len(report.matched) == len(shapes) and len(report.changes) == len(shapes)
    expected = sum(identity_cost(s) + (1 if init == "morph" else 0) for s in shapes.values())
    assert report.params_after - report.params_before == expected


# One row per placement rule: what is inserted where, read from the trace.
PLACEMENT = [
    # source, after, options, module replaced (or graph submodule), its layout
    ("mlp.pt", "fc1", {}, "fc1", ["Linear", "ReLU", "Linear"]),
    ("mlp.pt", "fc3", {}, "fc3", ["Linear", "Linear"]),  # output layer: nothing follows, linear insert
    ("cnn.pt", "conv1", {}, "bn1", ["BatchNorm2d", "ReLU", "Conv2d"]),  # conv→BN→ReLU: wraps the BN
    ("cnn.pt", "conv1", {"bn": True}, "bn1", ["BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]),
    ("cnn.pt", "conv2", {"init": "morph"}, "conv2", ["Conv2d", "ParametricActivation", "Conv2d"]),
    ("resnet.pt", "layer1.0.conv2", {}, "layer1.0.conv2", ["Conv2d", "Conv2d"]),  # conv→BN→add: linear insert
    ("mlp.pt2", "fc1", {}, "fc1.deepen", ["Linear", "ReLU"]),  # program: called after the relu node
    ("cnn.pt2", "conv2", {"init": "morph", "bn": True}, "conv2.deepen", ["ParametricActivation", "Conv2d", "BatchNorm2d"]),
]


@pytest.mark.parametrize("source,after,options,where,layout", PLACEMENT, ids=[f"{r[0]}-{r[1]}-{len(r[2])}" for r in PLACEMENT])
def test_placement(bases, source, after, options, where, layout):
    gm, report = grow(bases[source], after=after, **options)
    seq = gm.module.get_submodule(where)
    assert [type(m).__name__ for m in seq] == layout
    assert report.verification["max_abs_diff"] <= 1e-10
    new = [m for m in seq if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    w = new.weight.detach().reshape(new.weight.shape[0], new.weight.shape[1], -1)
    centre = w.shape[-1] // 2
    torch.testing.assert_close(w[:, :, centre], torch.eye(w.shape[0]), rtol=0, atol=0)  # identity / Dirac
    for m in seq:
        if isinstance(m, nn.BatchNorm2d) and m is not seq[0]:
            assert (m.weight == 1).all() and (m.running_var + m.eps == 1).all()  # exactly the identity
            assert not m.training  # eval mode like the model: the identity BatchNorm is eval-only


def test_conv_kernel_option_and_dirac(bases):
    gm, report = grow(bases["cnn.pt"], after="conv2", kernel=5)
    conv = gm.module.bn2[2]
    assert conv.kernel_size == (5, 5) and conv.padding == (2, 2) and conv.stride == (1, 1)
    assert int((conv.weight != 0).sum()) == 12 and report.verification["max_abs_diff"] == 0


# --------------------------------------------------------------------------- morph: dense factors
@pytest.mark.parametrize("split", ["orthogonal", "svd"])
@pytest.mark.parametrize("source,after", [("mlp.pt", "fc2"), ("cnn.pt", "conv2")])
def test_dense_split_float64(bases, source, after, split):
    base = copy.deepcopy(bases[source])
    base.module.double()
    original = base.module.get_submodule(after).weight.detach().clone()
    gm, report = grow(base, after=after, init="morph", split=split)
    assert report.verification["passed"] and report.verification["max_abs_diff"] <= 1e-10
    seq = gm.module.get_submodule(after)
    first, act, second = seq[0].weight.detach(), seq[1], seq[2].weight.detach()
    assert isinstance(act, ParametricActivation) and act.a.item() == 1.0
    a = first.reshape(first.shape[0], -1)
    b = second.reshape(second.shape[0], second.shape[1])
    for m in (a, b):  # dense, unlike the identity
        assert (m == 0).double().mean().item() <= 0.05
    product = (b @ a).reshape(original.shape)
    assert (product - original).abs().max().item() <= 1e-12 * original.abs().max().item()
    assert seq[0].bias is None or seq[0].bias.abs().max().item() == 0  # the bias moved to the new layer


def test_dense_split_float32_within_float32_tolerance(bases):
    gm, report = grow(bases["mlp.pt2"], after="fc1", init="morph", split="orthogonal")
    v = report.verification
    assert v["passed"] and 0 < v["max_abs_diff"] <= 1e-5 * max(o["scale"] for o in v["outputs"])
    assert "float32" in v["note"]


def test_morph_uses_the_models_activation_and_refuses_identity_there():
    torch.manual_seed(0)
    m = zoo.TinyTransformer().eval()
    gm = GrowModel(m, "pickle", Path("tiny.pt"), "", spec_from_batch((m.example_inputs(), {})))
    with pytest.raises(NotGrowableError, match=r"gelu.*not idempotent.*--init morph"):
        run_step(copy.deepcopy(gm), "deepen", {"after": "blocks.0.up"}, Context())
    report = run_step(gm, "deepen", {"after": "blocks.0.up", "init": "morph"}, Context())
    assert gm.module.blocks[0].up[1].activation == "gelu"
    assert report.verification["max_abs_diff"] <= 1e-10


# --------------------------------------------------------------------------- residual blocks
def _hf(family: str) -> GrowModel:
    import transformers as T

    torch.manual_seed(0)
    if family == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    elif family == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32))
    elif family == "resnet":
        m = T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2],
                                                          layer_type="basic", num_labels=3))
        for mod in m.modules():  # non-trivial statistics, so the zeroed BN must really write zero
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    else:
        m = T.BertModel(T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32))
    m.eval()
    if hasattr(m.config, "use_cache"):
        m.config.use_cache = False
    from growcli.io.hf_dir import hf_input_spec

    return GrowModel(m, "hf", Path(family), "", hf_input_spec(m), hf_class=type(m).__name__)


@pytest.fixture(scope="module")
def hf_models():
    return {f: _hf(f) for f in ("gpt2", "llama", "resnet", "bert")}


BLOCKS = [
    # model, block, config key → value after, zeroed writers (relative to the copy)
    ("gpt2", "transformer.h.0", ("n_layer", 3), {"attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"}),
    ("llama", "model.layers.1", ("num_hidden_layers", 3), {"self_attn.o_proj.weight", "mlp.down_proj.weight"}),
    ("resnet", "resnet.encoder.stages.1.layers.1", ("depths", [2, 3]), {"layer.1.normalization.weight", "layer.1.normalization.bias"}),
]


@pytest.mark.parametrize("family,block,config,zeroed", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_copy_is_exact(hf_models, family, block, config, zeroed):
    gm, report = grow(hf_models[family], after=block, block=True)
    assert report.verification["max_abs_diff"] <= 1e-10
    container, _, idx = block.rpartition(".")
    copy_name = f"{container}.{int(idx) + 1}"
    assert getattr(gm.module.config, config[0]) == config[1]
    source = dict(hf_models[family].module.get_submodule(block).named_parameters())
    for name, p in gm.module.get_submodule(copy_name).named_parameters():
        if name in zeroed:  # residual writers: zero, so the copy adds nothing to the stream
            assert p.abs().max().item() == 0, name
        else:  # everything else: the source block's values, in storage of its own
            assert torch.equal(p, source[name]) and p.data_ptr() != source[name].data_ptr(), name
    idxs = [m.layer_idx for m in gm.module.get_submodule(container).modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert idxs == sorted(set(idxs)) and (not idxs or idxs == list(range(len(idxs))))


@pytest.mark.parametrize("block", ["layer1.0", "layer2.1"])
def test_block_copy_resnet_fixture(bases, block):
    gm, report = grow(bases["resnet.pt"], after=block, block=True)
    assert report.verification["max_abs_diff"] == 0
    container = block.rpartition(".")[0]
    assert len(gm.module.get_submodule(container)) == 3
    assert any("relu" in n for n in report.notes)  # exact thanks to relu's idempotence, and it says so


REFUSALS = [
    # (source or hf family, options, error type, message pattern)
    ("bert", {"after": "encoder.layer.0", "block": True}, NotGrowableError, r"post-LN.*layer_norm.*docs/recipes.md#deepen-residual-blocks"),
    ("resnet.pt", {"after": "layer2.0", "block": True}, NotGrowableError, r"both inputs of the add.*projection shortcut"),
    ("llama", {"after": "model.layers.0.mlp.gate_proj"}, NotGrowableError, r"silu.*not idempotent.*--init morph"),
    ("llama", {"after": "model.layers.0.mlp.up_proj", "bn": True}, NotGrowableError, r"--bn after a Linear needs a \[batch, features\]"),
    ("resnet.pt", {"after": "layer1"}, NotGrowableError, r"'layer1' is a Sequential.*--block --after layer1.1"),
    ("resnet.pt", {"after": "layer2.0.shortcut.0", "init": "morph", "split": "svd"}, NotGrowableError, r"more outputs \(16\) than inputs \(8\)"),
    ("resnet.pt2", {"after": "layer1.0", "block": True}, NotGrowableError, r"\.pt2 program has no block modules"),
    ("mlp.pt", {"after": "fc9"}, growcli.core.errors.NoMatchingModuleError, r"layer 'fc9' matches nothing; did you mean fc3, fc2, fc1"),
    ("mlp.pt", {"after": "fc1", "kernel": 4}, UsageError, r"odd kernel"),
    ("mlp.pt", {"after": "fc1", "activation": "gelu"}, UsageError, r"activation is for init morph"),
    ("mlp.pt", {"after": "fc1", "init": "morph", "activation": "swish"}, UsageError, r"expected one of relu"),
]


@pytest.mark.parametrize("source,options,error,pattern", REFUSALS, ids=[f"{r[0]}-{r[3][:18]}" for r in REFUSALS])
def test_refusals_name_the_reason(bases, hf_models, source, options, error, pattern):
    base = bases.get(source) or hf_models[source]
    gm = copy.deepcopy(base)
    before = {k: v.clone() for k, v in gm.module.state_dict().items()}
    with pytest.raises(error, match=pattern):
        run_step(gm, "deepen", options, Context())
    assert not gm.edits.records and gm.module.state_dict().keys() == before.keys()  # refused before any edit


# --------------------------------------------------------------------------- trainable, not dead
@pytest.mark.parametrize("options,new", [({"after": "fc1"}, "fc1.2"), ({"after": "fc2", "init": "morph"}, "fc2"),
                                         ({"after": "fc1", "init": "morph", "split": "orthogonal"}, "fc1")])
def test_training_lowers_loss_and_reaches_new_layers(bases, options, new):
    gm, _ = grow(bases["mlp.pt"], **options)
    model = gm.module.train()
    fresh = [p for n, p in model.get_submodule(new).named_parameters() if not n.startswith("0.")]  # not the original
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 4, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, reached = [], torch.zeros(len(fresh), dtype=torch.bool)
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        reached |= torch.tensor([p.grad is not None and bool(p.grad.abs().max() > 0) for p in fresh])
        opt.step()
        losses.append(loss.item())
    assert len(fresh) >= 2 and reached.all(), reached  # every new parameter (incl. morph's a) learns
    assert losses[-1] < 0.8 * losses[0], losses


def test_block_copy_trains(bases):
    gm, _ = grow(bases["resnet.pt"], after="layer1.1", block=True)
    model = gm.module.train()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model(x).square().mean().backward()
    bn2 = model.layer1[2].bn2
    assert bn2.weight.grad.abs().max() > 0 and bn2.bias.grad.abs().max() > 0


# --------------------------------------------------------------------------- CLI and every output format
@pytest.mark.parametrize("source,extra,suffixes", [
    ("mlp.pt2", ["--after", "fc1"], [".safetensors", ".pt2", ".onnx"]),
    ("cnn.pt", ["--arch", ARCH["cnn"], "--after", "conv*", "--init", "morph", "--split", "orthogonal", "--kernel", "3",
                "--bn"], [".safetensors", ".onnx"]),
])
def test_cli_writes_every_format_and_each_reverifies(cli, tmp_path, source, extra, suffixes):
    outs = [tmp_path / f"g{s}" for s in suffixes]
    r = cli("deepen", FIXTURES / source, *extra, *[a for o in outs for a in ("-o", o)], "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verification"]["passed"] and report["function_preserving"]
    assert report["outputs"][-1]["check"]["max_abs_diff"] <= 1e-5  # onnxruntime against torch
    arch = ["--arch", ARCH["cnn"]] if source.endswith(".pt") else []
    for out in outs:
        v = cli("verify", FIXTURES / source, out, *arch, "--json")
        assert v.code == 0, (out, v.err)
        assert json.loads(v.out)["passed"]


def test_load_grown_replays_on_a_fresh_model(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    assert cli("deepen", FIXTURES / "mlp.pt", "--arch", ARCH["mlp"], "--after", "fc1", "--after", "fc2",
               "--init", "morph", "--activation", "tanh", "-o", out).code == 0
    grown = growcli.load_grown(zoo.MLP(), out)
    assert isinstance(grown.fc1[1], ParametricActivation) and grown.fc1[1].activation == "tanh"
    original = load_model(FIXTURES / "mlp.pt", arch=ARCH["mlp"])
    assert verify_models(original.module, grown, make_batches(original.inputs, 3)).max_abs_diff <= 1e-10
    program = torch.export.load(str(FIXTURES / "mlp.pt2")).module()
    out2 = tmp_path / "p.safetensors"
    assert cli("deepen", FIXTURES / "mlp.pt2", "--after", "fc2", "-o", out2).code == 0
    replayed = growcli.load_grown(program, out2)
    assert verify_models(original.module, replayed, make_batches(original.inputs, 3)).max_abs_diff <= 1e-10


def test_hf_directory_output_after_block_copy(cli, hf_models, tmp_path):
    import transformers

    src = tmp_path / "llama"
    hf_models["llama"].module.save_pretrained(src)
    out, weights = tmp_path / "grown", tmp_path / "g.safetensors"
    r = cli("deepen", src, "--after", "model.layers.0", "--block", "-o", out, "-o", weights)
    assert r.code == 0, r.err
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    v = cli("verify", src, out, "--json")
    assert v.code == 0 and json.loads(v.out)["max_abs_diff"] <= 1e-10, v.err
    fresh = transformers.LlamaForCausalLM.from_pretrained(src)
    grown = growcli.load_grown(fresh, weights)  # replays the insert, zeroed writers, layer_idx and config edits
    assert grown.config.num_hidden_layers == 3 and grown.model.layers[1].self_attn.layer_idx == 1
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    original = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    assert verify_models(original, grown, [((), {"input_ids": ids})]).max_abs_diff <= 1e-10


def test_hf_directory_refused_for_inserted_layers(hf_models, tmp_path):
    gm, _ = grow(hf_models["llama"], after="model.layers.0.mlp.down_proj")
    with pytest.raises(UsageError, match=r"cannot be described by a Hugging Face config.*write \.safetensors"):
        growcli.save_model(gm, tmp_path / "layer", fmt="hf")
    assert not (tmp_path / "layer").exists()


def test_seed_gives_identical_bytes(cli, tmp_path):
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for p in paths:
        assert cli("deepen", FIXTURES / "mlp.pt2", "--after", "fc2", "--init", "morph", "--split", "orthogonal",
                   "--seed", "5", "-o", p).code == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.parametrize("args,code,message", [
    (["--after", "fc1", "--init", "deep"], 2, "option 'init' of deepen expects one of 'identity', 'morph'"),
    (["--after", "fc1", "--kernel", "2"], 2, "odd kernel"),
    (["--after", "fc1"], 2, "deepen needs at least one -o OUTPUT"),
    (["--after", "nothing", "-o", "x.safetensors"], 1, "no match: layer 'nothing' matches nothing"),
])
def test_cli_errors(cli, tmp_path, args, code, message):
    args = [str(tmp_path / a) if a.endswith(".safetensors") else a for a in args]
    r = cli("deepen", FIXTURES / "mlp.pt2", *args)
    assert r.code == code and message in r.err, r.err
    assert "Traceback" not in r.err and not list(tmp_path.iterdir())


def test_cli_help_has_example(cli):
    r = cli("deepen", "--help")
    assert r.code == 0 and "Example: growcli deepen" in r.out


def test_inspect_lists_deepen_candidates(cli):
    r = cli("inspect", FIXTURES / "resnet.pt", "--arch", ARCH["resnet"], "--json")
    assert r.code == 0, r.err
    growable = json.loads(r.out)["growable"]["deepen"]
    assert growable["layer1.0.conv1"] is None and growable["layer1.1 (--block)"] is None
    assert "projection shortcut" in growable["layer2.0 (--block)"]
