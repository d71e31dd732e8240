"""Benchmarks: each prints a table and writes it to docs/performance.md."""
