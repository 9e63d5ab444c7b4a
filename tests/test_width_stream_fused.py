"""Streamed width steps of checkpoints whose saved tensors transformers converts (fused mixture-of-experts experts).

transformers 5 holds a Mixtral or Qwen2-MoE layer's experts as fused 3-D parameters and saves them
as one tensor per expert and projection. Tiny real checkpoints (random weights, ``save_pretrained``
in float64 and bf16, several shards) are grown once in memory and once ``--streaming``; the written
tensors must be equal (``torch.equal``, same names and dtypes), the configs the same, and the
streamed output run against the input from disk (whole, or block by block). Conversions that cannot
be streamed (one that needs values on the meta device, one whose reverse is not exact) are refused,
naming the parameter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import dir_tensors
from transformers.core_model_loading import ConversionOps

from growcli.core.errors import NotGrowableError
from growcli.core.model import GrowModel
from growcli.io.shards import read_tensors
from growcli.run.runner import Output, Source, Step, grow
from growcli.run.steps import VerifySettings
from growcli.run.stream_names import meta_model
from growcli.run.streaming import BLOCKWISE
from growcli.run.width_fused import saved_tensors
from growcli.run.width_stream import stream_width
from growcli.transforms.catalog import build_spec

SHARD = "20KB"  # the inputs have several shards, and a layer's experts span two of them


def _model(arch: str):
    import transformers as T

    if arch == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))
    return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(  # with a shared expert and its gate
        vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_experts=4,
        shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts_per_tok=2, max_position_embeddings=64))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, dtype: str) -> Path:
        if (arch, dtype) not in made:
            torch.manual_seed(len(made))
            path = tmp_path_factory.mktemp(f"{arch}-{dtype}") / "model"
            _model(arch).eval().to(getattr(torch, dtype)).save_pretrained(str(path), max_shard_size=SHARD)
            assert len(list(path.glob("*.safetensors"))) >= 3
            made[(arch, dtype)] = path
        return made[(arch, dtype)]

    return get


def _run(src: Path, out: Path, transform: str, options: dict, streaming: bool) -> dict:
    return grow(Source(src), [Step(transform, options)], [Output(out, shard_size=20_000)], seed=0,
                settings=VerifySettings(batches=2), streaming=streaming)


# (arch, dtype, transform, options, bound): the largest max abs difference allowed (both models run in float64;
# float64 weights: exact up to the order of float64 sums, ≤ 1e-10; bf16 weights: exact in the weights, the
# model's float32 internals round, as in memory)
CASES = [
    ("mixtral", "float64", "hidden", {"factor": 2.0}, 1e-10),
    ("mixtral", "bfloat16", "hidden", {"factor": 2.0}, 1e-5),
    ("mixtral", "bfloat16", "heads", {"to": 8}, 1e-10),  # experts untouched: byte copies
    ("mixtral", "float64", "widen", {"layer": "experts.gate_up_proj", "by": 8}, 1e-10),  # every expert's FFN
    ("qwen2_moe", "bfloat16", "hidden", {"factor": 2.0}, 1e-5),  # shared expert and its gate too
    ("qwen2_moe", "float64", "widen", {"layer": "experts.gate_up_proj", "by": 8}, 1e-10),
]


def _id(case) -> str:
    arch, dtype, transform, options, _ = case
    return f"{arch}-{dtype}-{transform}-" + "-".join(f"{k}{v}" for k, v in options.items())


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_streaming_equals_in_memory_tensor_for_tensor(case, checkpoint, tmp_path):
    arch, dtype, transform, options, bound = case
    src = checkpoint(arch, dtype)
    memory = _run(src, tmp_path / "memory", transform, options, False)
    stream = _run(src, tmp_path / "stream", transform, options, True)
    assert (memory["execution"], stream["execution"]) == ("memory", "streaming")
    a, b = dir_tensors(tmp_path / "memory"), dir_tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b) and any(".experts.0." in k for k in b)  # saved per expert, as transformers saves
    for name in a:
        assert a[name].dtype == b[name].dtype == getattr(torch, dtype), name
        assert torch.equal(a[name], b[name]), name
    assert json.loads((tmp_path / "memory" / "config.json").read_text()) == \
        json.loads((tmp_path / "stream" / "config.json").read_text())
    assert len(list((tmp_path / "stream").glob("*.safetensors"))) > 1
    for key in ("function_preserving", "params_before", "params_after"):
        assert memory[key] == stream[key], key
    assert stream["function_preserving"] is True and stream["params_after"] > stream["params_before"]
    assert stream["verification"]["passed"] is memory["verification"]["passed"] is True
    assert stream["verification"]["max_abs_diff"] == memory["verification"]["max_abs_diff"] <= bound
    assert stream["outputs"][0]["loaded_with"].endswith(".from_pretrained")
    assert any(line.startswith("ran both models from disk:") for line in stream["checked"])
    copies = next(line for line in stream["checked"] if " byte copies " in line)
    experts = sum(1 for k in b if ".experts." in k)
    if transform == "heads":  # every expert tensor is a byte copy (plus norms, routers, embeddings)
        assert int(copies.split(": ")[1].split()[0]) >= experts


def test_large_outputs_are_verified_block_by_block(checkpoint, tmp_path):
    from growcli.io.atomic import transaction

    src = checkpoint("mixtral", "float64")
    with transaction():
        run = stream_width("hidden", src, tmp_path / "out", build_spec("hidden", {"factor": 2.0}), shard_size=20_000,
                           settings=VerifySettings(batches=1), verify_limit=0)
    assert run.output["loaded_with"] == BLOCKWISE
    assert run.verification.passed and run.verification.max_abs_diff <= 1e-10
    blocks = run.output["blockwise"]
    assert blocks["passed"] is True and blocks["first_failing"] in (None, "")
    assert len(blocks["blocks"]) >= 3  # embeddings, the two MoE blocks (experts read through the load conversion)


def test_each_group_is_computed_once_and_held_only_while_its_layer_is_written(checkpoint, tmp_path, monkeypatch):
    """Memory is one layer's experts: a group (one layer's gate_up_proj, or its down_proj) is read and rewritten
    once, when its first saved tensor is written, and each of its tensors is dropped once written."""
    import growcli.run.width_fused as width_fused

    held: list = []
    calls: list[str] = []
    real_init, real_compute = width_fused._Held.__init__, width_fused.SavedTensors.compute
    peak = [0]

    def init(self, *args):
        real_init(self, *args)
        held.append(self)

    def compute(self, group, on_rounded, rewrite):
        calls.append(group.key)
        peak[0] = max(peak[0], 1 + sum(1 for h in held if h.tensors))
        return real_compute(self, group, on_rounded, rewrite)

    monkeypatch.setattr(width_fused._Held, "__init__", init)
    monkeypatch.setattr(width_fused.SavedTensors, "compute", compute)
    _run(checkpoint("mixtral", "bfloat16"), tmp_path / "out", "hidden", {"factor": 2.0}, True)
    assert sorted(calls) == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                   for p in ("gate_up_proj", "down_proj"))
    assert peak[0] == 2  # the layer's two groups (their saved tensors interleave: w1, w2, w3 per expert)
    assert all(h.tensors == {} for h in held)  # every tensor was written and dropped


# --------------------------------------------------------------------------- the names, without planning a step
def _meta(src: Path) -> GrowModel:
    module = meta_model(src).to(torch.bfloat16)
    return GrowModel(module, "hf", src, "", None, hf_class=type(module).__name__)


def _siblings(module) -> dict[str, list[str]]:
    shared: dict[int, list[str]] = {}
    for n, t in module.named_parameters(remove_duplicate=False):
        shared.setdefault(id(t), []).append(n)
    return {n: names for names in shared.values() for n in names}


def test_converted_groups_are_found_from_the_load_conversion(checkpoint):
    src = checkpoint("mixtral", "bfloat16")
    gm = _meta(src)
    names = saved_tensors(src, gm, read_tensors(src), [], _siblings(gm.module))
    # nothing planned: no group is computed; every saved expert tensor is kept as a byte copy
    assert names.groups == [] and names.load is not None
    assert len(names.load.groups) == 4  # gate_up_proj and down_proj of each of the 2 layers
    experts = {k for k in read_tensors(src) if ".experts." in k}
    assert len(experts) == 2 * 4 * 3 and experts <= names.keep
    assert "model.layers.0.self_attn.q_proj.weight" in names.keep
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names.disk
    # a group read through the conversion is the fused parameter, [E, 2I, H], from the saved w1 and w3 of 4 experts
    from growcli.run.width_fused import Group

    key = "model.layers.1.mlp.experts.gate_up_proj"
    assert [k for k, _ in names.load.groups[key]][:2] == ["model.layers.1.block_sparse_moe.experts.0.w1.weight",
                                                          "model.layers.1.block_sparse_moe.experts.0.w3.weight"]
    loaded = names.loaded(Group(key, [key], {}, {}, {}))
    fused = loaded[key]
    assert tuple(fused.shape) == (4, 96, 32) and fused.dtype == torch.bfloat16
    w3 = dir_tensors(src)["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    assert torch.equal(fused[2, 48:], w3)


def test_a_model_without_conversions_keeps_the_one_to_one_names(tmp_path):
    import transformers as T

    from growcli.run.stream_names import checkpoint_names

    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).save_pretrained(str(tmp_path))
    gm = _meta(tmp_path)
    names = saved_tensors(tmp_path, gm, read_tensors(tmp_path), [], _siblings(gm.module))
    assert names.load is None and names.groups == []
    assert names.disk == checkpoint_names(gm.module)
    assert names.entries([], lambda *a: None, lambda t, job: (t, "")) == []


class _Scale(ConversionOps):
    """A conversion op multiplying by ``factor`` on load (its reverse divides): not exact in bf16."""

    def __init__(self, factor: float):
        self.factor = factor

    def convert(self, input_dict, **kwargs):
        return {k: (v[0] if isinstance(v, list) else v) * self.factor for k, v in input_dict.items()}

    @property
    def reverse_op(self):
        return _Scale(1 / self.factor)


class _NeedsValues(ConversionOps):
    """A conversion op that reads a value (as dequantisation does): cannot run on meta placeholders."""

    def convert(self, input_dict, **kwargs):
        for v in input_dict.values():
            float((v[0] if isinstance(v, list) else v).abs().max())
        return input_dict

    @property
    def reverse_op(self):
        return _NeedsValues()


def _patched_mapping(monkeypatch, extra):
    """The model's own conversion mapping with ``extra`` appended to the gate_up_proj converter's operations."""
    import copy

    import transformers.conversion_mapping as cm
    from transformers.core_model_loading import WeightConverter

    real = cm.get_model_conversion_mapping

    def mapping(model, *args, **kwargs):
        out = copy.deepcopy(real(model, *args, **kwargs))
        for m in out:
            if isinstance(m, WeightConverter) and any("gate_up_proj" in t for t in m.target_patterns):
                m.operations = [*m.operations, extra]
        return out

    monkeypatch.setattr(cm, "get_model_conversion_mapping", mapping)


def test_a_conversion_that_needs_values_is_refused_naming_the_parameter(checkpoint, monkeypatch):
    src = checkpoint("mixtral", "bfloat16")
    gm = _meta(src)
    _patched_mapping(monkeypatch, _NeedsValues())
    with pytest.raises(NotGrowableError) as info:
        saved_tensors(src, gm, read_tensors(src), [], _siblings(gm.module))
    message = str(info.value)
    assert message.startswith("--streaming: transformers' load conversion of model.layers.0.mlp.experts.gate_up_proj "
                              "(from model.layers.0.block_sparse_moe.experts.0.w1.weight…) cannot be read tensor by "
                              "tensor")


def test_a_conversion_whose_reverse_is_not_exact_is_refused_naming_the_parameter(checkpoint, monkeypatch):
    src = checkpoint("mixtral", "bfloat16")
    gm = _meta(src)
    _patched_mapping(monkeypatch, _Scale(3.0))
    with pytest.raises(NotGrowableError) as info:  # checked on the first untouched group's real tensors
        saved_tensors(src, gm, read_tensors(src), [], _siblings(gm.module))
    assert str(info.value) == ("--streaming: transformers' save conversion of model.layers.0.mlp.experts.gate_up_proj "
                               "does not give back the tensors it was loaded from (its reverse is not exact); use "
                               "--no-streaming")
