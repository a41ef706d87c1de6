"""Reproducible benchmarks: ``python -m benchmarks.<name>``.

Each runs its baseline in the same run and reports the ratio."""
