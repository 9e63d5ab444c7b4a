"""Embedding models under hidden-size growth: outputs through the map, cosine similarities unchanged.

Growing the hidden size from d to d' = k·d + r makes every hidden vector [x, …, x, p]
(``hidden``, docs/recipes.md#hidden). An embedding model returns those vectors, so "the same
function" means: the grown output, read through the map (tile t of the grown vector against the
original, padded entries left out), equals the original (float64, ≤ 1e-10); and cosine similarities
of mean-pooled embeddings are equal (≤ 1e-12), because tiling multiplies every dot product and
every squared norm by k, and padded entries that are zero add nothing.

Models are tiny real transformers with random weights. BertModel (post-LN) grows by whole
multiples only; a non-multiple size is refused (a post-LN LayerNorm leaves the padded entries
constant, not the per-token mean the next LayerNorm needs). GPT2Model (pre-LN, a final LayerNorm)
grows to a non-multiple size too: its padded outputs are the padded β, zero.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from growcli.core.errors import NotGrowableError
from growcli.core.model import GrowModel
from growcli.io.hf_dir import hf_input_spec
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context

T = pytest.importorskip("transformers")
VOCAB = 50


def _supports_hidden_outputs() -> bool:
    """Whether ``hidden`` grows models that return hidden states (the stream analysis records outputs)."""
    from growcli.analysis.stream_plan import StreamPlan

    return "outputs" in StreamPlan.__dataclass_fields__


needs_hidden_outputs = pytest.mark.skipif(not _supports_hidden_outputs(), reason="hidden growth of models returning "
                                          "hidden states (output maps) not integrated yet")


def bert(head: bool = False):
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=32)
    return (T.BertForMaskedLM(config) if head else T.BertModel(config)).eval()


def gpt2_model():
    torch.manual_seed(0)
    return T.GPT2Model(T.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()


def as_gm(module) -> GrowModel:
    module = copy.deepcopy(module).double().eval()
    module.config.use_cache = False
    return GrowModel(module, "hf", Path("mem"), "0", hf_input_spec(module), hf_class=type(module).__name__)


def batch():
    """Token ids growcli has not seen, with two right-padded rows."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (5, 7), generator=gen)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[3, 4:] = 0
    mask[4, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(module, inputs):
    with torch.no_grad():
        return module(**inputs)


def through_map(grown: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiles of a grown hidden vector as [..., k, d], and its padded entries."""
    k = grown.shape[-1] // d
    return grown[..., :k * d].unflatten(-1, (k, d)), grown[..., k * d:]


def cosine_of_mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1)
    unit = pooled / pooled.norm(dim=-1, keepdim=True)
    return unit @ unit.T


def check_embeddings(before, after, d: int, *, padded_zero: bool) -> dict[str, float]:
    """Max differences: tiles vs the original, padded entries vs 0, cosine similarities."""
    inputs = batch()
    a, b = run(before, inputs), run(after, inputs)
    tiles, pads = through_map(b.last_hidden_state, d)
    out = {"tiles": (tiles - a.last_hidden_state.unsqueeze(-2)).abs().max().item(),
           "cosine": (cosine_of_mean_pooled(b.last_hidden_state, inputs["attention_mask"])
                      - cosine_of_mean_pooled(a.last_hidden_state, inputs["attention_mask"])).abs().max().item()}
    if pads.numel():
        out["pads"] = pads.abs().max().item() if padded_zero else 0.0
    if getattr(a, "pooler_output", None) is not None:
        tiles, _ = through_map(b.pooler_output, d)
        out["pooler"] = (tiles - a.pooler_output.unsqueeze(-2)).abs().max().item()
    return out


# --------------------------------------------------------------------------- what holds today
def test_the_encoder_of_a_grown_bert_mlm_is_its_embedding_model_through_the_map():
    """``hidden`` grows BertForMaskedLM ×2; its encoder (a BertModel without pooler) then returns [x, x]."""
    gm = as_gm(bert(head=True))
    before = copy.deepcopy(gm.module.bert)
    report = run_step(gm, "hidden", {"factor": 2.0}, Context(seed=0), VerifySettings(batches=1))
    assert report.verification["passed"] and gm.module.bert.config.hidden_size == 32
    diffs = check_embeddings(before, gm.module.bert, 16, padded_zero=True)
    assert diffs["tiles"] <= 1e-10 and diffs["cosine"] <= 1e-12, diffs


def test_bert_to_a_non_multiple_size_is_refused_naming_post_ln():
    gm = as_gm(bert())
    why = (r"hidden size 16 → 24: .*post-LN.*grow by a whole multiple" if _supports_hidden_outputs()
           else r"the hidden states reach the model's output \(e.g. last_hidden_state\)")
    with pytest.raises(NotGrowableError, match=why):
        run_step(gm, "hidden", {"to": 24}, Context(seed=0), VerifySettings(batches=1))
    assert gm.module.config.hidden_size == 16 and gm.edits.records == []


# --------------------------------------------------------------------------- embedding models themselves
@needs_hidden_outputs
def test_bert_model_doubled_matches_through_the_map():
    gm = as_gm(bert())
    before = copy.deepcopy(gm.module)
    report = run_step(gm, "hidden", {"factor": 2.0}, Context(seed=0), VerifySettings(batches=1))
    assert report.verification["passed"] and report.verification["max_abs_diff"] <= 1e-10
    assert set(report.output_maps) == {"last_hidden_state", "pooler_output"}
    diffs = check_embeddings(before, gm.module, 16, padded_zero=True)
    assert diffs["tiles"] <= 1e-10 and diffs["pooler"] <= 1e-10 and diffs["cosine"] <= 1e-12, diffs


@needs_hidden_outputs
def test_pre_ln_embedding_model_to_a_non_multiple_size_matches_through_the_map():
    gm = as_gm(gpt2_model())
    before = copy.deepcopy(gm.module)
    report = run_step(gm, "hidden", {"to": 24}, Context(seed=0), VerifySettings(batches=1))
    assert report.verification["passed"] and gm.module.config.hidden_size == 24
    m = report.output_maps["last_hidden_state"]
    assert m.index == tuple(range(16)) + (-1,) * 8 and set(m.scale) == {1.0}
    diffs = check_embeddings(before, gm.module, 16, padded_zero=True)
    # Padded outputs are the final LayerNorm's padded β (zero) times (mean − mean) / σ: zero up to rounding.
    assert diffs["tiles"] <= 1e-10 and diffs["pads"] <= 1e-12 and diffs["cosine"] <= 1e-12, diffs
