"""The main job: one Prefect flow that runs every stage that exists, with a subflow per stage.

Stages today: ingest/generate -> features (sequences, point-in-time examples, splits, exports) -> retrieval
models (popularity, SASRec, HSTU) trained and evaluated under the leave-one-out protocol. Each stage skips
work whose inputs did not change (warehouse lineage for tables, content-keyed checkpoints for models), so a
second run with nothing changed is mostly reads.

Profiles: ``quick`` (the default; the whole loop on 2 CPU cores in minutes, one seed, capped epochs) and
``full`` (the protocol's 3 seeds and paper-grade epoch budgets).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

import core  # noqa: F401  (telemetry off, Prefect start-up timeout)
from core.config import FrozenModel, PathsConfig
from experiments.retrieval import RetrievalExperimentConfig, format_table, run_retrieval_experiment
from features.config import FeatureConfig
from flows.build_features import DatasetSpec, build_features_flow
from training.loop import LoopConfig

Profile = Literal["quick", "full"]


class PipelineConfig(FrozenModel):
    """Everything one pipeline run depends on; recorded with every run it produces."""

    profile: Profile = "quick"
    dataset: DatasetSpec = DatasetSpec(kind="synthetic")
    features: FeatureConfig = FeatureConfig()
    retrieval_models: tuple[str, ...] = ("popularity", "sasrec", "hstu")
    seeds: tuple[int, ...] = (0,)
    retrieval_loop: LoopConfig = LoopConfig(max_epochs=10, patience=3, progress=False)

    @classmethod
    def for_profile(
        cls, profile: Profile, dataset: DatasetSpec | None = None, **overrides: Any
    ) -> PipelineConfig:
        """The quick profile trades epochs and seeds for minutes; full follows the evaluation protocol."""
        base: dict[str, Any] = {"profile": profile, "dataset": dataset or DatasetSpec(kind="synthetic")}
        if profile == "full":
            base |= {
                "retrieval_models": ("popularity", "sasrec", "hstu", "hstu-large"),
                "seeds": (0, 1, 2),
                "retrieval_loop": LoopConfig(max_epochs=200, patience=20, progress=False),
            }
        return cls(**(base | overrides))


class PipelineResult(FrozenModel):
    dataset: str
    features: dict[str, Any]
    retrieval_table: str
    retrieval_report: Path | None
    stage_seconds: dict[str, float] = Field(default_factory=dict)


@flow(name="retrieval-stage", log_prints=False)
def retrieval_stage(config: PipelineConfig) -> tuple[str, Path | None]:
    experiment = RetrievalExperimentConfig(
        dataset=config.dataset.dataset,
        models=config.retrieval_models,
        seeds=config.seeds,
        loop=config.retrieval_loop,
        train={"max_len": config.features.max_seq_len},
        comparisons=(("hstu", "sasrec"),) if {"hstu", "sasrec"} <= set(config.retrieval_models) else (),
    )
    log = get_run_logger()
    result = run_retrieval_experiment(experiment, echo=log.info)
    table = format_table(result)
    create_markdown_artifact(
        key=f"retrieval-{config.dataset.dataset.replace('_', '-').lower()}",
        markdown=f"# Retrieval on {config.dataset.dataset}\n\n{table}\n",
        description="Leave-one-out, full ranking over all items, history excluded",
    )
    return table, result.report_path


@flow(name="recsys-pipeline", log_prints=False)
def pipeline_flow(config: PipelineConfig) -> PipelineResult:
    """Run every stage in order; each is a subflow with its own artifact in the Prefect UI."""
    log = get_run_logger()
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    features = build_features_flow(config.dataset, config.features)
    seconds["features"] = time.perf_counter() - start

    start = time.perf_counter()
    table, report = retrieval_stage(config)
    seconds["retrieval"] = time.perf_counter() - start

    log.info("pipeline finished: %s", {k: round(v, 1) for k, v in seconds.items()})
    return PipelineResult(
        dataset=config.dataset.dataset,
        features=features,
        retrieval_table=table,
        retrieval_report=report,
        stage_seconds=seconds,
    )


def describe(result: PipelineResult, paths: PathsConfig | None = None) -> str:
    """What a newcomer needs after the run: where the results are and what to open next."""
    paths = paths or PathsConfig()
    lines = [
        f"Pipeline finished on dataset '{result.dataset}'.",
        "Stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.stage_seconds.items()),
        "",
        result.retrieval_table,
        "",
        f"Warehouse (tables, lineage, runs): {paths.warehouse}",
        f"Parquet exports:                  {paths.exports}",
        f"Model checkpoints:                {paths.artifacts}",
    ]
    if result.retrieval_report is not None:
        lines.append(f"Retrieval report:                 {result.retrieval_report}")
    lines.append("List the recorded runs with:       .venv/bin/recsys runs")
    return "\n".join(lines)
