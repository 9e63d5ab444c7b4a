"""``--inputs FILE`` is the batch the analysis traces the model on, not only the verification batch.

A model whose forward works only on the user's shapes (no input shape is known for it otherwise)
grows with ``--inputs``; the trace sees exactly the user's tensors. A Hugging Face model's user batch
may have another sequence length than the generated one; other dims stay checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from growcli.core.errors import InputsError
from growcli.core.inputs import InputSpec, TensorSpec, make_batches, with_example
from growcli.io.formats import load_inputs_file


class Conv(nn.Module):
    """Two 1-d convolutions over a [B, 5, 7] signal: nothing in the weights says how long the signal is."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(5, 8, 3)
        self.c2 = nn.Conv1d(8, 4, 3)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


def conv_model() -> nn.Module:
    return Conv().double()


def _save_inputs(path: Path, **tensors: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture
def traced(monkeypatch):
    """The shapes of every batch the widen analysis traces (recorded, then traced as usual)."""
    import growcli.transforms.widen as widen

    class Seen(list):
        dtypes: list[dict[str, torch.dtype]] = []

    seen = Seen()
    real = widen.trace_model

    def record(module, batch):
        named = {**{str(i): a for i, a in enumerate(batch[0])}, **batch[1]}
        seen.append({k: tuple(v.shape) for k, v in named.items()})
        seen.dtypes.append({k: v.dtype for k, v in named.items()})
        return real(module, batch)

    monkeypatch.setattr(widen, "trace_model", record)
    return seen


def test_with_example_keeps_the_spec_and_fills_an_empty_one():
    batch = ((torch.ones(3, 5, 7),), {})
    spec = InputSpec((TensorSpec((2, 5, 7)),))
    assert with_example(spec, batch).args == spec.args and with_example(spec, batch).example is batch
    built = with_example(InputSpec(), batch)
    assert built.args == (TensorSpec((3, 5, 7), "float32"),) and built.example is batch
    assert make_batches(built, 2)[0] is batch and tuple(make_batches(built, 2)[1][0][0].shape) == (3, 5, 7)


def test_a_model_with_no_known_input_shape_grows_on_the_users_batch(cli, tmp_path, traced):
    torch.manual_seed(0)
    model = conv_model()
    weights = tmp_path / "conv.pt"
    torch.save(model.state_dict(), weights)
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    inputs = _save_inputs(tmp_path / "x.safetensors", **{"0": x})
    out = tmp_path / "wide.safetensors"
    arch = "test_user_inputs:conv_model"
    no = cli("widen", weights, "--arch", arch, "--layer", "c1", "--factor", "2", "-o", out)
    assert no.code == 1 and "--inputs FILE" in no.err and len(no.err.strip().splitlines()) == 1
    r = cli("widen", weights, "--arch", arch, "--layer", "c1", "--factor", "2", "--inputs", inputs, "-o", out, "--json")
    assert r.code == 0, r.err
    assert traced and all(s == {"0": (3, 5, 7)} for s in traced)
    from growcli.api import load_grown

    grown = load_grown(conv_model(), out)
    assert grown.c1.out_channels == 16
    with torch.no_grad():
        diff = float((grown.double()(x) - model(x)).abs().max())
    assert diff <= 1e-10


# -- a Hugging Face model on a user batch of another sequence length ----------------------------

VOCAB = 96


def _bert(directory: Path) -> Path:
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
    T.BertForMaskedLM(config).to(torch.float64).eval().save_pretrained(directory)
    return directory


def _logits_diff(cls: str, a: Path, b: Path, ids: torch.Tensor) -> float:
    """max |logits| difference of two saved directories of transformers class ``cls``, in float64."""
    import transformers as T

    x, y = (getattr(T, cls).from_pretrained(str(d), dtype=torch.float64).eval() for d in (a, b))
    with torch.no_grad():
        return float((x(input_ids=ids).logits - y(input_ids=ids).logits).abs().max())


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_hf_model_traces_and_grows_on_a_user_batch_of_length_5(tmp_path, traced, streaming):
    from growcli.run.runner import Output, Source, Step, grow

    src = _bert(tmp_path / "bert")
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    inputs = _save_inputs(tmp_path / "ids.safetensors", input_ids=ids)
    out = tmp_path / "wide"
    report = grow(Source(src, inputs_file=inputs), [Step("widen", {"layer": "intermediate.dense", "factor": 2})],
                  [Output(str(out) + "/")], seed=0, streaming=streaming)
    assert report["execution"] == ("streaming" if streaming else "memory")
    assert traced and all(s == {"input_ids": (3, 5)} for s in traced)
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= 1e-10
    assert _logits_diff("BertForMaskedLM", src, out, ids) <= 1e-10


def test_a_user_batch_may_change_the_sequence_length_but_no_other_dim(tmp_path):
    spec = InputSpec(kwargs=(("input_ids", TensorSpec((2, 8), "int64", VOCAB)), ("pixels", TensorSpec((2, 3, 4)))),
                     seq=("input_ids",))
    ok = _save_inputs(tmp_path / "ok.safetensors", input_ids=torch.zeros(3, 5, dtype=torch.int64),
                      pixels=torch.zeros(1, 3, 4))
    args, kwargs = load_inputs_file(ok, spec)
    assert tuple(kwargs["input_ids"].shape) == (3, 5) and tuple(kwargs["pixels"].shape) == (1, 3, 4)
    bad = _save_inputs(tmp_path / "bad.safetensors", pixels=torch.zeros(2, 5, 4))
    with pytest.raises(InputsError) as err:
        load_inputs_file(bad, spec)
    assert str(err.value) == f"{bad}: input pixels has shape [2, 5, 4], the model expects [batch, 3, 4]"
    extra = _save_inputs(tmp_path / "extra.safetensors", input_ids=torch.zeros(2, 8, 1, dtype=torch.int64))
    with pytest.raises(InputsError, match=r"input input_ids has shape \[2, 8, 1\], the model expects \[batch, 8\]"):
        load_inputs_file(extra, spec)
    positional = InputSpec((TensorSpec((2, 8), "int64", VOCAB),), seq=("0",))
    assert tuple(load_inputs_file(_save_inputs(tmp_path / "p.safetensors", **{"0": torch.zeros(2, 3, dtype=torch.int64)}),
                                  positional)[0][0].shape) == (2, 3)


@pytest.mark.slow
def test_a_streamed_chain_plans_every_step_on_the_users_batch(tmp_path, traced, monkeypatch):
    import growcli.run.stream_chain as chain
    from growcli.run.runner import Output, Source, Step, grow

    sampled: list[tuple[int, ...]] = []
    real = chain.sample_batch

    def record(module, seed=0, batch=None):
        out = real(module, seed, batch)
        sampled.append(tuple(out[1]["input_ids"].shape))
        return out

    monkeypatch.setattr(chain, "sample_batch", record)
    src = _llama(tmp_path / "llama")
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    inputs = _save_inputs(tmp_path / "ids.safetensors", input_ids=ids)
    out = tmp_path / "deep"
    report = grow(Source(src, inputs_file=inputs),
                  [Step("deepen", {"after": "model.layers.0", "block": True}),
                   Step("widen", {"layer": "mlp.up_proj", "factor": 2})],
                  [Output(str(out) + "/")], seed=0, streaming=True)
    assert report["execution"] == "streaming" and report["function_preserving"]
    assert sampled == [(3, 5)] and traced and all(s == {"input_ids": (3, 5)} for s in traced)
    assert report["verification"]["max_abs_diff"] <= 1e-10 and _logits_diff("LlamaForCausalLM", src, out, ids) <= 1e-10


def _llama(directory: Path) -> Path:
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=32)
    T.LlamaForCausalLM(config).to(torch.float64).eval().save_pretrained(directory)
    return directory


