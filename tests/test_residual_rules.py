"""Residual-structure rules of the writer analysis, each on real tiny Hugging Face families that need it.

- a norm after a branch's last layer (sandwich / output norms: Gemma2, Gemma3): RMSNorm maps
  0 to 0 when ``ε > 0``, so zeroing the layer before it zeroes the branch;
- parallel attention + MLP residuals summed before the add, in place (Falcon's ``+=``) or
  not (GPT-NeoX's ``use_parallel_residual``), with Falcon's weights read as ``x @ W.T``;
- a residual multiplier on the branch (Granite's ``residual_multiplier``);
- refused, never guessed: a branch divided by its own norm without ``ε`` (0/0 at zero), a constant
  added on the branch (it stays when the layer is zeroed).

Each grown model is written by the runner as a Hugging Face directory, reloaded with
``from_pretrained`` and compared in float64 with the model it was grown from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from growcli.analysis.residual import ResidualRefusal, block_writers, stack_writers
from growcli.analysis.trace import trace_model
from growcli.run.runner import Output, Source, Step, grow
from conftest import perturb

EXACT = 1e-10
SMALL = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             num_kv_heads=1, intermediate_size=32, max_position_embeddings=32, head_dim=8, use_cache=False)


EXTRA = {"gpt_neox": {"use_parallel_residual": True}, "falcon": {"parallel_attn": True},
         "granite": {"residual_multiplier": 0.22}, "granite_swa": {"residual_multiplier": 0.22}}


def _config(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = AutoConfig.for_model(family).to_dict()  # each family gets the SMALL values it has
    config = AutoConfig.for_model(family, **{k: v for k, v in SMALL.items() if k in fields}, **EXTRA.get(family, {}))
    return (lambda c: AutoModelForCausalLM.from_config(c)), config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family → (directory of the saved float64 model, the model)."""
    out = {}

    def get(family: str):
        if family not in out:
            build, config = _config(family)
            torch.manual_seed(0)
            model = build(config).to(torch.float64).eval()
            perturb(model)  # no norm, bias or scale left at its init
            path = tmp_path_factory.mktemp(family) / "model"
            model.save_pretrained(path)
            out[family] = (path, model)
        return out[family]

    return get


def _reloaded_diff(original: nn.Module, directory: Path) -> float:
    from transformers import AutoModelForCausalLM

    grown = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return (grown(input_ids=ids).logits - original(input_ids=ids).logits).abs().max().item()


def _grow(directory: Path, out: Path, step: Step) -> dict:
    return grow(Source(directory), [step], [Output(str(out) + "/")], seed=0)


SANDWICH = ["gemma2", "gemma3_text"]


@pytest.mark.parametrize("family", SANDWICH)
def test_sandwich_norms_zero_the_layer_before_the_norm(family, saved):
    _, model = saved(family)
    ids = torch.zeros(1, 5, dtype=torch.long)
    found = stack_writers(trace_model(model, ((), {"input_ids": ids})), model, "model.layers")
    for writers in found.values():  # o_proj and down_proj, not the norms' (1 + γ) scales after them
        assert writers.writers == ("mlp.down_proj.weight", "self_attn.o_proj.weight") and not writers.post_norms


@pytest.mark.parametrize("family,command", [("gemma2", "stack"), ("gemma3_text", "deepen"), ("gemma2", "deepen")])
def test_sandwich_norm_families_grow_exactly(family, command, saved, tmp_path):
    directory, model = saved(family)
    step = (Step("stack", {"factor": 2, "init": "identity"}) if command == "stack"
            else Step("deepen", {"after": "model.layers.0", "block": True}))
    report = _grow(directory, tmp_path / "out", step)
    assert report["function_preserving"] and report["steps"][0]["exact"]
    assert report["verification"]["dtype"] == "float64" and report["verification"]["max_abs_diff"] <= EXACT
    layers = 4 if command == "stack" else 3
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "out").num_hidden_layers == layers
    assert _reloaded_diff(model, tmp_path / "out") <= EXACT


