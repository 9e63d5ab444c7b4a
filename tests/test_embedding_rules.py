"""Factorised embeddings and layers shared across depths, for ``widen --hidden``.

ALBERT embeds tokens in ``embedding_size`` (16 here) and projects them to ``hidden_size`` (32) with
``embedding_hidden_mapping_in``; its one layer runs at every depth. The hidden size is the size of the
residual stream, which starts at the projection: its rows grow, the embeddings do not, and every use
of the shared layer grows by the same map. A tiny torch module with the same shape checks the rule
without Hugging Face. Everything is float64, compared here on inputs growcli has not seen.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import growcli
from growcli.analysis.stream import stream_start
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.runner import Output, Source, Step, grow
from growcli.transforms.width_edit import trace_width
from conftest import albert_logits, tiny_albert

VOCAB = 96


def test_albert_hidden_grows_the_projection_not_the_embedding(tmp_path):
    src = tiny_albert(tmp_path / "albert")
    gm = growcli.load_model(src)
    start = stream_start(trace_width(gm))
    assert start.meta["nn_module_stack"] and "embedding_hidden_mapping_in" in str(list(start.meta["nn_module_stack"]))
    out = tmp_path / "grown"
    report = grow(Source(src), [Step("hidden", {"factor": 2})], [Output(str(out) + "/")], seed=0)
    assert report["function_preserving"]
    assert max([report["verification"]["max_abs_diff"]] + [o["max_abs_diff"] for o in report["outputs"]]) <= 1e-10
    saved = json.loads((out / "config.json").read_text())
    assert (saved["embedding_size"], saved["hidden_size"], saved["num_attention_heads"]) == (16, 64, 8)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    assert float((albert_logits(src, ids) - albert_logits(out, ids)).abs().max()) <= 1e-10
    notes = " ".join(report["steps"][0]["notes"])
    assert "factorised embedding" in notes and "embedding_hidden_mapping_in" in notes


def test_albert_hidden_to_a_size_that_is_not_a_multiple_is_refused_as_post_ln(tmp_path):
    from growcli.core.errors import NotGrowableError

    src = tiny_albert(tmp_path / "albert")
    out = tmp_path / "grown"
    with pytest.raises(NotGrowableError, match="post-LN"):
        grow(Source(src), [Step("hidden", {"to": 40})], [Output(str(out) + "/")], seed=0)
    assert not out.exists()


class Shared(nn.Module):
    """Embedding 8 → projection → 16-wide residual stream through one pre-LN block run three times → head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.project = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.final = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, ids):
        x = self.project(self.embed(ids))
        for _ in range(3):  # the same weights at every depth
            x = x + self.down(torch.relu(self.up(self.norm(x))))
        return self.head(self.final(x))


@pytest.mark.parametrize("options", [{"factor": 2}, {"to": 24}], ids=["x2", "to24"])
def test_a_layer_shared_across_depths_grows_the_same_way_at_every_use(options):
    torch.manual_seed(0)
    module = Shared().to(torch.float64).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ids = torch.randint(0, VOCAB, (2, 6))
    gm = GrowModel(module, "module", Path("mem"), "0", spec_from_batch(((ids,), {})))
    before = copy.deepcopy(module)
    report = growcli.apply(gm, "hidden", **options)
    assert report.verification["passed"] and report.verification["max_abs_diff"] <= 1e-10
    assert module.embed.weight.shape == (VOCAB, 8)  # the embedding keeps its size; the projection grows
    assert module.project.weight.shape == (options.get("to", 32), 8)
    fresh = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert float((before(fresh) - module(fresh)).abs().max()) <= 1e-10
