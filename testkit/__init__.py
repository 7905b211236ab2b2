"""Shared helpers for tests, examples and benchmarks (not part of the installed package): small models,
a local Hub-compatible server."""
