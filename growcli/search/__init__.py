"""Architecture search by growth (placeholder)."""
