"""stack: progressive stacking on real architectures, in memory and streaming, driven by one table.

Every architecture is a tiny real model (hidden 32, 2 layers, vocab 100) with random weights,
its 1-D parameters (norm γ/β, biases) perturbed so that neither copies nor post-LN norms are
trivially the identity. Each is stacked ×2 once per mode in module-scoped fixtures; the tests
then check the layer count (config and weights), that the output loads with transformers and
runs, ``copy`` against a hand-built reference stack tensor for tensor, ``identity`` exactness
(float32 ≤ 1e-5 of the output scale) on pre-LN models, the post-LN refusal and its measured
deviation, and streaming == in-memory tensor for tensor.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import dir_tensors
from safetensors.torch import load_file, save_file

import growcli
from growcli import zoo
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import make_batches
from growcli.io.hf_dir import hf_input_spec
from growcli.io.load import load_model
from growcli.io.weights import infer_input_spec
from growcli.io.shards import OutTensor, read_tensors, write_shard
from growcli.run.streaming import choose_streaming, parse_shard_size as parse_size
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings
from growcli.run.runner import Output, Source, Step, grow
from growcli.transforms.stack import StackSpec, describe_order, layout, trace_for_writers
from growcli.analysis.residual import stack_writers
from growcli.verification.compare import flatten_outputs

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
SETTINGS = dict(batches=2)  # verification batches per run: enough to see a difference, cheap


def _config(name: str):
    import transformers as T

    return {
        "bert": lambda: T.BertConfig(**SMALL),
        "roberta": lambda: T.RobertaConfig(**SMALL),
        "gpt2": lambda: T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0),
        "llama": lambda: T.LlamaConfig(**SMALL, num_key_value_heads=2),
        "qwen2": lambda: T.Qwen2Config(**SMALL, num_key_value_heads=2),
        "mistral": lambda: T.MistralConfig(**SMALL, num_key_value_heads=2),
        "vit": lambda: T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                   image_size=16, patch_size=4),
    }[name]()


class Case(NamedTuple):
    cls: str
    container: str  # the stack in the module
    pre_ln: bool
    writers: set[str]  # each block's residual writers (module names, relative to the block)
    saved: str = ""  # the stack's name on disk, when transformers renames it on save
    saved_writers: frozenset[str] = frozenset()

    @property
    def prefix(self) -> str:
        return self.saved or self.container

    @property
    def disk_writers(self) -> set[str]:
        return set(self.saved_writers) or self.writers


BERT_WRITERS = {"attention.output.dense.weight", "attention.output.dense.bias", "output.dense.weight", "output.dense.bias"}
CASES = {
    "bert": Case("BertModel", "encoder.layer", False, BERT_WRITERS),
    "roberta": Case("RobertaModel", "encoder.layer", False, BERT_WRITERS),
    "gpt2": Case("GPT2LMHeadModel", "transformer.h", True,
                 {"attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"}),
    "llama": Case("LlamaForCausalLM", "model.layers", True, {"self_attn.o_proj.weight", "mlp.down_proj.weight"}),
    "qwen2": Case("Qwen2ForCausalLM", "model.layers", True, {"self_attn.o_proj.weight", "mlp.down_proj.weight"}),
    "mistral": Case("MistralForCausalLM", "model.layers", True, {"self_attn.o_proj.weight", "mlp.down_proj.weight"}),
    # transformers 5 loads ViT's encoder.layer.N.attention.output.dense as layers.N.attention.o_proj
    "vit": Case("ViTModel", "layers", True,
                {"attention.o_proj.weight", "attention.o_proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"},
                "encoder.layer", frozenset(BERT_WRITERS)),
}
ARCHS = list(CASES)
PRE_LN = [a for a in ARCHS if CASES[a].pre_ln]


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """arch → a saved tiny HF directory (built once per module)."""
    import transformers as T

    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(ARCHS.index(arch))
            model = getattr(T, CASES[arch].cls)(_config(arch)).eval()
            _perturb(model)
            made[arch] = tmp_path_factory.mktemp(arch) / "model"
            model.save_pretrained(str(made[arch]))
        return made[arch]

    return get


@pytest.fixture(scope="module")
def stacked(hf_dir, tmp_path_factory):
    """(arch, init, mode) → (output directory, report); mode is "memory" or "streaming"."""
    done: dict[tuple, tuple[Path, dict]] = {}

    def get(arch: str, init: str, mode: str = "memory", **options) -> tuple[Path, dict]:
        key = (arch, init, mode, tuple(sorted(options.items())))
        if key not in done:
            out = tmp_path_factory.mktemp(f"{arch}-{init}-{mode}") / "out"
            spec = {"init": init, **options}
            settings = VerifySettings(**SETTINGS, allow_mismatch=bool(options.get("allow_inexact")))
            if mode == "memory":
                report = grow(Source(hf_dir(arch)), [Step("stack", spec)], [Output(out)], settings=settings)
            else:
                report = grow(Source(hf_dir(arch)), [Step("stack", spec)], [Output(out, shard_size=40_000)], settings=settings,
                              streaming=True)
            done[key] = (out, report)
        return done[key]

    return get


def reference_stack(original: dict[str, torch.Tensor], prefix: str, order: list[int]) -> dict[str, torch.Tensor]:
    """The stacked state dict built by hand: position p holds a copy of block order[p]."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.(.+)")
    ref = {k: v for k, v in original.items() if not pattern.fullmatch(k)}
    for k, v in original.items():
        m = pattern.fullmatch(k)
        if m:
            for p, i in enumerate(order):
                if i == int(m.group(1)):
                    ref[f"{prefix}.{p}.{m.group(2)}"] = v
    return ref


