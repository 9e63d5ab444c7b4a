"""Growth during training: schedules that say when to grow (live-model growth builds on them)."""
