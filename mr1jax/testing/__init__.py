"""Helpers shared by tests, benchmarks and demos (torch is imported lazily, only by the reference builders)."""
