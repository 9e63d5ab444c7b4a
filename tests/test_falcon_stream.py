"""Streamed Falcon growth: head picks planned on the meta device, constant indices included.

A streamed run plans on the meta device, where a tensor the forward builds from a literal (Falcon's key head
picked by ``fused_qkv[..., [-2], :]`` in transformers 4) is a lifted constant without values;
:mod:`growcli.analysis.literals` records the literal while tracing, so the plan reads the index. Each case saves a
tiny ``FalconForCausalLM`` (hidden 32, 4 heads, 2 layers, random weights, several shards), widens it with
``growcli widen DIR --hidden 2x`` through the CLI once streaming and once in memory, and requires every written tensor
to be equal, and the streamed output, reloaded with ``from_pretrained``, to give the original's logits (vocab is not
grown, so the logits are compared as they are): within 1e-10 computed in float64, for float64 and bf16 weights.

Falcon's attention code comes in two forms here: the installed one (multi-query heads taken by ``split`` along the
heads axis, the new architecture's groups by a second view and selects), and the same code with the picks written as
list indices, the way transformers 4 wrote them (``list_picks``: the constant case). ``computed`` picks the key head by
``torch.arange`` (refused in both paths, "computed in the model"); ``buffer`` by an index buffer built in ``__init__``,
which a meta-device model holds without values (streaming still refuses, naming the meta device).
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import dir_tensors, perturb
from transformers.models.falcon import modeling_falcon as MF

import growcli
from growcli.analysis.attention import attention_sites
from growcli.core.model import GrowModel
from growcli.io.hf_dir import hf_inputs
from growcli.run.stream_names import meta_model
from growcli.transforms.width_edit import trace_width

T.utils.logging.set_verbosity_error()
VOCAB = 128
EXACT = 1e-10
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))  # inputs growcli has not seen
LAYOUTS = {
    "multi_query": dict(multi_query=True, bias=True),
    "new_arch_kv2": dict(new_decoder_architecture=True, num_kv_heads=2),
    "new_arch_kv1": dict(new_decoder_architecture=True, num_kv_heads=1, bias=True),
}
SPLIT = "fused_qkv.split([self.num_heads, 1, 1], dim=-2)"
SELECT = "grouped[..., -2, :], grouped[..., -1, :]"
# The installed FalconAttention.forward with its key/value picks rewritten (old text → new text).
CODES = {
    "installed": [],
    "list_picks": [(SPLIT, "fused_qkv[..., :-2, :], fused_qkv[..., [-2], :], fused_qkv[..., [-1], :]"),
                   (SELECT, "grouped[..., [-2], :].flatten(-3, -2), grouped[..., [-1], :].flatten(-3, -2)")],
    "computed": [(SPLIT, "fused_qkv[..., :-2, :], fused_qkv[..., torch.arange(self.num_heads, self.num_heads + 1, "
                         "device=fused_qkv.device), :], fused_qkv[..., [-1], :]")],
    "buffer": [(SPLIT, "fused_qkv[..., :-2, :], fused_qkv[..., self.key_at, :], fused_qkv[..., [-1], :]")],
}


def _forward(code: str):
    source = textwrap.dedent(inspect.getsource(MF.FalconAttention.forward))
    for old, new in CODES[code]:
        assert source.count(old) == 1, f"the installed FalconAttention.forward no longer reads {old!r}"
        source = source.replace(old, new)
    namespace = dict(vars(MF))
    exec(compile(source, MF.__file__, "exec"), namespace)
    return namespace["forward"]


@pytest.fixture
def falcon_code(monkeypatch):
    """Make FalconAttention run the given form of its code (in memory, on the meta device, and when reloaded)."""

    def use(code: str) -> None:
        if code == "installed":
            return
        monkeypatch.setattr(MF.FalconAttention, "forward", _forward(code))
        if code == "buffer":
            init = MF.FalconAttention.__init__

            def with_buffer(self, *args, **kwargs):
                init(self, *args, **kwargs)
                self.register_buffer("key_at", torch.tensor([-2]), persistent=False)

            monkeypatch.setattr(MF.FalconAttention, "__init__", with_buffer)

    return use


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made: dict[tuple[str, str], Path] = {}

    def get(layout: str, dtype: str) -> Path:
        if (layout, dtype) not in made:
            torch.manual_seed(0)
            config = T.FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
                                    **LAYOUTS[layout])
            model = perturb(T.FalconForCausalLM(config).to(torch.float64).eval()).to(getattr(torch, dtype))
            path = tmp_path_factory.mktemp(f"{layout}-{dtype}") / "model"
            model.save_pretrained(str(path), max_shard_size="10KB")
            assert len(list(path.glob("*.safetensors"))) >= 3
            made[(layout, dtype)] = path
        return made[(layout, dtype)]

    return get


def _logits(directory: Path) -> torch.Tensor:
    with torch.no_grad():
        return T.FalconForCausalLM.from_pretrained(str(directory), dtype=torch.float64).eval()(input_ids=IDS).logits


# 2–3 s each on a quiet 2-core machine, 4–7 s on a loaded one: the constant case in float64 stays in the default run
CASES = [pytest.param(code, layout, dtype, id=f"{code}-{layout}-{dtype}",
                      marks=() if (code, dtype) == ("list_picks", "float64") else pytest.mark.slow)
         for code in ("installed", "list_picks") for layout in LAYOUTS for dtype in ("float64", "bfloat16")]


@pytest.mark.parametrize("code, layout, dtype", CASES)
def test_streamed_hidden_2x_equals_in_memory_and_keeps_the_logits(cli, falcon_code, checkpoint, tmp_path, code,
                                                                  layout, dtype):
    falcon_code(code)
    src = checkpoint(layout, dtype)
    runs = {}
    for mode in ("--streaming", "--no-streaming"):
        out = tmp_path / mode.strip("-")
        r = cli("widen", src, "--hidden", "2x", mode, "--shard-size", "20KB", "--batches", "1", "-o", out, "--json")
        assert r.code == 0, r.err
        runs[mode] = json.loads(r.out)
        assert runs[mode]["verification"]["passed"] and runs[mode]["function_preserving"]
    assert (runs["--streaming"]["execution"], runs["--no-streaming"]["execution"]) == ("streaming", "memory")
    stream, memory = dir_tensors(tmp_path / "streaming"), dir_tensors(tmp_path / "no-streaming")
    assert sorted(stream) == sorted(memory)
    for name in stream:
        assert stream[name].dtype == memory[name].dtype == getattr(torch, dtype), name
        assert torch.equal(stream[name], memory[name]), name
    saved = json.loads((tmp_path / "streaming" / "config.json").read_text())
    assert saved == json.loads((tmp_path / "no-streaming" / "config.json").read_text())
    kv = LAYOUTS[layout].get("num_kv_heads")
    assert (saved["hidden_size"], saved["num_attention_heads"]) == (64, 8)
    assert kv is None or saved["num_kv_heads"] == 2 * kv
    assert len(list((tmp_path / "streaming").glob("*.safetensors"))) > 1
    diff = (_logits(src) - _logits(tmp_path / "streaming")).abs().max()
    assert float(diff) <= EXACT, float(diff)


@pytest.mark.parametrize("code", ["installed", "list_picks"])
def test_the_meta_trace_holds_the_head_picks_of_the_in_memory_trace(falcon_code, checkpoint, code):
    """Planning on the meta device finds the same sites as in memory: q, k and v rows, heads and head_dim."""
    falcon_code(code)
    src = checkpoint("multi_query", "float64")
    meta = meta_model(src).to(torch.float64)  # as a streamed run builds it
    assert next(meta.parameters()).is_meta
    sites = [attention_sites(trace_width(gm)) for gm in
             (growcli.load_model(src), GrowModel(meta, "hf", src, "", hf_inputs(meta), hf_class="FalconForCausalLM"))]
    assert sites[0] == sites[1] and len(sites[0]) == 2
    mq = sites[1][0]
    assert (mq.heads, mq.kv_heads, mq.head_dim) == (4, 1, 8)
    assert [(p.offset, p.size) for p in (mq.q, mq.k, mq.v)] == [(0, 32), (32, 8), (40, 8)]


@pytest.mark.parametrize("mode", ["--streaming", "--no-streaming"])
def test_heads_alone_are_refused_streamed_or_not(cli, checkpoint, tmp_path, mode):
    r = cli("widen", checkpoint("multi_query", "float64"), "--heads", "8", mode, "-o", tmp_path / "never")
    assert r.code == 1, r.err
    assert "derives head_dim from hidden_size / num_attention_heads" in r.err, r.err
    assert "widen --hidden 64 --heads 8" in r.err and not (tmp_path / "never").exists()


@pytest.mark.parametrize("mode", ["--streaming", "--no-streaming"])
def test_an_index_computed_in_the_model_is_refused_in_both_paths(cli, falcon_code, checkpoint, tmp_path, mode):
    falcon_code("computed")
    r = cli("widen", checkpoint("multi_query", "float64"), "--hidden", "2x", mode, "-o", tmp_path / "never")
    assert r.code == 1, r.err
    assert "index in 'transformer.h.0.self_attention' selects from the attention input with indices computed in " \
           "the model, which growcli cannot read" in r.err, r.err
    assert not (tmp_path / "never").exists()


def test_an_index_buffer_without_values_on_the_meta_device_is_still_refused(cli, falcon_code, checkpoint, tmp_path):
    """A buffer made in ``__init__`` is a weight of the model, not a literal of its forward: on the meta device it has
    no values, and the streamed plan refuses, naming the way out."""
    falcon_code("buffer")
    r = cli("widen", checkpoint("multi_query", "float64"), "--hidden", "2x", "--streaming", "-o", tmp_path / "never")
    assert r.code == 1, r.err
    assert "selects from the attention input by a constant whose values a trace on the meta device does not hold " \
           "(a streamed run plans on it: grow this model in memory)" in r.err, r.err
    assert not (tmp_path / "never").exists()


class Picks(torch.nn.Module):
    """Literals of every kind the recorder knows, on a fused projection: a list index, ``torch.tensor`` and
    ``new_tensor`` (a float one too, which only gains its values)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        qkv = self.qkv(x).view(x.shape[0], 6, 4)
        scale = torch.tensor([1.0, 2.0, 3.0, 4.0], device=x.device)
        k = qkv.index_select(1, torch.tensor([4], device=x.device)) * scale
        return qkv[:, [1, 2]], k, qkv[:, qkv.new_tensor([5], dtype=torch.long)]


def test_literal_constants_of_a_meta_trace_hold_the_values_of_the_cpu_trace():
    from growcli.analysis.trace import trace_model

    consts = {}
    for device in ("cpu", "meta"):
        with torch.device(device):
            model = Picks().eval()
        trace = trace_model(model, ((torch.zeros(2, 8, device=device),), {}))
        consts[device] = [getattr(trace.gm, n.target)
                          for n in trace.graph.nodes if n.op == "get_attr" and "." not in str(n.target)]
    assert len(consts["cpu"]) == len(consts["meta"]) == 4
    for a, b in zip(consts["cpu"], consts["meta"]):
        assert b.device.type == "cpu" and b.dtype == a.dtype and torch.equal(a, b)
    assert sorted(t.tolist() for t in consts["meta"] if not t.is_floating_point()) == [[1, 2], [4], [5]]
