"""Training: the generic loop, checkpoints, and the per-task datasets and training functions."""
