"""Mixture-of-experts layers with fused 3-D expert parameters: stack, deepen --block and FFN widen of the experts.

transformers 5 stores a layer's experts as ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I]
and computes them with ``w[expert_ids]`` + ``bmm`` (``batched_mm``) or a grouped matmul over rows sorted by expert
(``grouped_mm``, the default, whose CPU kernel has no float64). The residual branch of the MoE block is zero when
the experts' down projections (and a shared expert's) are: each routed row is ``route weight × 0``. The experts'
intermediate channels are coupled through the per-expert matmuls; all experts grow together, the router stays.
Tiny Mixtral, Qwen2-MoE (shared expert) and Qwen3-MoE with random float64 weights; read back with
``from_pretrained``; max abs diff ≤ 1e-10 against the original on inputs growcli has not seen.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from growcli.analysis.coupling import analyze, producer_layers
from growcli.analysis.layouts import CORE, Cat
from growcli.analysis.residual import block_writers
from growcli.analysis.trace import trace_model
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context

VOCAB, TOL, LAYERS = 96, 1e-10, 2
IDS = {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))}


def build(family: str, experts: str = "batched_mm") -> nn.Module:
    """A tiny float64 MoE model with seeded random weights; ``experts`` is the experts implementation."""
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=64, num_experts_per_tok=2, pad_token_id=0)
    if family == "mixtral":
        m = T.MixtralForCausalLM(T.MixtralConfig(intermediate_size=24, num_local_experts=4, **common))
    elif family == "qwen2_moe":
        m = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=16, num_experts=4,
                                                   shared_expert_intermediate_size=24, **common))
    elif family == "qwen3_moe":
        m = T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=16, num_experts=4,
                                                   head_dim=8, **common))
    else:
        raise KeyError(family)
    m.config.use_cache = False
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 1 else p.shape[-1] ** -0.5)
                    + (1.0 if p.dim() == 1 else 0.0))
    m = m.double().eval()
    m.set_experts_implementation(experts)
    return m


def as_model(module: nn.Module) -> GrowModel:
    return GrowModel(module, "hf", Path("mem"), "0", spec_from_batch(((), IDS)), hf_class=type(module).__name__)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


def reload(module: nn.Module, tmp_path: Path) -> nn.Module:
    module.save_pretrained(tmp_path / "out")
    return type(module).from_pretrained(tmp_path / "out", dtype=torch.float64, experts_implementation="batched_mm").eval()


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
WRITERS = {"mixtral": {"self_attn.o_proj.weight", "mlp.experts.down_proj"},
           "qwen2_moe": {"self_attn.o_proj.weight", "mlp.experts.down_proj", "mlp.shared_expert.down_proj.weight"},
           "qwen3_moe": {"self_attn.o_proj.weight", "mlp.experts.down_proj"}}


@pytest.mark.parametrize("family,experts", [("mixtral", "grouped_mm"), ("qwen2_moe", "grouped_mm"),
                                            ("qwen3_moe", "batched_mm")])
def test_the_experts_down_projections_are_the_moe_branch_writers(family, experts):
    model = build(family, experts)
    found = block_writers(trace_model(model, ((), IDS)), model, "model.layers.1")
    assert set(found.writers) == WRITERS[family] and not found.post_norms


@pytest.mark.parametrize("family", FAMILIES)
def test_stack_identity_is_exact_and_reloads(family, tmp_path):
    original = build(family)
    gm = as_model(copy.deepcopy(original))
    report = run_step(gm, "stack", {"factor": 2, "init": "identity"}, Context(seed=0), VerifySettings(batches=2))
    assert report.verification["passed"] and report.verification["dtype"] == "float64"
    assert gm.module.config.num_hidden_layers == 2 * LAYERS
    for i in range(LAYERS, 2 * LAYERS):  # the copies' experts write nothing; their routers are copies
        layer = gm.module.model.layers[i]
        assert torch.count_nonzero(layer.mlp.experts.down_proj) == 0
        assert torch.equal(layer.mlp.gate.weight, original.model.layers[i - LAYERS].mlp.gate.weight)
    assert max_diff(original, gm.module) <= TOL
    assert max_diff(original, reload(gm.module, tmp_path)) <= TOL


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_deepen_block_after_an_moe_block_is_exact_and_reloads(family, tmp_path):
    original = build(family)
    gm = as_model(copy.deepcopy(original))
    report = run_step(gm, "deepen", {"after": "model.layers.0", "block": True}, Context(seed=0), VerifySettings(batches=2))
    assert report.verification["passed"] and gm.module.config.num_hidden_layers == LAYERS + 1
    new = gm.module.model.layers[1].mlp
    assert torch.count_nonzero(new.experts.down_proj) == 0
    if family == "qwen2_moe":
        assert torch.count_nonzero(new.shared_expert.down_proj.weight) == 0
    assert max_diff(original, reload(gm.module, tmp_path)) <= TOL


@pytest.mark.parametrize("family,init", [(f, "net2net") for f in FAMILIES] + [("mixtral", "zero")])
def test_ffn_widen_grows_every_expert_and_reloads(family, init, tmp_path):
    original = build(family)
    size = original.model.layers[0].mlp.experts.down_proj.shape[-1]
    gm = as_model(copy.deepcopy(original))
    report = run_step(gm, "widen", {"layer": "experts.gate_up_proj", "by": 8, "init": init}, Context(seed=2),
                      VerifySettings(batches=2))
    assert report.exact and report.verification["passed"] and report.verification["dtype"] == "float64"
    key = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    assert getattr(gm.module.config, key) == size + 8
    for i in range(LAYERS):
        old, new = original.model.layers[i].mlp, gm.module.model.layers[i].mlp
        assert torch.equal(old.gate.weight, new.gate.weight)  # the router is untouched
        up, down = new.experts.gate_up_proj, new.experts.down_proj
        assert tuple(up.shape) == (4, 2 * (size + 8), 32) and tuple(down.shape) == (4, 32, size + 8)
        w = old.experts.gate_up_proj
        assert torch.equal(up[:, :size], w[:, :size]) and torch.equal(up[:, size + 8:2 * size + 8], w[:, size:])
        if init == "net2net":  # a new channel copies one source channel in both halves of every expert
            for j in range(size, size + 8):
                src = next(k for k in range(size) if torch.equal(up[:, j], w[:, k]))
                assert torch.equal(up[:, size + 8 + j], w[:, size + src])
        else:
            assert torch.count_nonzero(down[:, :, size:]) == 0
    assert max_diff(original, gm.module) <= TOL
    assert max_diff(original, reload(gm.module, tmp_path)) <= TOL


@pytest.mark.parametrize("experts", ["batched_mm", "grouped_mm"])
def test_both_expert_kernels_give_the_same_coupled_group(experts):
    """w[ids] + bmm and the grouped matmul are two traces of one computation: one group, one layout."""
    model = build("mixtral", experts)
    trace = trace_model(model, ((), IDS))
    fqn = "model.layers.0.mlp.experts.gate_up_proj"
    assert fqn in producer_layers(trace)
    group = analyze(trace, fqn)
    uses = {u.fqn: (u.dim, u.role, u.layout) for u in group.uses}
    assert group.size == 24 and group.producers == [fqn]
    assert uses == {fqn: (1, "producer", Cat([CORE, CORE])),
                    "model.layers.0.mlp.experts.down_proj": (2, "consumer", CORE)}


def test_one_layers_experts_widen_reloads_with_load_grown(tmp_path):
    """One block's experts grown: no config describes that, so the safetensors replay their edits on the original."""
    import transformers as T

    import growcli

    original = build("mixtral")
    original.save_pretrained(tmp_path / "src")
    gm = growcli.load_model(tmp_path / "src")
    gm.module.set_experts_implementation("batched_mm")  # the default grouped_mm kernel has no float64
    report = growcli.apply(gm, "widen", layer="model.layers.0.mlp.experts.gate_up_proj", by=8)
    assert report.verification["dtype"] == "float64" and report.verification["max_abs_diff"] <= TOL
    growcli.save_model(gm, tmp_path / "grown.safetensors")
    base = T.MixtralForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float64, experts_implementation="batched_mm")
    reloaded = growcli.load_grown(base, tmp_path / "grown.safetensors")
    assert tuple(reloaded.model.layers[0].mlp.experts.down_proj.shape) == (4, 32, 32)
    assert tuple(reloaded.model.layers[1].mlp.experts.down_proj.shape) == (4, 32, 24)
    assert max_diff(original, reloaded) <= TOL


@pytest.mark.parametrize("step", [{"transform": "deepen", "options": {"after": "model.layers.0", "block": True}},
                                  {"transform": "stack", "options": {"factor": 2, "init": "identity"}}])
def test_a_saved_moe_checkpoint_grows_in_float64_from_disk(tmp_path, step):
    """Loaded from disk, the experts run with the batched_mm kernel (grouped_mm has no float64), so the
    depth steps run, trace and verify in float64 (before: 'the model's forward pass fails on a sample batch')."""
    from growcli.run.runner import Output, Source, Step, grow
    import transformers as T

    src = tmp_path / "moe"
    build("mixtral", experts="grouped_mm").save_pretrained(src)
    report = grow(Source(src), [Step(step["transform"], step["options"])], [Output(tmp_path / "out")])
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= TOL
    a = T.MixtralForCausalLM.from_pretrained(src).to(torch.float64).eval()
    b = T.MixtralForCausalLM.from_pretrained(tmp_path / "out").to(torch.float64).eval()
    for m in (a, b):
        m.set_experts_implementation("batched_mm")
    with torch.no_grad():
        diff = (a(**IDS).logits - b(**IDS).logits).abs().max().item()
    assert len(b.model.layers) > len(a.model.layers) and diff <= TOL
