"""Hidden-size growth (``widen --hidden``) through mixture-of-experts layers with fused 3-D experts.

The router ``gate.weight`` [E, H] and the experts' ``gate_up_proj`` [E, 2I, H] read the hidden states (columns
tiled and shared out, so router logits and routing are unchanged); the experts' ``down_proj`` [E, H, I] and a
shared expert write them (rows tiled in every expert); tokens move to their experts and back through
``repeat_interleave``/``x[ids]``, a per-row routing weight and a sum over each token's top-k rows, or
``index_add_``/``scatter_add_``. Tiny Mixtral, Qwen2-MoE (shared expert, ``shared_expert_gate``) and Qwen3-MoE
with random float64 weights, written as Hugging Face directories and read back with ``from_pretrained``;
a small pure-torch MoE checks the accumulate ops and the refusals. Max abs diff ≤ 1e-10 against the original on
inputs growcli has not seen, except where the model rounds its norms to float32 (stated per test).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from growcli.analysis.stream import plan_stream, stream_start
from growcli.analysis.trace import trace_model
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context
from test_moe_growth import IDS, LAYERS, TOL, VOCAB, as_model, build, max_diff, reload

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


def grow(family: str, options: dict, rtol: float | None = None):
    original = build(family)
    gm = as_model(copy.deepcopy(original))
    report = run_step(gm, "hidden", options, Context(seed=0), VerifySettings(batches=2, rtol=rtol))
    return original, gm, report


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_x2_through_the_experts_is_exact_and_reloads(family, tmp_path):
    original, gm, report = grow(family, {"factor": 2})
    assert report.verification["passed"] and report.verification["dtype"] == "float64"
    assert report.verification["max_abs_diff"] <= TOL
    assert gm.module.config.hidden_size == 64
    for i in range(LAYERS):
        old, new = original.model.layers[i].mlp, gm.module.model.layers[i].mlp
        # Router: columns shared out between the tiles, so W̃ [x, x] = W x bit for bit (halves of a power of two).
        g_old, g_new = old.gate.weight, new.gate.weight
        assert tuple(g_new.shape) == (4, 64) and torch.equal(g_new[:, :32] + g_new[:, 32:], g_old)
        up, down = new.experts.gate_up_proj, new.experts.down_proj
        assert tuple(up.shape) == (4, 2 * old.experts.down_proj.shape[-1], 64)
        assert torch.equal(up[..., :32] + up[..., 32:], old.experts.gate_up_proj)  # every expert reads both tiles
        assert torch.equal(down[:, :32], old.experts.down_proj) and torch.equal(down[:, 32:], old.experts.down_proj)
        if family == "qwen2_moe":  # the shared expert and its gate [1, H] grow like a dense MLP and a reader
            se = new.shared_expert_gate.weight
            assert tuple(se.shape) == (1, 64) and torch.equal(se[:, :32] + se[:, 32:], old.shared_expert_gate.weight)
            assert tuple(new.shared_expert.down_proj.weight.shape) == (64, 24)
    assert max_diff(original, gm.module) <= TOL
    assert max_diff(original, reload(gm.module, tmp_path)) <= TOL


def test_routing_is_unchanged(tmp_path):
    """The router reads the grown hidden states with split columns: its logits equal the original's to float64
    rounding (the attention before it rounds its split output columns), so every token picks the same experts
    with the same (float32) routing weights."""
    original, gm, _ = grow("qwen2_moe", {"factor": 2})
    seen = {}

    def keep(name):
        return lambda _m, _i, out: seen.__setitem__(name, out)

    for name, model in (("old", original), ("new", gm.module)):
        model.model.layers[1].mlp.gate.register_forward_hook(keep(name))
        with torch.no_grad():
            model(**IDS)
    (l_old, w_old, i_old), (l_new, w_new, i_new) = seen["old"], seen["new"]
    assert torch.equal(i_old, i_new) and torch.equal(w_old, w_new)
    assert float((l_old - l_new).abs().max()) <= 1e-14


@pytest.mark.parametrize("family,options", [("mixtral", {"to": 48}), ("qwen2_moe", {"to": 40, "heads": 4})])
def test_non_multiples_pad_zeros_through_the_experts(family, options):
    """RMSNorm zero padding: readers (router, experts' inputs) get zero columns, writers (experts' outputs)
    zero rows. These models compute their RMSNorm in float32 whatever the weights' dtype, so a norm over
    d' ≠ 2^n·d entries rounds there: exact to float32 rounding (as for Llama), not to float64's."""
    original, gm, report = grow(family, options, rtol=1e-6)
    new = options["to"]
    assert report.verification["passed"] and gm.module.config.hidden_size == new
    assert any("less precise dtype" in n for n in report.notes)  # the float32 norms are named
    for i in range(LAYERS):
        old_mlp, mlp = original.model.layers[i].mlp, gm.module.model.layers[i].mlp
        assert torch.count_nonzero(mlp.gate.weight[:, 32:]) == 0
        assert torch.count_nonzero(mlp.experts.gate_up_proj[..., 32:]) == 0
        assert torch.count_nonzero(mlp.experts.down_proj[:, 32:]) == 0
        assert torch.equal(mlp.experts.down_proj[:, :32], old_mlp.experts.down_proj)
    assert max_diff(original, gm.module) <= 1e-5


def test_a_config_that_cannot_describe_the_padding_is_refused():
    """Qwen3-MoE's per-head q/k norms share ``rms_norm_eps`` with the hidden norms, whose eps must change."""
    with pytest.raises(NotGrowableError, match="q_norm.*variance_epsilon would change"):
        grow("qwen3_moe", {"to": 40})


