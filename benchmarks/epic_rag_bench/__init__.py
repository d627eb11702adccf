"""Benchmarks and evaluation harnesses (TTFT, accuracy)."""
