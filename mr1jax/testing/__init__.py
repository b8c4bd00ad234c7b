"""Helpers shared by tests, benchmarks and demos (torch is only imported by `hf_reference`)."""
