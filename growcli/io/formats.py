"""Low-level format facts: sniffing, safetensors header checks, pickle global scanning, hashing."""

from __future__ import annotations

import hashlib
import io
import json
import pickletools
import struct
import zipfile
from pathlib import Path

import torch

from growcli.core.errors import CheckpointNotFoundError, FormatError, InputsError, UnsafePickleError
from growcli.core.inputs import Batch, InputSpec

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, or of a directory's files (sorted by relative path)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def require_exists(path: Path, what: str = "checkpoint") -> None:
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or directory ({what})")


def safetensors_header(path: Path) -> dict:
    """Read and check a safetensors header: valid JSON, offsets inside the file.

    Raises :class:`FormatError` for truncated or corrupt files, before any tensor is read.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(SAFETENSORS_MAX_HEADER, size - 8):
            raise FormatError(f"{path}: corrupt safetensors header (claims {n} bytes of header in a {size}-byte file)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FormatError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise FormatError(f"{path}: corrupt safetensors header (entry {key!r} has no data_offsets)") from None
    if 8 + n + end > size:
        raise FormatError(f"{path}: truncated safetensors file ({size} bytes, header says {8 + n + end})")
    return header


def safetensors_metadata(path: Path) -> dict[str, str]:
    return dict(safetensors_header(path).get("__metadata__") or {})


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file whose bytes depend only on ``tensors`` and ``metadata``.

    The safetensors library serialises ``__metadata__`` in hash-map order, which changes
    from run to run; the header is rewritten here with sorted keys so the same input
    always gives a byte-identical file.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        meta = header.pop("__metadata__", None)
        ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
        ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment with spaces
        if len(raw) == n:  # same content in another order: rewrite the header in place
            fh.seek(8)
            fh.write(raw)
            return
        fh.seek(8 + n)
        data = fh.read()
        fh.seek(0)
        fh.write(struct.pack("<Q", len(raw)) + raw + data)
        fh.truncate()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise FormatError(f"{path}: cannot read safetensors: {exc}") from None


def pickle_globals(path: Path) -> list[str]:
    """Every ``module.name`` the pickle in a torch checkpoint would import, without unpickling."""
    data: bytes
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if not names:
                return []
            data = zf.read(names[0])
    else:
        data = path.read_bytes()
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:
        pass  # a truncated stream still tells us what it wanted so far
    return list(dict.fromkeys(found))


_SAFE_PREFIXES = ("collections.OrderedDict", "torch._utils._rebuild", "torch.FloatStorage", "torch.DoubleStorage",
                  "torch.HalfStorage", "torch.BFloat16Storage", "torch.LongStorage", "torch.IntStorage",
                  "torch.ByteStorage", "torch.BoolStorage", "torch.storage", "torch._tensor", "torch.float",
                  "torch.Size", "torch.device", "torch.bfloat16", "torch.int", "torch.uint", "torch.bool",
                  "torch.half", "torch.double", "torch.long", "torch.serialization._get_layout",
                  "torch.strided", "torch._utils._rebuild_parameter", "builtins.set", "__builtin__.set")


def load_torch_file(path: Path, trust_pickle: bool):
    """Load a ``.pt``/``.pth``/``.bin`` file.

    Without ``trust_pickle`` only ``weights_only`` unpickling is used; a file that needs
    more raises :class:`UnsafePickleError` naming what it would import, and nothing in the
    file has run.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        unsafe = [g for g in pickle_globals(path) if not g.startswith(_SAFE_PREFIXES)]
        if not unsafe:
            raise FormatError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
        if not trust_pickle:
            raise UnsafePickleError(str(path), unsafe) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise FormatError(f"{path}: unpickling failed: {_first_line(exc)}") from None


def read_tensor_file(path: Path, what: str = "tensor file") -> dict[str, torch.Tensor]:
    """A flat name → tensor dict from .safetensors or a weights-only .pt file."""
    require_exists(path, what)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = load_torch_file(path, trust_pickle=False)
    if isinstance(obj, torch.Tensor):
        return {"0": obj}
    if isinstance(obj, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in obj):
        return {str(i): t for i, t in enumerate(obj)}
    if isinstance(obj, dict) and all(isinstance(t, torch.Tensor) for t in obj.values()):
        return {str(k): v for k, v in obj.items()}
    raise FormatError(f"{path}: the {what} must hold tensors (a dict of name to tensor), got {type(obj).__name__}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def load_inputs_file(path: str | Path, spec: InputSpec | None = None) -> Batch:
    """Read one batch from a .safetensors or .pt file of tensors.

    Keys ``"0"``, ``"1"``, … are positional arguments in that order; any other key is a
    keyword argument of ``forward``. Shapes are checked against ``spec``: the batch dim is free, and so is
    dim 1 of the inputs the spec marks as a variable sequence (``spec.seq``: token ids of any length).
    """
    tensors = read_tensor_file(Path(path), what="inputs file")
    if not tensors:
        raise InputsError(f"{path}: the inputs file holds no tensors")
    positional = sorted((k for k in tensors if k.isdigit()), key=int)
    if positional and [int(k) for k in positional] != list(range(len(positional))):
        raise InputsError(f"{path}: positional input keys must be 0..N-1, got {positional}")
    batch: Batch = (tuple(tensors[k] for k in positional),
                    {k: v for k, v in tensors.items() if not k.isdigit()})
    if spec is not None and not spec.empty:
        expected = [(str(i), t) for i, t in enumerate(spec.args)] + list(spec.kwargs)
        got = [(str(i), a) for i, a in enumerate(batch[0])] + list(batch[1].items())
        exp_map = dict(expected)
        for key, tensor in got:
            want, name = exp_map.get(key), f"arg {key}" if key.isdigit() else key
            free = 2 if key in spec.seq else 1  # dims 0 (batch) and, for a sequence, 1 may differ
            if want is not None and (tensor.dim() != len(want.shape) or
                                     tuple(tensor.shape[free:]) != tuple(want.shape[free:])):
                raise InputsError(
                    f"{path}: input {name} has shape {list(tensor.shape)}, the model expects "
                    f"[batch, {', '.join(map(str, want.shape[1:]))}]")
    return batch
