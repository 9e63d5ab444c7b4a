"""A float64 model whose own code makes tensors in torch's default dtype still verifies in float64.

XGLM's eager attention clamps its scores with ``torch.full((), finfo(scores.dtype).min)`` and no
dtype: under torch's float32 default that overflows for float64 scores, so the model failed on
every forward pass growcli ran (``deepen --block`` stopped with the model's RuntimeError, and FFN
``widen`` was verified partly in float32, 1.8e-7). growcli runs float64 models with float64 as the
default dtype (:func:`growcli.core.model.weights_default_dtype`) and leaves the default as it was.
"""

from __future__ import annotations

import pytest
import torch

from growcli.run.runner import Output, Source, Step, grow

EXACT = 1e-10


@pytest.fixture(scope="module")
def xglm(tmp_path_factory):
    from transformers import XGLMConfig, XGLMForCausalLM

    config = XGLMConfig(vocab_size=64, d_model=16, num_layers=2, attention_heads=2, ffn_dim=32,
                        max_position_embeddings=32, use_cache=False)
    torch.manual_seed(0)
    model = XGLMForCausalLM(config).to(torch.float64).eval()
    path = tmp_path_factory.mktemp("xglm") / "model"
    model.save_pretrained(path)
    return path


def test_the_default_dtype_is_restored(xglm, tmp_path):
    assert torch.get_default_dtype() == torch.float32
    report = grow(Source(xglm), [Step("deepen", {"after": "model.layers.0", "block": True})],
                  [Output(tmp_path / "deep")])
    assert torch.get_default_dtype() == torch.float32
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= EXACT


@pytest.mark.parametrize("step", [Step("deepen", {"after": "model.layers.0", "block": True}),
                                  Step("stack", {"factor": 2, "init": "identity"})])
def test_xglm_depth_growth_is_exact_in_float64(xglm, tmp_path, step):
    from transformers import XGLMForCausalLM

    report = grow(Source(xglm), [step], [Output(tmp_path / "out")])
    assert report["verification"]["max_abs_diff"] <= EXACT
    a = XGLMForCausalLM.from_pretrained(xglm).to(torch.float64).eval()
    b = XGLMForCausalLM.from_pretrained(tmp_path / "out").to(torch.float64).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    torch.set_default_dtype(torch.float64)  # the model's own float64 forward needs it (see the docstring)
    try:
        with torch.no_grad():
            diff = (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()
    finally:
        torch.set_default_dtype(torch.float32)
    assert len(b.model.layers) > len(a.model.layers) and diff <= EXACT
