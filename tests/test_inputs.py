"""Generated verification inputs exercise the model: whole vocabulary, several lengths, padding.

A check that only ever feeds token ids 0/1 of one length with no padding would pass a grown
model that is wrong on most of the vocabulary, on other lengths or on padded positions.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from growcli.core.errors import UsageError
from growcli.core.inputs import InputSpec, TensorSpec, make_batches, parse_input_shape, seq_lengths, spec_from_batch
from growcli.io.hf_dir import hf_input_spec
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, verification_batches
from growcli.verification.compare import verify_models

VOCAB = 1000


def _llama(max_pos: int = 64, pad: int | None = None):
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=max_pos,
                        pad_token_id=pad)
    return T.LlamaForCausalLM(cfg).eval()


def _bert():
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
    return T.BertModel(cfg).eval()


class IgnoresMask(nn.Module):
    """A "grown" model that wrongly drops the attention mask: equal to the original without padding."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids)


def _ids(batches, name="input_ids"):
    return [b[1][name] if name else b[0][0] for b in batches]


# -- the whole vocabulary -----------------------------------------------------------------

def test_token_ids_cover_the_vocabulary():
    spec = InputSpec((TensorSpec((2, 16), "int64", VOCAB),))
    ids = torch.cat([t.flatten() for t in _ids(make_batches(spec, 3, seed=0), None)])
    assert ids.numel() == 96
    assert int(ids.min()) >= 0 and int(ids.max()) < VOCAB
    assert int(ids.max()) > 500 and int(ids.max() - ids.min()) > VOCAB // 2
    assert ids.unique().numel() > 80


def test_hf_token_ids_cover_the_vocabulary():
    spec = hf_input_spec(_llama(), batch=2, seq=16)
    ids = torch.cat([t.flatten() for t in _ids(make_batches(spec, 3, seed=0))])
    assert int(ids.max()) > 500 and int(ids.max() - ids.min()) > VOCAB // 2
    assert ids.unique().numel() > 50 and int(ids.max()) < VOCAB


# -- several sequence lengths ---------------------------------------------------------------

def test_hf_batches_have_several_lengths_bounded_by_positions():
    spec = hf_input_spec(_llama(max_pos=64), batch=2, seq=8)
    batches = make_batches(spec, 4, seed=0)
    lengths = [b[1]["input_ids"].shape[1] for b in batches]
    assert lengths == [8, 4, 12, 6] == seq_lengths(spec, 4)
    assert all(b[1]["attention_mask"].shape == b[1]["input_ids"].shape for b in batches)
    assert all(b[1]["input_ids"].shape[0] == 2 for b in batches)

    short = hf_input_spec(_llama(max_pos=10), batch=2, seq=8)
    assert [b[1]["input_ids"].shape[1] for b in make_batches(short, 3)] == [8, 4, 10]


def test_seq_len_chooses_the_base_length():
    spec = hf_input_spec(_llama(max_pos=64))
    assert [b[1]["input_ids"].shape[1] for b in make_batches(spec, 3, seq_len=20)] == [20, 10, 30]
    assert [b[1]["input_ids"].shape[1] for b in make_batches(spec, 3, seq_len=100)] == [64, 32, 64]  # bounded
    gm = GrowModel(nn.Identity(), "hf", None, "", spec)
    got = verification_batches(gm, VerifySettings(batches=2, seq_len=6), seed=0)
    assert [b[1]["input_ids"].shape[1] for b in got] == [6, 3]
    with pytest.raises(UsageError):
        make_batches(spec, 1, seq_len=0)


def test_fixed_shapes_stay_fixed():
    """Specs from --input-shape or an example (a .pt2 program's) keep their shapes, --seq-len or not."""
    for spec in (parse_input_shape("2,16:int64"), InputSpec((TensorSpec((2, 16), "int64", VOCAB),)),
                 spec_from_batch(((torch.randint(0, VOCAB, (2, 7)),), {}))):
        batches = make_batches(spec, 3, seq_len=5)
        assert {tuple(b[0][0].shape) for b in batches} == {tuple(spec.args[0].shape)}


def test_stored_spec_json_is_unchanged():
    spec = hf_input_spec(_llama())
    assert "seq" not in spec.to_json() and "attention_mask" in spec.to_json()
    # Read back (no mask flag, fixed shapes), the attention_mask is still generated as padding.
    stored = InputSpec(args=spec.args, kwargs=spec.kwargs)
    for b in make_batches(stored, 4)[1:]:
        assert b[1]["input_ids"].shape == (2, 8)
        assert bool((b[1]["attention_mask"][:, :4] == 1).all())


# -- padding and attention masks ----------------------------------------------------------------

