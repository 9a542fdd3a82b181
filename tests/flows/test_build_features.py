from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from recsys.features.config import FeatureConfig
from recsys.flows.build_features import (
    DatasetSpec,
    build_features_flow,
    examples,
    export,
    generate_synthetic,
    ingest,
    key_figures,
    sequences,
    splits,
)
from recsys.ingest.events import EventSchema
from recsys.warehouse import Warehouse

FEATURE_TABLES = ("sequences", "item_index", "user_index", "split_loo", "examples")


def lineage_rows(path: Path, dataset: str | None = None) -> int:
    """Lineage rows in all (or only ``dataset``'s feature) tables."""
    where = ""
    if dataset is not None:
        where = "WHERE table_name IN (" + ", ".join(f"'{dataset}.{t}'" for t in FEATURE_TABLES) + ")"
    with Warehouse(path, read_only=True) as wh:
        return int(wh.con.execute(f"SELECT count(*) FROM lineage {where}").fetchall()[0][0])


def test_dataset_spec_checks_fields_per_kind(tmp_path: Path) -> None:
    assert DatasetSpec(kind="movielens").dataset == "ml100k"
    assert DatasetSpec(kind="synthetic", synthetic_events=1_000).dataset == "synthetic"
    with pytest.raises(ValidationError, match="events_path"):
        DatasetSpec(kind="events", name="mine")
    with pytest.raises(ValidationError, match="needs a name"):
        DatasetSpec(kind="events", events_path=tmp_path / "e.csv")
    with pytest.raises(ValidationError, match="only apply to kind='movielens'"):
        DatasetSpec(kind="synthetic", movielens_dir=tmp_path)
    with pytest.raises(ValidationError, match="schema name"):
        DatasetSpec(kind="events", name="bad name", events_path=tmp_path / "e.csv")
    with pytest.raises(ValidationError, match="kind"):
        DatasetSpec(kind="parquet")  # type: ignore[arg-type]


def test_tasks_build_a_users_own_events_and_skip_when_unchanged(tmp_path: Path, warehouse_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 600
    pl.DataFrame(
        {
            "user_id": rng.integers(1, 30, n),
            "item_id": rng.integers(1, 50, n),
            "timestamp": 1_700_000_000 + rng.integers(0, 30 * 86_400, n),
            "rating": rng.integers(1, 6, n),
        }
    ).write_csv(tmp_path / "events.csv")
    spec = DatasetSpec(
        kind="events",
        name="mine",
        events_path=tmp_path / "events.csv",
        event_schema=EventSchema(value="rating"),
    )
    cfg = FeatureConfig(max_seq_len=16)
    root = tmp_path / "exports"

    def run_all() -> tuple[dict[str, str], Path]:
        # The tasks' plain functions (.fn): the flow's steps without the Prefect server.
        source = ingest.fn(spec, warehouse_path, None)
        versions = {
            "sequences": sequences.fn(warehouse_path, "mine"),
            "split_loo": splits.fn(warehouse_path, "mine", cfg),
            "examples": examples.fn(warehouse_path, "mine", cfg),
        }
        return source | versions, export.fn(warehouse_path, "mine", cfg, root)

    first, out = run_all()
    n_lineage = lineage_rows(warehouse_path, "mine")
    assert n_lineage == len(FEATURE_TABLES)
    again, out_again = run_all()  # ingest_events republishes (same content version); features are skipped
    assert again == first and out_again == out
    assert lineage_rows(warehouse_path, "mine") == n_lineage
    fig = key_figures(warehouse_path, "mine", out)
    assert fig["events"] == n and fig["examples"] == n
    assert sum(fig["examples_per_split"].values()) == n
    # A changed parameter rebuilds only what depends on it.
    examples.fn(warehouse_path, "mine", FeatureConfig(split_quantiles=(0.5, 0.75)))
    with Warehouse(warehouse_path, read_only=True) as wh:
        assert wh.version("mine.sequences") == first["sequences"]
        assert wh.latest("mine.examples").params["split"]["q1"] == 0.5
    assert lineage_rows(warehouse_path, "mine") == n_lineage + 1


def test_synthetic_quick_gives_impression_examples(tmp_path: Path, warehouse_path: Path) -> None:
    spec = DatasetSpec(kind="synthetic", synthetic_preset="quick")
    run_dir = generate_synthetic.fn(spec, tmp_path)
    assert generate_synthetic.fn(spec, tmp_path) == run_dir  # a complete run is reused
    ingest.fn(spec, warehouse_path, run_dir)
    examples.fn(warehouse_path, "synthetic", FeatureConfig())
    with Warehouse(warehouse_path, read_only=True) as wh:
        n_imp = wh.con.execute("SELECT count(*) FROM synthetic.impressions").fetchall()[0][0]
        ex = wh.sql('SELECT label, click, "like", seq_offset, i_cnt FROM synthetic.examples')
    assert ex.height == n_imp > 0
    assert (ex["label"] == ex["click"]).all() and 0.02 < ex["label"].mean() < 0.5
    assert not (ex["like"] & ~ex["click"]).any()  # like only given a click


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flow_runs_for_real_on_movielens_and_reruns_as_a_no_op(
    ml100k_dir: Path, warehouse_path: Path, tmp_path: Path
) -> None:
    spec = DatasetSpec(kind="movielens", movielens_dir=ml100k_dir)
    cfg = FeatureConfig()
    fig = build_features_flow(spec, cfg, warehouse_path, tmp_path / "exports")
    assert (fig["events"], fig["users"], fig["items"], fig["examples"]) == (100_000, 943, 1_682, 100_000)
    assert fig["loo_users_evaluated"] == 943  # every ML-100K user has >= 20 ratings
    assert 0.5 < fig["positive_rate"] < 0.6  # share of ratings >= 4
    assert Path(fig["export_dir"], "manifest.json").exists()
    n_lineage = lineage_rows(warehouse_path)
    again = build_features_flow(spec, cfg, warehouse_path, tmp_path / "exports")
    assert again["versions"] == fig["versions"] and again["export_dir"] == fig["export_dir"]
    assert lineage_rows(warehouse_path) == n_lineage
