"""benchmarks.time_to_quality: the curve bookkeeping (test time taken out, first epoch over the threshold,
the test metric of that epoch), the argument checks, and the --record run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.benchmarks.time_to_quality import (
    curve_from_fit,
    format_table,
    parse_args,
    record_run,
    summary_rows,
    threshold_from,
)
from recsys.warehouse.runs import RunLog


def _history(valid: list[float], epoch_s: float = 10.0) -> list[dict[str, float]]:
    return [
        {"epoch": float(e), "train_loss": 1.0, "elapsed_s": epoch_s * e, "valid/ndcg@10": v}
        for e, v in enumerate(valid, start=1)
    ]


def _curve(model: str, valid: list[float], test: list[float], seed: int = 0, test_s: float = 2.0):
    return curve_from_fit(model, seed, _history(valid), [{"ndcg@10": t} for t in test], [test_s] * len(test))


def test_curve_subtracts_test_time_and_finds_the_threshold_epoch() -> None:
    curve = _curve("hstu", [0.01, 0.05, 0.08, 0.07], [0.011, 0.04, 0.07, 0.06])
    # epoch e ends at 10 e s, of which 2 e s were test evaluations
    assert [p.wall_s for p in curve.points] == [8.0, 16.0, 24.0, 32.0]
    reached = curve.first_reaching(0.05)
    assert reached is not None and (reached.epoch, reached.wall_s, reached.test) == (2, 16.0, 0.04)
    assert curve.first_reaching(0.09) is None
    assert (curve.best.epoch, curve.best.test) == (3, 0.07)
    assert curve.train_time_s == 32.0


def test_best_is_the_first_of_equal_epochs_like_the_loop() -> None:
    curve = _curve("sasrec", [0.05, 0.06, 0.06], [0.1, 0.2, 0.3])
    assert curve.best.epoch == 2


def test_curve_rejects_mismatched_test_evaluations() -> None:
    with pytest.raises(ValueError, match="3 validated epochs but 2 test evaluations"):
        curve_from_fit("hstu", 0, _history([0.1, 0.2, 0.3]), [{"ndcg@10": 0.1}] * 2, [1.0] * 2)


def test_threshold_and_summary_rows() -> None:
    curves = [
        _curve("sasrec", [0.02, 0.10], [0.02, 0.09], seed=0),
        _curve("sasrec", [0.02, 0.06, 0.08], [0.02, 0.05, 0.07], seed=1),
        _curve("hstu", [0.09, 0.11], [0.08, 0.10], seed=0),
        _curve("hstu", [0.01, 0.02], [0.01, 0.02], seed=1),
    ]
    threshold = threshold_from(curves, "sasrec", 0.5)
    assert threshold == pytest.approx(0.5 * (0.10 + 0.08) / 2)
    rows = {r["model"]: r for r in summary_rows(curves, threshold)}
    assert rows["sasrec"]["reached"] == 2 and rows["sasrec"]["epoch_at_threshold"] == [2.0, 2.0]
    assert rows["hstu"]["reached"] == 1 and rows["hstu"]["time_to_threshold_s"] == [8.0]
    assert rows["hstu"]["test_at_threshold"] == [0.08]
    table = format_table(list(rows.values()), threshold)
    assert "| hstu | 1/2 |" in table and "0.0800" in table
    with pytest.raises(ValueError, match="reference model 'bert4rec'"):
        threshold_from(curves, "bert4rec", 0.9)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "sasrec,gru4rec"], "unknown or empty"),
        (["--models", "hstu"], "--reference 'sasrec' must be one of --models"),
        (["--fraction", "1.5"], "--fraction must lie in"),
        (["--max-epochs", "0"], "--max-epochs must be >= 1"),
        (["--ml100k", "/nonexistent/ml-100k"], "does not exist"),
    ],
)
def test_bad_arguments_are_clear_errors(
    argv: list[str], message: str, ml100k_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [] if "--ml100k" in argv else ["--ml100k", str(ml100k_dir)]
    with pytest.raises(SystemExit):
        parse_args([*base, *argv])
    assert message in capsys.readouterr().err


def test_threshold_given_directly_needs_no_reference(ml100k_dir: Path) -> None:
    args = parse_args(["--ml100k", str(ml100k_dir), "--models", "hstu", "--threshold", "0.05"])
    assert args.model_list == ["hstu"] and args.threshold == 0.05


def test_record_writes_a_benchmark_run(tmp_path: Path) -> None:
    curves = [_curve("sasrec", [0.02, 0.10], [0.02, 0.09]), _curve("hstu", [0.09, 0.11], [0.08, 0.1])]
    rows = summary_rows(curves, 0.09)
    path = tmp_path / "wh.duckdb"
    run_id = record_run(path, {"models": "sasrec,hstu", "record": path}, curves, rows, 0.09, "v1")
    log = RunLog(path)
    run = log.runs("benchmark").row(0, named=True)
    assert run["run_id"] == run_id and run["name"] == "time_to_quality" and run["status"] == "finished"
    metrics = json.loads(run["metrics"])
    assert metrics["hstu/time_to_threshold_s"] == 8.0 and metrics["sasrec/test_at_threshold"] == 0.09
    curve = log.metrics(run_id)
    assert len(curve) == 2 * 2 * 3  # two models x two epochs x (valid, test, wall)
