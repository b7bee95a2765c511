"""Benchmarks of the training loop: the tutorial's loop against the project's, and how cost scales."""
