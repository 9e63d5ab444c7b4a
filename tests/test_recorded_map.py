"""``verify --blockwise`` after several hidden steps: the map between the streams is the one the growth report records.

A tiny float64 Qwen2 (hidden 32, 2 blocks, grouped-query attention) grown 32 → 48 (padded) → 96 (tiled: the
padding is tiled too), written in memory and streamed. Checked: each hidden step records its stream widths;
the recorded map is the tilings composed (not one tiling of 32 into 96), the same map the streaming chain
verifies with; ``growcli verify --blockwise --json`` passes with ``map_source`` "recorded" and the final-output
differences whole-model ``verify`` gives; a tensor perturbed in block 1 exits 3 naming block 1; a report without
the widths (an older growcli's) falls back to the hidden axis by width, says "inferred", and that map fails.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from growcli.core.errors import NotGrowableError
from growcli.run.runner import Output, Source, Step, grow
from growcli.run.steps import VerifySettings
from growcli.run.stream_chain import stream_chain
from growcli.run.streaming import recorded_map
from growcli.verification.stream_map import compose_tilings, tiling

STEPS = [Step("hidden", {"to": 48, "heads": 6}), Step("hidden", {"factor": 2.0})]
# 32 → 48: [x, p·16]; 48 → 96: that stream twice
COMPOSED = (tuple(range(32)) + (-1,) * 16) * 2


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """(original, {"memory": dir, "streaming": dir}): the two-step hidden plan written both ways, with reports."""
    import transformers as T

    root = tmp_path_factory.mktemp("recorded")
    torch.manual_seed(3)
    config = T.Qwen2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = T.Qwen2ForCausalLM(config).eval().to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))  # no norm is trivially the identity
    model.save_pretrained(str(root / "orig"))
    outs = {}
    for mode, streaming in (("memory", False), ("streaming", True)):
        with pytest.MonkeyPatch.context() as mp:  # streamed: verified block by block, as a large output is
            mp.setattr("growcli.run.runner.stream_chain", functools.partial(stream_chain, verify_limit=0))
            report = grow(Source(root / "orig"), STEPS, [Output(root / mode)], settings=VerifySettings(batches=1),
                          streaming=streaming)
        assert report["execution"] == mode and report["verification"]["passed"]
        outs[mode] = root / mode
    return root / "orig", outs


def test_composed_tilings():
    assert compose_tilings([(32, 48), (48, 96)]) == COMPOSED
    assert compose_tilings([(32, 48), (48, 96)]) != tiling(32, 96)  # what "by width" would compare
    assert compose_tilings([(3, 7)]) == tiling(3, 7)
    assert compose_tilings([(2, 4), (4, 8)]) == (0, 1) * 4
    with pytest.raises(NotGrowableError, match=r"hidden step 2 grows the stream 40 → 96, but the steps before it "
                                                r"leave it 48 wide"):
        compose_tilings([(32, 48), (40, 96)])


@pytest.mark.parametrize("mode", ["memory", "streaming"])
def test_recorded_map_and_verify_blockwise(mode, grown, cli):
    original, outs = grown
    report = json.loads((outs[mode] / "growth_report.json").read_text())
    assert [s["stream_widths"] for s in report["steps"]] == [[32, 48], [48, 96]]
    stream_map = recorded_map(outs[mode], 2)
    assert (stream_map.depth, stream_map.hidden, stream_map.source) == ((0, 1, 2), COMPOSED, "recorded")
    r = cli("verify", original, outs[mode], "--blockwise", "--batches", "2", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["passed"] and (data["map_source"], data["map_note"]) == ("recorded", "")
    assert [b["original"] for b in data["blocks"]] == [0, 1, 2]
    # the norms compute in float32 inside the model, where a norm over 96 entries rounds unlike one over 32
    assert max(b["max_abs_diff"] for b in data["blocks"]) <= 1e-6
    assert data["blocks"][1]["scale"] > 0.01  # a real stream, not zeros
    whole = cli("verify", original, outs[mode], "--batches", "2", "--json")
    assert whole.code == 0, whole.err
    figures = {o["name"]: o["max_abs_diff"] for o in json.loads(whole.out)["outputs"]}
    assert {o["name"]: o["max_abs_diff"] for o in data["outputs"]} == figures
    assert data["max_abs_diff"] == json.loads(whole.out)["max_abs_diff"] <= 1e-6
    text = cli("verify", original, outs[mode], "--blockwise", "--batches", "1")
    assert text.code == 0 and "block by block (recorded map)" in text.out


def test_the_streaming_chain_verified_with_the_same_map(grown):
    """Above the read-back limit the chain ran block by block through the map it composed from its own steps."""
    _, outs = grown
    output = json.loads((outs["streaming"] / "growth_report.json").read_text())["outputs"][0]
    assert output["loaded_with"].startswith("growcli.verification.blockwise")
    blockwise = output["blockwise"]
    assert blockwise["passed"] and (blockwise["map_source"], blockwise["map_note"]) == ("recorded", "")
    assert [b["original"] for b in blockwise["blocks"]] == [0, 1, 2]
    assert max(b["max_abs_diff"] for b in blockwise["blocks"]) <= 1e-6


def _perturb(src: Path, dst: Path, block: int) -> str:
    """``dst``: a copy of ``src`` (report included) with one 2-D tensor of block ``block`` moved by 0.05·N(0, 1)."""
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(str(f))
        names = sorted(k for k in tensors if re.search(rf"\.{block}\.", k) and tensors[k].dim() == 2)
        if names:
            gen = torch.Generator().manual_seed(0)
            tensors[names[0]] = tensors[names[0]] + 0.05 * torch.randn(tensors[names[0]].shape, generator=gen,
                                                                        dtype=tensors[names[0]].dtype)
            save_file(tensors, str(f), metadata={"format": "pt"})
            return names[0]
    raise AssertionError(f"no 2-D tensor of block {block}")


def test_a_perturbed_block_is_named(grown, tmp_path, cli):
    original, outs = grown
    name = _perturb(outs["memory"], tmp_path / "bad", 1)
    assert name.startswith("model.layers.1.")
    r = cli("verify", original, tmp_path / "bad", "--blockwise", "--batches", "1", "--json")
    assert r.code == 3
    data = json.loads(r.out)
    assert not data["passed"] and data["first_failing"] == "model.layers.1" and data["map_source"] == "recorded"
    assert [b["passed"] for b in data["blocks"]] == [True, True, False]
    assert data["blocks"][2]["max_abs_diff"] > 1e-3
    r = cli("verify", original, tmp_path / "bad", "--blockwise", "--batches", "1")
    assert r.code == 3 and "error: the grown model first differs at model.layers.1" in r.err


def test_a_report_without_the_widths_maps_by_width_and_says_so(grown, tmp_path, cli):
    original, outs = grown
    old = tmp_path / "old"
    shutil.copytree(outs["memory"], old)
    report = json.loads((old / "growth_report.json").read_text())
    for step in report["steps"]:
        del step["stream_widths"]
    (old / "growth_report.json").write_text(json.dumps(report))
    stream_map = recorded_map(old, 2)
    assert (stream_map.hidden, stream_map.source) == (None, "inferred")
    r = cli("verify", original, old, "--blockwise", "--batches", "1", "--json")
    data = json.loads(r.out)
    assert data["map_source"] == "inferred"
    assert data["map_note"] == ("hidden axis by width: growth_report.json records no stream widths for step 1, "
                                "step 2 (hidden; written by an older growcli)")
    # one tiling of 32 into 96 compares the padding with the original entries: the streams differ from the start
    assert r.code == 3 and data["first_failing"] == "before model.layers.0"
    assert data["blocks"][0]["max_abs_diff"] > 0.01
