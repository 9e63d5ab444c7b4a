"""upcycle: dense FFNs of tiny real Hugging Face decoders → mixture of experts that from_pretrained loads.

Each case builds a float64 Llama / Mistral / Qwen2 / Qwen3 with random weights, upcycles it
through the runner (in memory and streaming), loads the written directory with the MoE class's
``from_pretrained`` and runs both on random token batches.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import dir_tensors
from growcli.core.errors import NotGrowableError, UsageError
from growcli.run.runner import Output, Source, Step, grow
from growcli.run.steps import VerifySettings
from growcli.transforms.catalog import build_spec

SIZES = dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)
DENSE = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}), "mistral": ("MistralConfig", "MistralForCausalLM", {}),
         "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
         "llama-bias": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True}),
         "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True})}
MOE = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
       "qwen3": "Qwen3MoeForCausalLM", "qwen2-tied": "Qwen2MoeForCausalLM"}
TOL = 1e-10  # float64


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """kind → a saved tiny float64 dense model (built once per module)."""
    import transformers as T

    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            config_cls, model_cls, extra = DENSE[kind]
            torch.manual_seed(list(DENSE).index(kind))
            model = getattr(T, model_cls)(getattr(T, config_cls)(**SIZES, **extra)).to(torch.float64).eval()
            made[kind] = tmp_path_factory.mktemp(kind) / "dense"
            model.save_pretrained(str(made[kind]))
        return made[kind]

    return get


@pytest.fixture(scope="module")
def upcycled(dense_dir, tmp_path_factory):
    """(kind, mode, options) → (output directory, report)."""
    done: dict[tuple, tuple[Path, dict]] = {}

    def get(kind: str, mode: str = "memory", allow: bool = False, **options) -> tuple[Path, dict]:
        key = (kind, mode, allow, tuple(sorted(options.items())))
        if key not in done:
            out = tmp_path_factory.mktemp(f"{kind}-{mode}") / "out"
            settings = VerifySettings(allow_mismatch=allow)
            report = grow(Source(dense_dir(kind)), [Step("upcycle", options)],
                          [Output(out, "hf", 20_000 if mode == "streaming" else None)], settings=settings, seed=3,
                          streaming=mode == "streaming")
            done[key] = (out, report)
        return done[key]

    return get


def batches(vocab: int, n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (2, 5 + 2 * i), generator=gen) for i in range(n)]


def logits(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=x).logits for x in ids]


def load(directory: Path, cls: str):
    import transformers as T

    model = getattr(T, cls).from_pretrained(str(directory), dtype=torch.float64, experts_implementation="eager")
    return model.eval()


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("kind,options", [
    ("llama", {"experts": 4, "top_k": 2}),
    ("mistral", {"experts": 3, "top_k": 1, "router": "normal"}),
    ("qwen2", {"experts": 4, "top_k": 2, "shared": True}),
    ("qwen2", {"experts": 4, "top_k": 2}),
    ("qwen3", {"experts": 5, "top_k": 4}),
    ("qwen2-tied", {"experts": 2, "top_k": 2, "shared": True}),
], ids=["llama-mixtral", "mistral-mixtral-top1", "qwen2-moe-shared", "qwen2-moe-routed", "qwen3-moe", "qwen2-tied"])
def test_upcycled_model_loads_with_from_pretrained_and_matches_dense(kind, options, dense_dir, upcycled):
    import transformers as T

    out, report = upcycled(kind, **options)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [MOE[kind]] and config["num_experts_per_tok"] == options["top_k"]
    assert config.get("num_local_experts", config.get("num_experts")) == options["experts"]
    moe = load(out, MOE[kind])
    dense = T.AutoModelForCausalLM.from_pretrained(str(dense_dir(kind)), dtype=torch.float64).eval()
    ids = batches(SIZES["vocab_size"])
    assert max_diff(logits(dense, ids), logits(moe, ids)) <= TOL
    assert report["function_preserving"] and report["verification"]["passed"]
    assert report["verification"]["dtype"] == "float64" and report["verification"]["max_abs_diff"] <= TOL
    experts = moe.model.layers[1].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (options["experts"], 2 * SIZES["intermediate_size"], SIZES["hidden_size"])
    assert tuple(experts.down_proj.shape) == (options["experts"], SIZES["hidden_size"], SIZES["intermediate_size"])
    assert report["params_after"] == sum(p.numel() for p in moe.parameters())


def test_every_routed_expert_copies_the_dense_ffn(dense_dir, upcycled):
    import transformers as T

    out, _ = upcycled("llama", experts=4, top_k=2)
    dense = T.AutoModelForCausalLM.from_pretrained(str(dense_dir("llama")), dtype=torch.float64)
    moe = load(out, "MixtralForCausalLM")
    for i in range(SIZES["num_hidden_layers"]):
        mlp, block = dense.model.layers[i].mlp, moe.model.layers[i].mlp
        want = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        for e in range(4):
            assert torch.equal(block.experts.gate_up_proj[e], want)
            assert torch.equal(block.experts.down_proj[e], mlp.down_proj.weight)
        assert torch.count_nonzero(block.gate.weight) == 0  # auto router for top-2: zero


def test_qwen2_shared_expert_holds_the_dense_ffn(dense_dir, upcycled):
    import transformers as T

    out, report = upcycled("qwen2", experts=4, top_k=2, shared=True)
    dense = T.AutoModelForCausalLM.from_pretrained(str(dense_dir("qwen2")), dtype=torch.float64)
    moe = load(out, "Qwen2MoeForCausalLM")
    assert json.loads((out / "config.json").read_text())["shared_expert_intermediate_size"] == SIZES["intermediate_size"]
    mlp, block = dense.model.layers[0].mlp, moe.model.layers[0].mlp
    assert torch.equal(block.shared_expert.down_proj.weight, 2 * mlp.down_proj.weight)
    assert torch.equal(block.shared_expert.gate_proj.weight, mlp.gate_proj.weight)
    assert torch.count_nonzero(block.shared_expert_gate.weight) == 0
    assert torch.count_nonzero(block.experts.down_proj) == 0
    assert torch.count_nonzero(block.gate.weight) > 0  # auto router with --shared: normal, still exact
    assert report["verification"]["max_abs_diff"] == 0.0


def test_qwen2_without_shared_sets_norm_topk_prob_and_silences_the_shared_expert(upcycled):
    out, _ = upcycled("qwen2", experts=4, top_k=2)
    config = json.loads((out / "config.json").read_text())
    assert config["norm_topk_prob"] is True and config["moe_intermediate_size"] == SIZES["intermediate_size"]
    moe = load(out, "Qwen2MoeForCausalLM")
    assert torch.count_nonzero(moe.model.layers[0].mlp.shared_expert.down_proj.weight) == 0


def test_random_router_with_top2_is_reported_approximate_with_its_measured_deviation(upcycled):
    _, report = upcycled("llama", experts=4, top_k=2, router="normal")
    step = report["steps"][0]
    assert not report["function_preserving"] and not step["exact"]
    assert any("float32" in n and "approximate" in n for n in step["notes"])
    assert 0 < step["verification"]["max_abs_diff"] < 1e-6  # the float32 renormalisation: ~1e-8 here


def test_noise_without_shared_is_approximate_and_with_shared_stays_exact(upcycled):
    _, noisy = upcycled("llama", experts=4, top_k=2, noise=0.05, drop=0.25)
    assert not noisy["function_preserving"] and noisy["verification"]["max_abs_diff"] > 1e-6
    assert any("measured" in n for n in noisy["steps"][0]["notes"])
    out, shared = upcycled("qwen2", experts=4, top_k=3, shared=True, noise=0.05, drop=0.25)
    assert shared["function_preserving"] and shared["verification"]["max_abs_diff"] <= TOL
    experts = load(out, "Qwen2MoeForCausalLM").model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])  # symmetry broken in the gate/up projections


@pytest.mark.parametrize("kind,options", [
    ("llama", {"experts": 4, "top_k": 2}),
    ("qwen2", {"experts": 3, "top_k": 2, "shared": True, "noise": 0.05, "drop": 0.5}),
    ("qwen3", {"experts": 4, "top_k": 2, "router": "normal", "noise": 0.01}),
    ("mistral", {"experts": 2, "top_k": 1, "drop": 0.25}),
    ("qwen2-tied", {"experts": 2, "top_k": 2}),
], ids=["llama", "qwen2-shared-noise-drop", "qwen3-normal-noise", "mistral-drop", "qwen2-tied"])
def test_streaming_equals_in_memory_tensor_for_tensor(kind, options, upcycled):
    allow = not build_spec_exact(options)
    mem, _ = upcycled(kind, allow=allow, **options)
    stream, report = upcycled(kind, "streaming", allow=allow, **options)
    a, b = dir_tensors(mem), dir_tensors(stream)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert report["execution"] == "streaming" and report["outputs"][0]["shards"] > 1
    index = json.loads((stream / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    assert any("ran both models from disk" in c for c in report["checked"])
    assert report["verification"]["dtype"] == "float64"
    mem_config, stream_config = (json.loads((d / "config.json").read_text()) for d in (mem, stream))
    skip = {"transformers_version"}
    assert {k: v for k, v in mem_config.items() if k not in skip} == {k: v for k, v in stream_config.items() if k not in skip}


def build_spec_exact(options: dict) -> bool:
    from growcli.transforms.upcycle import is_exact

    return is_exact(build_spec("upcycle", options))


def test_streaming_exact_output_matches_dense_in_float64(dense_dir, upcycled):
    import transformers as T

    out, report = upcycled("llama", "streaming", experts=4, top_k=2)
    dense = T.AutoModelForCausalLM.from_pretrained(str(dense_dir("llama")), dtype=torch.float64).eval()
    ids = batches(SIZES["vocab_size"])
    assert max_diff(logits(dense, ids), logits(load(out, "MixtralForCausalLM"), ids)) <= TOL
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= TOL


def test_seed_decides_random_tensors(dense_dir, tmp_path):
    runs = []
    for seed in (3, 3, 4):
        out = tmp_path / f"s{len(runs)}"
        grow(Source(dense_dir("mistral")), [Step("upcycle", {"experts": 3, "top_k": 1, "noise": 0.1})], [Output(out, "hf")],
             settings=VerifySettings(allow_mismatch=True), seed=seed)
        runs.append(dir_tensors(out))
    router = "model.layers.0.block_sparse_moe.gate.weight"
    expert = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    assert torch.equal(runs[0][router], runs[1][router]) and torch.equal(runs[0][expert], runs[1][expert])
    assert not torch.equal(runs[0][router], runs[2][router]) and not torch.equal(runs[0][expert], runs[2][expert])


def test_cli_upcycle_writes_a_directory(dense_dir, cli, tmp_path):
    r = cli("upcycle", dense_dir("llama"), "--experts", "4", "--top-k", "2", "-o", f"{tmp_path / 'moe'}/")
    assert r.code == 0, r.err
    assert "exact" in r.out and "PASSED" in r.out
    assert (tmp_path / "moe" / "growth_report.json").is_file()


@pytest.mark.parametrize("args,code,message", [
    (["--experts", "4", "--top-k", "2", "--shared"], 1, "mixtral has no shared expert"),
    (["--experts", "4", "--top-k", "5"], 2, "--top-k 5: expected 1 ≤ K ≤ 4"),
    (["--experts", "1", "--top-k", "1"], 2, "--experts 1: expected at least 2"),
    (["--top-k", "1"], 2, "upcycle needs --experts E and --top-k K"),
    (["--experts", "4", "--top-k", "2", "--drop", "1.5"], 2, "--drop 1.5"),
    (["--experts", "4", "--top-k", "2", "--router", "uniform"], 2, "option 'router' of upcycle expects one of"),
])
def test_cli_refusals(args, code, message, dense_dir, cli, tmp_path):
    r = cli("upcycle", dense_dir("llama"), *args, "-o", tmp_path / "out")
    assert r.code == code and message in r.err, r.err
    assert "Traceback" not in r.err and not (tmp_path / "out").exists()


def test_cli_refuses_file_outputs(dense_dir, cli, tmp_path):
    r = cli("upcycle", dense_dir("llama"), "--experts", "2", "--top-k", "1", "-o", tmp_path / "moe.safetensors")
    assert r.code == 2 and "upcycle writes a Hugging Face directory" in r.err
    assert list(tmp_path.iterdir()) == []


def test_unsupported_model_type_lists_the_targets(cli, tmp_path):
    from conftest import FIXTURES

    r = cli("upcycle", FIXTURES / "bert-tiny", "--experts", "2", "--top-k", "1", "-o", tmp_path / "out")
    assert r.code == 1 and "no mixture-of-experts architecture for model_type 'bert'" in r.err
    assert "llama → mixtral" in r.err and "qwen2 → qwen2_moe" in r.err and "qwen3 → qwen3_moe" in r.err


def test_dense_tensor_without_a_place_in_the_target_is_refused(dense_dir, cli, tmp_path):
    r = cli("upcycle", dense_dir("llama-bias"), "--experts", "2", "--top-k", "1", "-o", tmp_path / "out")
    assert r.code == 1 and re.search(r"MixtralForCausalLM has no place for model\.layers\.0\.self_attn\.[kqv]_proj\.bias", r.err)
    r = cli("upcycle", dense_dir("llama-bias"), "--experts", "2", "--top-k", "1", "--streaming", "-o", tmp_path / "s")
    assert r.code == 1 and "has no place for" in r.err and list(tmp_path.iterdir()) == []


def test_ffn_roles_are_found_by_running_it_not_by_name():
    from torch import nn

    from growcli.transforms.upcycle_target import ffn_roles

    class Swapped(nn.Module):  # names that lie: "up" is the gated one
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(6, 10, bias=False)
            self.gate = nn.Linear(6, 10, bias=False)
            self.out = nn.Linear(10, 6, bias=False)

        def forward(self, x):
            return self.out(nn.functional.silu(self.up(x)) * self.gate(x))

    assert ffn_roles(Swapped(), "silu") == {"gate": "up.weight", "up": "gate.weight", "down": "out.weight"}
    with pytest.raises(NotGrowableError, match="does not compute down"):
        ffn_roles(Swapped(), "gelu")
    biased = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 6))
    with pytest.raises(NotGrowableError, match="three bias-free matrices"):
        ffn_roles(biased, "relu")


def test_spec_rejects_bad_counts_before_loading():
    with pytest.raises(UsageError, match="--top-k 0"):
        build_spec("upcycle", {"experts": 2, "top_k": 0})
    with pytest.raises(UsageError, match="--noise -1"):
        build_spec("upcycle", {"experts": 2, "top_k": 1, "noise": -1.0})


def test_plan_step_upcycles_to_a_directory(dense_dir, cli, tmp_path):
    plan = tmp_path / "moe.yaml"
    plan.write_text("version: 1\nsteps:\n  - upcycle: {experts: 2, top_k: 2, shared: true}\n")
    r = cli("grow", dense_dir("qwen2"), "--plan", plan, "-o", f"{tmp_path / 'moe'}/")
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "moe" / "growth_report.json").read_text())
    assert report["steps"][0]["transform"] == "upcycle" and report["function_preserving"]
    assert report["verification"]["max_abs_diff"] <= TOL
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["model_type"] == "qwen2_moe"


def test_candidates_name_every_ffn_or_say_why_not(dense_dir):
    import growcli
    from conftest import FIXTURES
    from growcli.transforms.catalog import get_transform

    candidates = get_transform("upcycle").candidates
    assert candidates(growcli.load_model(dense_dir("llama"))) == {"model.layers.0.mlp": None, "model.layers.1.mlp": None}
    [(key, reason)] = candidates(growcli.load_model(FIXTURES / "mlp.pt2")).items()
    assert key == "(model)" and "needs a Hugging Face model" in reason
