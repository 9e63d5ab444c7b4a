"""Streaming ``deepen --block``: a Hugging Face checkpoint gets block copies tensor by tensor, same as in memory.

Tiny real checkpoints with random weights, written by ``save_pretrained`` in several shards
(``max_shard_size``): Llama with grouped-query attention (3 layers, copies after blocks 0
and 2), Qwen2 with a per-layer ``layer_types`` list (sliding-window layers; a copy after
block 1) and GPT-2 (Conv1D, tied embeddings; a copy after block 0). Each is deepened once
streaming and once in memory (module-scoped); the written tensors, configs and step reports
must be identical, and the streamed output must have been run against the input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import dir_tensors

from growcli.core.errors import NotGrowableError, UsageError, VerificationFailed
from growcli.io.atomic import transaction
from growcli.run.runner import Output, Source, Step, grow
from growcli.run.steps import VerifySettings

# arch → (blocks to copy after, the block container)
CASES = {
    "llama": (["model.layers.0", "model.layers.2"], "model.layers"),
    "qwen2": (["model.layers.1"], "model.layers"),
    "gpt2": (["transformer.h.0"], "transformer.h"),
}
SHARD = 40_000  # bytes: every checkpoint here is written in several shards, read and written


def _model(arch: str):
    import transformers as T

    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                                num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                max_position_embeddings=64))
    if arch == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                                num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                max_position_embeddings=64, use_sliding_window=True,
                                                sliding_window=8, max_window_layers=1))
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(list(CASES).index(arch))
            made[arch] = tmp_path_factory.mktemp(arch) / "model"
            _model(arch).eval().save_pretrained(str(made[arch]), max_shard_size=SHARD)
        return made[arch]

    return get


@pytest.fixture(scope="module")
def deepened(checkpoint, tmp_path_factory):
    """(arch, mode) → (output directory, report, bytes reported by the progress callback)."""
    done: dict[tuple[str, str], tuple[Path, dict, list]] = {}

    def get(arch: str, mode: str) -> tuple[Path, dict, list]:
        if (arch, mode) not in done:
            out = tmp_path_factory.mktemp(f"{arch}-{mode}") / "out"
            seen: list[tuple[int, int]] = []
            report = grow(Source(checkpoint(arch)), [Step("deepen", {"after": CASES[arch][0], "block": True})],
                          [Output(out, shard_size=SHARD)], settings=VerifySettings(batches=2),
                          streaming=(mode == "streaming"), progress=lambda d, t: seen.append((d, t)))
            done[(arch, mode)] = (out, report, seen)
        return done[(arch, mode)]

    return get


@pytest.mark.parametrize("arch", CASES)
def test_identical_tensors_and_config_in_both_modes(arch, deepened, checkpoint):
    mem_dir, _, _ = deepened(arch, "memory")
    stream_dir, report, _ = deepened(arch, "streaming")
    a, b = dir_tensors(mem_dir), dir_tensors(stream_dir)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    assert len(list(checkpoint(arch).glob("*.safetensors"))) > 1  # the input is sharded
    assert report["outputs"][0]["shards"] > 1
    index = json.loads((stream_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    mem_cfg, stream_cfg = (json.loads((d / "config.json").read_text()) for d in (mem_dir, stream_dir))
    before = json.loads((checkpoint(arch) / "config.json").read_text())
    key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    assert stream_cfg[key] == before[key] + len(CASES[arch][0])
    for k in set(mem_cfg) | set(stream_cfg):
        if k != "transformers_version":
            assert mem_cfg.get(k) == stream_cfg.get(k), k


def test_per_layer_lists_follow_the_copies(deepened, checkpoint):
    """Qwen2's layer_types [full, sliding, sliding] with a copy after block 1 → [full, sliding, sliding, sliding]."""
    before = json.loads((checkpoint("qwen2") / "config.json").read_text())["layer_types"]
    after = json.loads((deepened("qwen2", "streaming")[0] / "config.json").read_text())["layer_types"]
    assert before == ["full_attention", "sliding_attention", "sliding_attention"]
    assert after == [before[0], before[1], before[1], before[2]]


