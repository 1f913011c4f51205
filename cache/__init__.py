"""lookalike cache."""
