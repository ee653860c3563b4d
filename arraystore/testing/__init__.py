"""Generators of the inputs the converters read, for tests, benchmarks and demos: SA-1B TAR
shards, GoPro spike folders, COCO panoptic trees and NPZ examples, all built from a seed.

They are not part of any read or write path (no converter or loader imports them); they sit in
the package so that the test suite, the benchmarks and ``scripts/make_sample_shard.py`` share
one definition of each input.
"""