def test_the_copies_are_the_blocks_with_zeroed_writers(deepened):
    """Llama, copies after blocks 0 and 2: new positions 1 and 4; o_proj and down_proj zero there, the rest equal."""
    out, _, _ = deepened("llama", "streaming")
    t = dir_tensors(out)
    layer = lambda i, s: t[f"model.layers.{i}.{s}"]  # noqa: E731
    assert sorted({int(k.split(".")[2]) for k in t if k.startswith("model.layers.")}) == [0, 1, 2, 3, 4]
    for copy, source in ((1, 0), (4, 3)):
        for suffix in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            assert torch.equal(layer(copy, suffix), layer(source, suffix)), (copy, suffix)
        for suffix in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            assert layer(copy, suffix).abs().max().item() == 0.0 and layer(source, suffix).abs().max().item() > 0
    assert tuple(layer(1, "self_attn.k_proj.weight").shape) == (16, 32)  # GQA: 2 kv heads of 8


@pytest.mark.parametrize("arch", CASES)
def test_same_report_and_verification_in_both_modes(arch, deepened):
    _, memory, _ = deepened(arch, "memory")
    out, stream, seen = deepened(arch, "streaming")
    assert (memory["execution"], stream["execution"]) == ("memory", "streaming")
    assert set(memory) == set(stream) and [set(s) for s in memory["steps"]] == [set(s) for s in stream["steps"]]
    m, s = memory["steps"][0], stream["steps"][0]
    for key in ("transform", "matched", "changes", "notes", "exact", "params_before", "params_after", "spec"):
        assert m[key] == s[key], key
    assert s["matched"] == CASES[arch][0] and s["exact"] is True and stream["function_preserving"] is True
    v = stream["verification"]
    assert v["passed"] and v["batches"] == 2 and v["dtype"] == "float64" and v["against"] == f"readback of {out}"
    assert v["outputs"] and all(o["scale"] > 0 for o in v["outputs"])
    assert v["max_abs_diff"] <= 1e-10
    assert any(c.startswith("ran both models from disk: equal") for c in stream["checked"])
    assert any(c.startswith("the new config rebuilds") for c in stream["checked"])
    total = stream["outputs"][0]["bytes"]
    assert seen[-1] == (total, total) and all(d <= total for d, _ in seen)
    assert stream["outputs"][0]["bytes"] == sum(f.stat().st_size - _header(f) for f in out.glob("*.safetensors"))


def _header(path: Path) -> int:
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def test_large_outputs_are_verified_block_by_block(checkpoint, tmp_path):
    """Above the read-back limit the copies are checked block by block through the layer map [0,0,1,1,2]."""
    from growcli.run.deepen_stream import stream_deepen
    from growcli.transforms.catalog import build_spec

    out = tmp_path / "out"
    spec = build_spec("deepen", {"after": ["model.layers.0", "model.layers.1"], "block": True})
    with transaction():
        run = stream_deepen(checkpoint("llama"), out, spec, shard_size=SHARD, settings=VerifySettings(batches=1),
                            verify_limit=0)
    assert run.output["loaded_with"].startswith("growcli.verification.blockwise")
    assert run.verification.passed and run.verification.max_abs_diff <= 1e-10
    assert any("block by block" in c for c in run.checked)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5


def test_a_writer_that_forgets_the_zeroing_is_caught(checkpoint, tmp_path, monkeypatch):
    """The shard writer made to copy the writers instead of zeroing them: exit-3 error, nothing left behind."""
    import growcli.run.deepen_stream as deepen_stream

    real = deepen_stream.write_shard
    monkeypatch.setattr(deepen_stream, "write_shard",
                        lambda path, tensors, advance: real(path, [type(t)(t.name, t.ref, False) for t in tensors],
                                                            advance))
    with pytest.raises(VerificationFailed, match=r"step 1 \(deepen\) changed the function") as info:
        grow(Source(checkpoint("llama")), [Step("deepen", {"after": "model.layers.1", "block": True})],
             [Output(tmp_path / "out")], settings=VerifySettings(batches=1), streaming=True)
    assert info.value.report.max_abs_diff > 1e-3
    assert list(tmp_path.iterdir()) == []


