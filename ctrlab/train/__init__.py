"""Training: optimisation loop, early stopping, checkpoints and metrics."""
