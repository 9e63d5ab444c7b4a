"""Products by a weight (``x @ W.T``), factorised decoder embeddings and output projections sized by the config.

Falcon's layers compute ``x @ W.T`` (``matmul`` of ``numpy_T(W)``) instead of ``linear``: the analysis reads a
product by a parameter as a Linear (rows produce, columns consume), so its FFN and hidden size grow. OPT with
``word_embed_proj_dim`` 16 < ``hidden_size`` 32 embeds in 16 and projects in and out (``project_in``
[32, 16], ``project_out`` [16, 32]): the hidden stream starts at ``project_in``'s rows and ends at
``project_out``'s columns; the embeddings keep 16. Helium sizes ``o_proj``'s input by ``hidden_size``, not by
heads × head_dim: only the head count that makes the two equal describes the grown model. Everything is float64,
read back with ``from_pretrained`` (or ``load_grown``) and compared on inputs growcli has not seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from torch import nn

import growcli
from conftest import perturb
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.runner import Output, Source, Step, grow
from growcli.transforms.catalog import get_transform

VOCAB = 128
EXACT = 1e-10
T.utils.logging.set_verbosity_error()


def _save(model: nn.Module, directory):
    torch.manual_seed(0)
    perturb(model.to(torch.float64).eval()).save_pretrained(directory)
    return directory


def _logits(cls, directory, ids) -> torch.Tensor:
    with torch.no_grad():
        return cls.from_pretrained(str(directory), dtype=torch.float64).eval()(input_ids=ids).logits


def _worst(report) -> float:
    return max([report["verification"]["max_abs_diff"]] + [o["max_abs_diff"] for o in report["outputs"]])


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def falcon(tmp_path_factory):
    """A tiny Falcon whose layers are ``x @ W.T`` (per-head fused q, k, v)."""
    torch.manual_seed(0)
    config = T.FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
                            multi_query=False, bias=True)
    return _save(T.FalconForCausalLM(config), tmp_path_factory.mktemp("falcon") / "model")


def test_falcon_ffn_through_a_transposed_weight_matmul_is_exact(falcon, tmp_path):
    found = get_transform("widen").candidates(growcli.load_model(falcon))
    assert found.get("transformer.h.0.mlp.dense_h_to_4h") is None  # listed and growable
    out = tmp_path / "widen.safetensors"
    report = grow(Source(falcon), [Step("widen", {"layer": "transformer.h.0.mlp.dense_h_to_4h", "factor": 2})],
                  [Output(out)], seed=0)
    assert report["function_preserving"] and _worst(report) <= EXACT
    changes = {c["name"]: c["after"] for c in report["steps"][0]["changes"]}
    assert changes["transformer.h.0.mlp.dense_h_to_4h.weight"] == [256, 32]
    assert changes["transformer.h.0.mlp.dense_4h_to_h.weight"] == [32, 256]
    grown = growcli.load_grown(T.FalconForCausalLM.from_pretrained(str(falcon), dtype=torch.float64), out).eval()
    with torch.no_grad():
        diff = (grown(input_ids=IDS).logits - _logits(T.FalconForCausalLM, falcon, IDS)).abs().max()
    assert float(diff) <= EXACT


def test_falcon_hidden_grows_every_matmul_and_its_kv_head_key(falcon, tmp_path):
    out = tmp_path / "grown"
    report = grow(Source(falcon), [Step("hidden", {"factor": 2})], [Output(str(out) + "/")], seed=0)
    assert report["function_preserving"] and _worst(report) <= EXACT
    saved = json.loads((out / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_attention_heads"], saved["num_kv_heads"]) == (64, 8, 8)
    diff = (_logits(T.FalconForCausalLM, falcon, IDS) - _logits(T.FalconForCausalLM, out, IDS)).abs().max()
    assert float(diff) <= EXACT


class Products(nn.Module):
    """A residual MLP written with products by raw parameters: ``x @ W.T``, ``mm(x, W.t())`` and ``W @ xᵀ``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.w_up = nn.Parameter(torch.randn(16, 8) / 3)
        self.b_up = nn.Parameter(torch.randn(16) / 3)
        self.w_down = nn.Parameter(torch.randn(8, 16) / 4)
        self.w_gate = nn.Parameter(torch.randn(16, 8) / 3)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        x = self.embed(ids)
        h = torch.relu(torch.matmul(x, self.w_up.T) + self.b_up)  # [B, L, 16]
        g = torch.matmul(self.w_gate, x.transpose(-1, -2)).transpose(-1, -2)  # W @ xᵀ: channels in dim -2
        flat = torch.mm((h * g).reshape(-1, h.shape[-1]), self.w_down.t()).reshape(x.shape)
        return self.head(x + flat)


