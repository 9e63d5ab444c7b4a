"""Hidden-size growth rules on tiny torch models (the Hugging Face families that need them are in
test_rule_acceptance.py: BART, MVP, Whisper, Dinov2).

- dead reads: an op whose result nothing uses (BART's ``inputs_embeds[:, :, -1]`` read for its shape) is not a
  use of the hidden states, whatever the op; an in-place op on a picked channel is one, and stays refused;
- rows of a parameter gathered along another dim than the hidden one (``weight[position_ids]``,
  ``index_select``; a slice already was) are hidden states like an embedding lookup's; indexing the hidden
  dim of a parameter stays refused;
- a ``cat`` of whole hidden vectors along the hidden dim read by a Linear (Dinov2's ``cat([cls, mean])``):
  each block of the reader's columns grows like a reader's; other uses of the concatenation are refused.

Every model is float64; every growth is verified by growcli and compared here on other inputs (≤ 1e-10).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context
from conftest import perturb

VOCAB, D, EXACT = 24, 16, 1e-10


class Block(nn.Module):
    """Embedding, one pre-norm MLP block, a final norm: the stream every model below starts with."""

    def __init__(self, norm: str):
        super().__init__()
        make = (lambda: nn.LayerNorm(D, eps=1e-6)) if norm == "ln" else (lambda: nn.RMSNorm(D, eps=1e-6))
        self.emb, self.n1, self.n2 = nn.Embedding(VOCAB, D), make(), make()
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def stream(self, h: torch.Tensor) -> torch.Tensor:
        return self.n2(h + self.fc2(F.gelu(self.fc1(self.n1(h)))))


class DeadReads(Block):
    """Reads of the hidden states that nothing uses: a channel picked, a chain of ops ending nowhere; with
    ``mutate``, a picked channel multiplied in place (a use: the stream changes)."""

    def __init__(self, mutate: bool = False):
        super().__init__("ln")
        self.mutate, self.head = mutate, nn.Linear(D, VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        _ = h[:, :, -1]  # for its shape only (BART's encoder)
        _ = (torch.tanh(h).amax(-1) + 1).sum()
        if self.mutate:
            h[..., 0].mul_(2)
        return self.head(self.stream(h))


class Positions(Block):
    """Token embeddings plus learned positions read as ``pos[position_ids]``, ``pos.index_select(0, ids)`` or
    ``pos[:n]``; ``gain`` multiplies by a per-feature parameter indexed along the hidden dim."""

    def __init__(self, how: str, norm: str = "ln"):
        super().__init__(norm)
        self.how, self.head = how, nn.Linear(D, VOCAB)
        self.pos, self.gain = nn.Parameter(torch.randn(12, D)), nn.Parameter(torch.randn(D))

    def forward(self, ids):
        b, n = ids.shape
        h = self.emb(ids)
        if self.how == "index":
            h = h + self.pos[torch.arange(n).expand(b, n)]
        elif self.how == "index_select":
            h = h + self.pos.index_select(0, torch.arange(n))
        elif self.how == "slice":
            h = h + self.pos[:n]
        else:  # the hidden dim of the parameter is indexed: its entries are permuted, not tiled
            h = h * self.gain[torch.arange(D - 1, -1, -1)]
        return self.head(self.stream(h))


class Pooled(Block):
    """A classifier over ``cat([h[:, 0], mean(h[:, 1:])])`` (``2·D`` features, and ``extra`` features of a
    parameter without hidden states); ``after`` an op between the ``cat`` and the classifier."""

    def __init__(self, norm: str = "ln", extra: int = 0, after: str = ""):
        super().__init__(norm)
        self.after, self.head = after, nn.Linear(2 * D + extra, 5)
        self.extra = nn.Parameter(torch.randn(1, extra)) if extra else None

    def forward(self, ids):
        h = self.stream(self.emb(ids))
        parts = [h[:, 0], h[:, 1:].mean(1)]
        if self.extra is not None:
            parts.append(self.extra.expand(h.shape[0], -1))
        feats = torch.cat(parts, -1)
        if self.after == "dropout":
            feats = F.dropout(feats, 0.1, training=False)
        elif self.after == "layer_norm":
            feats = F.layer_norm(feats, feats.shape[-1:])
        elif self.after == "output":
            return feats
        return self.head(feats)


def _model(module: nn.Module) -> GrowModel:
    torch.manual_seed(3)
    module = perturb(module.double().eval())
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    return GrowModel(module, "state_dict", Path("mem"), "0", spec_from_batch(((ids,), {})))


def _grow(gm: GrowModel, to: int) -> nn.Module:
    """Grow to ``to`` (growcli verifies it); returns the original, compared with the grown one on other inputs."""
    original = copy.deepcopy(gm.module)
    report = run_step(gm, "hidden", {"to": to}, Context(seed=0), VerifySettings(batches=2))
    assert report.verification["passed"] and report.verification["max_abs_diff"] <= EXACT
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert float((original(ids) - gm.module(ids)).abs().max()) <= EXACT
    return original


def _refused(gm: GrowModel, message: str) -> None:
    before = {k: v.clone() for k, v in gm.module.state_dict().items()}
    with pytest.raises(NotGrowableError, match=f"^{re.escape(message)}$"):
        run_step(gm, "hidden", {"factor": 2}, Context(seed=0), VerifySettings(batches=1))
    assert all(torch.equal(v, gm.module.state_dict()[k]) for k, v in before.items())  # nothing changed


@pytest.mark.parametrize("to", [32, 20])
def test_reads_whose_results_nothing_uses_are_not_uses(to):
    gm = _model(DeadReads())
    _grow(gm, to)
    assert tuple(gm.module.emb.weight.shape) == (VOCAB, to)


def test_an_in_place_op_on_a_picked_channel_is_a_use():
    _refused(_model(DeadReads(mutate=True)), "hidden size: select picks a single channel")


@pytest.mark.parametrize("how,norm,to", [("index", "ln", 32), ("index", "ln", 20), ("index_select", "rms", 48),
                                         ("slice", "ln", 32)])
def test_parameter_rows_gathered_along_another_dim_grow_like_an_embedding(how, norm, to):
    gm = _model(Positions(how, norm))
    original = _grow(gm, to)
    pos = gm.module.pos.detach()
    assert tuple(pos.shape) == (12, to)
    k = to // D
    assert torch.equal(pos[:, :k * D], original.pos.detach().repeat(1, k))  # tiled, like the embedding's rows
    if to % D and norm == "ln":  # mean padding: each row's padded entries are its mean
        torch.testing.assert_close(pos[:, k * D:], original.pos.detach().mean(1, keepdim=True).expand(-1, to % D),
                                   rtol=0, atol=1e-15)


def test_a_parameter_indexed_along_the_hidden_dim_is_refused():
    _refused(_model(Positions("gain")), "hidden size: index.Tensor makes hidden states from rows growcli cannot "
                                        "follow back")


@pytest.mark.parametrize("norm,extra,after,to", [("ln", 0, "", 32), ("ln", 0, "", 20), ("rms", 0, "", 48),
                                                 ("ln", 3, "", 32), ("rms", 0, "dropout", 32)],
                         ids=["ln-x2", "ln-20", "rms-x3", "extra-features", "dropout"])
def test_a_classifier_over_hidden_vectors_side_by_side_reads_each_block_like_a_reader(norm, extra, after, to):
    gm = _model(Pooled(norm, extra, after))
    original = _grow(gm, to)
    old, new = original.head.weight.detach(), gm.module.head.weight.detach()
    assert tuple(new.shape) == (5, 2 * to + extra)
    k = to // D
    for block in range(2):  # each block: k tiles summing to the old columns, then zero columns
        tiles = new[:, block * to: block * to + k * D].reshape(5, k, D).sum(1)
        torch.testing.assert_close(tiles, old[:, block * D:(block + 1) * D], rtol=0, atol=1e-15)
        assert torch.count_nonzero(new[:, block * to + k * D:(block + 1) * to]) == 0
    assert torch.equal(new[:, 2 * to:], old[:, 2 * D:])  # the extra features' columns are kept


@pytest.mark.parametrize("after,message", [
    ("layer_norm", "hidden size 16 → 32: layer_norm.default uses hidden states concatenated along the hidden "
                   "dimension (by cat.default) and growcli has no rule for it"),
    ("output", "hidden size: hidden states concatenated along the hidden dimension (cat.default) reach the model's "
               "output, which growcli cannot map back to the original's")])
def test_other_uses_of_hidden_vectors_side_by_side_are_refused(after, message):
    _refused(_model(Pooled(after=after)), message)
