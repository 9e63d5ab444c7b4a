"""Stack a Hugging Face checkpoint tensor by tensor, without loading its weights (GROWTH.md section 4).

The model is built on the meta device (no memory) only to find the stack, its residual
writers and the config changes — the same :func:`growcli.transforms.stack.plan_stack` the
in-memory path uses. The output shards are then written by copying each tensor's bytes
straight from the input files (``os.copy_file_range``, a kernel-side copy), zeroed writers
left as holes that read back as zeros: memory does not grow with the model, and every output
tensor is byte-for-byte the one the in-memory path writes. Headers are validated before anything is
read (``growcli.io.formats.safetensors_header``).
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from growcli.core.errors import FormatError, NotGrowableError, UsageError, VerificationFailed
from growcli.core.inputs import Batch, cast_batch, make_batches
from growcli.io.atomic import atomic_output, check_output_path
from growcli.io.formats import require_exists, safetensors_header
from growcli.io.load import hf_input_spec, load_hf_config, load_model
from growcli.io.sidefiles import copy_side_files
from growcli.transforms.stack import StackPlan, StackSpec, plan_stack, post_ln_reason, step_report

STREAMING_THRESHOLD = 1 << 30  # checkpoints larger than this (bytes of safetensors) stream by default
VERIFY_LIMIT = 512 << 20  # outputs up to this size are also verified by running both models
DEFAULT_SHARD_SIZE = "5GB"
CHUNK = 64 << 20
PAGE = 4096
INDEX = "model.safetensors.index.json"
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 1 << 10, "MIB": 1 << 20,
          "GIB": 1 << 30, "TIB": 1 << 40}

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count → bytes; :class:`UsageError` otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: ``file`` from absolute offset ``start``, ``nbytes`` long."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of an HF directory (from the index when sharded)."""
    index = src / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise FormatError(f"{index}: not a safetensors index (no weight_map)") from None
        return [src / n for n in names]
    files = sorted(src.glob("*.safetensors"))
    if len(files) > 1:
        raise FormatError(f"{src}: {len(files)} safetensors files but no {INDEX}")
    return files


def checkpoint_bytes(src: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(src) if f.is_file())


def read_tensors(src: Path) -> dict[str, TensorRef]:
    """Name → location of every tensor in the directory's safetensors files (headers only)."""
    refs: dict[str, TensorRef] = {}
    for f in weight_files(src):
        require_exists(f, "safetensors shard")
        header = safetensors_header(f)
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in refs:
                raise FormatError(f"{f}: tensor {name} is also in {refs[name].file.name}")
            a, b = info["data_offsets"]
            refs[name] = TensorRef(f, info["dtype"], tuple(info["shape"]), 8 + n + a, b - a)
    return refs


def choose_streaming(src: Path, outputs: list[Path], fmt: str | None, forced: bool | None,
                     threshold: int = STREAMING_THRESHOLD) -> bool:
    """Whether to stack ``src`` streaming: forced, or auto for large HF safetensors → one HF directory.

    Raises :class:`UsageError` when streaming is forced for inputs or outputs it cannot handle.
    """
    from growcli.io.save import output_format

    fits = (src.is_dir() and (src / "config.json").is_file() and bool(weight_files(src)) and len(outputs) == 1
            and output_format(outputs[0], fmt) == "hf")
    if forced is None:
        return fits and checkpoint_bytes(src) > threshold
    if forced and not fits:
        raise UsageError("--streaming needs a Hugging Face directory of safetensors as input and one output "
                         "directory (-o DIR)")
    return forced


