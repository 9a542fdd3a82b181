"""The pipeline's package stage serves the distilled student as the bento's ranker.

Stage functions are called through ``.fn`` (no Prefect API to start). One real teacher -> student run on the
tiny synthetic config of ``tests/flows/test_distill.py`` gives the distill record; the retrieval record points
at a SASRec checkpoint of the same dataset (untrained: packaging does not care how good it is). After
``package_stage`` the store holds ``<dataset>-ranker:latest`` (task ranking, the student's architecture and
weights), the bento pins it, and a ``Recommender`` built from the bento's configuration answers recommend and
rank with it. Without the distill stage the bento has no ranker. With ``ranker="hstu-ranker"`` the ranking
stage's run of the generative ranker (trained here through the stage's own experiment config on the same
data) is packaged instead, and the service scores ``/rank`` and ``/recommend`` through M-FALCON.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import pytest
import torch
import yaml
from safetensors.torch import load_file

from recsys.core.config import PathsConfig
from recsys.core.hashing import file_sha256
from recsys.experiments.distillation import ServedStudent, TeacherStudentResult, run_teacher_student
from recsys.experiments.ranking import run_ranking_experiment
from recsys.flows.build_features import DatasetSpec
from recsys.flows.package import register_distilled_ranker, register_trained_ranker
from recsys.flows.pipeline import (
    STAGES,
    PipelineConfig,
    PipelineResult,
    RankingStageConfig,
    _needed,
    distill_record,
    package_key,
    package_stage,
    served_ranker_record,
    summary_markdown,
)
from recsys.models.registry import build_model, model_config
from recsys.serving.registry import load_model, resolve
from recsys.serving.schemas import RankRequest, RecommendRequest
from recsys.serving.service import Recommender, ServingConfig
from recsys.training.checkpoint import save_weights, weights_path
from recsys.training.loop import LoopConfig
from recsys.training.ranking import RankingTrainConfig
from recsys.warehouse import Warehouse
from tests.flows.test_distill import CONFIG as TINY_DISTILL

DATASET = "syn_pkg"  # its own store names (syn-pkg-*): the BentoML store is shared by the test session
PIPELINE = PipelineConfig(dataset=DatasetSpec(kind="synthetic", name=DATASET))
RETRIEVAL_LEN = 16
TS = 2_000_000_000  # after every event of the tiny data
GENERATIVE = PIPELINE.model_copy(
    update={
        "ranker": "hstu-ranker",
        "ranking": RankingStageConfig(
            models=("hstu-ranker",),
            long_len=16,
            data=TINY_DISTILL.data,
            train=RankingTrainConfig(batch_size=64, flop_examples=32),
            loop=LoopConfig(monitor="auc", max_epochs=1, patience=1, progress=False),
        ),
    }
)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The pipeline's state directory: the stages read ``PathsConfig()``, i.e. ``RECSYS_HOME``."""
    root = tmp_path_factory.mktemp("pipeline-package")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECSYS_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def distilled(home: Path) -> TeacherStudentResult:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TINY_DISTILL.model_copy(update={"dataset": DATASET})
        return run_teacher_student(config, PathsConfig(home=home), echo=None)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def retrieval(home: Path, distilled: TeacherStudentResult) -> dict[str, Any]:
    """A retrieval stage record whose best model is a SASRec checkpoint over the dataset's catalogue."""
    with Warehouse(home / "warehouse.duckdb", read_only=True) as wh:
        num_items = int(wh.sql(f"SELECT count(*) AS n FROM {DATASET}.item_index")[0, 0])
    torch.manual_seed(0)
    model = build_model("sasrec", model_config("sasrec", num_items=num_items, max_len=RETRIEVAL_LEN))
    checkpoint = home / "artifacts" / "retrieval" / DATASET / "sasrec" / "run"
    save_weights(model, weights_path(checkpoint, "best"))
    return {
        "best": "sasrec",
        "models": {
            "sasrec": {
                "checkpoint": str(checkpoint),
                "test": {"ndcg@10": 0.1},
                "model_config": model.config.model_dump(mode="json"),
                "temperature": 0.05,
            }
        },
        "num_items": num_items,
        "max_len": RETRIEVAL_LEN,
    }


@pytest.fixture(scope="module")
def generative(home: Path, distilled: TeacherStudentResult) -> dict[str, Any]:
    """The ranking stage's record with the served generative ranker: the stage's experiment on the
    distilled fixture's dataset (its examples already built), one tiny epoch."""
    result = run_ranking_experiment(GENERATIVE.ranking_experiment(), PathsConfig(home=home))
    return {"served_ranker": served_ranker_record(result, "hstu-ranker")}


def _bento_config(tag: str) -> ServingConfig:
    """The ServingConfig the bento runs with: its baked-in ``RECSYS_SERVING_*`` environment."""
    info = yaml.safe_load((Path(bentoml.get(tag).path) / "bento.yaml").read_text())
    return ServingConfig.from_env({e["name"]: e["value"] for e in info["envs"]})


