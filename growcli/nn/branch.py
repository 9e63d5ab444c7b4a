"""growcli's own layers for branch (placeholder; filled by the change that adds them)."""

from __future__ import annotations

__all__: list[str] = []
