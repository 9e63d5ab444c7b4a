"""Trace-level gaps (issue 15): a user batch in the model's dtype, transposes of activations, ``index_put``.

1. ``--inputs`` in float32 for a float64 model is cast to float64 (integer tensors untouched) before tracing.
2. ``x.mT``, ``x.T``, ``x.t()``, ``transpose``/``swapaxes``, ``permute``, ``movedim``, ``mH``/``adjoint`` of an
   activation move the grown channels with the permutation, in the coupled-channel (widen) and the
   residual-stream (hidden) analyses; a Linear over another dim (MLP-Mixer token mixing) passes them on.
3. ``index_put`` (``accumulate=True`` or not, ``x[idx] += v``), ``index`` and ``index_add`` along a dim the
   channels are not in pass them on; an index along the channels is refused, naming the op.

Every exactness check runs in float64; 1e-10 is far above the ~1e-16 rounding of these tiny models (the grown
models compute the same sums in another order: split columns), and far below any real error.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import growcli
from conftest import as_grow_model
from growcli.analysis.trace import PERMUTES, index_result_dim, permutation
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import InputSpec, floating_dtype, with_example

TOL = 1e-10


def _diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


# -- 1. a user batch in the model's dtype --------------------------------------------------------------------------

from test_user_inputs import conv_model  # noqa: E402  (two 1-d convolutions in float64; also the --arch below)


def test_with_example_casts_floats_to_the_model_dtype_and_keeps_integers():
    batch = ((torch.ones(2, 3),), {"ids": torch.arange(4), "mask": torch.ones(4, dtype=torch.bool)})
    spec = with_example(InputSpec(), batch, dtype=torch.float64)
    args, kwargs = spec.example
    assert args[0].dtype == torch.float64 and kwargs["ids"].dtype == torch.int64 and kwargs["mask"].dtype == torch.bool
    assert spec.args[0].dtype == "float64"  # later generated batches follow
    assert with_example(InputSpec(), batch).example is batch  # no dtype: untouched
    assert floating_dtype(conv_model()) == torch.float64 and floating_dtype(nn.ReLU()) is None


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_a_float32_inputs_file_grows_a_float64_model(cli, tmp_path, monkeypatch, suffix):
    import growcli.transforms.widen as widen

    seen: list[torch.dtype] = []
    real = widen.trace_model
    monkeypatch.setattr(widen, "trace_model", lambda m, b: seen.append(b[0][0].dtype) or real(m, b))
    torch.manual_seed(0)
    model = conv_model()
    weights = tmp_path / "conv.pt"
    torch.save(model.state_dict(), weights)
    x = torch.randn(3, 5, 7)  # float32
    inputs = tmp_path / f"x.{suffix}"
    if suffix == "pt":
        torch.save({"0": x}, inputs)
    else:
        from safetensors.torch import save_file
        save_file({"0": x}, str(inputs))
    out = tmp_path / "wide.safetensors"
    r = cli("widen", weights, "--arch", "test_trace_gaps:conv_model", "--layer", "c1", "--factor", "2",
            "--inputs", inputs, "-o", out, "--json")
    assert r.code == 0, r.err
    assert seen and set(seen) == {torch.float64}
    grown = growcli.load_grown(conv_model(), out)
    assert grown.c1.out_channels == 16
    assert _diff(grown.double(), model, x.double()) <= TOL


# -- 2. transposes of activations ------------------------------------------------------------------------------------

FORMS = {  # form → (the op torch.export records, a function moving the last two dims of a rank-3 tensor)
    "mT": ("mT", lambda h: h.mT),
    "transpose": ("transpose", lambda h: h.transpose(1, 2)),
    "swapaxes": ("swapaxes", lambda h: h.swapaxes(-1, -2)),
    "permute": ("permute", lambda h: h.permute(0, 2, 1)),
    "movedim": ("movedim", lambda h: h.movedim(-1, 1)),
    "mH": ("mH", lambda h: h.mH),
    "adjoint": ("adjoint", lambda h: h.adjoint()),
}
FLAT = {  # forms of a rank-2 tensor (one sample, no batch dim)
    "T": ("numpy_T", lambda h: h.T),
    "t": ("t", lambda h: h.t()),
}


class Mixer(nn.Module):
    """An MLP-Mixer block on ``[B, T, 5]`` (or ``[T, 5]``): token mixing by Linears over the token dim, between two
    transposes of the given form; ``norm`` puts a LayerNorm before it (hidden growth), else none (widen)."""

    def __init__(self, move, norm: bool, tokens: int = 6, hidden: int = 8):
        super().__init__()
        self.move = move
        self.emb = nn.Linear(5, hidden)
        self.norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.tok1, self.tok2 = nn.Linear(tokens, 12), nn.Linear(12, tokens)
        self.fc1, self.fc2 = nn.Linear(hidden, 16), nn.Linear(16, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.move(self.tok2(torch.relu(self.tok1(self.move(self.norm(h))))))
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(-2))


def _mixer(form: str, norm: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    move = (FORMS | FLAT)[form][1]
    x = torch.randn(*(() if form in FLAT else (2,)), 6, 5, dtype=torch.float64)
    return Mixer(move, norm).double().eval(), x


@pytest.mark.parametrize("form", list(FORMS) + list(FLAT))
def test_permutation_matches_torch(form):
    """The dims :func:`permutation` says each op moves are the ones torch moves (sizes all distinct)."""
    move = (FORMS | FLAT)[form][1]
    x = torch.randn(*(() if form in FLAT else (2,)), 3, 4)
    program = torch.export.export(type("M", (nn.Module,), {"forward": lambda self, a: move(a)})(), (x,), strict=False)
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    assert len(nodes) == 1 and nodes[0].target in PERMUTES
    assert nodes[0].target.overloadpacket.__name__ == (FORMS | FLAT)[form][0]
    perm = permutation(nodes[0], x.dim())
    assert torch.equal(x.permute(perm), move(x))


def test_movedim_and_numpy_T_of_rank_4():
    x = torch.randn(2, 3, 4, 5)
    for move in (lambda a: a.movedim((0, 3), (2, 1)), lambda a: a.T, lambda a: a.permute(0, 2, 3, 1)):
        program = torch.export.export(type("M", (nn.Module,), {"forward": lambda self, a: move(a)})(), (x,), strict=False)
        node = next(n for n in program.graph.nodes if n.op == "call_function")
        assert torch.equal(x.permute(permutation(node, 4)), move(x))


@pytest.mark.parametrize("form", list(FORMS) + list(FLAT))
def test_widen_follows_the_channels_through_a_transpose(form):
    """``emb``'s channels reach the token-mixing Linears transposed (a batch dim there) and come back."""
    model, x = _mixer(form, norm=False)
    ref = copy.deepcopy(model)
    gm = as_grow_model(model, (x,))
    growcli.apply(gm, "widen", layer="emb", to=12)
    assert gm.module.emb.out_features == 12 and gm.module.fc1.in_features == 12 and gm.module.tok1.in_features == 6
    assert _diff(gm.module, ref, x) <= TOL


