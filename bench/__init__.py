"""Benchmarks, runnable as `python -m bench.<name>`; they print tables and never assert on time."""
