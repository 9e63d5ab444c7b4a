"""Block-wise verification: two HF directories run one block at a time from disk, compared at every boundary.

Tiny real models (Llama with GQA, Qwen2, GPT-2, ViT; hidden 32, 3 blocks) with random weights,
saved with ``save_pretrained``. Checked: the block-wise forward pass gives the model's own
outputs (float64, ≤ 1e-12 from ``from_pretrained`` + ``forward``; measured 0); an identical
copy passes with every boundary at 0, and the verdict and the final-output differences equal
whole-model verification's; a tensor perturbed in block k of the copy fails, names block k
(boundaries before it at exactly 0) and exits 3 from ``growcli verify --blockwise``; only one
block is ever loaded, and a model reading a tensor without calling its module gets them all;
stacked (identity and copy) and hidden-grown (tiled, padded) outputs are mapped and verified
with whole-model verification's figures; a streamed stack above a forced tiny
``verify_limit`` is verified block-wise; streams that are not one residual stream, unmapped
depths and non-HF inputs are refused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import make_batches
from growcli.io.atomic import transaction
from growcli.io.hf_dir import hf_input_spec
from growcli.io.load import load_model
from growcli.run.compare import compare_checkpoints
from growcli.run.runner import Output, Source, Step, grow
from growcli.run.steps import VerifySettings
from growcli.run.streaming import BLOCKWISE, blockwise_check, recorded_map, stream_stack
from growcli.transforms.stack import StackSpec
from growcli.verification.blockwise import _Run
from growcli.verification.compare import as_dtype, run_model
from growcli.verification.ondisk import OnDisk
from growcli.verification.stream_map import StreamMap, compose, stacked, tiling

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
SETTINGS = VerifySettings(batches=2)
# arch → (class, config factory, the block stack in the model)
ARCHS = {
    "llama": ("LlamaForCausalLM", lambda T: T.LlamaConfig(**SMALL, num_key_value_heads=2), "model.layers"),
    "qwen2": ("Qwen2ForCausalLM", lambda T: T.Qwen2Config(**SMALL, num_key_value_heads=2), "model.layers"),
    "gpt2": ("GPT2LMHeadModel", lambda T: T.GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                                       bos_token_id=0, eos_token_id=0), "transformer.h"),
    "vit": ("ViTModel", lambda T: T.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                              intermediate_size=64, image_size=16, patch_size=4), "layers"),
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """arch → a saved tiny HF directory (1-D parameters perturbed so no norm is trivially the identity)."""
    import transformers as T

    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            cls, config, _ = ARCHS[arch]
            torch.manual_seed(list(ARCHS).index(arch))
            model = getattr(T, cls)(config(T)).eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 1:
                        p.add_(0.3 * torch.randn_like(p))
            made[arch] = tmp_path_factory.mktemp(arch) / "model"
            model.save_pretrained(str(made[arch]))
        return made[arch]

    return get


def perturbed_copy(src: Path, dst: Path, block: int) -> str:
    """``dst``: a copy of ``src`` with one 2-D tensor of block ``block`` changed by 0.05·N(0, 1); its name on disk."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(str(f))
    name = sorted(k for k in tensors if re.search(rf"\.{block}\.", k) and tensors[k].dim() == 2)[0]
    gen = torch.Generator().manual_seed(0)
    tensors[name] = tensors[name] + 0.05 * torch.randn(tensors[name].shape, generator=gen)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("arch", list(ARCHS))
def test_blockwise_forward_is_the_models_own(arch, hf_dir):
    """The forward pass with blocks loaded one at a time gives from_pretrained's outputs, in float64."""
    src = hf_dir(arch)
    model = OnDisk(src)
    run = _Run(model, ARCHS[arch][2], torch.float64, "the model")
    whole = as_dtype(load_model(src).module, torch.float64)
    for batch in make_batches(hf_input_spec(model.module), 2, seed=0):
        outputs, stream = run(batch)
        expected = run_model(whole, batch)
        assert set(outputs) == set(expected)
        for k in expected:
            assert outputs[k].dtype == torch.float64
            assert float((outputs[k] - expected[k]).abs().max()) <= 1e-12, k
        assert len(stream) == 4 and all(s.shape == stream[0].shape for s in stream)
    assert all(p.device.type == "meta" for p in model.module.parameters())  # everything freed again
    assert run.lazy  # the tensors outside the blocks were loaded by their modules, only for their calls


def test_a_tensor_read_without_calling_its_module_falls_back_to_holding_them(hf_dir):
    """A head reading the embedding matrix directly: lazily it would see a meta tensor; held whole it runs."""
    model = OnDisk(hf_dir("llama"))
    embed = model.module.model.embed_tokens
    model.module.lm_head.forward = lambda h: torch.nn.functional.linear(h, embed.weight)
    run = _Run(model, "model.layers", torch.float64, "the model")
    outputs, stream = run(make_batches(hf_input_spec(model.module), 1, seed=0)[0])
    assert not run.lazy and outputs["logits"].device.type == "cpu" and torch.isfinite(outputs["logits"]).all()
    assert float(outputs["logits"].abs().max()) > 0 and not model.loaded


