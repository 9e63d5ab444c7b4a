"""Growth exact in the checkpoint's own dtype, and tolerances derived from what exact arithmetic leaves.

Tiny Hugging Face models (Llama with grouped-query attention, Qwen2, GPT-2, ViT; transformers
classes from tiny configs, random weights) saved in bf16 are grown by widen (FFN ×2, ×1.5),
heads ×2 and hidden ×2, ×3; both models evaluated in float64 must agree to ≤ 1e-12 relative
(measured here, independently of growcli.verification). Llama and Qwen2 compute RMSNorm and
rotary angles in float32 whatever the model's dtype, so their ×3 tiling (a mean over 3·d
entries instead of d) is exact only to float32 rounding: that is the model's arithmetic, and
the verification tolerance says so. Steps that cannot be exact in bf16 (LayerNorm padding,
paired noise) say so and are held to bf16's rounding.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from growcli.core.errors import VerificationFailed
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.io.load import load_model
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context
from growcli.transforms.splits import split_columns
from growcli.verification.compare import (DEFAULT_TOL, EXACT_ULPS, exact_tolerance, flatten_outputs, profile_run,
                                          verify_models)

VOCAB = 64
FFN = {"llama": "mlp.up_proj", "qwen2": "mlp.up_proj", "gpt2": "mlp.c_fc", "vit": "mlp.fc1"}
F32_INSIDE = {"llama", "qwen2"}  # RMSNorm and rotary angles in float32


def _build(family: str):
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 5))}
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    if family == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, head_dim=8,
                                             max_position_embeddings=16, **small))
    elif family == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=16,
                                             **small))
    elif family == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    else:
        m = T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=8, num_labels=3, **small))
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16)}
    m.config.use_cache = False
    with torch.no_grad():  # unit-scale weights, non-trivial norms and biases
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return m.to(torch.bfloat16).eval(), inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family → a bf16 Hugging Face directory (real safetensors) of that tiny model, and its inputs."""
    root = tmp_path_factory.mktemp("bf16")
    cache: dict[str, tuple[Path, dict]] = {}

    def get(family: str):
        if family not in cache:
            model, inputs = _build(family)
            model.save_pretrained(root / family)
            cache[family] = (root / family, inputs)
        return cache[family]

    return get


def _load(saved, family: str) -> GrowModel:
    directory, inputs = saved(family)
    gm = load_model(directory)
    assert {p.dtype for p in gm.module.parameters()} == {torch.bfloat16}
    gm.inputs = spec_from_batch(((), inputs))
    return gm


def _rel64(before, after, inputs) -> float:
    """max |a − b| / max |a| over every output, both models in float64, on inputs growcli has not seen."""
    gen = torch.Generator().manual_seed(7)
    fresh = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) if v.is_floating_point()
             else torch.randint(0, VOCAB, v.shape, generator=gen) for k, v in inputs.items()}
    a64, b64 = copy.deepcopy(before).double().eval(), copy.deepcopy(after).double().eval()
    with torch.no_grad():
        a, b = flatten_outputs(a64(**fresh)), flatten_outputs(b64(**fresh))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)


# (family, transform, options, relative bound in float64)
CASES = [
    *[(f, "widen", {"layer": FFN[f], "factor": x}, 1e-12) for f in FFN for x in (2.0, 1.5)],
    ("llama", "heads", {"factor": 2.0}, 1e-12),
    *[(f, "hidden", {"factor": 2.0}, 1e-12) for f in FFN],  # GPT-2, ViT, Qwen2: heads ×2 with it
    ("gpt2", "hidden", {"factor": 3.0}, 1e-12),
    ("vit", "hidden", {"factor": 3.0}, 1e-12),
    # float32 RMSNorm inside the model: a mean over 96 entries instead of 32 rounds in float32
    ("llama", "hidden", {"factor": 3.0}, 1e-6),
    ("qwen2", "hidden", {"factor": 3.0}, 1e-6),
]


@pytest.mark.parametrize("family, transform, options, bound", CASES,
                         ids=[f"{c[0]}-{c[1]}-{next(iter(c[2].values())) if c[1] != 'widen' else c[2]['factor']}"
                              for c in CASES])
def test_bf16_growth_matches_in_float64(saved, family, transform, options, bound):
    gm = _load(saved, family)
    before = copy.deepcopy(gm.module)
    report = run_step(gm, transform, options, Context(seed=1), VerifySettings(batches=1))
    assert report.exact and report.verification["passed"]
    assert {p.dtype for p in gm.module.parameters()} == {torch.bfloat16}
    rel = _rel64(before, gm.module, saved(family)[1])
    assert rel <= bound, rel
    if transform == "widen":
        return  # widen does not declare itself yet: verified at bf16's rounding
    v = report.verification
    assert report.exact_in_dtype is True
    assert v["basis"].startswith("exact in bfloat16: 16 ulps of "), v["basis"]
    if family in F32_INSIDE:  # the model's own float32 arithmetic sets the tolerance
        assert "the model computes in float32 inside" in v["basis"]
        assert v["rtol"] < 1e-4
    else:
        assert v["rtol"] <= 1e-12 and v["atol"] <= 1e-12
        assert v["max_abs_diff"] <= v["rtol"] * max(o["scale"] for o in v["outputs"])


