"""A user's own behaviour log (CSV or Parquet) plus optional user/item attribute tables -> ``<dataset>.*``.

Validation runs as DuckDB SQL over the files (CSV read as VARCHAR columns and parsed with TRY_CAST), so
it scales to tens of millions of rows; Python only assembles the statements. Every bad row is kept out of
``<dataset>.events`` and written to ``<dataset>.rejects`` with its file, 1-based data row (header excluded,
i.e. ``src_row + 1``; DuckDB skips blank lines, which are not counted) and reason; nothing is coerced. All
tables of one ingest commit in one transaction. CSV may be gzipped (``.csv.gz``).

Choices left open by the brief, and what was picked:
- One reason per bad row: the first failing check in the order of ``REJECT_REASONS``; counts therefore add up.
- Duplicates: the first row (in file order) of a key is kept, later ones are rejected and name the kept row.
- Ids: ``"auto"`` keeps integer ids when every present value is a canonical integer ("12", not "012",
  "+12", "1e3" or "1.0": TRY_CAST alone would round "1.5" to 2); otherwise every raw id string (trimmed) maps
  to a dense id 1..n in sorted raw-id order, published as ``<dataset>.user_ids`` / ``<dataset>.item_ids``.
  The dense ids change when new ids arrive; keep the raw_id tables to join back.
- Unix timestamps: ``timestamp_format='unix'`` detects the unit from the magnitude of the largest value
  (seconds below 1e11, i.e. up to the year 5138; milliseconds below 1e14; microseconds below 1e17;
  nanoseconds above) and refuses a column whose values span two units (an error naming the column, the
  smallest and largest value and the explicit formats); ``unix_s``, ``unix_ms``, ``unix_us`` and
  ``unix_ns`` name the unit. The unit read is in the report. A negative unix time is rejected
  (``bad_timestamp``): event logs start after 1970.
- A CSV line with too many or too few fields (a ragged line) is rejected as ``malformed_row`` with DuckDB's
  finding and the line's text; the rest of the file is ingested. Its row is its line in the file minus the
  header (blank lines, which the other rows do not count, are counted there).
- Timestamps are floored to whole seconds (the contract's resolution). ISO-8601 text without an offset, and
  strptime formats without %z, are read as UTC; text with 'Z' or +hh:mm is converted to UTC. Parquet
  TIMESTAMP/DATE columns are used as they are, whatever ``timestamp_format`` says.
- Attribute and extra event columns of a CSV get a type from their accepted values: BIGINT when all are
  canonical integers, DOUBLE when all are plain decimals (no leading zeros, so zip codes stay text), otherwise
  VARCHAR. Parquet columns keep their types.
- Without a users (items) file, ``<dataset>.users`` (``items``) holds the distinct ids of the accepted events
  (items with ``category`` NULL), so later stages always find both tables.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import duckdb
from pydantic import Field, model_validator

from recsys.core.config import FrozenModel
from recsys.core.hashing import file_sha256
from recsys.ingest.schema import (
    EVENT_COLUMNS,
    IngestError,
    SchemaError,
    check_dataset,
    quote_ident,
    quote_literal,
)
from recsys.warehouse import Warehouse

LOADER_VERSION = "events/1"
REJECT_REASONS = (
    "malformed_row",
    "missing_user_id",
    "bad_user_id",
    "missing_item_id",
    "bad_item_id",
    "missing_timestamp",
    "bad_timestamp",
    "missing_event",
    "bad_value",
    "negative_value",
    "duplicate_event",
    "duplicate_user_id",
    "duplicate_item_id",
)
# Seconds per unit of each explicit unix format, and the exclusive upper bound of the largest value that
# ``unix`` reads in that unit (a time before the year 5138).
UNIX_UNITS: dict[str, tuple[int, float]] = {
    "unix_s": (1, 1e11),
    "unix_ms": (1_000, 1e14),
    "unix_us": (1_000_000, 1e17),
    "unix_ns": (1_000_000_000, float("inf")),
}
_CSV_SUFFIXES: dict[str, str | None] = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".txt": None}
_PARQUET_SUFFIXES = (".parquet", ".pq")
_TIMESTAMP_TYPES = ("TIMESTAMP", "DATE")
_ISO_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_ISO_TIME = r"[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?"
_ISO_NAIVE = f"{_ISO_DATE}({_ISO_TIME})?"
_ISO_OFFSET = f"{_ISO_DATE}{_ISO_TIME} ?(Z|[+-][0-9]{{2}}(:?[0-9]{{2}})?)"
_INT_TEXT = r"[+-]?[0-9]+"
_DECIMAL_TEXT = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"

IdKind = Literal["auto", "integer", "string"]


class EventSchema(FrozenModel):
    """Where the contract's fields are in the user's files, and how to read them."""

    user_id: str = Field("user_id", min_length=1, description="Events column holding the user id.")
    item_id: str = Field("item_id", min_length=1, description="Events column holding the item id.")
    timestamp: str = Field("timestamp", min_length=1, description="Events column holding the event time.")
    event: str | None = Field(
        None, description="Events column with the event type; None: every row is `default_event`."
    )
    value: str | None = Field(
        None, description="Events column with a rating/value (>= 0); None: value is NULL."
    )
    timestamp_format: str = Field(
        "unix",
        description=(
            "'unix' (integer epoch time, unit detected from the magnitude), 'unix_s', 'unix_ms', 'unix_us',"
            " 'unix_ns', 'iso8601', or a strptime format such as '%d/%m/%Y %H:%M'."
        ),
    )
    default_event: str = Field("interaction", min_length=1)
    user_id_kind: IdKind = "auto"
    item_id_kind: IdKind = "auto"
    users_id: str | None = Field(
        None, description="Id column of the users file; None: same name as `user_id`."
    )
    items_id: str | None = Field(
        None, description="Id column of the items file; None: same name as `item_id`."
    )
    delimiter: str | None = Field(
        None,
        description="CSV delimiter; None: ',' for .csv, tab for .tsv/.tab (required for other suffixes).",
    )

    @model_validator(mode="after")
    def _check(self) -> EventSchema:
        roles = [
            c for c in (self.user_id, self.item_id, self.timestamp, self.event, self.value) if c is not None
        ]
        if len(set(roles)) != len(roles):
            raise ValueError(
                f"user_id, item_id, timestamp, event and value must be different columns, got {roles}"
            )
        fmt = self.timestamp_format
        if fmt not in ("unix", "iso8601", *UNIX_UNITS) and "%" not in fmt:
            raise ValueError(
                f"timestamp_format must be 'unix', one of {list(UNIX_UNITS)}, 'iso8601' or a strptime format "
                f"with '%', got {fmt!r}"
            )
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ValueError(f"delimiter must be one character, got {self.delimiter!r}")
        return self

    @property
    def users_key(self) -> str:
        return self.users_id or self.user_id

    @property
    def items_key(self) -> str:
        return self.items_id or self.item_id


class RejectedRow(FrozenModel):
    file: str
    row: int = Field(description="1-based data row (header excluded).")
    reason: str
    detail: str | None = Field(None, description="The offending text, or the row a duplicate repeats.")


class FileCounts(FrozenModel):
    file: str
    table: str
    rows_read: int
    rows_accepted: int
    rejected: dict[str, int]


class IngestReport(FrozenModel):
    dataset: str
    rows_read: int
    rows_accepted: int
    rejected: dict[str, int] = Field(description="Rejected rows per reason, over all files.")
    examples: tuple[RejectedRow, ...] = Field(description="The first rejected rows, in file then row order.")
    files: tuple[FileCounts, ...]
    user_ids_mapped: bool
    item_ids_mapped: bool
    versions: dict[str, str] = Field(description="Published table -> version.")
    timestamp_unit: str | None = Field(
        None, description="The unix unit the timestamps were read in (unix_s, unix_ms, ...); None: not unix."
    )

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())


# -- reading the files -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    path: Path
    role: str  # 'events' | 'users' | 'items'
    is_csv: bool
    reader: str  # a DuckDB table expression
    columns: dict[str, str]  # name -> DuckDB type
    rejects: str | None = None  # CSV: the temp table where DuckDB stores the malformed lines

    @property
    def label(self) -> str:
        return str(self.path)


def _csv_header(path: Path, role: str, delim: str) -> list[str]:
    """The header line, read by Python's csv module so DuckDB reads the body without sniffing: its sniffer can
    take a ragged row for the header, where an explicit column list makes it an error naming the line."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter=delim, quotechar='"', doublequote=True), None)
    except (UnicodeDecodeError, OSError, csv.Error) as exc:
        raise IngestError(f"{role} file {path}: cannot read the header line as UTF-8 CSV: {exc}") from exc
    if not header:
        raise SchemaError(f"{role} file {path} is empty (a CSV needs a header line)")
    names = [h.strip() for h in header]
    if "" in names:
        raise SchemaError(f"{role} file {path}: header column {names.index('') + 1} has no name")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SchemaError(f"{role} file {path}: header repeats column(s) {repeated}")
    return names


