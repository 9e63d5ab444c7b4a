"""Shared test helpers: fixture paths and an in-process CLI runner that sees what users see."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def dir_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``directory`` (a sharded checkpoint read whole)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Add seeded noise of ``scale`` to every parameter, so no norm weight, bias or scale stays at its init (1 + γ ≠ 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model


def tiny_albert(directory: Path, vocab: int = 96) -> Path:
    """A tiny float64 ALBERT (factorised embedding 16 → 32, one layer shared by 3 depths), perturbed and saved."""
    import transformers as T

    T.utils.logging.set_verbosity_error()
    config = T.AlbertConfig(vocab_size=vocab, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    perturb(T.AlbertForMaskedLM(config).to(torch.float64).eval()).save_pretrained(directory)
    return directory


def albert_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    """The masked-LM logits of the ALBERT saved in ``directory``, in float64."""
    import transformers as T

    model = T.AlbertForMaskedLM.from_pretrained(str(directory), dtype=torch.float64).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """No test reaches the Hugging Face Hub: a missing relative path shaped like org/name stays offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``growcli ARGS`` in-process through the real entry point; returns code, stdout, stderr."""
    from growcli.cli.app import main

    def run(*args: str | os.PathLike) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["growcli", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models: a second thread only adds spin-wait on a 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# The slowest cases (≥ 3 s each on the 2-core development machine, a few real-parts tests excepted), listed by node id in tests/slow_tests.txt, are
# marked ``slow`` and left out of the default run (pyproject's addopts); ``python -m pytest -m slow`` runs them,
# ``python -m pytest -m ""`` runs everything. Cases can also carry ``@pytest.mark.slow`` themselves.
_SLOW = {line.strip() for line in (Path(__file__).parent / "slow_tests.txt").read_text().splitlines()
         if line.strip() and not line.startswith("#")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in _SLOW:
            item.add_marker(pytest.mark.slow)


def as_grow_model(module, inputs):
    """A live module as a GrowModel whose inputs are ``inputs`` (a dict of keyword inputs: a Hugging Face model)."""
    from growcli.core.inputs import spec_from_batch
    from growcli.core.model import GrowModel
    if isinstance(inputs, dict):
        return GrowModel(module, "hf", Path("mem"), "0", spec_from_batch(((), inputs)), hf_class=type(module).__name__)
    return GrowModel(module, "state_dict", Path("mem"), "0", spec_from_batch((inputs, {})))


def relative_diff(before, after, inputs) -> float:
    """max |a − b| / max |a| over every output of the two modules, computed on ``inputs``."""
    from growcli.verification.compare import flatten_outputs
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    with torch.no_grad():
        a, b = flatten_outputs(before(*args, **kwargs)), flatten_outputs(after(*args, **kwargs))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)
