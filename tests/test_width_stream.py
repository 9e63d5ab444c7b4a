"""Streaming ``hidden``, ``heads`` and FFN ``widen``: the checkpoint widened tensor by tensor equals the in-memory output.

Tiny real Hugging Face checkpoints (Llama with grouped-query attention, tied and untied; Qwen2;
GPT-2 with its tied embedding), random weights, ``save_pretrained`` in float32 and bf16 with a
small ``max_shard_size`` so that each has several shards. Every case runs once in memory and once
streaming: the written tensors must be equal (``torch.equal``, same names and dtypes), config.json
must be the same, and the streamed output must have been run against the input from disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import dir_tensors

from growcli.core.errors import NotGrowableError, UsageError
from growcli.run.runner import Output, Source, Step, grow
from growcli.run.steps import VerifySettings
from growcli.run.streaming import BLOCKWISE
from growcli.run.width_stream import stream_width
from growcli.transforms.catalog import build_spec

SHARD = "10KB"  # the inputs have several shards


def _model(arch: str):
    import transformers as T

    if arch.startswith("llama"):
        config = T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, num_key_value_heads=2,
                               tie_word_embeddings=arch == "llama-tied")
        return T.LlamaForCausalLM(config)
    if arch == "qwen2":
        config = T.Qwen2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, num_key_value_heads=2)
        return T.Qwen2ForCausalLM(config)
    config = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(config)


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


# (arch, dtype, transform, options): integer factors and non-multiples, GQA heads, tied embeddings
# kept tied or untied, paired noise (drawn from the seeded generator in the in-memory order).
CASES = [  # the last entry: the largest max abs difference allowed when both models run in float64
    ("llama", "float32", "hidden", {"factor": 2.0}, 1e-10),
    ("llama-tied", "bfloat16", "hidden", {"to": 40}, 1e-3),  # RMSNorm padding: γ·√(d/d') rounded to bf16
    ("gpt2", "bfloat16", "hidden", {"factor": 2.0, "noise": 0.1}, 1e-2),  # bf16 noise: exact in float64 only
    ("gpt2", "float32", "hidden", {"to": 40}, 1e-6),  # LayerNorm padding: γ·√(k·d/d') rounded to float32
    # exact weights; Qwen2's RMSNorm sums squares in float32 even in a float64 run (3 tiles: other order)
    ("qwen2", "bfloat16", "hidden", {"factor": 3.0, "heads": 12}, 1e-7),
    ("llama", "bfloat16", "heads", {"to": 8}, 1e-10),
    ("qwen2", "float32", "hidden", {"to": 48, "heads": 6}, 1e-6),  # GQA heads 4 → 6 with a non-multiple
    # FFN widen: gated MLP (gate and up coupled), zero init's random incoming weights, Net2Net noise (not exact)
    ("llama", "float32", "widen", {"layer": "model.layers.*.mlp.up_proj", "factor": 2.0}, 1e-10),
    ("gpt2", "bfloat16", "widen", {"layer": "transformer.h.*.mlp.c_fc", "to": 200, "init": "zero"}, 1e-10),
    ("qwen2", "bfloat16", "widen", {"layer": "model.layers.*.mlp.gate_proj", "by": 10, "noise": 0.1}, 1e-1),
]


def _id(case) -> str:
    arch, dtype, transform, options, _ = case
    return f"{arch}-{dtype}-{transform}-" + "-".join(f"{k}{v}" for k, v in options.items())


def _run(src: Path, out: Path, transform: str, options: dict, streaming: bool, seed: int = 0) -> dict:
    return grow(Source(src), [Step(transform, options)], [Output(out, shard_size=20_000)], seed=seed,
                settings=VerifySettings(batches=2), streaming=streaming)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_streaming_equals_in_memory_tensor_for_tensor(case, checkpoint, tmp_path):
    arch, dtype, transform, options, bound = case
    src = checkpoint(arch, dtype)
    memory = _run(src, tmp_path / "memory", transform, options, False)
    stream = _run(src, tmp_path / "stream", transform, options, True)
    assert (memory["execution"], stream["execution"]) == ("memory", "streaming")
    a, b = dir_tensors(tmp_path / "memory"), dir_tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == getattr(torch, dtype), name
        assert torch.equal(a[name], b[name]), name
    assert json.loads((tmp_path / "memory" / "config.json").read_text()) == \
        json.loads((tmp_path / "stream" / "config.json").read_text())
    assert len(list((tmp_path / "stream").glob("*.safetensors"))) > 1
    assert (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    for key in ("function_preserving", "params_before", "params_after"):
        assert memory[key] == stream[key], key
    assert stream["params_after"] > stream["params_before"]
    assert stream["function_preserving"] is (options.get("noise", 0) == 0 or transform == "hidden")
    assert set(memory) == set(stream) and set(memory["steps"][0]) == set(stream["steps"][0])
    # The streamed output was loaded back from disk and run against the input, also from disk.
    out = stream["outputs"][0]
    assert out["loaded_with"].startswith("transformers.") and out["loaded_with"].endswith(".from_pretrained")
    assert stream["verification"]["passed"] is memory["verification"]["passed"]
    assert stream["verification"]["max_abs_diff"] == memory["verification"]["max_abs_diff"]
    assert stream["steps"][0]["exact_in_dtype"] == memory["steps"][0]["exact_in_dtype"]
    assert stream["verification"]["max_abs_diff"] <= bound
    assert any(line.startswith("ran both models from disk:") for line in stream["checked"])


def test_tied_embedding_is_untied_and_written_when_the_maps_differ(checkpoint, tmp_path):
    _run(checkpoint("gpt2", "bfloat16"), tmp_path / "out", "hidden", {"factor": 2.0}, True)
    tensors = dir_tensors(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["n_embd"] == 64
    wte, head = tensors["transformer.wte.weight"], tensors["lm_head.weight"]
    assert wte.shape == head.shape == (100, 64)
    # The embedding keeps its tiles; the output projection's two tiles sum to the original, exactly in bf16.
    assert torch.equal(wte[:, :32], wte[:, 32:])
    assert torch.equal((head[:, :32].double() + head[:, 32:].double()), wte[:, :32].double())


def test_random_choices_follow_the_seed(checkpoint, tmp_path):
    src = checkpoint("llama", "bfloat16")
    runs = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 5)):
        _run(src, tmp_path / label, "heads", {"to": 8}, True, seed=seed)
        runs[label] = dir_tensors(tmp_path / label)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not torch.equal(runs["a"][name], runs["c"][name])  # other source heads and shares


def test_large_outputs_are_verified_block_by_block(checkpoint, tmp_path):
    from growcli.io.atomic import transaction

    src = checkpoint("llama", "float32")
    with transaction():
        run = stream_width("hidden", src, tmp_path / "out", build_spec("hidden", {"to": 40}), shard_size=20_000,
                           settings=VerifySettings(batches=1), verify_limit=0)
    assert run.output["loaded_with"] == BLOCKWISE
    assert run.verification.passed and run.verification.max_abs_diff <= 1e-5
    blocks = run.output["blockwise"]
    assert blocks["passed"] is True and blocks["first_failing"] in (None, "")
    assert len(blocks["blocks"]) >= 3  # embeddings, the two blocks (and the head), each compared through the tiling


def test_cli_streaming_progress_and_shards(checkpoint, cli, tmp_path):
    r = cli("widen", checkpoint("qwen2", "bfloat16"), "--hidden", "2x", "--streaming", "--shard-size", "20KB",
            "--batches", "1", "-o", tmp_path / "out")
    assert r.code == 0, r.err
    assert "execution (streaming):" in r.out and "checked: ran both models from disk:" in r.out
    assert r.out.splitlines()[0].startswith("step 1: hidden ")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_size"] == 64


def test_cli_streaming_refuses_what_it_cannot_stream(checkpoint, cli, tmp_path):
    src = checkpoint("llama", "float32")
    r = cli("widen", src, "--hidden", "2x", "--streaming", "-o", tmp_path / "out.safetensors")
    assert r.code == 2
    assert r.err.strip() == ("growcli: usage: --streaming needs a Hugging Face directory of safetensors as input and "
                             "one output directory (-o DIR)")
    r = cli("widen", src, "--hidden", "2x", "--streaming", "-o", tmp_path / "a", "-o", tmp_path / "b")
    assert r.code == 2 and "one output directory (-o DIR)" in r.err
    r = cli("widen", src, "--heads", "8", "--shard-size", "lots", "--streaming", "-o", tmp_path / "o")
    assert r.code == 2 and "--shard-size 'lots'" in r.err
    assert list(tmp_path.iterdir()) == []


def test_streaming_needs_a_hugging_face_directory(tmp_path):
    with pytest.raises(UsageError, match="--streaming needs a Hugging Face directory"):
        grow(Source(tmp_path), [Step("hidden", {"factor": 2.0})], [Output(tmp_path / "out")], streaming=True)


def test_data_driven_widen_inits_are_refused_when_streaming(checkpoint, tmp_path):
    from growcli.io.atomic import transaction
    from growcli.run.width_stream import stream_widen

    spec = build_spec("widen", {"layer": "model.layers.*.mlp.up_proj", "by": 8, "init": "gradmax", "data": "c.pt"})
    with pytest.raises(NotGrowableError) as info, transaction():
        stream_widen(checkpoint("llama", "float32"), tmp_path / "out", spec, shard_size=20_000)
    assert str(info.value) == ("widen --init gradmax --streaming: the new units come from gradients on calibration "
                               "data, which needs the model in memory; use --no-streaming")
    assert list(tmp_path.iterdir()) == []


def test_a_model_no_config_describes_is_refused_before_writing(checkpoint, tmp_path):
    src = checkpoint("llama", "float32")
    with pytest.raises(UsageError) as info:
        grow(Source(src), [Step("widen", {"layer": "model.layers.0.mlp.up_proj", "to": 80})], [Output(tmp_path / "out")],
             streaming=True)
    assert str(info.value) == ("the grown model cannot be described by a Hugging Face config (its layers differ from "
                               "each other: model.layers.0.mlp.gate_proj.weight [80, 32] vs config [64, 32]); write "
                               ".safetensors (--no-streaming) and load it with growcli.load_grown")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch, transform, options", [
    ("gpt2", "hidden", {"to": 40}),  # mean padding (LayerNorm), slices along the vocabulary / free dims
    ("llama", "hidden", {"factor": 2.0}),  # split readers: sliced along their rows
    ("qwen2", "hidden", {"factor": 3.0, "heads": 12}),  # q/k/v rows copied (heads) and columns split (hidden)
    ("llama", "heads", {"to": 8}),
])
def test_tensors_rewritten_in_pieces_equal_the_whole(arch, transform, options, checkpoint, tmp_path, monkeypatch):
    """Large tensors are rewritten in slices along a dimension no map touches, or whose map only copies;
    here every tensor above 100 elements is, and the result must still be the in-memory path's, bit for bit."""
    import growcli.run.width_stream as width_stream

    src = checkpoint(arch, "bfloat16")
    _run(src, tmp_path / "memory", transform, options, False)
    sliced = []
    real = width_stream._slice_dim
    monkeypatch.setattr(width_stream, "CHUNK", 100)
    monkeypatch.setattr(width_stream, "_slice_dim", lambda job: sliced.append(real(job)) or sliced[-1])
    _run(src, tmp_path / "stream", transform, options, True)
    assert len([d for d in sliced if d is not None]) >= 4  # the rewrites really went in pieces
    a, b = dir_tensors(tmp_path / "memory"), dir_tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch, options", [
    ("llama", {"layer": "model.layers.*.mlp.up_proj", "factor": 2.0}),
    ("gpt2", {"layer": "transformer.h.*.mlp.c_fc", "to": 200, "init": "zero"}),  # random producers stay whole
])
def test_widen_tensors_rewritten_in_pieces_equal_the_whole(arch, options, checkpoint, tmp_path, monkeypatch):
    import growcli.run.width_stream as width_stream

    src = checkpoint(arch, "bfloat16")
    _run(src, tmp_path / "memory", "widen", options, False)
    sliced = []
    real = width_stream._slice_dim
    monkeypatch.setattr(width_stream, "CHUNK", 100)
    monkeypatch.setattr(width_stream, "_slice_dim", lambda job: sliced.append(real(job)) or sliced[-1])
    _run(src, tmp_path / "stream", "widen", options, True)
    assert len([d for d in sliced if d is not None]) >= 2
    a, b = dir_tensors(tmp_path / "memory"), dir_tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- the fast rewrite equals the float64 one
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.element_size()])