# (family, command, writers of every block): one rule each, two families each.
OTHERS = [
    ("falcon", "stack", ("mlp.dense_4h_to_h.weight", "self_attention.dense.weight")),
    ("gpt_neox", "deepen", ("attention.dense.bias", "attention.dense.weight", "mlp.dense_4h_to_h.bias",
                            "mlp.dense_4h_to_h.weight")),
    ("granite", "stack", ("mlp.down_proj.weight", "self_attn.o_proj.weight")),
    ("granite_swa", "deepen", ("mlp.down_proj.weight", "self_attn.o_proj.weight")),
]


@pytest.mark.parametrize("family,command,writers", OTHERS, ids=[f"{f}-{c}" for f, c, _ in OTHERS])
def test_parallel_and_scaled_residual_families_grow_exactly(family, command, writers, saved, tmp_path):
    directory, model = saved(family)
    container = "transformer.h" if family == "falcon" else "gpt_neox.layers" if family == "gpt_neox" else "model.layers"
    ids = torch.zeros(1, 5, dtype=torch.long)
    found = stack_writers(trace_model(model, ((), {"input_ids": ids})), model, container)
    assert all(w.writers == writers and not w.post_norms for w in found.values())
    step = (Step("stack", {"factor": 2, "init": "identity"}) if command == "stack"
            else Step("deepen", {"after": f"{container}.0", "block": True}))
    report = _grow(directory, tmp_path / "out", step)
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= EXACT
    assert _reloaded_diff(model, tmp_path / "out") <= EXACT


# --------------------------------------------------------------------------- where the maths stops
class RMS(nn.Module):
    """``x + norm(fc(h))`` with ``norm(t) = t·rsqrt(mean(t²) + ε)·(1 + γ)``; ε = 0 makes norm(0) = 0/0."""

    def __init__(self, eps: float, d: int = 8):
        super().__init__()
        self.ln, self.fc, self.eps = nn.LayerNorm(d), nn.Linear(d, d), eps
        self.gamma = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        t = self.fc(self.ln(x))
        return x + t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.gamma)


class UnitBranch(RMS):
    """``x + F/‖F‖``: no ε, zero branch is 0/0."""

    def forward(self, x):
        t = self.fc(self.ln(x))
        return x + t / t.norm(dim=-1, keepdim=True)


class PlusOne(RMS):
    """``x + (fc(h) + 1)``: the constant stays when fc is zeroed."""

    def forward(self, x):
        return x + (self.fc(self.ln(x)) + 1.0)


class Net(nn.Module):
    def __init__(self, *blocks: nn.Module, d: int = 8):
        super().__init__()
        self.inp, self.blocks = nn.Linear(d, d), nn.ModuleList(blocks)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return x


def _writers(model: nn.Module):
    return block_writers(trace_model(model, ((torch.randn(2, 3, 8, dtype=torch.float64),), {})), model, "blocks.0")


def test_rms_norm_with_eps_is_zeroed_before_it():
    model = Net(RMS(1e-6), RMS(1e-6)).double().eval()
    assert _writers(model).writers == ("fc.bias", "fc.weight")
    zeroed = Net(RMS(1e-6)).double().eval()
    with torch.no_grad():
        zeroed.blocks[0].fc.weight.zero_()
        zeroed.blocks[0].fc.bias.zero_()
        x = torch.randn(2, 3, 8, dtype=torch.float64)
        assert torch.equal(zeroed.blocks[0](x), x)  # norm(0) = 0 · rsqrt(ε) · (1 + γ) = 0 exactly


@pytest.mark.parametrize("block,op", [(lambda: RMS(0.0), "aten.mul"), (lambda: UnitBranch(0.0), "aten.div"),
                                      (lambda: PlusOne(0.0), "aten.add")], ids=["rms-eps-0", "unit-norm", "plus-one"])
def test_branches_not_zero_at_zero_are_refused(block, op):
    model = Net(block(), block()).double().eval()
    with pytest.raises(ResidualRefusal) as err:
        _writers(model)
    r = err.value.refusal
    assert (r.block, r.op, r.module) == ("blocks.0", op, "blocks.0")
    assert r.reason == f"{op} in blocks.0 sits on a residual branch and growcli has no rule to make it write zero"
