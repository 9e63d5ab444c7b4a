"""The one residual-writer analysis and the one depth bookkeeping, shared by deepen --block and stack.

Real modules only: tiny transformers models (random weights) built on CPU and on the meta
device, the zoo ResNet, and small blocks written here for the shapes the analysis accepts
(parallel branches, residual multipliers, layer scale, reshapes on the stream) or refuses.
Exactness is checked in float64 against the model before the step.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growcli import zoo
from growcli.analysis.depth import depth_changes, index_attributes, insert_order
from growcli.analysis.residual import ResidualRefusal, block_writers, follows, stack_writers
from growcli.core.errors import NotGrowableError
from growcli.analysis.trace import trace_model
from growcli.core.inputs import cast_batch, make_batches
from growcli.core.model import GrowModel
from growcli.io.hf_dir import hf_input_spec
from growcli.io.weights import infer_input_spec
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context
from growcli.transforms.stack import trace_for_writers


def _configs():
    import transformers as T

    small = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=32)
    return {
        "llama": (T.LlamaForCausalLM, lambda: T.LlamaConfig(**small, num_key_value_heads=1, use_cache=False)),
        "qwen2": (T.Qwen2ForCausalLM, lambda: T.Qwen2Config(**small, num_key_value_heads=1, use_cache=False)),
        "gpt2": (T.GPT2LMHeadModel, lambda: T.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                                          use_cache=False)),
        "bert": (T.BertModel, lambda: T.BertConfig(**small)),
    }


HF = {  # family → (container, each block's writers, post-LN)
    "llama": ("model.layers", {"self_attn.o_proj.weight", "mlp.down_proj.weight"}, False),
    "gpt2": ("transformer.h", {"attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"},
             False),
    "bert": ("encoder.layer", {"attention.output.dense.weight", "attention.output.dense.bias", "output.dense.weight",
                               "output.dense.bias"}, True),
}


def _hf(family: str, device: str = "cpu") -> nn.Module:
    cls, config = _configs()[family]
    torch.manual_seed(0)
    with torch.device(device):
        return cls(config()).eval()


def _gm(model: nn.Module, inputs=None) -> GrowModel:
    return GrowModel(model, "state_dict", Path("x"), "", inputs or infer_input_spec(model))


def _analyse(model: nn.Module, container: str, spec=None):
    batch = make_batches(spec or (hf_input_spec(model) if hasattr(model, "config") else infer_input_spec(model)), 1)[0]
    batch = cast_batch(batch, next(model.parameters()).dtype)
    return stack_writers(trace_for_writers(model, batch), model, container)


@pytest.mark.parametrize("family", list(HF))
def test_real_and_meta_traces_find_the_same_writers(family):
    container, writers, post_ln = HF[family]
    real, meta = _hf(family), _hf(family, "meta")
    assert next(meta.parameters()).is_meta
    on_real, on_meta = _analyse(real, container), _analyse(meta, container, hf_input_spec(real))
    assert on_real == on_meta and set(on_real) == {0, 1}
    for i, found in on_real.items():
        assert found.block == f"{container}.{i}" and set(found.writers) == writers
        assert bool(found.post_norms) == post_ln and not found.post
    if post_ln:
        assert on_real[0].norm_sites == (("aten.layer_norm", f"{container}.0.attention.output.LayerNorm"),
                                         ("aten.layer_norm", f"{container}.0.output.LayerNorm"))


def test_zoo_resnet_real_and_meta():
    real = zoo.ResNetTiny().eval()
    with torch.device("meta"):
        meta = zoo.ResNetTiny().eval()
    a, b = _analyse(real, "layer1"), _analyse(meta, "layer1", infer_input_spec(real))
    assert a == b
    assert a[0].writers == ("bn2.bias", "bn2.weight") and a[0].post == (("clamp", 0.0, None),)
    assert a[0].post_sites == (("aten.relu", "layer1.0"),)
    assert follows(a[0], a[1]) is None  # a relu block after a relu block: relu(x) = x there


# --------------------------------------------------------------------------- what the analysis accepts
class Parallel(nn.Module):
    """GPT-J style: x + attn(ln(x)) + mlp(ln(x)), the two branches summed before the residual add."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.ln, self.a, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.ln(x)
        return x + (self.a(h) + self.down(F.gelu(self.up(h))))


