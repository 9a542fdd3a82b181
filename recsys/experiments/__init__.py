"""Experiments: typer sub-apps that run a protocol end to end and write a report."""
