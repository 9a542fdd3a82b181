"""Prefect flow: teacher -> student distillation for serving (``recsys.experiments.distillation``).

Thin wrapper: the logic lives in ``experiments.distillation`` and ``training.distillation``. Tasks:

- ``prepare``: the dataset and its point-in-time examples (``experiments.ranking.prepare_data``, which skips
  unchanged builds through the warehouse lineage); returns the examples version.
- ``teacher_student``: the whole comparison; cached on the hash of (config, examples version) in the
  pipeline's own stage cache (``recsys.flows.stage_cache``: one warehouse transaction, so a ``kill -9``
  leaves either the whole record or none), never in Prefect's persisted results, which are written in
  place and could be left truncated. A re-run with nothing changed returns the stored summary without
  loading any data. Inside, the teacher scores are skipped when ``<ds>.teacher_scores`` is fresh and
  finished model runs come back from their content-keyed checkpoints, so even a cache miss retrains
  nothing that did not change.
- ``publish_artifact``: the table and the goal line as a Prefect markdown artifact.

No task retries: nothing here is network I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

import recsys.core  # noqa: F401  (telemetry off, Prefect home) before Prefect starts its server
from recsys.core.config import PathsConfig
from recsys.experiments.distillation import TeacherStudentConfig, TeacherStudentSummary, run_teacher_student
from recsys.experiments.ranking import prepare_data
from recsys.flows import stage_cache

# The record's stage name in ``main.pipeline_stages`` (the pipeline's own distill stage is "distill").
STAGE = "teacher-student"


def _say() -> Callable[[str], None]:
    """The run logger inside a flow; the module logger when a task's ``.fn`` is called directly."""
    try:
        return get_run_logger().info
    except MissingContextError:
        return logging.getLogger(__name__).info


@task
def prepare(config: TeacherStudentConfig, home: Path) -> str:
    """Ingest / generate the dataset and build its examples; returns the examples version."""
    data, _ = prepare_data(PathsConfig(home=home), config.ranking_config(), _say())
    return data.data_version


def summary_key(config: TeacherStudentConfig, data_version: str) -> str:
    """Cache key: the config and the examples version (the record lives in that home's own warehouse)."""
    return stage_cache.stage_key(STAGE, config, data_version)


# No Prefect cache and no persisted result: the stage cache below is the only one.
@task(cache_policy=NO_CACHE, persist_result=False)
def teacher_student(config: TeacherStudentConfig, home: Path, data_version: str) -> TeacherStudentSummary:
    """The comparison (``run_teacher_student``), or its stored summary when (config, data_version) has one."""
    paths = PathsConfig(home=home)
    key = summary_key(config, data_version)
    cached = stage_cache.lookup(paths.warehouse, STAGE, key)
    if cached is not None:
        _say()(f"teacher-student: unchanged config and examples (key {key}), stored summary reused")
        return TeacherStudentSummary.model_validate(cached)
    start = time.perf_counter()
    result = run_teacher_student(config, paths, echo=_say())
    if result.data.data_version != data_version:
        raise RuntimeError(
            f"the examples changed during the run ({data_version} -> {result.data.data_version}); run again"
        )
    summary = result.summary()
    # Stored only once the comparison has finished: an interrupted run leaves no record and runs again.
    stage_cache.store(
        paths.warehouse, STAGE, key, summary.model_dump(mode="json"), time.perf_counter() - start
    )
    return summary


def artifact_markdown(summary: TeacherStudentSummary) -> str:
    return (
        f"# Teacher -> student distillation: {summary.dataset}\n\n"
        f"Examples version `{summary.data_version}`; teacher {summary.teacher}; student {summary.student}; "
        f"seeds {', '.join(map(str, summary.seeds))}.\n\n{summary.table}\n\n{summary.goal_line}\n\n"
        f"Report: `{summary.report_path}`\n"
    )


@task
def publish_artifact(summary: TeacherStudentSummary) -> None:
    create_markdown_artifact(
        key=f"distill-{summary.dataset.replace('_', '-').lower()}",
        markdown=artifact_markdown(summary),
        description=f"Teacher -> student distillation on {summary.dataset}",
    )


@flow(name="teacher-student", log_prints=False)
def teacher_student_flow(config: TeacherStudentConfig, home: Path | None = None) -> TeacherStudentSummary:
    """Prepare the data, run the teacher -> student comparison, publish the artifact; returns the summary."""
    home = Path(home or PathsConfig().home)
    data_version = prepare(config, home)
    summary = teacher_student(config, home, data_version)
    publish_artifact(summary)
    _say()(summary.goal_line)
    return summary
