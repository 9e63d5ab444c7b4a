"""FFN widen of a layer whose weights run at several depths (ALBERT's shared layer, a block called 3 times).

Widening is exact when every use of the shared weights is coupled to the same grown channels: each
use's producer rows grow by one channel map, each use's consumer columns by the matching split, so
every application computes what it computed before. The models are real and float64 (a torch module
whose pre-LN block runs three times, a tiny AlbertForMaskedLM with random weights), compared here on
inputs growcli has not seen; a weight read once by the grown channels and once by an unrelated tensor
is refused, naming that use.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import run_step
from conftest import albert_logits, tiny_albert

TOL = 1e-10
VOCAB = 96
FFN = "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn"


class Block(nn.Module):
    """Pre-LN residual FFN: ``x + down(gelu(up(norm(x))))``."""

    def __init__(self, d: int = 16, inner: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, inner)
        self.down = nn.Linear(inner, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Looped(nn.Module):
    """One block applied three times (the same weights at every depth) between an input and an output layer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.block = Block()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.inp(x)
        for _ in range(3):
            x = self.block(x)
        return self.head(x)


def test_pruning_the_copies_of_a_shared_widen_gives_back_the_original():
    gm, before = grow_model(Looped())
    run_step(gm, "widen", {"layer": "block.up", "by": 5})
    report = run_step(gm, "prune", {"layer": "block.up"})
    assert report.exact and report.verification["max_abs_diff"] <= TOL
    assert gm.module.block.up.out_features == 32
    for fqn, p in before.state_dict().items():
        torch.testing.assert_close(gm.module.state_dict()[fqn], p, rtol=0, atol=1e-15)


class Misused(nn.Module):
    """``reader`` reads ``up``'s channels and, a second time, an unrelated tensor of the same width."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 16)
        self.other = nn.Linear(6, 16)
        self.reader = nn.Linear(16, 4)

    def forward(self, x):
        return self.reader(torch.relu(self.up(x))) + self.reader(torch.tanh(self.other(x)))


def grow_model(module: nn.Module) -> tuple[GrowModel, nn.Module]:
    torch.manual_seed(0)
    module = module.to(torch.float64).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    return GrowModel(module, "module", Path("mem"), "0", spec_from_batch(((x,), {}))), copy.deepcopy(module)


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


@pytest.mark.parametrize("init", ["net2net", "zero"])
@pytest.mark.parametrize("options, new", [({"factor": 2}, 64), ({"to": 45}, 45)], ids=["x2", "to45"])
def test_a_block_run_three_times_widens_exactly_and_once(init, options, new):
    gm, before = grow_model(Looped())
    params = gm.num_parameters()
    report = run_step(gm, "widen", {"layer": "block.up", "init": init, **options})
    block = gm.module.block
    assert (block.up.out_features, block.down.in_features, tuple(block.down.weight.shape)) == (new, new, (16, new))
    assert report.verification["max_abs_diff"] <= TOL
    x = torch.randn(4, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert max_diff(before, gm.module, x) <= TOL
    # One set of weights grew: (new - 32) rows of up (16 weights + 1 bias) and columns of down (16), not 3 times that.
    assert gm.num_parameters() - params == (new - 32) * (16 + 1 + 16)
    assert any("its weights run 3 times" in n and "same map" in n for n in report.notes)
    if init == "zero":
        assert not block.down.weight[:, 32:].any()


class Aliased(nn.Module):
    """Two block modules holding the same Parameters (a layer shared across depths by reference)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.first, self.second = Block(), Block()
        for name in ("norm", "up", "down"):
            for leaf in ("weight", "bias"):
                setattr(getattr(self.second, name), leaf, getattr(getattr(self.first, name), leaf))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.second(self.first(self.inp(x))))


def test_parameters_shared_by_reference_grow_once_and_stay_tied():
    gm, before = grow_model(Aliased())
    params = gm.num_parameters()
    report = run_step(gm, "widen", {"layer": "second.up", "to": 40})
    first, second = gm.module.first, gm.module.second
    assert first.up.weight is second.up.weight and first.down.weight is second.down.weight
    assert (first.up.out_features, second.up.out_features, first.down.in_features) == (40, 40, 40)
    assert report.verification["max_abs_diff"] <= TOL
    assert max_diff(before, gm.module, torch.randn(4, 6, dtype=torch.float64)) <= TOL
    assert gm.num_parameters() - params == 8 * (16 + 1 + 16)


