"""Attention sites through fused projections, rotary variants, query scaling and q/k norms.

Every rule is an op-semantics rule of :mod:`growcli.analysis.attention_inputs`, tested here on
real Hugging Face families that need it (tiny configs, seeded random weights, float64, saved
with ``save_pretrained``; grown through :func:`growcli.run.runner.grow`, which verifies the step
and reads the written directory back with ``from_pretrained``) and on small torch modules for
the cases no family shows:

- fused ``qkv``: contiguous q|k|v sliced apart (phi3), per-head ``[H, 3·hd]`` chunked (gpt_neox),
  ``[3, H, hd]`` unbound (modernbert), per-head ``[H, 3, hd]`` selected (persimmon);
- interleaved rotary embeddings, ``stack`` of even/odd halves then ``flatten`` (cohere, gptj);
- query scaling by a scalar, by a per-feature parameter, refused for a tensor varying across features;
- q/k norms: per-head LayerNorm (persimmon), RMSNorm over all heads' features (olmo2: exact
  when every head is copied equally often, refused otherwise).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from growcli.analysis.attention import attention_sites
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.runner import Output, Source, Step, grow
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.heads import check_layout
from growcli.transforms.registry import Context
from growcli.transforms.width_edit import trace_width
from conftest import perturb

EXACT = 1e-10
VOCAB = 128
SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64, "max_position_embeddings": 64, "vocab_size": VOCAB,
         "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 64, "rotary_dim": 4, "word_embed_proj_dim": 32,
         "ffn_dim": 64, "global_attn_every_n_layers": 1}


def _save(family: str, directory: Path, **extra) -> Path:
    """A tiny float64 ``family`` model with seeded random weights, saved in ``directory``."""
    import transformers as T
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto as auto

    T.utils.logging.set_verbosity_error()
    cls = CONFIG_MAPPING[family]
    default = cls().to_dict()
    kwargs = {k: v for k, v in SMALL.items() if k in default}
    kwargs.update({k: VOCAB - 1 for k, v in default.items() if k.endswith("token_id") and isinstance(v, int)
                   and v >= VOCAB})
    kwargs.update(extra)
    name = auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(family) or auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]
    torch.manual_seed(0)
    model = getattr(T, name)(cls(**kwargs)).to(torch.float64).eval()
    perturb(model, 0.02)  # no norm, bias or scale left at its init
    path = directory / family
    model.save_pretrained(path)
    return path


def _grow_exactly(path: Path, out: Path, transform: str, options: dict) -> dict:
    """Grow and write a Hugging Face directory; the step and the ``from_pretrained`` read-back are exact."""
    report = grow(Source(path), [Step(transform, options)], [Output(str(out) + "/")], seed=0,
                  settings=VerifySettings(batches=1))
    diffs = [float(report["verification"]["max_abs_diff"])] + [float(o["max_abs_diff"]) for o in report["outputs"]]
    assert report["function_preserving"] and max(diffs) <= EXACT, diffs
    assert any("from_pretrained" in str(o) for o in report["outputs"]), report["outputs"]
    return report


# --------------------------------------------------------------------------- Hugging Face families
# Until the config probe (heads._probe) counts a fused weight's query rows with heads.query_features, it
# reads phi3's and gpt_bigcode's whole q|k|v weight as query features and refuses the new head count.
FAMILIES = [
    # family, config extras, transform, options, what the rule is about
    pytest.param("phi3", {}, "hidden", {"factor": 2}),  # qkv_proj sliced into q | k | v (GQA)
    pytest.param("gpt_bigcode", {}, "hidden", {"factor": 2}),  # multi-query: k, v one unsqueezed head
    ("gpt_neox", {}, "hidden", {"factor": 2}),  # per-head [H, 3·hd] then chunk along the head block
    ("modernbert", {}, "hidden", {"factor": 2}),  # [3, H, hd] then unbind
    ("persimmon", {}, "hidden", {"factor": 2}),  # per-head [H, 3, hd] then select; per-head q/k LayerNorm
    ("cohere", {}, "hidden", {"factor": 2}),  # interleaved rotary: stack of halves, flatten inside head_dim
    ("gptj", {}, "hidden", {"factor": 2}),  # interleaved partial rotary on a slice of head_dim
    ("opt", {}, "hidden", {"factor": 2}),  # q_proj(x) · head_dim^-½ before the head split
    ("olmo2", {"head_dim": 8}, "heads", {"factor": 2}),  # RMSNorm over all heads' q (and k) features
]


# How the trace lays out q, k and v: (offset, size, head block or None for head_dim) of each.
LAYOUTS = {
    "phi3": [(0, 32, None), (32, 16, None), (48, 16, None)],
    "gpt_bigcode": [(0, 32, None), (32, 8, None), (40, 8, None)],
    "gpt_neox": [(0, 96, 24)] * 3,  # q, k and v of a head in one block of 3·head_dim rows
    "persimmon": [(0, 96, 24)] * 3,
    "modernbert": [(0, 32, None), (32, 32, None), (64, 32, None)],
}


@pytest.mark.parametrize("family,extra,transform,options", FAMILIES,
                         ids=[f"{(f.values if hasattr(f, 'values') else f)[0]}" for f in FAMILIES])
def test_family_grows_exactly(tmp_path, family, extra, transform, options):
    import growcli

    path = _save(family, tmp_path, **extra)
    if family in LAYOUTS:
        gm = growcli.load_model(path)
        sites = attention_sites(trace_width(gm))
        assert [(p.offset, p.size, p.head_size) for p in (sites[0].q, sites[0].k, sites[0].v)] == LAYOUTS[family]
        check_layout(gm, sites, {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4})
    _grow_exactly(path, tmp_path / "out", transform, options)


def test_a_layout_that_moves_heads_when_they_grow_is_refused(tmp_path):
    """CodeGen reshapes its fused qkv into a constant four groups: with four heads that looks like gpt_neox's
    per-head blocks, but with eight the grown model reads the features from other rows."""
    import growcli

    gm = growcli.load_model(_save("codegen", tmp_path))
    sites = attention_sites(trace_width(gm))
    assert (sites[0].q.offset, sites[0].q.size, sites[0].q.head_size) == (0, 96, 24)
    with pytest.raises(NotGrowableError, match=r"a model with 8 attention heads computes its attention in another way "
                                               r"than this one .*so copying whole heads in place would not be exact"):
        check_layout(gm, sites, {"hidden_size": 64, "num_attention_heads": 8})


def test_norm_over_all_heads_is_recorded_and_uneven_copies_refused(tmp_path):
    import growcli

    gm = growcli.load_model(_save("olmo2", tmp_path, head_dim=8))
    site = attention_sites(trace_width(gm))[0]
    assert {p.weight.rsplit(".", 2)[-2] for _, p in site.params} == {"q_norm", "k_norm"}
    assert [n for n, _ in sorted(site.params)] == ["k", "q"] and len(site.stats) == 2
    with pytest.raises(NotGrowableError, match=r"q_norm.*normalises all heads' features together.*multiple of 4, got 6"):
        run_step(gm, "heads", {"to": 6}, Context(), VerifySettings(batches=1))


# --------------------------------------------------------------------------- small torch modules
class Attention(nn.Module):
    """Multi-head self-attention whose query features pass through ``scale`` before the head split."""

    def __init__(self, scale: str, heads: int = 4, hd: int = 8, d: int = 32):
        super().__init__()
        self.hd, self.scale = hd, scale
        self.emb = nn.Embedding(VOCAB, d)
        kv = hd if scale == "multi-query" else heads * hd  # multi-query: one key/value head, expanded to all
        self.q, self.k, self.v, self.o = (nn.Linear(d, heads * hd), nn.Linear(d, kv), nn.Linear(d, kv),
                                          nn.Linear(heads * hd, d))
        self.gamma = nn.Parameter(torch.rand(heads * hd) + 0.5)
        self.temp = nn.Parameter(torch.tensor([0.7]))
        self.register_buffer("pos", torch.randn(6, heads * hd))

    def forward(self, ids):
        x = self.emb(ids)
        b, n, _ = x.shape
        q = self.q(x)
        if self.scale == "scalar":
            q = q * (1 / math.sqrt(self.hd))
        elif self.scale == "parameter":  # a per-feature parameter: copied with its head
            q = q * self.gamma * self.temp
        elif self.scale == "varying":  # computed from no projection and different across the features
            q = q * torch.cos(self.pos[:n])
        split = lambda t: t.view(b, n, -1, self.hd).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(self.k(x)), split(self.v(x))
        if self.scale == "multi-query":
            k, v = k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


def _module_model(scale: str) -> GrowModel:
    torch.manual_seed(0)
    m = Attention(scale).double().eval()
    return GrowModel(m, "state_dict", Path("mem"), "0", spec_from_batch(((torch.randint(0, VOCAB, (2, 6)),), {})))


@pytest.mark.parametrize("scale", ["scalar", "parameter", "multi-query"])
def test_query_scaling_grows_exactly(scale):
    gm = _module_model(scale)
    before = {k: v.clone() for k, v in gm.module.state_dict().items()}
    ids = torch.randint(0, VOCAB, (3, 6))
    with torch.no_grad():
        want = gm.module(ids)
    run_step(gm, "heads", {"factor": 2}, Context(), VerifySettings(batches=1))
    with torch.no_grad():
        got = gm.module(ids)
    assert (got - want).abs().max().item() <= EXACT
    assert gm.module.q.weight.shape == (64, 32) and gm.module.k.weight.shape == ((8, 32) if scale == "multi-query"
                                                                               else (64, 32))
    if scale == "parameter":  # the per-feature scale grows with the heads: a copy of head s carries head s's γ
        q, gamma, old_q, old_gamma = gm.module.q.weight, gm.module.gamma, before["q.weight"], before["gamma"]
        for j in range(8):
            s = next(s for s in range(4) if torch.equal(q[8 * j:8 * j + 8], old_q[8 * s:8 * s + 8]))
            assert torch.equal(gamma[8 * j:8 * j + 8], old_gamma[8 * s:8 * s + 8])
        assert torch.equal(gm.module.temp, before["temp"])


def test_query_scaled_by_a_tensor_varying_across_features_is_refused():
    gm = _module_model("varying")
    with pytest.raises(NotGrowableError, match=r"attention in '': mul.Tensor combines the attention features with a "
                                               r"tensor that varies across them"):
        run_step(gm, "heads", {"factor": 2}, Context(), VerifySettings(batches=1))
