"""Orchestration: steps, plans and the one runner (load, transform, verify, save)."""
