"""The teacher-student flow: its tasks through ``.fn`` (the data version, the cache key, the artifact text)
and one real run, whose second call comes back from the task cache without training anything."""

from __future__ import annotations

from pathlib import Path

from recsys.experiments.distillation import TeacherStudentConfig
from recsys.flows.distill import _summary_key, artifact_markdown, prepare, teacher_student_flow
from recsys.synthetic.config import CatalogueConfig, SessionConfig, SyntheticConfig, UserConfig
from recsys.training.loop import LoopConfig
from recsys.training.ranking import RankingDataConfig, RankingTrainConfig
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog
from tests.fixtures import one_thread  # noqa: F401  (autouse fixture: one torch thread)

TINY = SyntheticConfig(
    seed=6,
    catalogue=CatalogueConfig(n_items=120, n_categories=4, n_creators=15),
    users=UserConfig(n_users=25),
    sessions=SessionConfig(requests_per_user_mean=20, horizon_days=15, slate_size=5, pool_size=10),
)
CONFIG = TeacherStudentConfig(
    dataset="syn_flow",
    synthetic=TINY,
    data=RankingDataConfig(max_train_examples=250, max_valid_examples=100, max_test_examples=120),
    teacher_len=16,
    student_len=8,
    baseline_len=8,
    seeds=(0,),
    train=RankingTrainConfig(batch_size=64, flop_examples=32),
    loop=LoopConfig(monitor="auc", max_epochs=1, patience=1, progress=False),
    latency_candidates=32,
    latency_repeats=1,
)


def test_cache_key_follows_config_data_and_home(tmp_path: Path) -> None:
    params = {"config": CONFIG, "home": tmp_path, "data_version": "v1"}
    key = _summary_key(None, params)  # type: ignore[arg-type]
    assert key == _summary_key(None, dict(params))  # type: ignore[arg-type]
    assert key != _summary_key(None, params | {"data_version": "v2"})  # type: ignore[arg-type]
    assert key != _summary_key(None, params | {"home": tmp_path / "other"})  # type: ignore[arg-type]
    changed = CONFIG.model_copy(update={"student_len": 16})
    assert key != _summary_key(None, params | {"config": changed})  # type: ignore[arg-type]


def test_flow_runs_publishes_and_caches(tmp_path: Path) -> None:
    home = tmp_path / "home"
    version = prepare.fn(CONFIG, home)
    with Warehouse(home / "warehouse.duckdb", read_only=True) as wh:
        assert wh.version("syn_flow.examples") == version

    summary = teacher_student_flow(CONFIG, home)
    assert summary.dataset == "syn_flow" and summary.data_version == version
    assert set(summary.auc) == {"teacher", "student_distilled", "student_plain", "baseline"}
    assert summary.flops_ratio < 1.0 and summary.goal_line.startswith("Goal (95%")
    assert summary.report_path is not None and summary.report_path.exists()
    markdown = artifact_markdown(summary)
    assert summary.table in markdown and summary.goal_line in markdown

    runs = RunLog(home / "warehouse.duckdb")
    n_runs = runs.runs().height
    again = teacher_student_flow(CONFIG, home)  # the cached task result: nothing is trained or recorded
    assert again == summary
    assert runs.runs().height == n_runs
