"""Streaming plans: a chain of streamable steps planned on the meta device, composed, written once — equal to the in-memory plan.

Tiny real Hugging Face checkpoints (Llama with grouped-query attention in float32, GPT-2 with its
tied embedding in bf16, Qwen2 in float32), random weights, ``save_pretrained`` with a small
``max_shard_size`` so each input has several shards. Every chain runs once in memory and once
streaming: the written tensors must be equal (``torch.equal``, same names and dtypes), config.json
the same, the report list every step, and the streamed output must have been run against the
input from disk (whole, or block by block through the composed map between the residual streams).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import dir_tensors

from growcli.core.errors import UsageError
from growcli.io.atomic import transaction
from growcli.run.runner import Output, Source, Step, execution_mode, grow
from growcli.run.steps import VerifySettings
from growcli.run.stream_chain import stream_chain
from growcli.transforms.catalog import build_spec

SHARD = "10KB"  # the inputs have several shards


def _model(arch: str):
    import transformers as T

    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64,
                                                max_position_embeddings=64, num_key_value_heads=2))
    if arch == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64,
                                                max_position_embeddings=64, num_key_value_heads=2))
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))


DTYPES = {"llama": torch.float32, "gpt2": torch.bfloat16, "qwen2": torch.float32}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(len(made) + 7)
            path = tmp_path_factory.mktemp(arch) / "model"
            _model(arch).eval().to(DTYPES[arch]).save_pretrained(str(path), max_shard_size=SHARD)
            assert len(list(path.glob("*.safetensors"))) >= 3
            made[arch] = path
        return made[arch]

    return get


HIDDEN_THEN_STACK = [Step("hidden", {"factor": 2.0}), Step("stack", {"factor": 2, "init": "identity"})]
# (arch, steps, the largest max abs difference allowed in float64 — 0: the in-memory chain is exactly 0 too)
CASES = {
    "llama-hidden-stack": ("llama", HIDDEN_THEN_STACK, 1e-10),
    "llama-widen-deepen": ("llama", [Step("widen", {"layer": "model.layers.*.mlp.up_proj", "factor": 2.0}),
                                     Step("deepen", {"after": "model.layers.0", "block": True})], 0.0),
    "llama-heads-hidden": ("llama", [Step("heads", {"to": 8}), Step("hidden", {"factor": 2.0})], 1e-10),
    # bf16; the widened c_proj of the new copies is computed from the zeros the stack step planned
    "gpt2-bf16-stack-widen": ("gpt2", [Step("stack", {"factor": 2, "init": "identity"}),
                                       Step("widen", {"layer": "transformer.h.*.mlp.c_fc", "to": 200, "init": "zero"})],
                              1e-10),
}


def _run(src: Path, out: Path, steps: list[Step], streaming: bool | None, **kwargs) -> dict:
    return grow(Source(src), steps, [Output(out, shard_size=20_000)], settings=VerifySettings(batches=1),
                streaming=streaming, **kwargs)


def _same_checkpoint(a: Path, b: Path, dtype: torch.dtype) -> None:
    ta, tb = dir_tensors(a), dir_tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype == dtype, name
        assert torch.equal(ta[name], tb[name]), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_chain_equals_the_in_memory_plan(case, checkpoint, tmp_path):
    arch, steps, bound = CASES[case]
    src = checkpoint(arch)
    memory = _run(src, tmp_path / "memory", steps, False)
    stream = _run(src, tmp_path / "stream", steps, True)
    assert (memory["execution"], stream["execution"]) == ("memory", "streaming")
    _same_checkpoint(tmp_path / "memory", tmp_path / "stream", DTYPES[arch])
    assert len(list((tmp_path / "stream").glob("*.safetensors"))) > 1
    # The report lists every step, like the in-memory one, and one verification of the whole chain.
    assert [s["transform"] for s in stream["steps"]] == [s.transform for s in steps]
    assert set(memory) == set(stream)
    for m, s in zip(memory["steps"], stream["steps"]):
        assert set(m) == set(s) and m["exact"] == s["exact"] and m["exact_in_dtype"] == s["exact_in_dtype"]
        assert m["matched"] == s["matched"] and sorted(m["notes"]) == sorted(s["notes"])
        assert s["verification"] is None  # the steps are composed, not run one by one
    for key in ("function_preserving", "params_before", "params_after"):
        assert memory[key] == stream[key], key
    assert stream["function_preserving"] is True and stream["params_after"] > stream["params_before"]
    assert stream["verification"]["passed"] and memory["verification"]["passed"]
    assert stream["verification"]["max_abs_diff"] == memory["verification"]["max_abs_diff"] <= bound
    assert stream["outputs"][0]["loaded_with"].endswith(".from_pretrained")
    checked = stream["checked"]
    assert [line.split(":")[0] for line in checked[:len(steps)]] == [f"step {i} ({s.transform})"
                                                                       for i, s in enumerate(steps, 1)]
    assert all("all" in line and "written ones match in name and shape" in line for line in checked[:len(steps)])
    assert checked[-1].startswith("ran both models from disk: equal in float64")
    if case == "llama-hidden-stack":  # the same as streaming the steps one at a time, through a checkpoint between
        first = _run(src, tmp_path / "one", steps[:1], True)
        second = _run(tmp_path / "one", tmp_path / "two", steps[1:], True)
        assert first["execution"] == second["execution"] == "streaming"
        _same_checkpoint(tmp_path / "stream", tmp_path / "two", DTYPES[arch])
        assert checked[-2] == ("composed: 39 tensors written, 39 tensors: 0 byte copies of input tensors, 4 zeros, "
                               "35 computed")


def _stream(src: Path, out: Path, steps: list[Step], verify_limit: int):
    with transaction():
        return stream_chain(src, out, [(s.transform, build_spec(s.transform, dict(s.options))) for s in steps],
                            shard_size=20_000, settings=VerifySettings(batches=1), verify_limit=verify_limit)


def test_large_outputs_are_verified_block_by_block_through_the_composed_map(checkpoint, tmp_path):
    """Hidden 32 → 48 (padded) → 96 (tiled) then a block copy: the hidden map is the tilings composed,
    [0..31, pad×16] twice — not growcli's tiling of 32 into 96 — and the depth map [0, 1, 2, 2]."""
    steps = [Step("hidden", {"to": 48, "heads": 6}), Step("hidden", {"factor": 2.0}),
             Step("deepen", {"after": "model.layers.1", "block": True})]
    run = _stream(checkpoint("qwen2"), tmp_path / "out", steps, verify_limit=0)
    assert run.output["loaded_with"].startswith("growcli.verification.blockwise")
    assert run.verification.passed and run.verification.max_abs_diff <= 1e-6  # float32 padding: γ·√(d/d') rounded
    assert any("block by block" in c for c in run.checked)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (96, 3, 12)


