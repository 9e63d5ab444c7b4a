"""Growing one tower of a composite Hugging Face model updates that tower's nested sub-config.

A tiny ``CLIPModel`` (``text_config`` + ``vision_config``, random float64 weights) is grown by the runner:
FFN widen of every text layer, of every vision layer, ``deepen --block`` and ``stack`` of the text tower.
Each written directory must rebuild the grown model with ``from_pretrained`` (the changed key is a dotted
path, ``text_config.intermediate_size``, and the other tower's sub-config is unchanged) and compute what the
original computes on text and image inputs (float64, ≤ 1e-10). A recorded nested edit replays with
``growcli.load_grown``; one naming a sub-config the config lacks is refused in one line.

The generated inputs of a composite model are ``input_ids`` (from the text sub-config's vocabulary) and
``pixel_values`` (from the vision sub-config's image size), made by ``growcli.io.hf_dir.hf_input_spec``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import growcli
from growcli.core.edits import config_owner, set_config_json, sub_configs
from growcli.core.errors import ArchitectureError, UsageError
from growcli.core.inputs import InputSpec
from growcli.core.model import GrowModel
from growcli.run.runner import Output, Source, Step, grow
from growcli.transforms.hfconfig import config_items, key_paths, with_config
from conftest import perturb

transformers = pytest.importorskip("transformers")

EXACT = 1e-10
TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=8,
              patch_size=4, num_channels=3, projection_dim=8)


def clip_config():
    return transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=8)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(directory of the saved float64 CLIPModel, the model)."""
    torch.manual_seed(0)
    model = transformers.CLIPModel(clip_config()).to(torch.float64).eval()
    perturb(model)  # no norm, bias or scale left at its init
    path = tmp_path_factory.mktemp("clip") / "model"
    model.save_pretrained(path)
    return path, model


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, TEXT["vocab_size"], (3, 7), generator=gen),
            "pixel_values": torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)}


def _max_diff(a, b) -> float:
    """Max abs difference over every output of CLIPModel (logits both ways, both towers' embeddings)."""
    with torch.no_grad():
        x, y = a(**_inputs()), b(**_inputs())
    names = ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")
    return max((x[n] - y[n]).abs().max().item() for n in names)


def _grow(directory: Path, out: Path, step: Step) -> dict:
    return grow(Source(directory), [step], [Output(str(out) + "/") if out.suffix != ".safetensors" else Output(out)],
                seed=0, streaming=False)


def _reloaded(directory: Path):
    return transformers.CLIPModel.from_pretrained(directory, dtype=torch.float64).eval()


def _saved_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _sizes(sub: dict, leave_out: str | None) -> dict:
    return {k: v for k, v in sub.items() if k not in (leave_out, "dtype", "torch_dtype")}


TEXT_FC1 = r"text_model\.encoder\.layers\.\d+\.mlp\.fc1"
VISION_FC1 = r"vision_model\.encoder\.layers\.\d+\.mlp\.fc1"


@pytest.mark.parametrize("layer,tower,key,new", [(TEXT_FC1, "text_config", "intermediate_size", 64),
                                                 (VISION_FC1, "vision_config", "intermediate_size", 48)],
                         ids=["text", "vision"])
def test_ffn_widen_of_one_tower_updates_its_sub_config(clip, tmp_path, layer, tower, key, new):
    directory, model = clip
    report = _grow(directory, tmp_path / "out", Step("widen", {"layer": layer, "factor": 2}))
    assert report["function_preserving"] and report["verification"]["dtype"] == "float64"
    assert report["verification"]["max_abs_diff"] <= EXACT
    assert f"config {tower}.{key}: {new // 2} → {new}" in report["steps"][0]["notes"]
    saved, before = _saved_config(tmp_path / "out"), _saved_config(directory)
    assert saved[tower][key] == new
    for sub in ("text_config", "vision_config"):  # nothing else changes (save_pretrained adds the dtype)
        assert _sizes(saved[sub], key if sub == tower else None) == _sizes(before[sub], key if sub == tower else None)
    grown = _reloaded(tmp_path / "out")
    assert getattr(grown.config, tower).intermediate_size == new
    assert _max_diff(grown, model) <= EXACT


