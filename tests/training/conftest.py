"""Training tests: one intra-op thread each, and the tiny synthetic warehouse the ranking and distillation
tests share (built once per test module, so a module that publishes into it never affects another)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.synthetic.config import SyntheticConfig
from tests.fixtures import (
    build_synthetic_warehouse,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_synthetic,
)

#: Impressions with clicks, likes and p_click: 200 items, 40 users, about 30 requests each over 20 days.
TINY_SYNTHETIC: SyntheticConfig = tiny_synthetic(
    seed=3, n_items=200, n_users=40, requests_per_user=30, horizon_days=20
)


@pytest.fixture(scope="module")
def synthetic_wh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic run loaded as ``syn`` with its examples built (one per test module)."""
    return build_synthetic_warehouse(TINY_SYNTHETIC, tmp_path_factory.mktemp("synthetic"))