def test_a_weight_read_by_an_unrelated_tensor_is_refused_naming_the_use():
    gm, before = grow_model(Misused())
    with pytest.raises(NotGrowableError, match=r"parameter reader\.weight is used 2 times \(shared weights\) and its "
                                               r"use 2 \(linear\.default in 'reader', node linear_\d+\) is not coupled to the "
                                               r"same grown channels"):
        run_step(gm, "widen", {"layer": "up", "by": 4})
    assert gm.module.up.out_features == 16 and gm.module.reader.in_features == 16
    assert max_diff(before, gm.module, torch.randn(2, 6, dtype=torch.float64)) == 0


class Recurrent(nn.Module):
    """A square layer applied three times in a row: its output channels are its own next input."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.step = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.inp(x)
        for _ in range(3):
            x = torch.tanh(self.step(x))
        return self.head(x)


@pytest.mark.parametrize("layer, message", [
    ("step", r"'step': parameter step\.weight is tied to the channels in two ways \(producer dim 0, consumer dim 1\)"),
    ("inp", r"'inp': parameter step\.weight is used 3 times \(shared weights\) and its use 2 .* is not coupled"),
])
def test_a_layer_feeding_its_own_next_use_is_refused(layer, message):
    gm, _ = grow_model(Recurrent())
    with pytest.raises(NotGrowableError, match=message):
        run_step(gm, "widen", {"layer": layer, "by": 2})


@pytest.mark.parametrize("init", ["gradmax", "firefly"])
def test_data_inits_refuse_a_shared_layer_cleanly(init, tmp_path):
    from safetensors.torch import save_file

    gm, _ = grow_model(Looped())
    data = tmp_path / "calib.safetensors"
    save_file({"input": torch.randn(8, 5, 6, dtype=torch.float64), "target": torch.randn(8, 5, 4, dtype=torch.float64)},
              str(data))
    with pytest.raises(NotGrowableError, match=rf"'block\.up': {init}: its weights run 3 times in the forward pass "
                                               rf"\(shared weights\) and {init} measures one use"):
        run_step(gm, "widen", {"layer": "block.up", "by": 4, "init": init, "data": str(data)})
    assert gm.module.block.up.out_features == 32


# --------------------------------------------------------------------------- ALBERT: one layer at every depth
@pytest.fixture(scope="module")
def albert_dir(tmp_path_factory) -> Path:
    return tiny_albert(tmp_path_factory.mktemp("albert") / "albert")


def test_albert_shared_ffn_widens_exactly_and_reloads_with_from_pretrained(albert_dir, tmp_path):
    from growcli.run.runner import Output, Source, Step, grow

    out = tmp_path / "grown"
    report = grow(Source(albert_dir), [Step("widen", {"layer": FFN, "factor": 2})], [Output(str(out) + "/")], seed=0)
    assert report["function_preserving"]
    assert max([report["verification"]["max_abs_diff"]] + [o["max_abs_diff"] for o in report["outputs"]]) <= TOL
    config = json.loads((out / "config.json").read_text())
    assert (config["intermediate_size"], config["hidden_size"], config["num_hidden_layers"]) == (128, 32, 3)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    assert float((albert_logits(albert_dir, ids) - albert_logits(out, ids)).abs().max()) <= TOL
    changes = {c["name"]: c["after"] for c in report["steps"][0]["changes"]}
    layer = FFN.rsplit(".", 1)[0]
    assert changes == {f"{FFN}.weight": [128, 32], f"{FFN}.bias": [128], f"{layer}.ffn_output.weight": [32, 128]}


def test_albert_tied_decoder_stays_refused(albert_dir):
    import growcli

    gm = growcli.load_model(albert_dir)
    with pytest.raises(NotGrowableError, match=r"'predictions\.decoder': parameter predictions\.decoder\.weight is "
                                               r"tied to the channels in two ways"):
        run_step(gm, "widen", {"layer": "predictions.decoder", "by": 4})