@pytest.mark.parametrize("arch", list(ARCHS))
def test_identical_copy_same_verdict_as_whole_model(arch, hf_dir, tmp_path):
    src = hf_dir(arch)
    shutil.copytree(src, tmp_path / "copy")
    report = blockwise_check(src, tmp_path / "copy", SETTINGS)
    whole = compare_checkpoints(Source(src), tmp_path / "copy", VerifySettings(batches=2))
    assert report.passed and whole.passed and report.first_failing is None
    assert [b.max_abs_diff for b in report.blocks] == [0.0] * 4
    assert [b.original for b in report.blocks] == [0, 1, 2, 3]
    assert {o.name: o.max_abs_diff for o in report.outputs} == {o.name: o.max_abs_diff for o in whole.outputs}
    assert report.dtype == "float64" and (report.atol, report.rtol) == (1e-6, 1e-5)  # float32 weights


@pytest.mark.parametrize("arch", list(ARCHS))
def test_perturbed_block_is_named(arch, hf_dir, tmp_path, cli):
    src, container = hf_dir(arch), ARCHS[arch][2]
    perturbed_copy(src, tmp_path / "bad", block=1)
    report = blockwise_check(src, tmp_path / "bad", SETTINGS)
    whole = compare_checkpoints(Source(src), tmp_path / "bad", VerifySettings(batches=2))
    assert not report.passed and not whole.passed  # the same verdict
    assert report.first_failing == f"{container}.1"
    diffs = [b.max_abs_diff for b in report.blocks]
    assert diffs[:2] == [0.0, 0.0]  # before block 0 and after block 0: untouched
    assert all(not b.passed and b.max_abs_diff > b.tolerance for b in report.blocks[2:])
    r = cli("verify", src, tmp_path / "bad", "--blockwise", "--batches", "2", "--json")
    assert r.code == 3
    data = json.loads(r.out)
    assert data["first_failing"] == f"{container}.1" and data["passed"] is False
    assert [b["name"] for b in data["blocks"]] == [f"before {container}.0"] + [f"{container}.{j}" for j in range(3)]
    assert data["blocks"][2]["max_abs_diff"] == pytest.approx(diffs[2], rel=1e-12)
    r = cli("verify", src, tmp_path / "bad", "--blockwise", "--batches", "2")
    assert r.code == 3 and f"first breaking: {container}.1" in r.out
    assert f"error: the grown model first differs at {container}.1" in r.err


def test_only_one_module_is_in_memory(hf_dir):
    """Each tensor is loaded by its owner for the time of its call: inside block i only the module running holds
    tensors (its own), nothing outside the blocks; when a block ends none of its tensors is left."""
    model = OnDisk(hf_dir("llama"))
    run = _Run(model, "model.layers", torch.float64, "the model")
    seen, ends = [], []

    def look(name):
        def hook(module, args, output):  # runs before the run's own hook frees the module's tensors
            seen.append((name, sorted(model.loaded)))
        return hook

    def end(i):
        def hook(block, args, output):
            ends.append((i, sorted(model.loaded)))
        return hook

    handles = [b.register_forward_hook(end(i)) for i, b in enumerate(run.blocks)]
    owners = {n: m for n, m in model.module.named_modules() if n.startswith("model.layers.") and
              any(True for _ in m.parameters(recurse=False))}
    handles += [m.register_forward_hook(look(n)) for n, m in owners.items()]
    try:
        run(make_batches(hf_input_spec(model.module), 1, seed=0)[0])
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(owners) and len(owners) >= 3 * 7  # q, k, v, o, gate, up, down (+ norms) per block
    for name, loaded in seen:
        assert loaded and all(k.rpartition(".")[0] == name for k in loaded), (name, loaded)
    assert ends == [(0, []), (1, []), (2, [])]  # the embeddings freed, the head not yet loaded
    assert not model.loaded and run.lazy and run.leafwise


def test_stack_maps():
    assert stacked([0, 1, 0, 1], [2, 3]).depth == (0, 1, 2, 2, 2)
    assert stacked([0, 0, 1, 1], [1, 3]).depth == (0, 1, 1, 2, 2)
    assert stacked([0, 1, 2, 1, 2], [3, 4]).depth == (0, 1, 2, 3, 3, 3)
    assert compose(stacked([0, 1, 0, 1], [2, 3]), stacked([0, 0, 1, 1, 2, 2, 3, 3], [1, 3, 5, 7])).depth == (
        0, 1, 1, 2, 2, 2, 2, 2, 2)
    assert tiling(3, 7) == (0, 1, 2, 0, 1, 2, -1)
    assert StreamMap((0, 1)).hidden_index(4, 4) == (0, 1, 2, 3)
    with pytest.raises(NotGrowableError, match="narrower"):
        StreamMap((0, 1)).hidden_index(3, 4)
    with pytest.raises(NotGrowableError, match=r"depth map \[0, 2, 1\] does not map the 3 boundaries"):
        StreamMap((0, 2, 1)).check(2, 2)


