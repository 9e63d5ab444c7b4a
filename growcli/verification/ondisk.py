"""A Hugging Face directory as a model whose weights stay on disk until a part of it runs.

:class:`OnDisk` builds the class ``config.json`` names with its parameters on the meta device
(no memory; buffers such as rotary frequencies are computed as usual, they are small and not
all of them are saved), reads only the safetensors headers, and then loads the tensors of any
set of parameters from disk — converted to the verification dtype — and puts them back on
the meta device when they are no longer needed. Block-wise verification
(:mod:`growcli.verification.blockwise`) holds one block at a time this way.

Names on disk are the names ``save_pretrained`` writes: transformers 5 renames some families'
weights on load and back on save; the reverse conversion is run on placeholder meta tensors
to read the mapping off. A parameter that transformers fuses on load from several saved
tensors (a mixture of experts' 3-D ``experts.gate_up_proj`` from one ``w1``/``w3`` per expert)
is read the way ``from_pretrained`` reads it: the saved tensors that transformers' own load
conversion renames to it are read from disk and put through that conversion's operations
(stacking, concatenation), checked on meta placeholders up front to give exactly the
parameter's shape. Tied parameters (an LM head sharing the embedding) are loaded once, from
whichever of their names the checkpoint holds, and stay tied.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from growcli.core.errors import FormatError, NotGrowableError
from growcli.core.memory import trim
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


class _Fused(Exception):
    """A saved tensor computed from several parameters (or parts of one): read through the load conversion."""


def _disk_names(module: nn.Module) -> dict[str, str]:
    """Model state_dict key → the key ``save_pretrained`` writes, for the tensors saved one to one.

    As :func:`growcli.io.hf_dir.saved_names`; a parameter saved as pieces (fused experts) is
    left out here and found by :class:`_LoadConversion`.
    """
    try:
        return saved_names(module, _Fused)
    except _Fused:
        pass
    from transformers.core_model_loading import revert_weight_conversion

    state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in module.state_dict().items()}
    by_id = {id(v): k for k, v in state.items()}
    return {by_id[id(t)]: saved for saved, t in revert_weight_conversion(module, dict(state)).items() if id(t) in by_id}


class _LoadConversion:
    """Parameters ``from_pretrained`` builds from several saved tensors, built the same way from disk.

    transformers' load conversion for the model's class renames each saved tensor to the
    parameter it feeds (``block_sparse_moe.experts.3.w1.weight`` → ``mlp.experts.gate_up_proj``);
    the tensors feeding one parameter are put through that converter's operations in the order
    ``from_pretrained`` uses (natural key order). Each group is run once up front on meta
    placeholders: the parameters it yields, and their shapes, are known before any byte is read.
    """

    def __init__(self, module: nn.Module, refs: dict[str, TensorRef], claimed: set[str], who: str,
                 purpose: str = "block-wise verification"):
        self.module, self.refs = module, refs
        self.groups: dict[str, list[tuple[str, str]]] = {}  # group (first target) → (saved key, source pattern)
        self.targets: dict[str, str] = {}  # parameter → its group
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import (WeightConverter, WeightRenaming, dot_natural_key,
                                                         rename_source_key)
        except ImportError:  # transformers 4 stores weights under the model's own names
            return
        mapping = get_model_conversion_mapping(module) or []
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self.converters = {p: c for c in converters for p in c.source_patterns}
        meta = module.state_dict()
        for key in sorted((k for k in refs if k not in claimed), key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, getattr(module, "base_model_prefix", None),
                                                meta)
            if pattern is not None and target in meta:
                self.groups.setdefault(target, []).append((key, pattern))
        for group in self.groups:
            try:
                made = self._convert(group, meta=True)
            except Exception as exc:  # a conversion that needs real values (dequantisation…): not read, refused
                raise NotGrowableError(f"{purpose}: transformers' load conversion of {group} (from "
                                       f"{self.groups[group][0][0]}…) cannot be read tensor by tensor "
                                       f"({type(exc).__name__}: {str(exc)[:120]})") from None
            for name, tensor in made.items():
                if name not in meta:
                    continue
                if tuple(tensor.shape) != tuple(meta[name].shape):
                    raise FormatError(f"{who}: transformers' load conversion builds {name} of shape "
                                      f"{list(tensor.shape)} from {self.groups[group][0][0]}…; the model expects "
                                      f"{list(meta[name].shape)}")
                self.targets[name] = group

    def _convert(self, group: str, meta: bool = False) -> dict[str, torch.Tensor]:
        """The parameters ``group``'s saved tensors make (on the meta device: shapes only)."""
        items = self.groups[group]
        converter = copy.deepcopy(self.converters[items[0][1]])
        for key, pattern in items:
            ref = self.refs[key]
            read = (lambda ref=ref: torch.empty(ref.shape, dtype=DTYPES[ref.dtype], device="meta")) if meta else \
                (lambda ref=ref: read_tensor(ref))
            converter.add_tensor(group, key, pattern, read)
        made = converter.convert(group, model=self.module, config=self.module.config)
        return {k: v[0] if isinstance(v, list) else v for k, v in made.items()}

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The fused parameters among ``keys``, read from disk (each group converted once)."""
        out: dict[str, torch.Tensor] = {}
        for group in dict.fromkeys(self.targets[k] for k in keys if k in self.targets):
            made = self._convert(group)
            out.update({k: made[k] for k in keys if self.targets.get(k) == group})
        return out


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
        if hasattr(self.module, "set_experts_implementation"):
            self.module.set_experts_implementation("eager")  # the grouped_mm kernel has no float64
        # the buffers' dtypes as the model makes them (rotary frequencies in float32), before any run casts them
        self.buffer_dtypes = {b.dtype for b in self.module.buffers() if b.is_floating_point()}
        self.name = archs[0]
        self.refs: dict[str, TensorRef] = read_tensors(self.path)
        # canonical parameter/buffer name → (owner module, attribute) of every alias (tied weights)
        self.slots: dict[str, list[tuple[nn.Module, str, bool]]] = {}
        self.disk: dict[str, str] = {}
        self._replaced: dict[str, torch.Tensor] = {}  # loaded key → what it replaced (a meta tensor)
        self._resolve()

    def _resolve(self) -> None:
        names = _disk_names(self.module)
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
        self.fused = _LoadConversion(self.module, self.refs, set(self.disk.values()), f"{self.path}")
        missing = [k for k, slots in self.slots.items() if slots[0][2] and k not in self.disk
                   and k not in self.fused.targets]
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
        keys = [k for k in keys if k not in self._replaced]
        fused = self.fused.read([k for k in keys if k not in self.disk])
        for key in keys:
            if key not in self.disk and key not in fused:
                continue  # a persistent buffer the checkpoint leaves to the model
            owner, attr, is_param = self.slots[key][0]
            current = (owner._parameters if is_param else owner._buffers)[attr]
            t = fused[key] if key in fused else read_tensor(self.refs[self.disk[key]])
            if tuple(t.shape) != tuple(current.shape):
                raise FormatError(f"{self.path}: {self.disk.get(key, key)} has shape {list(t.shape)}, {self.name} "
                                  f"expects {list(current.shape)}")
            if t.is_floating_point():
                t = t.to(dtype)
            value = nn.Parameter(t, requires_grad=False) if is_param else t
            self._replaced[key] = current
            for owner, attr, is_param in self.slots[key]:
                (owner._parameters if is_param else owner._buffers)[attr] = value

    def release(self, keys: Iterable[str] | None = None) -> None:
        """Put ``keys`` (default: every loaded tensor) back on the meta device, freeing their memory (given back
        to the system: the tensors of different sizes loaded one after the other would otherwise leave a
        fragmented heap as large as several of them)."""
        freed = False
        for key in list(self._replaced if keys is None else keys):
            before = self._replaced.pop(key, None)
            if before is None:
                continue
            freed = True
            for owner, attr, is_param in self.slots[key]:
                (owner._parameters if is_param else owner._buffers)[attr] = before
        if freed:
            trim()


def read_tensor(ref: TensorRef) -> torch.Tensor:
    """One tensor's bytes read from its safetensors file into a new tensor (no memory map)."""
    return read_rows(ref, 0, ref.shape[0]) if ref.shape else _read(ref, 0, ref.nbytes, tuple(ref.shape))


def read_rows(ref: TensorRef, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` (along the first dim) of ``ref``'s tensor, read from its file alone."""
    row = ref.nbytes // ref.shape[0] if ref.shape[0] else 0
    return _read(ref, start * row, (stop - start) * row, (stop - start, *ref.shape[1:]))


def _read(ref: TensorRef, offset: int, nbytes: int, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = DTYPES.get(ref.dtype)
    if dtype is None:
        raise FormatError(f"{ref.file}: tensor dtype {ref.dtype} is not supported")
    buf = bytearray(nbytes)
    with open(ref.file, "rb") as fh:
        fh.seek(ref.start + offset)
        if fh.readinto(buf) != nbytes:
            raise FormatError(f"{ref.file}: truncated tensor data")
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)
