"""safetensors shards at the byte level: where each tensor lies, and new shards copied from old ones.

Nothing here interprets a tensor's values. :func:`read_tensors` reads only headers (validated
by :func:`growcli.io.formats.safetensors_header`); :func:`write_shard` writes a new file whose
tensors' bytes are copied straight from the input files (``os.copy_file_range``, a kernel-side
copy) or left as holes that read back as zeros. The streaming stack executor
(:mod:`growcli.run.streaming`) decides which bytes go where.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from growcli.core.errors import FormatError
from growcli.io.formats import require_exists, safetensors_header

CHUNK = 64 << 20  # a multiple of FOLIO
PAGE = 4096
# The page cache's largest folio (2 MB on Linux 6.x). A kernel-side copy whose calls start at
# such a boundary of the input ran 25-30% faster here than one whose calls all start inside one.
FOLIO = 2 << 20
# Largest write() of bytes from memory. On Linux 6.x (ext4 with large folios) one write of 2 MB or
# more fills the page cache with 2 MB folios, measured here at 0.43 GB/s against 0.7-5 GB/s for the
# same bytes written 256 KB at a time (and never slower than a kernel-side copy).
WRITE_CHUNK = 256 << 10
INDEX = "model.safetensors.index.json"
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: ``file`` from absolute offset ``start``, ``nbytes`` long."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output shard: its name there, the bytes it copies, or zeros (``zero``)."""

    name: str
    ref: TensorRef
    zero: bool


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


def shard_names(count: int) -> list[str]:
    """The file names ``save_pretrained`` gives ``count`` shards."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def write_index(directory: Path, files: list[str], shards: list[list[OutTensor]]) -> None:
    """``model.safetensors.index.json``: every tensor's shard, and the total size of the weights."""
    total = sum(t.ref.nbytes for group in shards for t in group)
    index = {"metadata": {"total_size": total}, "weight_map": {t.name: f for f, g in zip(files, shards) for t in g}}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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
    raw += b" " * aligned_padding(len(raw), [(header[t.name]["data_offsets"][0], t.ref.start, t.ref.nbytes)
                                            for t in tensors if not t.zero])
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
                    copy_range(fds[t.ref.file], out.fileno(), t.ref.start, t.ref.nbytes, advance, str(t.ref.file))
            os.ftruncate(out.fileno(), 8 + len(raw) + offset)  # a hole at the very end still counts
        finally:
            for fd in fds.values():
                os.close(fd)


def aligned_padding(length: int, copies: Iterable[tuple[int, int, int]]) -> int:
    """Spaces after a JSON header of ``length`` bytes so that most copied bytes keep their offset within a page.

    ``copies`` holds ``(data offset in the new file, absolute offset in the input file, bytes)``
    of every range copied from an input. The kernel copies a range faster when source and
    destination offsets agree modulo the page size (3.0 against 2.8 GB/s here; 4.1-4.3 GB/s modulo 2 MB); safetensors allows
    no gaps between tensors, but the header may end in any amount of whitespace. Returns the
    padding (keeping the data start a multiple of 8) that aligns the most bytes.
    """
    aligned: dict[int, int] = {}
    for offset, start, nbytes in copies:
        pad = (start - (8 + length) - offset) % PAGE
        if (length + pad) % 8 == 0:
            aligned[pad] = aligned.get(pad, 0) + nbytes
    return max(aligned, key=aligned.get) if aligned else -length % 8


def write_all(fd: int, data: memoryview) -> int:
    """Write every byte of ``data`` at ``fd``'s position, :data:`WRITE_CHUNK` at a time; returns the count."""
    done = 0
    while done < len(data):  # a write may take fewer bytes than asked
        done += os.write(fd, data[done:done + WRITE_CHUNK])
    return done


def copy_range(src: int, dst: int, offset: int, n: int, advance: Callable[[int], None],
               name: str = "input file") -> None:
    """Copy ``n`` bytes of ``src`` from ``offset`` to ``dst`` at its position (``os.copy_file_range``, else
    a plain read and write); ``advance`` gets each count copied. :class:`FormatError` names ``name``
    when ``src`` ends early."""
    while n > 0:
        k = min(n, -offset % FOLIO or CHUNK)  # up to the input's next folio first: the calls after it start on one
        try:
            got = os.copy_file_range(src, dst, k, offset)
        except (OSError, AttributeError):  # filesystems or platforms without it: a plain buffered copy
            got = write_all(dst, memoryview(os.pread(src, k, offset)))
        if got == 0:
            raise FormatError(f"{name} ended early at byte {offset} (truncated while growcli read it?)")
        offset += got
        n -= got
        advance(got)
