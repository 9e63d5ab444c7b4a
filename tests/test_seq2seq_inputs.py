"""Generated inputs for encoder-decoder and speech models: decoder token ids, mel features, raw audio.

Each tiny model (float64, seeded weights) is saved as a Hugging Face directory and widened ×2 in its
FFN through the CLI with no ``--inputs``: growcli must make inputs the model runs on (T5 fails without
``decoder_input_ids``, Whisper accepts only mel features of one length, wav2vec2 needs enough samples
for its convolutional feature extractor). The written directory is reloaded with ``from_pretrained``
and compared here with the original on the generated inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from growcli.core.inputs import make_batches
from growcli.io.hf_dir import hf_input_spec

VOCAB = 96


def _t5():
    import transformers as T

    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0))


def _whisper():
    import transformers as T

    return T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))


def _wav2vec2():
    import transformers as T

    return T.Wav2Vec2ForCTC(T.Wav2Vec2Config(
        vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, feat_extract_norm="group"))


def _bart():
    import transformers as T

    return T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32))


def _save(build, directory: Path) -> Path:
    import transformers as T

    T.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    build().to(torch.float64).eval().save_pretrained(directory)
    return directory


def _max_diff(a_dir: Path, b_dir: Path) -> float:
    """max |a − b| of the logits of both directories (from_pretrained, float64) on the generated inputs."""
    import transformers as T

    cls = getattr(T, T.AutoConfig.from_pretrained(str(a_dir)).architectures[0])
    a, b = (cls.from_pretrained(str(d), dtype=torch.float64).eval() for d in (a_dir, b_dir))
    worst = 0.0
    with torch.no_grad():
        for args, kwargs in make_batches(hf_input_spec(a), 3, seed=5):
            worst = max(worst, float((a(*args, **kwargs).logits - b(*args, **kwargs).logits).abs().max()))
    return worst


CASES = {
    # name: (model, --layer, config key, its grown value, generated input shapes)
    "t5": (_t5, r"(en|de)coder\.block\.\d+\.layer\.\d\.DenseReluDense\.wi", "d_ff", 128,
           {"input_ids": (2, 8), "attention_mask": (2, 8), "decoder_input_ids": (2, 8), "decoder_attention_mask": (2, 8)}),
    "whisper": (_whisper, r"model\.encoder\.layers\.\d+\.fc1", "encoder_ffn_dim", 128,
                {"input_features": (2, 8, 32), "decoder_input_ids": (2, 8), "decoder_attention_mask": (2, 8)}),
    "wav2vec2": (_wav2vec2, r"wav2vec2\.encoder\.layers\.\d+\.feed_forward\.intermediate_dense", "intermediate_size",
                 128, {"input_values": (2, 90)}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_generated_inputs_have_the_shapes_the_model_needs(tmp_path, name):
    build, _, _, _, shapes = CASES[name]
    torch.manual_seed(0)
    model = build().to(torch.float64).eval()
    spec = hf_input_spec(model)
    assert {k: t.shape for k, t in spec.kwargs} == shapes
    assert all(t.dtype == "float64" for _, t in spec.kwargs if t.is_float)  # in the model's dtype: Whisper does not cast
    batches = make_batches(spec, 3, seed=0)
    with torch.no_grad():
        for args, kwargs in batches:
            assert torch.isfinite(model(*args, **kwargs).logits).all()
    if "decoder_input_ids" in shapes:
        ids = torch.cat([b[1]["decoder_input_ids"].flatten() for b in batches])
        assert int(ids.max()) < VOCAB and ids.unique().numel() > 20  # the whole vocabulary, not a constant start token
        # later batches vary the decoder length and pad rows with the mask (never a random 0/1 mask)
        assert [b[1]["decoder_input_ids"].shape[1] for b in batches] == [8, 4, 12]
        for _, kwargs in batches:
            mask = kwargs["decoder_attention_mask"]
            assert (mask[:, 0] == 1).all() and (mask.diff(dim=1) <= 0).all()
        assert any(int(kwargs["decoder_attention_mask"].min()) == 0 for _, kwargs in batches[1:])


# Whisper (mel features of the one accepted length, plus decoder ids) runs always; the others are slow.
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "whisper" else [pytest.mark.slow]) for n in CASES])
def test_widen_ffn_x2_through_the_cli_is_exact_after_from_pretrained(cli, tmp_path, name):
    import json

    build, layer, key, value, _ = CASES[name]
    src = _save(build, tmp_path / name)
    out = tmp_path / "grown"
    r = cli("widen", src, "--layer", layer, "--factor", "2", "-o", str(out) + "/", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= 1e-10
    assert json.loads((out / "config.json").read_text())[key] == value
    assert _max_diff(src, out) <= 1e-10


def test_bart_still_grows_with_generated_decoder_ids(tmp_path):
    from growcli.run.runner import Output, Source, Step, grow

    src = _save(_bart, tmp_path / "bart")
    out = tmp_path / "grown"
    report = grow(Source(src), [Step("widen", {"layer": r"model\.encoder\.layers\.0\.fc1", "factor": 2})],
                  [Output(str(out) + "/")], seed=0)
    assert report["function_preserving"] and report["verification"]["max_abs_diff"] <= 1e-10
    assert _max_diff(src, out) <= 1e-10


def test_inputs_growcli_cannot_generate_fail_in_one_line(cli, tmp_path):
    import transformers as T

    # A speech encoder whose mel features are [batch, frames, bins] with a convolution subsampler: not the
    # channels-first stem growcli knows how to feed. Loading it works; growing it asks for --inputs.
    T.utils.logging.set_verbosity_error()
    config = T.Speech2TextConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                 decoder_ffn_dim=64, max_source_positions=64, max_target_positions=16,
                                 input_feat_per_channel=8, num_conv_layers=1, conv_channels=16, conv_kernel_sizes=(5,))
    torch.manual_seed(0)
    src = tmp_path / "s2t"
    T.Speech2TextForConditionalGeneration(config).to(torch.float64).save_pretrained(src)
    spec = hf_input_spec(T.Speech2TextForConditionalGeneration(config))
    assert spec.empty and "pass --inputs FILE" in spec.reason
    r = cli("widen", src, "--layer", r"model\.encoder\.layers\.0\.fc1", "--factor", "2", "-o", tmp_path / "out/")
    assert r.code == 1 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "input_features" in lines[0] and lines[0].endswith("pass --inputs FILE"), r.err
    assert not (tmp_path / "out").exists()


def test_an_encoder_decoder_of_two_sub_configs_gets_decoder_ids_over_the_decoders_vocabulary():
    import transformers as T

    T.utils.logging.set_verbosity_error()
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    config = T.EncoderDecoderConfig.from_encoder_decoder_configs(
        T.BertConfig(vocab_size=VOCAB, max_position_embeddings=32, **small),
        T.BertConfig(vocab_size=40, max_position_embeddings=6, is_decoder=True, add_cross_attention=True, **small))
    torch.manual_seed(0)
    model = T.EncoderDecoderModel(config=config).to(torch.float64).eval()
    spec = hf_input_spec(model)
    assert dict(spec.kwargs) == {"input_ids": spec.kwargs[0][1], "decoder_input_ids": spec.kwargs[1][1]}
    assert (spec.kwargs[0][1].shape, spec.kwargs[0][1].high) == ((2, 8), VOCAB)
    assert (spec.kwargs[1][1].shape, spec.kwargs[1][1].high) == ((2, 6), 40)  # within the decoder's 6 positions
    with torch.no_grad():
        for args, kwargs in make_batches(spec, 2, seed=0):
            assert model(*args, **kwargs).logits.shape == (2, 6, 40)