@pytest.mark.parametrize("init", ["identity", "copy"])
def test_streamed_stack_above_the_limit_is_verified_blockwise(init, hf_dir, tmp_path):
    src = hf_dir("llama")
    out = tmp_path / "out"
    with transaction():
        run = stream_stack(src, out, StackSpec(init=init), shard_size=40_000, settings=VerifySettings(batches=2),
                           verify_limit=1)
    blockwise = run.output["blockwise"]
    assert run.output["loaded_with"] == BLOCKWISE
    assert [b["original"] for b in blockwise["blocks"]] == [0, 1, 2, 3, 3, 3, 3]
    assert any(c.startswith("ran both models from disk") for c in run.checked)
    assert not any(c.startswith("not run") for c in run.checked)
    if init == "identity":
        assert blockwise["passed"] and run.verification.passed and run.verification.max_abs_diff == 0.0
        assert [b["max_abs_diff"] for b in blockwise["blocks"]] == [0.0] * 7
    else:  # progressive stacking changes the function from the first copy on: measured, named
        assert not run.verification.passed and blockwise["first_failing"] == "model.layers.3"
        assert [b["max_abs_diff"] for b in blockwise["blocks"][:4]] == [0.0] * 4
        assert "first breaking: model.layers.3" in run.verification.note
    # the directory written by the runner is mapped again from its growth_report.json
    assert recorded_map(out, 3) is None  # stream_stack alone writes no report


def test_stacked_output_via_cli(hf_dir, tmp_path, cli):
    src = hf_dir("qwen2")
    grow(Source(src), [Step("stack", {"init": "identity", "order": "interleave"})], [Output(tmp_path / "deep")],
         settings=VerifySettings(batches=1), streaming=True)
    assert recorded_map(tmp_path / "deep", 3).depth == (0, 1, 1, 2, 2, 3, 3)
    r = cli("verify", src, tmp_path / "deep", "--blockwise", "--batches", "2", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["passed"] and [b["original"] for b in data["blocks"]] == [0, 1, 1, 2, 2, 3, 3]
    assert max(b["max_abs_diff"] for b in data["blocks"]) == 0.0


@pytest.mark.parametrize("arch, options, bound", [
    ("qwen2", {"factor": 2}, 1e-12),  # [x, x]: tiles of float32 weights, exact up to the order of sums
    ("gpt2", {"to": 48}, 1e-7),  # [x, p]: LayerNorm padding rescales γ by √(32/48), rounded to float32
], ids=["tiling", "padding"])
def test_hidden_grown_outputs_same_verdict_and_figures(arch, options, bound, hf_dir, tmp_path):
    src = hf_dir(arch)
    grow(Source(src), [Step("hidden", options)], [Output(tmp_path / "wide")], settings=VerifySettings(batches=1))
    report = blockwise_check(src, tmp_path / "wide", SETTINGS)
    whole = compare_checkpoints(Source(src), tmp_path / "wide", VerifySettings(batches=2))
    assert report.passed and whole.passed and [b.original for b in report.blocks] == [0, 1, 2, 3]
    assert max(b.max_abs_diff for b in report.blocks) <= bound
    assert report.blocks[1].scale > 0.01  # a real stream, not zeros
    assert {o.name: o.max_abs_diff for o in report.outputs} == {o.name: o.max_abs_diff for o in whole.outputs}


def test_refusals(hf_dir, tmp_path, cli):
    src = hf_dir("llama")
    grow(Source(src), [Step("stack", {"init": "identity"})], [Output(tmp_path / "deep")],
         settings=VerifySettings(batches=1), streaming=True)
    (tmp_path / "deep" / "growth_report.json").unlink()
    with pytest.raises(NotGrowableError, match="the grown model has 6 blocks, the original 3; say how they map"):
        blockwise_check(src, tmp_path / "deep", SETTINGS)
    r = cli("verify", src, tmp_path / "deep", "--blockwise")
    assert r.code == 1 and "the grown model has 6 blocks, the original 3" in r.err
    with pytest.raises(UsageError, match="--blockwise compares Hugging Face directories"):
        blockwise_check(src, FIXTURES / "mlp.pt2", SETTINGS)
    r = cli("verify", src, src, "--blockwise", "--arch", "growcli.zoo:mlp")
    assert r.code == 2 and "--arch, --input-shape and --trust-pickle do not apply" in r.err


def test_float32_and_explicit_tolerances(hf_dir, tmp_path, cli):
    src = hf_dir("gpt2")
    shutil.copytree(src, tmp_path / "copy")
    r = cli("verify", src, tmp_path / "copy", "--blockwise", "--dtype", "float32", "--batches", "1", "--json")
    data = json.loads(r.out)
    assert r.code == 0 and data["dtype"] == "float32" and (data["atol"], data["rtol"]) == (1e-6, 1e-5)
    assert data["batches"] == 1 and len(data["blocks"]) == 4
    perturbed_copy(src, tmp_path / "bad", block=2)
    r = cli("verify", src, tmp_path / "bad", "--blockwise", "--batches", "1", "--atol", "1", "--rtol", "0", "--json")
    data = json.loads(r.out)
    assert r.code == 0 and data["passed"] and data["atol"] == 1.0  # held to what was asked
    assert data["blocks"][2]["max_abs_diff"] == 0.0 and data["blocks"][3]["max_abs_diff"] > 0


def test_a_stream_changed_between_blocks_is_refused(hf_dir):
    """What block 0 leaves must be what block 1 gets; a model scaling it in between is not one stream."""
    model = OnDisk(hf_dir("llama"))
    model.module.model.layers[1].register_forward_pre_hook(lambda m, args: (2 * args[0], *args[1:]))
    run = _Run(model, "model.layers", torch.float64, "the model")
    with pytest.raises(NotGrowableError, match=r"^block-wise verification: model.layers.1 of LlamaForCausalLM does not "
                                               r"get the stream model.layers.0 leaves"):
        run(make_batches(hf_input_spec(model.module), 1, seed=0)[0])
    assert not model.loaded


def test_inputs_file(hf_dir, tmp_path, cli):
    src = hf_dir("llama")
    perturbed_copy(src, tmp_path / "bad", block=0)
    ids = torch.tensor([[1, 5, 99, 7, 0, 3, 42, 8]])
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(tmp_path / "in.safetensors"))
    r = cli("verify", src, tmp_path / "bad", "--blockwise", "--inputs", tmp_path / "in.safetensors", "--json")
    assert r.out, r.err
    data = json.loads(r.out)
    assert r.code == 3 and data["batches"] == 1 and data["first_failing"] == "model.layers.0"
    assert data["outputs"][0]["shape"] == [1, 8, 100] and data["blocks"][0]["max_abs_diff"] == 0.0


