"""Relative position bias tables grow with the heads (``widen --heads``), or the attention is refused naming why.

Real Hugging Face classes from tiny configs with random weights in float64: T5 (a relative_attention_bias
embedding ``[buckets, H]`` in block 0, shared by every layer of its stack) under eager attention and under
``scaled_dot_product_attention`` (the bias passed as ``attn_mask``), BEiT (``relative_position_bias_table``
indexed by a buffer, per layer or shared), Swin (head_dim derived from the width), BLOOM (ALiBi), and small
torch modules (a learned per-head bias added whole, a per-head ``attn_mask`` buffer). Every growth is verified
by growcli and re-measured here on inputs growcli has not seen (≤ 1e-10 relative to the output's scale).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from growcli.analysis.attention import attention_sites
from growcli.analysis.attention_bias import BiasTable, NotATable, head_tables
from growcli.analysis.attention_inputs import projection_outputs
from growcli.analysis.trace import trace_model
from growcli.core.errors import NotGrowableError
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.heads import plan_heads
from growcli.transforms.registry import Context
from growcli.transforms.width_edit import Edit

from conftest import as_grow_model, relative_diff

VOCAB, EXACT = 100, 1e-10
T5_TABLE = "{}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def _randomise(m: nn.Module) -> nn.Module:
    """Unit-scale random weights (BEiT's tables start at zero, which would hide a wrong column)."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3) if p.dim() == 1 else p.normal_(0.0, p.shape[-1] ** -0.5)
    return m.to(torch.float64).eval()


def _model(family: str, impl: str = "eager", **extra):
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    if family == "t5":
        cfg = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64,
                         relative_attention_num_buckets=32, relative_attention_max_distance=16, use_cache=False)
        cls, inputs = T.T5Model, {"input_ids": torch.randint(0, VOCAB, (2, 6)),
                                  "decoder_input_ids": torch.randint(0, VOCAB, (2, 5))}
    elif family == "beit":
        cfg = T.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=16, patch_size=4, **extra)
        cls, inputs = T.BeitModel, {"pixel_values": torch.randn(2, 3, 16, 16, dtype=torch.float64)}
    elif family == "swin":  # one stage, so every attention has one shape; head_dim = dim // heads
        cfg = T.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2], num_heads=[2], window_size=4)
        cls, inputs = T.SwinModel, {"pixel_values": torch.randn(2, 3, 16, 16, dtype=torch.float64)}
    elif family == "bloom":
        cfg = T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4, use_cache=False)
        cls, inputs = T.BloomForCausalLM, {"input_ids": torch.randint(0, VOCAB, (2, 6))}
    else:
        raise KeyError(family)
    m = _randomise(cls._from_config(cfg, attn_implementation=impl))
    assert m.config._attn_implementation == impl
    return m, inputs


_as_model, _measure = as_grow_model, relative_diff


def _grow(m: nn.Module, inputs, seed: int = 1):
    gm = _as_model(m, inputs)
    report = run_step(gm, "heads", {"factor": 2}, Context(seed=seed), VerifySettings(batches=2))
    assert report.exact and report.verification["passed"] and report.verification["max_abs_diff"] <= EXACT
    return gm, report


def _refusal(m: nn.Module, inputs) -> str:
    gm = _as_model(m, inputs)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(NotGrowableError) as err:
        run_step(gm, "heads", {"factor": 2}, Context(), VerifySettings(batches=1))
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # nothing changed
    return str(err.value)


# ---------------------------------------------------------------------------- T5: one table per stack, shared
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_t5_relative_attention_bias_grows_with_the_heads_once_for_all_layers(impl):
    m, inputs = _model("t5", impl)
    before = copy.deepcopy(m)
    gm, report = _grow(m, inputs)
    grown = gm.module
    assert len(report.matched) == 6  # 2 encoder, 2 decoder self-attentions and 2 cross-attentions (zeros bias)
    # block 1 has no table of its own: it reads block 0's, which grows once for both
    assert [n for n, _ in grown.named_parameters() if "relative_attention_bias" in n] == \
        [T5_TABLE.format("encoder"), T5_TABLE.format("decoder")]
    assert grown.config.num_heads == 8 and grown.config.relative_attention_num_buckets == 32  # buckets untouched
    for stack in ("encoder", "decoder"):
        old, new = before.get_parameter(T5_TABLE.format(stack)), grown.get_parameter(T5_TABLE.format(stack))
        assert new.shape == (32, 8)
        assert torch.equal(new[:, :4], old)  # the old heads keep their columns; each copy reads its source's
        assert all(any(torch.equal(new[:, j], old[:, h]) for h in range(4)) for j in range(4, 8))
    fresh = {"input_ids": torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5)),
             "decoder_input_ids": torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(6))}
    assert _measure(before, grown, fresh) <= EXACT


