"""Four small coverage gaps, each closed by a general rule.

1. Size attributes after a replay: a model grown as a loaded ``.pt2`` program records no attribute edits (the
   program's modules only hold tensors), so ``load_grown`` onto the ``torch.nn`` original left BatchNorm's
   ``num_features``, Conv's ``in/out_channels``… at the old sizes. The replay now applies the width transforms'
   own rule from tensor shapes to attributes (:mod:`growcli.core.size_attrs`).
2. ``gather``/``scatter_add``/``index_select`` along another dim than the channels (message passing), ``stack``
   and ``unbind`` along another dim keep the channels; along the channels, or with an index that does not
   have every channel, they are refused naming the op (:mod:`growcli.analysis.scatter`).
3. NeST masks of transposed convolutions (:class:`growcli.nn.MaskedConvTranspose2d`, 1d, 3d).
4. GradMax across convolutions with an even kernel and ``padding="same"`` (torch pads one more after).

Every model is real and float64; each grown model is compared with the original after reading the written file
back (``load_grown`` onto a freshly built original, or the written ``.pt2`` program): max abs difference ≤ 1e-10.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import growcli
from growcli.analysis.calibration import from_tensors
from growcli.analysis.coupling import analyze
from growcli.analysis.trace import trace_model
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import make_batches, spec_from_batch
from growcli.core.model import GrowModel
from growcli.core.module_specs import module_spec
from growcli.core.replay import replay
from growcli.io.formats import safetensors_metadata
from growcli.nn import MaskedConv2d, MaskedConvTranspose1d, MaskedConvTranspose2d
from growcli.nn.masks import keep_masked_zero
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.gradmax_site import find_site
from growcli.transforms.registry import Context

TOL = 1e-10


def as_gm(module: nn.Module, *example: torch.Tensor) -> GrowModel:
    return GrowModel(module, "state_dict", Path("mem"), "0", spec_from_batch((tuple(example), {})))


def saved_gm(module: nn.Module, tmp: Path, *example: torch.Tensor) -> GrowModel:
    """``module`` pickled to ``tmp`` and loaded from there (what a written file is read back against)."""
    torch.save(module, tmp / "original.pt")
    gm = growcli.load_model(tmp / "original.pt", trust_pickle=True)
    gm.inputs = spec_from_batch((tuple(example), {}))
    return gm


def max_diff(a: nn.Module, b: nn.Module, *inputs: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(*inputs) - b(*inputs)).abs().max())


def export(module: nn.Module, path: Path, *example: torch.Tensor) -> Path:
    torch.export.save(torch.export.export(module, tuple(example), strict=False), str(path))
    return path


# ============================================================== 1. size attributes follow the tensors on replay
class ConvBN(nn.Module):
    """Conv → BatchNorm → ReLU → Conv (float64)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def conv_bn() -> ConvBN:
    torch.manual_seed(0)
    m = ConvBN().double().eval()
    with torch.no_grad():  # statistics that matter: a wrong copy of a channel would show
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.5, 0.5)
    return m


