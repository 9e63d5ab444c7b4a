"""Transformer width: FFN, attention heads and hidden size on real Hugging Face models.

Every case builds a small BERT (post-LN), GPT-2 (Conv1D, tied embeddings), Llama (RMSNorm,
grouped/multi-query/multi-head attention, tied and untied embeddings) or ViT with random
weights, grows it through the registered transform (which verifies it), and then re-measures
the difference itself on inputs growcli has not seen: float64 ≤ 1e-10 and float32 ≤ 1e-5,
relative to the output's scale. A model rebuilt from the updated config must have exactly the
grown shapes; the CLI tests write Hugging Face directories, reload them with
``from_pretrained`` and re-verify them with ``growcli verify``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES

from growcli import zoo
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.transforms.registry import Context
from growcli.transforms.catalog import build_spec
from growcli.verification.compare import flatten_outputs

VOCAB = 100


def _build(family: str):
    """(model, inputs) for a family name; weights random but with non-trivial norms and biases."""
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    ids = {"input_ids": torch.randint(0, VOCAB, (2, 6))}
    if family == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                           bos_token_id=0, eos_token_id=0))
    elif family == "bert":
        m = T.BertForMaskedLM(T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=16))
    elif family.startswith("llama"):
        kv = {"llama-mqa": 1, "llama-mha": 4}.get(family, 2)
        m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=kv, head_dim=8, intermediate_size=64,
                                             max_position_embeddings=16, tie_word_embeddings=family == "llama-tied"))
    elif family == "gemma":  # RMSNorm scaling by (1 + γ), embeddings multiplied by √hidden_size
        m = T.GemmaForCausalLM(T.GemmaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                             max_position_embeddings=16))
    elif family == "vit":
        m = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                    intermediate_size=64, image_size=16, patch_size=8, num_labels=3))
        ids = {"pixel_values": torch.randn(2, 3, 16, 16)}
    else:
        raise KeyError(family)
    m.config.use_cache = False
    with torch.no_grad():  # weights of unit scale: every component visibly moves the output
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return m.eval(), ids


@pytest.fixture(scope="module")
def models():
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = _build(family)
        return cache[family]

    return get


def as_model(built, dtype: torch.dtype) -> GrowModel:
    module, inputs = built
    module = copy.deepcopy(module).to(dtype).eval()
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    return GrowModel(module, "hf", Path("mem"), "0", spec_from_batch(((), inputs)), hf_class=type(module).__name__)


def fresh_inputs(built, dtype: torch.dtype) -> dict:
    """Inputs growcli has not seen: same shapes, new values."""
    gen = torch.Generator().manual_seed(123)
    return {k: torch.randn(v.shape, generator=gen, dtype=dtype) if v.is_floating_point()
            else torch.randint(0, VOCAB, v.shape, generator=gen) for k, v in built[1].items()}


def measure(before, after, inputs) -> float:
    """max |a − b| / max |a| over every output, computed here, independently of growcli.verification.compare."""
    with torch.no_grad():
        a, b = flatten_outputs(before(**inputs)), flatten_outputs(after(**inputs))
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, k
        worst = max(worst, float((a[k] - b[k]).abs().max() / a[k].abs().max()))
    return worst


@dataclass
class Case:
    id: str
    family: str
    transform: str
    options: dict
    config: dict = field(default_factory=dict)  # config values expected afterwards
    f32_norms: bool = False  # Llama's RMSNorm computes in float32 even in a float64 model


CASES = [
    # 1. FFN intermediate through the general widen machinery
    Case("ffn-gpt2-conv1d", "gpt2", "widen", {"layer": "mlp.c_fc", "factor": 2.0}, {"n_inner": 256}),
    Case("ffn-llama-gated", "llama", "widen", {"layer": "mlp.up_proj", "by": 16}, {"intermediate_size": 80}),
    Case("ffn-bert", "bert", "widen", {"layer": "intermediate.dense", "factor": 1.5}, {"intermediate_size": 96}),
    Case("ffn-vit", "vit", "widen", {"layer": "mlp.fc1", "to": 80}, {"intermediate_size": 80}),
    # 2. whole heads, head_dim kept
    Case("heads-llama-gqa", "llama", "heads", {"to": 8}, {"num_attention_heads": 8, "num_key_value_heads": 4}),
    Case("heads-llama-mqa", "llama-mqa", "heads", {"to": 8}, {"num_attention_heads": 8, "num_key_value_heads": 1}),
    Case("heads-llama-mha-uniform", "llama-mha", "heads", {"by": 4, "split": "uniform"},
         {"num_attention_heads": 8, "num_key_value_heads": 8}),
    # 3. hidden size by an integer factor (tiling) ...
    Case("hidden-x2-gpt2", "gpt2", "hidden", {"factor": 2.0}, {"n_embd": 64, "n_head": 8, "tie_word_embeddings": False}),
    Case("hidden-x2-bert-post-ln", "bert", "hidden", {"factor": 2.0}, {"hidden_size": 64, "num_attention_heads": 8}),
    Case("hidden-x3-bert-pair-noise", "bert", "hidden", {"factor": 3.0, "noise": 0.05}, {"hidden_size": 96}),
    Case("hidden-x2-llama", "llama", "hidden", {"factor": 2.0}, {"hidden_size": 64, "num_attention_heads": 4}),
    Case("hidden-x2-llama-tied-heads", "llama-tied", "hidden", {"factor": 2.0, "heads": 8},
         {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4, "tie_word_embeddings": False}),
    Case("hidden-x2-vit", "vit", "hidden", {"factor": 2.0}, {"hidden_size": 64, "num_attention_heads": 8}),
    Case("hidden-x2-gemma", "gemma", "hidden", {"factor": 2.0}, {"hidden_size": 64, "tie_word_embeddings": False}),
    # ... and to sizes that are not multiples: LayerNorm mean padding, RMSNorm zero padding
    Case("hidden-40-gpt2-mean-pad", "gpt2", "hidden", {"to": 40}, {"n_embd": 40, "n_head": 5, "layer_norm_epsilon": 8e-6}),
    Case("hidden-56-vit-mean-pad", "vit", "hidden", {"to": 56}, {"hidden_size": 56, "layer_norm_eps": 1e-12 * 32 / 56}),
    Case("hidden-40-llama-zero-pad", "llama", "hidden", {"to": 40}, {"hidden_size": 40, "rms_norm_eps": 8e-7},
         f32_norms=True),
    Case("hidden-72-llama-tied-zero-pad", "llama-tied", "hidden", {"to": 72}, {"hidden_size": 72}, f32_norms=True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_growth_is_exact(models, case, dtype):
    built = models(case.family)
    gm = as_model(built, dtype)
    before = copy.deepcopy(gm.module)
    # Llama's RMSNorm casts to float32 whatever the model's dtype, so a float64 Llama is exact only to
    # float32 rounding when the number of summed entries changes (tiling by powers of two stays bit-exact).
    tol = 1e-5 if dtype == torch.float32 else (1e-6 if case.f32_norms else 1e-10)
    report = run_step(gm, case.transform, case.options, Context(seed=3),
                      VerifySettings(batches=2, rtol=tol if case.f32_norms else None))
    assert report.exact and report.verification["passed"]
    rel = measure(before, gm.module, fresh_inputs(built, dtype))
    assert rel <= tol, rel
    assert gm.num_parameters() > sum(p.numel() for p in before.parameters())
    for key, value in case.config.items():
        got = getattr(gm.module.config, key)
        assert got == value or isinstance(value, float) and math.isclose(got, value, rel_tol=1e-12), (key, got)
    with torch.device("meta"):  # the updated config describes exactly the grown model
        rebuilt = type(gm.module)(gm.module.config)
    want = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in gm.module.state_dict().items()} == want


def test_one_config_fitter_gives_unset_sizes_the_weights_value(models):
    """widen and hidden share one fitter (growcli.transforms.hfconfig.fit_sizes): GPT-2's unset n_inner
    (derived as 4 · n_embd) takes the grown MLP width, or keeps the old one when only the hidden size grows."""
    gm = as_model(models("gpt2"), torch.float64)
    report = run_step(gm, "widen", {"layer": "mlp.c_fc", "factor": 2.0}, Context(seed=3), VerifySettings(batches=1))
    assert report.notes == ["config n_inner: None → 256"]
    gm = as_model(models("gpt2"), torch.float64)
    report = run_step(gm, "hidden", {"factor": 2.0}, Context(seed=3), VerifySettings(batches=1))
    assert report.notes[-3:] == ["config hidden_size: 32 → 64", "config num_attention_heads: 4 → 8",
                                 "config n_inner: None → 128"]
    assert gm.module.config.n_inner == 128 and gm.module.config.n_embd == 64


# ---------------------------------------------------------------------------- what the recipes do
def test_new_heads_copy_a_source_head_and_keep_its_key_value_head(models):
    gm = as_model(models("llama"), torch.float64)
    old = copy.deepcopy(gm.module.model.layers[0].self_attn)
    run_step(gm, "heads", {"to": 8}, Context(seed=5), VerifySettings(batches=1))
    new = gm.module.model.layers[0].self_attn
    hd, group = 8, 2  # query heads per key/value head, before and after
    q = lambda m, h: m.q_proj.weight[h * hd:(h + 1) * hd]  # noqa: E731
    k = lambda m, h: m.k_proj.weight[h * hd:(h + 1) * hd]  # noqa: E731
    o_sum = torch.zeros_like(old.o_proj.weight)
    for h in range(8):
        src = next(s for s in range(4) if torch.equal(q(new, h), q(old, s)))
        assert torch.equal(k(new, h // group), k(old, src // group))  # its key/value head is its source's
        o_sum[:, src * hd:(src + 1) * hd] += new.o_proj.weight[:, h * hd:(h + 1) * hd]
    torch.testing.assert_close(o_sum, old.o_proj.weight, rtol=0, atol=1e-12)  # column shares sum to the source
    assert new.num_key_value_groups == group and gm.module.config.num_key_value_heads == 4


def test_layernorm_mean_padding_rescales_eps_and_gamma(models):
    gm = as_model(models("gpt2"), torch.float64)
    old = copy.deepcopy(gm.module)
    run_step(gm, "hidden", {"to": 40}, Context(seed=1), VerifySettings(batches=1))
    wte, ln = gm.module.transformer.wte.weight, gm.module.transformer.h[0].ln_2
    torch.testing.assert_close(wte[:, 32:], old.transformer.wte.weight.mean(1, keepdim=True).expand(-1, 8))
    c = 32 / 40  # the share of the new size the tiles fill
    assert math.isclose(ln.eps, 1e-5 * c) and ln.normalized_shape == (40,)
    torch.testing.assert_close(ln.weight[:32], old.transformer.h[0].ln_2.weight * math.sqrt(c))
    assert torch.count_nonzero(ln.bias[32:]) == 0
    assert torch.count_nonzero(gm.module.lm_head.weight[:, 32:]) == 0  # readers ignore the padded entries


def test_rmsnorm_zero_padding_rescales_eps_and_gamma(models):
    gm = as_model(models("llama"), torch.float64)
    old = copy.deepcopy(gm.module)
    run_step(gm, "hidden", {"to": 40}, Context(seed=1), VerifySettings(batches=1, rtol=1e-6))
    norm = gm.module.model.norm
    assert torch.count_nonzero(gm.module.model.embed_tokens.weight[:, 32:]) == 0
    assert torch.count_nonzero(gm.module.model.layers[0].mlp.down_proj.weight[32:]) == 0
    assert math.isclose(norm.variance_epsilon, 1e-6 * 0.8)
    torch.testing.assert_close(norm.weight[:32], old.model.norm.weight * math.sqrt(0.8))


def test_hidden_size_constants_are_compensated(models):
    gm = as_model(models("gemma"), torch.float64)
    old = copy.deepcopy(gm.module)
    report = run_step(gm, "hidden", {"to": 40}, Context(seed=1), VerifySettings(batches=1, rtol=1e-6))
    emb = gm.module.model.embed_tokens
    # Gemma multiplies embeddings by √hidden_size, a buffer the new config sets to √40: the tiles absorb √(32/40).
    assert math.isclose(float(emb.embed_scale), math.sqrt(40)) and math.isclose(emb.scalar_embed_scale, math.sqrt(40))
    torch.testing.assert_close(emb.weight[:, :32], old.model.embed_tokens.weight * math.sqrt(32 / 40))
    assert any("scalar_embed_scale: 5.65685 → 6.32456" in n for n in report.notes)
    # Gemma's RMSNorm scales by (1 + γ): the whole factor is multiplied by √(32/40), not γ alone
    torch.testing.assert_close(1 + gm.module.model.norm.weight[:32], (1 + old.model.norm.weight) * math.sqrt(32 / 40))


def test_tied_embeddings_are_untied_only_when_the_tiles_must_differ(models):
    gm = as_model(models("llama-tied"), torch.float64)
    report = run_step(gm, "hidden", {"factor": 2.0}, Context(seed=1), VerifySettings(batches=1))
    m = gm.module
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    torch.testing.assert_close(m.lm_head.weight * 2, m.model.embed_tokens.weight)  # reader tiles are halved
    assert any(n.startswith("untied lm_head.weight and model.embed_tokens.weight") for n in report.notes)
    # one tile plus zero padding: embedding and output projection stay equal, so they stay tied
    gm = as_model(models("llama-tied"), torch.float64)
    report = run_step(gm, "hidden", {"to": 40}, Context(seed=1), VerifySettings(batches=1, rtol=1e-6))
    assert gm.module.lm_head.weight is gm.module.model.embed_tokens.weight and gm.module.config.tie_word_embeddings
    assert not any("untied" in n for n in report.notes)


def test_paired_noise_makes_tiles_differ_but_sum_to_the_original(models):
    gm = as_model(models("bert"), torch.float64)
    old = gm.module.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    run_step(gm, "hidden", {"factor": 2.0, "noise": 0.1}, Context(seed=1), VerifySettings(batches=1))
    new = gm.module.bert.encoder.layer[0].intermediate.dense.weight
    assert (new[:, :32] - new[:, 32:]).abs().max() > 1e-3  # the tiles train apart ...
    torch.testing.assert_close(new[:, :32] + new[:, 32:], old, rtol=0, atol=1e-12)  # ... yet read the same sum


# ---------------------------------------------------------------------------- refusals name what is missing
def _bert_base():
    import transformers as T

    return T.BertModel.from_pretrained(str(FIXTURES / "bert-tiny")).eval(), {"input_ids": torch.randint(0, VOCAB, (2, 6))}


REFUSALS = [
    ("bert", "hidden", {"to": 40}, "post-LN"),
    ("bert", "heads", {"to": 8}, "derives head_dim from hidden_size / num_attention_heads"),
    ("gpt2", "hidden", {"to": 36}, "multiple of head_dim 8"),
    ("llama", "heads", {"to": 5}, "multiple of 2"),
    ("llama", "hidden", {"to": 32}, "not larger"),
    ("bert-base", "hidden", {"to": 40}, "post-LN"),  # BertModel ×2 grows (tests/test_embedding_models.py)
    ("zoo-transformer", "hidden", {"factor": 2.0}, "attention in 'blocks.0.attn'"),
]


@pytest.mark.parametrize("family,transform,options,reason", REFUSALS, ids=[f"{r[0]}-{r[1]}" for r in REFUSALS])
def test_unsupported_growth_is_refused_naming_what_is_missing(models, family, transform, options, reason):
    if family == "bert-base":
        gm = as_model(_bert_base(), torch.float64)
    elif family == "zoo-transformer":
        m = zoo.TinyTransformer().double().eval()
        gm = GrowModel(m, "state_dict", Path("mem"), "0", spec_from_batch((m.example_inputs(), {})))
    else:
        gm = as_model(models(family), torch.float64)
    with pytest.raises(NotGrowableError, match=reason):
        run_step(gm, transform, options, Context(), VerifySettings(batches=1))


@pytest.mark.parametrize("transform,options,message", [
    ("hidden", {"factor": 1.0}, "greater than 1"),
    ("hidden", {"to": 64, "factor": 2.0}, "exactly one of to, factor"),
    ("hidden", {"to": 64, "noise": -1.0}, "non-negative"),
    ("heads", {}, "exactly one of to, by, factor"),
    ("heads", {"to": 0}, "positive integer"),
])
def test_bad_specs_are_usage_errors(transform, options, message):
    with pytest.raises(UsageError, match=message):
        build_spec(transform, options)


# ---------------------------------------------------------------------------- the CLI, from_pretrained, growcli verify
@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in ("gpt2", "vit", "llama-tied"):
        m, _ = _build(family)
        m.config.use_cache = True
        m.save_pretrained(str(root / family))
        out[family] = root / family
    return out


def _auto(family: str):
    import transformers as T

    return T.AutoModelForImageClassification if family == "vit" else T.AutoModelForCausalLM


def _reload_matches(family: str, original: Path, grown: Path, inputs: dict) -> float:
    """Load both directories with transformers' own from_pretrained and compare their outputs."""
    a = _auto(family).from_pretrained(str(original)).eval()
    b = _auto(family).from_pretrained(str(grown)).eval()
    return measure(a, b, inputs)