def test_a_block_not_returning_the_stream_is_refused(hf_dir):
    model = OnDisk(hf_dir("llama"))
    model.module.model.layers[0].register_forward_hook(lambda m, args, out: out[..., :16])
    run = _Run(model, "model.layers", torch.float64, "the model")
    with pytest.raises(NotGrowableError, match=r"^block-wise verification: model.layers.0 of LlamaForCausalLM returns "
                                               r"\[2, 8, 16\] from a stream of \[2, 8, 32\]; its output is not the "
                                               r"residual stream$"):
        run(make_batches(hf_input_spec(model.module), 1, seed=0)[0])
    assert not model.loaded


def test_hidden_then_stack_in_one_run_is_mapped_from_its_report(tmp_path):
    """Two steps: the depth map from the recorded stack step, the hidden map (two tiles) from the widths."""
    src = FIXTURES / "llama-tiny"
    grow(Source(src), [Step("hidden", {"factor": 2}), Step("stack", {"init": "identity", "order": "interleave"})],
         [Output(tmp_path / "grown")], settings=VerifySettings(batches=1))
    report = blockwise_check(src, tmp_path / "grown", SETTINGS)
    assert report.passed and [b.original for b in report.blocks] == [0, 1, 1, 2, 2]
    assert max(b.max_abs_diff for b in report.blocks) <= 1e-12 and report.max_abs_diff <= 1e-12


def test_float64_checkpoint_is_held_to_the_tolerance_whole_model_verification_uses(tmp_path):
    """The model's buffers count as it makes them (Llama's rotary frequencies in float32), in both checks."""
    import transformers as T

    torch.manual_seed(5)
    T.LlamaForCausalLM(ARCHS["llama"][1](T)).to(torch.float64).save_pretrained(str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert OnDisk(tmp_path / "a").dtypes() == {torch.float64}
    report = blockwise_check(tmp_path / "a", tmp_path / "b", VerifySettings(batches=1))
    whole = compare_checkpoints(Source(tmp_path / "a"), tmp_path / "b", VerifySettings(batches=1))
    assert report.passed and whole.passed and (report.atol, report.rtol) == (whole.atol, whole.rtol) == (1e-6, 1e-5)
    assert [o.tolerance for o in report.outputs] == pytest.approx([o.tolerance for o in whole.outputs], rel=1e-12)
