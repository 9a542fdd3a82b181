"""recsys: an end-to-end recommender-systems platform.

raw events -> DuckDB warehouse -> features -> PyTorch models -> BentoML -> A/B simulation and dashboard.
Importing any part of the platform imports ``recsys.core`` first, so telemetry is off before Prefect, BentoML
or Streamlit is imported.

The front door: ``recsys.Recommender.load(tag).recommend(["alice", "bob"], k=10)`` (top-k in the dataset's
own ids; ``recsys.serving.recommender``). It is imported on first use (PEP 562), so ``import recsys`` stays
cheap: no torch, no BentoML until a model is asked for.
"""

from typing import TYPE_CHECKING, Any

import recsys.core  # noqa: F401

if TYPE_CHECKING:
    from recsys.serving.recommender import Recommender

__all__ = ["Recommender"]


def __getattr__(name: str) -> Any:
    if name == "Recommender":
        from recsys.serving.recommender import Recommender

        return Recommender
    raise AttributeError(f"module 'recsys' has no attribute {name!r}")
