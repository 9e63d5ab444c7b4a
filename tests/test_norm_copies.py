"""widen through LayerNorm and GroupNorm over the grown channels, by whole copies.

When every channel is copied the same number of times (new size ``k·C``), a LayerNorm over the channels sees
each value ``k`` times: the same mean and variance, so its outputs are copies; a GroupNorm needs the copies
inside their group (growcli.analysis.norms, growcli.transforms.channels). Each growth is checked in float64
against the original on new inputs (≤ 1e-10; bf16 weights evaluated in float64: ≤ 1e-12 relative): Hugging
Face models reloaded with ``from_pretrained`` and the grown safetensors replayed onto them (``load_grown``);
``.pt2`` programs replayed and read back as written. Sizes that are not whole multiples and inits whose new
channels are not copies are refused, naming the norm, with nothing written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import as_grow_model, perturb, relative_diff
from torch import nn

import growcli
from growcli.analysis.coupled_group import NormSite
from growcli.analysis.coupling import analyze
from growcli.analysis.trace import trace_model
from growcli.core.errors import NotGrowableError
from growcli.io.formats import safetensors_metadata
from growcli.transforms.channels import channel_map
from growcli.transforms.gradmax_site import find_site

TOL = 1e-10


def images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def max_diff(a: nn.Module, b: nn.Module, inputs: list[torch.Tensor]) -> float:
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            ya, yb = a(x), b(x)
        ya, yb = getattr(ya, "logits", ya), getattr(yb, "logits", yb)
        assert ya.shape == yb.shape
        worst = max(worst, float((ya - yb).abs().max()))
    return worst


# -- Hugging Face vision classifiers: LayerNorm over channels (ConvNeXt, ConvNeXtV2, FocalNet), GroupNorm(1, C) ----

HF = {  # family: (config keys); the tiny configs of docs/cnn_zoo.py with one block per stage
    "convnext": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    "convnextv2": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    "poolformer": dict(hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2, patch_sizes=[7, 3], strides=[4, 2],
                       padding=[2, 1]),
    "focalnet": dict(embed_dim=8, hidden_sizes=[16, 32], depths=[1, 1], focal_levels=[2, 2], focal_windows=[3, 3]),
}

# (family, layer, factor, old channels, the norm the report names first)
HF_CASES = [
    ("convnext", "convnext.embeddings.patch_embeddings", 2, 8, "convnext.embeddings.layernorm"),
    ("convnext", "convnext.embeddings.patch_embeddings", 3, 8, "convnext.embeddings.layernorm"),
    ("convnext", "convnext.encoder.stages.1.downsampling_layer.1", 2, 16, "convnext.encoder.stages.1.layers.0.layernorm"),
    ("convnextv2", "convnextv2.embeddings.patch_embeddings", 2, 8, "convnextv2.embeddings.layernorm"),
    ("convnextv2", "convnextv2.encoder.stages.1.downsampling_layer.1", 2, 16,
     "convnextv2.encoder.stages.1.layers.0.layernorm"),
    ("poolformer", "poolformer.encoder.patch_embeddings.0.projection", 2, 8, "poolformer.encoder.block.0.0.before_norm"),
    ("poolformer", "poolformer.encoder.patch_embeddings.1.projection", 2, 16, "poolformer.encoder.block.1.0.before_norm"),
]


def hf_class(family: str):
    import transformers
    from transformers.models.auto import modeling_auto as auto

    name = auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[family]
    return getattr(transformers, name[0] if isinstance(name, (tuple, list)) else name)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family → a saved tiny float64 classifier (5 labels, 32×32 images, every parameter perturbed)."""
    from transformers import CONFIG_MAPPING

    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            torch.manual_seed(0)
            config = CONFIG_MAPPING[family](num_labels=5, image_size=32, **HF[family])
            model = perturb(hf_class(family)(config).to(torch.float64).eval())
            cache[family] = tmp_path_factory.mktemp(family) / "hf"
            model.save_pretrained(cache[family])
        return cache[family]

    return get


def reload(family: str, directory: Path) -> nn.Module:
    return hf_class(family).from_pretrained(str(directory), dtype=torch.float64).eval()


@pytest.mark.parametrize("family,layer,factor,size,first_norm", HF_CASES,
                         ids=[f"{c[0]}-{c[1].rsplit('.', 2)[-2]}.{c[1].rsplit('.', 1)[-1]}-x{c[2]}" for c in HF_CASES])
