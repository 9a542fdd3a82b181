"""The offline bento build: pyproject pins, no lock step, pinned model tags baked into the bento."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import bentoml
import yaml

from recsys.core.environment import state_dir
from recsys.serving.build import build_bento, effective_bentofile, pinned_requirements
from recsys.serving.service import ServingConfig
from tests.serving.test_service import train_and_register

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_requirements_are_the_pyproject_pins() -> None:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        pins = tomllib.load(f)["project"]["dependencies"]
    assert pinned_requirements() == pins and any(p.startswith("bentoml==") for p in pins)


def test_bento_is_built_offline_with_pinned_models_and_packages() -> None:
    models = train_and_register()
    name = models.retriever.split(":")[0]
    options = effective_bentofile(ServingConfig(retriever=f"{name}:latest", api_key="secret"))
    assert options["python"]["lock_packages"] is False  # no network resolution step
    assert options["models"] == [models.retriever]  # latest resolved to the concrete version
    envs = {e["name"]: e["value"] for e in options["envs"]}
    assert envs["RECSYS_SERVING_RETRIEVER"] == models.retriever and "RECSYS_SERVING_BUILD_TIME" in envs
    assert "RECSYS_SERVING_API_KEY" not in envs  # secrets are never baked in

    tag = build_bento(ServingConfig(retriever=f"{name}:latest"), version="test-build")
    assert tag == "recsys-recommender:test-build"
    bento = bentoml.get(tag)
    root = Path(bento.path)
    info = yaml.safe_load((root / "bento.yaml").read_text())
    assert [m["tag"] for m in info["models"]] == [models.retriever]
    assert (root / "src" / "recsys" / "serving" / "service.py").exists()
    assert not (root / "src" / "tests").exists()
    requirements = (root / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert set(pinned_requirements()) <= set(requirements)
    assert not (root / "env" / "python" / "requirements.lock.txt").exists()
    # Staged in an owned temp under RECSYS_HOME (a killed build leaves only what the start-up sweep removes),
    # and nothing staged is left behind, in BentoML's own tmp dir or ours.
    bentoml_tmp = Path(os.environ["BENTOML_HOME"]) / "tmp"
    assert not list(bentoml_tmp.glob("bentoml_bento_*"))
    assert not list((state_dir() / "tmp").glob(".bento-build.*"))


def test_cli_registers_weights_with_the_warehouse_catalogue(tmp_path: Path) -> None:
    import json

    import polars as pl
    import torch
    from typer.testing import CliRunner

    from recsys.models.registry import build_model
    from recsys.serving.build import app
    from recsys.serving.registry import load_model
    from recsys.training.checkpoint import save_weights
    from recsys.warehouse import Warehouse

    warehouse = tmp_path / "wh.duckdb"
    with Warehouse(warehouse) as wh:
        wh.publish("cli.item_index", pl.DataFrame({"item_id": [70, 80, 90], "item_idx": [1, 2, 3]}))
        wh.publish("cli.events", pl.DataFrame({"user_id": [1, 1], "item_id": [90, 70], "ts": [5, 6]}))
        wh.publish(
            "cli.sequences",
            pl.DataFrame({"user_id": [1], "user_idx": [1], "item_idx": [[3, 1]], "ts": [[5, 6]]}),
        )
    torch.manual_seed(0)
    model = build_model("hstu", num_items=3, max_len=8, embedding_dim=8, dqk=8, dv=8)
    save_weights(model, tmp_path / "best.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.model_dump(mode="json")))
    (tmp_path / "metrics.json").write_text(json.dumps({"ndcg@10": 0.5}))
    result = CliRunner().invoke(
        app,
        [
            "register", "--name", "cli-hstu", "--architecture", "hstu", "--dataset", "cli",
            "--weights", str(tmp_path / "best.safetensors"), "--config", str(tmp_path / "config.json"),
            "--metrics", str(tmp_path / "metrics.json"), "--warehouse", str(warehouse),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    loaded = load_model(result.output.strip())
    assert loaded.card.metrics == {"ndcg@10": 0.5} and loaded.histories[1][0].tolist() == [90, 70]
    assert loaded.catalog.popularity[1:].tolist() == [1.0, 0.0, 1.0]
    torch.testing.assert_close(loaded.module.state_dict(), model.state_dict())
