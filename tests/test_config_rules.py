"""Configs that must describe the grown model: explicit ``head_dim``, untied biases, norms whose ``γ`` is
``1 + weight``, norms computed in float32, sizes stated as ratios (``mlp_ratio``) and staged models'
``depths``.

Every case builds a tiny real Hugging Face model from its config with seeded random weights in
float64, saves it, grows it through growcli's runner (which verifies the step and reads the written
directory back with ``from_pretrained``), then loads both directories with transformers' own
``from_pretrained`` and measures the difference here on inputs growcli has not seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from growcli.core.errors import NotGrowableError
from growcli.run.runner import Output, Source, Step, grow
from conftest import perturb

VOCAB = 96


def _config(family: str, **extra):
    import transformers as T

    T.utils.logging.set_verbosity_error()
    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kinds = {"qwen2": (T.Qwen2Config, {"num_key_value_heads": 2}),
             "olmo": (T.OlmoConfig, {"num_key_value_heads": 2}),
             "starcoder2": (T.Starcoder2Config, {"num_key_value_heads": 2}),
             "stablelm": (T.StableLmConfig, {"num_key_value_heads": 2}),
             "nemotron": (T.NemotronConfig, {"num_key_value_heads": 2}),
             "bert": (T.BertConfig, {}),
             "roberta": (T.RobertaConfig, {"max_position_embeddings": 40})}
    cls, own = kinds[family]
    return cls(**{**small, **own, **extra})


def build(family: str, directory: Path, **extra) -> Path:
    """A tiny float64 ``family`` model with seeded weights, saved in ``directory``."""
    import transformers as T

    config = _config(family, **extra)
    auto = T.AutoModelForMaskedLM if family in ("bert", "roberta") else T.AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(config).to(torch.float64).eval()
    perturb(model)  # no norm, bias or scale left at its init
    model.save_pretrained(directory)
    return directory


def reload(directory: Path):
    import transformers as T

    config = json.loads((directory / "config.json").read_text())
    auto = T.AutoModelForMaskedLM if config["model_type"] in ("bert", "roberta") else T.AutoModelForCausalLM
    return auto.from_pretrained(str(directory), dtype=torch.float64).eval()


def measure(a_dir: Path, b_dir: Path) -> float:
    """max |a − b| of the logits of both directories loaded with from_pretrained, on fresh token ids."""
    a, b = reload(a_dir), reload(b_dir)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


def run(tmp_path: Path, family: str, transform: str, options: dict, **extra) -> tuple[dict, Path, Path]:
    src = build(family, tmp_path / "model", **extra)
    out = tmp_path / "grown"
    report = grow(Source(src), [Step(transform, options)], [Output(str(out) + "/")], seed=0)
    return report, src, out


# --------------------------------------------------------------------------- explicit head_dim
@pytest.mark.parametrize("family", ["qwen2", "olmo", "starcoder2"])
def test_heads_write_an_explicit_head_dim_where_the_attention_reads_it(tmp_path, family):
    report, src, out = run(tmp_path, family, "heads", {"factor": 2})
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= 1e-10
    assert all(o["max_abs_diff"] <= 1e-10 for o in report["outputs"])
    saved = json.loads((out / "config.json").read_text())
    assert (saved["head_dim"], saved["num_attention_heads"], saved["num_key_value_heads"], saved["hidden_size"]) == \
        (8, 8, 4, 32)
    assert measure(src, out) <= 1e-10
    grown = reload(out)
    assert tuple(grown.model.layers[0].self_attn.q_proj.weight.shape) == (64, 32)


def test_heads_stay_refused_where_the_attention_derives_head_dim(tmp_path):
    src = build("stablelm", tmp_path / "model")
    with pytest.raises(NotGrowableError, match="derives head_dim from hidden_size / num_attention_heads"):
        grow(Source(src), [Step("heads", {"factor": 2})], [Output(str(tmp_path / "grown") + "/")], seed=0)
    assert not (tmp_path / "grown").exists()


def test_heads_candidates_list_explicit_head_dim_families_as_growable(tmp_path):
    import growcli
    from growcli.transforms.heads import heads_candidates

    gm = growcli.load_model(build("qwen2", tmp_path / "q"))
    assert set(heads_candidates(gm).values()) == {None}
    gm = growcli.load_model(build("stablelm", tmp_path / "s"))
    assert all("derives head_dim" in why for why in heads_candidates(gm).values())


# --------------------------------------------------------------------------- hidden-size bugs from the table
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_hidden_x2_of_a_masked_lm_reads_back_with_from_pretrained(tmp_path, family):
    # Untying the word embeddings unties every tie the class declares: the MLM decoder's bias must be saved
    # under its own name, or from_pretrained leaves it at zero (max abs diff 0.055 before the fix).
    report, src, out = run(tmp_path, family, "hidden", {"factor": 2})
    assert report["function_preserving"]
    assert max([report["verification"]["max_abs_diff"]] + [o["max_abs_diff"] for o in report["outputs"]]) <= 1e-10
    assert measure(src, out) <= 1e-10
    notes = " ".join(report["steps"][0]["notes"])
    assert "decoder.bias from " in notes


def test_hidden_x2_of_bert_streamed_from_disk_writes_the_untied_bias_too(tmp_path):
    src = build("bert", tmp_path / "model")
    out = tmp_path / "grown"
    report = grow(Source(src), [Step("hidden", {"factor": 2})], [Output(str(out) + "/")], seed=0, streaming=True)
    assert report["function_preserving"]
    assert max([report["verification"]["max_abs_diff"]] + [o["max_abs_diff"] for o in report["outputs"]]) <= 1e-10
    assert measure(src, out) <= 1e-10


@pytest.mark.parametrize("to", [64, 48])
def test_nemotron_layernorm1p_gamma_one_plus_weight_grows(tmp_path, to):
    # NemotronLayerNorm1P normalises with weight + 1: the parameter behind the γ grows (and, padded, is
    # rescaled as a whole: (w + 1)·√c − 1).
    report, src, out = run(tmp_path, "nemotron", "hidden", {"to": to})
    assert report["function_preserving"]
    assert max([report["verification"]["max_abs_diff"]] + [o["max_abs_diff"] for o in report["outputs"]]) <= 1e-10
    assert measure(src, out) <= 1e-10
    grown = reload(out)
    assert tuple(grown.model.norm.weight.shape) == (to,) and grown.model.norm.normalized_shape == (to,)


def test_olmo_hidden_reports_the_float32_norm_and_is_exact_without_it(tmp_path, monkeypatch):
    import transformers.models.olmo.modeling_olmo as olmo

    report, src, out = run(tmp_path, "olmo", "hidden", {"factor": 2})
    notes = " ".join(report["steps"][0]["notes"])
    assert "computes the norm of model.layers.0.input_layernorm (float32)" in notes
    assert report["function_preserving"] and 1e-10 < report["verification"]["max_abs_diff"] <= 1e-6
    # The same grown weights with the norm computed in float64 (no cast): exact, so the rounding is the model's.
    monkeypatch.setattr(olmo.OlmoLayerNorm, "forward", lambda self, x: torch.nn.functional.layer_norm(
        x, self.normalized_shape, None, None, eps=1e-5))
    assert measure(src, out) <= 1e-10


# --------------------------------------------------------------------------- ratios and staged depths
def _vision(directory: Path, model) -> Path:
    torch.manual_seed(0)
    model = model.to(torch.float64).eval()
    perturb(model)  # no norm, bias or scale left at its init
    model.save_pretrained(directory)
    return directory


def _vision_diff(cls, a_dir: Path, b_dir: Path, size: int) -> float:
    a = cls.from_pretrained(str(a_dir), dtype=torch.float64).eval()
    b = cls.from_pretrained(str(b_dir), dtype=torch.float64).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        return float((a(pixel_values=x).logits - b(pixel_values=x).logits).abs().max())


def test_ffn_widen_of_every_block_updates_a_ratio_key(tmp_path):
    # Dinov2 states the FFN size as mlp_ratio × hidden_size: widening every fc1 ×2 makes the ratio 4.
    import transformers as T

    config = T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=16,
                            patch_size=8, num_labels=3)
    src = _vision(tmp_path / "dino", T.Dinov2ForImageClassification(config))
    out = tmp_path / "grown"
    report = grow(Source(src), [Step("widen", {"layer": r"dinov2\.encoder\.layer\.\d+\.mlp\.fc1", "factor": 2})],
                  [Output(str(out) + "/")], seed=0)
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= 1e-10
    saved = json.loads((out / "config.json").read_text())
    assert (saved["mlp_ratio"], saved["hidden_size"]) == (4, 32)
    assert _vision_diff(T.Dinov2ForImageClassification, src, out, 16) <= 1e-10


@pytest.mark.parametrize("transform,options,depths", [
    ("stack", {"factor": 2, "init": "identity", "blocks": "convnext.encoder.stages.1.layers"}, [2, 4]),
    ("deepen", {"after": "convnext.encoder.stages.1.layers.0", "block": True}, [2, 3]),
    ("stack", {"factor": 2, "init": "identity", "blocks": "convnext.encoder.stages.0.layers"}, [4, 2]),
], ids=["stack-stage1", "deepen-stage1", "stack-stage0"])
def test_staged_model_depth_updates_its_own_entry_of_depths(tmp_path, transform, options, depths):
    # Both stages have 2 blocks: only building the model from each candidate tells which entry counts the stack.
    import transformers as T

    config = T.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, image_size=32,
                              num_labels=3)
    src = _vision(tmp_path / "convnext", T.ConvNextForImageClassification(config))
    out = tmp_path / "grown"
    report = grow(Source(src), [Step(transform, options)], [Output(str(out) + "/")], seed=0)
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= 1e-10
    assert json.loads((out / "config.json").read_text())["depths"] == depths
    assert _vision_diff(T.ConvNextForImageClassification, src, out, 32) <= 1e-10


def test_hidden_with_the_heads_kept_writes_head_dim(tmp_path):
    # --hidden 64 --heads 4 on Qwen2: 4 heads of 8 need an explicit head_dim (derived, it would be 16).
    report, src, out = run(tmp_path, "qwen2", "hidden", {"to": 64, "heads": 4})
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= 1e-10
    saved = json.loads((out / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_attention_heads"], saved["head_dim"]) == (64, 4, 8)
    assert measure(src, out) <= 1e-10
