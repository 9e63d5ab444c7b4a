"""Block-wise verification runs large embeddings and linear layers from disk a slice at a time.

With the slice threshold (``growcli.verification.chunked.CHUNK_BYTES``) forced below the tiny
models' vocabulary matrices: the block-wise outputs equal the whole-loaded block-wise run and
``from_pretrained``'s own forward (float64, ≤ 1e-12), the embedding, LM-head (and, at this threshold, every
projection) weights are never loaded whole (only the rows of the tokens looked up are read), an untied and a tied head both take
the sliced path, a perturbed row of the head is caught at the outputs (exit 3), and a subclass
overriding ``forward`` is left whole. The CLI process gives freed heaps back (``growcli.core.memory``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from growcli.core.inputs import make_batches
from growcli.io.hf_dir import hf_input_spec
from growcli.io.load import load_model
from growcli.run.streaming import blockwise_check
from growcli.run.steps import VerifySettings
from growcli.verification import chunked
from growcli.verification.blockwise import _Run
from growcli.verification.compare import as_dtype, run_model
from growcli.verification.ondisk import OnDisk


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """tied → a saved tiny Llama (vocab 300, hidden 32: a 75 KB float64 embedding), tied or untied head."""
    import transformers as T

    made = {}
    for tied in (False, True):
        torch.manual_seed(int(tied))
        config = T.LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                               tie_word_embeddings=tied)
        model = T.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(0.3 * torch.randn_like(p))
        made[tied] = tmp_path_factory.mktemp(f"tied{int(tied)}") / "model"
        model.save_pretrained(str(made[tied]))
    return made


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 8 * 32 * 7)  # 7 float64 rows of 32 per slice: 43 slices of 300


def _loads(model: OnDisk, monkeypatch) -> list[str]:
    """Every key ``model`` loads whole from now on."""
    seen: list[str] = []
    load = model.load

    def spy(keys, dtype):
        keys = list(keys)
        seen.extend(keys)
        return load(keys, dtype)
    monkeypatch.setattr(model, "load", spy)
    return seen


@pytest.mark.parametrize("tied", [False, True])
def test_sliced_layers_give_the_models_own_outputs_and_are_never_loaded_whole(tied, llamas, small_slices,
                                                                            monkeypatch):
    src = llamas[tied]
    model = OnDisk(src)
    whole = as_dtype(load_model(src).module, torch.float64)
    loaded = _loads(model, monkeypatch)
    big = {k for k in model.slots if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    reads: list[tuple[int, int]] = []  # rows read of the vocabulary matrices
    read_rows = chunked.read_rows
    monkeypatch.setattr(chunked, "read_rows",
                        lambda m, k, a, b, d: (k in big and reads.append((a, b))) or read_rows(m, k, a, b, d))
    run = _Run(model, "model.layers", torch.float64, "the model")
    batches = make_batches(hf_input_spec(model.module), 2, seed=0)
    for batch in batches:
        outputs, _ = run(batch)
        expected = run_model(whole, batch)
        assert float((outputs["logits"] - expected["logits"]).abs().max()) <= 1e-12
    assert big and not big & set(loaded)  # read in slices only
    assert run.lazy and run.leafwise and not model.loaded
    assert all(p.device.type == "meta" for p in model.module.parameters())
    ids = [b[1]["input_ids"] if "input_ids" in b[1] else b[0][0] for b in batches]
    # the head: all 300 rows per pass in slices of 7; the embedding: the rows of the distinct tokens only
    assert sum(b - a for a, b in reads) == 300 * len(batches) + sum(len(torch.unique(i)) for i in ids)
    assert sum(1 for a, b in reads if b - a == 7) == 42 * len(batches)

def test_identical_copy_passes_at_zero_and_a_perturbed_head_row_fails(llamas, small_slices, tmp_path, cli):
    src = llamas[False]
    shutil.copytree(src, tmp_path / "same")
    report = blockwise_check(src, tmp_path / "same", VerifySettings(batches=2))
    assert report.passed and [b.max_abs_diff for b in report.blocks] == [0.0] * 3
    assert report.outputs[0].max_abs_diff == 0.0
    shutil.copytree(src, tmp_path / "bad")
    f = tmp_path / "bad" / "model.safetensors"
    tensors = load_file(str(f))
    tensors["lm_head.weight"][250] += 0.5  # one row in the 36th slice
    save_file(tensors, str(f), metadata={"format": "pt"})
    report = blockwise_check(src, tmp_path / "bad", VerifySettings(batches=2))
    assert not report.passed and report.first_failing is None  # every block boundary agrees; the logits do not
    assert report.outputs[0].max_abs_diff > 1e-3
    r = cli("verify", src, tmp_path / "bad", "--blockwise", "--batches", "2")
    assert r.code == 3


def test_a_subclass_that_overrides_forward_is_loaded_whole(llamas, small_slices, monkeypatch):
    model = OnDisk(llamas[False])

    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    embed = model.module.model.embed_tokens
    embed.__class__ = Scaled
    loaded = _loads(model, monkeypatch)
    run = _Run(model, "model.layers", torch.float64, "the model")
    run(make_batches(hf_input_spec(model.module), 1, seed=0)[0])
    assert "model.embed_tokens.weight" in loaded and "lm_head.weight" not in loaded
    assert chunked.chunkable(model, embed, ["model.embed_tokens.weight"], torch.float64) is None
    head = model.module.lm_head
    assert chunked.chunkable(model, head, ["lm_head.weight"], torch.float64) == "lm_head.weight"
    assert chunked.chunkable(model, head, ["lm_head.weight"], torch.float32) == "lm_head.weight"


def test_below_the_threshold_nothing_is_sliced(llamas):
    model = OnDisk(llamas[False])
    assert chunked.CHUNK_BYTES == 64 << 20
    assert chunked.chunkable(model, model.module.lm_head, ["lm_head.weight"], torch.float64) is None


def test_the_cli_heap_threshold_is_set_and_trim_runs():
    import subprocess
    import sys

    code = ("import ctypes, growcli.cli.app as a; a._bound_heap(); from growcli.core.memory import trim; trim(); "
            "print(a.HEAP_MMAP_BYTES)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(32 << 20) and not out.stderr
