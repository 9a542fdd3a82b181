"""A user's own events/users/items files -> validated warehouse tables, bad rows reported, one transaction."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from recsys.ingest.events import EventSchema, ingest_events
from recsys.ingest.schema import SchemaError
from recsys.warehouse import Warehouse

GOOD_CSV = """uid,iid,ts_unix,kind,rating,device
1,10,1700000000,view,4,ios
2,10,1700000060,view,3.5,web
1,11,1700000120,buy,,web
"""
CLEAN_SCHEMA = EventSchema(user_id="uid", item_id="iid", timestamp="ts_unix", event="kind", value="rating")
EXPECTED_EVENTS = [
    {
        "user_id": 1,
        "item_id": 10,
        "ts": 1700000000,
        "event": "view",
        "value": 4.0,
        "src_row": 0,
        "device": "ios",
    },
    {
        "user_id": 2,
        "item_id": 10,
        "ts": 1700000060,
        "event": "view",
        "value": 3.5,
        "src_row": 1,
        "device": "web",
    },
    {
        "user_id": 1,
        "item_id": 11,
        "ts": 1700000120,
        "event": "buy",
        "value": None,
        "src_row": 2,
        "device": "web",
    },
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _tables(wh: Warehouse) -> list[str]:
    return [
        r[0]
        for r in wh.con.execute("SELECT schema_name || '.' || table_name FROM duckdb_tables()").fetchall()
    ]


def test_csv_round_trip(tmp_path: Path, warehouse_path: Path) -> None:
    events = _write(tmp_path / "events.csv", GOOD_CSV)
    with Warehouse(warehouse_path) as wh:
        report = ingest_events(wh, "shop", events, schema=CLEAN_SCHEMA)
        assert wh.sql("SELECT * FROM shop.events ORDER BY src_row").to_dicts() == EXPECTED_EVENTS
        cols = [r[:2] for r in wh.con.execute("DESCRIBE shop.events").fetchall()]
        assert cols[:6] == [
            ("user_id", "BIGINT"),
            ("item_id", "BIGINT"),
            ("ts", "BIGINT"),
            ("event", "VARCHAR"),
            ("value", "DOUBLE"),
            ("src_row", "BIGINT"),
        ]
        # Without attribute files the users/items tables list the ids seen in the events.
        assert wh.sql("SELECT * FROM shop.users").rows() == [(1,), (2,)]
        assert wh.sql("SELECT * FROM shop.items").rows() == [(10, None), (11, None)]
        assert wh.sql("SELECT count(*) AS n FROM shop.rejects")["n"][0] == 0
        assert not wh.has_table("shop.user_ids") and not wh.has_table("shop.item_ids")
        assert wh.version("shop.events") == report.versions["shop.events"]
    assert (report.rows_read, report.rows_accepted, report.rejected, report.examples) == (3, 3, {}, ())
    assert not report.user_ids_mapped and not report.item_ids_mapped


def test_parquet_round_trip_matches_csv(tmp_path: Path, warehouse_path: Path) -> None:
    table = pa.table(
        {
            "uid": pa.array([1, 2, 1], pa.int64()),
            "iid": pa.array([10, 10, 11], pa.int32()),
            # A native timestamp column is used as it is (UTC), whatever timestamp_format says.
            "ts_unix": pa.array([1700000000, 1700000060, 1700000120], pa.int64()).cast(pa.timestamp("s")),
            "kind": ["view", "view", "buy"],
            "rating": pa.array([4.0, 3.5, None], pa.float64()),
            "device": ["ios", "web", "web"],
        }
    )
    pq.write_table(table, tmp_path / "events.parquet")
    with Warehouse(warehouse_path) as wh:
        report = ingest_events(wh, "shop", tmp_path / "events.parquet", schema=CLEAN_SCHEMA)
        assert wh.sql("SELECT * FROM shop.events ORDER BY src_row").to_dicts() == EXPECTED_EVENTS
    assert report.rows_accepted == 3 and report.rejected == {}


def test_each_bad_row_is_reported_with_file_and_row(tmp_path: Path, warehouse_path: Path) -> None:
    events = _write(
        tmp_path / "events.csv",
        "uid,iid,ts_unix,kind,rating\n"
        "1,10,1700000000,view,4\n"  # row 1: kept
        ",10,1700000000,view,4\n"  # row 2
        "1,,1700000000,view,4\n"  # row 3
        "1,10,,view,4\n"  # row 4
        "1,10,1.7e9,view,4\n"  # row 5: not integer seconds (TRY_CAST alone would accept it)
        "1,10,1700000001,,4\n"  # row 6
        "1,10,1700000002,view,four\n"  # row 7
        "1,10,1700000003,view,-2\n"  # row 8
        "1,10,1700000000,view,5\n"  # row 9: same (user, item, ts, event) as row 1
        "1,10,1700000000,buy,5\n"  # row 10: another event type, kept
        "x7,10,1700000004,view,1\n",  # row 11: ids declared integer below
    )
    users = _write(tmp_path / "users.csv", "uid,age\n1,30\n1,31\n,40\n")
    schema = CLEAN_SCHEMA.model_copy(update={"user_id_kind": "integer"})
    with Warehouse(warehouse_path) as wh:
        report = ingest_events(wh, "shop", events, users=users, schema=schema, max_examples=3)
        rejects = wh.sql("SELECT * FROM shop.rejects").rows()
        kept = wh.sql("SELECT src_row, event, value FROM shop.events ORDER BY src_row").rows()
        user_rows = wh.sql("SELECT * FROM shop.users").rows()
    ev, us = str(events), str(users)
    assert rejects == [
        (ev, 2, "missing_user_id"),
        (ev, 3, "missing_item_id"),
        (ev, 4, "missing_timestamp"),
        (ev, 5, "bad_timestamp"),
        (ev, 6, "missing_event"),
        (ev, 7, "bad_value"),
        (ev, 8, "negative_value"),
        (ev, 9, "duplicate_event"),
        (ev, 11, "bad_user_id"),
        (us, 2, "duplicate_user_id"),
        (us, 3, "missing_user_id"),
    ]
    assert kept == [(0, "view", 4.0), (9, "buy", 5.0)]
    assert user_rows == [(1, 30)]  # the first row of a duplicated id wins
    assert report.rejected == {
        "missing_user_id": 2,
        "bad_user_id": 1,
        "missing_item_id": 1,
        "missing_timestamp": 1,
        "bad_timestamp": 1,
        "missing_event": 1,
        "bad_value": 1,
        "negative_value": 1,
        "duplicate_event": 1,
        "duplicate_user_id": 1,
    }
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (14, 3, 11)
    assert [(e.row, e.reason, e.detail) for e in report.examples] == [
        (2, "missing_user_id", None),
        (3, "missing_item_id", None),
        (4, "missing_timestamp", None),
    ]
    by_file = {f.file: f for f in report.files}
    assert by_file[ev].rows_read == 11 and by_file[ev].rows_accepted == 2
    assert by_file[us].rejected == {"duplicate_user_id": 1, "missing_user_id": 1}


def test_timestamp_formats(tmp_path: Path, warehouse_path: Path) -> None:
    iso = _write(
        tmp_path / "iso.csv",
        "user_id,item_id,timestamp\n"
        "1,1,2024-01-01T00:00:00Z\n"
        "1,2,2024-01-01T02:00:00+02:00\n"  # the same instant
        "1,3,2024-01-01 00:00:00.750\n"  # no offset: UTC, floored to the second
        "1,4,2024-01-01\n"
        "1,5,2024-01-01 10:00 Europe/Paris\n"  # a zone name DuckDB's cast would silently drop
        "1,6,01/02/2024\n",
    )
    custom = _write(
        tmp_path / "custom.csv", "user_id,item_id,timestamp\n1,1,02/01/2024 10:30\n1,2,2024-01-02\n"
    )
    with Warehouse(warehouse_path) as wh:
        report = ingest_events(wh, "iso", iso, schema=EventSchema(timestamp_format="iso8601"))
        assert wh.sql("SELECT item_id, ts FROM iso.events ORDER BY src_row").rows() == [
            (1, 1704067200),
            (2, 1704067200),
            (3, 1704067200),
            (4, 1704067200),
        ]
        assert [(e.row, e.reason, e.detail) for e in report.examples] == [
            (5, "bad_timestamp", "2024-01-01 10:00 Europe/Paris"),
            (6, "bad_timestamp", "01/02/2024"),
        ]
        report = ingest_events(wh, "custom", custom, schema=EventSchema(timestamp_format="%d/%m/%Y %H:%M"))
        assert wh.sql("SELECT ts FROM custom.events").rows() == [(1704191400,)]
        assert report.rejected == {"bad_timestamp": 1}


def test_wrong_columns_raise_before_anything_is_written(tmp_path: Path, warehouse_path: Path) -> None:
    events = _write(tmp_path / "events.csv", "user_id,item_id,time_stamp\n1,2,1700000000\n")
    with Warehouse(warehouse_path) as wh:
        before = _tables(wh)
        with pytest.raises(SchemaError) as err:
            ingest_events(wh, "shop", events)
        assert _tables(wh) == before == ["main.lineage"]
        assert wh.con.execute("SELECT count(*) FROM lineage").fetchone()[0] == 0
    message = str(err.value)
    assert str(events) in message and "missing column(s) ['timestamp']" in message
    assert "'time_stamp'" in message  # the unknown column, offered as the likely intended one

    items = _write(tmp_path / "items.csv", "sku,category\na,b\n")
    good = _write(tmp_path / "good.csv", "user_id,item_id,timestamp\n1,2,1700000000\n")
    with (
        Warehouse(warehouse_path) as wh,
        pytest.raises(SchemaError, match=r"items file .*items\.csv.*'item_id'"),
    ):
        ingest_events(wh, "shop", good, items=items)
    # An unmapped column that would take a contract name is refused too, rather than silently renamed.
    clash = _write(tmp_path / "clash.csv", "user_id,item_id,timestamp,value\n1,2,1700000000,3\n")
    with Warehouse(warehouse_path) as wh, pytest.raises(SchemaError, match=r"\['value'\] would clash"):
        ingest_events(wh, "shop", clash)


def test_ragged_lines_and_millisecond_times_are_read_and_rejected_without_changing_the_rest(
    tmp_path: Path, warehouse_path: Path
) -> None:
    seconds = _write(
        tmp_path / "seconds.csv",
        "user_id,item_id,timestamp\n1,2,1700000000\n1,3,1700000100\n2,2,1700000200\n3,4,1700000300\n",
    )
    # The same events in milliseconds (sub-second parts floored away), with one line too long and one short.
    millis = _write(
        tmp_path / "millis.csv",
        "user_id,item_id,timestamp\n1,2,1700000000250\n1,2,3,4,5\n1,3,1700000100999\n"
        "2,2,1700000200000\n9,9\n3,4,1700000300000\n",
    )
    with Warehouse(warehouse_path) as wh:
        plain = ingest_events(wh, "plain", seconds)
        report = ingest_events(wh, "shop", millis)
        events = wh.sql("SELECT * EXCLUDE (src_row) FROM shop.events ORDER BY ts")
        expected = wh.sql("SELECT * EXCLUDE (src_row) FROM plain.events ORDER BY ts")
        assert events.equals(expected)
        rejects = wh.sql("SELECT row, reason FROM shop.rejects ORDER BY row").rows()
        src_rows = wh.sql("SELECT src_row FROM shop.events ORDER BY src_row")["src_row"].to_list()
    assert plain.timestamp_unit == "unix_s" and report.timestamp_unit == "unix_ms"
    assert rejects == [(2, "malformed_row"), (5, "malformed_row")]
    assert src_rows == [0, 2, 3, 5]  # data rows (0-based) of the accepted lines, the malformed ones skipped
    assert report.rows_read == 6 and report.rows_accepted == 4 and report.rejected == {"malformed_row": 2}
    assert {e.detail.split(":")[0] for e in report.examples} == {"too many columns", "missing columns"}


def test_timestamp_units_mixed_explicit_and_negative(tmp_path: Path, warehouse_path: Path) -> None:
    mixed = _write(tmp_path / "mixed.csv", "user_id,item_id,timestamp\n1,2,1700000000\n1,3,1700000000000\n")
    with Warehouse(warehouse_path) as wh:
        with pytest.raises(SchemaError, match=r"'timestamp' mixes units.*unix_s.*unix_ms"):
            ingest_events(wh, "shop", mixed)
        assert not wh.has_table("shop.events")
        report = ingest_events(wh, "shop", mixed, schema=EventSchema(timestamp_format="unix_ms"))
        assert wh.sql("SELECT ts FROM shop.events ORDER BY ts")["ts"].to_list() == [1700000, 1700000000]
        assert report.timestamp_unit == "unix_ms"
        negative = _write(tmp_path / "neg.csv", "user_id,item_id,timestamp\n1,2,-5\n1,3,100\n")
        report = ingest_events(wh, "neg", negative)
        assert wh.sql("SELECT row, reason FROM neg.rejects").rows() == [(1, "bad_timestamp")]
        assert report.examples[0].detail == "before 1970: -5"
    with pytest.raises(ValidationError, match="timestamp_format"):
        EventSchema(timestamp_format="unix_minutes")


def test_missing_files_are_errors_naming_them(tmp_path: Path, warehouse_path: Path) -> None:
    good = _write(tmp_path / "good.csv", "user_id,item_id,timestamp\n1,2,3\n")
    with pytest.raises(FileNotFoundError, match="users file"), Warehouse(warehouse_path) as wh:
        ingest_events(wh, "shop", good, users=tmp_path / "nope.csv")


def test_string_ids_are_mapped_to_dense_ids(tmp_path: Path, warehouse_path: Path) -> None:
    events = _write(
        tmp_path / "events.tsv",
        "user\titem\ttimestamp\nalice\tsku-9\t100\nbob\tsku-1\t200\nalice\t007\t300\n",
    )
    users = _write(tmp_path / "users.csv", "user,country,zip\nbob,fr,02139\ncarol,de,10115\n")
    items = _write(tmp_path / "items.csv", "item,category,price\nsku-1,shoes,19.5\nsku-9,hats,5\n")
    schema = EventSchema(user_id="user", item_id="item")
    with Warehouse(warehouse_path) as wh:
        report = ingest_events(wh, "shop", events, users=users, items=items, schema=schema)
        assert report.user_ids_mapped and report.item_ids_mapped
        assert wh.sql("SELECT * FROM shop.user_ids ORDER BY user_id").rows() == [
            ("alice", 1),
            ("bob", 2),
            ("carol", 3),
        ]
        # "007" is not a canonical integer, so the item ids stay strings (no silent 007 -> 7).
        assert wh.sql("SELECT * FROM shop.item_ids ORDER BY item_id").rows() == [
            ("007", 1),
            ("sku-1", 2),
            ("sku-9", 3),
        ]
        assert wh.sql("SELECT user_id, item_id, ts FROM shop.events ORDER BY src_row").rows() == [
            (1, 3, 100),
            (2, 2, 200),
            (1, 1, 300),
        ]
        # Attributes join through the same ids; numeric text becomes numbers, zip codes stay text.
        assert wh.sql("SELECT * FROM shop.users ORDER BY user_id").rows() == [
            (2, "fr", "02139"),
            (3, "de", "10115"),
        ]
        assert wh.sql("SELECT * FROM shop.items ORDER BY item_id").rows() == [
            (2, "shoes", 19.5),
            (3, "hats", 5.0),
        ]

        # A later ingest with integer ids drops the now meaningless mapping tables in the same transaction.
        ints = _write(tmp_path / "ints.csv", "user,item,timestamp\n5,6,100\n")
        report = ingest_events(wh, "shop", ints, schema=schema)
        assert not report.user_ids_mapped
        assert not wh.has_table("shop.user_ids") and not wh.has_table("shop.item_ids")


def test_string_ids_without_attribute_files(tmp_path: Path, warehouse_path: Path) -> None:
    events = _write(
        tmp_path / "events.csv",
        "user_id,item_id,timestamp\nbob,x,1\nann,x,2\nbob,y,3\nbob,x,4\nann,y,5\n",
    )
    with Warehouse(warehouse_path) as wh:
        report = ingest_events(wh, "shop", events)
        assert wh.sql("SELECT * FROM shop.user_ids ORDER BY user_id").rows() == [("ann", 1), ("bob", 2)]
        assert wh.sql("SELECT user_id, item_id FROM shop.events ORDER BY src_row").rows() == [
            (2, 1),
            (1, 1),
            (2, 2),
            (2, 1),
            (1, 2),
        ]
        assert wh.sql("SELECT * FROM shop.users").rows() == [(1,), (2,)]
    assert report.rows_accepted == 5


def test_failed_ingest_keeps_the_previous_version(
    tmp_path: Path, warehouse_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _write(tmp_path / "v1.csv", GOOD_CSV)
    second = _write(tmp_path / "v2.csv", GOOD_CSV + "3,12,1700000180,view,5,web\n")
    with Warehouse(warehouse_path) as wh:
        ingest_events(wh, "shop", first, schema=CLEAN_SCHEMA)
        before = {t: wh.version(f"shop.{t}") for t in ("events", "users", "items", "rejects")}
        n_lineage = wh.con.execute("SELECT count(*) FROM lineage").fetchone()[0]

        real = wh.content_hash

        def fail_on_items(name: str, con=None):  # the events and users tables are already replaced by then
            if name == "shop.items":
                raise RuntimeError("disk full")
            return real(name, con)

        monkeypatch.setattr(wh, "content_hash", fail_on_items)
        with pytest.raises(RuntimeError, match="disk full"):
            ingest_events(wh, "shop", second, schema=CLEAN_SCHEMA)
        monkeypatch.undo()

        assert {t: wh.version(f"shop.{t}") for t in before} == before
        assert wh.sql("SELECT count(*) AS n FROM shop.events")["n"][0] == 3
        assert wh.con.execute("SELECT count(*) FROM lineage").fetchone()[0] == n_lineage
        assert not [t for t in _tables(wh) if "__ingest" in t]  # staging tables are cleaned up


def test_schema_is_validated() -> None:
    with pytest.raises(ValidationError, match="different columns"):
        EventSchema(user_id="id", item_id="id")
    with pytest.raises(ValidationError, match="timestamp_format"):
        EventSchema(timestamp_format="dd/mm/yyyy")
    with pytest.raises(ValidationError):
        EventSchema(user_col="x")  # a typo in a field name is an error, not ignored