@pytest.mark.parametrize("form", ["mT", "permute", "movedim", "T"])
def test_hidden_growth_through_token_mixing(form):
    model, x = _mixer(form, norm=True)
    ref = copy.deepcopy(model)
    gm = as_grow_model(model, (x,))
    growcli.apply(gm, "hidden", to=16, start="emb")
    assert gm.module.emb.out_features == 16 and gm.module.norm.weight.shape == (16,)
    assert gm.module.tok1.weight.shape == (12, 6)  # token mixing does not grow
    assert _diff(gm.module, ref, x) <= TOL


class Reduce(nn.Module):
    """Channels moved to dim 1 by a permute, then a mean over ``dim``: 2 (tokens) keeps them, 1 reduces them."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim, self.fc1, self.fc2 = dim, nn.Linear(4, 8), nn.Linear(8 if dim == 2 else 6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)).permute(0, 2, 1).mean(self.dim))


def test_the_channel_dim_follows_a_permute_into_a_reduction():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    ok = Reduce(2).double().eval()
    ref = copy.deepcopy(ok)
    gm = as_grow_model(ok, (x,))
    growcli.apply(gm, "widen", layer="fc1", to=13)
    assert gm.module.fc2.in_features == 13 and _diff(gm.module, ref, x) <= TOL
    with pytest.raises(NotGrowableError, match=r"^'fc1': mean\.dim reduces over the grown dimension"):
        growcli.apply(as_grow_model(Reduce(1).double().eval(), (x,)), "widen", layer="fc1", to=13)


class ConvNHWC(nn.Module):
    """A convolution's NCHW output permuted to NHWC and read by a Linear (ConvNeXt's pointwise layers)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_widen_a_conv_read_in_nhwc():
    torch.manual_seed(0)
    model, x = ConvNHWC().double().eval(), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    ref = copy.deepcopy(model)
    gm = as_grow_model(model, (x,))
    growcli.apply(gm, "widen", layer="conv", to=10)
    assert gm.module.fc.in_features == 10 and _diff(gm.module, ref, x) <= TOL


