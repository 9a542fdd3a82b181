from __future__ import annotations

from pathlib import Path

import pytest

from recsys.synthetic.config import CatalogueConfig, PolicyConfig, SessionConfig, SyntheticConfig, UserConfig
from recsys.synthetic.generator import SyntheticManifest, generate
from recsys.synthetic.warehouse_load import SCHEMAS, load_into_warehouse
from recsys.warehouse import Warehouse


def test_load_publishes_the_four_contract_tables(quick_run: SyntheticManifest, warehouse_path: Path) -> None:
    with Warehouse(warehouse_path) as wh:
        versions = load_into_warehouse(wh, quick_run, dataset="syn")
        assert set(versions) == {"users", "items", "impressions", "events"}
        for table, cols in SCHEMAS.items():
            described = {r[0]: r[1] for r in wh.con.execute(f"DESCRIBE syn.{table}").fetchall()}
            assert described == cols, table
            assert versions[table].row_count == quick_run.counts[table]
            assert versions[table].inputs == {"synthetic_config": quick_run.data_version}
        assert wh.sql("SELECT max(src_row) AS m FROM syn.events")["m"][0] == quick_run.counts["events"] - 1
        n_lineage = wh.sql("SELECT count(*) AS n FROM lineage")["n"][0]
        again = load_into_warehouse(wh, quick_run.root, dataset="syn")  # the directory works too
        assert {t: v.version for t, v in again.items()} == {t: v.version for t, v in versions.items()}
        assert wh.sql("SELECT count(*) AS n FROM lineage")["n"][0] == n_lineage  # unchanged data: skipped


def test_a_run_without_impressions_loads_an_empty_impressions_table(
    tmp_path: Path, warehouse_path: Path
) -> None:
    cfg = SyntheticConfig(
        catalogue=CatalogueConfig(n_items=300, n_creators=40),
        users=UserConfig(n_users=20),
        sessions=SessionConfig(requests_per_user_mean=4.0),
        policy=PolicyConfig(impression_log_rate=0.0),
    )
    m = generate(cfg, tmp_path / "run")
    with Warehouse(warehouse_path) as wh:
        versions = load_into_warehouse(wh, m)
        assert versions["impressions"].row_count == 0
        assert versions["events"].row_count == m.counts["events"] > 0
        cols = [r[0] for r in wh.con.execute("DESCRIBE synthetic.impressions").fetchall()]
        assert cols == list(SCHEMAS["impressions"])
        with pytest.raises(ValueError, match="dataset"):
            load_into_warehouse(wh, m, dataset="bad-name")
        with pytest.raises(FileNotFoundError):
            load_into_warehouse(wh, tmp_path / "nowhere")
