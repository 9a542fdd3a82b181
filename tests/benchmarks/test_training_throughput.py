"""The throughput benchmark's bookkeeping: pairing before/after, speed-ups, phase shares, the table, JSON."""

from __future__ import annotations

import json

import pytest

from recsys.benchmarks.training_throughput import (
    Comparison,
    Measurement,
    format_table,
    main,
    phase_shares,
    speedup,
)


def _m(model: str, train: float, eval_: float | None = 100.0, error: str | None = None) -> Measurement:
    return Measurement(
        dataset="ml100k",
        model=model,
        history=1000,
        unit="examples",
        train_per_s=train,
        eval_per_s=eval_,
        phases_s={"batch": 0.01, "forward": 0.03, "backward": 0.05, "optimizer": 0.01},
        peak_rss_mb=900.0,
        steps=8,
        items_per_step=128.0,
        threads=1,
        error=error,
    )


def test_speedup_and_phase_shares() -> None:
    assert speedup(300.0, 100.0) == pytest.approx(3.0)
    assert speedup(300.0, None) is None and speedup(None, 100.0) is None and speedup(5.0, 0.0) is None
    shares = phase_shares({"batch": 1.0, "forward": 3.0, "backward": 4.0, "optimizer": 2.0})
    assert shares == pytest.approx({"batch": 0.1, "forward": 0.3, "backward": 0.4, "optimizer": 0.2})
    assert phase_shares({"batch": 0.0}) == {}


def test_table_pairs_current_with_baseline_by_dataset_and_model() -> None:
    result = Comparison(
        current=[_m("longer", 900.0), _m("hyformer", 600.0), _m("din", 0.0, None, error="boom")],
        baseline=[_m("hyformer", 200.0, 50.0), _m("longer", 300.0)],
        baseline_rev="abc123",
    )
    pairs = {cur.model: base for cur, base in result.pairs()}
    assert pairs["longer"] is not None and pairs["longer"].train_per_s == 300.0
    assert pairs["din"] is None
    table = format_table(result)
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert "| 300 | 900 | 3.00x |" in rows["longer"]
    assert "| 200 | 600 | 3.00x | 50 | 100 | 2.00x |" in rows["hyformer"]
    assert "10 / 30 / 50 / 10" in rows["longer"]  # the current tree's phase split, in percent
    assert "error: boom" in rows["din"]
    data = json.loads(json.dumps(result.to_json()))
    assert data["baseline_rev"] == "abc123" and len(data["current"]) == 3 and len(data["baseline"]) == 2


def test_single_tree_table_has_no_speedup_columns() -> None:
    table = format_table(Comparison(current=[_m("deepfm", 1234.0)]))
    assert "Speed-up" not in table.splitlines()[0]
    assert "| 1,234 | 100 | 900 |" in table


def test_bad_flags_are_rejected_before_any_work() -> None:
    with pytest.raises(SystemExit):
        main(["--models", "nope"])
    with pytest.raises(SystemExit):
        main(["--datasets", "ml100k", "--steps", "0"])
