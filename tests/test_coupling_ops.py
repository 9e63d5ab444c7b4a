"""Ops between a widened layer and its consumer that the coupled-channel rules follow (or refuse, naming the op).

Each case is a small real torch module: tensors built from the channels' shape (``zeros_like``, ``ones_like``,
``new_zeros``), size reads, ``roll`` along positions (Swin's shifted windows), in-place element-wise ops and pooled
features concatenated into a classifier. Widening is verified by growcli and re-measured here, float64 ≤ 1e-10.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growcli.analysis.coupling import analyze
from growcli.analysis.layouts import CORE, Cat
from growcli.analysis.trace import trace_model
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context

TOL = 1e-10


class LikeOps(nn.Module):
    """Tensors made from the channels' shape, and a tensor made from their dtype only."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        scale = torch.ones_like(h) * 2.0 + torch.zeros_like(h)
        offset = h.new_zeros(h.shape[0], 1) + 1.0  # [N, 1]: broadcast along the channels
        return self.fc2(torch.tanh(h) * scale + offset)


class Rolled(nn.Module):
    """Swin's shifted windows: positions roll, channels stay; ``dims`` picks what rolls."""

    def __init__(self, dims=(2, 3)):
        super().__init__()
        self.dims = dims
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.conv2(torch.roll(F.relu(self.conv1(x)), shifts=(1,) * len(self.dims), dims=self.dims))


class InPlace(nn.Module):
    """In-place element-wise ops follow the rules of their functional forms."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.bias = nn.Linear(5, 8), nn.Linear(8, 3), nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = self.fc1(x)
        h = F.hardswish(h, inplace=True)
        h.mul_(0.5).add_(self.bias)
        h = F.leaky_relu(h, 0.1, inplace=True)
        return self.fc2(torch.sigmoid_(h))


class PooledCat(nn.Module):
    """Average- and max-pooled features of one conv concatenated into a classifier (and a fixed extra feature)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6 + 6 + 1, 2)

    def forward(self, x):
        h = F.relu(self.conv(x))
        feats = torch.cat([h.mean((2, 3)), h.amax((2, 3)), x.mean((1, 2, 3))[:, None]], 1)
        return self.head(feats)


def grown(module: nn.Module, x: torch.Tensor, layer: str, to: int, init: str = "net2net") -> nn.Module:
    torch.manual_seed(0)
    module = module.double().eval()
    before = copy.deepcopy(module)
    gm = GrowModel(module, "module", Path("mem"), "0", spec_from_batch(((x,), {})))
    report = run_step(gm, "widen", {"layer": layer, "to": to, "init": init}, Context(seed=1), VerifySettings(batches=2))
    assert report.exact and report.verification["passed"]
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        assert float((before(fresh) - gm.module(fresh)).abs().max()) <= TOL
    return gm.module


VECTOR = torch.randn(4, 5, dtype=torch.float64)
IMAGE = torch.randn(2, 3, 6, 6, dtype=torch.float64)


@pytest.mark.parametrize("init", ["net2net", "zero"])
def test_like_tensors_and_dtype_only_reads_follow_or_ignore_the_channels(init):
    m = grown(LikeOps(), VECTOR, "fc1", 12, init)
    assert tuple(m.fc2.weight.shape) == (3, 12)


def test_roll_along_positions_keeps_the_channels():
    m = grown(Rolled(), IMAGE, "conv1", 9)
    assert tuple(m.conv2.weight.shape) == (4, 9, 1, 1)


def test_roll_along_the_channels_is_refused():
    m = Rolled(dims=(1,)).double().eval()
    with pytest.raises(NotGrowableError, match=r"'conv1': roll moves entries along the grown dimension"):
        analyze(trace_model(m, ((IMAGE,), {})), "conv1")


def test_in_place_element_wise_ops_follow_the_functional_rules():
    m = grown(InPlace(), VECTOR, "fc1", 11)
    assert tuple(m.bias.shape) == (11,) and tuple(m.fc2.weight.shape) == (3, 11)


def test_pooled_features_concatenated_give_the_consumer_a_cat_layout():
    m = PooledCat().double().eval()
    group = analyze(trace_model(m, ((IMAGE,), {})), "conv")
    head = next(u for u in group.uses if u.fqn == "head.weight")
    assert head.role == "consumer" and isinstance(head.layout, Cat)
    assert head.layout.parts[:2] == [CORE, CORE] and len(head.layout.keys(list(range(6)))) == 13
    m = grown(PooledCat(), IMAGE, "conv", 10)
    assert tuple(m.head.weight.shape) == (2, 21)


def test_size_reads_of_the_channels_are_not_uses():
    """``sym_size``/``size`` read no values: a size read of the widened layer's output (added to a real trace,
    as a program with dynamic shapes has them) leaves the group as it was."""
    module = LikeOps().double().eval()
    trace = trace_model(module, ((VECTOR,), {}))
    want = [(u.fqn, u.dim, u.role) for u in analyze(trace, "fc1").uses]
    graph = trace.graph
    producer = next(n for n in graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default)
    with graph.inserting_after(producer):
        for op in (torch.ops.aten.sym_size.int, torch.ops.aten.size.int):
            node = graph.call_function(op, (producer, 1))
            node.meta["val"] = 8
    assert [(u.fqn, u.dim, u.role) for u in analyze(trace, "fc1").uses] == want


def test_a_program_with_a_dynamic_batch_widens(tmp_path):
    """A ``.pt2`` program exported with a dynamic batch dimension (its graph reads sizes with ``sym_size``)."""
    import growcli

    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.fc2(h) * (h.shape[0] ** 0.0)

    torch.manual_seed(0)
    module = Sized().double().eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(module, (VECTOR,), dynamic_shapes={"x": {0: batch}})
    assert any("sym_size" in str(n.target) for n in ep.graph.nodes)
    torch.export.save(ep, tmp_path / "sized.pt2")
    gm = growcli.load_model(tmp_path / "sized.pt2")
    before = copy.deepcopy(gm.module)
    growcli.apply(gm, "widen", layer="fc1", to=12)
    with torch.no_grad():
        assert float((before(VECTOR) - gm.module(VECTOR)).abs().max()) <= TOL


def test_swin_shifted_windows_roll_positions_not_channels():
    """A real Swin (transformers) rolls its hidden states: the rule passes the channels on, so the attention
    output's channels reach the residual stream's LayerNorm (refused there, as the hidden size is), and the
    FFN widens exactly."""
    import transformers as T

    torch.manual_seed(0)
    model = T.SwinForImageClassification(T.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[2],
                                                      num_heads=[2], window_size=4, num_labels=3)).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    trace = trace_model(model, ((), {"pixel_values": x}))
    assert any(n.target == torch.ops.aten.roll.default for n in trace.graph.nodes)
    block = "swin.encoder.layers.0.blocks.1"
    with pytest.raises(NotGrowableError, match=f"LayerNorm in '{block}.layernorm_before' normalises over the grown"):
        analyze(trace, f"{block}.attention.o_proj")
    before = copy.deepcopy(model)
    gm = GrowModel(model, "hf", Path("mem"), "0", spec_from_batch(((), {"pixel_values": x})), hf_class=type(model).__name__)
    report = run_step(gm, "widen", {"layer": f"{block}.mlp.fc1", "by": 8}, Context(seed=0), VerifySettings(batches=2))
    assert report.verification["passed"] and report.verification["dtype"] == "float64"
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        assert float((before(pixel_values=fresh).logits - model(pixel_values=fresh).logits).abs().max()) <= TOL
