"""The column transform (placeholder; registers nothing yet)."""

from __future__ import annotations
