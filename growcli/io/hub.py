"""Models named by Hugging Face Hub id (``org/name`` or ``org/name@revision``): the one resolver.

:func:`resolve_source` turns what the user typed into a local path. An existing local path
always wins; anything else shaped like ``org/name[@revision]`` is looked up in the local
Hugging Face cache first (``snapshot_download(..., local_files_only=True)``, honouring
``HF_HUB_CACHE`` / ``HF_HOME`` / ``HF_ENDPOINT`` as set when the call is made, not when
``huggingface_hub`` was imported), and downloaded only when neither
``HF_HUB_OFFLINE`` nor ``TRANSFORMERS_OFFLINE`` is set. A download fetches weights, configs and
tokenizer files (:data:`ALLOW_PATTERNS`), top-level only, never code or pickles. The snapshot
directory that comes back is an ordinary Hugging Face directory input: every rule for those
(no ``auto_map``, no ``modeling_*.py``) still applies, and growcli never writes into it.
``huggingface_hub`` is imported only when an id is actually resolved.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from growcli.core.errors import CheckpointNotFoundError, MissingDependencyError, UsageError

# What a download may fetch: weights, configs (*.json covers the shard index, tokenizer.json,
# tokenizer_config.json, generation_config.json) and tokenizer vocabularies. Never *.py (code)
# and never pickles: growcli reads a Hugging Face directory's weights only from safetensors.
ALLOW_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                  "*.tiktoken", "merges.txt", "vocab.txt")
IGNORE_PATTERNS = ("*/*",)  # sub-folders (other formats, other variants): growcli reads the top level only
# File suffixes that make a missing path a missing file, not a Hub id.
_FILE_SUFFIXES = (".pt2", ".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".onnx", ".yaml", ".yml", ".json")
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_REVISION = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.+/-]*")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class HubSnapshot:
    """A model resolved from the Hub cache: the id as asked, the commit found and its snapshot directory."""

    repo_id: str
    revision: str | None  # as the user wrote it; None means the default branch (main)
    commit: str
    path: Path
    downloaded: bool = False

    @property
    def hub_id(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def to_dict(self) -> dict[str, Any]:
        """The provenance a growth report records as its ``source``."""
        return {"hub_id": self.hub_id, "repo_id": self.repo_id, "revision": self.revision or "main",
                "commit": self.commit, "snapshot": str(self.path), "downloaded": self.downloaded}


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` if ``text`` names a Hub model, ``None`` if it is a plain path.

    A text with ``@`` whose part before it holds a ``/`` is meant as an id, and a malformed one
    (``a/b/c@``, ``org/name@``, a revision with ``..``) is a :class:`UsageError` (exit 2). Without
    ``@``, only ``org/name`` with valid Hub characters is an id. Absolute paths, paths starting
    with ``.`` or ``~`` and names ending in a checkpoint suffix (``.safetensors``, ``.pt2``, …)
    are always paths.
    """
    if not text or text.startswith(("/", ".", "~")) or os.sep != "/" and text.startswith(os.sep) \
            or text.lower().endswith(_FILE_SUFFIXES):
        return None
    repo_id, at, revision = text.partition("@")
    if at:
        if "/" not in repo_id:
            return None
        if not _valid_repo_id(repo_id) or not revision or not _REVISION.fullmatch(revision) or ".." in revision:
            raise UsageError(f"{text}: not an existing path, and not a valid Hugging Face id org/name[@revision] "
                             "(org and name: letters, digits, '-', '_', '.'; a non-empty revision without '..')")
        return repo_id, revision
    return (text, None) if _valid_repo_id(text) else None


def _valid_repo_id(repo_id: str) -> bool:
    return bool(_REPO_ID.fullmatch(repo_id)) and "--" not in repo_id and ".." not in repo_id \
        and not repo_id.endswith(".git")


def resolve_source(path: str | Path) -> tuple[Path, HubSnapshot | None]:
    """The local path to load for ``path``, and where it came from when it is a Hub id.

    An existing path is returned as it is (with the Hub provenance when it is a snapshot
    directory inside a Hugging Face cache). A Hub id is resolved by :func:`resolve_hub_id`; any
    other missing path is returned unchanged for the loader to report. Raises
    :class:`UsageError` for a malformed id, :class:`CheckpointNotFoundError` naming the id when
    it is neither cached nor downloadable.
    """
    p = Path(path)
    if p.exists():
        return p, snapshot_of(p)
    parsed = parse_hub_id(str(path))
    if parsed is None:
        return p, None
    snap = resolve_hub_id(*parsed)
    return snap.path, snap


def resolve_path(path: str | Path) -> Path:
    """:func:`resolve_source` without the provenance: the local path to read."""
    return resolve_source(path)[0]


