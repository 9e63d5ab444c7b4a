"""Hugging Face model directories: loading one, its config, and the inputs generated from it.

A directory is loaded only through the standard transformers class its ``config.json`` names,
from local files, and never when it ships its own model code (:func:`check_no_remote_code`).
Its inputs are generated from the config (:func:`hf_input_spec`): token ids over the whole
vocabulary for text models, pixels for vision ones.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from torch import nn

from growcli.core.errors import ArchitectureError, FormatError, MissingDependencyError
from growcli.core.inputs import Batch, InputSpec, TensorSpec, cast_batch, make_batches, with_example
from growcli.core.model import GrowModel
from growcli.io.formats import safetensors_header, sha256_of


def load_hf_dir(path: Path) -> GrowModel:
    if not (path / "config.json").is_file():
        raise FormatError(f"{path}: directory has no config.json; expected a Hugging Face model directory")
    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if not shards and not index.exists():
        raise FormatError(f"{path}: no model.safetensors (or sharded index) beside config.json")
    for shard in shards:
        safetensors_header(shard)
    transformers, config = load_hf_config(path)
    # Caches are for generation; verification and export run whole sequences without them.
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise FormatError(f"{path}/config.json: names no class in 'architectures'")
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise FormatError(f"{path}/config.json: transformers {transformers.__version__} has no class {archs[0]} "
                          "(custom code is never loaded)")
    try:
        module, info = cls.from_pretrained(str(path), config=config, local_files_only=True, output_loading_info=True)
    except Exception as exc:
        raise FormatError(f"{path}: transformers could not load it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        bad = list(info.get("missing_keys") or []) + [str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or []]
        raise ArchitectureError(f"{path}: the weights do not fit {archs[0]}: missing or mismatched {bad[:3]}")
    float64_experts(module)
    gm = GrowModel(module, "hf", path, sha256_of(path), hf_input_spec(module), hf_class=archs[0])
    gm.hf_saved_config = {"use_cache": use_cache} if use_cache is not None else {}
    return gm


def float64_experts(module) -> None:
    """Run fused mixture-of-experts layers with transformers' ``batched_mm`` kernel: the default ``grouped_mm``
    has no float64 (growcli verifies in float64) and is not what torch.export traces. Not saved in the config."""
    if hasattr(module, "set_experts_implementation"):
        module.set_experts_implementation("batched_mm")


def load_hf_config(path: Path):
    """``(transformers, config)`` for an HF directory; one-line errors when either is unusable."""
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("reading Hugging Face directories needs transformers: pip install 'growcli[hf]'") from None
    check_no_remote_code(path)
    quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise FormatError(f"{path}/config.json: not a usable Hugging Face config ({str(exc).splitlines()[0][:200]})") from None
    return transformers, config


_CUSTOM_CODE = ("modeling_*.py", "configuration_*.py", "tokenization_*.py", "processing_*.py",
                "image_processing_*.py", "feature_extraction_*.py")

def check_no_remote_code(path: Path) -> None:
    """Refuse an HF directory that ships its own model code: growcli never runs it.

    ``auto_map`` in config.json, or ``modeling_*.py``-style files beside it, are what
    ``trust_remote_code`` would import; growcli never passes that flag and says so here,
    before transformers reads anything.
    """
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{config_file}: not a usable Hugging Face config ({getattr(exc, 'msg', type(exc).__name__)})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{config_file}: not a usable Hugging Face config (expected a JSON object)")
    if "auto_map" in config:
        raise FormatError(f"{config_file}: has 'auto_map', i.e. the model needs its own Python code; growcli never runs "
                          "code from a model directory (trust_remote_code is never used)")
    code = sorted(p.name for pattern in _CUSTOM_CODE for p in path.glob(pattern))
    if code:
        raise FormatError(f"{path}: holds custom model code ({', '.join(code[:3])}); growcli never runs code from a "
                          "model directory (trust_remote_code is never used); remove it to load the standard class")


def quiet_transformers() -> None:
    """Keep transformers' progress bars and advice off stderr (growcli reports for itself)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def hf_input_spec(module: nn.Module, batch: int = 2, seq: int = 8, mask: bool = True) -> InputSpec:
    """Inputs generated from a Hugging Face config: token ids for text models, pixels for vision, mel features
    (``input_features``) or raw audio (``input_values``) for speech; an encoder-decoder also gets decoder token ids.

    Token ids span the whole vocabulary and their length varies from batch to batch (up to
    ``max_position_embeddings``); when ``forward`` takes ``attention_mask`` (and ``mask``),
    later batches are right-padded with a mask of zeros there (see ``make_batches``).
    Never raises for inputs it cannot make: the spec is then empty and its ``reason`` says
    "pass --inputs FILE", which commands that need inputs report.
    """
    config = module.config
    name = getattr(module, "main_input_name", "input_ids")
    composite = composite_input_spec(module, batch, seq) if getattr(config, "vocab_size", None) is None else None
    if composite is not None:
        return composite
    params = _forward_params(module)
    if name == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return InputSpec(kwargs=(("pixel_values", TensorSpec((batch, getattr(config, "num_channels", 3), size, size),
                                                             float_dtype(module))),))
    if name in ("input_features", "input_values"):
        audio = speech_input(module, name, batch, seq)
        if isinstance(audio, str):
            return InputSpec(reason=f"growcli cannot generate the model's {name!r} ({audio}); pass --inputs FILE")
        decoder, masks = decoder_inputs(module, params, batch, seq, mask)
        max_seq = getattr(config, "max_target_positions", None) if decoder else None
        return InputSpec(kwargs=(audio, *decoder), seq=tuple(k for k, _ in decoder), max_seq=max_seq,
                         mask=masks[0] if masks else None, pad_id=_pad_id(config))
    if name == "input_ids" and getattr(config, "vocab_size", None):
        # Decoder ids (if any) share the length: it stays within the encoder's and the decoder's positions.
        limits = [n for n in (getattr(config, "max_position_embeddings", None),
                              getattr(config, "max_target_positions", None)) if isinstance(n, int) and n > 0]
        max_seq = min(limits) if limits else None
        seq = min(seq, max_seq or seq)
        kwargs = [("input_ids", TensorSpec((batch, seq), "int64", config.vocab_size))]
        takes_mask = "attention_mask" in params
        if mask and takes_mask:
            kwargs.append(("attention_mask", TensorSpec((batch, seq), "int64", 2)))
        decoder, masks = decoder_inputs(module, params, batch, seq, mask)
        return InputSpec(kwargs=tuple(kwargs + decoder), seq=tuple(k for k, _ in kwargs + decoder), max_seq=max_seq,
                         mask="attention_mask" if mask and takes_mask else None, masks=tuple(masks),
                         pad_id=_pad_id(config))
    return InputSpec(reason=f"growcli cannot generate inputs named {name!r} for {type(module).__name__}; "
                            "pass --inputs FILE")


