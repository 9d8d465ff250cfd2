"""Benchmarks of linewatch (``python -m benchmarks.run_all``)."""
