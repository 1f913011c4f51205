"""Evaluation: benchmark grids, reports and pictures, speed measurements. Used by the CLI only."""