def _open(con: duckdb.DuckDBPyConnection, path: Path, role: str, schema: EventSchema) -> _Source:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} file {path} does not exist")
    suffixes = [s.lower() for s in path.suffixes]
    suffix = suffixes[-2] if len(suffixes) >= 2 and suffixes[-1] == ".gz" else (suffixes or [""])[-1]
    lit = quote_literal(str(path))
    if suffix in _PARQUET_SUFFIXES:
        reader = f"read_parquet({lit})"
        try:
            columns = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {reader}").fetchall()}
        except duckdb.Error as exc:
            raise IngestError(f"{role} file {path} cannot be read: {_first_lines(exc)}") from exc
        return _Source(path, role, False, reader, columns)
    if suffix not in _CSV_SUFFIXES:
        raise SchemaError(f"{role} file {path}: unknown format {suffix!r} (use .csv, .tsv, .parquet)")
    delim = schema.delimiter or _CSV_SUFFIXES[suffix]
    if delim is None:
        raise SchemaError(f"{role} file {path}: set EventSchema.delimiter for a {suffix} file")
    columns = dict.fromkeys(_csv_header(path, role, delim), "VARCHAR")
    spec = ", ".join(f"{quote_literal(c)}: 'VARCHAR'" for c in columns)
    # Malformed lines (too many or too few fields) go to a rejects table instead of aborting the read.
    rejects = f"__ingest_rejects_{uuid.uuid4().hex[:10]}"
    reader = (
        f"read_csv({lit}, header=true, auto_detect=false, delim={quote_literal(delim)}, quote='\"', "
        f"escape='\"', columns={{{spec}}}, ignore_errors=true, store_rejects=true, "
        f"rejects_table='{rejects}', rejects_scan='{rejects}_scan')"
    )
    return _Source(path, role, True, reader, columns, rejects)