def test_hidden_x3_readers_sum_to_the_original_bit_for_bit(saved):
    """Every column of a reader of the residual stream is split over its 3 tiles exactly in bf16;
    W/3 rounded to bf16 would not be (its tiles miss W in most entries)."""
    gm = _load(saved, "gpt2")
    old = gm.module.transformer.h[0].mlp.c_fc.weight.detach().clone()  # Conv1D: [in = hidden, out]
    run_step(gm, "hidden", {"factor": 3.0}, Context(seed=1), VerifySettings(batches=1))
    new = gm.module.transformer.h[0].mlp.c_fc.weight.detach()
    assert new.dtype == torch.bfloat16 and new.shape == (96, 128)
    tiles = new.double().view(3, 32, 128).sum(0)
    old = old.double()
    assert torch.equal(tiles, old)  # the 3 parts of every weight add up to it exactly
    naive = (old / 3).to(torch.bfloat16).double() * 3
    assert float((naive != old).double().mean()) > 0.5


def test_heads_output_columns_sum_exactly_in_bf16(saved):
    gm = _load(saved, "llama")
    attn = gm.module.model.layers[0].self_attn
    old_o = attn.o_proj.weight.detach().double().clone()
    old_q = attn.q_proj.weight.detach().clone()
    run_step(gm, "heads", {"to": 8}, Context(seed=2), VerifySettings(batches=1))
    new_q, new_o = attn.q_proj.weight.detach(), attn.o_proj.weight.detach().double()
    assert new_o.shape == (32, 64)
    summed = torch.zeros_like(old_o)
    for h in range(8):  # each new head is a copy of a source head; its o columns are a part of the source's
        src = next(s for s in range(4) if torch.equal(new_q[h * 8:(h + 1) * 8], old_q[s * 8:(s + 1) * 8]))
        summed[:, src * 8:(src + 1) * 8] += new_o[:, h * 8:(h + 1) * 8]
    assert torch.equal(summed, old_o)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_split_columns_parts_sum_exactly(dtype, k):
    gen = torch.Generator().manual_seed(k)
    old = torch.randn(7, 6, generator=gen).to(dtype)
    idx = torch.arange(6).repeat(k)
    for name, share in (("uniform", torch.full((6 * k,), 1.0 / k, dtype=torch.float64)),
                        ("random", torch.rand(6 * k, generator=gen, dtype=torch.float64) + 0.5)):
        share = share / torch.zeros(6, dtype=torch.float64).index_add_(0, idx, share)[idx]
        new, got = split_columns(old, 1, idx, share, torch.ones(6 * k, dtype=torch.bool))
        sums = torch.zeros(7, 6, dtype=torch.float64).index_add_(1, idx, new.double())
        assert new.dtype == dtype and torch.equal(sums, old.double()), name
        assert torch.allclose(torch.zeros(6, dtype=torch.float64).index_add_(0, idx, got), torch.ones(6, dtype=torch.float64))
    _, got = split_columns(old, 1, torch.arange(6).repeat(4), torch.full((24,), 0.25, dtype=torch.float64),
                           torch.ones(24, dtype=torch.bool))
    assert got.tolist() == [0.25] * 24  # powers of two are applied as asked
    _, got = split_columns(old, 1, torch.arange(6).repeat(3), torch.full((18,), 1 / 3, dtype=torch.float64),
                           torch.ones(18, dtype=torch.bool))
    assert got.tolist() == [0.5] * 6 + [0.25] * 12  # 1/3 is not exact: the remainder construction's shares


@pytest.mark.parametrize("options, why", [({"to": 40}, "mean padding rounded"), ({"factor": 2.0, "noise": 0.05}, "paired ±noise")])
def test_steps_that_cannot_be_exact_in_bf16_say_so(saved, options, why):
    gm = _load(saved, "gpt2")
    report = run_step(gm, "hidden", options, Context(seed=1), VerifySettings(batches=1))
    v = report.verification
    assert report.exact and v["passed"] and report.exact_in_dtype is False
    note = next(n for n in report.notes if n.startswith("not exact in bfloat16: "))
    assert why in note and note.endswith("verified at that dtype's rounding")
    assert (v["atol"], v["rtol"]) == DEFAULT_TOL[torch.bfloat16]
    assert v["basis"] == "bfloat16 rounding (the step rounds weights to bfloat16)"