def image(n: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_sizes_match(m: ConvBN, channels: int) -> None:
    """Every size attribute equals what the tensors hold (and the grown size), as a fresh build would have it."""
    assert m.conv1.weight.shape[0] == m.conv1.out_channels == channels
    assert m.conv1.in_channels == m.conv1.weight.shape[1] == 3
    assert m.bn.num_features == m.bn.weight.shape[0] == m.bn.running_mean.shape[0] == channels
    assert m.conv2.in_channels == m.conv2.weight.shape[1] == channels and m.conv2.out_channels == 4
    assert f"Conv2d(3, {channels}," in repr(m.conv1) and f"BatchNorm2d({channels}," in repr(m.bn)
    assert module_spec(m.bn)["kwargs"]["num_features"] == channels  # what a later edit would record


def test_grown_pt2_program_reloads_with_sizes_that_match_its_tensors(cli, tmp_path):
    original = conv_bn()
    source = export(original, tmp_path / "m.pt2", image(2))
    weights, program = tmp_path / "g.safetensors", tmp_path / "g.pt2"
    r = cli("widen", source, "--layer", "conv1", "--to", 10, "-o", weights, "-o", program, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["verification"]["max_abs_diff"] <= TOL
    edits = json.loads(safetensors_metadata(weights)["growcli.edits"])
    assert {e["op"] for e in edits} == {"param"}  # the program's modules have no attributes to record
    grown = growcli.load_grown(ConvBN().double(), weights)
    assert_sizes_match(grown, 10)
    x = image(2)  # the program was exported for batches of 2
    assert max_diff(original, grown, x) <= TOL
    written = torch.export.load(str(program)).module()
    assert tuple(written.get_parameter("conv1.weight").shape) == (10, 3, 3, 3)
    assert max_diff(original, written, x) <= TOL


def test_grown_module_written_as_pt2_and_safetensors_reloads_with_matching_sizes(tmp_path):
    original = conv_bn()
    gm = saved_gm(copy.deepcopy(original), tmp_path, image(2))
    report = growcli.apply(gm, "widen", layer="conv1", to=9)
    assert report.verification["max_abs_diff"] <= TOL
    weights, program = tmp_path / "g.safetensors", tmp_path / "g.pt2"
    growcli.save_models(gm, [(weights, None, None), (program, None, None)])
    grown = growcli.load_grown(ConvBN().double(), weights)
    assert_sizes_match(grown, 9)
    x = image()
    assert max_diff(original, grown, x) <= TOL
    assert max_diff(original, torch.export.load(str(program)).module(), x) <= TOL


class Sizes(nn.Module):
    """One of each layer type whose sizes the rule knows."""

    def __init__(self):
        super().__init__()
        self.lin, self.conv, self.up = nn.Linear(4, 6), nn.Conv1d(6, 5, 3), nn.ConvTranspose1d(5, 3, 2, stride=2)
        self.bn, self.ln, self.gn = nn.BatchNorm1d(3), nn.LayerNorm(7), nn.GroupNorm(1, 3)
        self.emb, self.prelu = nn.Embedding(10, 7), nn.PReLU(3)


def test_replay_of_param_edits_alone_sets_every_size_attribute():
    """Edits that carry only tensor shapes (as a .pt2 program records them) give a torch.nn model the
    attributes those shapes mean, for every layer type of the rule; LayerNorm's forward reads its own."""
    new_shapes = {"lin.weight": [8, 5], "lin.bias": [8], "conv.weight": [9, 8, 3], "up.weight": [9, 4, 2],
                  "up.bias": [4], "bn.weight": [4], "bn.bias": [4], "bn.running_mean": [4], "bn.running_var": [4],
                  "ln.weight": [11], "ln.bias": [11], "gn.weight": [4], "gn.bias": [4], "emb.weight": [12, 11],
                  "prelu.weight": [4]}
    records = [{"op": "param", "name": k, "shape": v, "dtype": "float64"} for k, v in new_shapes.items()]
    m = replay(Sizes().double(), records)
    with torch.no_grad():
        m.ln.weight.normal_()
        m.ln.bias.normal_()
    assert (m.lin.in_features, m.lin.out_features) == (5, 8)
    assert (m.conv.in_channels, m.conv.out_channels) == (8, 9)
    assert (m.up.in_channels, m.up.out_channels) == (9, 4)  # transposed: weight [in, out/groups, k]
    assert m.bn.num_features == 4 and m.gn.num_channels == 4 and m.prelu.num_parameters == 4
    assert tuple(m.ln.normalized_shape) == (11,)
    assert (m.emb.num_embeddings, m.emb.embedding_dim) == (12, 11)
    x = torch.randn(2, 11, dtype=torch.float64)
    want = F.layer_norm(x, (11,), m.ln.weight, m.ln.bias, m.ln.eps)
    assert torch.equal(m.ln(x), want)  # stale normalized_shape (7,) would raise here


# ============================================================== 2. gather / scatter / index_select / stack / unbind
SRC = [0, 1, 2, 3, 4, 0, 2, 4, 1, 3]  # 10 directed edges among 5 nodes
DST = [1, 2, 3, 4, 0, 2, 4, 1, 3, 0]


class MessagePassing(nn.Module):
    """A GNN layer: node features → messages gathered from the edges' sources (index_select and gather) →
    summed into their destinations (``scatter_add_`` with an index expanded over the channels) → Linear."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("src", torch.tensor(SRC))
        self.register_buffer("dst", torch.tensor(DST))

    def forward(self, x):
        h = torch.relu(self.lin1(x))
        c = h.shape[1]
        msg = h.index_select(0, self.src) * 0.5 + h.gather(0, self.src.unsqueeze(-1).expand(-1, c))
        out = torch.zeros_like(h)
        out.scatter_add_(0, self.dst.unsqueeze(-1).expand(-1, c), msg)
        return self.lin2(torch.tanh(out + h))


class StoredIndex(nn.Module):
    """The index kept as a buffer with one column per channel (fixed by a tensor, not by code): it grows
    with the channels, a copy of each column; scatter_reduce takes the max of the messages per node."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("src", torch.tensor(SRC).unsqueeze(-1).repeat(1, 8))
        self.register_buffer("dst", torch.tensor(DST).unsqueeze(-1).repeat(1, 8))

    def forward(self, x):
        h = torch.tanh(self.lin1(x))
        msg = h.gather(0, self.src)
        out = h.scatter_reduce(0, self.dst, msg, "amax")
        return self.lin2(out)


class TooFewColumns(MessagePassing):
    def forward(self, x):
        h = torch.relu(self.lin1(x))
        out = torch.zeros_like(h).scatter_add(0, self.dst.unsqueeze(-1).expand(-1, 4), h.index_select(0, self.src))
        return self.lin2(out)


class StackUnbind(nn.Module):
    """Two branches stacked along dim 0, unbound again and added."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        a, b = torch.stack([torch.relu(h), torch.tanh(h)]).unbind(0)
        return self.fc2(a + 0.5 * b)


class UnbindChannels(nn.Module):
    """Unbinds the channels themselves (one tensor per channel): not growable."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        cols = self.fc1(x).unbind(1)
        return self.fc2(torch.stack([cols[0] * cols[1], cols[1], cols[2], cols[3]], dim=1))


def nodes(seed: int = 3) -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rows(seed: int = 3) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("cls,layer,inputs", [(MessagePassing, "lin1", nodes), (StoredIndex, "lin1", nodes),
                                              (StackUnbind, "fc1", rows)],
                         ids=["index_select-gather-scatter_add", "stored-index-scatter_reduce", "stack-unbind"])
def test_row_moves_along_other_dims_widen_exactly(tmp_path, cls, layer, inputs):
    torch.manual_seed(0)
    original = cls().double().eval()
    gm = saved_gm(copy.deepcopy(original), tmp_path, inputs(0))
    report = growcli.apply(gm, "widen", layer=layer, factor=2)
    assert report.exact and report.verification["passed"] and report.verification["max_abs_diff"] <= TOL
    out = tmp_path / "g.safetensors"
    growcli.save_model(gm, out)
    torch.manual_seed(1)
    grown = growcli.load_grown(cls().double(), out)
    assert grown.get_submodule(layer).out_features == 16 == grown.get_submodule(layer).weight.shape[0]
    assert max_diff(original, grown, inputs()) <= TOL
    if cls is StoredIndex:  # the index columns were copied with the channels: still one node per edge
        assert grown.dst.shape == (10, 16) and torch.equal(grown.dst, torch.tensor(DST).unsqueeze(-1).repeat(1, 16))


def test_scatter_index_with_fewer_columns_than_the_channels_is_refused():
    torch.manual_seed(0)
    gm = as_gm(TooFewColumns().double().eval(), nodes(0))
    before = {k: v.clone() for k, v in gm.module.state_dict().items()}
    with pytest.raises(NotGrowableError, match=r"'lin1': the index \w+ of scatter_add\.default does not have the 8 "
                                               r"channels in dimension 1 \(shape \[10, 4\]\)"):
        growcli.apply(gm, "widen", layer="lin1", factor=2)
    assert all(torch.equal(v, before[k]) for k, v in gm.module.state_dict().items())


def test_unbind_along_the_channels_is_refused_naming_it(cli, tmp_path):
    torch.manual_seed(0)
    source = export(UnbindChannels().double().eval(), tmp_path / "u.pt2", rows(0))
    out = tmp_path / "o" / "g.safetensors"
    r = cli("widen", source, "--layer", "fc1", "--to", 8, "-o", out)
    assert r.code == 1
    assert "'fc1': unbind splits the grown dimension into one tensor per channel" in r.err
    assert "Traceback" not in r.err and r.err.count("\n") == 1
    assert not out.exists() and not out.parent.exists()


def test_pt2_index_expanded_by_a_literal_is_refused_naming_the_node(cli, tmp_path):
    """In a program the expanded size is a literal of the graph: widening would leave it at 8."""
    torch.manual_seed(0)
    source = export(MessagePassing().double().eval(), tmp_path / "mp.pt2", nodes(0))
    out = tmp_path / "g.safetensors"
    r = cli("widen", source, "--layer", "lin1", "--to", 16, "-o", out)
    assert r.code == 1
    assert "'lin1': the index of " in r.err and "is expanded to the 8 channels by a literal size (node expand" in r.err
    assert "in this .pt2 program" in r.err and not out.exists()


class MessagePassingAs(MessagePassing):
    """The index expanded to the messages' shape (``expand_as``): no literal size, so a program grows too."""

    def forward(self, x):
        h = torch.relu(self.lin1(x))
        msg = h.index_select(0, self.src)
        out = torch.zeros_like(h).scatter_add(0, self.dst.unsqueeze(-1).expand_as(msg), msg)
        return self.lin2(torch.tanh(out + h))


def test_pt2_index_expanded_to_the_messages_shape_widens_exactly(cli, tmp_path):
    torch.manual_seed(0)
    original = MessagePassingAs().double().eval()
    source = export(original, tmp_path / "mp.pt2", nodes(0))
    program = tmp_path / "g.pt2"
    r = cli("widen", source, "--layer", "lin1", "--to", 16, "-o", program, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["verification"]["max_abs_diff"] <= TOL
    written = torch.export.load(str(program)).module()
    assert tuple(written.get_parameter("lin2.weight").shape) == (3, 16)
    assert max_diff(original, written, nodes()) <= TOL


def test_row_move_rules_through_the_analysis():
    """The coupled group: index buffers of stored columns are copied (dim 1), an expanded index is not a parameter."""
    torch.manual_seed(0)
    for cls, copied in ((MessagePassing, set()), (StoredIndex, {"src", "dst"})):
        m = cls().double().eval()
        group = analyze(trace_model(m, make_batches(as_gm(m, nodes(0)).inputs, 1)[0]), "lin1")
        uses = {u.fqn: (u.dim, u.role) for u in group.uses}
        assert uses == {"lin1.weight": (0, "producer"), "lin1.bias": (0, "producer"), "lin2.weight": (1, "consumer"),
                        **{name: (1, "copy") for name in copied}}


# ============================================================== 3. NeST masks of transposed convolutions
class AE(nn.Module):
    """Conv2d encoder (stride 2) → tanh → ConvTranspose2d decoder (stride 2, output padding)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def ae_data(n: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    return {"input": x, "target": torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)}


def masked_grad(model: AE, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """∂L/∂(w·m) of the decoder, computed here with a leaf copy of w·m and the functional op."""
    dec = model.dec
    leaf = (dec.weight * dec.mask).detach().requires_grad_(True)
    y = F.conv_transpose2d(torch.tanh(model.enc(data["input"])), leaf, dec.bias, dec.stride, dec.padding,
                           dec.output_padding)
    (g,) = torch.autograd.grad(F.mse_loss(y, data["target"]), [leaf])
    return g


@pytest.mark.parametrize("dims", [1, 2])
def test_masked_transposed_conv_computes_like_the_plain_one(dims):
    torch.manual_seed(0)
    plain, masked = ((nn.ConvTranspose1d(3, 2, 4, stride=3, dilation=2), MaskedConvTranspose1d) if dims == 1 else
                     (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), MaskedConvTranspose2d))
    plain = plain.double()
    layer = masked(**masked.growcli_spec(plain)).double()
    layer.load_state_dict({**plain.state_dict(), "mask": torch.ones_like(plain.weight)})
    x = torch.randn((2, plain.in_channels) + (5,) * dims, dtype=torch.float64)
    assert torch.equal(layer(x), plain(x))
    if dims == 2:  # output_size picks the output padding as in nn.ConvTranspose2d (9 or 10 here)
        assert torch.equal(layer(x, output_size=[9, 9]), plain(x, output_size=[9, 9]))
    with torch.no_grad():
        layer.mask[0] = 0  # input channel 0 disconnected: as if its weights were 0
        plain.weight[0] = 0
    assert torch.equal(layer(x), plain(x))


def test_nest_on_a_conv_autoencoder_masks_and_grows_the_transposed_conv_exactly(tmp_path):
    torch.manual_seed(0)
    original = AE().double().eval()
    data = ae_data()
    gm = saved_gm(copy.deepcopy(original), tmp_path, data["input"][:2])
    ctx = Context(seed=0)
    ctx.data["train"] = from_tensors(data, gm.inputs)
    weight = gm.module.dec.weight
    report = run_step(gm, "mask", {"layer": ["enc", "dec"]}, ctx, VerifySettings())
    assert report.verification["max_abs_diff"] == 0.0 and [c["after"] for c in report.changes] == \
        ["MaskedConv2d", "MaskedConvTranspose2d"]
    dec = gm.module.dec
    assert type(gm.module.enc) is MaskedConv2d and type(dec) is MaskedConvTranspose2d
    assert dec.mask.shape == (4, 2, 3, 3) and dec.weight is weight  # the same Parameter: optimizers keep it
    run_step(gm, "magnitude_prune", {"layer": "dec", "sparsity": 0.5}, ctx, VerifySettings())
    missing = (dec.mask == 0).clone()
    assert int(missing.sum()) == 36 and int((dec.weight[missing] != 0).sum()) == 0
    pruned = copy.deepcopy(gm.module)
    grad = masked_grad(gm.module, data).abs()
    options = {"layer": "dec", "data": "train", "connections": 0.25}
    report = run_step(gm, "grow_connections", options, ctx, VerifySettings())
    assert report.exact and report.verification["max_abs_diff"] <= TOL
    grown_at = missing & (dec.mask == 1)
    assert int(grown_at.sum()) == math.ceil(0.25 * 36) == report.changes[0]["grown"]
    assert int((dec.weight[grown_at] != 0).sum()) == 0  # new connections start at weight 0
    assert float(grad[missing & ~grown_at].max()) <= float(grad[grown_at].min()) and float(grad[grown_at].min()) > 0

    out = tmp_path / "ae.safetensors"
    growcli.save_model(gm, out)
    reloaded = growcli.load_grown(AE().double(), out)
    assert type(reloaded.dec) is MaskedConvTranspose2d and torch.equal(reloaded.dec.mask, dec.mask)
    x = ae_data(4, seed=9)["input"]
    assert max_diff(pruned, reloaded, x) <= TOL  # grown == the model before growth, read back from disk
    assert max_diff(gm.module, reloaded, x) == 0.0

    # a training step moves the grown connections, never the masked ones
    model = reloaded.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    hook = keep_masked_zero(opt, model)
    loss = F.mse_loss(model(data["input"]), data["target"])
    loss.backward()
    assert int((model.dec.weight.grad[model.dec.mask == 0] != 0).sum()) == 0
    assert float(model.dec.weight.grad[grown_at].abs().min()) > 0
    opt.step()
    hook.remove()
    assert int((model.dec.weight[model.dec.mask == 0] != 0).sum()) == 0
    assert int((model.dec.weight[grown_at] != 0).sum()) == int(grown_at.sum())


# ============================================================== 4. GradMax with an even kernel and padding="same"
class EvenSame(nn.Module):
    """Conv2d(k=4, padding="same") → GELU → Conv2d(k=4, padding="same") → mean → Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 4, padding="same"), nn.Conv2d(6, 5, 4, padding="same")
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(F.gelu(self.c1(x)))).mean((2, 3)))


