"""Publish a generated synthetic dataset into the warehouse as ``<dataset>.users/items/impressions/events``.

Each table is read by DuckDB straight from the run's Parquet files (``read_parquet``), cast to the types of
docs/data-contracts.md and published with ``Warehouse.publish``; its lineage ``inputs`` is the config hash
(the data version), so a second load of the same run is skipped by ``Warehouse.is_fresh``. A run that
logged no impressions publishes an empty ``impressions`` table (the schema still holds).
"""

from __future__ import annotations

import re
from pathlib import Path

from recsys.core.hashing import stable_hash
from recsys.synthetic.config import GENERATOR_VERSION
from recsys.synthetic.generator import SyntheticManifest, read_manifest
from recsys.warehouse import TableVersion, Warehouse

_DATASET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: Column -> DuckDB type per table, in contract order.
SCHEMAS: dict[str, dict[str, str]] = {
    "users": {
        "user_id": "BIGINT",
        "age_bucket": "VARCHAR",
        "gender": "VARCHAR",
        "region": "VARCHAR",
        "device": "VARCHAR",
    },
    "items": {
        "item_id": "BIGINT",
        "category": "VARCHAR",
        "creator": "VARCHAR",
        "price_band": "VARCHAR",
        "release_ts": "BIGINT",
    },
    "impressions": {
        "request_id": "BIGINT",
        "user_id": "BIGINT",
        "item_id": "BIGINT",
        "ts": "BIGINT",
        "position": "INTEGER",
        "propensity": "DOUBLE",
        "click": "BOOLEAN",
        "like": "BOOLEAN",
        "dwell": "DOUBLE",
        "p_click": "DOUBLE",
        "p_click_unbiased": "DOUBLE",
    },
    "events": {
        "user_id": "BIGINT",
        "item_id": "BIGINT",
        "ts": "BIGINT",
        "event": "VARCHAR",
        "value": "DOUBLE",
        "src_row": "BIGINT",
    },
}


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _select(table: str, paths: list[Path]) -> str:
    cols = SCHEMAS[table]
    if not paths:
        typed = ", ".join(f'CAST(NULL AS {t}) AS "{c}"' for c, t in cols.items())
        return f"SELECT {typed} WHERE false"
    files = "[" + ", ".join(_literal(str(p)) for p in paths) + "]"
    typed = ", ".join(f'CAST("{c}" AS {t}) AS "{c}"' for c, t in cols.items())  # "like" is a keyword
    return f"SELECT {typed} FROM read_parquet({files})"


def load_into_warehouse(
    wh: Warehouse, manifest: SyntheticManifest | str | Path, dataset: str = "synthetic"
) -> dict[str, TableVersion]:
    """Publish the run's four tables as ``<dataset>.<table>``; returns each table's version.

    ``manifest`` is the object ``generate`` returned or the run's output directory. The four tables are
    published in one transaction; when all were already published from this data version, nothing is
    rewritten and their current versions are returned.
    """
    if not _DATASET.match(dataset):
        raise ValueError(f"dataset {dataset!r} must be a DuckDB schema name (letters, digits, '_')")
    if not isinstance(manifest, SyntheticManifest):
        manifest = read_manifest(manifest)
    elif manifest.root is None:
        raise ValueError("manifest has no root directory; pass the output directory, or read_manifest(dir)")
    for table in SCHEMAS:
        for path in manifest.paths(table):
            if not path.exists():
                raise FileNotFoundError(f"{path} is listed in the manifest but missing: regenerate the run")
    inputs = {"synthetic_config": manifest.data_version}
    params = {"source": "synthetic", "generator_version": GENERATOR_VERSION}
    key = stable_hash(inputs, params)  # the input_key Warehouse.publish records
    tables = ("users", "items", "events", "impressions")
    if all(wh.is_fresh(f"{dataset}.{t}", key) for t in tables):
        return {t: wh.latest(f"{dataset}.{t}") for t in tables}  # type: ignore[misc]  # fresh => lineage row
    # One transaction for all four: a failure never leaves new events beside old users.
    published = wh.publish_many(
        {f"{dataset}.{t}": _select(t, manifest.paths(t)) for t in tables}, inputs=inputs, params=params
    )
    return {t: published[f"{dataset}.{t}"] for t in tables}
