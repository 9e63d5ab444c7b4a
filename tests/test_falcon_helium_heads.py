"""Heads picked out of a fused projection's heads axis (Falcon), and heads a config cannot describe (Helium).

Falcon's ``query_key_value`` output is viewed as ``[B, T, H + 2, hd]`` (multi-query: the query heads, then the
key's, then the value's, taken by a slice and by constant-index selects ``[-2]``, ``[-1]``) or as
``[B, T, kv, H/kv + 2, hd]`` (new decoder architecture: each key/value head's block holds its query heads, key and
value; the key/value broadcast over the group, then the (group, member) axes flattened). The attention analysis
reads these head picks by op semantics; growth copies query heads (multi-query) or whole blocks (grouped), and
the grown model, saved as a Hugging Face directory, reloads with ``from_pretrained``. Falcon derives head_dim from
hidden_size / heads, so its heads grow with the hidden size; Helium sizes ``o_proj`` by hidden_size, so heads
alone are refused, naming why, and grow with the hidden size. Everything is float64 (tolerance 1e-10: the only
rounding is the split of the output projection's columns into shares, about 1e-16 per product).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

import growcli
from conftest import perturb
from growcli.analysis.attention import attention_sites
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.runner import Output, Source, Step, grow
from growcli.transforms.width_edit import trace_width

VOCAB = 128
EXACT = 1e-10
T.utils.logging.set_verbosity_error()
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))  # inputs growcli has not seen

FALCONS = {
    "multi_query": dict(multi_query=True, bias=True),
    "new_arch_kv2": dict(new_decoder_architecture=True, num_kv_heads=2),
    "new_arch_kv1": dict(new_decoder_architecture=True, num_kv_heads=1, bias=True),
}


def _save(model: nn.Module, directory: Path) -> Path:
    torch.manual_seed(0)
    perturb(model.to(torch.float64).eval()).save_pretrained(directory)
    return directory


def _logits(cls, directory, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return cls.from_pretrained(str(directory), dtype=torch.float64).eval()(input_ids=ids).logits


def _worst(report) -> float:
    return max([report["verification"]["max_abs_diff"]] + [o["max_abs_diff"] for o in report["outputs"]])


@pytest.fixture(scope="module")
def falcons(tmp_path_factory):
    root = tmp_path_factory.mktemp("falcon")
    out = {}
    for name, extra in FALCONS.items():
        torch.manual_seed(0)
        config = T.FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, vocab_size=VOCAB, **extra)
        out[name] = _save(T.FalconForCausalLM(config), root / name)
    return out


@pytest.fixture(scope="module")
def helium(tmp_path_factory):
    torch.manual_seed(0)
    config = T.HeliumConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_hidden_layers=2, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    return _save(T.HeliumForCausalLM(config), tmp_path_factory.mktemp("helium") / "model")


def test_falcon_head_picks_locate_query_key_and_value_rows(falcons):
    """Multi-query: q rows [0, 32), k [32, 40), v [40, 48). New architecture: each 32-row block is one key/value
    head's group (2 query heads, key, value), copied whole."""
    sites = {name: attention_sites(trace_width(growcli.load_model(falcons[name]))) for name in FALCONS}
    mq = sites["multi_query"][0]
    assert (mq.kind, mq.heads, mq.kv_heads, mq.head_dim) == ("multi-query", 4, 1, 8)
    assert [(p.offset, p.size, p.head_size, p.members) for p in (mq.q, mq.k, mq.v)] == \
        [(0, 32, None, 1), (32, 8, None, 1), (40, 8, None, 1)]
    assert {name for name, _ in mq.params} == {"q", "k", "v"}  # the fused bias, split like the rows
    kv2 = sites["new_arch_kv2"][0]
    assert (kv2.kind, kv2.heads, kv2.kv_heads) == ("grouped-query", 4, 2)
    assert [(p.offset, p.size, p.head_size, p.members) for p in (kv2.q, kv2.k, kv2.v)] == \
        [(0, 64, 32, 2), (0, 64, 32, 1), (0, 64, 32, 1)]
    kv1 = sites["new_arch_kv1"][0]
    assert (kv1.kv_heads, kv1.q.head_size, kv1.q.members) == (1, 48, 4)