CLI_CASES = [
    ("gpt2", ["--hidden", "2x", "--pair-noise", "0.02"], {"n_embd": 64, "n_head": 8, "tie_word_embeddings": False}),
    ("vit", ["--hidden", "40"], {"hidden_size": 40, "num_attention_heads": 5}),
    ("llama-tied", ["--hidden", "48", "--heads", "8", "--layer", "mlp.up_proj", "--factor", "1.5"],
     {"hidden_size": 48, "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 96}),
]


@pytest.mark.parametrize("family,args,config", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_grown_directory_reloads_with_from_pretrained_and_verifies(cli, hf_dirs, tmp_path, family, args, config):
    out = tmp_path / "grown"
    r = cli("widen", hf_dirs[family], *args, "-o", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["verification"]["passed"] and report["function_preserving"]
    saved = json.loads((out / "config.json").read_text())
    for key, value in config.items():
        assert saved[key] == value, (key, saved[key])
    v = cli("verify", hf_dirs[family], out, "--json")
    assert v.code == 0, v.err
    assert json.loads(v.out)["passed"]
    inputs = fresh_inputs(_build(family), torch.float32)
    assert _reload_matches(family, hf_dirs[family], out, inputs) <= 1e-5


def test_cli_fixture_llama_heads_and_hidden_then_safetensors_replay_verifies(cli, tmp_path):
    out = tmp_path / "llama.safetensors"
    r = cli("widen", FIXTURES / "llama-tiny", "--heads", "8", "--hidden", "64", "-o", out)
    assert r.code == 0, r.err
    assert "heads 4 → 8" in r.out and "32 → 64 (the residual stream" in r.out
    v = cli("verify", FIXTURES / "llama-tiny", out)
    assert v.code == 0, v.err


def test_heads_a_config_validator_rejects_still_write_safetensors(cli, tmp_path):
    # LlamaConfig insists on hidden_size % num_attention_heads == 0, although head_dim is explicit:
    # 6 heads of 8 on hidden size 32 is a fine model that only a Hugging Face directory cannot hold.
    r = cli("widen", FIXTURES / "llama-tiny", "--heads", "6", "-o", tmp_path / "dir")
    assert r.code == 2 and "transformers rejects the grown model's config" in r.err, r.err
    assert not (tmp_path / "dir").exists()
    out = tmp_path / "six.safetensors"
    r = cli("widen", FIXTURES / "llama-tiny", "--heads", "6", "-o", out)
    assert r.code == 0 and "a Hugging Face directory cannot be written" in r.out, r.err
    assert cli("verify", FIXTURES / "llama-tiny", out).code == 0


def test_cli_refusal_exits_1_names_the_reason_and_writes_nothing(cli, tmp_path):
    out = tmp_path / "never"
    r = cli("widen", FIXTURES / "bert-tiny", "--hidden", "40", "-o", out)
    assert r.code == 1
    assert r.err.count("\n") == 1 and "post-LN" in r.err
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--hidden", "wide"], "expected a size like 1024 or a factor like 2x"),
    ([], "needs --layer NAME, --heads N or --hidden N"),
    (["--heads", "8", "--factor", "2"], "size the --layer"),
    (["--heads", "8", "--pair-noise", "0.1"], "--pair-noise applies to --hidden"),
])
def test_cli_usage_errors_exit_2(cli, tmp_path, args, message):
    r = cli("widen", FIXTURES / "llama-tiny", *args, "-o", tmp_path / "x")
    assert r.code == 2 and message in r.err, r.err


def test_same_seed_gives_byte_identical_output(cli, hf_dirs, tmp_path):
    outs = []
    for i, seed in enumerate([7, 7, 8]):
        path = tmp_path / f"r{i}.safetensors"
        r = cli("widen", hf_dirs["gpt2"], "--hidden", "2x", "--pair-noise", "0.1", "--seed", seed, "--batches", "1",
                "-o", path)
        assert r.code == 0, r.err
        outs.append(path.read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
