"""``growcli inspect``: modules, parameter counts, inputs and repeated block stacks, as text and JSON."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES

# fixture argv → (kind, class, block stacks as {name: (type, length)}, some growable verdicts:
# {(transform, layer): growable?})
CASES = {
    "bert-tiny": (["bert-tiny"], "hf", "BertModel", {"encoder.layer": ("BertLayer", 2)},
                  {("widen", "encoder.layer.0.intermediate.dense"): True, ("widen", "pooler.dense"): False,
                   ("stack", "encoder.layer"): True, ("heads", "encoder.layer.0.attention.self"): False,
                   ("deepen", "encoder.layer.0 (--block)"): False}),
    "llama-tiny": (["llama-tiny"], "hf", "LlamaForCausalLM", {"model.layers": ("LlamaDecoderLayer", 2)},
                   {("heads", "model.layers.0.self_attn"): True, ("hidden", "model.embed_tokens"): True,
                    ("widen", "lm_head"): False, ("deepen", "model.layers.1 (--block)"): True}),
    "resnet.pt": (["resnet.pt", "--arch", "growcli.zoo:resnet"], "state_dict", "ResNetTiny",
                  {"layer1": ("BasicBlock", 2), "layer2": ("BasicBlock", 2)},
                  {("widen", "stem"): True, ("widen", "fc"): False, ("deepen", "layer2.0 (--block)"): False,
                   ("stack", "layer2"): True}),
    "mlp_module.pt": (["mlp_module.pt", "--trust-pickle"], "pickle", "MLP", {},
                      {("widen", "fc1"): True, ("widen", "fc3"): False, ("deepen", "fc3"): True}),
}
TRANSFORMS = {"branch", "column", "deepen", "heads", "hidden", "prune", "stack", "upcycle", "vocab", "widen",
              "mask", "grow_connections", "magnitude_prune"}


@pytest.fixture(scope="module")
def _cache() -> dict:
    return {}


@pytest.fixture
def reports(cli, _cache):
    """``reports(case)``: ``inspect --json`` of a case, run once per module (analysis is the slow part)."""

    def run(case: str) -> dict:
        if case not in _cache:
            argv = CASES[case][0]
            r = cli("inspect", FIXTURES / argv[0], *argv[1:], "--json")
            assert r.code == 0, r.err
            assert r.out.count("\n") == 1  # exactly one JSON object on stdout
            _cache[case] = json.loads(r.out)
        return _cache[case]

    return run


@pytest.mark.parametrize("case", CASES)
def test_inspect_json(reports, case):
    data = reports(case)
    _, kind, cls, stacks, verdicts = CASES[case]
    assert data["kind"] == kind and data["class"] == cls
    assert {s["name"]: (s["type"], s["length"]) for s in data["block_stacks"]} == stacks
    assert sum(m["count"] for m in data["modules"]) == data["total_parameters"] > 0
    assert set(data["growable"]) == TRANSFORMS  # every transform gives a verdict per candidate
    assert {key: data["growable"][key[0]][key[1]] is None for key in verdicts} == verdicts
    for layers in data["growable"].values():  # a refusal says why, in words
        assert all(reason is None or (isinstance(reason, str) and len(reason) > 10) for reason in layers.values())
    assert bool(data["growable"]["stack"]) == bool(stacks)


def test_bert_block_stack_and_parameters(reports):
    data = reports("bert-tiny")
    [stack] = data["block_stacks"]
    assert stack == {"name": "encoder.layer", "type": "BertLayer", "length": 2, "params_per_block": 8544}
    assert data["total_parameters"] == 22_496
    assert data["inputs"] == "input_ids=[2, 8] int64, attention_mask=[2, 8] int64"
    by_name = {m["name"]: m for m in data["modules"]}
    assert by_name["embeddings.word_embeddings"]["params"] == {"weight": [100, 32]}


def test_mlp_modules_and_inputs(cli):
    r = cli("inspect", FIXTURES / "mlp.pt2", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["kind"] == "pt2" and data["inputs"] == "[2, 16] float32"
    params = {m["name"]: m["params"] for m in data["modules"]}
    assert params["fc1"] == {"weight": [32, 16], "bias": [32]}
    assert params["fc3"] == {"weight": [4, 24], "bias": [4]}
    assert data["total_parameters"] == 16 * 32 + 32 + 32 * 24 + 24 + 24 * 4 + 4


def test_input_shape_option_overrides_the_spec(cli):
    r = cli("inspect", FIXTURES / "mlp.pt", "--arch", "growcli.zoo:mlp", "--input-shape", "5,16", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["inputs"] == "[5, 16] float32"


def test_text_output(cli):
    r = cli("inspect", FIXTURES / "bert-tiny")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].endswith("[hf]  BertModel")  # the [kind] is text, not swallowed as rich markup
    assert "parameters: 22,496" in lines[1] and "input_ids=[2, 8] int64" in lines[1]
    assert "block stack: encoder.layer × 2 (BertLayer, 8,544 params each)" in lines
    assert any(line.split()[:3] == ["embeddings.word_embeddings", "Embedding", "weight"] for line in lines)
    assert r.err == ""
