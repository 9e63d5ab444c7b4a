"""Running two models on the same inputs and comparing every output, in memory and from disk."""
