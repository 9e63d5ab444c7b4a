"""FFN widen of fused projections: one Linear whose output is split into gate and up (``chunk``/``split``/slices).

Phi-3 and GLM-4 compute ``gate, up = gate_up_proj(x).chunk(2, -1)``, ModernBERT ``Wi(x).chunk(2, -1)``; the FFN's
channels are the parts' channels, so growing channel ``j`` grows rows ``j`` and ``I + j`` of the fused weight
together. Every case widens a tiny real model with random float64 weights, checks the rows, and reads the grown
model back (``growcli.load_grown`` from safetensors, ``from_pretrained`` from a Hugging Face directory) to compare
it with the original on inputs growcli has not seen: max abs diff ≤ 1e-10.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import growcli
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context

VOCAB, TOL = 128, 1e-10


def build(family: str) -> nn.Module:
    """A tiny float64 ``family`` model with seeded random weights of unit scale."""
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=64, pad_token_id=0)
    if family == "phi3":
        m = T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=2, **common))
    elif family == "glm4":
        m = T.Glm4ForCausalLM(T.Glm4Config(num_key_value_heads=2, head_dim=8, **common))
    elif family == "modernbert":
        m = T.ModernBertForMaskedLM(T.ModernBertConfig(bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                                       mask_token_id=3, global_attn_every_n_layers=1, **common))
    else:
        raise KeyError(family)
    m.config.use_cache = False
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 1 else p.shape[-1] ** -0.5)
                    + (1.0 if p.dim() == 1 else 0.0))
    return m.double().eval()


def as_model(module: nn.Module) -> GrowModel:
    ids = {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))}
    return GrowModel(module, "hf", Path("mem"), "0", spec_from_batch(((), ids)), hf_class=type(module).__name__)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


FUSED = {"phi3": ("model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"),
         "glm4": ("model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"),
         "modernbert": ("model.layers.0.mlp.Wi", "model.layers.0.mlp.Wo")}


@pytest.mark.parametrize("init", ["net2net", "zero"])
@pytest.mark.parametrize("family", sorted(FUSED))
def test_fused_gate_up_widen_is_exact_and_reloads(family, init, tmp_path):
    original = build(family)
    original.save_pretrained(tmp_path / "src")
    gm = growcli.load_model(tmp_path / "src")
    fused, down = FUSED[family]
    report = growcli.apply(gm, "widen", layer=fused, by=16, init=init, seed=4)
    assert report.exact and report.verification["passed"]
    old_w = original.get_submodule(fused).weight
    new_w = gm.module.get_submodule(fused).weight
    assert tuple(new_w.shape) == (128, 32) and tuple(gm.module.get_submodule(down).weight.shape) == (32, 64)
    # the old channels keep their rows in both halves; a net2net copy repeats its source in both halves
    assert torch.equal(new_w[:48], old_w[:48]) and torch.equal(new_w[64:112], old_w[48:])
    if init == "net2net":
        for j in range(48, 64):
            src = next(k for k in range(48) if torch.equal(new_w[j], old_w[k]))
            assert torch.equal(new_w[64 + j], old_w[48 + src])
    assert max_diff(original, gm.module) <= TOL
    path = tmp_path / "grown.safetensors"
    growcli.save_model(gm, path)
    reloaded = growcli.load_grown(type(original).from_pretrained(tmp_path / "src"), path)
    assert max_diff(original, reloaded) <= TOL
    # the other blocks are untouched: the config still says 48, so only load_grown describes the model
    assert gm.module.config.intermediate_size == 48


def test_every_block_widened_reloads_with_from_pretrained(tmp_path):
    """Growing every block's fused projection changes intermediate_size; from_pretrained builds the grown model."""
    import transformers as T

    original = build("phi3")
    original.save_pretrained(tmp_path / "src")
    gm = growcli.load_model(tmp_path / "src")
    report = growcli.apply(gm, "widen", layer="gate_up_proj", factor=1.5, seed=1)
    assert report.verification["passed"] and gm.module.config.intermediate_size == 72
    growcli.save_model(gm, tmp_path / "out/")
    reloaded = T.Phi3ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert max_diff(original, reloaded) <= TOL


class SplitMLP(nn.Module):
    """A fused gate/up Linear split by ``split`` (``mode`` "split") or by slices (``mode`` "slice")."""

    def __init__(self, mode: str, parts: int = 2):
        super().__init__()
        self.mode, self.parts = mode, parts
        self.inp = nn.Linear(6, 8 * parts)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        n = h.shape[-1] // self.parts  # sizes from the shape, so the grown module runs as it is
        if self.mode == "split":
            parts = h.split(n, dim=-1)
        elif self.mode == "slice":
            parts = [h[:, k * n:(k + 1) * n] for k in reversed(range(self.parts))]
        else:  # unequal parts
            parts = h.split([5, 11], dim=-1)
            return self.out(torch.cat([parts[0], parts[1][:, :3]], -1))
        y = torch.sigmoid(parts[0])
        for p in parts[1:]:
            y = y * torch.relu(p)
        return self.out(y)


@pytest.mark.parametrize("mode,parts", [("split", 2), ("slice", 2), ("slice", 3)])
def test_split_and_slices_share_one_channel_map(mode, parts):
    torch.manual_seed(0)
    m = SplitMLP(mode, parts).double().eval()
    gm = GrowModel(m, "module", Path("mem"), "0", spec_from_batch(((torch.randn(4, 6, dtype=torch.float64),), {})))
    before = copy.deepcopy(m)
    run_step(gm, "widen", {"layer": "inp", "to": 12}, Context(seed=0), VerifySettings(batches=2))
    assert tuple(m.inp.weight.shape) == (12 * parts, 6) and tuple(m.inp.bias.shape) == (12 * parts,)
    assert tuple(m.out.weight.shape) == (3, 12)
    x = torch.randn(5, 6, dtype=torch.float64)
    assert float((before(x) - m(x)).abs().max()) <= TOL


def test_unequal_parts_are_refused():
    m = SplitMLP("unequal").double().eval()
    gm = GrowModel(m, "module", Path("mem"), "0", spec_from_batch(((torch.randn(4, 6, dtype=torch.float64),), {})))
    with pytest.raises(NotGrowableError, match=r"'inp': split_with_sizes.default splits the channels into parts of sizes \[5, 11\]"):
        run_step(gm, "widen", {"layer": "inp", "by": 2}, Context(seed=0), VerifySettings(batches=1))


def test_gradmax_refuses_a_fused_projection():
    """GradMax's and Firefly's formulas are for one activation between producer and consumer: refused, not guessed."""
    from growcli.analysis.coupling import analyze
    from growcli.transforms.gradmax_site import find_site
    from growcli.transforms.widen import _trace

    trace = _trace(as_model(build("phi3")))
    with pytest.raises(NotGrowableError, match="gradmax: chunk.default in 'model.layers.0.mlp' lies between it and its consumer"):
        find_site(trace, analyze(trace, "model.layers.0.mlp.gate_up_proj"))
