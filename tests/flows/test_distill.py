"""The teacher-student flow: its tasks through ``.fn`` (the data version, the cache key, the artifact text)
and one real run, whose second call comes back from the pipeline's stage cache (a warehouse record written
in one transaction) without training anything, and which leaves nothing in Prefect's result storage."""

from __future__ import annotations

from pathlib import Path

from prefect.settings import get_current_settings

from recsys.experiments.distillation import TeacherStudentConfig, TeacherStudentSummary
from recsys.flows import stage_cache
from recsys.flows.distill import STAGE, artifact_markdown, prepare, summary_key, teacher_student_flow
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


def test_cache_key_follows_config_and_data() -> None:
    key = summary_key(CONFIG, "v1")
    assert key == summary_key(CONFIG.model_copy(), "v1")
    assert key != summary_key(CONFIG, "v2")
    assert key != summary_key(CONFIG.model_copy(update={"student_len": 16}), "v1")


def _prefect_results() -> set[Path]:
    storage = Path(get_current_settings().results.local_storage_path)
    return {p for p in storage.rglob("*") if p.is_file()} if storage.exists() else set()


def test_flow_runs_publishes_and_caches(tmp_path: Path) -> None:
    home = tmp_path / "home"
    version = prepare.fn(CONFIG, home)
    with Warehouse(home / "warehouse.duckdb", read_only=True) as wh:
        assert wh.version("syn_flow.examples") == version

    prefect_results = _prefect_results()
    summary = teacher_student_flow(CONFIG, home)
    assert summary.dataset == "syn_flow" and summary.data_version == version
    assert set(summary.auc) == {"teacher", "student_distilled", "student_plain", "baseline"}
    assert summary.flops_ratio < 1.0 and summary.goal_line.startswith("Goal (95%")
    assert summary.report_path is not None and summary.report_path.exists()
    markdown = artifact_markdown(summary)
    assert summary.table in markdown and summary.goal_line in markdown

    # The summary is cached as the stage cache's record (one DuckDB transaction, atomic under kill -9), and
    # Prefect persisted no result (its records are written in place: a kill can leave one truncated).
    assert _prefect_results() == prefect_results
    record = stage_cache.lookup(home / "warehouse.duckdb", STAGE, summary_key(CONFIG, version))
    assert record is not None and TeacherStudentSummary.model_validate(record) == summary

    runs = RunLog(home / "warehouse.duckdb")
    n_runs = runs.runs().height
    again = teacher_student_flow(CONFIG, home)  # the stored summary: nothing is trained or recorded
    assert again == summary
    assert runs.runs().height == n_runs
    assert _prefect_results() == prefect_results
