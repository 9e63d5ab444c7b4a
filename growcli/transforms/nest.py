"""NeST transforms (placeholder; registers nothing yet)."""

from __future__ import annotations
