"""One DuckDB file holds raw, cleaned and feature tables, each published with a content-hash version.

Publishing is transactional: the new table and its lineage row commit together, so a build that is
interrupted (an exception, or the process killed) leaves the previous version of the table intact.
A publish also records an ``input_key`` (hash of the inputs' versions and the build parameters), which is
what lets flows skip a stage whose inputs have not changed.

Several processes share one file (the pipeline, the nightly job, ``ab run``, the dashboard): DuckDB lets one
process hold it read-write at a time and refuses any other open at once. Opening a ``Warehouse`` therefore
waits while another process holds the lock (``RECSYS_WAREHOUSE_LOCK_WAIT_S``, 120 s by default) instead of
failing, so that a job finishing while another writes does not lose its write.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

import recsys.core  # noqa: F401  (environment defaults)
from recsys.core.hashing import stable_hash

_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*\.)?[A-Za-z_][A-Za-z0-9_]*$")

_LINEAGE_DDL = """
CREATE TABLE IF NOT EXISTS lineage (
    table_name VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    input_key VARCHAR NOT NULL,
    inputs JSON,
    params JSON,
    row_count BIGINT,
    created_at TIMESTAMP NOT NULL
)
"""


LOCK_WAIT_ENV = "RECSYS_WAREHOUSE_LOCK_WAIT_S"
DEFAULT_LOCK_WAIT_S = 120.0


def default_lock_wait_s() -> float:
    """Seconds an open waits for another process's lock on the file (``RECSYS_WAREHOUSE_LOCK_WAIT_S``)."""
    raw = os.environ.get(LOCK_WAIT_ENV)
    if raw is None:
        return DEFAULT_LOCK_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0.0:
        raise ValueError(f"{LOCK_WAIT_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def _connect(path: Path, read_only: bool, wait_s: float) -> duckdb.DuckDBPyConnection:
    """``duckdb.connect``, retried while another process holds the file's lock, for up to ``wait_s``."""
    delay, deadline = 0.05, time.monotonic() + wait_s
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            left = deadline - time.monotonic()
            if "lock" not in str(exc).lower() or left <= 0:
                raise
            time.sleep(min(delay, left))
            delay = min(2 * delay, 1.0)


class WarehouseError(RuntimeError):
    """A warehouse operation was asked for something that does not exist or is malformed."""


@dataclass(frozen=True)
class TableVersion:
    table_name: str
    version: str
    input_key: str
    inputs: dict[str, str]
    params: dict[str, Any]
    row_count: int
    created_at: datetime


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise WarehouseError(
            f"table name {name!r} must be 'table' or 'schema.table' made of letters, digits and '_'"
        )
    return name


def _split(name: str) -> tuple[str, str]:
    schema, _, table = _check_name(name).rpartition(".")
    return schema or "main", table


class Warehouse:
    """A handle on the warehouse file. Cheap to open; use as a context manager or call ``close()``.

    ``lock_wait_s``: how long to wait while another process holds the file (None: ``default_lock_wait_s()``;
    0: fail at once, for a caller with its own answer to a busy file, such as the dashboard)."""

    def __init__(
        self, path: str | Path, *, read_only: bool = False, lock_wait_s: float | None = None
    ) -> None:
        self.path = Path(path)
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise WarehouseError(f"warehouse file {self.path} does not exist (build it first)")
        self.read_only = read_only
        wait = default_lock_wait_s() if lock_wait_s is None else lock_wait_s
        self.con = _connect(self.path, read_only, wait)
        self._lock = threading.RLock()
        if not read_only:
            self.con.execute(_LINEAGE_DDL)

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """BEGIN ... COMMIT, rolled back on any exception."""
        with self._lock:
            self.con.execute("BEGIN TRANSACTION")
            try:
                yield self.con
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            self.con.execute("COMMIT")

    # -- reading ---------------------------------------------------------------------------------------
    def has_table(self, name: str) -> bool:
        schema, table = _split(name)
        row = self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
            [schema, table],
        ).fetchall()[0]
        return bool(row and row[0])

    def sql(self, query: str, params: list[Any] | None = None) -> pl.DataFrame:
        # DuckDB 2.0: results are read through relations (``.pl()``), not through the cursor.
        return self.con.sql(query, params=params or None).pl()

    def table(self, name: str) -> pl.DataFrame:
        _check_name(name)
        if not self.has_table(name):
            raise WarehouseError(f"table {name!r} is not in the warehouse {self.path}")
        return self.con.sql(f"SELECT * FROM {name}").pl()

    def arrow(self, query: str) -> pa.Table:
        return self.con.sql(query).to_arrow_table()

    def latest(self, name: str) -> TableVersion | None:
        """Tables are named 'table' (schema main) or 'dataset.table' (one DuckDB schema per dataset).

        The lineage row of the currently published version of ``name`` (None if never published)."""
        if not self.has_table("lineage"):
            return None
        rows = self.con.execute(
            "SELECT table_name, version, input_key, inputs, params, row_count, created_at FROM lineage "
            "WHERE table_name = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
            [name],
        ).fetchall()
        if not rows:
            return None
        row = rows[0]
        return TableVersion(
            table_name=row[0],
            version=row[1],
            input_key=row[2],
            inputs=json.loads(row[3]) if row[3] else {},
            params=json.loads(row[4]) if row[4] else {},
            row_count=int(row[5]),
            created_at=row[6],
        )

    def version(self, name: str) -> str:
        latest = self.latest(name)
        if latest is None:
            raise WarehouseError(f"table {name!r} has no published version in {self.path}")
        return latest.version

    def is_fresh(self, name: str, input_key: str) -> bool:
        """True when ``name`` is published and was built from exactly these inputs and parameters."""
        latest = self.latest(name)
        return latest is not None and latest.input_key == input_key and self.has_table(name)

    # -- writing ---------------------------------------------------------------------------------------
    def content_hash(self, name: str, con: duckdb.DuckDBPyConnection | None = None) -> tuple[str, int]:
        """Order-independent hash of a table's rows and schema, and its row count."""
        con = con or self.con
        _check_name(name)
        schema = con.execute(f"DESCRIBE {name}").fetchall()
        # Sum of per-row hashes (as HUGEINT, no overflow) is independent of row order and parallel in DuckDB.
        total, count = con.execute(
            f"SELECT coalesce(sum(hash(t)::HUGEINT), 0), count(*) FROM {name} t"
        ).fetchall()[0]
        return stable_hash([(c[0], c[1]) for c in schema], str(total), int(count)), int(count)

    def publish(
        self,
        name: str,
        source: str | pl.DataFrame | pa.Table,
        *,
        inputs: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> TableVersion:
        """Replace table ``name`` with ``source`` (a SELECT statement, a Polars frame or an Arrow table).

        The new content and its lineage row are committed in one transaction.
        """
        return self.publish_many({name: source}, inputs=inputs, params=params)[name]

    def publish_many(
        self,
        sources: Mapping[str, str | pl.DataFrame | pa.Table],
        *,
        inputs: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        drop: Iterable[str] = (),
    ) -> dict[str, TableVersion]:
        """Replace every table of ``sources`` (in order) and drop those in ``drop``, all in one transaction.

        Every table gets its own content-hash version and a lineage row with the same ``input_key``; a SQL
        source may read a table published earlier in the same call. Any exception rolls every table back.
        """
        if self.read_only:
            raise WarehouseError("this warehouse handle is read-only")
        inputs = dict(inputs or {})
        params = dict(params or {})
        input_key = stable_hash(inputs, params)
        drop = list(drop)
        out: dict[str, TableVersion] = {}
        with self.transaction() as con:
            for schema in sorted({_split(n)[0] for n in [*sources, *drop]}):
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            for name in drop:
                con.execute(f"DROP TABLE IF EXISTS {_check_name(name)}")
            for name, source in sources.items():
                _check_name(name)
                if isinstance(source, str):
                    con.execute(f"CREATE OR REPLACE TABLE {name} AS {source}")
                else:
                    frame = source.to_arrow() if isinstance(source, pl.DataFrame) else source
                    con.register("__publish_source", frame)
                    try:
                        con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM __publish_source")
                    finally:
                        con.unregister("__publish_source")
                version, count = self.content_hash(name, con)
                created = datetime.now(UTC).replace(tzinfo=None)
                con.execute(
                    "INSERT INTO lineage VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        name,
                        version,
                        input_key,
                        json.dumps(inputs),
                        json.dumps(params, default=str),
                        count,
                        created,
                    ],
                )
                out[name] = TableVersion(name, version, input_key, inputs, params, count, created)
        return out