def _first_lines(exc: Exception, n: int = 3) -> str:
    """DuckDB's CSV errors put the line number, the line and the problem on their first lines."""
    return "; ".join(line.strip() for line in str(exc).splitlines()[:n] if line.strip())


def _check_columns(src: _Source, required: list[str], reserved: set[str]) -> str | None:
    """The problem with ``src``'s column set, or None. ``reserved``: names extra columns may not take."""
    present = list(src.columns)
    missing = [c for c in required if c not in src.columns]
    if missing:
        unknown = [c for c in present if c not in required]
        hints = []
        for col in missing:
            close = difflib.get_close_matches(col, unknown, n=1, cutoff=0.6) or [
                u for u in unknown if u.lower() == col.lower()
            ]
            if close:
                hints.append(f"{col!r} -> {close[0]!r}?")
        return (
            f"{src.role} file {src.label}: missing column(s) {missing}; columns not in the schema: {unknown}"
            + (f" (did you mean {', '.join(hints)})" if hints else "")
        )
    clashes = [c for c in present if c not in required and (c.lower() in reserved or c.startswith("__"))]
    if clashes:
        return (
            f"{src.role} file {src.label}: column(s) {clashes} would clash with the contract's output "
            f"columns {sorted(reserved)}; rename them or map them in EventSchema"
        )
    return None


# -- SQL building blocks ---------------------------------------------------------------------------------


def _text(col: str) -> str:
    return f"nullif(trim(CAST({quote_ident(col)} AS VARCHAR)), '')"


def _ts_expr(col: str, col_type: str, fmt: str) -> str:
    """BIGINT unix seconds, or NULL when the text cannot be read in ``fmt``."""
    if col_type.startswith(_TIMESTAMP_TYPES):
        return f"CAST(floor(epoch({quote_ident(col)})) AS BIGINT)"
    t = f"upper({_text(col)})"
    if fmt == "unix" or fmt in UNIX_UNITS:  # the raw integer: its unit is applied after staging
        return f"CASE WHEN regexp_full_match({t}, '{_INT_TEXT}') THEN TRY_CAST({t} AS BIGINT) END"
    if fmt == "iso8601":
        # DuckDB's TIMESTAMP cast silently drops an offset or a zone name, hence the explicit shapes.
        naive = f"WHEN regexp_full_match({t}, '{_ISO_NAIVE}') THEN epoch(TRY_CAST({t} AS TIMESTAMP))"
        offset = f"WHEN regexp_full_match({t}, '{_ISO_OFFSET}') THEN epoch(TRY_CAST({t} AS TIMESTAMPTZ))"
        return f"CAST(floor(CASE {naive} {offset} END) AS BIGINT)"
    return f"CAST(floor(epoch(try_strptime({_text(col)}, {quote_literal(fmt)}))) AS BIGINT)"


