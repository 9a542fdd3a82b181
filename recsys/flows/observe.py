"""What the flows show while they run: retries for I/O only, progress and table artifacts, and a terminal
that never stays silent through a long stage.

- ``IO_RETRIES``: task options that retry a task only when it failed on I/O (a network error, a warehouse
  file another process holds locked), never on a deterministic error (bad input, a bug, a missing file),
  which would only fail again, slower.
- ``StageProgress``: a Prefect progress artifact (0..100 %) that a stage advances step by step; outside a
  flow run (a stage's ``.fn`` called directly) it only logs.
- ``heartbeat``: while a long step runs, a log line every ``every_s`` seconds naming the step and its
  elapsed time (Prefect's console handler prints it), so the terminal shows life between the per-model and
  per-epoch lines.
- ``table_artifact``: a Prefect table artifact of result rows (numbers rounded for reading).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import duckdb

# Deterministic OSErrors: retrying cannot help.
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


def is_io_error(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what caused it) is a transient I/O failure: an OSError other than a missing
    or forbidden path (network errors included), or DuckDB's IOException (a file held locked)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, duckdb.IOException):
            return True
        if isinstance(exc, OSError) and not isinstance(exc, _PERMANENT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only a failure that ``is_io_error``."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001  (an unreadable result is not a reason to retry)
        return False
    return isinstance(exc, BaseException) and is_io_error(exc)


#: Options for tasks that do network or warehouse I/O: two more tries, 5 s apart, on I/O errors only.
IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_on_io}


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes only."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isalnum() and c.isascii() else "-" for c in raw).strip("-")


class StageProgress:
    """A progress artifact over ``total`` steps of a stage, advanced with ``step``; also logged."""

    def __init__(self, key: str, total: int, description: str, log: Logger) -> None:
        self.total = max(int(total), 1)
        self.done = 0
        self.description = description
        self.log = log
        self.id: UUID | None = None
        if _in_run():
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(0.0, key=key, description=description)

    @property
    def percent(self) -> float:
        return round(100.0 * min(self.done, self.total) / self.total, 1)

    def step(self, what: str) -> None:
        """One step finished (``what`` names it)."""
        self.done += 1
        self.log.info(
            "%s: %s done (%d/%d, %.0f%%)", self.description, what, self.done, self.total, self.percent
        )
        if self.id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, self.percent, description=f"{self.description}: {what} done")


@contextmanager
def heartbeat(log: Logger, what: str, every_s: float = 30.0) -> Iterator[None]:
    """Log ``what ... still running (N s)`` every ``every_s`` seconds until the block ends."""
    stop = threading.Event()
    started = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every_s):
            log.info("%s: still running (%.0f s)", what, time.perf_counter() - started)

    thread = threading.Thread(target=beat, name=f"heartbeat-{what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    return value


def table_artifact(key: str, rows: Sequence[Mapping[str, Any]], description: str) -> UUID | None:
    """A table artifact of ``rows`` (one dict per row, the same keys); nothing outside a flow run."""
    if not rows or not _in_run():
        return None
    from prefect.artifacts import create_table_artifact

    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = [{c: _cell(row.get(c)) for c in columns} for row in rows]
    return create_table_artifact(table, key=key, description=description)
