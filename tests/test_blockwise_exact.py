"""Block-wise verification holds a step exact in the weights' dtype to the exact tolerance, as the whole read-back does.

A bf16 Llama grown by ``heads`` ×2 is exact in bf16 (copied heads, output columns split to sum exactly): both models
run in float64 agree to float64 rounding. Above the in-memory limit the output is run block by block; with the
step's ``exact_in_dtype`` the tolerance comes from the original's arithmetic (observed on its meta-device model),
not from bf16 rounding (2e-2 relative), so a 1-ulp bf16 change in one reader weight is caught (on the logits, here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from growcli.io.atomic import transaction
from growcli.run.steps import VerifySettings
from growcli.run.streaming import BLOCKWISE, blockwise_check
from growcli.run.width_stream import stream_width
from growcli.transforms.catalog import build_spec


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, num_key_value_heads=2)
    base = tmp_path_factory.mktemp("exact")
    src = base / "model"
    T.LlamaForCausalLM(config).eval().to(torch.bfloat16).save_pretrained(str(src))
    with transaction():
        run = stream_width("heads", src, base / "out", build_spec("heads", {"to": 8}), shard_size=1 << 30,
                           settings=VerifySettings(batches=1), verify_limit=0)
    return src, base / "out", run


def test_a_streamed_exact_step_is_held_to_the_exact_tolerance_block_by_block(grown):
    _, _, run = grown
    assert run.output["loaded_with"] == BLOCKWISE
    blocks = run.output["blockwise"]
    # 16 ulps of float32 (Llama computes its rotary embedding in float32) per rounding stage, as the whole
    # read-back says; bf16 rounding would be 1e-3 + 2e-2 relative
    assert blocks["passed"] and blocks["rtol"] == blocks["atol"] <= 1e-4
    assert run.verification.max_abs_diff <= 1e-12


def _one_ulp(out: Path, dst: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(out, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"] \
        if (dst / "model.safetensors.index.json").exists() else None
    file = dst / (index[name] if index else "model.safetensors")
    tensors = load_file(str(file))
    w = tensors[name]
    bits = w.view(torch.int16).clone()
    bits.view(-1)[w.abs().argmax()] += 1  # the next bf16 value of its largest entry
    tensors[name] = bits.view(torch.bfloat16)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_a_one_ulp_change_in_a_reader_is_caught_only_with_the_exact_tolerance(grown, tmp_path):
    src, out, _ = grown
    bad = tmp_path / "bad"
    _one_ulp(out, bad, "model.layers.1.self_attn.o_proj.weight")
    settings = VerifySettings(batches=1)
    loose = blockwise_check(src, bad, settings)
    assert loose.passed  # bf16 rounding lets it through: why the exact tolerance matters
    tight = blockwise_check(src, bad, settings, exact_in_dtype=True)
    assert not tight.passed and not all(o.passed for o in tight.outputs)  # the logits show it


def test_block_by_block_and_whole_read_back_use_the_same_exact_tolerance(grown, tmp_path):
    src, _, run = grown
    with transaction():
        whole = stream_width("heads", src, tmp_path / "whole", build_spec("heads", {"to": 8}), shard_size=1 << 30,
                             settings=VerifySettings(batches=1), verify_limit=1 << 40)
    assert whole.output["loaded_with"] != BLOCKWISE
    assert whole.verification.atol == run.output["blockwise"]["atol"]
    assert whole.verification.basis.startswith("exact in bfloat16")
