"""Continual learning by growth: Compacting, Picking and Growing (placeholder)."""
