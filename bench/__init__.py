"""Benchmarks: ``tierpool bench`` (see bench/run.py)."""
