"""Benchmark harness: workloads, a runner that drives engines through them, and reports."""