def test_hugging_face_cnn_widens_through_its_norms_exactly(cli, tmp_path, hf_dirs, family, layer, factor, size,
                                                           first_norm):
    src = hf_dirs(family)
    out = tmp_path / "grown.safetensors"
    r = cli("widen", src, "--layer", layer, "--factor", factor, "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= TOL
    assert report["function_preserving"]
    note = next(n for n in report["steps"][0]["notes"] if "norm(s) over the channels" in n)
    assert f"{first_norm}" in note and f"copied {factor} times" in note
    changes = {c["name"]: c["after"] for c in report["steps"][0]["changes"]}
    assert changes[f"{first_norm}.weight"] == [factor * size]

    original = reload(family, src)
    grown = growcli.load_grown(reload(family, src), out)  # the recorded edits replayed on a fresh from_pretrained
    assert tuple(grown.get_parameter(f"{layer}.weight").shape)[0] == factor * size
    norm = grown.get_submodule(first_norm)
    assert (tuple(norm.normalized_shape) if hasattr(norm, "normalized_shape") else norm.num_channels) in \
        ((factor * size,), factor * size)
    assert max_diff(original, grown, [images(s) for s in (21, 22)]) <= TOL


@pytest.mark.parametrize("layer", ["focalnet.embeddings.patch_embeddings.projection",
                                   "focalnet.encoder.stages.0.downsample.projection"], ids=["stem", "downsample"])
def test_focalnet_stream_fails_verification_because_its_code_sizes_a_split_by_the_channels(cli, tmp_path, hf_dirs,
                                                                                           layer):
    """FocalNet's norms pass (the analysis reaches the whole stream), but its modulation splits its projection's
    output with sizes read from the stream at run time (``hidden_state.shape[-1]``), which the trace holds as
    literals: the grown model cannot run, the step fails with the model's error (exit 1) and nothing is written."""
    out = tmp_path / "grown.safetensors"
    r = cli("widen", hf_dirs("focalnet"), "--layer", layer, "--factor", 2, "-o", out)
    assert r.code == 1
    assert "the grown model failed on inputs" in r.err and "split_with_sizes" in r.err
    assert not out.exists()


def test_hugging_face_directory_output_is_refused_when_no_config_describes_the_stream(cli, tmp_path, hf_dirs):
    """A stage's stream grows (hidden_sizes[0] 8 → 16) but its MLP does not (4·hidden_sizes[0] stays 32): no
    ConvNextConfig builds that model, so a directory is refused and .safetensors with replay is the output."""
    out = tmp_path / "grown"
    r = cli("widen", hf_dirs("convnext"), "--layer", "convnext.embeddings.patch_embeddings", "--factor", 2, "-o", f"{out}/")
    assert r.code == 2, r.err
    assert "cannot be described by a Hugging Face config" in r.err and "load_grown" in r.err
    assert not out.exists()


# -- plain torch models ---------------------------------------------------------------------------------------------

class GNNet(nn.Module):
    """Conv2d → GroupNorm(4, 16) → ReLU → Conv2d."""

    def __init__(self, affine: bool = True):
        super().__init__()
        self.c1, self.gn, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16, affine=affine), nn.Conv2d(16, 5, 3)

    def forward(self, x):
        return self.c2(torch.relu(self.gn(self.c1(x))))


class LNMLP(nn.Module):
    """Linear → LayerNorm → GELU → Linear."""

    def __init__(self, affine: bool = True):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(6, 16), nn.LayerNorm(16, elementwise_affine=affine), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.gelu(self.ln(self.fc1(x))))


def tokens(seed: int) -> torch.Tensor:
    return torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def small_images(seed: int) -> torch.Tensor:
    return images(seed, size=8)