# ---------------------------------------------------------------------------- BEiT: tables indexed by a buffer
@pytest.mark.parametrize("impl,extra", [
    ("eager", {"use_relative_position_bias": True}),
    ("sdpa", {"use_shared_relative_position_bias": True}),
], ids=["per-layer-eager", "shared-sdpa"])
def test_beit_relative_position_bias_table_grows_with_the_heads(impl, extra):
    m, inputs = _model("beit", impl, **extra)
    before = copy.deepcopy(m)
    gm, report = _grow(m, inputs)
    tables = [n for n, _ in gm.module.named_parameters() if n.endswith("relative_position_bias_table")]
    assert tables and all(gm.module.get_parameter(n).shape == (7 * 7 + 3, 8) for n in tables)
    assert gm.module.config.num_attention_heads == 8 and gm.module.config.head_dim == 8  # the attention reads it
    fresh = {"pixel_values": torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))}
    assert _measure(before, gm.module, fresh) <= EXACT


# ---------------------------------------------------------------------------- refused, naming why
def test_swin_is_refused_because_its_config_derives_head_dim():
    m, inputs = _model("swin")
    sites = attention_sites(trace_model(m, ((), inputs)))
    assert all(len(s.tables) == 1 and s.tables[0].fqn.endswith("relative_position_bias_table") for s in sites)
    message = _refusal(m, inputs)
    assert message.startswith("SwinModel's config derives head_dim from hidden_size / num_attention_heads"), message


def test_alibi_is_still_refused_naming_the_per_head_bias():
    m, inputs = _model("bloom")
    message = _refusal(m, inputs)
    assert message.startswith("attention in 'transformer.h.0.self_attention': baddbmm.default"), message
    assert "differs per head" in message and "ALiBi" in message


class BiasedAttention(nn.Module):
    """Self-attention whose scores get a per-head bias: a learned ``[H, L, L]`` parameter added whole (``whole``),
    a learned table looked up by a relative-position buffer (``table``; ``given``: looked up by the caller), or
    a per-head buffer passed to ``scaled_dot_product_attention`` as ``attn_mask`` (``mask``)."""

    def __init__(self, kind: str, d: int = 16, heads: int = 4, length: int = 5):
        super().__init__()
        self.kind, self.hd = kind, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        pos = torch.arange(length)
        self.register_buffer("index", pos[None, :] - pos[:, None] + length - 1)  # relative positions [L, L]
        if kind == "whole":
            self.bias = nn.Parameter(torch.randn(heads, length, length))
        elif kind == "table":
            self.table = nn.Parameter(torch.randn(2 * length - 1, heads))
        elif kind == "mask":
            self.register_buffer("slopes", torch.randn(heads, 1, 1) * self.index.abs())

    def forward(self, x, given=None):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, -1, self.hd).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if given is not None:
            out = torch.softmax(q @ k.transpose(-1, -2) * self.hd ** -0.5 + given, -1) @ v
        elif self.kind == "mask":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.slopes)
        else:
            bias = self.bias if self.kind == "whole" else self.table[self.index].permute(2, 0, 1)
            out = torch.softmax(q @ k.transpose(-1, -2) * self.hd ** -0.5 + bias, -1) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def _module(kind: str):
    torch.manual_seed(0)
    return nn.Sequential(BiasedAttention(kind), nn.Linear(16, 3)).double().eval(), \
        (torch.randn(2, 5, 16, dtype=torch.float64),)