def test_a_bf16_vit_is_traced_on_bf16_pixels(tmp_path, traced):
    import transformers as T
    from growcli.run.runner import Output, Source, Step, grow

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         image_size=16, patch_size=8, num_labels=3)
    src = tmp_path / "vit"
    T.ViTForImageClassification(config).to(torch.bfloat16).eval().save_pretrained(src)
    report = grow(Source(src), [Step("widen", {"layer": "vit.layers.0.mlp.fc1", "factor": 2})],
                  [Output(str(tmp_path / "grown") + "/")], seed=0)
    assert traced == [{"pixel_values": (2, 3, 16, 16)}] and traced.dtypes == [{"pixel_values": torch.bfloat16}]
    assert report["function_preserving"] and report["verification"]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("transform,options", [
    ("deepen", {"after": "model.layers.0", "block": True}),
    ("stack", {"factor": 2, "init": "identity", "blocks": "model.layers"}),
], ids=["deepen", "stack"])
def test_a_streamed_depth_step_plans_on_the_users_batch(tmp_path, monkeypatch, transform, options):
    import growcli.run.deepen_stream as deepen_stream
    import growcli.run.streaming as streaming
    from growcli.run.runner import Output, Source, Step, grow

    sampled: list[tuple[int, ...]] = []
    for where in (deepen_stream, streaming):
        real = where.sample_batch
        monkeypatch.setattr(where, "sample_batch", lambda module, seed=0, batch=None, real=real: sampled.append(
            tuple(real(module, seed, batch)[1]["input_ids"].shape)) or real(module, seed, batch))
    src = _llama(tmp_path / "llama")
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    out = tmp_path / "deep"
    report = grow(Source(src, inputs_file=_save_inputs(tmp_path / "ids.safetensors", input_ids=ids)),
                  [Step(transform, options)], [Output(str(out) + "/")], seed=0, streaming=True)
    assert report["execution"] == "streaming" and report["function_preserving"]
    assert sampled and set(sampled) == {(3, 5)}
    assert report["verification"]["max_abs_diff"] <= 1e-10 and _logits_diff("LlamaForCausalLM", src, out, ids) <= 1e-10
