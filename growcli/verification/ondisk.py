"""A Hugging Face directory as a model whose weights stay on disk until a part of it runs.

:class:`OnDisk` builds the class ``config.json`` names with its parameters on the meta device
(no memory; buffers such as rotary frequencies are computed as usual, they are small and not
all of them are saved), reads only the safetensors headers, and then loads the tensors of any
set of parameters from disk — converted to the verification dtype — and puts them back on
the meta device when they are no longer needed. Block-wise verification
(:mod:`growcli.verification.blockwise`) holds one block at a time this way.

Names on disk are the names ``save_pretrained`` writes: transformers 5 renames some families'
weights on load and back on save; the reverse conversion is run on placeholder meta tensors
to read the mapping off. A conversion that merges or splits tensors (fused experts) cannot be
read tensor by tensor and is refused. Tied parameters (an LM head sharing the embedding) are
loaded once, from whichever of their names the checkpoint holds, and stay tied.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from growcli.core.errors import FormatError, NotGrowableError
from growcli.io.hf_dir import load_hf_config, saved_names
from growcli.io.shards import TensorRef, read_tensors

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8, "I8": torch.int8,
          "BOOL": torch.bool}


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device at once; buffers stay real.

    ``nn.Linear`` allocates its weight uninitialised and initialises it after registering it,
    so the random initialisation runs on meta tensors and costs nothing.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _disk_names(module: nn.Module, who: str) -> dict[str, str]:
    """Model state_dict key → the key ``save_pretrained`` writes (:func:`growcli.io.hf_dir.saved_names`)."""
    return saved_names(module, lambda saved: NotGrowableError(
        f"block-wise verification: transformers converts {who}'s weights when saving ({saved} is computed from "
        "several tensors), so they cannot be read one by one"))


class OnDisk:
    """The model of the HF directory ``path`` on the meta device, with its tensors readable from disk.

    Raises :class:`FormatError` when the directory is not a usable standard-class checkpoint
    or lacks a tensor the model needs.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        transformers, config = load_hf_config(self.path)
        if getattr(config, "use_cache", None) is not None:
            config.use_cache = False  # whole sequences, as every verification runs them
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            raise FormatError(f"{self.path}/config.json: names no class transformers {transformers.__version__} has "
                              f"({archs[0] if archs else 'architectures is empty'}; custom code is never loaded)")
        with parameters_on_meta():
            self.module = cls(config).eval()
        self.name = archs[0]
        self.refs: dict[str, TensorRef] = read_tensors(self.path)
        # canonical parameter/buffer name → (owner module, attribute) of every alias (tied weights)
        self.slots: dict[str, list[tuple[nn.Module, str, bool]]] = {}
        self.disk: dict[str, str] = {}
        self._replaced: dict[str, torch.Tensor] = {}  # loaded key → what it replaced (a meta tensor)
        self._resolve()

    def _resolve(self) -> None:
        names = _disk_names(self.module, self.name)
        base = getattr(self.module, "base_model_prefix", "") or ""
        canonical: dict[int, str] = {}
        for kind, items in (("p", self.module.named_parameters(remove_duplicate=False)),
                            ("b", self.module.named_buffers(remove_duplicate=False))):
            for full, tensor in items:
                owner_name, _, attr = full.rpartition(".")
                owner = self.module.get_submodule(owner_name)
                if kind == "b" and attr in owner._non_persistent_buffers_set:
                    continue  # computed by the model itself, never saved
                key = canonical.setdefault(id(tensor), full)
                self.slots.setdefault(key, []).append((owner, attr, kind == "p"))
                saved = names.get(full, full)
                for candidate in (saved, saved[len(base) + 1:] if base and saved.startswith(base + ".") else None):
                    if candidate in self.refs and key not in self.disk:
                        self.disk[key] = candidate
        missing = [k for k, slots in self.slots.items() if slots[0][2] and k not in self.disk]
        if missing:
            raise FormatError(f"{self.path}: the weights do not fit {self.name}: no tensor for {missing[:3]}")

    @property
    def loaded(self) -> list[str]:
        """The canonical names of the tensors now in memory."""
        return list(self._replaced)

    def keys_under(self, prefix: str) -> list[str]:
        """Canonical names of the tensors under module ``prefix`` (``""``: all)."""
        return [k for k in self.slots if not prefix or k.startswith(prefix + ".")]

    def dtypes(self) -> set[torch.dtype]:
        """The floating-point dtypes the checkpoint stores."""
        return {DTYPES[r.dtype] for r in self.refs.values() if DTYPES.get(r.dtype, torch.int64).is_floating_point}

    def load(self, keys: Iterable[str], dtype: torch.dtype) -> None:
        """Read ``keys`` from disk into the model, floating-point tensors converted to ``dtype``."""
        for key in keys:
            if key in self._replaced or key not in self.disk:
                continue  # already loaded, or a persistent buffer the checkpoint leaves to the model
            owner, attr, is_param = self.slots[key][0]
            current = (owner._parameters if is_param else owner._buffers)[attr]
            t = read_tensor(self.refs[self.disk[key]])
            if tuple(t.shape) != tuple(current.shape):
                raise FormatError(f"{self.path}: {self.disk[key]} has shape {list(t.shape)}, {self.name} expects "
                                  f"{list(current.shape)}")
            if t.is_floating_point():
                t = t.to(dtype)
            value = nn.Parameter(t, requires_grad=False) if is_param else t
            self._replaced[key] = current
            for owner, attr, is_param in self.slots[key]:
                (owner._parameters if is_param else owner._buffers)[attr] = value

    def release(self, keys: Iterable[str] | None = None) -> None:
        """Put ``keys`` (default: every loaded tensor) back on the meta device, freeing their memory."""
        for key in list(self._replaced if keys is None else keys):
            before = self._replaced.pop(key, None)
            if before is None:
                continue
            for owner, attr, is_param in self.slots[key]:
                (owner._parameters if is_param else owner._buffers)[attr] = before


def read_tensor(ref: TensorRef) -> torch.Tensor:
    """One tensor's bytes read from its safetensors file into a new tensor (no memory map)."""
    dtype = DTYPES.get(ref.dtype)
    if dtype is None:
        raise FormatError(f"{ref.file}: tensor dtype {ref.dtype} is not supported")
    buf = bytearray(ref.nbytes)
    with open(ref.file, "rb") as fh:
        fh.seek(ref.start)
        if fh.readinto(buf) != ref.nbytes:
            raise FormatError(f"{ref.file}: truncated tensor data")
    if not ref.nbytes:
        return torch.empty(ref.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(ref.shape)
