"""growcli nest (placeholder; no command yet)."""

from __future__ import annotations


def register(app) -> None:
    pass