def snapshot_of(path: Path) -> HubSnapshot | None:
    """The Hub provenance of a directory laid out as ``…/models--org--name/snapshots/<commit>``, else ``None``.

    Given as a path, a snapshot is recorded as ``org/name@<commit>``: the commit is all the path says."""
    repo_dir = path.parent.parent
    if path.parent.name != "snapshots" or not repo_dir.name.startswith("models--") or not path.is_dir():
        return None
    repo_id = "/".join(repo_dir.name[len("models--"):].split("--"))
    return HubSnapshot(repo_id, path.name, path.name, path) if _valid_repo_id(repo_id) else None


def hub_cache() -> tuple[Path, str]:
    """The Hub cache directory as the environment names it now, and how, for messages (``HF_HOME=…``)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser(), f"{var}={os.environ[var]}"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub", f"HF_HOME={os.environ['HF_HOME']}"
    home = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface"
    return home / "hub", f"HF_HOME={home}, the default"


def offline_setting() -> str | None:
    """``"HF_HUB_OFFLINE=1"`` (or ``TRANSFORMERS_OFFLINE=…``) when the environment forbids downloads, else None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]}"
    return None


def resolve_hub_id(repo_id: str, revision: str | None = None) -> HubSnapshot:
    """The cached snapshot of ``repo_id`` at ``revision`` (default branch if ``None``), downloading it if allowed.

    The cache is tried first, without network. A snapshot found there but lacking
    ``config.json`` or safetensors weights is completed by a download when one is allowed.
    Otherwise, offline mode set means a :class:`CheckpointNotFoundError` naming the id, the
    cache and the variable; online, the snapshot is downloaded (:data:`ALLOW_PATTERNS` only)
    and a failure names the id and the reason.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingDependencyError(f"{repo_id}: resolving a Hugging Face id needs huggingface_hub: "
                                     "pip install 'growcli[hf]'") from None
    hub_id = repo_id + (f"@{revision}" if revision else "")
    cache, named = hub_cache()
    local = _cached(snapshot_download, repo_id, revision, cache)
    offline = offline_setting()
    if local is not None and (offline or _complete(local)):
        return HubSnapshot(repo_id, revision, local.name, local)
    if offline:
        raise CheckpointNotFoundError(f"{hub_id}: not a local path, {_missing(cache, repo_id, revision, named)} "
                                      f"and offline mode is set ({offline})")
    try:
        got = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                     allow_patterns=list(ALLOW_PATTERNS), ignore_patterns=list(IGNORE_PATTERNS),
                                     endpoint=os.environ.get("HF_ENDPOINT") or None))
    except Exception as exc:  # every failure of the Hub client becomes one line naming the id
        where = (f"its cached snapshot {local} has no config.json or safetensors weights" if local is not None
                 else _missing(cache, repo_id, revision, named))
        raise CheckpointNotFoundError(f"{hub_id}: not a local path, {where} and the Hub is not reachable: "
                                      f"{_reason(exc, revision)}") from None
    if not _complete(got):  # the client fell back to the partial cached snapshot, or the repository has none
        raise CheckpointNotFoundError(f"{hub_id}: its snapshot {got} has no config.json or safetensors weights "
                                      "(the Hub was not reachable, or the repository holds no safetensors, the only "
                                      "weights growcli reads from a Hugging Face directory)")
    return HubSnapshot(repo_id, revision, got.name, got, downloaded=True)


def _cached(snapshot_download, repo_id: str, revision: str | None, cache: Path) -> Path | None:
    try:
        found = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True))
    except Exception:  # not cached (or an incomplete snapshot the client itself refuses)
        return None
    return found if found.is_dir() else None


def _missing(cache: Path, repo_id: str, revision: str | None, named: str) -> str:
    """What the cache lacks: the repository, or only this revision (then the revisions it has)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    refs = sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file())
    commits = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
    if not refs and not commits:
        return f"not in the Hugging Face cache ({named})"
    return (f"revision {revision or 'main'!r} is not in the Hugging Face cache ({named}; cached: "
            f"{', '.join(refs + commits)})")


def _complete(snapshot: Path) -> bool:
    """A config and safetensors weights: enough for growcli to load the snapshot without a download."""
    return (snapshot / "config.json").is_file() and (any(snapshot.glob("*.safetensors"))
                                                       or (snapshot / "model.safetensors.index.json").is_file())


def _reason(exc: BaseException, revision: str | None) -> str:
    """The first line of what went wrong, the innermost cause first (a connection error behind a cache miss)."""
    names = {type(e).__name__ for e in _chain(exc)}
    if "RevisionNotFoundError" in names:
        return f"the Hub has no revision {revision!r} of it"
    if "RepositoryNotFoundError" in names or "GatedRepoError" in names:
        return "the Hub has no such repository, or it is private or gated (log in with `hf auth login`)"
    root = _chain(exc)[-1]
    text = str(root).strip().splitlines()[0][:200] if str(root).strip() else ""
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    return chain