def _products_gm():
    torch.manual_seed(0)
    model = Products().to(torch.float64).eval()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    return model, GrowModel(model, "module", Path("mem"), "0", spec_from_batch(((ids,), {})))


@pytest.mark.parametrize("transform,options", [("widen", {"layer": "w_up", "factor": 2}), ("hidden", {"factor": 2})],
                         ids=["widen_w_up", "hidden_x2"])
def test_products_by_raw_parameters_grow_like_linears(transform, options):
    model, gm = _products_gm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = growcli.apply(gm, transform, seed=0, **options)
    assert report.verification is not None and report.verification["max_abs_diff"] <= EXACT
    shapes = {n: tuple(p.shape) for n, p in gm.module.named_parameters()}
    if transform == "widen":  # w_up and its bias, the gate it multiplies, and w_down's columns
        assert (shapes["w_up"], shapes["b_up"], shapes["w_gate"], shapes["w_down"]) == \
            ((32, 8), (32,), (32, 8), (8, 32))
    else:  # the stream: embedding columns, the readers' columns, the writer's rows, the head's columns
        assert (shapes["embed.weight"], shapes["w_up"], shapes["w_gate"], shapes["w_down"], shapes["head.weight"]) == \
            ((VOCAB, 16), (16, 16), (16, 16), (16, 16), (5, 16))
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(11))
    ref = Products().to(torch.float64).eval()
    ref.load_state_dict(before)
    with torch.no_grad():
        assert float((gm.module(ids) - ref(ids)).abs().max()) <= EXACT


def test_raw_parameters_multiplied_by_the_data_are_widen_candidates():
    from growcli.analysis.coupling import producer_layers
    from growcli.transforms.width_edit import trace_width

    _, gm = _products_gm()
    assert {"w_up", "w_gate", "w_down", "embed", "head"} <= set(producer_layers(trace_width(gm)))


@pytest.mark.parametrize("ln_before", [True, False], ids=["pre_ln", "post_ln"])
def test_opt_hidden_starts_at_project_in_and_keeps_the_embedding_width(tmp_path, ln_before):
    torch.manual_seed(0)
    config = T.OPTConfig(hidden_size=32, word_embed_proj_dim=16, num_attention_heads=4, num_hidden_layers=2,
                         ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64, do_layer_norm_before=ln_before)
    src = _save(T.OPTForCausalLM(config), tmp_path / "opt")
    out = tmp_path / "grown"
    report = grow(Source(src), [Step("hidden", {"factor": 2})], [Output(str(out) + "/")], seed=0)
    assert report["function_preserving"] and _worst(report) <= EXACT
    saved = json.loads((out / "config.json").read_text())
    assert (saved["word_embed_proj_dim"], saved["hidden_size"], saved["num_attention_heads"]) == (16, 64, 8)
    grown = T.OPTForCausalLM.from_pretrained(str(out), dtype=torch.float64)
    shapes = {n: tuple(p.shape) for n, p in grown.named_parameters()}
    assert shapes["model.decoder.embed_tokens.weight"] == (VOCAB, 16)
    assert shapes["model.decoder.project_in.weight"] == (64, 16)
    assert shapes["model.decoder.project_out.weight"] == (16, 64)
    diff = (_logits(T.OPTForCausalLM, src, IDS) - _logits(T.OPTForCausalLM, out, IDS)).abs().max()
    assert float(diff) <= EXACT
    assert "project_in" in " ".join(report["steps"][0]["notes"])


def test_helium_output_projection_sized_by_hidden_size_grows_the_heads(tmp_path):
    torch.manual_seed(0)
    config = T.HeliumConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_hidden_layers=2, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    src = _save(T.HeliumForCausalLM(config), tmp_path / "helium")
    out = tmp_path / "grown"
    report = grow(Source(src), [Step("hidden", {"factor": 2})], [Output(str(out) + "/")], seed=0)
    assert report["function_preserving"] and _worst(report) <= EXACT
    saved = json.loads((out / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == \
        (64, 8, 4, 8)
    diff = (_logits(T.HeliumForCausalLM, src, IDS) - _logits(T.HeliumForCausalLM, out, IDS)).abs().max()
    assert float(diff) <= EXACT


def test_a_matrix_times_a_parameter_vector_is_refused_naming_the_op():
    class Dot(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(4, 6)
            self.v = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return torch.matmul(torch.relu(self.up(x)), self.v)  # contracts the channels with a vector

    ids = torch.randn(2, 4, dtype=torch.float64)
    gm = GrowModel(Dot().to(torch.float64), "module", Path("mem"), "0", spec_from_batch(((ids,), {})))
    with pytest.raises(NotGrowableError, match="matmul"):
        growcli.apply(gm, "widen", layer="up", factor=2)
