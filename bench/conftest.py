"""Benchmarks run with pytest-benchmark: `make bench` (CPU suites) writes JSON to bench/out/."""