def test_one_bf16_rounding_fails_the_tight_tolerance_and_passes_the_rounded_one(saved):
    """What the tight tolerance buys: a single reader weight rounded as W/3 would be is caught."""
    gm = _load(saved, "gpt2")
    before = copy.deepcopy(gm.module)
    report = run_step(gm, "hidden", {"factor": 3.0}, Context(seed=1), VerifySettings(batches=1))
    assert report.verification["max_abs_diff"] < 1e-13
    w = gm.module.transformer.h[0].mlp.c_fc.weight
    with torch.no_grad():
        w[0, 0] = w[0, 0] * (1 + 2 ** -8)  # one bf16 ulp on one part
    batches = [((), saved("gpt2")[1])]
    tight = verify_models(before, gm.module, batches, exact_in_dtype=True)
    loose = verify_models(before, gm.module, batches)
    assert not tight.passed and loose.passed
    assert 1e-6 < tight.max_abs_diff < loose.rtol
    assert "tolerance: exact in bfloat16" in tight.summary()


def test_a_failing_exact_step_exits_through_verification_failed(saved, monkeypatch):
    """run_step holds an exact-in-dtype step to the tight tolerance: a rounding slipped into the
    rewrite (W·s computed in float64 and rounded, as before) is a verification failure."""
    import growcli.transforms.width_edit as we

    def rounded_split(t, m, noise, gen):  # the old behaviour: float64 shares rounded to bf16
        return we._ideal(t.double(), m).to(t.dtype), m, ""

    monkeypatch.setattr(we, "_rewrite_dim", rounded_split)
    gm = _load(saved, "gpt2")
    with pytest.raises(VerificationFailed, match=r"tolerance: exact in bfloat16"):
        run_step(gm, "hidden", {"factor": 3.0}, Context(seed=1), VerifySettings(batches=1))


def test_exact_tolerance_is_ulps_per_stage():
    assert exact_tolerance(torch.float64, 10) == (EXACT_ULPS * 2.0 ** -52 * 10,) * 2
    assert exact_tolerance(torch.float32, 0) == (EXACT_ULPS * 2.0 ** -23,) * 2


class _Float32Norm(torch.nn.Module):
    """A model whose forward computes a LayerNorm in float32 whatever its dtype (as Llama's RMSNorm does)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return torch.nn.functional.layer_norm(y.float(), (4,)).to(y.dtype)


def test_tolerance_follows_the_models_own_arithmetic():
    torch.manual_seed(0)
    batch = [((torch.randn(3, 4, dtype=torch.float64),), {})]
    plain = torch.nn.Linear(4, 4).double()
    prof = profile_run(plain, batch[0], torch.float64)
    assert prof.lowest == torch.float64 and prof.stages == 1
    r = verify_models(plain, plain, batch, exact_in_dtype=True)
    assert r.rtol == EXACT_ULPS * 2.0 ** -52 and r.basis == "exact in float64: 16 ulps of float64 per rounding stage × 1 stages"
    m = _Float32Norm()
    prof = profile_run(copy.deepcopy(m).double(), batch[0], torch.float64)
    assert prof.lowest == torch.float32 and prof.stages == 2
    r = verify_models(m, m, batch, exact_in_dtype=True)  # float32 weights, float32 inside: capped at float32's rounding
    assert (r.atol, r.rtol) == (min(2 * EXACT_ULPS * 2.0 ** -23, 1e-6), min(2 * EXACT_ULPS * 2.0 ** -23, 1e-5))
    assert "the model computes in float32 inside" in r.basis
    r = verify_models(m, m, batch, rtol=1e-3)
    assert r.rtol == 1e-3 and r.basis.startswith("given (otherwise: float32 rounding")
    r = verify_models(m, m, batch)
    assert (r.atol, r.rtol) == DEFAULT_TOL[torch.float32] and "does not say it is exact in float32" in r.basis


def test_cli_report_records_the_tolerance_and_why(saved, cli, tmp_path):
    directory, inputs = saved("gpt2")
    out = tmp_path / "grown"
    r = cli("widen", directory, "--hidden", "3x", "-o", f"{out}/", "--json", "--batches", "1")
    assert r.code == 0, r.err
    report = json.loads((out / "growth_report.json").read_text())
    step = report["steps"][0]
    assert step["verification"]["basis"].startswith("exact in bfloat16: 16 ulps of float64")
    assert step["verification"]["rtol"] <= 1e-12
    import transformers as T

    grown = T.GPT2LMHeadModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    original = T.GPT2LMHeadModel.from_pretrained(directory, torch_dtype=torch.bfloat16)
    assert grown.config.n_embd == 96 and grown.lm_head.weight.dtype == torch.bfloat16
    assert _rel64(original, grown, inputs) <= 1e-12
