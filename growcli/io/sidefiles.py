"""The files of a Hugging Face directory that travel with grown weights, and those that must not.

Both ways of writing a Hugging Face directory use this: streaming ``stack``
(:mod:`growcli.run.streaming`) and the in-memory writer (:mod:`growcli.io.save`). Everything
that is not a weight, a weight index, the config or an old growth report is carried over:
tokenizer files (``tokenizer*.json``, ``special_tokens_map.json``, ``*.model``, ``vocab.*``,
``merges.txt``), ``generation_config.json``, chat templates, README and license. Weights of
the original are never copied: they would be stale next to the grown ones (and a loader may
pick them up), whatever their format: ``*.safetensors``, ``pytorch_model*.bin``,
``consolidated.*``, ``tf_model.h5``, ``flax_model.msgpack``, an ``original/`` folder.

A tokenizer must also match the grown vocabulary: given the run's step reports, the tokens
a ``vocab`` step added are added to the copied tokenizer (:mod:`growcli.io.tokenizer`), and
that step's notes say whether it was done or why not.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path
from typing import Any

from growcli.io.tokenizer import add_tokens, tokens_added

# Names (matched case-insensitively, as globs) never carried over.
STALE = (
    "*.safetensors", "*.safetensors.index.json",  # the input's weights: replaced by the grown ones
    "pytorch_model*.bin", "pytorch_model*.bin.index.json", "consolidated.*", "tf_model*.h5", "tf_model*.h5.index.json",
    "flax_model*.msgpack", "flax_model*.msgpack.index.json", "model.ckpt*", "*.pt2", "*.onnx", "*.onnx_data",
    "config.json", "growth_report.json",  # written afresh
)
STALE_DIRS = ("original",)  # Meta's consolidated checkpoints shipped next to the HF weights


def is_side_file(path: Path) -> bool:
    """True if ``path`` (an entry of a Hugging Face directory) belongs with the grown weights."""
    name = path.name.lower()
    if name.startswith("."):  # .git, .cache (hub download metadata), .gitattributes
        return False
    if path.is_dir():
        return name not in STALE_DIRS
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in STALE)


def side_files(src: Path) -> list[Path]:
    """The entries of directory ``src`` to copy next to grown weights (sorted; none if ``src`` is not a directory)."""
    src = Path(src)
    if not src.is_dir():
        return []
    return sorted(p for p in src.iterdir() if is_side_file(p))


def copy_side_files(src: Path, dst: Path, steps: list[dict[str, Any]] | None = None) -> list[str]:
    """Copy ``src``'s side files into ``dst``; an entry ``dst`` already has (written for the grown model) wins.

    Returns the names copied. Folders (e.g. a tokenizer subfolder) are copied whole, minus
    stale weights inside them. With ``steps`` (the run's step reports), tokens added by a
    ``vocab`` step go into the copied tokenizer (see :func:`update_tokenizer`).
    """
    dst = Path(dst)
    copied = []
    for item in side_files(src):
        target = dst / item.name
        if target.exists():
            continue
        if item.is_dir():
            shutil.copytree(item, target, ignore=_ignore_stale)
        else:
            shutil.copy2(item, target)
        copied.append(item.name)
    if steps:
        update_tokenizer(dst, steps)
    return copied


def update_tokenizer(dst: Path, steps: list[dict[str, Any]]) -> str:
    """Add the tokens of the ``vocab`` steps in ``steps`` to the tokenizer in ``dst``; returns the note.

    The note (added, or why not) is appended once to the last ``vocab`` step's ``notes``, so the
    growth report says what happened to the tokenizer.
    """
    note = add_tokens(Path(dst), tokens_added(steps))
    vocab_steps = [s for s in steps if s.get("transform") == "vocab"]
    if note and vocab_steps and note not in vocab_steps[-1].setdefault("notes", []):
        vocab_steps[-1]["notes"].append(note)
    return note


def _ignore_stale(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if not is_side_file(Path(directory) / n)]
