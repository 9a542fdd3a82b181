"""The soak's verdict figures (``serving_load.soak_figures``): errors, RSS growth measured after the
warm-up, and the request ids in the impressions spool against the answers served."""

from __future__ import annotations

import pytest

from recsys.benchmarks.serving_load import SoakOutcome, soak_figures

MIB = 2**20


def _outcome(served: list[int], errors: int = 0) -> SoakOutcome:
    # Start-up growth (100 -> 200 MiB) happens inside the warm-up and is not counted.
    samples = [(0.0, 100 * MIB), (30.0, 200 * MIB), (60.0, 210 * MIB), (90.0, 205 * MIB)]
    return SoakOutcome(served_ids=served, errors=errors, wall_s=100.0, rss_samples=samples)


def test_growth_counts_from_the_first_sample_after_the_warm_up() -> None:
    figures = soak_figures(_outcome([1, 2, 3]), logged_ids=[1, 1, 2, 2, 3], warmup_s=30.0)
    assert figures["rss_base_mib"] == 200 and figures["rss_end_mib"] == 205 and figures["rss_max_mib"] == 210
    assert figures["rss_growth_pct"] == pytest.approx(2.5)
    # Several rows per logged list: ids are compared as sets.
    assert figures["logged"] == figures["served"] == 3 and figures["missing"] == figures["extra"] == 0
    assert figures["requests"] == 3 and figures["errors"] == 0 and figures["rps"] == pytest.approx(0.03)


def test_lost_and_foreign_impressions_and_errors_are_counted() -> None:
    figures = soak_figures(_outcome([1, 2, 3, 4], errors=2), logged_ids=[1, 2, 9], warmup_s=0.0)
    assert figures["missing"] == 2 and figures["extra"] == 1
    assert figures["errors"] == 2 and figures["requests"] == 6
    assert figures["rss_growth_pct"] == pytest.approx(105.0)