def float_dtype(module: nn.Module) -> str:
    """The dtype name of the module's first floating-point parameter (float32 if it has none): generated float
    inputs are made in it, so a model that does not cast its inputs (Whisper's convolutions) runs on them."""
    first = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    return str(first or "torch.float32").removeprefix("torch.")


def _forward_params(module: nn.Module) -> dict:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _pad_id(config) -> int | None:
    pad_id = getattr(config, "pad_token_id", None)
    vocab = getattr(config, "vocab_size", None) or 0
    return pad_id if isinstance(pad_id, int) and 0 <= pad_id < vocab else None


def decoder_inputs(module: nn.Module, params: dict, batch: int, seq: int, mask: bool
                   ) -> tuple[list[tuple[str, TensorSpec]], list[str]]:
    """``decoder_input_ids`` (and ``decoder_attention_mask``, its name also returned) for an encoder-decoder.

    The rule: the config says ``is_encoder_decoder`` and ``forward`` takes ``decoder_input_ids``. Some such
    models derive them from ``input_ids`` when absent (BART shifts them right), others fail without them
    (T5, Whisper); explicit ids are valid input to both, so they are always made, as token ids over the
    whole vocabulary of the same length as the encoder's (they vary together from batch to batch, within
    both position limits). Nothing is run to decide.
    """
    config = module.config
    if not getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" not in params:
        return [], []
    decoder = getattr(config, "decoder", None)
    vocab = getattr(config, "vocab_size", None) or getattr(decoder, "vocab_size", None)
    if not vocab:
        return [], []
    limit = getattr(config, "max_target_positions", None) or getattr(decoder, "max_position_embeddings", None)
    length = min(seq, limit) if isinstance(limit, int) and limit > 0 else seq
    kwargs = [("decoder_input_ids", TensorSpec((batch, length), "int64", vocab))]
    masks = []
    if mask and "decoder_attention_mask" in params:
        kwargs.append(("decoder_attention_mask", TensorSpec((batch, length), "int64", 2)))
        masks.append("decoder_attention_mask")
    return kwargs, masks


