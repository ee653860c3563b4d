"""Benchmarks: ratios measured within one run, interleaved; see ``python -m benchmarks.run -h``."""
