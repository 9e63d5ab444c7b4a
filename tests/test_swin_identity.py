"""Identity-initialised copies of blocks whose residual branch moves values between the writer and the add.

A zeroed writer makes the branch exactly zero only if every op after it maps zeros to zeros: ``roll`` (Swin's
shifted windows), views, permutes, slices and pads that fill with zero or copy (reflect, replicate); a pad that
fills with a nonzero constant is refused naming it. Swin is a tiny float64 ``SwinModel`` with random (perturbed)
weights; each grown model is compared with the original on new inputs (≤ 1e-10), a written Hugging Face
directory after ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import growcli
from growcli.analysis.residual import ResidualRefusal, block_writers
from growcli.analysis.trace import trace_model
from growcli.core.errors import UsageError
from growcli.run.runner import Output, Source, Step, grow
from conftest import perturb

T = pytest.importorskip("transformers")
EXACT = 1e-10
STAGE = "encoder.layers.0.blocks"


class Moved(nn.Module):
    """``x + move(fc(x))``: the branch's output rolled or cropped and padded back before the add."""

    def __init__(self, move):
        super().__init__()
        self.fc, self.move = nn.Linear(8, 8), move

    def forward(self, x):
        return x + self.move(self.fc(x))


class Net(nn.Module):
    def __init__(self, move):
        super().__init__()
        self.blocks = nn.ModuleList([Moved(move), Moved(move)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


MOVES = {
    "roll": lambda h: torch.roll(h, shifts=(1, -2), dims=(1, 2)),
    "pad-zero": lambda h: F.pad(h[..., 1:7], (1, 1)),
    "pad-replicate": lambda h: F.pad(h[:, 1:, :], (0, 0, 1, 0), mode="replicate"),
    "window-reverse": lambda h: h.view(2, 3, 2, 4).permute(0, 2, 1, 3).contiguous().view(2, 3, 8),
}


def _writers(move):
    model = Net(move).double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    return model, x, block_writers(trace_model(model, ((x,), {})), model, "blocks.0")


@pytest.mark.parametrize("move", MOVES, ids=list(MOVES))
def test_zero_preserving_moves_after_the_writer(move):
    model, x, found = _writers(MOVES[move])
    assert found.writers == ("fc.bias", "fc.weight")
    with torch.no_grad():
        model.blocks[0].fc.weight.zero_()
        model.blocks[0].fc.bias.zero_()
        assert torch.equal(model.blocks[0](x), x)


def test_pad_with_a_nonzero_fill_is_refused_naming_it():
    with pytest.raises(ResidualRefusal) as err:
        _writers(lambda h: F.pad(h[..., 1:7], (1, 1), value=2.0))
    r = err.value.refusal
    assert (r.block, r.op, r.module) == ("blocks.0", "aten.pad", "blocks.0")
    assert "growcli has no rule to make it write zero" in r.reason


@pytest.fixture(scope="module")
def swin(tmp_path_factory) -> Path:
    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = T.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=2,
                          mlp_ratio=2.0)
    path = tmp_path_factory.mktemp("swin") / "swin"
    perturb(T.SwinModel(config).to(torch.float64).eval()).save_pretrained(path)
    return path


def _outputs(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return model(pixel_values=torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)).last_hidden_state


def _grow(src: Path, out: Path, step: Step) -> dict:
    return grow(Source(src), [step], [Output(out if out.suffix == ".safetensors" else str(out) + "/")], seed=0,
                streaming=False)


def test_swin_deepen_shifted_block_is_exact_in_memory_and_the_directory_refused(swin, tmp_path):
    """Block 1 has shift_size 1 (two rolls between its writers and its adds); its copy at index 2 keeps 1."""
    step = Step("deepen", {"after": f"{STAGE}.1", "block": True})
    report = _grow(swin, tmp_path / "g.safetensors", step)
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= EXACT
    assert "with zeroed residual writers" in report["steps"][0]["changes"][0]["after"]
    original = T.SwinModel.from_pretrained(swin, dtype=torch.float64).eval()
    grown = growcli.load_grown(T.SwinModel.from_pretrained(swin, dtype=torch.float64), tmp_path / "g.safetensors")
    assert [b.shift_size for b in grown.get_submodule(STAGE)] == [0, 1, 1]
    assert (_outputs(grown) - _outputs(original)).abs().max().item() <= EXACT
    with pytest.raises(UsageError) as err:
        _grow(swin, tmp_path / "out", step)
    assert f"({STAGE}.2: shift_size is 1, but a model built from the written config has 0 there)" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_swin_stack_identity_is_written_and_read_back(swin, tmp_path):
    """Stacking keeps the shifted blocks at odd indices (0, 1, 0, 1), as the written config rebuilds them."""
    stage = "encoder.layers.1.blocks"  # 4 heads, 4×4 windows of 2: block 1 rolls by 1
    report = _grow(swin, tmp_path / "out", Step("stack", {"blocks": stage, "factor": 2, "init": "identity"}))
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= EXACT
    assert report["outputs"][0]["max_abs_diff"] <= EXACT
    depths = json.loads((tmp_path / "out" / "config.json").read_text())["depths"]
    assert depths == [2, 4]
    original = T.SwinModel.from_pretrained(swin, dtype=torch.float64).eval()
    grown = T.SwinModel.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert [b.shift_size for b in grown.get_submodule(stage)] == [0, 1, 0, 1]
    assert (_outputs(grown) - _outputs(original)).abs().max().item() <= EXACT