def _int_id(expr: str) -> str:
    return f"CASE WHEN regexp_full_match({expr}, '{_INT_TEXT}') THEN TRY_CAST({expr} AS BIGINT) END"


def _is_canonical_int(expr: str) -> str:
    return f"(CAST(TRY_CAST({expr} AS BIGINT) AS VARCHAR) IS NOT DISTINCT FROM {expr})"


class _Run:
    """The temp tables of one ingest, named uniquely so two ingests on one connection cannot collide."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self.prefix = f"__ingest_{uuid.uuid4().hex[:10]}"
        self.tables: list[str] = []

    def temp(self, name: str, query: str) -> str:
        table = f"{self.prefix}_{name}"
        self.tables.append(table)
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS {query}")
        return table

    def rows(self, query: str) -> list[tuple]:
        return self.con.execute(query).fetchall()

    def drop_all(self) -> None:
        for table in self.tables:
            self.con.execute(f"DROP TABLE IF EXISTS {table}")


@contextmanager
def _staging(con: duckdb.DuckDBPyConnection) -> Iterator[_Run]:
    run = _Run(con)
    try:
        yield run
    finally:
        run.drop_all()


def _infer_types(run: _Run, query: str, src: _Source, cols: list[str]) -> dict[str, str]:
    """Output type per column of ``query``: CSV text becomes BIGINT/DOUBLE only when every value fits."""
    if not cols:
        return {}
    if not src.is_csv:
        return {c: src.columns[c] for c in cols}
    parts = []
    for c in cols:
        t = f"trim({quote_ident(c)})"
        parts.append(
            f"count({quote_ident(c)}), count(*) FILTER (WHERE {_is_canonical_int(t)}), "
            f"count(*) FILTER (WHERE regexp_full_match({t}, '{_DECIMAL_TEXT}') "
            f"AND TRY_CAST({t} AS DOUBLE) IS NOT NULL)"
        )
    row = run.rows(f"SELECT {', '.join(parts)} FROM ({query})")[0]
    out = {}
    for k, c in enumerate(cols):
        present, ints, decimals = row[3 * k : 3 * k + 3]
        out[c] = "VARCHAR"
        if present and ints == present:
            out[c] = "BIGINT"
        elif present and decimals == present:
            out[c] = "DOUBLE"
    return out


def _typed(col: str, src: _Source, out_type: str) -> str:
    q = quote_ident(col)
    if not src.is_csv or out_type == "VARCHAR":
        return q
    return f"CAST(trim({q}) AS {out_type})"


# -- the ingest ------------------------------------------------------------------------------------------


def ingest_events(
    wh: Warehouse,
    dataset: str,
    events: Path,
    *,
    users: Path | None = None,
    items: Path | None = None,
    schema: EventSchema = EventSchema(),  # noqa: B008  (frozen model: a shared default is safe)
    max_examples: int = 20,
) -> IngestReport:
    """Validate the files against ``schema`` and publish ``<dataset>.events/users/items/rejects`` (plus
    ``user_ids``/``item_ids`` when ids are strings) in one transaction.

    Raises ``SchemaError`` (nothing written) when a file lacks a declared column; bad rows never raise, they
    are counted in the returned report and listed in ``<dataset>.rejects``.
    """
    check_dataset(dataset)
    con = wh.con
    ev = _open(con, events, "events", schema)
    us = _open(con, users, "users", schema) if users is not None else None
    it = _open(con, items, "items", schema) if items is not None else None

    roles = [c for c in (schema.user_id, schema.item_id, schema.timestamp, schema.event, schema.value) if c]
    problems = [_check_columns(ev, roles, set(EVENT_COLUMNS))]
    if us is not None:
        problems.append(_check_columns(us, [schema.users_key], {"user_id"}))
    if it is not None:
        problems.append(_check_columns(it, [schema.items_key], {"item_id"}))
    if any(problems):
        raise SchemaError("; ".join(p for p in problems if p))

    entities = (
        _Entity("users", "user_id", "user_ids", "__u", schema.user_id_kind, schema.users_key, us),
        _Entity("items", "item_id", "item_ids", "__i", schema.item_id_kind, schema.items_key, it),
    )
    with _staging(con) as run:
        return _ingest(wh, run, dataset, schema, ev, entities, max_examples)


@dataclass(frozen=True)
class _Entity:
    """Users or items: how their ids appear in the events and in their own (optional) attribute file."""

    table: str  # 'users' | 'items'
    id_col: str  # 'user_id' | 'item_id'
    map_table: str  # 'user_ids' | 'item_ids'
    ev_col: str  # the trimmed raw id text in the staged events ('__u' | '__i'); '<ev_col>_int' its integer
    kind: IdKind
    key: str  # id column of the attribute file
    src: _Source | None


@dataclass(frozen=True)
class _Staged:
    """One file staged once as a temp table with ``__row``, the 0-based data row (DuckDB keeps file order
    through a projection), plus what the checks found."""

    src: _Source
    table: str  # '<dataset>.events' | '.users' | '.items'
    checked: str  # subquery: the staged columns + __row, __r0 (reason or NULL), __d0 (detail)
    dups: str  # temp table (__row, __first): passing rows that repeat the key of row __first
    dup_reason: str
    malformed: str | None  # temp table (__row, detail) of the file's malformed lines, or None


def _stage(run: _Run, src: _Source, name: str, select: list[str]) -> tuple[str, str | None]:
    """The file as a temp table with ``__row``, and the temp table of its malformed lines (CSV), if any."""
    try:
        raw = run.temp(f"{name}_raw", f"SELECT {', '.join(select)} FROM {src.reader}")
    except duckdb.Error as exc:
        raise IngestError(f"{src.role} file {src.label} cannot be read: {_first_lines(exc)}") from exc
    if src.rejects is None:
        return run.temp(name, f"SELECT rowid AS __row, * FROM {raw}"), None
    # DuckDB's ``line`` counts the header: data row (0-based) = line - 2.
    malformed = run.temp(
        f"{name}_malformed",
        f"SELECT DISTINCT ON (line) CAST(line - 2 AS BIGINT) AS __row, "
        f"lower(CAST(error_type AS VARCHAR)) || ': ' || coalesce(csv_line, '') AS detail "
        f"FROM {src.rejects} ORDER BY line",
    )
    for table in (src.rejects, f"{src.rejects}_scan"):
        run.con.execute(f"DROP TABLE IF EXISTS {table}")
    # The k-th read row (0-based) is data row k + (malformed rows before it): the j-th malformed row r_j
    # (1-based j) sits before every read row k >= r_j - (j - 1).
    gaps = (
        f"SELECT __row - (row_number() OVER (ORDER BY __row) - 1) AS k0, "
        f"row_number() OVER (ORDER BY __row) AS skipped FROM {malformed}"
    )
    staged = run.temp(
        name,
        f"SELECT r.rowid + coalesce(g.skipped, 0) AS __row, r.* FROM {raw} r "
        f"ASOF LEFT JOIN ({gaps}) g ON r.rowid >= g.k0 ORDER BY r.rowid",
    )
    return staged, malformed


def _id_select(text: str, alias: str) -> list[str]:
    return [f"{text} AS {alias}", f"{_int_id(text)} AS {alias}_int"]


def _integer_ids(run: _Run, ent: _Entity, events: str, attrs: str | None) -> bool:
    """Declared kind, or for 'auto': every present id of the entity (events and attributes) is canonical."""
    if ent.kind != "auto":
        return ent.kind == "integer"
    union = f"SELECT {ent.ev_col} AS id, {ent.ev_col}_int AS id_int FROM {events}"
    if attrs is not None:
        union += f" UNION ALL SELECT __id, __id_int FROM {attrs}"
    canonical = "CAST(id_int AS VARCHAR) IS NOT DISTINCT FROM id"
    return run.rows(f"SELECT coalesce(bool_and({canonical}), true) FROM ({union}) WHERE id IS NOT NULL")[0][0]


def _checked(table: str, checks: list[tuple[str, str, str]]) -> str:
    """``table`` with ``__row`` and the first failing check's reason (``__r0``) and detail (``__d0``)."""
    reason = "CASE " + " ".join(f"WHEN {c} THEN '{r}'" for c, r, _ in checks) + " END"
    detail = "CASE " + " ".join(f"WHEN {c} THEN {d}" for c, _, d in checks) + " END"
    return f"SELECT *, {reason} AS __r0, {detail} AS __d0 FROM {table}"


