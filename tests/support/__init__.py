"""Helpers shared by the tests and the benchmarks (tiny models, real worker processes); not shipped."""
