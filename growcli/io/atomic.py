"""Atomic outputs: write into a temporary sibling, rename into place only on success.

Output paths never destroy data: :func:`check_output_path` refuses an output that is,
contains or lies inside an input, and (when asked) one that already exists, unless
``overwrite`` — which replaces a file, or a directory growcli itself wrote (recognised
by its ``growth_report.json``), never anything holding an input. :func:`transaction`
makes several :func:`atomic_output` blocks commit together or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from growcli.core.errors import GrowError, OutputError, UsageError

# Keys every growth report has (growcli.run.runner.grow writes them, in either execution mode).
REPORT_KEYS = frozenset({"input", "steps", "function_preserving", "params_before", "params_after", "outputs"})
_TEMP = re.compile(r"\.growcli-(?:tmp|old)-(\d+)")


def _abs(p: Path) -> Path:
    return Path(os.path.abspath(p))


def _forms(p: Path) -> set[Path]:
    """The path as written (absolute) and with every symlink resolved."""
    return {_abs(p), p.resolve()}


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_path(out: Path, source: Path | Iterable[Path | None] | None, *, overwrite: bool | None = None,
                      directory: bool = False) -> None:
    """Refuse outputs that would overwrite, contain or land inside an input.

    ``source`` is one input path or several. With ``overwrite`` ``None`` an existing output
    is not checked; ``False`` refuses it (an empty directory is fine for a ``directory``
    output); ``True`` allows replacing a file, or a directory growcli wrote.
    """
    out = Path(out)
    sources = [source] if source is None or isinstance(source, (str, os.PathLike)) else list(source)
    for src in (Path(s) for s in sources if s is not None):
        for o in _forms(out):
            for s in _forms(src):
                if o == s:
                    raise UsageError(f"{out}: the output path is the input; growcli never modifies its input, "
                                     "choose another path")
                if s in o.parents:
                    raise UsageError(f"{out}: the output would be written inside the input directory {src}; "
                                     "choose another path")
                if o in s.parents:
                    raise UsageError(f"{out}: the output would contain the input {src}; growcli never replaces "
                                     "a directory holding its input, choose another path")
    if overwrite is None or not (out.exists() or out.is_symlink()):
        return
    if out.is_dir():
        if not directory:
            raise UsageError(f"{out}: is a directory; this output is a file, give a file path")
        if not any(out.iterdir()):
            return
        if not overwrite:
            raise UsageError(f"{out}: exists and is not empty; choose a new path, or pass --overwrite to replace "
                             "an earlier growcli output")
        if not is_growcli_output(out):
            raise UsageError(f"{out}: exists and was not written by growcli (no growth_report.json); "
                             "--overwrite replaces only growcli's own output directories")
        return
    if directory:
        raise UsageError(f"{out}: exists and is not a directory; choose another path")
    if not overwrite:
        raise UsageError(f"{out}: exists; choose a new path, or pass --overwrite to replace it")


def check_distinct(paths: Iterable[Path]) -> None:
    """Refuse two outputs of one run at the same path or one inside the other."""
    seen: list[tuple[Path, Path]] = []
    for p in paths:
        a = _abs(Path(p))
        for q, b in seen:
            if _within(a, b) or _within(b, a):
                raise UsageError(f"{p}: the run already writes {q} there; give each output its own path")
        seen.append((Path(p), a))


def is_growcli_output(directory: Path) -> bool:
    """A directory growcli wrote: its ``growth_report.json`` is a report with growcli's keys."""
    try:
        report = json.loads((directory / "growth_report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and REPORT_KEYS <= set(report)


@dataclass
class _Staged:
    out: Path
    tmp: Path
    created: list[Path]


@dataclass
class _Transaction:
    staged: list[_Staged] = field(default_factory=list)


_active: list[_Transaction] = []


@contextlib.contextmanager
def transaction() -> Iterator[_Transaction]:
    """Every :func:`atomic_output` finished inside is renamed into place when this block ends, all
    together; an error anywhere (or in a rename) leaves no final path changed and no temporary."""
    if _active:  # nested: the outer transaction commits
        yield _active[-1]
        return
    tx = _Transaction()
    _active.append(tx)
    try:
        yield tx
    except BaseException:
        _active.pop()
        _discard_all(tx.staged)
        raise
    _active.pop()
    _commit(tx.staged)


def staged_path(out: Path) -> Path | None:
    """The temporary path an output of the running transaction is written at, or ``None``."""
    for tx in _active:
        for s in tx.staged:
            if _abs(s.out) == _abs(Path(out)):
                return s.tmp
    return None


@contextlib.contextmanager
def atomic_output(out: Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on normal exit it replaces ``out``.

    Missing parent directories are created and removed again if the write fails, so a
    failure leaves nothing behind. An existing ``out`` is replaced only after the new
    output is complete, and a non-empty directory only if growcli wrote it. Inside a
    :func:`transaction` the rename waits for the end of the transaction. Temporaries left
    in the directory by a killed earlier run are removed first.
    """
    out = Path(out)
    created: list[Path] = []
    parent = out.parent if str(out.parent) else Path(".")
    p = parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        for d in reversed(created):
            d.mkdir()
        clean_stale(parent)
        tmp = parent / f".{out.stem}.growcli-tmp-{os.getpid()}{out.suffix}"
        _discard(tmp)
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
        if not tmp.is_dir():
            # Some writers (safetensors) create their file private (0600); give the output the
            # mode any new file gets here, as a plain write would.
            os.chmod(tmp, 0o666 & ~_umask())
    except BaseException as exc:
        _discard(tmp)
        _remove_dirs(created)
        if isinstance(exc, Exception) and not isinstance(exc, GrowError) and _disk_error(exc):
            raise OutputError(f"{out}: cannot write ({_disk_error(exc)})") from None
        raise
    if _active:
        _active[-1].staged.append(_Staged(out, tmp, created))
    else:
        _commit([_Staged(out, tmp, created)])


def _disk_error(exc: BaseException) -> str | None:
    """The reason when ``exc`` is the file system refusing a write (full disk, quota, read-only)."""
    codes = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}
    if isinstance(exc, OSError) and exc.errno in codes:
        return codes[exc.errno]
    text = str(exc)
    if "No space left on device" in text or "StorageFull" in text:  # writers that wrap the OSError (safetensors)
        return "no space left on device"
    return None


def _commit(staged: list[_Staged]) -> None:
    """Rename every temporary into place; on any failure undo the renames already done."""
    done: list[tuple[_Staged, Path | None]] = []
    try:
        for s in staged:
            old = None
            if s.out.exists() or s.out.is_symlink():
                if s.out.is_dir() and not s.out.is_symlink() and any(s.out.iterdir()) and not is_growcli_output(s.out):
                    raise UsageError(f"{s.out}: exists and was not written by growcli; refusing to replace it")
                old = s.out.parent / f".{s.out.name}.growcli-old-{os.getpid()}"
                _discard(old)
                os.replace(s.out, old)
            try:
                os.replace(s.tmp, s.out)
            except BaseException:
                if old is not None:
                    os.replace(old, s.out)
                raise
            done.append((s, old))
    except BaseException as exc:
        for s, old in reversed(done):
            with contextlib.suppress(OSError):
                os.replace(s.out, s.tmp)
                if old is not None:
                    os.replace(old, s.out)
        _discard_all(staged)
        if isinstance(exc, OSError) and not isinstance(exc, GrowError):
            raise OutputError(f"{staged[len(done)].out}: cannot write here ({exc.strerror or exc})") from None
        raise
    for _, old in done:
        if old is not None:
            _discard(old)


def _discard_all(staged: list[_Staged]) -> None:
    """Remove every temporary, then the directories created for them (deepest first)."""
    for s in staged:
        _discard(s.tmp)
    dirs = {d for s in staged for d in s.created}
    _remove_dirs(sorted(dirs, key=lambda d: len(_abs(d).parts), reverse=True))


def ensure_space(needs: Iterable[tuple[Path, int]]) -> None:
    """Refuse, before writing, outputs whose file system has less free space than they need.

    ``needs`` holds ``(output path, estimated bytes)``; outputs on one file system add up. Some
    writers (torch.export's archive) abort the process on a full disk, so this is checked first.
    """
    totals: dict[int, list] = {}
    for out, nbytes in needs:
        p = _abs(Path(out)).parent
        while not p.exists():
            p = p.parent
        try:
            st = os.statvfs(p)
            dev = os.stat(p).st_dev
        except OSError:
            continue
        entry = totals.setdefault(dev, [st.f_bavail * st.f_frsize, 0, out])
        entry[1] += nbytes
    for free, need, out in totals.values():
        if need > free:
            raise OutputError(f"{out}: cannot write (no space left on device: the outputs need about "
                              f"{_size(need)}, {_size(free)} are free)")


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


def clean_stale(directory: Path) -> None:
    """Remove ``.growcli-tmp-PID`` / ``.growcli-old-PID`` entries whose process no longer runs."""
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return
    for entry in entries:
        m = _TEMP.search(entry.name)
        if entry.name.startswith(".") and m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                _discard(entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_dirs(created: list[Path]) -> None:
    for d in created:
        with contextlib.suppress(OSError):
            d.rmdir()
