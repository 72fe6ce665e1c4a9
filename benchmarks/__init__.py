"""Reproducible benchmarks; results are recorded in BENCHMARKS.md with the command that made them."""