@pytest.mark.parametrize("step,layers", [(Step("deepen", {"after": "text_model.encoder.layers.0", "block": True}), 3),
                                         (Step("stack", {"blocks": "text_model.encoder.layers", "factor": 2,
                                                         "init": "identity"}), 4)], ids=["deepen-block", "stack"])
def test_depth_of_the_text_tower_updates_text_config(clip, tmp_path, step, layers):
    directory, model = clip
    report = _grow(directory, tmp_path / "out", step)
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= EXACT
    saved = _saved_config(tmp_path / "out")
    assert saved["text_config"]["num_hidden_layers"] == layers
    assert saved["vision_config"]["num_hidden_layers"] == VISION["num_hidden_layers"]
    grown = _reloaded(tmp_path / "out")
    assert len(grown.text_model.encoder.layers) == layers
    assert _max_diff(grown, model) <= EXACT


def _grown_safetensors(clip, tmp_path) -> Path:
    directory, _ = clip
    out = tmp_path / "grown.safetensors"
    _grow(directory, out, Step("widen", {"layer": TEXT_FC1, "factor": 2}))
    return out


def test_recorded_nested_edit_replays_with_load_grown(clip, tmp_path):
    _, model = clip
    out = _grown_safetensors(clip, tmp_path)
    with open(out, "rb") as f:  # the safetensors header holds the recorded edits
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    edits = json.loads(header["__metadata__"]["growcli.edits"])
    assert {"op": "config", "key": "text_config.intermediate_size", "value": 64} in edits
    base = transformers.CLIPModel(clip_config()).to(torch.float64)
    grown = growcli.load_grown(base, out)
    assert grown.config.text_config.intermediate_size == 64 and grown.config.vision_config.intermediate_size == 24
    assert grown.text_model.config is grown.config.text_config  # the tower reads the sub-config set
    assert tuple(grown.text_model.encoder.layers[1].mlp.fc1.weight.shape) == (64, 16)
    assert _max_diff(grown, model) <= EXACT


def _with_edits(path: Path, out: Path, change) -> Path:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    edits = [change(r) if r.get("op") == "config" else r for r in json.loads(meta["growcli.edits"])]
    meta["growcli.edits"] = json.dumps(edits)
    save_file(load_file(str(path)), str(out), metadata=meta)
    return out


def test_nested_key_naming_a_missing_sub_config_is_refused(clip, tmp_path):
    directory, _ = clip
    bad = _with_edits(_grown_safetensors(clip, tmp_path), tmp_path / "bad.safetensors",
                      lambda r: {**r, "key": "audio_config.intermediate_size"})
    base = transformers.CLIPModel(clip_config()).to(torch.float64)
    with pytest.raises(ArchitectureError) as err:
        growcli.load_grown(base, bad)
    assert str(err.value) == ("recorded edit sets config key 'audio_config.intermediate_size' but the config has no "
                              "sub-config 'audio_config'")
    from typer.testing import CliRunner

    from growcli.cli.app import get_app

    result = CliRunner().invoke(get_app(), ["verify", str(directory), str(bad)])
    assert result.exit_code == 1
    assert result.stderr == f"growcli: error: {err.value}\n"  # one line, no traceback