def _id_checks(col: str, integer: bool, id_col: str) -> list[tuple[str, str, str]]:
    checks = [(f"{col} IS NULL", f"missing_{id_col}", "NULL")]
    if integer:
        checks.append((f"{col}_int IS NULL", f"bad_{id_col}", col))
    return checks


def _duplicates(run: _Run, name: str, checked: str, keys: list[str]) -> str:
    """Passing rows after the first (in file order) with equal ``keys``.

    An aggregate whose HAVING keeps only repeated keys, joined back: far lighter than a window partitioned by
    every key when there are tens of millions of rows and few duplicates."""
    cols = ", ".join(keys)
    on = " AND ".join(f"b.{k} = d.{k}" for k in keys)
    return run.temp(
        name,
        f"WITH b AS ({checked}), d AS (SELECT {cols}, min(__row) AS __first FROM b WHERE __r0 IS NULL "
        f"GROUP BY {cols} HAVING count(*) > 1) "
        f"SELECT b.__row, d.__first FROM b JOIN d ON {on} WHERE b.__r0 IS NULL AND b.__row > d.__first",
    )


def _unix_unit(run: _Run, events: str, fmt: str, column: str) -> str:
    """The unit of the staged raw unix times: ``fmt`` when explicit, else read from their magnitude."""
    if fmt in UNIX_UNITS:
        return fmt
    lo, hi = run.rows(f"SELECT min(__ts) FILTER (WHERE __ts > 0), max(__ts) FROM {events}")[0]
    if hi is None or hi <= 0:
        return "unix_s"

    def unit_of(value: int) -> str:
        return next(u for u, (_, upper) in UNIX_UNITS.items() if value < upper)

    if unit_of(lo) != unit_of(hi):
        raise SchemaError(
            f"timestamp column {column} mixes units: its smallest positive value {lo} reads as "
            f"{unit_of(lo)} and its largest {hi} as {unit_of(hi)}; set timestamp_format to one of "
            f"{list(UNIX_UNITS)} (rows out of range are then rejected or read in that unit)"
        )
    return unit_of(hi)