@dataclass(frozen=True)
class OutTensor:
    name: str
    ref: TensorRef
    zero: bool


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plan_tensors(refs: dict[str, TensorRef], plan: StackPlan, names: CheckpointNames) -> list[OutTensor]:
    """Every output tensor: layer keys renamed to their new positions, new copies' writers zeroed."""
    pattern = re.compile(rf"{re.escape(names.prefix)}\.(\d+)\.(.+)")
    blocks: dict[int, dict[str, TensorRef]] = {i: {} for i in range(plan.length)}
    out: list[OutTensor] = []
    for name, ref in refs.items():
        m = pattern.fullmatch(name)
        if m and int(m.group(1)) < plan.length:
            blocks[int(m.group(1))][m.group(2)] = ref
        else:
            out.append(OutTensor(name, ref, False))
    copies = set(plan.copies)
    for p, i in enumerate(plan.order):
        zero = set()
        if p in copies:
            for w in plan.writers.get(i, ()):
                suffix = names.suffixes.get(w)
                if suffix not in blocks[i]:
                    raise NotGrowableError(f"stack: the checkpoint has no tensor for {plan.container}.{i}.{w} to zero")
                zero.add(suffix)
        out += [OutTensor(f"{names.prefix}.{p}.{s}", ref, s in zero) for s, ref in blocks[i].items()]
    return sorted(out, key=lambda t: _natural(t.name))


def pack_shards(tensors: list[OutTensor], shard_size: int) -> list[list[OutTensor]]:
    """Greedy packing in order; a tensor larger than ``shard_size`` gets a shard of its own."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.ref.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.ref.nbytes
    return shards


def write_shard(path: Path, tensors: list[OutTensor], advance: Callable[[int], None]) -> None:
    """Write one safetensors file; bytes are copied from the inputs, zeros written for zeroed tensors."""
    # Wider dtypes first keeps every tensor aligned to its element size (the data starts at a
    # multiple of 8); within a dtype, source order keeps runs of tensors laid out as in the input.
    tensors = sorted(tensors, key=lambda t: (-ITEMSIZE.get(t.ref.dtype, 1), str(t.ref.file), t.ref.start))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.ref.dtype, "shape": list(t.ref.shape), "data_offsets": [offset, offset + t.ref.nbytes]}
        offset += t.ref.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * _header_padding(len(raw), tensors, header)
    fds: dict[Path, int] = {}
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        out.flush()
        try:
            for t in tensors:
                if t.zero:  # a hole: reads back as zeros (POSIX), costs neither time nor disk
                    os.lseek(out.fileno(), t.ref.nbytes, os.SEEK_CUR)
                    advance(t.ref.nbytes)
                else:
                    if t.ref.file not in fds:
                        fds[t.ref.file] = os.open(t.ref.file, os.O_RDONLY)
                    _copy_range(fds[t.ref.file], out.fileno(), t.ref.start, t.ref.nbytes, advance)
            os.ftruncate(out.fileno(), 8 + len(raw) + offset)  # a hole at the very end still counts
        finally:
            for fd in fds.values():
                os.close(fd)


def _header_padding(length: int, tensors: list[OutTensor], header: dict[str, Any]) -> int:
    """Spaces after the JSON header so that most copied bytes keep their offset within a page.

    The kernel copies a range much faster (about 1.6× here) when source and destination
    offsets agree modulo the page size; safetensors allows no gaps between tensors, but the
    header may end in any amount of whitespace. Returns the padding (a multiple-of-8 data start).
    """
    aligned: dict[int, int] = {}
    for t in tensors:
        if not t.zero:
            pad = (t.ref.start - (8 + length) - header[t.name]["data_offsets"][0]) % PAGE
            if (length + pad) % 8 == 0:
                aligned[pad] = aligned.get(pad, 0) + t.ref.nbytes
    return max(aligned, key=aligned.get) if aligned else -length % 8


def _copy_range(src: int, dst: int, offset: int, n: int, advance: Callable[[int], None]) -> None:
    while n > 0:
        k = min(n, CHUNK)
        try:
            got = os.copy_file_range(src, dst, k, offset)
        except (OSError, AttributeError):  # filesystems or platforms without it: a plain buffered copy
            data = os.pread(src, k, offset)
            got = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view):]
        if got == 0:
            raise FormatError(f"input file ended early at byte {offset} (truncated while stacking?)")
        offset += got
        n -= got
        advance(got)


def meta_model(src: Path) -> torch.nn.Module:
    """The HF model of ``src`` built on the meta device from its config (no weights, no memory)."""
    transformers, config = load_hf_config(src)
    if getattr(config, "use_cache", None) is not None:
        config.use_cache = False
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise FormatError(f"{src}/config.json: names no class transformers {transformers.__version__} has "
                          f"({archs[0] if archs else 'architectures is empty'}; custom code is never loaded)")
    with torch.device("meta"):
        module = cls(config)
    return module.eval()


def checkpoint_names(module: torch.nn.Module) -> dict[str, str]:
    """Model parameter name → the name ``save_pretrained`` writes it under.

    transformers 5 renames some families' weights on load and back on save (ViT's
    ``layers.0.attention.q_proj`` is ``encoder.layer.0.attention.attention.query`` on disk);
    the reverse conversion is run on placeholder meta tensors to read the mapping off. A
    conversion that merges or splits tensors cannot be streamed tensor by tensor: refused.
    """
    state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in module.state_dict().items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 stores weights under the model's own names
        return {k: k for k in state}
    by_id = {id(v): k for k, v in state.items()}
    names = {}
    for saved, tensor in revert_weight_conversion(module, dict(state)).items():
        if id(tensor) not in by_id:
            raise NotGrowableError(f"stack --streaming: transformers converts {type(module).__name__}'s weights when "
                                   f"saving ({saved} is computed from several tensors); use --no-streaming")
        names[by_id[id(tensor)]] = saved
    return names


@dataclass(frozen=True)
class CheckpointNames:
    """How a checkpoint names the stack: ``{prefix}.{i}.{suffix}``; ``suffixes`` maps model-relative names."""

    prefix: str
    suffixes: dict[str, str]
    dropped: str = ""  # a base-model prefix the checkpoint leaves out of every name ("transformer.")


def stack_names(module: torch.nn.Module, container: str, refs: dict[str, TensorRef]) -> CheckpointNames:
    """Find the checkpoint names of ``container``'s blocks; :class:`NotGrowableError` when they are not regular."""
    names = checkpoint_names(module)
    length = len(module.get_submodule(container))
    first = {k[len(container) + 3:]: v for k, v in names.items() if k.startswith(f"{container}.0.")}
    if not first:
        raise NotGrowableError(f"stack --streaming: {container}.0 has no parameters to stream")
    sample = next(iter(first.values()))
    prefix = next((sample[:m.start()] for m in re.finditer(r"\.0\.", sample)
                   if all(v.startswith(sample[:m.start()] + ".0.") for v in first.values())), None)
    if prefix is None:
        raise NotGrowableError(f"stack --streaming: the checkpoint names of {container}.0 share no prefix; use --no-streaming")
    suffixes = {k: v[len(prefix) + 3:] for k, v in first.items()}
    for i in range(length):
        for rel, suffix in suffixes.items():
            if names.get(f"{container}.{i}.{rel}") != f"{prefix}.{i}.{suffix}":
                raise NotGrowableError(f"stack --streaming: block {i} of {container} is named differently on disk "
                                       "from block 0; use --no-streaming")
    if any(k.startswith(prefix + ".0.") for k in refs):
        return CheckpointNames(prefix, suffixes)
    base = getattr(module, "base_model_prefix", "")
    if base and prefix.startswith(base + ".") and any(k.startswith(prefix[len(base) + 1:] + ".0.") for k in refs):
        return CheckpointNames(prefix[len(base) + 1:], suffixes, base + ".")
    raise NotGrowableError(f"stack --streaming: the checkpoint has no tensors named {prefix}.0.*; use --no-streaming")