class SharedTable(nn.Module):
    """Two attentions reading one table, looked up once (T5's way)."""

    def __init__(self, length: int = 5, heads: int = 4):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * length - 1, heads))
        self.register_buffer("index", torch.arange(length)[None, :] - torch.arange(length)[:, None] + length - 1)
        self.layers = nn.ModuleList(BiasedAttention("given") for _ in range(2))

    def forward(self, x):
        bias = self.table[self.index].permute(2, 0, 1)
        for layer in self.layers:
            x = x + layer(x, bias)
        return x


def test_a_table_shared_by_two_attentions_grows_once_with_one_head_map():
    torch.manual_seed(0)
    m, x = SharedTable().double().eval(), (torch.randn(2, 5, 16, dtype=torch.float64),)
    before = copy.deepcopy(m)
    gm, _ = _grow(m, x)
    assert gm.module.table.shape == (9, 8) and torch.equal(gm.module.table[:, :4], before.table)
    assert _measure(before, gm.module, (torch.randn(3, 5, 16, dtype=torch.float64),)) <= EXACT
    # attentions whose heads cannot copy the same sources (another key/value layout) cannot share the table
    sites = attention_sites(trace_model(before, ((x[0],), {})))
    sites[1] = dataclasses.replace(sites[1], kv_heads=1)
    shapes = {k: tuple(v.shape) for k, v in before.state_dict().items()}
    with pytest.raises(NotGrowableError, match="the bias table table is shared by the attentions in 'layers.0' and "
                                               "'layers.1', whose heads cannot grow from the same source heads"):
        plan_heads(Edit(), sites, 8, "asymmetric", torch.Generator().manual_seed(0), shapes)


def test_a_learned_table_looked_up_by_position_grows_and_is_exact():
    m, x = _module("table")
    before = copy.deepcopy(m)
    gm, _ = _grow(m, x)
    assert gm.module[0].table.shape == (9, 8) and torch.equal(gm.module[0].table[:, :4], before[0].table)
    assert _measure(before, gm.module, (torch.randn(3, 5, 16, dtype=torch.float64),)) <= EXACT


@pytest.mark.parametrize("kind,words", [
    ("whole", ["add.Tensor in '0'", "learned per-head bias [4, 5, 5] (parameter '0.bias')",
               "parameter '0.bias' is used whole, not looked up by position"]),
    ("mask", ["attention in '0' (its attn_mask): scaled_dot_product_attention.default in '0'", "buffer '0.slopes'",
              "differs per head", "buffer '0.slopes' holds values per head"]),
], ids=["learned-bias-added-whole", "per-head-sdpa-mask"])
def test_a_per_head_bias_that_is_not_a_table_is_refused(kind, words):
    m, x = _module(kind)
    message = _refusal(m, x)
    for word in words:
        assert word in message, message


class Lookup(nn.Module):
    """``x + table[index]`` as ``[heads, L, L]``: the index a buffer of positions, or computed from a parameter."""

    def __init__(self, learned: bool):
        super().__init__()
        self.learned, self.table, self.w = learned, nn.Parameter(torch.randn(9, 3)), nn.Parameter(torch.randn(5, 5))
        self.register_buffer("index", torch.arange(5)[None, :] - torch.arange(5)[:, None] + 4)

    def forward(self, x):
        index = (self.w > 0).long() if self.learned else self.index
        return x + self.table[index].permute(2, 0, 1)


@pytest.mark.parametrize("learned", [False, True], ids=["position-buffer", "learned-index"])
def test_head_tables_follows_a_lookup_by_position_and_refuses_a_learned_index(learned):
    trace = trace_model(Lookup(learned).double(), ((torch.randn(2, 3, 5, 5, dtype=torch.float64),), {}))
    add = next(n for n in trace.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.add.Tensor)
    params = {n for n, _ in trace.gm.named_parameters()}
    if learned:
        with pytest.raises(NotATable, match="the index of index.Tensor .*is computed from learned values"):
            head_tables(add.args[1], 0, projection_outputs(trace), params)
    else:
        assert head_tables(add.args[1], 0, projection_outputs(trace), params) == [BiasTable("table", 1, "")]