def build(cls, affine: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return perturb(cls(affine).double().eval(), scale=0.2)


def export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    torch.export.save(torch.export.export(model, (x,)), str(path))
    return path


def test_groupnorm_program_doubles_exactly_with_copies_inside_their_group(cli, tmp_path):
    model = build(GNNet)
    path = export(model, small_images(0), tmp_path / "m.pt2")
    weights, program = tmp_path / "g.safetensors", tmp_path / "g.pt2"
    r = cli("widen", path, "--layer", "c1", "--factor", 2, "-o", weights, "-o", program, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["verification"]["max_abs_diff"] <= TOL
    replayed = growcli.load_grown(torch.export.load(str(path)).module(), weights)
    written = torch.export.load(str(program)).module()
    for grown in (replayed, written):
        assert tuple(grown.get_parameter("gn.weight").shape) == (32,)
        assert max_diff(model, grown, [small_images(s) for s in (1, 2, 3)]) <= TOL
    # Every new channel copies one channel of its own group (4 old channels per group, 8 new), each exactly twice.
    old, new = model.c1.weight.detach(), written.get_parameter("c1.weight").detach()
    sources = [next(i for i in range(16) if torch.equal(new[j], old[i])) for j in range(32)]
    assert sources[:4] == [0, 1, 2, 3] and all(src // 4 == j // 8 for j, src in enumerate(sources))
    assert sorted(sources) == sorted(list(range(16)) * 2)


@pytest.mark.parametrize("args,message", [
    (("--to", 24), "'c1': GroupNorm in 'gn' normalises over the grown channels in 4 groups: grow them by a whole "
                   "factor (16 → 32, 48, …), not to 24"),
    (("--factor", 2, "--init", "zero"), "'c1': GroupNorm in 'gn' normalises over the grown channels in 4 groups: init "
                                        "zero gives the new channels random incoming weights"),
], ids=["not-a-multiple", "init-zero"])
def test_groupnorm_refuses_what_would_change_its_statistics(cli, tmp_path, args, message):
    path = export(build(GNNet), small_images(0), tmp_path / "m.pt2")
    out = tmp_path / "g.safetensors"
    r = cli("widen", path, "--layer", "c1", *args, "-o", out)
    assert r.code == 1
    assert message in r.err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


def test_layernorm_mlp_program_doubles_exactly(cli, tmp_path):
    model = build(LNMLP)
    path = export(model, tokens(0), tmp_path / "m.pt2")
    weights, program = tmp_path / "g.safetensors", tmp_path / "g.pt2"
    r = cli("widen", path, "--layer", "fc1", "--factor", 2, "--split", "uniform", "-o", weights, "-o", program, "--json")
    assert r.code == 0, r.err
    edits = json.loads(safetensors_metadata(weights)["growcli.edits"])
    assert [(e["index"], e["value"]) for e in edits if e["op"] == "graph_arg"] == [(1, [32])]  # normalized_shape
    written = torch.export.load(str(program)).module()
    assert [n.args[1] for n in written.graph.nodes if n.target == torch.ops.aten.layer_norm.default] == [[32]]
    for grown in (growcli.load_grown(torch.export.load(str(path)).module(), weights), written):
        assert max_diff(model, grown, [tokens(s) for s in (1, 2, 3)]) <= TOL


@pytest.mark.parametrize("cls,layer,x,attr,want", [
    (LNMLP, "fc1", tokens(0), "normalized_shape", (48,)),
    (GNNet, "c1", small_images(0), "num_channels", 48),
], ids=["layernorm", "groupnorm"])
def test_norms_without_affine_parameters_follow_the_channels(cls, layer, x, attr, want):
    model = build(cls, affine=False)
    ref = copy.deepcopy(model)
    gm = as_grow_model(model, (x,))
    growcli.apply(gm, "widen", layer=layer, factor=3)
    norm = gm.module.ln if cls is LNMLP else gm.module.gn
    assert getattr(norm, attr) == want
    assert max_diff(ref, gm.module, [x * 2, x - 1]) <= TOL


def test_bf16_weights_grow_exactly_in_float64_evaluation():
    torch.manual_seed(0)
    model = perturb(GNNet().eval(), scale=0.2).to(torch.bfloat16)
    ref = copy.deepcopy(model)
    gm = as_grow_model(model, (small_images(0).to(torch.bfloat16),))
    growcli.apply(gm, "widen", layer="c1", factor=2)
    assert gm.module.c1.weight.dtype == torch.bfloat16 and gm.module.gn.weight.shape == (32,)
    before, after = copy.deepcopy(ref).double(), copy.deepcopy(gm.module).double()
    assert relative_diff(before, after, (small_images(5),)) <= 1e-12


def test_gradmax_firefly_and_prune_refuse_norm_groups():
    model = build(GNNet)
    x = small_images(0)
    trace = trace_model(model, ((x,), {}))
    group = analyze(trace, "c1")
    assert group.norms == [NormSite("GroupNorm", "gn", 4, 0)]
    with pytest.raises(NotGrowableError, match=r"^'c1': gradmax: GroupNorm in 'gn' normalises over the channels; the "
                                               r"new units of gradmax and firefly are not whole copies"):
        find_site(trace, group, any_conv=True)  # the site check of both init gradmax and init firefly
    gm = as_grow_model(model, (x,))
    with pytest.raises(NotGrowableError, match=r"^'c1': prune: GroupNorm in 'gn' normalises over its channels"):
        growcli.apply(gm, "prune", layer="c1", to=8, criterion="magnitude")


class PreLNAttention(nn.Module):
    """Linear → LayerNorm → q, k, v → scaled_dot_product_attention → o: a transformer's hidden size."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inp, self.ln = nn.Linear(6, d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        h = self.ln(self.inp(x))
        return self.o(F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h)))


def test_layernorm_before_an_attention_is_refused_as_a_hidden_size():
    model = PreLNAttention().double().eval()
    trace = trace_model(model, ((tokens(0),), {}))
    with pytest.raises(NotGrowableError, match=r"^'inp': LayerNorm in 'ln' normalises over the grown dimension and its "
                                               r"output feeds the attention.*widen --hidden"):
        analyze(trace, "inp")


def test_whole_copy_channel_map_copies_every_channel_equally_inside_its_group():
    gen = torch.Generator().manual_seed(0)
    g = channel_map(6, 18, 2, gen, whole=True)
    assert g[:3] == [0, 1, 2] and g[9:12] == [3, 4, 5]  # old channels in place within their group
    assert sorted(g[:9]) == sorted([0, 1, 2] * 3) and sorted(g[9:]) == sorted([3, 4, 5] * 3)
    with pytest.raises(NotGrowableError, match="whole copies of 6 channels need a multiple of 6, not 15"):
        channel_map(6, 15, 3, gen, whole=True)
