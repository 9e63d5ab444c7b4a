"""Atomic outputs: write into a temporary sibling, rename into place only on success."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from growcli.errors import OutputError, UsageError


def check_output_path(out: Path, source: Path | None) -> None:
    """Refuse outputs that would overwrite or land inside the input."""
    if source is None:
        return
    out_r, src_r = out.resolve(), source.resolve()
    if out_r == src_r:
        raise UsageError(f"{out}: the output path is the input; growcli never modifies its input, choose another path")
    if src_r.is_dir() and src_r in out_r.parents:
        raise UsageError(f"{out}: the output would be written inside the input directory {source}; choose another path")


@contextlib.contextmanager
def atomic_output(out: Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on normal exit it replaces ``out``.

    Missing parent directories are created and removed again if the write fails, so a
    failure leaves nothing behind. An existing ``out`` is replaced only after the new
    output is complete.
    """
    created: list[Path] = []
    parent = out.parent if str(out.parent) else Path(".")
    p = parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        for d in reversed(created):
            d.mkdir()
        tmp = parent / f".{out.stem}.growcli-tmp-{os.getpid()}{out.suffix}"
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        if directory:
            tmp.mkdir()
        else:
            with open(tmp, "wb"):
                pass
    except OSError as exc:
        _remove_dirs(created)
        raise OutputError(f"{out}: cannot write here ({exc.strerror or exc})") from None
    try:
        yield tmp
        if out.is_dir() and not out.is_symlink():
            old = parent / f".{out.name}.growcli-old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            # Some writers (safetensors) create their file private (0600); give the output the
            # mode any new file gets here, as a plain write would.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        _remove_dirs(created)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_dirs(created: list[Path]) -> None:
    for d in created:
        with contextlib.suppress(OSError):
            d.rmdir()
