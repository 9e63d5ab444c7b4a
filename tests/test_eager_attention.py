"""Attention computed without scaled_dot_product_attention: found in the trace, grown exactly, or refused.

Real Hugging Face classes from tiny configs with random weights (Gemma-2 with softcapping, Llama
and GPT-2 loaded with ``attn_implementation="eager"``, BLOOM and MPT with ALiBi) and small
hand-written torch modules (``[B·H, L, hd]`` views with ``bmm``, ``einsum``, a per-head learned
bias, ops with no rule). Every growth is verified by growcli in float64 and re-measured here on
inputs growcli has not seen (≤ 1e-10 relative to the output's scale); Hugging Face results are
also written, read back with ``from_pretrained`` and compared with the original.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import growcli
from growcli.analysis.attention_eager import eager_calls
from growcli.analysis.trace import shape, trace_model
from growcli.core.errors import NotGrowableError
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context

from conftest import as_grow_model, relative_diff

VOCAB, EXACT = 100, 1e-10


def _hf(family: str):
    """A tiny float64 Hugging Face model with seeded random weights of unit scale, and its inputs."""
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, num_hidden_layers=1, max_position_embeddings=16)
    if family == "gemma2":  # eager by default: softcapped scores tanh(s / c) · c
        m = T.Gemma2ForCausalLM(T.Gemma2Config(**small, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8, intermediate_size=64, attn_logit_softcapping=2.0))
    elif family == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**small, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=8, intermediate_size=64))
    elif family == "gpt2":  # Conv1D projections, a fused c_attn; head_dim derived from n_embd / n_head
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                           bos_token_id=0, eos_token_id=0))
    elif family == "bloom":
        m = T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4))
    elif family == "mpt":
        m = T.MptForCausalLM(T.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, max_seq_len=16))
    else:
        raise KeyError(family)
    m.config.use_cache = False
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3) if p.dim() == 1 else p.normal_(0.0, p.shape[-1] ** -0.5)
    return m.to(torch.float64).eval(), {"input_ids": torch.randint(0, VOCAB, (2, 6))}


_as_model, _measure = as_grow_model, relative_diff


def _fresh_ids() -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(123))}


def _trace(module: nn.Module, inputs: dict | tuple):
    return trace_model(module, ((), inputs) if isinstance(inputs, dict) else (inputs, {}))


# ---------------------------------------------------------------------------- hand-written eager attentions
class EagerAttention(nn.Module):
    """Self-attention written out: ``kind`` picks the scores' path (no size is read from an attribute,
    so a model with more heads runs the same code)."""

    def __init__(self, kind: str = "bmm", d: int = 16, heads: int = 4, length: int = 5):
        super().__init__()
        self.kind, self.hd = kind, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.register_buffer("mask", torch.triu(torch.full((length, length), -1e9), 1))  # broadcast over heads
        if kind == "head-bias":  # a learned bias per head: [H, L, L]
            self.bias = nn.Parameter(torch.randn(heads, length, length))
        if kind == "relative":
            self.r = nn.Linear(d, d)

    def forward(self, x):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, -1, self.hd).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.kind == "bmm":  # [B·H, L, hd] with views, softcapping, mask added on the [B, H, L, L] view
            qf, kf, vf = (t.reshape(-1, n, self.hd) for t in (q, k, v))
            s = torch.bmm(qf, kf.transpose(1, 2)) / math.sqrt(self.hd)
            s = torch.tanh(s / 3.0) * 3.0
            s = (s.view(b, -1, n, n) + self.mask).view(-1, n, n)
            p = torch.nn.functional.dropout(torch.softmax(s.float(), dim=-1).to(x.dtype), 0.1, training=False)
            out = torch.bmm(p, vf).view(b, -1, n, self.hd)
        elif self.kind == "einsum":  # manual softmax over the keys: exp(s − max s) / Σ exp
            s = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.hd ** -0.5 + self.mask
            s = torch.softmax(s, -1)
            e = torch.exp(s - s.amax(-1, keepdim=True))
            out = torch.einsum("bhqk,bhkd->bhqd", e / e.sum(-1, keepdim=True), v)
        else:
            s = q @ k.transpose(-1, -2) * self.hd ** -0.5
            if self.kind == "head-bias":
                s = s + self.bias
            elif self.kind == "cumsum":
                s = s.cumsum(-1)
            elif self.kind == "relative":  # a term computed from another projection (DeBERTa-like)
                s = s + q @ split(self.r(x)).transpose(-1, -2)
            out = torch.softmax(s + self.mask, -1) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def _eager(kind: str):
    torch.manual_seed(0)
    m = nn.Sequential(EagerAttention(kind), nn.Linear(16, 3)).double().eval()
    return m, (torch.randn(2, 5, 16, dtype=torch.float64),)


@pytest.mark.parametrize("kind", ["bmm", "einsum", "matmul"])
def test_hand_written_eager_attention_is_found_in_head_layout(kind):
    m, x = _eager(kind)
    calls = eager_calls(_trace(m, x))
    assert [c.module for c in calls] == ["0"]
    c = calls[0]
    # q, k (untransposed), v and the output all in [B, heads, L, head_dim], whatever the model computed on
    assert [shape(n) for n in (c.q, c.k, c.v, c.out)] == [(2, 4, 5, 4)] * 4


@pytest.mark.parametrize("kind", ["bmm", "einsum", "matmul"])
def test_hand_written_eager_attention_grows_heads_exactly(kind):
    m, x = _eager(kind)
    gm = _as_model(m, x)
    before = copy.deepcopy(m)
    report = run_step(gm, "heads", {"factor": 2}, Context(seed=1), VerifySettings(batches=2))
    assert report.exact and report.verification["passed"] and report.verification["max_abs_diff"] <= EXACT
    assert gm.module[0].q.weight.shape == (32, 16) and gm.module[0].o.weight.shape == (16, 32)
    assert _measure(before, gm.module, (torch.randn(3, 5, 16, dtype=torch.float64),)) <= EXACT


REFUSED = [
    # (kind, words the message must contain)
    ("head-bias", ["add.Tensor in '0'", "learned per-head bias [4, 5, 5] (parameter '0.bias')"]),
    ("cumsum", ["cumsum.default in '0' acts on the attention scores", "no rule"]),
    ("relative", ["computed from projections"]),
]


@pytest.mark.parametrize("kind,words", REFUSED, ids=[r[0] for r in REFUSED])
def test_hand_written_attention_without_a_rule_is_refused_naming_the_op(kind, words):
    m, x = _eager(kind)
    gm = _as_model(m, x)
    with pytest.raises(NotGrowableError) as err:
        run_step(gm, "heads", {"factor": 2}, Context(), VerifySettings(batches=1))
    message = str(err.value)
    assert message.startswith("attention in '0': ")
    for word in words:
        assert word in message, message
    assert gm.module[0].q.weight.shape == (16, 16)  # nothing changed


def test_returned_attention_weights_are_refused():
    class Returns(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = EagerAttention("matmul")

        def forward(self, x):
            a = self.att
            b, n, _ = x.shape
            q, k = (t(x).view(b, n, -1, a.hd).transpose(1, 2) for t in (a.q, a.k))
            v = a.v(x).view(b, n, -1, a.hd).transpose(1, 2)
            p = torch.softmax(q @ k.transpose(-1, -2), -1)
            return a.o((p @ v).transpose(1, 2).reshape(b, n, -1)), p

    torch.manual_seed(0)
    with pytest.raises(NotGrowableError, match="also an output of the model"):
        eager_calls(_trace(Returns().double().eval(), (torch.randn(2, 5, 16, dtype=torch.float64),)))


def test_a_model_without_attention_keeps_the_sdpa_refusal():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).double().eval()
    x = (torch.randn(2, 8, dtype=torch.float64),)
    assert eager_calls(_trace(m, x)) == []
    with pytest.raises(NotGrowableError, match="scaled_dot_product_attention, and the traced model has none"):
        run_step(_as_model(m, x), "heads", {"factor": 2}, Context(), VerifySettings(batches=1))


# ---------------------------------------------------------------------------- Hugging Face families
def test_gemma2_softcapped_attention_grows_heads_through_the_cli_and_reads_back(cli, tmp_path):
    m, _ = _hf("gemma2")
    assert m.config._attn_implementation == "eager" and m.config.attn_logit_softcapping == 2.0
    m.save_pretrained(str(tmp_path / "in"))
    out = tmp_path / "out"
    r = cli("widen", tmp_path / "in", "--heads", "8", "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    diffs = [report["verification"]["max_abs_diff"]] + [o["max_abs_diff"] for o in report["outputs"]]
    assert report["function_preserving"] and report["verification"]["dtype"] == "float64"
    assert max(diffs) <= EXACT, diffs
    import transformers as T

    # both directories read by transformers itself (a model built in memory computes its rotary table otherwise)
    original, grown = (T.AutoModelForCausalLM.from_pretrained(str(d), dtype="auto").eval()
                       for d in (tmp_path / "in", out))
    assert grown.dtype == torch.float64
    assert grown.config.num_attention_heads == 8 and grown.config.num_key_value_heads == 4
    assert grown.config._attn_implementation == "eager"  # the read-back still computes eager, softcapped attention
    assert _measure(original, grown, _fresh_ids()) <= EXACT


@pytest.mark.parametrize("family,step,options,config", [
    ("llama", "heads", {"to": 8}, {"num_attention_heads": 8, "num_key_value_heads": 4}),
    ("gpt2", "hidden", {"factor": 2.0}, {"n_embd": 64, "n_head": 8}),  # whole heads grow with the hidden size
], ids=["llama-heads", "gpt2-hidden"])
def test_eager_families_grow_exactly_and_read_back_with_from_pretrained(tmp_path, family, step, options, config):
    import transformers as T

    built, inputs = _hf(family)
    built.save_pretrained(str(tmp_path / "in"))

    def load(directory: Path):
        return T.AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager", dtype="auto").eval()

    m = load(tmp_path / "in")  # as growcli's read-back will build it (the rotary table is computed on load)
    assert m.dtype == torch.float64 and eager_calls(_trace(m, inputs)), "the model computes attention without sdpa"
    gm = _as_model(copy.deepcopy(m), inputs)
    report = run_step(gm, step, options, Context(seed=3), VerifySettings(batches=2))
    assert report.exact and report.verification["passed"] and report.verification["max_abs_diff"] <= EXACT
    for key, value in config.items():
        assert getattr(gm.module.config, key) == value, key
    assert _measure(m, gm.module, _fresh_ids()) <= EXACT
    growcli.save_model(gm, str(tmp_path / "out") + "/")  # read back and verified by growcli too
    original, back = load(tmp_path / "in"), load(tmp_path / "out")
    assert back.config._attn_implementation == "eager"
    assert _measure(original, back, _fresh_ids()) <= EXACT


@pytest.mark.parametrize("family,op", [("bloom", "baddbmm.default"), ("mpt", "add.Tensor")])
def test_alibi_is_refused_naming_the_per_head_bias(family, op):
    m, inputs = _hf(family)
    with pytest.raises(NotGrowableError) as err:
        run_step(_as_model(m, inputs), "heads", {"factor": 2}, Context(), VerifySettings(batches=1))
    message = str(err.value)
    assert message.startswith("attention in '") and op in message, message
    assert "differs per head" in message and "ALiBi" in message and "depend on the number of heads" in message


@pytest.mark.parametrize("relative", [False, True], ids=["scaled-keys", "relative-terms"])
def test_deberta_keys_divided_before_the_product_are_followed_and_relative_terms_refused(relative):
    """DeBERTa-v2 computes ``bmm(q, kᵀ / √d)`` on ``[B·H, L, d]``; with relative attention it adds terms
    computed from the query and position-key projections."""
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    extra = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8) if relative else {}
    m = T.DebertaV2ForMaskedLM(T.DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=64,
                                                 max_position_embeddings=16, **extra)).double().eval()
    trace = _trace(m, {"input_ids": torch.randint(0, VOCAB, (2, 6))})
    if relative:
        with pytest.raises(NotGrowableError, match="attention in 'deberta.encoder.layer.0.attention.self': add.Tensor "
                                                   ".* computed from projections"):
            eager_calls(trace)
        return
    (call,) = eager_calls(trace)
    assert call.module == "deberta.encoder.layer.0.attention.self"
    assert [shape(n) for n in (call.q, call.k, call.v, call.out)] == [(2, 4, 6, 8)] * 4