@pytest.mark.parametrize("name,options,keys", [
    ("multi_query", {"factor": 2}, (64, 8, 1)),
    ("new_arch_kv2", {"factor": 2}, (64, 8, 4)),
    ("new_arch_kv1", {"factor": 2}, (64, 8, 2)),  # one group → two: each copies the whole block
    ("multi_query", {"to": 48, "heads": 6}, (48, 6, 1)),  # uneven copies of query heads, LayerNorm mean padding
    ("new_arch_kv2", {"to": 48, "heads": 6}, (48, 6, 3)),
], ids=["multi_query_x2", "new_arch_kv2_x2", "new_arch_kv1_x2", "multi_query_48_6", "new_arch_kv2_48_6"])
def test_falcon_hidden_and_heads_grow_and_reload_with_from_pretrained(falcons, tmp_path, name, options, keys):
    out = tmp_path / "grown"
    report = grow(Source(falcons[name]), [Step("hidden", options)], [Output(str(out) + "/")], seed=0)
    assert report["function_preserving"] and _worst(report) <= EXACT
    saved = json.loads((out / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_attention_heads"], saved["num_kv_heads"]) == keys
    assert (saved["multi_query"], saved["new_decoder_architecture"]) == \
        (FALCONS[name].get("multi_query", True), FALCONS[name].get("new_decoder_architecture", False))
    diff = (_logits(T.FalconForCausalLM, falcons[name]) - _logits(T.FalconForCausalLM, out)).abs().max()
    assert float(diff) <= EXACT


def test_falcon_groups_grow_only_whole(falcons, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(NotGrowableError, match="5 heads: not a multiple of the 2 query heads per key/value head"):
        grow(Source(falcons["new_arch_kv2"]), [Step("hidden", {"to": 40, "heads": 5})], [Output(str(out) + "/")],
             seed=0)
    assert not out.exists()


@pytest.mark.parametrize("name", ["multi_query", "new_arch_kv2"])
def test_cli_falcon_heads_alone_refused_then_with_the_hidden_size_exact(cli, falcons, tmp_path, name):
    r = cli("widen", falcons[name], "--heads", "8", "-o", tmp_path / "never")
    assert r.code == 1 and "derives head_dim from hidden_size / num_attention_heads" in r.err, r.err
    assert "widen --hidden 64 --heads 8" in r.err and not (tmp_path / "never").exists()
    out = tmp_path / "grown"
    r = cli("widen", falcons[name], "--hidden", "64", "--heads", "8", "-o", out, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["verification"]["passed"]
    diff = (_logits(T.FalconForCausalLM, falcons[name]) - _logits(T.FalconForCausalLM, out)).abs().max()
    assert float(diff) <= EXACT


def test_cli_helium_heads_alone_refused_naming_the_output_projection(cli, helium, tmp_path):
    r = cli("widen", helium, "--heads", "8", "-o", tmp_path / "never")
    assert r.code == 1, r.err
    assert "o_proj.weight 32 input features whatever the number of heads" in r.err, r.err
    assert "widen --hidden 64 --heads 8" in r.err and not (tmp_path / "never").exists()
    found = growcli.transforms.catalog.get_transform("heads").candidates(growcli.load_model(helium))
    assert all("sizes them by hidden_size" in (reason or "") for reason in found.values()), found


def test_cli_helium_heads_with_the_hidden_size_reload_exact(cli, helium, tmp_path):
    out = tmp_path / "grown"
    r = cli("widen", helium, "--hidden", "64", "--heads", "8", "-o", out, "--json")
    assert r.code == 0, r.err
    saved = json.loads((out / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == \
        (64, 8, 4, 8)
    diff = (_logits(T.HeliumForCausalLM, helium) - _logits(T.HeliumForCausalLM, out)).abs().max()
    assert float(diff) <= EXACT


class FusedHeads(nn.Module):
    """Attention over a fused projection whose output is viewed ``[B, L, groups, members + 2, hd]`` (``flat``:
    ``[B, L, H + 2, hd]``, one key/value head); sizes are read from the weights, so the grown module runs."""

    def __init__(self, flat: bool, pick: str = "constant"):
        super().__init__()
        self.flat, self.pick, self.hd, self.members = flat, pick, 4, 2
        self.qkv = nn.Linear(8, (6 if flat else 2 * (2 + 2)) * 4)
        self.o = nn.Linear(16, 8)

    def forward(self, x):
        b, n, _ = x.shape
        hd = self.hd
        if self.flat:
            qkv = self.qkv(x).view(b, n, -1, hd)
            heads = qkv.shape[2] - 2
            k_at = [-2] if self.pick == "constant" else torch.arange(heads, heads + 1)
            q, k, v = qkv[:, :, :-2], qkv[:, :, k_at], qkv[:, :, [-1]]
        else:
            qkv = self.qkv(x).view(b, n, -1, self.members + 2, hd)
            q = qkv[:, :, :, :-2]
            k = torch.broadcast_to(qkv[:, :, :, [-2]], q.shape).flatten(2, 3)
            v = torch.broadcast_to(qkv[:, :, :, [-1]], q.shape).flatten(2, 3)
            q = q.flatten(2, 3)
            heads = q.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, n, heads * hd))


def _module_gm(model: nn.Module):
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return GrowModel(model, "module", Path("mem"), "0", spec_from_batch(((x,), {})))


@pytest.mark.parametrize("flat", [True, False], ids=["multi_query_picks", "group_member_blocks"])
def test_heads_grow_through_head_picks_in_a_plain_module(flat):
    torch.manual_seed(0)
    model = FusedHeads(flat).to(torch.float64).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = _module_gm(model)
    report = growcli.apply(gm, "heads", seed=0, factor=2)
    assert report.verification is not None and report.verification["max_abs_diff"] <= EXACT
    rows = gm.module.qkv.weight.shape[0]
    assert rows == (10 if flat else 16) * 4  # 8 query heads + k + v, or 4 groups of (2 + 2)
    assert tuple(gm.module.o.weight.shape) == (8, 32)
    ref = FusedHeads(flat).to(torch.float64).eval()
    ref.load_state_dict(before)
    x = torch.randn(3, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert float((gm.module(x) - ref(x)).abs().max()) <= EXACT


def test_a_head_index_computed_in_the_model_is_refused_naming_the_op():
    torch.manual_seed(0)
    gm = _module_gm(FusedHeads(True, pick="computed").to(torch.float64).eval())
    with pytest.raises(NotGrowableError, match="index selects from the attention input with indices computed in the "
                                               "model, which growcli cannot read"):
        growcli.apply(gm, "heads", seed=0, factor=2)