def _ingest(
    wh: Warehouse,
    run: _Run,
    dataset: str,
    schema: EventSchema,
    ev: _Source,
    entities: tuple[_Entity, _Entity],
    max_examples: int,
) -> IngestReport:
    name = {t: f"{dataset}.{t}" for t in ("events", "users", "items", "rejects", "user_ids", "item_ids")}
    roles = {c for c in (schema.user_id, schema.item_id, schema.timestamp, schema.event, schema.value) if c}
    ev_extras = [c for c in ev.columns if c not in roles]
    attr_cols = {e.table: [c for c in e.src.columns if c != e.key] for e in entities if e.src is not None}

    # 1. Read each file once into a temp table: trimmed id text, parsed ts/value (with the offending text kept
    #    only where parsing failed, for the report), and the remaining columns as they are.
    ts_text = _text(schema.timestamp)
    ts = _ts_expr(schema.timestamp, ev.columns[schema.timestamp], schema.timestamp_format)
    v_text = _text(schema.value) if schema.value else "CAST(NULL AS VARCHAR)"
    v = f"TRY_CAST({v_text} AS DOUBLE)"
    v_bad = f"{v_text} IS NOT NULL AND ({v} IS NULL OR NOT isfinite({v}))"  # text that is not a finite number
    events, ev_malformed = _stage(
        run,
        ev,
        "events",
        [
            *_id_select(_text(schema.user_id), "__u"),
            *_id_select(_text(schema.item_id), "__i"),
            f"{ts} AS __ts",
            f"CASE WHEN {ts} IS NULL THEN {ts_text} END AS __ts_bad",
            f"{_text(schema.event) if schema.event else quote_literal(schema.default_event)} AS __event",
            f"CASE WHEN {v} IS NULL OR isfinite({v}) THEN {v} END AS __v",
            f"CASE WHEN {v_bad} THEN {v_text} END AS __v_bad",
            *(quote_ident(c) for c in ev_extras),
        ],
    )
    attr_staged = {
        e.table: _stage(
            run, e.src, e.table, [*_id_select(_text(e.key), "__id"), *map(quote_ident, attr_cols[e.table])]
        )
        for e in entities
        if e.src is not None
    }
    attrs = {table: staged for table, (staged, _) in attr_staged.items()}
    unit = None
    if not ev.columns[schema.timestamp].startswith(_TIMESTAMP_TYPES) and (
        schema.timestamp_format == "unix" or schema.timestamp_format in UNIX_UNITS
    ):
        unit = _unix_unit(run, events, schema.timestamp_format, f"{ev.label}: {schema.timestamp!r}")
        if UNIX_UNITS[unit][0] > 1:
            run.con.execute(f"UPDATE {events} SET __ts = __ts // {UNIX_UNITS[unit][0]}")

    # 2. Integer or string ids; one reason per row (the first failing check); duplicates among the rest.
    integer = {e.table: _integer_ids(run, e, events, attrs.get(e.table)) for e in entities}
    ev_checked = _checked(
        events,
        [
            *_id_checks("__u", integer["users"], "user_id"),
            *_id_checks("__i", integer["items"], "item_id"),
            ("__ts IS NULL AND __ts_bad IS NULL", "missing_timestamp", "NULL"),
            ("__ts IS NULL", "bad_timestamp", "__ts_bad"),
            ("__ts < 0", "bad_timestamp", "'before 1970: ' || CAST(__ts AS VARCHAR)"),
            ("__event IS NULL", "missing_event", "NULL"),
            ("__v_bad IS NOT NULL", "bad_value", "__v_bad"),
            ("__v < 0", "negative_value", "CAST(__v AS VARCHAR)"),
        ],
    )
    key = {e.table: f"{e.ev_col}_int" if integer[e.table] else e.ev_col for e in entities}
    staged = [
        _Staged(
            ev,
            name["events"],
            ev_checked,
            _duplicates(run, "events_dups", ev_checked, [key["users"], key["items"], "__ts", "__event"]),
            "duplicate_event",
            ev_malformed,
        )
    ]
    for e in entities:
        if e.table in attrs:
            checked = _checked(attrs[e.table], _id_checks("__id", integer[e.table], e.id_col))
            dups = _duplicates(run, f"{e.table}_dups", checked, ["__id_int" if integer[e.table] else "__id"])
            assert e.src is not None
            malformed = attr_staged[e.table][1]
            staged.append(_Staged(e.src, name[e.table], checked, dups, f"duplicate_{e.id_col}", malformed))
    accepted = {
        s.table: f"SELECT c.* FROM ({s.checked}) c ANTI JOIN {s.dups} x USING (__row) WHERE c.__r0 IS NULL"
        for s in staged
    }

    # 3. Dense ids 1..n for string ids, over the accepted rows of the events and of the attribute file
    #    (a duplicate shares its key, hence its ids, with the row that was kept).
    maps: dict[str, str] = {}
    for e in entities:
        if integer[e.table]:
            continue
        union = f"SELECT DISTINCT {e.ev_col} AS raw_id FROM ({ev_checked}) WHERE __r0 IS NULL"
        if e.table in attrs:
            union += f" UNION SELECT __id FROM ({accepted[name[e.table]]})"
        maps[e.table] = run.temp(
            f"{e.table}_map",
            f"SELECT raw_id, row_number() OVER (ORDER BY raw_id) AS {e.id_col} FROM ({union})",
        )

    # 4. The published tables: SELECTs over the staging tables, run inside the publishing transaction.
    sources = {name["events"]: _events_sql(run, ev, accepted[name["events"]], ev_extras, entities, maps, key)}
    for e in entities:
        sources[name[e.table]] = _attribute_sql(
            run, e, accepted.get(name[e.table]), attr_cols, maps, name["events"]
        )
    rejected = " UNION ALL ".join(
        f"SELECT {k} AS __f, {quote_literal(s.src.label)} AS file, __row + 1 AS row, __r0 AS reason, "
        f"__d0 AS detail FROM ({s.checked}) WHERE __r0 IS NOT NULL UNION ALL "
        f"SELECT {k}, {quote_literal(s.src.label)}, __row + 1, '{s.dup_reason}', "
        f"'same key as row ' || (__first + 1) FROM {s.dups}"
        + (
            f" UNION ALL SELECT {k}, {quote_literal(s.src.label)}, __row + 1, 'malformed_row', detail "
            f"FROM {s.malformed}"
            if s.malformed
            else ""
        )
        for k, s in enumerate(staged)
    )
    rejects = run.temp("rejects", f"SELECT * FROM ({rejected}) ORDER BY __f, row")
    sources[name["rejects"]] = (
        f"SELECT file, CAST(row AS BIGINT) AS row, reason FROM {rejects} ORDER BY __f, row"
    )
    for e in entities:
        if e.table in maps:
            sources[name[e.map_table]] = f"SELECT raw_id, {e.id_col} FROM {maps[e.table]} ORDER BY 2"
    # Mapping tables of an earlier string-id ingest would be misleading next to integer ids: drop them.
    stale = [name[e.map_table] for e in entities if e.table not in maps]

    # 5. The report, from the staging tables; then everything is published in one transaction.
    files = []
    for k, s in enumerate(staged):
        counts = dict(run.rows(f"SELECT reason, count(*) FROM {rejects} WHERE __f = {k} GROUP BY 1"))
        read = run.rows(f"SELECT count(*) FROM ({s.checked})")[0][0]
        if s.malformed:
            read += run.rows(f"SELECT count(*) FROM {s.malformed}")[0][0]
        rejected_n = sum(counts.values())
        files.append(
            FileCounts(
                file=s.src.label,
                table=s.table,
                rows_read=read,
                rows_accepted=read - rejected_n,
                rejected={why: counts[why] for why in REJECT_REASONS if why in counts},
            )
        )
    first = f"SELECT file, row, reason, detail FROM {rejects} ORDER BY __f, row LIMIT {int(max_examples)}"
    examples = tuple(RejectedRow(file=f, row=r, reason=why, detail=d) for f, r, why, d in run.rows(first))
    totals = {why: sum(f.rejected.get(why, 0) for f in files) for why in REJECT_REASONS}

    inputs = {f"{s.table}:{s.src.label}": file_sha256(s.src.path) for s in staged}
    params = {"loader": LOADER_VERSION, "schema": schema.model_dump(mode="json")}
    versions = wh.publish_many(sources, inputs=inputs, params=params, drop=stale)
    return IngestReport(
        dataset=dataset,
        rows_read=sum(f.rows_read for f in files),
        rows_accepted=sum(f.rows_accepted for f in files),
        rejected={why: n for why, n in totals.items() if n},
        examples=examples,
        files=tuple(files),
        user_ids_mapped="users" in maps,
        item_ids_mapped="items" in maps,
        versions={table: v.version for table, v in versions.items()},
        timestamp_unit=unit,
    )