def test_the_distill_record_names_the_first_seeds_student(distilled: TeacherStudentResult) -> None:
    record = distill_record(distilled.summary())
    student = ServedStudent.model_validate(record["student"])
    assert student.architecture == TINY_DISTILL.student and student.seed == TINY_DISTILL.seeds[0]
    assert student.max_len == TINY_DISTILL.student_len and student.dataset == DATASET
    assert student.data == TINY_DISTILL.data and student.data_version == distilled.data.data_version
    assert student.weights.exists() and student.weights_sha256 == file_sha256(student.weights)
    assert student.test["auc"] == pytest.approx(distilled.roles["student_distilled"].test[0]["auc"])


def test_package_serves_the_distilled_student_as_ranker(
    home: Path, distilled: TeacherStudentResult, retrieval: dict[str, Any]
) -> None:
    distill = distill_record(distilled.summary())
    student = ServedStudent.model_validate(distill["student"])
    package = package_stage.fn(PIPELINE, retrieval, distill)

    assert package["ranker"] == resolve("syn-pkg-ranker:latest")
    assert package["ranker_architecture"] == student.architecture
    ranker = load_model("syn-pkg-ranker:latest")
    assert ranker.card.task == "ranking" and ranker.card.architecture == student.architecture
    assert ranker.card.model_config_json == student.model_config_json
    assert ranker.card.data_version == student.data_version
    weights = load_file(str(student.weights))
    for name, tensor in ranker.module.state_dict().items():
        assert torch.equal(tensor, weights[name]), name  # the distilled student's own weights

    config = _bento_config(package["bento"])
    assert config.ranker == package["ranker"] and config.retriever == package["served"]
    engine = Recommender.from_config(config.model_copy(update={"policy_temperature": 0.0}))
    try:
        user = max(engine.histories, key=lambda u: len(engine.histories[u][0]))
        recommended = engine.recommend(RecommendRequest(user_id=user, k=5, ts=TS))
        assert recommended.source == "ranker" and len(recommended.items) == 5
        scores = [it.score for it in recommended.items]
        assert scores == sorted(scores, reverse=True)
        candidates = [int(i) for i in ranker.catalog.item_ids[1:11]]
        ranked = engine.rank(RankRequest(user_id=user, candidates=candidates, ts=TS))
        assert ranked.source == "ranker" and set(ranked.scores) == set(distilled.data.tasks)
        assert sorted(ranked.ranking) == sorted(candidates)
    finally:
        engine.close()


def test_without_the_distill_stage_the_bento_has_no_ranker(home: Path, retrieval: dict[str, Any]) -> None:
    config = PIPELINE.model_copy(update={"stages": tuple(s for s in STAGES if s != "distill")})
    package = package_stage.fn(config, retrieval, None)
    assert package["ranker"] is None and package["ranker_architecture"] is None
    serving = _bento_config(package["bento"])
    assert serving.ranker is None and serving.retriever == package["served"]
    assert [str(m.tag) for m in bentoml.get(package["bento"]).info.models] == [package["served"]]


def test_the_package_key_follows_the_distilled_student(retrieval: dict[str, Any]) -> None:
    student = {"architecture": "rankmixer", "weights_sha256": "a" * 64}
    key = package_key(DATASET, retrieval, {"student": student, "auc": {"teacher": 0.7}})
    assert key == package_key(DATASET, retrieval, {"student": dict(student), "auc": {"teacher": 0.6}})
    assert key != package_key(DATASET, retrieval, {"student": student | {"weights_sha256": "b" * 64}})
    without = package_key(DATASET, retrieval, None)
    assert key != without and without == package_key(DATASET, retrieval, {"student": None})


def test_a_changed_student_checkpoint_is_refused(home: Path, distilled: TeacherStudentResult) -> None:
    record = distill_record(distilled.summary())["student"]
    student = ServedStudent.model_validate(record | {"weights_sha256": "0" * 64})
    with pytest.raises(ValueError, match="weights_sha256"):
        register_distilled_ranker(home / "warehouse.duckdb", student, store="syn-pkg-refused")


def test_the_summary_report_names_the_served_ranker() -> None:
    package = {
        "retriever": "ds-sasrec:v-1",
        "served": "ds-retriever:v-1",
        "control": "ds-popularity:v-2",
        "ranker": "ds-ranker:v-3",
        "ranker_architecture": "rankmixer",
        "bento": "recsys-recommender:abc",
    }
    result = PipelineResult(dataset="ds", features={}, stages={"package": package})
    text = summary_markdown(result)
    assert "serves retriever `ds-retriever:v-1` and ranker `ds-ranker:v-3`" in text
    assert "distilled student (rankmixer)" in text
    bare = PipelineResult(dataset="ds", features={}, stages={"package": package | {"ranker": None}})
    assert "and no ranker" in summary_markdown(bare)


