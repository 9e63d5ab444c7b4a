"""Depth edits whose blocks depend on their index: the written directory is rebuilt from its config.

Tiny float64 models with random (perturbed) weights: Swin (shifted windows alternate with the
block index; window 2 makes ``shift_size`` 0, 1 look like an index), ModernBERT (layer 0 has an
Identity attention norm; layers alternate full and sliding attention by ``layer_types``) and
Gemma-2 (``layer_types``). Each grown Hugging Face directory is reloaded with ``from_pretrained``
and compared in float64 (≤ 1e-10), or the edit is refused naming the block and the attribute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from growcli.core.errors import NotGrowableError, UsageError, VerificationFailed
from growcli.run.runner import Output, Source, Step, grow
from conftest import perturb

T = pytest.importorskip("transformers")
EXACT = 1e-10
STAGE = "swin.encoder.layers.0.blocks"


def _save(model, path: Path) -> Path:
    T.utils.logging.set_verbosity_error()
    perturb(model.to(torch.float64).eval()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rebuilt")
    torch.manual_seed(0)
    swin = T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=2,
                        mlp_ratio=2.0)
    mbert = T.ModernBertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, max_position_embeddings=64, global_attn_every_n_layers=3,
                               local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                               sep_token_id=2)
    gemma = T.Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           sliding_window=4)
    return {"swin": _save(T.SwinForImageClassification(swin), root / "swin"),
            "mbert": _save(T.ModernBertForMaskedLM(mbert), root / "mbert"),
            "gemma2": _save(T.Gemma2ForCausalLM(gemma), root / "gemma2")}


def _grow(src: Path, out: Path, step: Step) -> dict:
    target = Output(str(out) + "/") if out.suffix != ".safetensors" else Output(out)
    return grow(Source(src), [step], [target], seed=0, streaming=False)


def _outputs(model, kind: str):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        if kind == "swin":
            return model(pixel_values=torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)).logits
        return model(input_ids=torch.randint(3, 128, (2, 24), generator=gen)).logits  # 24 > every sliding window


def _reloaded_diff(src: Path, out: Path, kind: str) -> float:
    cls = getattr(T, json.loads((src / "config.json").read_text())["architectures"][0])
    a = cls.from_pretrained(src, dtype=torch.float64).eval()
    b = cls.from_pretrained(out, dtype=torch.float64).eval()
    return (_outputs(a, kind) - _outputs(b, kind)).abs().max().item()


def test_modernbert_stack_copies_blocks_that_the_config_rebuilds(models, tmp_path):
    report = _grow(models["mbert"], tmp_path / "out", Step("stack", {"factor": 2, "init": "identity"}))
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= EXACT
    notes = report["steps"][0]["notes"]
    assert "layout: 0-2,1,1,2; new copies at positions 3-5" in notes
    assert any(n.startswith("position 3 copies block 1 instead of block 0") for n in notes)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 6
    assert saved["layer_types"] == ["full_attention"] + ["sliding_attention"] * 5
    assert _reloaded_diff(models["mbert"], tmp_path / "out", "mbert") <= EXACT


def test_modernbert_stack_copy_init_is_refused_naming_the_attention_norm(models, tmp_path):
    with pytest.raises(NotGrowableError) as err:
        _grow(models["mbert"], tmp_path / "out", Step("stack", {"factor": 2}))
    assert str(err.value).startswith("stack: model.layers.3 (a copy of model.layers.0): attn_norm is Identity, but a "
                                     "model built from the written config has LayerNorm there")
    assert not (tmp_path / "out").exists()


def test_modernbert_deepen_after_layer_0_refuses_the_directory_and_names_a_placement(models, tmp_path):
    with pytest.raises(UsageError, match="cannot be described by a Hugging Face config"):
        _grow(models["mbert"], tmp_path / "out", Step("deepen", {"after": "model.layers.0", "block": True}))
    assert not (tmp_path / "out").exists()
    report = _grow(models["mbert"], tmp_path / "g.safetensors", Step("deepen", {"after": "model.layers.0", "block": True}))
    assert report["verification"]["max_abs_diff"] <= EXACT  # in memory (and replayed) the copy is exact
    note = next(n for n in report["steps"][0]["notes"] if n.startswith("model.layers.1 (a copy of model.layers.0)"))
    assert "attn_norm is Identity" in note and "--after model.layers.1" in note
    report = _grow(models["mbert"], tmp_path / "ok", Step("deepen", {"after": "model.layers.1", "block": True}))
    assert report["function_preserving"] and report["outputs"][0]["max_abs_diff"] <= EXACT
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["layer_types"] == \
        ["full_attention"] + ["sliding_attention"] * 3
    assert _reloaded_diff(models["mbert"], tmp_path / "ok", "mbert") <= EXACT


def test_gemma2_deepen_updates_layer_types(models, tmp_path):
    report = _grow(models["gemma2"], tmp_path / "out", Step("deepen", {"after": "model.layers.1", "block": True}))
    assert report["function_preserving"] and report["outputs"][0]["max_abs_diff"] <= EXACT
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]
    assert _reloaded_diff(models["gemma2"], tmp_path / "out", "gemma2") <= EXACT


def test_swin_interleave_is_refused_naming_shift_size(models, tmp_path):
    step = Step("stack", {"blocks": STAGE, "factor": 2, "order": "interleave"})
    with pytest.raises(NotGrowableError) as err:
        _grow(models["swin"], tmp_path / "out", step)
    assert str(err.value).startswith(f"stack: {STAGE}.1 (a copy of {STAGE}.0): shift_size is 0, but a model built "
                                     "from the written config has 1 there (and 1 more block)")


def test_swin_stack_keeping_parity_is_written_and_read_back(models, tmp_path):
    report = _grow(models["swin"], tmp_path / "out", Step("stack", {"blocks": STAGE, "factor": 2}))
    assert report["outputs"][0]["loaded_with"] == "transformers.SwinForImageClassification.from_pretrained"
    assert report["outputs"][0]["max_abs_diff"] <= EXACT  # the rebuilt directory computes the stacked model
    grown = T.SwinForImageClassification.from_pretrained(tmp_path / "out", dtype=torch.float64)
    assert [b.shift_size for b in grown.get_submodule(STAGE)] == [0, 1, 0, 1]
    assert any(n.startswith("training-only attributes follow the written config") for n in report["steps"][0]["notes"])


def test_swin_deepen_keeps_shift_size_in_memory_and_refuses_the_directory(models, tmp_path):
    step = Step("deepen", {"after": f"{STAGE}.0", "block": True})
    report = _grow(models["swin"], tmp_path / "g.safetensors", step)  # shift_size is no index: block 1 keeps 1
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= EXACT
    with pytest.raises(UsageError) as err:
        _grow(models["swin"], tmp_path / "out", step)
    assert f"({STAGE}.1: shift_size is 0, but a model built from the written config has 1 there)" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_wrong_placement_is_never_written_as_verified(models, tmp_path):
    """Bypass the planning check: the save refuses before writing, and the read-back of a directory written anyway
    (from_pretrained rebuilds every block from the config) fails."""
    from growcli.io.load import load_model
    from growcli.io.save import write_output
    from growcli.run.outputs import save_model
    from growcli.transforms.stack import StackPlan, apply_plan
    from growcli.verification.readback import Readback
    from growcli.core.inputs import make_batches

    gm = load_model(models["swin"])
    plan = StackPlan(STAGE, 2, [0, 0, 1, 1], config={"depths": [4, 2]})  # interleaved: parity broken
    apply_plan(gm, plan)
    with pytest.raises(UsageError, match=rf"{STAGE}.1: shift_size is 0, but .* has 1 there"):
        save_model(gm, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    written = tmp_path / "raw"
    written.mkdir()
    write_output(gm, tmp_path / "x", "hf", written)
    with pytest.raises(VerificationFailed, match="differs from the model in memory"):
        Readback(gm, make_batches(gm.inputs, 2, seed=1)).check("hf", written, tmp_path / "x")


def test_training_only_and_index_attributes():
    from torch import nn

    from growcli.transforms.rebuilt import eval_identity

    assert eval_identity(nn.Dropout(0.3)) and eval_identity(nn.Identity())
    assert not eval_identity(nn.ReLU()) and not eval_identity(nn.Linear(4, 4))
