"""Streaming is an execution mode of the one runner: same report schema, same tensors, real verification.

Tiny real Hugging Face checkpoints (Llama and GPT-2: 2 layers, hidden 32, random weights,
``save_pretrained``) are stacked ×2 with ``--init identity`` once streaming and once in memory
(module-scoped). The reports must have the same keys at the top level and per step, the
written tensors must be identical, and the streaming verification must really have run the
input and the written checkpoint read back from disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import dir_tensors

from growcli.core.errors import UsageError, VerificationFailed
from growcli.run.runner import Output, Source, Step, grow
from growcli.run.steps import VerifySettings

ARCHS = ("llama", "gpt2")


def _model(arch: str):
    import transformers as T

    if arch == "llama":
        config = T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, num_key_value_heads=2)
        return T.LlamaForCausalLM(config)
    config = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(ARCHS.index(arch))
            made[arch] = tmp_path_factory.mktemp(arch) / "model"
            _model(arch).eval().save_pretrained(str(made[arch]))
        return made[arch]

    return get


@pytest.fixture(scope="module")
def stacked(checkpoint, tmp_path_factory):
    """(arch, mode) → (output directory, report) of ``stack --init identity``."""
    done: dict[tuple[str, str], tuple[Path, dict]] = {}

    def get(arch: str, mode: str) -> tuple[Path, dict]:
        if (arch, mode) not in done:
            out = tmp_path_factory.mktemp(f"{arch}-{mode}") / "out"
            report = grow(Source(checkpoint(arch)), [Step("stack", {"init": "identity"})], [Output(out, shard_size=50_000)],
                          settings=VerifySettings(batches=2), streaming=(mode == "streaming"))
            done[(arch, mode)] = (out, report)
        return done[(arch, mode)]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_same_report_schema_in_both_modes(arch, stacked):
    _, memory = stacked(arch, "memory")
    _, stream = stacked(arch, "streaming")
    assert set(memory) == set(stream)
    assert {"input", "steps", "function_preserving", "verification", "params_before", "params_after",
            "outputs", "execution"} <= set(stream)
    assert (memory["execution"], stream["execution"]) == ("memory", "streaming")
    assert [set(s) for s in memory["steps"]] == [set(s) for s in stream["steps"]]
    assert set(memory["verification"]) == set(stream["verification"])
    for key in ("function_preserving", "params_before", "params_after"):
        assert memory[key] == stream[key], key
    assert memory["function_preserving"] is True and stream["params_after"] > stream["params_before"]
    m, s = memory["steps"][0], stream["steps"][0]
    assert (m["transform"], m["matched"], m["changes"], m["exact"]) == (s["transform"], s["matched"], s["changes"], s["exact"])
    assert m["params_before"] == s["params_before"] and m["params_after"] == s["params_after"]


@pytest.mark.parametrize("arch", ARCHS)
def test_identical_tensors_in_both_modes(arch, stacked):
    mem_dir, _ = stacked(arch, "memory")
    stream_dir, report = stacked(arch, "streaming")
    a, b = dir_tensors(mem_dir), dir_tensors(stream_dir)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert report["outputs"][0]["shards"] > 1  # 50 kB shards: the index is exercised too
    index = json.loads((stream_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    written = json.loads((stream_dir / "growth_report.json").read_text())
    assert written["execution"] == "streaming" and set(written) == set(report)


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_verification_ran_both_models(arch, stacked, checkpoint):
    out, report = stacked(arch, "streaming")
    v = report["verification"]
    assert v["passed"] and v["batches"] == 2 and v["dtype"] == "float64"
    assert v["outputs"] and all(o["shape"] and o["scale"] > 0 for o in v["outputs"])  # real outputs were compared
    assert isinstance(v["max_abs_diff"], float) and v["max_abs_diff"] <= max(o["tolerance"] for o in v["outputs"])
    assert v["against"] == f"readback of {out}"
    entry = report["outputs"][0]
    assert entry["loaded_with"].endswith(".from_pretrained")
    assert entry["max_abs_diff"] == v["max_abs_diff"] and entry["readback"]["outputs"] == v["outputs"]
    assert report["steps"][0]["verification"]["outputs"] == v["outputs"]
    assert any(c.startswith("ran both models from disk: equal") for c in report["checked"])


def test_streaming_catches_a_written_checkpoint_that_differs(checkpoint, tmp_path, monkeypatch):
    """The shard writer (growcli's own) made to forget the zeroing: the read-back sees the change, exit 3, nothing left."""
    import growcli.run.streaming as streaming

    real = streaming.write_shard

    def unzeroed(path, tensors, advance):
        real(path, [type(t)(t.name, t.ref, False) for t in tensors], advance)

    monkeypatch.setattr(streaming, "write_shard", unzeroed)
    with pytest.raises(VerificationFailed, match="changed the function") as info:
        grow(Source(checkpoint("llama")), [Step("stack", {"init": "identity"})], [Output(tmp_path / "out")],
             settings=VerifySettings(batches=1), streaming=True)
    assert info.value.report.max_abs_diff > 1e-3
    assert list(tmp_path.iterdir()) == []


def test_streaming_widen_is_refused(checkpoint, tmp_path):
    with pytest.raises(UsageError) as info:
        grow(Source(checkpoint("llama")), [Step("branch", {"layer": "model.layers.0.mlp.up_proj", "merge": "add"})],
             [Output(tmp_path / "out")], streaming=True)
    assert str(info.value) == ("--streaming: branch cannot run streaming (its execution modes: memory); "
                               "drop --streaming")
    assert list(tmp_path.iterdir()) == []


def test_streaming_nothing_is_refused(checkpoint, tmp_path):
    # chains stream since issue 13 (tests/test_stream_chain.py); no step at all is still refused
    with pytest.raises(UsageError, match="runs one step or a chain of steps; this run has 0"):
        grow(Source(checkpoint("llama")), [], [Output(tmp_path / "out")], streaming=True)


def _summary(out: str) -> list[str]:
    """The lines of the common summary (render_grow_report), without paths."""
    return [line.split(" /")[0] for line in out.splitlines() if line.startswith(("step 1:", "verification", "wrote"))]


def test_cli_uses_the_common_summary_in_both_modes(checkpoint, cli, tmp_path):
    src = checkpoint("gpt2")
    runs = {}
    for flag in ("--streaming", "--no-streaming"):
        r = cli("stack", src, "--init", "identity", flag, "--batches", "1", "-o", tmp_path / flag.strip("-"))
        assert r.code == 0, r.err
        runs[flag] = r.out
    stream, memory = _summary(runs["--streaming"]), _summary(runs["--no-streaming"])
    assert stream == memory and len(stream) == 3
    assert stream[0].startswith("step 1: stack transformer.h — exact; max abs diff 0; params ")
    assert stream[1] == "verification (float64, 1 batches): PASSED, max abs diff 0"
    assert "checked: ran both models from disk: equal" in runs["--streaming"] and "(streaming)" in runs["--streaming"]
    assert "checked:" not in runs["--no-streaming"]


def test_cli_shard_size_is_parsed_with_the_common_parser(checkpoint, cli, tmp_path):
    r = cli("stack", checkpoint("llama"), "--streaming", "--shard-size", "lots", "-o", tmp_path / "out")
    assert r.code == 2
    assert r.err.strip() == "growcli: usage: --shard-size 'lots': expected a size like 5GB, 500MB or 2GiB"
    assert list(tmp_path.iterdir()) == []