def speech_input(module: nn.Module, name: str, batch: int, frames: int) -> tuple[str, TensorSpec] | str:
    """The float audio input ``name`` of a speech model, or why it cannot be made.

    ``input_features`` are ``[batch, num_mel_bins, T]`` mel frames read by a stem of 1-d convolutions
    (channels first: its first convolution takes ``num_mel_bins`` channels); ``T`` is
    ``max_source_positions`` times the stem's total stride, the one length an encoder with that many
    positions accepts (Whisper checks exactly this). ``input_values`` are raw audio ``[batch, L]``
    with ``L`` the fewest samples from which the feature extractor (``conv_kernel``, ``conv_stride``)
    makes ``frames`` frames. Both keep one length (not varied from batch to batch).
    """
    config = module.config
    if name == "input_values":
        kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
        if not kernels or not strides or len(kernels) != len(strides):
            return "the config has no conv_kernel and conv_stride of the same length"
        length = frames
        for k, s in zip(reversed(kernels), reversed(strides)):
            length = (length - 1) * s + k  # fewest input samples for `length` outputs of this convolution
        return name, TensorSpec((batch, length), float_dtype(module))
    bins, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if not bins or not positions:
        return "the config has no num_mel_bins and max_source_positions"
    encoder = module.get_encoder() if hasattr(module, "get_encoder") else module
    stem = []
    for m in list(encoder.modules())[1:]:
        if isinstance(m, nn.Conv1d):
            stem.append(m)
        elif stem or any(True for _ in m.parameters(recurse=False)):
            break
    if not stem or stem[0].in_channels != bins:
        return f"its encoder does not start with 1-d convolutions over {bins} mel bins"
    stride = 1
    for conv in stem:
        stride *= conv.stride[0]
    return name, TensorSpec((batch, bins, positions * stride), float_dtype(module))


def hf_inputs(module: nn.Module, batch: Batch | None = None) -> InputSpec:
    """:func:`hf_input_spec` of ``module`` with ``batch`` (the user's ``--inputs``, when given) as its example."""
    spec = hf_input_spec(module)
    return spec if batch is None else with_example(spec, batch)


def sample_batch(module: nn.Module, seed: int = 0, batch: Batch | None = None) -> Batch:
    """The one batch a streamed step traces ``module`` on, its floats in the parameters' dtype: ``batch`` (the
    user's ``--inputs``) when given, else the first generated from :func:`hf_input_spec`."""
    if batch is None:
        batch = make_batches(hf_input_spec(module), 1, seed=seed)[0]
    return cast_batch(batch, next(module.parameters()).dtype)


def composite_input_spec(module: nn.Module, batch: int = 2, seq: int = 8) -> InputSpec | None:
    """Inputs of a composite model, whose config has no vocabulary of its own but nested sub-configs (CLIP's
    ``text_config`` and ``vision_config``): ``input_ids`` over the vocabulary of the first sub-config that has one
    and ``pixel_values`` of the image size of the first that has one, each only when ``forward`` takes it; None
    when it takes neither. Text and image inputs of models that need image tokens in the text (LLaVA) are not
    made: pass --inputs FILE. An encoder-decoder of two sub-configs also gets ``decoder_input_ids``."""
    from growcli.core.edits import sub_configs

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    named = sub_configs(module.config)
    subs = list(named.values())
    # An encoder-decoder's input_ids are its encoder's (its decoder's vocabulary may differ).
    text = next((c for c in [named.get("encoder"), *subs] if getattr(c, "vocab_size", None)), None)
    vision = next((c for c in subs if getattr(c, "image_size", None)), None)
    kwargs = []
    if text is not None and "input_ids" in params:
        seq = min(seq, getattr(text, "max_position_embeddings", None) or seq)
        kwargs.append(("input_ids", TensorSpec((batch, seq), "int64", text.vocab_size)))
        kwargs += decoder_inputs(module, dict(params), batch, seq, mask=False)[0]  # an EncoderDecoderModel's
    if vision is not None and "pixel_values" in params:
        size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
        kwargs.append(("pixel_values", TensorSpec((batch, getattr(vision, "num_channels", 3), size, size),
                                                  float_dtype(module))))
    return InputSpec(kwargs=tuple(kwargs)) if kwargs else None


def saved_names(module, refuse) -> dict[str, str]:
    """Model state_dict key → the key ``save_pretrained`` writes it under (the same before transformers 5).

    transformers 5 renames some families' weights on load and back on save (ViT's
    ``layers.0.attention.q_proj`` is ``encoder.layer.0.attention.attention.query`` on disk); the
    reverse conversion is run on placeholder meta tensors to read the mapping off. A conversion that
    merges or splits tensors has no one-to-one mapping: ``refuse(saved_name)`` makes the exception raised.
    """
    import torch

    state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in module.state_dict().items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 stores weights under the model's own names
        return {k: k for k in state}
    by_id = {id(v): k for k, v in state.items()}
    names = {}
    for saved, tensor in revert_weight_conversion(module, dict(state)).items():
        if id(tensor) not in by_id:
            raise refuse(saved)
        names[by_id[id(tensor)]] = saved
    return names
