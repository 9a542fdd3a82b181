"""Evaluation protocols and metrics: retrieval (leave-one-out, full ranking) and significance tests."""