def even_data(n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, 7, 7, generator=g, dtype=torch.float64)
    return {"input": x, "target": torch.randint(0, 4, (n,), generator=g)}


def test_gradmax_site_reads_the_ops_own_same_padding():
    torch.manual_seed(0)
    m = EvenSame().double().eval()
    trace = trace_model(m, ((even_data()["input"][:2],), {}))
    site = find_site(trace, analyze(trace, "c1"), any_conv=True)
    assert site.consumer_conv.pads == ((1, 2), (1, 2))  # d·(k − 1) = 3: torch pads 1 before, 2 after
    assert not site.consumer_conv.uniform_on_constants()


def test_gradmax_across_even_kernel_same_padding_is_exact_with_the_gradmax_gradient(tmp_path):
    torch.manual_seed(0)
    original = EvenSame().double().eval()
    data = even_data()
    gm = saved_gm(copy.deepcopy(original), tmp_path, data["input"][:2])
    ctx = Context(seed=1)
    ctx.data["calib"] = from_tensors(data, gm.inputs, batch_size=len(data["input"]))
    report = run_step(gm, "widen", {"layer": "c1", "by": 3, "init": "gradmax", "data": "calib"}, ctx, VerifySettings())
    assert report.exact and report.verification["max_abs_diff"] <= TOL
    out = tmp_path / "g.safetensors"
    growcli.save_model(gm, out)
    grown = growcli.load_grown(EvenSame().double(), out)
    x = even_data(4)["input"]
    assert max_diff(original, grown, x) <= TOL
    assert grown.c1.out_channels == 9 and grown.c2.in_channels == 9
    assert torch.count_nonzero(grown.c1.weight[6:]) == 0  # zero incoming weights

    # the new units' incoming gradient is W_newᵀ·M, with M measured by autograd alone (one one-hot outgoing
    # weight at a time; the new units output 0, so moving them changes nothing else)
    (g,) = torch.autograd.grad(F.cross_entropy(grown(data["input"]), data["target"]), grown.c1.weight)
    w_out = grown.c2.weight
    saved = w_out[:, 6].detach().clone()
    m_rows = []
    for j in range(saved.numel()):
        with torch.no_grad():
            w_out[:, 6] = F.one_hot(torch.tensor(j), saved.numel()).view(saved.shape).double()
        (gj,) = torch.autograd.grad(F.cross_entropy(grown(data["input"]), data["target"]), grown.c1.weight)
        m_rows.append(gj[6].flatten())
    with torch.no_grad():
        w_out[:, 6] = saved
    m = torch.stack(m_rows)  # [consumer outputs × taps, inputs × taps], φ'(0) = ½ included
    cols = w_out[:, 6:].detach().transpose(0, 1).reshape(3, -1)
    g_new = g[6:].reshape(3, -1)
    assert float(g_new.abs().max()) > 0
    torch.testing.assert_close(g_new, cols @ m, rtol=1e-9, atol=1e-14 * float(g_new.abs().max()))


