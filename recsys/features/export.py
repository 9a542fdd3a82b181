"""Parquet exports that the models read: ``PathsConfig().exports / <ds> / <version>/``.

Files (written into a temp dir beside the target, renamed into place when complete):

- ``sequences.parquet``: ``user_idx int32, item_idx list<int32>, ts list<int64>, value list<float32>,
  valid_pos int32, test_pos int32`` -- every user's whole history in ``(ts, src_row)`` order plus the
  leave-one-out target positions (NULL: the user is training-only).
- ``examples_{train,valid,test}.parquet``: the ranking examples of each split (global temporal cut), in a
  fixed order (``ts`` then the source key), with ``user_idx, item_idx, seq_offset``, labels, the
  point-in-time features and the static user/item attributes (``with_attributes_sql``).
- ``manifest.json``: table versions, ``n_items``/``n_users``, the splits with their parameters and row counts,
  the column roles (categorical / numeric / list features, labels) and ``max_seq_len``.

OPEN choice, and what was picked: ``max_seq_len`` is *what models read*, not a cut of the file. The file keeps
whole histories because ranking examples index them with ``seq_offset`` anywhere in the history; a model
reads ``item_idx[max(0, end - max_seq_len):end]`` (``history_window``), the most recent ``max_seq_len``
items before its target. Cutting the file would silently empty the history of every early example.

Data moves DuckDB -> Arrow record batches -> Parquet (bounded memory at any size); readers get Polars frames
through ``pl.scan_parquet`` / ``read_sequences`` (zero-copy from Arrow).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.core.atomic import atomic_path, owned_tempdir
from recsys.core.config import PathsConfig
from recsys.core.hashing import stable_hash
from recsys.features.config import FeatureConfig
from recsys.features.point_in_time import feature_columns, with_attributes_sql
from recsys.features.sequences import check_dataset, num_items, num_users, optional_versions, require_table
from recsys.features.splits import SPLITS
from recsys.warehouse import Warehouse, WarehouseError

MANIFEST = "manifest.json"
LATEST = "LATEST"
EXPORT_FORMAT = "features-export/1"
_BATCH_ROWS = 1 << 20


def _stream_to_parquet(wh: Warehouse, query: str, path: Path, schema: pa.Schema | None = None) -> int:
    """Write a query's result batch by batch (DuckDB's Arrow interchange, no full materialisation)."""
    reader = wh.con.sql(query).to_arrow_reader(_BATCH_ROWS)
    rows = 0
    target_schema = schema or reader.schema
    with pq.ParquetWriter(path, target_schema, compression="zstd") as writer:
        for batch in reader:
            if schema is not None:
                batch = batch.cast(schema)
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


SEQUENCES_SCHEMA = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("item_idx", pa.list_(pa.int32())),
        ("ts", pa.list_(pa.int64())),
        ("value", pa.list_(pa.float32())),
        ("valid_pos", pa.int32()),
        ("test_pos", pa.int32()),
    ]
)


def export_version(wh: Warehouse, dataset: str, config: FeatureConfig) -> tuple[str, dict[str, str]]:
    """The export's version: a hash of the exported tables' versions and the export parameters."""
    tables = {
        f"{dataset}.{t}": require_table(wh, f"{dataset}.{t}")
        for t in ("sequences", "examples", "split_loo", "item_index", "user_index")
    }
    tables |= optional_versions(wh, dataset, ("users", "items"))  # their attributes are joined in
    return stable_hash(EXPORT_FORMAT, tables, config.max_seq_len), tables


def export_features(
    wh: Warehouse, dataset: str, config: FeatureConfig, *, root: str | Path | None = None
) -> Path:
    """Export ``dataset``'s feature tables; returns the export directory (reused when already complete)."""
    check_dataset(dataset)
    root = Path(root) if root is not None else PathsConfig().exports
    version, tables = export_version(wh, dataset, config)
    final = root / dataset / version
    if (final / MANIFEST).exists():
        _write_latest(root / dataset, version)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = owned_tempdir(final.parent, version)
    try:
        manifest = _write_files(wh, dataset, config, tmp, version, tables)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if final.exists():  # an incomplete leftover (no manifest): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _write_latest(root / dataset, version)
    return final