def run_hf(directory: Path, batches) -> list[dict[str, torch.Tensor]]:
    """Load ``directory`` with transformers itself (strictly) and run it in float32."""
    import transformers as T

    config = T.AutoConfig.from_pretrained(str(directory))
    model, info = getattr(T, config.architectures[0]).from_pretrained(str(directory), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return [flatten_outputs(model.eval()(*a, **k)) for a, k in batches]


def max_rel_diff(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            worst = max(worst, float((x[k] - y[k]).abs().max() / x[k].abs().max()))
    return worst


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_writers_are_found_without_names(arch, hf_dir):
    gm = load_model(hf_dir(arch))
    trace = trace_for_writers(gm.module, make_batches(gm.inputs, 1)[0])
    found = stack_writers(trace, gm.module, CASES[arch].container)
    assert set(found) == {0, 1}
    for r in found.values():
        assert set(r.writers) == CASES[arch].writers
        assert bool(r.post_norms) == (not CASES[arch].pre_ln)


@pytest.mark.parametrize("arch", ARCHS)
def test_copy_doubles_depth_and_equals_hand_built_stack(arch, hf_dir, stacked):
    out, report = stacked(arch, "copy")
    case = CASES[arch]
    import transformers as T

    config = T.AutoConfig.from_pretrained(str(out))
    assert config.num_hidden_layers == 4
    assert report["function_preserving"] is False and report["steps"][0]["matched"] == [case.container]
    assert "not function-preserving by design; measured" in " ".join(report["steps"][0]["notes"])
    assert report["verification"]["max_abs_diff"] > 1e-3  # stacking copies does change the function
    got, ref = dir_tensors(out), reference_stack(dir_tensors(hf_dir(arch)), case.prefix, [0, 1, 0, 1])
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert {k.split(".")[len(case.prefix.split("."))] for k in got if k.startswith(case.prefix + ".")} == {"0", "1", "2", "3"}
    run_hf(out, make_batches(hf_input_spec(load_model(out).module), 1))


@pytest.mark.parametrize("arch", PRE_LN)
def test_identity_is_exact_on_pre_ln(arch, hf_dir, stacked):
    out, report = stacked(arch, "identity")
    assert report["function_preserving"] is True and report["verification"]["passed"]
    batches = make_batches(hf_input_spec(load_model(hf_dir(arch)).module), 2, seed=5)
    diff = max_rel_diff(run_hf(hf_dir(arch), batches), run_hf(out, batches))
    assert diff <= 1e-5, diff
    got = dir_tensors(out)
    case = CASES[arch]
    for p in (2, 3):  # the new copies' residual writers are zero, everything else copied
        for w in case.disk_writers:
            assert torch.count_nonzero(got[f"{case.prefix}.{p}.{w}"]) == 0


@pytest.mark.parametrize("arch", [a for a in ARCHS if not CASES[a].pre_ln])
def test_identity_on_post_ln_is_refused_with_measured_deviation(arch, hf_dir, cli, tmp_path):
    r = cli("stack", hf_dir(arch), "--init", "identity", "-o", tmp_path / "out")
    assert r.code == 1
    assert "post-LN" in r.err and "normalise after the residual add" in r.err
    deviation = float(re.search(r"measured max abs deviation ([0-9.e+-]+)", r.err).group(1))
    assert deviation > 1e-2  # LN(x) with the copy's own γ, β is far from x
    assert not (tmp_path / "out").exists()


def test_identity_on_post_ln_with_allow_mismatch_reports_inexact(stacked):
    out, report = stacked("bert", "identity", allow_inexact=True)
    step = report["steps"][0]
    assert report["function_preserving"] is False and step["exact"] is False
    assert any("post-LN" in n for n in step["notes"])
    assert report["verification"]["max_abs_diff"] > 1e-2
    assert (out / "config.json").exists()


@pytest.mark.parametrize("arch,init", [(a, "identity") for a in PRE_LN] + [("bert", "copy"), ("roberta", "copy")])
def test_streaming_equals_in_memory(arch, init, stacked):
    mem, _ = stacked(arch, init)
    stream, report = stacked(arch, init, "streaming")
    a, b = dir_tensors(mem), dir_tensors(stream)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert report["outputs"][0]["shards"] > 1 and (stream / "model.safetensors.index.json").exists()
    index = json.loads((stream / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    assert report["verification"] is not None and any("ran both models" in c for c in report["checked"])
    assert json.loads((stream / "config.json").read_text())["n_layer" if arch == "gpt2" else "num_hidden_layers"] == 4


def test_streaming_checkpoint_without_base_model_prefix(hf_dir, tmp_path):
    """Hub GPT-2 checkpoints name their blocks h.N.*, not transformer.h.N.*: the names are kept."""
    import shutil

    src = tmp_path / "gpt2-legacy"
    shutil.copytree(hf_dir("gpt2"), src)
    state = load_file(str(src / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    report = grow(Source(src), [Step("stack", {"init": "identity"})], [Output(tmp_path / "out", shard_size=10**9)],
                  settings=VerifySettings(**SETTINGS), streaming=True)
    got = dir_tensors(tmp_path / "out")
    assert "h.3.mlp.c_proj.weight" in got and not any(k.startswith("transformer.") for k in got)
    assert torch.count_nonzero(got["h.3.mlp.c_proj.weight"]) == 0
    assert report["function_preserving"] and report["verification"]["passed"]


def test_write_shard_copies_bytes_and_leaves_zero_holes(tmp_path):
    src = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(1000, dtype=torch.float16)}
    save_file(src, str(tmp_path / "in.safetensors"))
    refs = read_tensors(tmp_path)
    plan = [OutTensor("x.a", refs["a"], False), OutTensor("x.b", refs["b"], False), OutTensor("y.c", refs["c"], True),
            OutTensor("z.c", refs["c"], False), OutTensor("w.a", refs["a"], True)]
    done = []
    write_shard(tmp_path / "out.safetensors", plan, done.append)
    got = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(got["x.a"], src["a"]) and torch.equal(got["x.b"], src["b"]) and torch.equal(got["z.c"], src["c"])
    assert torch.count_nonzero(got["y.c"]) == 0 and torch.count_nonzero(got["w.a"]) == 0  # a hole at the end too
    assert sum(done) == sum(t.ref.nbytes for t in plan)


def test_streaming_refusal_leaves_nothing(hf_dir, cli, tmp_path):
    r = cli("stack", hf_dir("bert"), "--init", "identity", "--streaming", "-o", tmp_path / "out")
    assert r.code == 1 and "post-LN" in r.err and "measured" in r.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options,order", [
    ({"order": "interleave"}, [0, 0, 1, 1]),
    ({"to": 3}, [0, 1, 0]),
    ({"to": 5, "order": "interleave"}, [0, 0, 1, 1, 1]),
    ({"layers": "0-1,1"}, [0, 1, 1]),
    ({"factor": 3}, [0, 1, 0, 1, 0, 1]),
])
def test_orders_follow_into_weights_config_and_layer_idx(options, order, hf_dir, stacked):
    out, report = stacked("qwen2", "identity", **options)
    assert report["function_preserving"] is True and report["verification"]["passed"]
    original = dir_tensors(hf_dir("qwen2"))
    got = dir_tensors(out)
    ref = reference_stack(original, "model.layers", order)
    copies = [p for p in range(len(order)) if order[p] in order[:p]]
    for k, v in ref.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k)
        zeroed = m and int(m.group(1)) in copies and m.group(2) in CASES["qwen2"].writers
        assert torch.equal(got[k], torch.zeros_like(v) if zeroed else v), k
    gm = load_model(out)
    assert gm.module.config.num_hidden_layers == len(order) == len(gm.module.config.layer_types)
    assert [layer.self_attn.layer_idx for layer in gm.module.model.layers] == list(range(len(order)))


def test_gpt2_layer_idx_and_n_layer(stacked):
    out, _ = stacked("gpt2", "identity")
    gm = load_model(out)
    assert json.loads((out / "config.json").read_text())["n_layer"] == 4
    assert [b.attn.layer_idx for b in gm.module.transformer.h] == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    torch.manual_seed(3)
    model = zoo.TinyTransformer(vocab=100, d=32, heads=4, layers=2).eval()
    _perturb(model)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


KW = '{"vocab": 100, "d": 32, "heads": 4, "layers": 2}'


@pytest.mark.parametrize("init", ["identity", "copy"])
def test_custom_module_list(init, tiny_state, cli, tmp_path):
    model, path = tiny_state
    out = tmp_path / "grown.safetensors"
    r = cli("stack", path, "--arch", "growcli.zoo:TinyTransformer", "--arch-kwargs", KW, "--init", init,
            "--batches", "2", "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["steps"][0]["matched"] == ["blocks"] and report["function_preserving"] is (init == "identity")
    grown = growcli.load_grown(zoo.TinyTransformer(vocab=100, d=32, heads=4, layers=2), out)
    assert len(grown.blocks) == 4
    ids = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids), grown(ids)
    state = {k: v for k, v in grown.state_dict().items()}
    if init == "identity":
        assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
        assert torch.count_nonzero(state["blocks.3.down.weight"]) == 0
        assert torch.equal(state["blocks.3.up.weight"], model.state_dict()["blocks.1.up.weight"])
    else:
        ref = reference_stack(model.state_dict(), "blocks", [0, 1, 0, 1])
        assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
        assert float((a - b).abs().max()) > 1e-3
    # copies own their storage: no two tensors share memory
    ptrs = [t.untyped_storage().data_ptr() for t in grown.state_dict().values()]
    assert len(ptrs) == len(set(ptrs))


@pytest.mark.parametrize("args,code,message", [
    (["--factor", "1"], 2, "--factor 1: expected an integer ≥ 2"),
    (["--factor", "2", "--to", "6"], 2, "give only one of --factor, --to, --layers"),
    (["--to", "2"], 2, "already has 2 blocks"),
    (["--layers", "0-3"], 2, "the stack has blocks 0-1, not 2"),
    (["--layers", "1,0,1"], 2, "first appear in their original order"),
    (["--layers", "0,0,0"], 2, "every block must appear"),
    (["--layers", "0-x"], 2, "expected comma-separated indices"),
    (["--order", "zigzag"], 2, "option 'order' of stack expects one of 'stack', 'interleave'"),
    (["--init", "random"], 2, "option 'init' of stack expects one of 'copy', 'identity'"),
    (["--blocks", "model.nope"], 1, "no match: --blocks 'model.nope': no such module; stacks found: model.layers"),
    (["--blocks", "lm_head"], 1, "not a ModuleList/Sequential"),
])
def test_cli_errors(args, code, message, hf_dir, cli, tmp_path):
    r = cli("stack", hf_dir("llama"), *args, "-o", tmp_path / "out")
    assert r.code == code, r.err
    assert message in r.err
    assert not (tmp_path / "out").exists()


def test_cli_streaming_forced_needs_a_directory_output(hf_dir, cli, tmp_path):
    r = cli("stack", hf_dir("llama"), "--streaming", "-o", tmp_path / "x.safetensors")
    assert r.code == 2 and "--streaming needs a Hugging Face directory" in r.err


def test_cli_streaming_human_output_is_quiet_on_stderr(hf_dir, cli, tmp_path):
    r = cli("stack", hf_dir("llama"), "--init", "identity", "--streaming", "--shard-size", "100KB", "--batches", "1",
            "-o", tmp_path / "out")
    assert r.code == 0, r.err
    assert r.err == ""  # no progress bar when stdout is not a terminal
    assert "(streaming)" in r.out and "checked: ran both models from disk: equal" in r.out
    assert (tmp_path / "out" / "growth_report.json").exists()


def test_choose_streaming(hf_dir, tmp_path):
    src = hf_dir("llama")
    assert choose_streaming(src, [tmp_path / "o"], None, None) is False  # small: in memory
    assert choose_streaming(src, [tmp_path / "o"], None, None, threshold=0) is True
    assert choose_streaming(src, [tmp_path / "o.safetensors"], None, None, threshold=0) is False
    assert choose_streaming(src, [tmp_path / "o"], None, False, threshold=0) is False
    with pytest.raises(UsageError):
        choose_streaming(src, [tmp_path / "o", tmp_path / "p"], None, True)


@pytest.mark.parametrize("spec,length,order", [
    (StackSpec(), 3, [0, 1, 2, 0, 1, 2]),
    (StackSpec(order="interleave", factor=3), 2, [0, 0, 0, 1, 1, 1]),
    (StackSpec(to=7, order="interleave"), 4, [0, 1, 1, 2, 2, 3, 3]),
    (StackSpec(to=7), 4, [0, 1, 2, 3, 0, 1, 2]),
    (StackSpec(layers="0-11,4-11"), 12, list(range(12)) + list(range(4, 12))),
])
def test_layout(spec, length, order):
    assert layout(spec, length) == order


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 << 30), ("1234", 1234),
                                       ("1.5kb", 1500)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_rejects_garbage():
    with pytest.raises(UsageError, match="--shard-size"):
        parse_size("lots")


def test_describe_order():
    assert describe_order([0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7]) == "0-7,4-7"
    assert describe_order([0, 0, 1, 1]) == "0,0,1,1"
    assert describe_order([0, 1, 2, 3, 0, 1]) == "0-3,0,1"


def _resnet_gm(model: torch.nn.Module) -> GrowModel:
    """``model`` in float64 with non-trivial BatchNorm statistics, so a zeroed BN must really write zero."""
    torch.manual_seed(7)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model = model.double().eval()
    return GrowModel(model, "state_dict", Path("x"), "", infer_input_spec(model))


def _stack_exactly(model: torch.nn.Module, blocks: str, **options) -> tuple[GrowModel, float]:
    gm = _resnet_gm(model)
    before = copy.deepcopy(gm.module)
    report = growcli.apply(gm, "stack", blocks=blocks, init="identity", **options)
    assert report.exact and report.verification["dtype"] == "float64"
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = float((before(x) - gm.module(x)).abs().max())
    assert diff <= 1e-12 and report.verification["max_abs_diff"] <= 1e-12, diff
    stage = before.get_submodule(blocks)
    grown = len(gm.module.get_submodule(blocks)) - len(stage)
    assert report.params_after - report.params_before == grown * sum(p.numel() for p in stage[0].parameters())
    return gm, diff


@pytest.mark.parametrize("options,copies", [({}, [2, 3]), ({"order": "interleave", "to": 3}, [2])])
def test_resnet_relu_blocks_stack_exactly(options, copies):
    gm, _ = _stack_exactly(zoo.ResNetTiny(), "layer1", **options)
    stage = gm.module.layer1
    assert len(stage) == 2 + len(copies)
    for p in copies:  # the new copies: last BatchNorm zero, the rest copied
        assert torch.count_nonzero(stage[p].bn2.weight) == 0 and torch.count_nonzero(stage[p].bn2.bias) == 0
        assert torch.count_nonzero(stage[p].conv1.weight) > 0


def test_resnet_stack_cli(cli, tmp_path):
    from conftest import FIXTURES

    out = tmp_path / "grown.safetensors"
    r = cli("stack", FIXTURES / "resnet.pt", "--arch", "growcli.zoo:resnet", "--blocks", "layer1", "--init", "identity",
            "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    step = report["steps"][0]
    assert report["function_preserving"] is True and report["verification"]["passed"]
    assert report["verification"]["max_abs_diff"] <= 1e-12 and report["verification"]["dtype"] == "float64"
    assert step["params_after"] - step["params_before"] == 2 * 1184  # two BasicBlock(8, 8) copies
    assert "identity init: zeroed residual writers bn2.bias, bn2.weight in every new copy" in step["notes"]
    assert any(n.startswith("the blocks end in aten.relu after their residual add; exact") for n in step["notes"])
    grown = growcli.load_grown(zoo.ResNetTiny(), out)
    assert len(grown.layer1) == 4 and torch.count_nonzero(grown.layer1[3].bn2.weight) == 0


class TVBasicBlock(torch.nn.Module):
    """torchvision's BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + identity), in-place relu and +=."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVBottleneck(torch.nn.Module):
    """torchvision's Bottleneck (1x1 → 3x3 → 1x1 with expansion 4)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(torch.nn.Module):
    """torchvision's ResNet layout: conv-bn-relu-maxpool stem, stages built by ``_make_layer``, avgpool, fc."""

    def __init__(self, block, layers: list[int], width: int = 8, classes: int = 5):
        super().__init__()
        nn = torch.nn
        self.inplanes = width * block.expansion  # so layer1 needs no downsample, as in resnet18
        self.conv1 = nn.Conv2d(3, self.inplanes, 3, 1, 1, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(self.inplanes), nn.ReLU(inplace=True), nn.MaxPool2d(2)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.fc = nn.Linear(2 * width * block.expansion, classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1):
        nn = torch.nn
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def example_inputs(self):
        return (torch.randn(2, 3, 16, 16),)


@pytest.mark.parametrize("block,last_bn", [(TVBasicBlock, "bn2"), (TVBottleneck, "bn3")])
def test_torchvision_style_stage_stacks_exactly(block, last_bn):
    gm, _ = _stack_exactly(TVResNet(block, [2, 3]), "layer1")
    new = gm.module.layer1[3]
    for name, p in new.named_parameters():
        assert (torch.count_nonzero(p) == 0) == name.startswith(last_bn + "."), name


def test_torchvision_style_deepen_block_unchanged():
    gm = _resnet_gm(TVResNet(TVBottleneck, [2, 3]))
    report = growcli.apply(gm, "deepen", after="layer2.1", block=True)
    assert report.verification["max_abs_diff"] <= 1e-12 and len(gm.module.layer2) == 4
    assert any("ends in aten.relu after its residual add" in n for n in report.notes)


@pytest.mark.parametrize("model,options,message", [
    (lambda: zoo.ResNetTiny(), {"blocks": "layer2"},
     r"not repeats of one another \(layer2.1.conv1.weight \[16, 16, 3, 3\] vs layer2.0"),
    (lambda: TVResNet(TVBottleneck, [2, 3]), {"blocks": "layer2", "layers": "0,1,2,2"},
     r"not repeats of one another \(layer2.1.conv1.weight \[16, 64, 1, 1\] vs layer2.0.conv1.weight \[16, 32, 1, 1\]"),
])
def test_resnet_stages_that_cannot_be_stacked(model, options, message):
    """A stage's first block downsamples (a projection shortcut, other shapes): a copy could not follow the others."""
    gm = _resnet_gm(model())
    with pytest.raises(NotGrowableError, match=message):
        growcli.apply(gm, "stack", init="identity", **options)


def test_projection_shortcut_block_refusal_is_structured():
    """A block whose shortcut is a projection (downsample) has no identity path: named op, module and reason."""
    gm = _resnet_gm(TVResNet(TVBasicBlock, [2, 2]))
    with pytest.raises(NotGrowableError) as err:
        growcli.apply(gm, "deepen", after="layer2.0", block=True)
    r = err.value.refusal
    assert (r.block, r.op, r.module) == ("layer2.0", "aten.add", "layer2.0")
    assert str(err.value) == ("block layer2.0: both inputs of the add (aten.add in layer2.0) are computed by layers "
                              "(aten.batch_norm in layer2.0.bn2 and aten.batch_norm in layer2.0.downsample.1), so the "
                              "block has no identity path (a projection shortcut changes the stream)")


def test_shared_parameters_are_refused():
    model = zoo.TinyTransformer(vocab=100, d=32, heads=4, layers=2)
    model.blocks[0].ln1.weight = model.ln_f.weight  # a block parameter tied to one outside the stack
    gm = GrowModel(model, "state_dict", Path("x"), "", infer_input_spec(model))
    with pytest.raises(NotGrowableError, match="shares parameter ln_f.weight"):
        growcli.apply(gm, "stack")
