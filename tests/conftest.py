"""Test-wide settings. TRITON_INTERPRET must be set before any Triton kernel is decorated: it comes first."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import atexit  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# The developer's own download cache, read (never written) by the MovieLens fixture before RECSYS_HOME moves.
_USER_CACHE = Path(os.environ.get("RECSYS_HOME", REPO_ROOT / "var")).resolve() / "cache"

# Keep every test's state out of the developer's var/ (and Prefect's home with it).
_TEST_HOME = Path(tempfile.mkdtemp(prefix="recsys-tests-"))
os.environ["RECSYS_HOME"] = str(_TEST_HOME)
os.environ["PREFECT_HOME"] = str(_TEST_HOME / "prefect")
atexit.register(shutil.rmtree, _TEST_HOME, ignore_errors=True)

import recsys.core  # noqa: E402,F401  (applies the telemetry-off defaults)
from recsys.ingest.movielens import find_movielens_100k, movielens_100k_missing_reason  # noqa: E402


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The real MovieLens-100K files (never committed, never downloaded by a test): $RECSYS_ML100K_DIR,
    then ../shared/data/ml-100k beside the repository, then the verified download's cache. A test that
    asks for them is skipped, with where it looked, when none is there; every other test makes its data."""
    path = find_movielens_100k(_USER_CACHE)
    if path is None:
        pytest.skip(movielens_100k_missing_reason(_USER_CACHE))
    return path


@pytest.fixture
def warehouse_path(tmp_path: Path) -> Path:
    return tmp_path / "warehouse.duckdb"


def pytest_unconfigure(config: pytest.Config) -> None:
    # Prefect stops its ephemeral server at interpreter exit and logs that to a stream pytest has already
    # closed; the resulting "Logging error" traceback is noise, not a failure.
    logging.raiseExceptions = False