def _events_sql(
    run: _Run,
    ev: _Source,
    accepted: str,
    extras: list[str],
    entities: tuple[_Entity, _Entity],
    maps: dict[str, str],
    key: dict[str, str],
) -> str:
    """SELECT for ``<ds>.events``: the contract's columns, then the file's extra columns."""
    ids = dict(key)
    joins = ""
    for e, alias in zip(entities, ("um", "im"), strict=True):
        if e.table in maps:
            joins += f" JOIN {maps[e.table]} {alias} ON {alias}.raw_id = a.{e.ev_col}"
            ids[e.table] = f"{alias}.{e.id_col}"
    types = _infer_types(run, accepted, ev, extras)
    extra_sql = "".join(f", {_typed(c, ev, types[c])} AS {quote_ident(c)}" for c in extras)
    return (
        f"SELECT {ids['users']} AS user_id, {ids['items']} AS item_id, __ts AS ts, __event AS event, "
        f"__v AS value, __row AS src_row{extra_sql} FROM ({accepted}) a{joins} ORDER BY src_row"
    )


def _attribute_sql(
    run: _Run,
    ent: _Entity,
    accepted: str | None,
    cols: dict[str, list[str]],
    maps: dict[str, str],
    events_table: str,
) -> str:
    """SELECT for ``<ds>.users``/``<ds>.items``: the attribute file's accepted rows, or the events' ids."""
    # The contract's primary category is text; items without one (or without a file) get NULL.
    category = ["CAST(NULL AS VARCHAR) AS category"] if ent.table == "items" else []
    if accepted is None:
        return f"SELECT DISTINCT {', '.join([ent.id_col, *category])} FROM {events_table} ORDER BY 1"
    assert ent.src is not None
    attrs = cols[ent.table]
    if ent.table == "items" and "category" in attrs:
        category = ["nullif(trim(CAST(category AS VARCHAR)), '') AS category"]
        attrs = [c for c in attrs if c != "category"]
    types = _infer_types(run, accepted, ent.src, attrs)
    select = [*category, *(f"{_typed(c, ent.src, types[c])} AS {quote_ident(c)}" for c in attrs)]
    if ent.table in maps:
        select.insert(0, f"m.{ent.id_col}")
        join = f" JOIN {maps[ent.table]} m ON m.raw_id = a.__id"
    else:
        select.insert(0, f"__id_int AS {ent.id_col}")
        join = ""
    return f"SELECT {', '.join(select)} FROM ({accepted}) a{join} ORDER BY a.__row"
