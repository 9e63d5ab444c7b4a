"""A Hugging Face tokenizer beside grown weights gets the tokens a ``vocab`` step added.

The ``vocab`` transform records, in its step report, the tokens it added and the id of the
first (``changes`` entry ``{"name": "vocabulary", "first_id", "tokens", …}``); a transform does
no I/O, so the tokenizer files of an output directory are updated here, when the directory is
written. The update happens only when transformers can load the tokenizer from local files
(``AutoTokenizer``, never remote code) and only when every new token lands on its row: the
tokenizer must have exactly ``first_id`` tokens and none of the new ones. Otherwise the
tokenizer files stay as they were and the returned note says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def tokens_added(steps: list[dict[str, Any]]) -> list[tuple[int, list[str]]]:
    """``(first_id, tokens)`` of every ``vocab`` step in ``steps`` (step reports as dicts), in order."""
    out = []
    for step in steps:
        if step.get("transform") != "vocab":
            continue
        for change in step.get("changes", []):
            if change.get("name") == "vocabulary" and isinstance(change.get("tokens"), list):
                out.append((int(change["first_id"]), [str(t) for t in change["tokens"]]))
    return out


def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def add_tokens(directory: Path, additions: list[tuple[int, list[str]]]) -> str:
    """Add each ``(first_id, tokens)`` to the tokenizer saved in ``directory``; a one-line note of what happened.

    Writes the tokenizer files back into ``directory`` only when every addition lands on the
    ids ``first_id, first_id + 1, …``; never raises for a tokenizer it cannot use.
    """
    directory = Path(directory)
    count = sum(len(t) for _, t in additions)
    if not additions or not count:
        return ""
    if not has_tokenizer(directory):
        return f"tokenizer not updated: no tokenizer files in the directory ({count} new tokens)"
    try:
        import transformers
    except ImportError:
        return f"tokenizer not updated: transformers is not installed (pip install transformers); {count} new tokens"
    from growcli.io.hf_dir import quiet_transformers  # noqa: PLC0415 (transformers is imported only here)

    quiet_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 — any tokenizer transformers cannot load is left as it is
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        return f"tokenizer not updated: transformers cannot load it ({type(exc).__name__}: {first})"
    for first_id, tokens in additions:
        if len(tok) != first_id:
            return (f"tokenizer not updated: it has {len(tok)} tokens but the model's vocabulary had {first_id} rows, "
                    f"so the new tokens' ids would not be their rows")
        known = tok.get_vocab()
        present = [t for t in tokens if t in known]
        if present:
            return f"tokenizer not updated: it already has the token {present[0]!r} (id {known[present[0]]})"
        tok.add_tokens(tokens)
        ids = tok.convert_tokens_to_ids(tokens)
        if ids != list(range(first_id, first_id + len(tokens))):
            return f"tokenizer not updated: the new tokens got ids {ids[:3]}…, not {first_id}, {first_id + 1}, …"
    tok.save_pretrained(str(directory))
    last = additions[-1][0] + len(additions[-1][1]) - 1
    return f"tokenizer: added {count} tokens (ids {additions[0][0]}–{last}), now {len(tok)} tokens"