def _plan(tmp_path: Path, steps: str) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(f"version: 1\nseed: 0\nsteps:\n{steps}verify:\n  batches: 1\n")
    return path


def test_cli_streams_a_plan_with_shard_size(checkpoint, cli, tmp_path):
    """stack then deepen --block: every output tensor a byte copy of an input tensor or zeros (the stack writer)."""
    plan = _plan(tmp_path, "  - stack: {factor: 2, init: identity}\n  - deepen: {after: model.layers.0, block: true}\n")
    r = cli("grow", checkpoint("llama"), "--plan", plan, "--streaming", "--shard-size", "30kB", "-o",
            f"{tmp_path / 'out'}/")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert [line.split(" ")[2] for line in lines if line.startswith("step ")] == ["stack", "deepen"]
    assert lines[0].endswith("— exact; not run against the input; params 24,992 → 43,552")  # composed, not run alone
    assert "verification (float64, 1 batches): PASSED, max abs diff 0" in lines
    assert "checked: composed: 48 tensors written, 48 tensors: 42 byte copies of input tensors, 6 zeros, 0 computed" \
        in lines
    assert any(line.startswith("checked: ran both models from disk: equal") for line in lines)
    assert any(line.startswith("execution (streaming):") for line in lines)
    report = json.loads((tmp_path / "out" / "growth_report.json").read_text())
    assert report["execution"] == "streaming" and [s["transform"] for s in report["steps"]] == ["stack", "deepen"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5
    assert report["plan"] == plan.read_text() and report["outputs"][0]["shards"] > 1
    assert max(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")) <= 30_000 + 4096


def test_a_chain_that_cannot_stream_is_refused_when_forced_and_runs_in_memory_otherwise(checkpoint, cli, tmp_path,
                                                                                      monkeypatch):
    src = checkpoint("llama")
    layer = _plan(tmp_path, "  - stack: {factor: 2, init: identity}\n  - deepen: {after: model.layers.0.mlp.up_proj}\n")
    r = cli("grow", src, "--plan", layer, "--streaming", "-o", f"{tmp_path / 'forced'}/")
    assert r.code == 2
    assert r.err.strip().endswith("--streaming: deepen cannot run streaming with these options (deepen streams only "
                                  "block copies: block: true) in step 2 of 2; drop --streaming")
    assert not (tmp_path / "forced").exists()
    with pytest.raises(UsageError, match=r"^--streaming: branch cannot run streaming \(its execution modes: memory\) "
                                         r"in step 2 of 2; drop --streaming$"):
        execution_mode(Source(src), [Step("stack", {}), Step("branch", {})], [Output(tmp_path / "o")], True)
    with pytest.raises(UsageError, match=r"^--streaming: step 1 \(upcycle\) streams only as a single step, not in a "
                                         r"chain of 2 \(chains stream stack, deepen, hidden, heads, widen\)"):
        execution_mode(Source(src), [Step("upcycle", {}), Step("stack", {})], [Output(tmp_path / "o")], True)
    # Unforced, with every checkpoint 'large': a streamable chain streams, the others run in memory.
    import growcli.run.runner as runner

    real = runner.choose_streaming
    monkeypatch.setattr(runner, "choose_streaming", lambda *a, **k: real(*a, **{**k, "threshold": 0}))
    out = [Output(tmp_path / "o")]
    for steps in ([Step("stack", {}), Step("deepen", {"after": "model.layers.0.mlp.up_proj"})],
                  [Step("stack", {}), Step("vocab", {"tokens": 4})], [Step("upcycle", {}), Step("stack", {})]):
        assert execution_mode(Source(src), steps, out, None) == "memory"
    assert execution_mode(Source(src), HIDDEN_THEN_STACK, out, None) == "streaming"


def test_a_step_that_fails_while_planning_is_located_in_the_plan(checkpoint, cli, tmp_path):
    plan = _plan(tmp_path, "  - hidden: {factor: 2}\n  - stack: {blocks: model.nope}\n")
    r = cli("grow", checkpoint("llama"), "--plan", plan, "--streaming", "-o", f"{tmp_path / 'out'}/")
    assert r.code == 1, r.err  # as in memory: a module the plan names is not there
    assert r.err == f"growcli: no match: {plan}:5:5: step 2 (stack): --blocks 'model.nope': no such module; stacks " \
        "found: model.layers\n"
    assert not (tmp_path / "out").exists()


def test_a_broken_composition_is_caught_and_nothing_is_left_behind(checkpoint, cli, tmp_path, monkeypatch):
    """The composition made to copy the new copies' writers instead of zeroing them: exit 3, no output, no scratch."""
    import growcli.run.stream_chain as stream_chain_module
    from growcli.run.stream_source import from_out
    from growcli.io.shards import OutTensor

    monkeypatch.setattr(stream_chain_module, "from_out", lambda t: from_out(OutTensor(t.name, t.ref, False)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    plan = _plan(tmp_path, "  - hidden: {factor: 2}\n  - stack: {factor: 2, init: identity}\n")
    r = cli("grow", checkpoint("llama"), "--plan", plan, "--streaming", "-o", f"{tmp_path / 'out'}/")
    assert r.code == 3
    assert "the chain (hidden → stack) changed the function" in r.err
    assert not (tmp_path / "out").exists()
    assert list(scratch.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml", "scratch"]
