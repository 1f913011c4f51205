"""lookalike pipeline."""