# -- 3. index_put, index and index_add along other dims --------------------------------------------------------------

def _put(h, rows, chans, form):
    if form == "accumulate":  # tokens summed into 3 slots
        return torch.ops.aten.index_put(h.new_zeros(h.shape[0], 3, h.shape[2]), [None, rows.clamp(max=2)], h, True)
    if form == "in_place":  # x[:, idx] += v: index, add_, index_put_
        z = torch.zeros_like(h)
        z[:, rows] += h
        return z
    if form == "onto_itself":
        return torch.ops.aten.index_put(h, [None, rows[:2]], 2 * h[:, :2], True)
    if form == "overwrite":
        return torch.ops.aten.index_put(h, [None, rows[:2]], 2 * h[:, 1:3], False)
    if form == "broadcast":  # the same value for every channel
        return torch.ops.aten.index_put(h, [None, rows[:2]], torch.ones(1, dtype=h.dtype), True)
    if form == "index_add":
        return h.new_zeros(h.shape[0], 3, h.shape[2]).index_add(1, rows.clamp(max=2), h)
    if form == "channels":  # an index along the channels: refused
        return torch.ops.aten.index_put(h, [None, None, chans], torch.ones(2, 4, 2, dtype=h.dtype), True)
    raise AssertionError(form)


class Put(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form, self.fc1, self.fc2 = form, nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("rows", torch.tensor([0, 2, 2, 1]))
        self.register_buffer("chans", torch.tensor([0, 3]))

    def forward(self, x):
        return self.fc2(_put(torch.relu(self.fc1(x)), self.rows, self.chans, self.form))


PUTS = ["accumulate", "in_place", "onto_itself", "overwrite", "broadcast", "index_add"]


@pytest.mark.parametrize("form", PUTS)
@pytest.mark.parametrize("transform", ["widen", "hidden"])
def test_index_put_passes_channels_along_other_dims(form, transform):
    torch.manual_seed(0)
    model, x = Put(form).double().eval(), torch.randn(2, 4, 4, dtype=torch.float64)
    ref = copy.deepcopy(model)
    gm = as_grow_model(model, (x,))
    if transform == "hidden" and form == "broadcast":
        with pytest.raises(NotGrowableError, match="index_put.default writes a tensor growcli cannot follow"):
            growcli.apply(gm, "hidden", to=16, start="fc1")
        return
    if transform == "widen":
        growcli.apply(gm, "widen", layer="fc1", to=13)
    else:
        growcli.apply(gm, "hidden", to=16, start="fc1")
    assert gm.module.fc1.out_features == (13 if transform == "widen" else 16)
    assert _diff(gm.module, ref, x) <= TOL


@pytest.mark.parametrize("transform", ["widen", "hidden"])
def test_index_put_along_the_channels_is_refused(transform):
    gm = as_grow_model(Put("channels").double().eval(), (torch.randn(2, 4, 4, dtype=torch.float64),))
    with pytest.raises(NotGrowableError, match=r"index_put\.default indexes along the grown dimension"):
        growcli.apply(gm, transform, **({"layer": "fc1", "to": 13} if transform == "widen" else
                                        {"to": 16, "start": "fc1"}))


def test_index_result_dim():
    import torch.fx as fx

    graph = fx.Graph()

    def node(*shape, dtype=torch.int64):  # an index tensor with its recorded value, as the trace has it
        n = graph.placeholder(f"i{len(graph.nodes)}")
        n.meta["val"] = torch.zeros(shape, dtype=dtype)
        return n

    assert index_result_dim([None, node(5)], 3, 2) == (2, 3)          # x[:, idx]: dim 2 stays
    assert index_result_dim([None, node(5)], 3, 1) is None            # dim 1 is indexed
    assert index_result_dim([node(2, 5)], 3, 2) == (3, 4)             # a 2-D index replaces dim 0 by two dims
    assert index_result_dim([node(5), None, node(5)], 4, 1) == (1, 3)  # non-adjacent: the index dim goes first
    assert index_result_dim([node(3, 4, dtype=torch.bool)], 3, 2) == (1, 2)  # a mask indexes two dims
    x = torch.zeros(2, 3, 4, 5)
    assert x[torch.zeros(7, dtype=torch.long), :, torch.zeros(7, dtype=torch.long)].shape == (7, 3, 5)  # NumPy's rule
