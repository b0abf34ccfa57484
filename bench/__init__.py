"""Benchmarks of lookalike (see docs/BENCHMARKS.md)."""