def _write_latest(dataset_dir: Path, version: str) -> None:
    with atomic_path(dataset_dir / LATEST) as tmp:
        tmp.write_text(version + "\n")


def _write_files(
    wh: Warehouse, dataset: str, config: FeatureConfig, out: Path, version: str, tables: dict[str, str]
) -> dict[str, Any]:
    seq_rows = _stream_to_parquet(
        wh,
        f"""SELECT s.user_idx, s.item_idx, s.ts, s.value, l.valid_pos, l.test_pos
            FROM {dataset}.sequences s JOIN {dataset}.split_loo l USING (user_idx) ORDER BY s.user_idx""",
        out / "sequences.parquet",
        SEQUENCES_SCHEMA,
    )
    roles = feature_columns(wh, dataset)
    lineage = wh.latest(f"{dataset}.examples")
    assert lineage is not None  # require_table checked it
    # Rated events, implicit-feedback examples (positive then its negatives), impressions (by slot).
    source_key = (
        ["user_idx", "pos"]
        if "pos" in roles["meta"]
        else ["request_id", "candidate"]
        if "candidate" in roles["meta"]
        else ["request_id", "position"]
    )
    order = ", ".join(["ts", *source_key])
    counts = {}
    for split in SPLITS:
        counts[split] = _stream_to_parquet(
            wh,
            f"SELECT * EXCLUDE (split) FROM ({with_attributes_sql(wh, dataset)})"
            f" WHERE split = '{split}' ORDER BY {order}",
            out / f"examples_{split}.parquet",
        )
    loo = wh.con.execute(
        f"SELECT count(*) FILTER (WHERE valid_pos IS NOT NULL), count(*) FROM {dataset}.split_loo"
    ).fetchall()[0]
    return {
        "format": EXPORT_FORMAT,
        "dataset": dataset,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(),
        "tables": tables,
        "n_items": num_items(wh, dataset),
        "n_users": num_users(wh, dataset),
        "n_sequences": seq_rows,
        "max_seq_len": config.max_seq_len,
        "padding_idx": 0,
        "splits": {
            "retrieval": {
                "protocol": "leave-one-out",
                "order": "ts, src_row",
                "min_events": config.loo_min_events,
                "users_evaluated": int(loo[0]),
                "users_train_only": int(loo[1] - loo[0]),
            },
            "ranking": {**lineage.params["split"], "rows": counts, "order": order},
        },
        "labels": roles["labels"],
        "columns": roles,
        "files": {
            "sequences": "sequences.parquet",
            **{f"examples_{s}": f"examples_{s}.parquet" for s in SPLITS},
        },
        "feature_config": config.model_dump(mode="json"),
    }


def latest_export(dataset: str, *, root: str | Path | None = None) -> Path:
    """The directory of the most recent complete export of ``dataset``."""
    root = Path(root) if root is not None else PathsConfig().exports
    pointer = root / check_dataset(dataset) / LATEST
    if not pointer.exists():
        raise WarehouseError(f"no export of {dataset!r} under {root}; run the feature build first")
    path = root / dataset / pointer.read_text().strip()
    if not (path / MANIFEST).exists():
        raise WarehouseError(f"export {path} is incomplete (no {MANIFEST}); rebuild it")
    return path


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(export_dir) / MANIFEST).read_text())


def read_sequences(export_dir: str | Path) -> pl.DataFrame:
    return pl.read_parquet(Path(export_dir) / "sequences.parquet")


def read_examples(export_dir: str | Path, split: str) -> pl.DataFrame:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return pl.read_parquet(Path(export_dir) / f"examples_{split}.parquet")


def history_window(item_idx: np.ndarray, end: int, max_len: int) -> np.ndarray:
    """The most recent ``max_len`` items before position ``end`` (``seq_offset`` or a LOO target position)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not 0 <= end <= len(item_idx):
        raise ValueError(f"end={end} is outside a history of {len(item_idx)} items")
    return item_idx[max(0, end - max_len) : end]
