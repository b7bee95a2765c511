"""Tuning studies over the pipeline's training loop (Optuna, tracked in MLflow)."""