class Scaled(nn.Module):
    """A residual multiplier and a reshape on the stream, a layer scale γ ⊙ F(x), a bias added after a layer."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.ln, self.fc, self.fc2, self.fc3 = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d, False), nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        b, t, d = x.shape
        flat = x.reshape(b * t, d) + 0.25 * self.fc(self.ln(x)).reshape(b * t, d)
        x = flat.reshape(b, t, d)
        return x + self.gamma * torch.tanh(self.fc3(self.ln(x))) + (self.fc2(self.ln(x)) + self.bias)


class Net(nn.Module):
    def __init__(self, *blocks: nn.Module, d: int = 8):
        super().__init__()
        self.inp, self.blocks, self.out = nn.Linear(d, d), nn.ModuleList(blocks), nn.Linear(d, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)

    def example_inputs(self):
        return (torch.randn(2, 4, 8),)


def _stacked(model: nn.Module, **options):
    gm = _gm(model.double())
    report = run_step(gm, "stack", {"init": "identity", **options}, Context(), VerifySettings(batches=2))
    return gm, report


@pytest.mark.parametrize("block,writers", [
    (Parallel, ("a.bias", "a.weight", "down.bias", "down.weight")),
    (Scaled, ("bias", "fc.bias", "fc.weight", "fc2.weight", "gamma")),
])
def test_parallel_branches_multipliers_layer_scale_and_reshapes_are_exact(block, writers):
    torch.manual_seed(1)
    model = Net(block(), block()).eval()
    found = _analyse(model, "blocks")
    assert found[0].writers == found[1].writers == writers
    gm, report = _stacked(model)
    assert report.exact and report.verification["dtype"] == "float64"
    assert report.verification["max_abs_diff"] <= 1e-12
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    assert report.params_after - report.params_before == 2 * per_block


class Relu(nn.Module):
    """relu(x + F(x)) when ``last``, else x + F(x)."""

    def __init__(self, last: bool, d: int = 8):
        super().__init__()
        self.fc, self.last = nn.Linear(d, d), last

    def forward(self, x):
        y = x + self.fc(x)
        return F.relu(y) if self.last else y


def test_relu_blocks_are_exact_only_where_the_copy_follows_a_relu():
    torch.manual_seed(2)
    model = Net(Relu(True), Relu(False)).eval()
    with pytest.raises(ResidualRefusal) as err:
        _stacked(copy.deepcopy(model))  # order 0,1,0,1: the copy of block 0 follows block 1, which has no relu
    r = err.value.refusal
    assert (r.block, r.op, r.module) == ("blocks.0", "aten.relu", "blocks.0")
    assert str(err.value) == ("stack --init identity: block blocks.0: aten.relu in blocks.0 after its residual add is "
                              "the identity only on its own outputs, but a copy of blocks.0 would follow blocks.1, "
                              "which does not end in it, so the copy would change its input; use --init copy")
    _, report = _stacked(model, order="interleave")  # 0,0,1,1: every copy follows its own source
    assert report.exact and report.verification["max_abs_diff"] <= 1e-12


# --------------------------------------------------------------------------- refusals name op and module
class GeluOut(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return F.gelu(x + self.fc(x))


class TanhBranch(GeluOut):
    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class ReluBetween(GeluOut):
    def forward(self, x):
        return F.relu(x + self.fc(x)) + self.fc(x)


class Narrowing(GeluOut):
    def forward(self, x):
        return (x.to(torch.float32) + self.fc(x).to(torch.float32)).to(x.dtype)


@pytest.mark.parametrize("block,op,module,reason", [
    (GeluOut, "aten.gelu", "blocks.0", "its output comes from aten.gelu in blocks.0, not from a residual add"),
    (TanhBranch, "aten.tanh", "blocks.0", "aten.tanh in blocks.0 sits on a residual branch and growcli has no rule"),
    (ReluBetween, "aten.relu", "blocks.0", "aten.relu in blocks.0 sits between two residual adds"),
    (Narrowing, "aten.to", "blocks.0", "casts the residual stream from torch.float64 to torch.float32"),
])
def test_refusals_name_op_and_module(block, op, module, reason):
    model = Net(block(), block()).double().eval()
    with pytest.raises(ResidualRefusal) as err:
        _analyse(model, "blocks")
    r = err.value.refusal
    assert (r.block, r.op, r.module) == ("blocks.0", op, module) and reason in r.reason
    assert str(err.value) == f"block blocks.0: {r.reason}" and "\n" not in str(err.value)


class SkipBlock(GeluOut):
    def forward(self, x, x0):
        return x0 + self.fc(x)  # adds the embedding, not its own input


class GlobalSkip(Net):
    def forward(self, x):
        x0 = x = self.inp(x)
        for block in self.blocks:
            x = block(x, x0)
        return self.out(x)


def test_a_stream_not_starting_at_the_previous_block_is_refused():
    model = GlobalSkip(SkipBlock(), SkipBlock()).eval()
    with pytest.raises(ResidualRefusal) as err:
        _analyse(model, "blocks")
    r = err.value.refusal
    assert (r.block, r.op, r.module) == ("blocks.1", "aten.linear", "inp")
    assert r.reason == ("its residual stream starts at aten.linear in inp, not at the output of block blocks.0, so a "
                        "copy would pass that tensor on")
    for after in ("blocks.0", "blocks.1"):  # deepen --block checks the same, before any edit
        gm = _gm(copy.deepcopy(model))
        with pytest.raises(ResidualRefusal, match="block blocks.1: its residual stream starts at aten.linear in inp"):
            run_step(gm, "deepen", {"after": after, "block": True}, Context())
        assert not gm.edits.records


def test_projection_shortcut_refusal_is_structured():
    model = zoo.ResNetTiny().eval()
    trace = trace_model(model, make_batches(infer_input_spec(model), 1)[0])
    with pytest.raises(NotGrowableError) as err:
        block_writers(trace, model, "layer2.0")
    r = err.value.refusal
    assert (r.block, r.op, r.module) == ("layer2.0", "aten.add", "layer2.0") and "projection shortcut" in r.reason


# --------------------------------------------------------------------------- depth bookkeeping
@pytest.mark.parametrize("transform,options,order", [
    ("deepen", {"after": "model.layers.0", "block": True}, [0, 0, 1]),
    ("stack", {"to": 3}, [0, 1, 0]),
    ("stack", {"layers": "0-1,1"}, [0, 1, 1]),
])
def test_depth_follows_for_deepen_and_stack(transform, options, order):
    model = _hf("qwen2")
    types = model.config.layer_types
    model.config.layer_types = ["full_attention", "sliding_attention"]  # only for the remap; not run
    assert depth_changes(model, "model.layers", order).config == {
        "num_hidden_layers": 3, "layer_types": [["full_attention", "sliding_attention"][i] for i in order]}
    model.config.layer_types = types
    changes = depth_changes(model, "model.layers", order)
    gm = GrowModel(model, "hf", Path("qwen2"), "", hf_input_spec(model), hf_class=type(model).__name__)
    extra = {} if transform == "deepen" else {"init": "identity"}
    report = run_step(gm, transform, {**options, **extra}, Context(), VerifySettings(batches=2))
    assert report.verification["max_abs_diff"] <= 1e-10
    assert gm.module.config.num_hidden_layers == 3 and len(gm.module.config.layer_types) == 3
    assert [b.self_attn.layer_idx for b in gm.module.model.layers] == [0, 1, 2]
    assert [(r["module"], r["value"]) for r in gm.edits.records if r["op"] == "attr"] == [
        (path, value) for path, _, value in changes.attrs] and changes.attrs


def test_depths_entry_of_a_staged_model():
    import transformers as T

    model = T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic"))
    assert depth_changes(model, "encoder.stages.0.layers", [0, 1, 0, 1]).config == {"depths": [4, 2]}
    assert depth_changes(model, "encoder.stages.1.layers", insert_order(2, 1)).config == {"depths": [2, 3]}
    with torch.device("meta"):
        meta = T.ResNetModel(model.config)
    assert depth_changes(meta, "encoder.stages.1.layers", [0, 1, 1]).config == {"depths": [2, 3]}


class Numbered(nn.Module):
    def __init__(self, i: int, d: int = 8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.layer_number, self.fc.layer_id, self.width = i + 1, i, d

    def forward(self, x):
        return x + self.fc(x)


def test_index_attributes_zero_and_one_based():
    model = Net(*(Numbered(i) for i in range(3)))
    assert index_attributes(model.blocks) == [("", "layer_number", 1), ("fc", "layer_id", 0)]
    changes = depth_changes(model, "blocks", [0, 1, 2, 0, 1, 2])
    assert changes.config == {}
    assert changes.attrs == [("blocks.3", "layer_number", 4), ("blocks.4", "layer_number", 5),
                             ("blocks.5", "layer_number", 6), ("blocks.3.fc", "layer_id", 3),
                             ("blocks.4.fc", "layer_id", 4), ("blocks.5.fc", "layer_id", 5)]
    single = Net(Numbered(0))
    assert index_attributes(single.blocks) == [("fc", "layer_id", 0)]  # one block: only the known index names
