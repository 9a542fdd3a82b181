"""Process-wide environment defaults: telemetry off, generous Prefect start-up, project-local state.

Values already set by the user win (``setdefault``); the platform never phones home because the machines it
targets often have no internet, and a telemetry call that hangs is a bug.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

TELEMETRY_OFF: dict[str, str] = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
}


def state_dir() -> Path:
    """Root of the platform's local state (warehouse, artefacts, Prefect home); ``RECSYS_HOME`` moves it."""
    return Path(os.environ.get("RECSYS_HOME", PROJECT_ROOT / "var")).resolve()


def apply_environment_defaults() -> None:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    # The ephemeral API takes 10-35 s to start cold on a loaded 2-core machine; the default is too short.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_HOME", str(state_dir() / "prefect"))
    # Prefect creates its home without parents; a fresh RECSYS_HOME must exist first or its API cannot start.
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # BENTOML_HOME must sit outside any bento build context.
    os.environ.setdefault("BENTOML_HOME", str(state_dir() / "bentoml"))