def _maps(old: int, new: int, rng) -> list:
    """Dimension maps of every kind a width step plans: copies, zero and mean padding, scales (powers of two
    and not), shifts of either zero sign, splits with equal and unequal shares."""
    from growcli.transforms.width_edit import DimMap

    idx = [i % old for i in range(new)]
    holes = [i if rng.random() < 0.7 else -1 for i in idx]
    counts = {i: idx.count(i) for i in idx}
    uneven = [rng.choice([1.0, 0.75, 0.6]) for _ in idx]
    return [DimMap(0, idx, [1.0] * new), DimMap(0, idx, [1.0] * new, split=True),  # tiles: writers, readers
            DimMap(0, idx, [1.0 / counts[i] for i in idx], split=True),  # net2net shares
            DimMap(0, idx, uneven, split=True), DimMap(0, holes, [1.0] * new, pad="zero"),
            DimMap(0, holes, [1.0] * new, pad="mean", shift=-0.0), DimMap(0, idx, [0.5] * new, shift=0.25),
            DimMap(0, idx, [1 / 3] * new), DimMap(0, holes, uneven, split=True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rewrite_by_position_class_equals_the_whole_float64_rewrite(dtype):
    """Copies in the dtype, float64 only where a position needs it: the same bits as computing every position
    in float64, on values that probe the edges: -0 (a float64 ``+ 0.0`` makes it +0), magnitudes whose
    doubling overflows, subnormals. Same scales reported and the same reason for rounding."""
    import dataclasses
    import random

    from growcli.transforms.width_edit import _rewrite_dim, _rewrite_dim_float64

    rng, info = random.Random(0), torch.finfo(dtype)
    gen = torch.Generator().manual_seed(0)
    for magnitude in (1.0, info.max / 1.5, info.tiny / 4):
        for old, new in ((5, 12), (4, 8), (6, 7)):
            t = (torch.randn(old, 3, generator=gen, dtype=torch.float64) * magnitude).clamp(-info.max, info.max)
            t = t.to(dtype)
            t[0, 0], t[1, 1] = -0.0, 0.0
            for m, x in [(m, x) for m0 in _maps(old, new, rng)
                         for m, x in ((m0, t), (dataclasses.replace(m0, dim=1), t.t().contiguous()))]:
                a, ma, why_a = _rewrite_dim(x, m, 0.0, torch.Generator())  # along rows, and columns (runs copied)
                b, mb, why_b = _rewrite_dim_float64(x, m, 0.0, torch.Generator())
                assert a.dtype == b.dtype == dtype and torch.equal(_bits(a), _bits(b)), (magnitude, m)
                assert (ma.scale, why_a) == (mb.scale, why_b), (magnitude, m)
    t = torch.tensor([-0.0, 1.0, 2.0], dtype=dtype)
    copied = _rewrite_dim(t, _maps(3, 6, rng)[0], 0.0, torch.Generator())[0]
    assert _bits(copied)[0] == 0 and _bits(copied)[3] == 0  # -0 copied as the float64 path writes it: +0
    t[1] = float("nan")
    _bits(t)[1] |= 1  # a NaN with a payload: the float64 path writes the canonical NaN, and so does this one
    tiles = _maps(3, 6, rng)[0]
    a, b = _rewrite_dim(t, tiles, 0.0, torch.Generator()), _rewrite_dim_float64(t, tiles, 0.0, torch.Generator())
    assert torch.equal(_bits(a[0]), _bits(b[0])) and a[2] == b[2] == "rounded"


def test_the_writer_gets_a_rewritten_tensor_in_runs_of_its_bytes(checkpoint, monkeypatch):
    """A tensor sliced along its leading dimension reaches the writer slice by slice (no whole copy
    assembled); the runs, end to end, are the bytes of the whole rewritten tensor."""
    import growcli.run.width_stream as width_stream
    from growcli.io.shards import read_tensors
    from growcli.run.stream_names import checkpoint_names

    src = checkpoint("llama", "bfloat16")
    gm, _, jobs, siblings, _ = width_stream.plan_width(src, "hidden", build_spec("hidden", {"factor": 2.0}), 0)
    entries = width_stream.plan_entries(read_tensors(src), checkpoint_names(gm.module), jobs, siblings,
                                        width_stream.saved_names(gm), lambda *a: None)
    monkeypatch.setattr(width_stream, "CHUNK", 100)
    runs = 0
    for e in entries:
        piece = e.pieces[0]
        if not callable(piece):
            continue
        parts = list(piece.parts())
        runs = max(runs, len(parts))
        joined = b"".join(p.contiguous().view(torch.uint8).numpy().tobytes() for p in parts)
        assert joined == piece().contiguous().view(torch.uint8).numpy().tobytes(), e.name
    assert runs >= 10


def test_a_tensor_is_read_once_into_its_storage_and_a_short_shard_is_an_error(tmp_path):
    from growcli.core.errors import FormatError
    from growcli.io.shards import TensorRef
    from growcli.run.width_stream import read_tensor

    data = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    path = tmp_path / "raw.bin"
    path.write_bytes(b"x" * 8 + data.view(torch.uint8).numpy().tobytes())
    assert torch.equal(read_tensor(TensorRef(path, "BF16", (3, 4), 8, 24)), data)
    with pytest.raises(FormatError, match="ended early reading 32 bytes at 8"):
        read_tensor(TensorRef(path, "BF16", (4, 4), 8, 32))