def test_config_owner_walks_dotted_paths_and_refuses_what_is_not_a_sub_config():
    config = clip_config()
    assert config_owner(config, "text_config.intermediate_size") == (config.text_config, "intermediate_size")
    assert config_owner(config, "projection_dim") == (config, "projection_dim")
    assert list(sub_configs(config)) == ["text_config", "vision_config"]
    with pytest.raises(ArchitectureError, match="has no sub-config 'projection_dim'"):
        config_owner(config, "projection_dim.x")  # an int, not a sub-config
    with pytest.raises(ArchitectureError, match="not a key or a dotted path"):
        config_owner(config, "text_config..hidden_size")
    saved = config.to_dict()  # a config.json's dict, as the streaming writers edit it
    set_config_json(saved, "text_config.num_hidden_layers", 4)
    set_config_json(saved, "projection_dim", 16)
    assert saved["text_config"]["num_hidden_layers"] == 4 and saved["vision_config"]["num_hidden_layers"] == 2
    assert saved["projection_dim"] == 16 and "text_config.num_hidden_layers" not in saved
    with pytest.raises(ArchitectureError, match="has no sub-config 'audio_config'"):
        set_config_json(saved, "audio_config.num_hidden_layers", 4)


def test_one_layer_widen_stays_refused_as_a_directory_with_the_reason(clip, tmp_path):
    directory, _ = clip
    step = Step("widen", {"layer": "text_model.encoder.layers.0.mlp.fc1", "factor": 2})
    with pytest.raises(UsageError) as err:  # no sub-config key describes one wider layer among equal ones
        _grow(directory, tmp_path / "out", step)
    assert str(err.value) == ("the grown model cannot be described by a Hugging Face config (its layers differ from "
                              "each other: text_model.encoder.layers.0.mlp.fc1.weight [64, 16] vs config [32, 16]); "
                              "write .safetensors and load it with growcli.load_grown")
    assert not (tmp_path / "out").exists()


def test_keys_without_a_path_go_to_every_sub_config_holding_them(clip):
    _, model = clip
    gm = GrowModel(model, "hf", None, "", InputSpec())
    config = model.config
    assert key_paths(config, "num_attention_heads") == ["text_config.num_attention_heads",
                                                        "vision_config.num_attention_heads"]
    assert key_paths(config, "vocab_size") == ["text_config.vocab_size"]
    assert key_paths(config, "projection_dim") == ["projection_dim"] and key_paths(config, "no_such_key") == []
    # head_dim is set nowhere: it goes where the update's other keys live
    assert key_paths(config, "head_dim", ["num_attention_heads"]) == ["text_config.head_dim", "vision_config.head_dim"]
    fresh = with_config(gm, {"num_attention_heads": 4, "head_dim": 4})
    assert fresh.text_model.encoder.layers[0].self_attn.num_heads == 4
    assert fresh.vision_model.encoder.layers[0].self_attn.num_heads == 4
    assert config.text_config.num_attention_heads == config.vision_config.num_attention_heads == 2  # restored
    assert getattr(config.text_config, "head_dim", None) is None
    assert ("text_config.intermediate_size", 32) in config_items(config)
    assert not any(key in ("text_config", "vision_config") for key, _ in config_items(config))


def test_siglip_vision_key_sizes_the_encoder_and_the_pooling_head(tmp_path):
    """SigLIP's pooling head has an MLP sized by the same ``vision_config.intermediate_size``: widened with the
    encoder's MLPs, the one key describes them all (found by the shapes, not by the family)."""
    config = transformers.SiglipConfig(text_config={k: v for k, v in TEXT.items() if k != "projection_dim"},
                                       vision_config={k: v for k, v in VISION.items() if k != "projection_dim"})
    torch.manual_seed(0)
    model = transformers.SiglipModel(config).to(torch.float64).eval()
    model.save_pretrained(tmp_path / "model")
    report = _grow(tmp_path / "model", tmp_path / "out", Step("widen", {"layer": r"vision_model\..*mlp\.fc1",
                                                                        "factor": 2}))
    assert report["verification"]["max_abs_diff"] <= EXACT
    assert "config vision_config.intermediate_size: 24 → 48" in report["steps"][0]["notes"]
    grown = transformers.SiglipModel.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert grown.config.text_config.intermediate_size == 32 and grown.vision_model.head.mlp.fc1.out_features == 48
    with torch.no_grad():
        x, y = grown(**_inputs()), model(**_inputs())
    assert max((x[n] - y[n]).abs().max().item() for n in ("logits_per_image", "text_embeds", "image_embeds")) <= EXACT
