"""The load test's own logic: load points and the before/after summary (no server started)."""

from __future__ import annotations

import pytest

from recsys.benchmarks.serving_load import parse_loads, summarize


def test_parse_loads_mixes_closed_and_open_points() -> None:
    assert parse_loads("c8, c16,r500") == [("closed", 8.0), ("closed", 16.0), ("open", 500.0)]
    for bad in ("x5", "c0", "c1.5", "r-3", "c", ""):
        with pytest.raises(ValueError, match="--loads"):
            parse_loads(bad)


def _row(server: str, mode: str, load: float, rps: float, p99: float, cpu: float = 2.0) -> dict[str, object]:
    return {
        "server": server,
        "scenario": "rank",
        "mode": mode,
        "load": load,
        "rps": rps,
        "p99_ms": p99,
        "errors": 0.0,
        "server_cpu_ms": cpu,
    }


def test_summary_takes_the_best_throughput_within_the_p99_target_and_ratios_to_the_first() -> None:
    results = [
        _row("old", "closed", 8, 500, 30),
        _row("old", "closed", 32, 900, 60),  # over the target: not counted
        _row("old", "open", 500, 499, 27.5),
        _row("new", "closed", 8, 600, 20, cpu=1.5),
        _row("new", "closed", 32, 1000, 45, cpu=1.5),
        _row("new", "open", 500, 500, 12.0, cpu=1.5),
    ]
    old, new = summarize(results, ["old", "new"], p99_target=50)
    assert old["best_rps_at_p99"] == 500 and new["best_rps_at_p99"] == 1000
    assert new["rps_ratio"] == pytest.approx(2.0) and new["cpu_ratio"] == pytest.approx(0.75)
    assert new["open_p99_ms"] == {"500": 12.0}
