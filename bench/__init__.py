"""Benchmarks: each prints a table and writes JSON; bench/RESULTS.md keeps what was measured, where and when."""