def test_both_expert_kernels_plan_the_same_growth():
    """w[ids] + bmm and the grouped matmul (tokens sorted by expert, gathered with x[ids], put back with x[inv])
    are two traces of one computation: the same parameters grow the same way."""
    plans = {}
    for experts in ("batched_mm", "grouped_mm"):
        model = build("mixtral", experts)
        trace = trace_model(model, ((), IDS))
        plan = plan_stream(model, trace, stream_start(trace), 64)
        plans[experts] = {(p.name, p.dim, p.kind, p.factor) for p in plan.params}
    assert plans["batched_mm"] == plans["grouped_mm"]
    assert ("model.layers.0.mlp.experts.gate_up_proj", 2, "consumer", 1.0) in plans["batched_mm"]
    assert ("model.layers.0.mlp.experts.down_proj", 1, "producer", 1.0) in plans["batched_mm"]
    assert ("model.layers.0.mlp.gate.weight", 1, "consumer", 1.0) in plans["batched_mm"]


def test_cli_widen_hidden_on_a_saved_mixtral_reloads_with_from_pretrained(tmp_path, cli):
    import transformers as T

    src = tmp_path / "mixtral"
    original = build("mixtral")
    original.save_pretrained(src)
    result = cli("widen", src, "--hidden", "2x", "-o", tmp_path / "wide")
    assert result.code == 0, result.err
    grown = T.MixtralForCausalLM.from_pretrained(tmp_path / "wide", dtype=torch.float64).eval()
    grown.set_experts_implementation("batched_mm")
    assert grown.config.hidden_size == 64 and tuple(grown.model.layers[0].mlp.gate.weight.shape) == (4, 64)
    assert max_diff(original, grown) <= TOL


