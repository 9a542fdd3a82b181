"""What the flows show and retry: I/O failures only are retried; progress, heartbeat and tables."""

from __future__ import annotations

import logging
import time
import urllib.error

import duckdb
import pytest

from recsys.flows.observe import (
    IO_RETRIES,
    StageProgress,
    artifact_key,
    heartbeat,
    is_io_error,
    retry_on_io,
    table_artifact,
)
from recsys.ingest.schema import IngestError


def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        raise exc from cause
    except BaseException as caught:  # noqa: BLE001
        return caught


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (duckdb.IOException('Could not set lock on file "warehouse.duckdb"'), True),
        (ConnectionResetError("peer reset"), True),
        (_raised(IngestError("could not download"), urllib.error.URLError("timed out")), True),
        (IngestError("checksum mismatch"), False),  # deterministic: a retry would fail again
        (FileNotFoundError("events.csv"), False),
        (ValueError("bad config"), False),
        (RuntimeError("a bug"), False),
    ],
)
def test_only_io_failures_are_retried(exc: BaseException, retried: bool) -> None:
    assert is_io_error(exc) is retried

    class _State:
        def result(self, raise_on_failure: bool = True) -> BaseException:
            return exc

    assert retry_on_io(None, None, _State()) is retried
    assert IO_RETRIES["retry_condition_fn"] is retry_on_io and IO_RETRIES["retries"] >= 1


def test_heartbeat_logs_while_a_step_runs(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test-heartbeat")
    with caplog.at_level(logging.INFO, logger="test-heartbeat"), heartbeat(log, "training x", every_s=0.05):
        time.sleep(0.3)
    beats = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert len(beats) >= 2 and beats[0].startswith("training x: still running (")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test-heartbeat"):
        time.sleep(0.15)  # stopped with its block
    assert not caplog.records


def test_progress_outside_a_run_logs_the_steps(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test-progress")
    with caplog.at_level(logging.INFO, logger="test-progress"):
        progress = StageProgress("ranking-x-progress", 3, "ranking", log)
        progress.step("deepfm")
        progress.step("din")
    assert progress.id is None and progress.percent == pytest.approx(66.7)
    assert caplog.records[-1].getMessage() == "ranking: din done (2/3, 67%)"
    assert table_artifact("k", [{"model": "deepfm", "auc": 0.7}], "outside a run") is None


def test_artifact_keys_are_what_prefect_accepts() -> None:
    assert artifact_key("ranking", "My_Clicks", "progress") == "ranking-my-clicks-progress"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_real_flow_retries_the_io_failure_and_not_the_bug() -> None:
    from prefect import flow, task

    calls = {"io": 0, "bug": 0}

    @task(**(IO_RETRIES | {"retry_delay_seconds": 0}))
    def flaky_write() -> str:
        calls["io"] += 1
        if calls["io"] == 1:
            raise duckdb.IOException('Could not set lock on file "warehouse.duckdb"')
        return "written"

    @task(**(IO_RETRIES | {"retry_delay_seconds": 0}))
    def buggy() -> None:
        calls["bug"] += 1
        raise ValueError("bad input")

    @flow
    def job() -> str:
        written = flaky_write()
        progress = StageProgress("test-observe-progress", 1, "job", logging.getLogger("test-observe"))
        progress.step("write")
        assert progress.id is not None  # a real progress artifact inside a run
        assert table_artifact("test-observe-table", [{"model": "m", "auc": 0.71234}], "a table") is not None
        with pytest.raises(ValueError, match="bad input"):
            buggy()
        return written

    assert job() == "written"
    assert calls == {"io": 2, "bug": 1}
