"""recsys: an end-to-end recommender-systems platform.

raw events -> DuckDB warehouse -> features -> PyTorch models -> BentoML -> A/B simulation and dashboard.
Importing any part of the platform imports ``recsys.core`` first, so telemetry is off before Prefect, BentoML
or Streamlit is imported.
"""

import recsys.core  # noqa: F401