# ----------------------------------------------------------------------------- a pure-torch MoE: the op rules
class TinyMoE(nn.Module):
    """Embedding → RMSNorm → top-2 router → tokens gathered to their experts (``x[token_ids]``), per-expert
    ``bmm`` with ``w[expert_ids]`` → weighted and added back onto the tokens (index_add_ or scatter_add_)."""

    def __init__(self, combine: str = "index_add", norm: str = "rms", d: int = 16, experts: int = 3, inner: int = 8):
        super().__init__()
        self.combine = combine
        self.emb = nn.Embedding(VOCAB, d)
        self.norm = nn.RMSNorm(d, eps=1e-6) if norm == "rms" else nn.LayerNorm(d, eps=1e-6)
        self.router = nn.Linear(d, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, inner, d) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(experts, d, inner) / inner ** 0.5)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        b, n, d = h.shape
        x = self.norm(h).reshape(b * n, d)
        weights, chosen = torch.topk(self.router(x).softmax(-1), 2, dim=-1)
        token = torch.arange(b * n).repeat_interleave(2)
        expert = chosen.reshape(-1)
        rows = x[token]
        if self.combine == "reverse_hidden":  # reorders the hidden entries: not a move of whole hidden vectors
            rows = rows.index_select(1, torch.arange(d - 1, -1, -1))
        mid = torch.relu(torch.bmm(self.w_in[expert], rows.unsqueeze(-1)).squeeze(-1))
        out = torch.bmm(self.w_out[expert], mid.unsqueeze(-1)).squeeze(-1) * weights.reshape(-1, 1)
        if self.combine == "index_add":
            moe = torch.zeros_like(x).index_add_(0, token, out)
        elif self.combine in ("scatter_add", "reverse_hidden"):
            moe = x.new_zeros(x.shape).scatter_add_(0, token.unsqueeze(-1).expand(-1, d), out)
        else:  # an index that differs per hidden entry: not a sum of whole hidden vectors
            moe = x.new_zeros(x.shape).scatter_add_(0, torch.randint(0, b * n, out.shape), out)
        return self.head(self.norm(h + moe.reshape(b, n, d)))


def tiny(combine: str, norm: str = "rms") -> GrowModel:
    torch.manual_seed(3)
    model = TinyMoE(combine, norm).double().eval()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    return GrowModel(model, "state_dict", Path("mem"), "0", spec_from_batch(((ids,), {})))


@pytest.mark.parametrize("combine,norm", [("index_add", "rms"), ("scatter_add", "rms"), ("index_add", "layer")])
@pytest.mark.parametrize("to", [32, 48, 20])
def test_expert_outputs_summed_back_onto_the_tokens_grow_exactly(combine, norm, to):
    """×2, ×3 and 16 → 20: zero padding (RMSNorm) or mean padding (LayerNorm: each expert's padded output rows
    are the mean of its rows, so a routed row's padded entries are its mean, and so is their weighted sum).
    This model computes its norms in float64, so every size is exact to float64 rounding."""
    gm = tiny(combine, norm)
    original = copy.deepcopy(gm.module)
    report = run_step(gm, "hidden", {"to": to}, Context(seed=0), VerifySettings(batches=2))
    assert report.verification["passed"] and report.verification["max_abs_diff"] <= TOL
    assert tuple(gm.module.w_in.shape) == (3, 8, to) and tuple(gm.module.w_out.shape) == (3, to, 8)
    if to % 16 and norm == "rms":
        assert torch.count_nonzero(gm.module.w_out[:, 16 * (to // 16):]) == 0  # zero rows: padded entries stay 0
    elif to % 16:
        mean = original.w_out.mean(1, keepdim=True).expand(-1, to % 16, -1)
        torch.testing.assert_close(gm.module.w_out[:, 16 * (to // 16):], mean, rtol=0, atol=1e-15)
    if to % 16:
        assert torch.count_nonzero(gm.module.w_in[..., 16 * (to // 16):]) == 0  # readers: zero columns
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert float((original(ids) - gm.module(ids)).abs().max()) <= TOL


@pytest.mark.parametrize("combine,reason", [
    ("scatter_random", "hidden size: scatter_add_.default scatters with an index that varies along the hidden dimension"),
    ("reverse_hidden", "hidden size: index_select.default selects or repeats entries along the hidden dimension")])
def test_ops_that_mix_the_entries_of_a_hidden_vector_are_refused(combine, reason):
    gm = tiny(combine)
    with pytest.raises(NotGrowableError, match=f"^{re.escape(reason)}$"):
        run_step(gm, "hidden", {"factor": 2}, Context(seed=0), VerifySettings(batches=1))
