"""The serving policy's propensities, the Parquet spool and its publish into the warehouse."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from recsys.serving.impressions import (
    ImpressionLogger,
    plackett_luce_order,
    publish_impressions,
    read_spool,
    spool_files,
)
from recsys.warehouse import Warehouse


def test_greedy_policy_sorts_by_score_with_propensity_one() -> None:
    order, propensity = plackett_luce_order(np.array([0.1, 3.0, -1.0, 2.0]), 0.0, 3, seed=7)
    assert order.tolist() == [1, 3, 0] and propensity.tolist() == [1.0, 1.0, 1.0]


def test_plackett_luce_propensities_follow_the_documented_formula() -> None:
    scores = np.array([2.0, 1.0, 0.0, -1.0, 0.5])
    t = 0.7
    order, propensity = plackett_luce_order(scores, t, 4, seed=3)
    w = np.exp(scores / t)
    remaining = w.sum()
    for p, i in enumerate(order):
        assert propensity[p] == pytest.approx(w[i] / remaining)
        remaining -= w[i]
    assert len(set(order.tolist())) == 4
    # Same request id (seed), same draw: a logged request can be replayed.
    again = plackett_luce_order(scores, t, 4, seed=3)
    assert again[0].tolist() == order.tolist()


def test_first_position_frequencies_match_their_propensities() -> None:
    scores = np.array([1.0, 0.0, -0.5])
    draws = np.array([plackett_luce_order(scores, 1.0, 1, seed=s)[0][0] for s in range(4000)])
    expected = np.exp(scores) / np.exp(scores).sum()
    observed = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(observed, expected, atol=0.03)


def test_bad_slate_size_is_refused() -> None:
    with pytest.raises(ValueError, match="k must be in"):
        plackett_luce_order(np.array([1.0, 2.0]), 1.0, 3, seed=0)


def _log(logger: ImpressionLogger, request_id: int, items: list[int], user: int | None = 5) -> None:
    n = len(items)
    logger.log(
        request_id=request_id,
        user_id=user,
        ts=1000 + request_id,
        item_ids=np.array(items),
        scores=np.linspace(1.0, 0.0, n),
        propensities=np.full(n, 0.5),
        endpoint="recommend",
        model_version="m:v1",
        cold_start=None if user else "unknown_user",
        policy_temperature=1.0,
    )


def test_spool_files_are_complete_parquet_batches(tmp_path: Path) -> None:
    logger = ImpressionLogger(tmp_path, flush_interval_s=3600)
    _log(logger, 1, [10, 11, 12])
    _log(logger, 2, [13], user=None)
    first = logger.flush()
    assert logger.flush() is None  # nothing buffered: no empty file
    _log(logger, 3, [14, 15])
    logger.close()
    files = spool_files(tmp_path)
    assert len(files) == 2 and files[0] == first
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    frame = read_spool(tmp_path)
    assert frame.columns[:10] == [
        "request_id", "user_id", "item_id", "ts", "position", "propensity",
        "click", "like", "dwell", "p_click",
    ]  # fmt: skip
    assert frame["request_id"].to_list() == [1, 1, 1, 2, 3, 3]
    assert frame["position"].to_list() == [0, 1, 2, 0, 0, 1]
    assert frame["user_id"].to_list() == [5, 5, 5, None, 5, 5]
    assert frame["cold_start"].to_list()[3] == "unknown_user"
    assert frame["click"].null_count() == frame.height  # outcomes are unknown when serving


def test_concurrent_writers_lose_no_row(tmp_path: Path) -> None:
    logger = ImpressionLogger(tmp_path, flush_rows=7, flush_interval_s=0.01)

    def writer(offset: int) -> None:
        for r in range(50):
            _log(logger, offset + r, [1, 2, 3])
            if r == 25:  # half-way, let the spool thread write at least once while the others still log
                _wait(lambda: logger.files_written >= 1)

    threads = [threading.Thread(target=writer, args=(1000 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logger.close()
    frame = read_spool(tmp_path)
    assert frame.height == 4 * 50 * 3 and frame["request_id"].n_unique() == 200
    assert len(spool_files(tmp_path)) > 1


def test_publish_loads_the_spool_into_an_impressions_compatible_table(tmp_path: Path) -> None:
    spool, warehouse = tmp_path / "spool", tmp_path / "wh.duckdb"
    logger = ImpressionLogger(spool, flush_interval_s=3600)
    _log(logger, 1, [10, 11])
    logger.flush()
    first = publish_impressions(warehouse, spool)
    assert first.row_count == 2
    assert publish_impressions(warehouse, spool).version == first.version  # unchanged spool: skipped
    _log(logger, 2, [12])
    logger.close()
    second = publish_impressions(warehouse, spool)
    assert second.row_count == 3 and second.version != first.version
    with Warehouse(warehouse, read_only=True) as wh:
        types = {r[0]: r[1] for r in wh.con.execute("DESCRIBE serving_impressions").fetchall()}
        rows = wh.sql("SELECT request_id, item_id, position FROM serving_impressions ORDER BY ts, position")
    assert types["request_id"] == "BIGINT" and types["position"] == "INTEGER"
    assert types["propensity"] == "DOUBLE" and types["click"] == "BOOLEAN" and types["p_click"] == "DOUBLE"
    assert rows.rows() == [(1, 10, 0), (1, 11, 1), (2, 12, 0)]


def test_publish_of_an_empty_spool_gives_an_empty_table(tmp_path: Path) -> None:
    version = publish_impressions(tmp_path / "wh.duckdb", tmp_path / "nothing-here")
    assert version.row_count == 0


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_failing_flush_is_reported_retried_and_loses_no_row(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    logger = ImpressionLogger(spool, flush_rows=1, flush_interval_s=0.05)
    parked = tmp_path / "parked"
    spool.rename(parked)
    spool.write_text("not a directory")  # every write fails
    try:
        _log(logger, 1, [10, 11])
        _wait(lambda: logger.failure() is not None)
        assert "impressions spool writer failing" in (logger.failure() or "")
        _log(logger, 2, [12])  # the writer thread survived: it still takes and retries rows
        _wait(lambda: logger.flush_errors >= 2)
        assert logger._thread.is_alive() and logger.buffered_rows == 3
        assert "recsys_impressions_writer_healthy 0" in logger.prometheus()
    finally:
        spool.unlink()
        parked.rename(spool)
    _wait(lambda: logger.failure() is None)
    logger.close()
    assert sorted(read_spool(spool)["item_id"].to_list()) == [10, 11, 12]
    assert logger.rows_written == 3 and logger.dropped_rows == 0
    text = logger.prometheus(labels={"worker_pid": "7"})
    assert 'recsys_impressions_rows_written_total{worker_pid="7"} 3' in text
    assert 'recsys_impressions_writer_healthy{worker_pid="7"} 1' in text


def test_the_buffer_is_bounded_and_drops_are_counted(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    logger = ImpressionLogger(spool, flush_rows=10_000, flush_interval_s=60.0, max_buffered_rows=5)
    spool.rmdir()
    spool.write_text("not a directory")
    _log(logger, 1, [1, 2, 3])
    _log(logger, 2, [4, 5])
    _log(logger, 3, [6])  # would make 6 rows: dropped, not waited for
    assert logger.buffered_rows == 5 and logger.dropped_rows == 1 and logger.dropped_lists == 1
    with pytest.raises(OSError):
        logger.flush()
    assert logger.buffered_rows == 5  # the rows of the failed flush are kept, newest first to go
    assert "recsys_impressions_dropped_rows_total 1" in logger.prometheus()
    logger.close()  # its last flush fails too: logged and counted, no exception at shutdown
    assert logger.dropped_rows == 6 and logger.buffered_rows == 0


def test_a_dead_writer_thread_is_reported(tmp_path: Path) -> None:
    logger = ImpressionLogger(tmp_path / "spool")
    assert logger.failure() is None
    logger._stop.set()  # the thread ends as if it had died, without close()
    logger._full.set()
    logger._thread.join(5)
    logger._stop.clear()
    assert logger.failure() == "impressions spool writer thread is not running"