def test_streaming_a_layer_is_refused(checkpoint, tmp_path, cli):
    message = "--streaming: deepen streams only --block (copies of residual blocks); drop --streaming to insert layers"
    with pytest.raises(UsageError) as info:
        grow(Source(checkpoint("llama")), [Step("deepen", {"after": "model.layers.0.mlp.up_proj"})],
             [Output(tmp_path / "out")], streaming=True)
    assert str(info.value) == message
    r = cli("deepen", checkpoint("llama"), "--after", "model.layers.0.mlp.up_proj", "--streaming", "-o", tmp_path / "o")
    assert r.code == 2 and r.err.strip() == f"growcli: usage: {message}"
    assert list(tmp_path.iterdir()) == []


def test_post_ln_blocks_are_refused_streaming(tmp_path, cli):
    import transformers as T

    torch.manual_seed(0)
    src = tmp_path / "bert"
    T.BertModel(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64)).eval().save_pretrained(str(src))
    with pytest.raises(NotGrowableError, match=r"'encoder.layer.0' is a post-LN block"):
        grow(Source(src), [Step("deepen", {"after": "encoder.layer.0", "block": True})], [Output(tmp_path / "out")],
             streaming=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]


def test_cli_streams_with_progress_and_shard_size(checkpoint, cli, tmp_path):
    r = cli("deepen", checkpoint("gpt2"), "--block", "--after", "transformer.h.1", "--streaming", "--shard-size",
            "30kB", "--batches", "1", "-o", tmp_path / "out")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].startswith("step 1: deepen transformer.h.1 — exact; max abs diff 0; params ")
    assert "verification (float64, 1 batches): PASSED, max abs diff 0" in lines
    assert any(line.startswith("checked: ran both models from disk: equal") for line in lines)
    assert any(line.startswith("execution (streaming):") for line in lines)
    report = json.loads((tmp_path / "out" / "growth_report.json").read_text())
    assert report["execution"] == "streaming" and report["outputs"][0]["shards"] > 1
    assert max(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")) <= 30_000 + 4096
    bad = cli("deepen", checkpoint("gpt2"), "--block", "--after", "transformer.h.1", "--streaming", "--shard-size",
              "lots", "-o", tmp_path / "bad")
    assert bad.code == 2 and "--shard-size 'lots'" in bad.err and not (tmp_path / "bad").exists()


def test_large_checkpoints_stream_block_copies_automatically(checkpoint, cli, tmp_path, monkeypatch):
    """With the size threshold at 0 bytes every checkpoint is 'large': --block streams unasked, a layer stays in memory."""
    import growcli.run.runner as runner

    real = runner.choose_streaming
    monkeypatch.setattr(runner, "choose_streaming", lambda *a, **k: real(*a, **{**k, "threshold": 0}))
    r = cli("deepen", checkpoint("gpt2"), "--block", "--after", "transformer.h.0", "--batches", "1", "--json",
            "-o", tmp_path / "auto")
    assert r.code == 0, r.err
    assert json.loads(r.out)["execution"] == "streaming"
    r = cli("deepen", checkpoint("gpt2"), "--block", "--after", "transformer.h.0", "--no-streaming", "--batches", "1",
            "--json", "-o", tmp_path / "memory")
    assert r.code == 0, r.err
    assert json.loads(r.out)["execution"] == "memory"
    r = cli("deepen", checkpoint("llama"), "--after", "model.layers.0.mlp.up_proj", "--init", "morph", "--batches",
            "1", "--json", "-o", tmp_path / "layer.safetensors")
    assert r.code == 0, r.err
    assert json.loads(r.out)["execution"] == "memory"
