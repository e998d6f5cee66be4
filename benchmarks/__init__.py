"""Benchmarks of optax_clip against optax and PyTorch: ``python -m benchmarks.run``."""
