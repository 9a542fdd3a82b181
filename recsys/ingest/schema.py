"""The source-table contracts every ingest writes and the ingest errors.

The column lists mirror docs/data-contracts.md ("Source tables"). Ingests publish all their tables through
``Warehouse.publish_many``, one transaction: an ingest must never leave new events beside old users.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from recsys.warehouse import TableVersion, Warehouse

#: ``<ds>.events``, in contract order; extra source columns follow these.
EVENT_COLUMNS: dict[str, str] = {
    "user_id": "BIGINT",
    "item_id": "BIGINT",
    "ts": "BIGINT",
    "event": "VARCHAR",
    "value": "DOUBLE",
    "src_row": "BIGINT",
}
#: ``<ds>.rejects``: ``row`` is the 1-based data row of ``file`` (header excluded), i.e. ``src_row + 1``.
REJECT_COLUMNS: dict[str, str] = {"file": "VARCHAR", "row": "BIGINT", "reason": "VARCHAR"}

_DATASET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class IngestError(ValueError):
    """A source file cannot be ingested (unreadable, or not in the declared format)."""


class SchemaError(IngestError):
    """A source file's columns do not match the declared schema; raised before anything is written."""


def check_dataset(dataset: str) -> str:
    """Datasets are DuckDB schemas: letters, digits and '_' only, so ``<dataset>.events`` is a valid name."""
    if not _DATASET.match(dataset):
        raise ValueError(
            f"dataset {dataset!r} must be made of letters, digits and '_' (not starting with a digit)"
        )
    return dataset


def quote_ident(name: str) -> str:
    """A column name as a DuckDB identifier, whatever characters the source file used."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def fresh_versions(wh: Warehouse, names: Iterable[str], input_key: str) -> dict[str, TableVersion] | None:
    """The current versions of ``names`` when ALL of them were built from ``input_key``, else None."""
    names = list(names)
    if not all(wh.is_fresh(name, input_key) for name in names):
        return None
    latest = {name: wh.latest(name) for name in names}
    return {name: v for name, v in latest.items() if v is not None}