def _structure_check(module_cls: type, config: Any, names: CheckpointNames, written: list[OutTensor]) -> str:
    """Check the new config describes the written tensors (names and shapes); returns what was checked."""
    with torch.device("meta"):
        fresh = module_cls(config)
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    want = {saved: shapes[k] for k, saved in checkpoint_names(fresh).items()}
    got = {(t.name if t.name in want else names.dropped + t.name): t.ref.shape for t in written}
    bad = [f"{k} {list(s)} vs config {list(want[k])}" for k, s in got.items() if k in want and want[k] != s]
    bad += [f"unexpected {k}" for k in got if k not in want]
    if bad:
        raise NotGrowableError(f"stack --streaming: the written tensors do not fit the new config ({bad[0]})")
    return f"the new config rebuilds {len(want)} tensors; all {len(got)} written ones match in name and shape"


def stack_streaming(src: Path, out: Path, spec: StackSpec, *, shard_size: int, settings=None, seed: int = 0,
                    progress: Progress | None = None, verify_limit: int = VERIFY_LIMIT) -> dict[str, Any]:
    """Stack the HF directory ``src`` into the HF directory ``out`` without loading its weights.

    Outputs up to ``verify_limit`` bytes are loaded and verified against the input (identity
    init must be exact: :class:`VerificationFailed` otherwise, and nothing is written); larger
    ones get the structural check only, which the report says. Returns the growth report.
    """
    from growcli.run.steps import VerifySettings

    settings = settings or VerifySettings()
    started = time.perf_counter()
    check_output_path(out, src)
    refs = read_tensors(src)
    module = meta_model(src)

    def sample() -> Batch:
        return cast_batch(make_batches(hf_input_spec(module), 1, seed=seed)[0], next(module.parameters()).dtype)

    plan = plan_stack(module, spec, sample)
    names = stack_names(module, plan.container, refs)
    tensors = plan_tensors(refs, plan, names)
    total = sum(t.ref.nbytes for t in tensors)
    small = total <= verify_limit
    post_ln = spec.init == "identity" and bool(plan.post_norms)
    if post_ln and not spec.allow_inexact and not small:
        raise NotGrowableError(f"stack --init identity: {post_ln_reason(plan)}. Pass --allow-mismatch to write it "
                               "anyway (reported as not function-preserving), or use --init copy")
    report = step_report(spec, plan, sum(_numel(r.shape) for r in refs.values()),
                         sum(_numel(t.ref.shape) for t in tensors))
    shards = pack_shards(tensors, shard_size)
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    checked = []
    timing = {"plan": time.perf_counter() - started}
    with atomic_output(out, directory=True) as tmp:
        for file, group in zip(files, shards):
            write_shard(tmp / file, group, advance)
        timing["write"] = time.perf_counter() - started - timing["plan"]
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {t.name: f for f, g in zip(files, shards) for t in g}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = json.loads((src / "config.json").read_text())
        config.update(plan.config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(src, tmp)  # tokenizer, generation config…; never the input's (stale) weights
        new_config = module.config.__class__.from_pretrained(str(tmp), local_files_only=True)
        checked.append(_structure_check(type(module), new_config, names, tensors))
        verification = _verify(src, tmp, settings, seed) if small else None
        if verification is None:
            checked.append(f"not run: the output ({total / 1e9:.2f} GB) is above the {verify_limit / 1e9:.2f} GB "
                           "limit for loading both models")
        else:
            report.verification = verification.to_dict()
            checked.append(f"ran both models: {verification.summary()}")
            if not report.exact:
                report.notes.append(f"not function-preserving by design; measured: {verification.summary()}")
            if post_ln and not spec.allow_inexact:
                raise NotGrowableError(f"stack --init identity: {post_ln_reason(plan)}; measured: "
                                       f"{verification.summary()}. Pass --allow-mismatch to write it anyway (reported "
                                       "as not function-preserving), or use --init copy")
            if report.exact and not verification.passed and not settings.allow_mismatch:
                raise VerificationFailed(f"step 1 (stack) changed the function: {verification.summary()}", verification)
        timing["check"] = time.perf_counter() - started - timing["plan"] - timing["write"]
        result = {"input": str(src), "streaming": True, "steps": [report.to_dict()],
                  "function_preserving": report.exact, "verification": report.verification, "checked": checked,
                  "params_before": report.params_before, "params_after": report.params_after,
                  "outputs": [{"path": str(out), "format": "hf", "shards": len(shards), "bytes": total}],
                  "seconds": round(time.perf_counter() - started, 3),
                  "timing": {k: round(v, 3) for k, v in timing.items()}}
        (tmp / "growth_report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _verify(src: Path, grown: Path, settings, seed: int):
    """Load both directories in memory and compare them (only called for small checkpoints)."""
    from growcli.verification.compare import verify_models

    original = load_model(src)
    candidate = load_model(grown)
    batches = settings.inputs if settings.inputs is not None else make_batches(original.inputs, settings.batches, seed=seed,
                                                                                  seq_len=getattr(settings, "seq_len", None))
    return verify_models(original.module, candidate.module, batches, dtype=settings.dtype, atol=settings.atol,
                         rtol=settings.rtol)
