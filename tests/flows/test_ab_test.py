"""flows.ab_test: the CLI command runs the Prefect flow on a generated synthetic dataset in the warehouse
(the world found from the generator's manifest), publishes the A/B tables and prints the lift table."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from recsys.core.config import PathsConfig
from recsys.dashboard import data
from recsys.flows.ab_test import ABTestFlowConfig, app
from recsys.models.registry import build_model
from recsys.serving.registry import register_model
from recsys.synthetic.config import CatalogueConfig, SessionConfig, SyntheticConfig, UserConfig
from recsys.synthetic.generator import generate
from recsys.synthetic.warehouse_load import load_into_warehouse
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog


def _dataset() -> tuple[str, str]:
    """A tiny generated dataset in the session's warehouse and two popularity arms over its catalogue."""
    config = SyntheticConfig(
        seed=4,
        catalogue=CatalogueConfig(n_items=150, n_categories=4, n_creators=20),
        users=UserConfig(n_users=160),
        sessions=SessionConfig(requests_per_user_mean=4.0, horizon_days=10.0),
    )
    paths = PathsConfig()
    out = paths.cache / "synthetic" / config.data_version()  # where the pipeline generates
    generate(config, out)
    with Warehouse(paths.warehouse) as wh:
        load_into_warehouse(wh, out, "abflow")
        events = wh.sql("SELECT item_id, count(*) AS n FROM abflow.events GROUP BY item_id")
    counts = np.ones(150)
    counts[events["item_id"].to_numpy()] += events["n"].to_numpy()
    items = pl.DataFrame({"item_id": np.arange(150), "item_idx": np.arange(1, 151), "popularity": counts})
    tags = []
    for name, c in (("abflow-pop", counts), ("abflow-unpop", counts.max() + 1 - counts)):
        model = build_model("popularity", num_items=150)
        model.load_counts(torch.from_numpy(np.r_[0.0, c]).float())
        tags.append(
            register_model(
                name,
                architecture="popularity",
                task="retrieval",
                model=model,
                items=items,
                data_version=config.data_version(),
            )  # fmt: skip
        )
    return tags[0], tags[1]


def test_the_cli_runs_the_flow_and_publishes_the_experiment() -> None:
    control, treatment = _dataset()
    result = CliRunner().invoke(
        app,
        ["run", control, treatment, "--dataset", "abflow", "--name", "unpopular first"]
        + ["--days", "3", "--users-per-day", "100", "--pre-days", "1", "--session-length", "3"],
    )
    assert result.exit_code == 0, result.output
    assert "| ctr | abflow-unpop |" in result.output and "SRM:" in result.output
    path = PathsConfig().warehouse
    experiments = data.ab_experiments(path).filter(pl.col("name") == "unpopular first")
    assert experiments.height == 1
    row = experiments.row(0, named=True)
    assert row["control"] == "abflow-pop" and row["arms"] == ["abflow-pop", "abflow-unpop"]
    assert row["dataset"] == "abflow"
    eid = row["experiment_id"]
    ctr = data.ab_comparisons(path, eid).filter(pl.col("metric") == "ctr").row(0, named=True)
    means = data.ab_metrics(path, eid).filter(pl.col("metric") == "ctr")
    by_arm = dict(zip(means["arm"], means["mean"], strict=True))
    assert ctr["arm"] == "abflow-unpop" and ctr["control"] == "abflow-pop"
    assert ctr["lift"] == pytest.approx(by_arm["abflow-unpop"] / by_arm["abflow-pop"] - 1)
    assert f"| ctr | abflow-unpop | {by_arm['abflow-pop']:.4g} |" in result.output  # the printed lift table
    assert data.ab_off_policy(path, row["experiment_id"])["true_value"].null_count() == 0  # synthetic truth
    run = RunLog(path).runs("ab").filter(pl.col("run_id") == row["run_id"])
    assert run["status"].to_list() == ["finished"] and run["data_version"][0] is not None


def test_bad_arguments_are_refused() -> None:
    result = CliRunner().invoke(app, ["run", "only-one:tag"])
    assert result.exit_code != 0 and "at least two arms" in result.output
    with pytest.raises(ValidationError, match="tags must be distinct"):
        ABTestFlowConfig(tags=("a:1", "a:1"))
    secret = ABTestFlowConfig.quick(api_key="s3cret").model_dump_json()
    assert "s3cret" not in secret  # the key is never recorded with the flow's parameters