def test_the_serve_hint_names_a_real_user_in_the_users_own_ids(tmp_path: Path) -> None:
    import polars as pl

    from recsys.flows.pipeline import example_user
    from recsys.warehouse import Warehouse

    path = tmp_path / "warehouse.duckdb"
    with Warehouse(path) as wh:
        wh.publish("shop.user_ids", pl.DataFrame({"raw_id": ["u_0042", "u_0007"], "user_id": [2, 1]}))
        wh.publish("ml.user_index", pl.DataFrame({"user_id": [5, 3], "user_idx": [2, 1]}))
    assert example_user(path, "shop") == '"u_0007"'
    assert example_user(path, "ml") == "3"
    assert example_user(path, "other") == "1"


def test_the_served_ranker_is_trained_by_the_ranking_stage() -> None:
    config = PIPELINE.model_copy(update={"ranker": "hstu-ranker"})
    assert config.ranking_stage_config().models == (*PIPELINE.ranking.models, "hstu-ranker")
    assert config.ranking_experiment().models == (*PIPELINE.ranking.models, "hstu-ranker")
    assert PIPELINE.ranking_stage_config() == PIPELINE.ranking  # the default is unchanged
    # Packaging the chosen ranker needs the ranking stage's record, even when "ranking" is not in stages.
    assert _needed("ranking", ("features", "package"), "hstu-ranker")
    assert not _needed("ranking", ("features", "package"))
    with pytest.raises(ValueError, match="ranker: unknown ranking model 'gpt'"):
        PipelineConfig(ranker="gpt")


def test_package_serves_the_generative_ranker_through_mfalcon(
    home: Path, retrieval: dict[str, Any], generative: dict[str, Any], distilled: TeacherStudentResult
) -> None:
    run = ServedStudent.model_validate(generative["served_ranker"])
    assert run.architecture == "hstu-ranker" and run.seed == 0 and run.max_len == 16
    assert run.weights_sha256 == file_sha256(run.weights)
    # The distill stage's student is there too; the chosen ranker wins.
    package = package_stage.fn(GENERATIVE, retrieval, distill_record(distilled.summary()), generative)
    assert package["ranker"] == resolve("syn-pkg-ranker:latest")
    assert package["ranker_architecture"] == "hstu-ranker" and package["ranker_source"] == "ranking"
    ranker = load_model("syn-pkg-ranker:latest")
    assert ranker.card.task == "ranking" and ranker.card.architecture == "hstu-ranker"
    weights = load_file(str(run.weights))
    for name, tensor in ranker.module.state_dict().items():
        assert torch.equal(tensor, weights[name]), name

    config = _bento_config(package["bento"])
    assert config.ranker == package["ranker"] and config.retriever == package["served"]
    engine = Recommender.from_config(config.model_copy(update={"policy_temperature": 0.0}))
    try:
        user = max(engine.histories, key=lambda u: len(engine.histories[u][0]))
        candidates = [int(i) for i in ranker.catalog.item_ids[1:21]]
        ranked = engine.rank(RankRequest(user_id=user, candidates=candidates, ts=TS))
        body = ranked.model_dump(mode="json")
        assert body["source"] == "ranker" and body["scored_by"] == "m-falcon"
        assert sorted(ranked.ranking) == sorted(candidates) and set(ranked.scores) == set(
            distilled.data.tasks
        )
        recommended = engine.recommend(RecommendRequest(user_id=user, k=5, ts=TS))
        assert recommended.source == "ranker" and recommended.scored_by == "m-falcon"
    finally:
        engine.close()
    text = summary_markdown(PipelineResult(dataset=DATASET, features={}, stages={"package": package}))
    assert f"ranker `{package['ranker']}`, the ranking stage's hstu-ranker" in text


def test_without_a_trained_run_the_chosen_ranker_is_refused(home: Path, retrieval: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="ranker: the ranking stage left no trained 'hstu-ranker'"):
        package_stage.fn(GENERATIVE, retrieval, None, None)


def test_the_package_key_follows_the_chosen_rankers_run(retrieval: dict[str, Any]) -> None:
    run = {"architecture": "hstu-ranker", "weights_sha256": "a" * 64}
    key = package_key(DATASET, retrieval, None, {"served_ranker": run}, "hstu-ranker")
    assert key == package_key(
        DATASET, retrieval, {"student": {"x": 1}}, {"served_ranker": run}, "hstu-ranker"
    )
    changed = {"served_ranker": run | {"weights_sha256": "b" * 64}}
    assert key != package_key(DATASET, retrieval, None, changed, "hstu-ranker")
    assert key != package_key(DATASET, retrieval, None, None)


def test_a_changed_ranking_checkpoint_is_refused(home: Path, generative: dict[str, Any]) -> None:
    run = ServedStudent.model_validate(generative["served_ranker"] | {"weights_sha256": "0" * 64})
    with pytest.raises(ValueError, match="served_ranker.weights_sha256"):
        register_trained_ranker(home / "warehouse.duckdb", run, store="syn-pkg-refused")
