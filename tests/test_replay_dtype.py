"""load_grown rebuilds the modules a step inserted in the saved weights' dtype, not torch's default.

Each case grows a float64 or bfloat16 model in memory, saves it, replays the file onto a fresh
copy of the original and asserts that every parameter and buffer has the dtype the file holds and
that the outputs equal the in-memory grown model's bit for bit (torch.equal).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import growcli
from growcli import zoo
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.core.replay import replay
from growcli.io.formats import read_safetensors
from growcli.nn import Columns
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context


class PreNorm(nn.Module):
    """``x + mlp(ln(x))``: one pre-norm residual block."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, d))

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class TwoBlocks(nn.Module):
    """A tiny residual stream: two pre-norm blocks and a head."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([PreNorm(d) for _ in range(2)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def example_inputs(self):
        return (torch.randn(2, 8),)


# id, factory, transform, options
CASES = [
    ("deepen-linear", zoo.MLP, "deepen", {"after": "fc1"}),
    ("deepen-morph", zoo.MLP, "deepen", {"after": "fc2", "init": "morph"}),
    ("deepen-conv-bn", zoo.SmallCNN, "deepen", {"after": "conv1", "bn": True}),
    ("deepen-block", TwoBlocks, "deepen", {"after": "blocks.0", "block": True}),
    ("branch", zoo.MLP, "branch", {"layer": "fc2", "merge": "add"}),
    ("mask", zoo.MLP, "mask", {"layer": "fc2"}),
    ("column", zoo.MLP, "column", {}),
]
DTYPES = [torch.float64, torch.bfloat16]


def _grown(tmp: Path, factory, dtype: torch.dtype, transform: str, options: dict) -> tuple[nn.Module, GrowModel]:
    """The original in ``dtype`` (also pickled to ``tmp``, which the saved file is read back against) and its grown copy."""
    torch.manual_seed(0)
    model = factory().to(dtype).eval()
    torch.save(model, tmp / "original.pt")
    gm = growcli.load_model(tmp / "original.pt", trust_pickle=True)
    gm.inputs = spec_from_batch((tuple(t.to(dtype) for t in model.example_inputs()), {}))
    run_step(gm, transform, options, Context(seed=0), VerifySettings(batches=1))
    return model, gm


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        if isinstance(model, Columns):
            return [model(x, task=k) for k in range(model.tasks)]
        return [model(x)]


def _assert_saved_dtypes(grown: nn.Module, path: Path) -> None:
    saved = read_safetensors(path)
    own = grown.state_dict()
    assert sorted(own) == sorted(saved)
    wrong = {k: (own[k].dtype, saved[k].dtype) for k in saved if own[k].dtype != saved[k].dtype}
    assert wrong == {}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,factory,transform,options", CASES, ids=[c[0] for c in CASES])
def test_load_grown_keeps_the_saved_dtype(tmp_path, dtype, case, factory, transform, options):
    original, gm = _grown(tmp_path, factory, dtype, transform, options)
    out = tmp_path / "grown.safetensors"
    growcli.save_model(gm, out)
    assert {t.dtype for t in read_safetensors(out).values() if t.is_floating_point()} == {dtype}
    grown = growcli.load_grown(copy.deepcopy(original), out)
    _assert_saved_dtypes(grown, out)
    torch.manual_seed(5)
    x = original.example_inputs()[0].to(dtype)
    want, got = _outputs(gm.module.eval(), x), _outputs(grown, x)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pt2_program_deepen_after_keeps_the_saved_dtype(tmp_path, dtype):
    """A torch.export program: the inserted layer is called on a graph node and rebuilt in the file's dtype."""
    torch.manual_seed(0)
    model = zoo.MLP().to(dtype).eval()
    x = torch.randn(3, 16, dtype=dtype)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "mlp.pt2")
    gm = growcli.load_model(tmp_path / "mlp.pt2")
    assert {p.dtype for p in gm.module.parameters()} == {dtype}
    run_step(gm, "deepen", {"after": "fc1"}, Context(seed=0), VerifySettings(batches=1))
    out = tmp_path / "grown.safetensors"
    growcli.save_model(gm, out)
    grown = growcli.load_grown(growcli.load_model(tmp_path / "mlp.pt2").module, out)
    _assert_saved_dtypes(grown, out)
    with torch.no_grad():
        assert torch.equal(grown(x), gm.module(x))


def test_replay_without_weights_builds_new_modules_like_their_neighbours():
    """Replaying a growth history alone (no file): new layers take the dtype of the layer they follow."""
    torch.manual_seed(0)
    model = zoo.MLP().double().eval()
    gm = GrowModel(copy.deepcopy(model), "state_dict", Path("mem"), "0",
                   spec_from_batch(((torch.randn(2, 16, dtype=torch.float64),), {})))
    run_step(gm, "deepen", {"after": "fc1", "init": "morph", "bn": True}, Context(seed=0), VerifySettings(batches=1))
    fresh = replay(copy.deepcopy(model), list(gm.edits.records))
    own = fresh.state_dict()
    assert {k: v.dtype for k, v in own.items()} == {k: v.dtype for k, v in gm.module.state_dict().items()}
    assert {v.dtype for v in own.values() if v.is_floating_point()} == {torch.float64}


def test_a_new_tensor_takes_the_dtype_it_was_saved_in(tmp_path):
    """A float64 model whose inserted parametric activation was kept in float32: reloaded float32, not float64."""
    original, gm = _grown(tmp_path, zoo.MLP, torch.float64, "deepen", {"after": "fc2", "init": "morph"})
    act = gm.module.fc2[1]
    act.a = nn.Parameter(act.a.detach().float())  # its forward casts a to the input's dtype
    out = tmp_path / "grown.safetensors"
    growcli.save_model(gm, out)
    grown = growcli.load_grown(copy.deepcopy(original), out)
    _assert_saved_dtypes(grown, out)
    assert grown.fc2[1].a.dtype == torch.float32 and grown.fc2[2].weight.dtype == torch.float64
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(_outputs(grown, x)[0], _outputs(gm.module, x)[0])


@pytest.mark.parametrize("saved", DTYPES, ids=str)
def test_a_float32_model_given_another_dtype_stays_float32(tmp_path, saved):
    """The model holds the file's tensors in float32: the inserted layers follow it, so nothing mixes dtypes."""
    original, gm = _grown(tmp_path, zoo.MLP, saved, "deepen", {"after": "fc1", "init": "morph"})
    out = tmp_path / "grown.safetensors"
    growcli.save_model(gm, out)
    grown = growcli.load_grown(copy.deepcopy(original).float(), out)
    assert {k: v.dtype for k, v in grown.state_dict().items()} == {k: torch.float32 for k in read_safetensors(out)}
    x = torch.randn(3, 16)
    assert torch.equal(_outputs(grown, x)[0], _outputs(copy.deepcopy(gm.module).float(), x)[0])
