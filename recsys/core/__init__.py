"""Shared foundation: typed configuration, paths, environment (telemetry off) and hashing helpers.

Importing any part of the platform imports this package first, so the telemetry switches below are
in place before Prefect, BentoML or Streamlit is imported.
"""

from recsys.core.environment import apply_environment_defaults

apply_environment_defaults()
