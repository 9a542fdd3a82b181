"""The column and example flags of `recsys features build` and `recsys pipeline`: typed, checked up front."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recsys.flows.build_features import app as features_app
from recsys.flows.cli import app as cli_app
from recsys.flows.options import dataset_name_for, event_schema_from_flags, feature_config_from_flags

runner = CliRunner()


def test_flags_become_the_typed_configs() -> None:
    schema = event_schema_from_flags("visitor", "product", "when", "iso8601", "action")
    assert (schema.user_id, schema.item_id, schema.timestamp, schema.event, schema.value) == (
        "visitor",
        "product",
        "when",
        "action",
        None,
    )
    cfg = feature_config_from_flags(
        examples="implicit", negatives=8, sampling="uniform", positive_events="buy, cart"
    )
    assert cfg.examples == "implicit" and cfg.implicit.negatives == 8 and cfg.implicit.sampling == "uniform"
    assert cfg.implicit.positive_events == ("buy", "cart")
    assert feature_config_from_flags() == type(cfg)()  # no flags: the defaults, so cache keys do not move


@pytest.mark.parametrize(
    ("name", "dataset"),
    [("clicks.csv", "clicks"), ("my-shop.events.csv.gz", "my_shop"), ("2024.parquet", "d_2024")],
)
def test_the_dataset_is_named_after_the_file(name: str, dataset: str) -> None:
    assert dataset_name_for(Path("/data") / name) == dataset


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--sampling", "random"], "sampling"),
        (["--examples", "clicks"], "examples"),
        (["--time-format", "seconds"], "timestamp_format"),
        (["--user-col", "id", "--item-col", "id"], "must be different columns"),
    ],
)
def test_bad_flags_name_the_field_before_anything_runs(argv: list[str], field: str, tmp_path: Path) -> None:
    events = tmp_path / "clicks.csv"
    events.write_text("user_id,item_id,timestamp\n")
    for app, command in ((features_app, ["build"]), (cli_app, ["pipeline"])):
        result = runner.invoke(app, [*command, "--events", str(events), *argv])
        assert result.exit_code == 2, result.output
        text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # rich's error box, unwrapped
        assert field in text, result.output


def test_an_unknown_served_ranker_is_refused_before_anything_runs(tmp_path: Path) -> None:
    events = tmp_path / "clicks.csv"
    events.write_text("user_id,item_id,timestamp\n")
    result = runner.invoke(cli_app, ["pipeline", "--events", str(events), "--ranker", "gpt"])
    assert result.exit_code == 2, result.output
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())
    assert "ranker: unknown ranking model 'gpt'" in text, result.output