@pytest.mark.parametrize("build", [_llama, _bert], ids=["llama", "bert"])
def test_hf_model_gets_padded_batches_with_a_mask(build):
    model = build()
    spec = hf_input_spec(model)
    assert spec.mask == "attention_mask"
    batches = make_batches(spec, 3, seed=0)
    masks = [b[1]["attention_mask"] for b in batches]
    assert bool((masks[0] == 1).all())  # the first batch is unpadded
    assert any(bool((m == 0).any()) for m in masks[1:])
    for b, m in zip(batches, masks):
        assert set(m.unique().tolist()) <= {0, 1}
        for row in m:  # right padding: ones, then zeros; at least half the row is real tokens
            keep = int(row.sum())
            assert keep >= (row.numel() + 1) // 2 and bool((row[:keep] == 1).all()) and bool((row[keep:] == 0).all())
        if spec.pad_id is not None:
            assert bool((b[1]["input_ids"][m == 0] == spec.pad_id).all())
        model(**b[1])  # the model runs on every batch


def test_no_mask_for_models_without_attention_mask():
    class TokenModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = _llama().config
            self.emb = nn.Embedding(VOCAB, 4)

        def forward(self, input_ids):
            return self.emb(input_ids)

    spec = hf_input_spec(TokenModel())
    assert spec.mask is None and [k for k, _ in spec.kwargs] == ["input_ids"]
    assert len({b[1]["input_ids"].shape[1] for b in make_batches(spec, 3)}) == 3


def test_mask_from_an_example_is_regenerated_as_padding():
    """A .pt2 program exported with an attention mask: masks stay well formed, shapes stay fixed."""
    example = ((), {"input_ids": torch.randint(0, VOCAB, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.int64)})
    spec = spec_from_batch(example)
    assert spec.mask == "attention_mask" and not spec.seq
    batches = make_batches(spec, 4)
    assert all(b[1]["input_ids"].shape == (2, 8) for b in batches)
    assert any(bool((b[1]["attention_mask"] == 0).any()) for b in batches[1:])
    for b in batches[1:]:
        assert bool((b[1]["attention_mask"][:, :4] == 1).all())  # never a fully masked row


def test_generation_is_deterministic_in_the_seed():
    spec = hf_input_spec(_bert())
    a, b, c = make_batches(spec, 3, seed=1), make_batches(spec, 3, seed=1), make_batches(spec, 3, seed=2)
    for x, y in zip(a, b):
        assert all(torch.equal(x[1][k], y[1][k]) for k in x[1])
    assert not all(torch.equal(x[1]["input_ids"], z[1]["input_ids"]) for x, z in zip(a, c))


# -- a model that ignores padding wrongly is caught ---------------------------------------------------

@pytest.mark.parametrize("build", [_llama, _bert], ids=["llama", "bert"])
def test_model_that_ignores_the_mask_is_caught(build):
    original = build()
    wrong = IgnoresMask(original)
    spec = hf_input_spec(original)
    without_mask = hf_input_spec(original, mask=False)
    # Inputs without padding (what growcli generated before) cannot tell them apart ...
    assert verify_models(original, wrong, make_batches(without_mask, 3)).passed
    # ... padded batches with a mask can.
    report = verify_models(original, wrong, make_batches(spec, 3))
    assert not report.passed and report.max_abs_diff > 1e-3


def test_change_only_on_padded_positions_is_caught():
    """A grown model that is right wherever the mask is 1 and wrong where it is 0."""
    original = _llama()

    class WrongOnPadding(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = original

        def forward(self, input_ids, attention_mask=None):
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
            if attention_mask is not None:
                logits = logits + (1 - attention_mask).unsqueeze(-1).to(logits.dtype)
            return {"logits": logits}

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = original

        def forward(self, input_ids, attention_mask=None):
            return {"logits": self.inner(input_ids=input_ids, attention_mask=attention_mask).logits}

    spec = hf_input_spec(original)
    assert verify_models(Logits(), WrongOnPadding(), make_batches(hf_input_spec(original, mask=False), 3)).passed
    ones = [(a, {**kw, "attention_mask": torch.ones_like(kw["input_ids"])}) for a, kw in make_batches(spec, 3)]
    assert verify_models(Logits(), WrongOnPadding(), ones).passed
    assert not verify_models(Logits(), WrongOnPadding(), make_batches(spec, 3)).passed


def test_cli_commands_take_seq_len():
    from typer.testing import CliRunner

    from growcli.cli.app import get_app
    from growcli.cli.options import verify_settings

    assert verify_settings(3, "float64", None, None, seq_len=12).seq_len == 12
    for command in ("widen", "deepen", "stack", "convert", "verify"):
        result = CliRunner().invoke(get_app(), [command, "--help"])
        assert "--seq-len" in result.output, command


def test_spec_fields_are_plain_dataclass_fields():
    spec = hf_input_spec(_llama())
    assert dataclasses.replace(spec, seq=()).seq == () and spec.max_seq == 64