def test_suggest_scores_an_even_kernel_same_padding_layer_with_the_ops_own_padding():
    """``suggest`` unfolds the patches itself: it used to refuse string padding. Its Firefly gain, recomputed here
    with autograd on the model extended by each candidate unit (incoming weights the candidate's, outgoing 0),
    needs the op's asymmetric padding to come out equal."""
    from growcli.advise.suggest import score_layers

    torch.manual_seed(0)
    model = EvenSame().double().eval()
    data = even_data()
    gm = as_gm(model, data["input"][:2])
    scores, skipped, _ = score_layers(gm, from_tensors(data, gm.inputs, batch_size=len(data["input"])),
                                      lr=0.01, candidates=4, seed=3)
    assert [s.layer for s in scores] == ["c1"] and "c1" not in skipped
    w = model.c1.weight.detach()
    gen = torch.Generator().manual_seed(3)  # suggest's candidates: drawn like this, the spread of the existing rows
    cand = torch.randn((4, *w.shape[1:]), generator=gen, dtype=torch.float64) * float(w.std())
    gains = []
    for c in cand:
        grown = copy.deepcopy(model)
        with torch.no_grad():
            grown.c1.weight = nn.Parameter(torch.cat([w, c[None]]))
            grown.c1.bias = nn.Parameter(torch.cat([grown.c1.bias, torch.zeros(1, dtype=torch.float64)]))
            zero = torch.zeros(5, 1, 4, 4, dtype=torch.float64)
            grown.c2.weight = nn.Parameter(torch.cat([grown.c2.weight, zero], 1))
        (g,) = torch.autograd.grad(F.cross_entropy(grown(data["input"]), data["target"]), grown.c2.weight)
        gains.append(0.01 * float(g[:, 6].pow(2).sum()))
    assert min(gains) > 0
    assert scores[0].firefly_gain == pytest.approx(max(gains), rel=1e-9)
    assert scores[0].firefly_mean_gain == pytest.approx(sum(gains) / 4, rel=1e-9)
