"""The main job: one Prefect flow that runs the whole loop, a subflow per stage.

ingest/generate -> features -> retrieval models -> ranking models -> distillation (teacher -> student) ->
package (register the best retriever and the student ranker, build the bento) -> simulated A/B test of the
packaged arms -> a summary report and Prefect artifacts. Everything is recorded in the warehouse for the
dashboard (runs, run metrics, ab_* tables, ``main.pipeline_stages``).

Caching: the feature flow skips tables whose inputs did not change (warehouse lineage); every later stage
is keyed on a hash of its own config and the versions of what it reads (``recsys.flows.stage_cache``), so a
re-run with nothing changed skips every stage and a changed config or data version re-runs exactly the
stages downstream of it. Interrupting a run (even ``kill -9``) loses at most the stage in progress: tables
are published in transactions, files are written to temp paths and renamed, training resumes from its last
epoch checkpoint, and the stage's cache record is written only once the stage has finished.

What the Prefect UI and the terminal show: every model's training is a task of its stage (then one task
compares them, re-reading the finished checkpoints), each stage and the pipeline advance a progress
artifact, results are table artifacts (plus the markdown summary), and long steps log a heartbeat line
every 30 s (with tqdm epoch bars when the terminal is interactive). Only I/O is retried: the warehouse
writes of the stage records (``observe.IO_RETRIES``); training and evaluation never are.

Profiles: ``quick`` (the default: the whole loop on 2 CPU cores in minutes, one seed, capped epochs and
example counts) and ``full`` (the evaluation protocol's 3 seeds and paper-grade budgets).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import MissingContextError
from pydantic import Field, model_validator

import recsys.core  # noqa: F401  (telemetry off, Prefect start-up timeout)
from recsys.core.atomic import atomic_path
from recsys.core.config import FrozenModel, PathsConfig
from recsys.core.ownership import sweep_stale_temps
from recsys.features.config import FeatureConfig
from recsys.flows import stage_cache
from recsys.flows.build_features import DatasetSpec, build_features_flow
from recsys.flows.observe import IO_RETRIES, StageProgress, artifact_key, heartbeat, table_artifact
from recsys.ingest.schema import check_dataset
from recsys.training.loop import LoopConfig, OptimizerConfig
from recsys.training.presets import QUICK_RETRIEVAL_LOOP
from recsys.training.ranking import RankingDataConfig, RankingTrainConfig
from recsys.training.retrieval import RetrievalTrainConfig
from recsys.warehouse import Warehouse

if TYPE_CHECKING:
    from recsys.experiments.distillation import TeacherStudentSummary

Profile = Literal["quick", "full"]
TITLES = {
    "retrieval": "Retrieval (leave-one-out, test)",
    "ranking": "Ranking (temporal split, test)",
    "distill": "Distillation (teacher -> student)",
    "ab": "Simulated A/B test (packaged retriever vs popularity)",
}
STAGES = ("features", "retrieval", "ranking", "distill", "package", "ab")


class RankingStageConfig(FrozenModel):
    """The ranking comparison inside the pipeline (a slice of ``RankingExperimentConfig``)."""

    models: tuple[str, ...] = ("deepfm", "rankmixer", "hyformer")
    short_len: int = Field(50, ge=1)
    long_len: int = Field(200, ge=1)
    data: RankingDataConfig = RankingDataConfig(
        max_train_examples=40_000, max_valid_examples=10_000, max_test_examples=20_000
    )
    train: RankingTrainConfig = RankingTrainConfig(batch_size=256)
    loop: LoopConfig = LoopConfig(
        monitor="auc",
        mode="max",
        max_epochs=2,
        patience=1,
        optimizer=OptimizerConfig(lr=2e-3),
        progress=False,
    )


class PipelineConfig(FrozenModel):
    """Everything one pipeline run depends on; recorded with every run it produces."""

    profile: Profile = "quick"
    dataset: DatasetSpec = DatasetSpec(kind="synthetic")
    features: FeatureConfig = FeatureConfig()
    retrieval_models: tuple[str, ...] = ("popularity", "sasrec", "hstu")
    retrieval_train: RetrievalTrainConfig = RetrievalTrainConfig()
    retrieval_loop: LoopConfig = QUICK_RETRIEVAL_LOOP
    ranking: RankingStageConfig = RankingStageConfig()
    seeds: tuple[int, ...] = (0,)
    stages: tuple[str, ...] = Field(STAGES, description="Stages to run, in pipeline order.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads for training (None: torch's default)."
    )
    distill: dict[str, Any] = Field(
        default_factory=dict,
        description="TeacherStudentConfig fields over the profile's preset (quick: its .quick()).",
    )
    ab: dict[str, Any] = Field(
        default_factory=dict,
        description="ABTestFlowConfig fields over the quick preset (arms: the package's).",
    )
    ranker: str | None = Field(
        None,
        description="The served ranker: None serves the distill stage's student; a ranking model name (e.g. "
        "hstu-ranker, scored through M-FALCON) serves that model as the ranking stage trained it (first "
        "seed), the stage training it even if ranking.models leaves it out.",
    )

    @model_validator(mode="after")
    def _check_ranker(self) -> PipelineConfig:
        if self.ranker is not None:
            from recsys.experiments.ranking import RANKING_MODELS

            if self.ranker not in RANKING_MODELS:
                raise ValueError(
                    f"ranker: unknown ranking model {self.ranker!r}; known: {sorted(RANKING_MODELS)}"
                )
        return self

    def ranking_stage_config(self) -> RankingStageConfig:
        """The ranking stage config: ``ranking``, plus the served ranker when its models leave it out."""
        if self.ranker is None or self.ranker in self.ranking.models:
            return self.ranking
        return self.ranking.model_copy(update={"models": (*self.ranking.models, self.ranker)})

    def ranking_experiment(self):  # noqa: ANN201  (experiments.ranking is imported lazily)
        """The ranking stage's experiment on this run's dataset, features and seeds."""
        from recsys.experiments.ranking import RankingExperimentConfig

        stage = self.ranking_stage_config()
        return RankingExperimentConfig(
            dataset=self.dataset.dataset,
            features=self.features,
            data=stage.data,
            models=stage.models,
            seeds=self.seeds,
            short_len=stage.short_len,
            long_len=stage.long_len,
            train=stage.train,
            loop=stage.loop.model_copy(update={"progress": _interactive()}),
            comparisons=tuple(
                pair
                for pair in (("hyformer", "rankmixer"), ("rankmixer", "deepfm"))
                if set(pair) <= set(stage.models) and len(self.seeds) > 1
            ),
        )

    def distill_config(self):  # noqa: ANN201  (experiments.distillation is imported lazily)
        """The teacher -> student comparison on this run's dataset and features."""
        from recsys.experiments.distillation import TeacherStudentConfig

        common = {"dataset": self.dataset.dataset, "features": self.features}
        if self.profile == "full":
            return TeacherStudentConfig(**(common | self.distill))
        return TeacherStudentConfig.quick(**(common | self.distill))

    @classmethod
    def for_profile(
        cls, profile: Profile, dataset: DatasetSpec | None = None, **overrides: Any
    ) -> PipelineConfig:
        """The quick profile trades epochs, seeds and examples for minutes; full follows the protocol."""
        base: dict[str, Any] = {"profile": profile, "dataset": dataset or DatasetSpec(kind="synthetic")}
        if profile == "full":
            base |= {
                "retrieval_models": ("popularity", "sasrec", "hstu", "hstu-large"),
                "seeds": (0, 1, 2),
                "retrieval_loop": LoopConfig(max_epochs=200, patience=20, progress=False),
                "ranking": RankingStageConfig(
                    models=("deepfm", "din", "rankmixer", "longer", "longer-rankmixer", "hyformer"),
                    short_len=100,
                    long_len=1_000,
                    data=RankingDataConfig(),
                    train=RankingTrainConfig(),
                    loop=LoopConfig(
                        monitor="auc",
                        mode="max",
                        max_epochs=20,
                        patience=2,
                        optimizer=OptimizerConfig(lr=2e-3),
                        progress=False,
                    ),
                ),
            }
        return cls(**(base | overrides))


class PipelineResult(FrozenModel):
    dataset: str
    features: dict[str, Any]
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    report: Path | None = None


# -- stages: each a subflow returning a JSON-able record --------------------------------------------------


def _interactive() -> bool:
    """tqdm epoch bars only where someone watches a terminal; logs get the heartbeat lines instead.

    The ranking experiment keys its checkpoint folders on the whole loop config, ``progress`` included: a
    run resumed from the other kind of terminal retrains its ranking models (retrieval's key leaves it out).
    """
    return sys.stderr.isatty()


@task(name="train-retrieval-model")
def train_retrieval_model(experiment: Any, name: str) -> dict[str, Any]:
    """One retrieval model, every seed: trains (or resumes) its checkpoints and logs its test figures."""
    from recsys.experiments.retrieval import run_retrieval_experiment

    log = get_run_logger()
    one = experiment.model_copy(update={"models": (name,), "comparisons": ()})
    with heartbeat(log, f"retrieval: training {name}"):
        result = run_retrieval_experiment(one, echo=log.info)
    first = result.runs[name][0]
    return {"model": name, "best_epoch": first.best_epoch, "train_s": first.train_time_s}


@task(name="compare-retrieval-models")
def compare_retrieval(experiment: Any) -> Any:
    """Every model side by side (finished checkpoints are re-read, not retrained), the paired tests and
    the report."""
    from recsys.experiments.retrieval import run_retrieval_experiment

    log = get_run_logger()
    with heartbeat(log, "retrieval: comparing the models"):
        return run_retrieval_experiment(experiment, echo=log.info)


@flow(name="retrieval-stage", log_prints=False)
def retrieval_stage(config: PipelineConfig) -> dict[str, Any]:
    """Train and evaluate the retrieval models; the record names each model's best checkpoint."""
    from recsys.experiments.retrieval import RetrievalExperimentConfig, format_table, serving_record

    loop = config.retrieval_loop.model_copy(update={"progress": _interactive()})
    experiment = RetrievalExperimentConfig(
        dataset=config.dataset.dataset,
        models=config.retrieval_models,
        seeds=config.seeds,
        loop=loop,
        train=config.retrieval_train.model_copy(update={"max_len": config.features.max_seq_len}),
        comparisons=(("hstu", "sasrec"),) if {"hstu", "sasrec"} <= set(config.retrieval_models) else (),
    )
    log = get_run_logger()
    ds = config.dataset.dataset
    trained = [m for m in config.retrieval_models if m != "popularity"]  # popularity has nothing to train
    progress = StageProgress(artifact_key("retrieval", ds, "progress"), len(trained) + 1, "retrieval", log)
    for name in trained:
        train_retrieval_model(experiment, name)
        progress.step(name)
    result = compare_retrieval(experiment)
    progress.step("comparison")
    table = format_table(result)
    models: dict[str, Any] = {}
    for name, runs in result.runs.items():
        first = runs[0]
        models[name] = {
            "checkpoint": str(first.fit.checkpoint_dir) if first.fit and first.fit.checkpoint_dir else None,
            "valid_ndcg@10": float(first.valid.get("ndcg@10", float("nan"))),
            "test": {k: float(v) for k, v in first.test.metrics.items()},
            "run_id": first.run_id,
            **serving_record(first, result.settings[name]),  # what packaging rebuilds and serves
        }
    learned = {k: v for k, v in models.items() if k != "popularity" and v["checkpoint"]}
    best = max(learned, key=lambda k: learned[k]["valid_ndcg@10"]) if learned else None
    table_artifact(
        artifact_key("retrieval", ds),
        [
            {"model": k, "valid ndcg@10": v["valid_ndcg@10"]} | {f"test {m}": x for m, x in v["test"].items()}
            for k, v in models.items()
        ],
        f"Retrieval on {ds}: leave-one-out, full ranking over all items, history excluded (first seed)",
    )
    create_markdown_artifact(
        key=artifact_key("retrieval", ds, "report"),
        markdown=f"# Retrieval on {ds}\n\n{table}\n",
        description="Leave-one-out, full ranking over all items, history excluded",
    )
    return {
        "table": table,
        "report": str(result.report_path) if result.report_path else None,
        "models": models,
        "best": best,
        "num_items": result.num_items,
        "max_len": experiment.train.max_len,
        "data_version": result.data_version,
    }


@task(name="train-ranking-model")
def train_ranking_model(experiment: Any, name: str) -> dict[str, Any]:
    """One ranking model, every seed: trains (or resumes) its checkpoints and logs its test figures."""
    from recsys.experiments.ranking import run_ranking_experiment

    log = get_run_logger()
    one = experiment.model_copy(update={"models": (name,), "comparisons": ()})
    with heartbeat(log, f"ranking: training {name}"):
        result = run_ranking_experiment(one, echo=log.info)
    first = result.runs[name][0]
    return {"model": name, "best_epoch": first.best_epoch, "train_s": first.train_time_s}


@task(name="compare-ranking-models")
def compare_ranking(experiment: Any) -> Any:
    """Every model side by side (finished checkpoints re-read), the paired tests and the report."""
    from recsys.experiments.ranking import run_ranking_experiment

    log = get_run_logger()
    with heartbeat(log, "ranking: comparing the models"):
        return run_ranking_experiment(experiment, echo=log.info)


@flow(name="ranking-stage", log_prints=False)
def ranking_stage(config: PipelineConfig) -> dict[str, Any]:
    """Train and evaluate the ranking models on the point-in-time examples; with ``config.ranker`` the
    record also names the served ranker's run (``served_ranker_record``)."""
    from recsys.experiments.ranking import format_table as format_ranking_table

    stage = config.ranking_stage_config()
    experiment = config.ranking_experiment()
    log = get_run_logger()
    ds = config.dataset.dataset
    progress = StageProgress(artifact_key("ranking", ds, "progress"), len(stage.models) + 1, "ranking", log)
    for name in stage.models:
        train_ranking_model(experiment, name)
        progress.step(name)
    result = compare_ranking(experiment)
    progress.step("comparison")
    table = format_ranking_table(result)
    models = {
        name: {
            "test": {k: float(v) for k, v in runs[0].test.items()},
            "run_id": runs[0].run_id,
            "max_len": runs[0].max_len,
        }
        for name, runs in result.runs.items()
    }
    table_artifact(
        artifact_key("ranking", ds),
        [
            {"model": k, "history": v["max_len"]} | {f"test {m}": x for m, x in v["test"].items()}
            for k, v in models.items()
        ],
        f"Ranking on {ds}: global temporal split; AUC over all test examples, GAUC by user (first seed)",
    )
    create_markdown_artifact(
        key=artifact_key("ranking", ds, "report"),
        markdown=f"# Ranking on {ds}\n\n{table}\n",
        description="Global temporal split; AUC over all test examples, GAUC by user",
    )
    record: dict[str, Any] = {
        "table": table,
        "report": str(result.report_path) if result.report_path else None,
        "models": models,
        "data_version": result.data.data_version,
    }
    if config.ranker is not None:
        record["served_ranker"] = served_ranker_record(result, config.ranker)
    return record


def served_ranker_record(result: Any, name: str) -> dict[str, Any] | None:
    """The first seed's run of ranking model ``name`` in a ``RankingExperimentResult``, as the package stage
    registers it (``experiments.distillation.ServedStudent``'s fields: architecture and config, best
    checkpoint and its sha256, the data config and version); None if it left no best weights."""
    from recsys.core.hashing import file_sha256
    from recsys.experiments.distillation import ServedStudent
    from recsys.experiments.ranking import build_model
    from recsys.training.checkpoint import weights_path

    run = result.runs[name][0]
    checkpoint = run.fit.checkpoint_dir if run.fit is not None else None
    if checkpoint is None or not weights_path(checkpoint, "best").exists():
        return None
    # The pipeline's ranking stage uses the presets without overrides: this rebuilds the trained config.
    _, model_config = build_model(name, result.data, run.max_len, result.config.model_overrides.get(name))
    served = ServedStudent(
        architecture=name,
        model_config_json=model_config.model_dump(mode="json"),
        max_len=run.max_len,
        checkpoint=checkpoint,
        weights_sha256=file_sha256(weights_path(checkpoint, "best")),
        seed=run.seed,
        dataset=result.config.dataset,
        data=result.data.config,
        data_version=result.data.data_version,
        test={k: float(v) for k, v in run.test.items()},
        run_id=run.run_id,
    )
    return served.model_dump(mode="json")


@task(name="teacher-student")
def teacher_student(distill_config: Any) -> Any:
    """Teacher scores, then the students (every training a logged run; long: a heartbeat line)."""
    from recsys.experiments.distillation import run_teacher_student

    log = get_run_logger()
    with heartbeat(log, "distill: teacher -> student"):
        return run_teacher_student(distill_config, echo=log.info)


@flow(name="distill-stage", log_prints=False)
def distill_stage(config: PipelineConfig) -> dict[str, Any]:
    """Teacher -> small student with precomputed teacher scores; the table and the goal check."""
    ds = config.dataset.dataset
    result = teacher_student(config.distill_config())
    summary = result.summary()
    table_artifact(
        artifact_key("distill", ds),
        [
            {"role": role, "auc": auc, "gauc": summary.gauc.get(role)}
            | (
                {"flops/example": summary.flops_per_example[role]}
                if role in summary.flops_per_example
                else {}
            )
            for role, auc in summary.auc.items()
        ],
        f"Distillation on {ds}: teacher vs distilled student vs plain student vs DeepFM",
    )
    create_markdown_artifact(
        key=artifact_key("distill", ds, "report"),
        markdown=f"# Distillation on {config.dataset.dataset}\n\n{summary.table}\n\n{summary.goal_line}\n",
        description="Teacher vs distilled student vs the same student without distillation vs DeepFM",
    )
    return distill_record(summary)


def distill_record(summary: TeacherStudentSummary) -> dict[str, Any]:
    """The distill stage's JSON record: the figures, and the student the package stage serves as ranker
    (``summary.served_student``: the first seed's distilled student, its best checkpoint's path and sha256,
    its architecture and config, the data config and version it was trained on; None if it left no
    weights)."""
    student = summary.served_student
    return {
        "table": f"{summary.table}\n\n{summary.goal_line}",
        "auc": summary.auc,
        "flops_ratio": summary.flops_ratio,
        "lift_retained": summary.lift_retained,
        "goal_met": summary.goal_met,
        "report": str(summary.report_path) if summary.report_path else None,
        "student": student.model_dump(mode="json") if student is not None else None,
    }


@flow(name="ab-stage", log_prints=False)
def ab_stage(config: PipelineConfig, package: dict[str, Any]) -> dict[str, Any]:
    """Simulate an A/B test of the packaged retriever against the popularity control."""
    from recsys.flows.ab_test import ABTestFlowConfig, ab_test_flow

    flow_config = ABTestFlowConfig.quick(
        **(
            {"dataset": config.dataset.dataset, "tags": (package["control"], package["retriever"])}
            | config.ab
        )
    )
    result = ab_test_flow(flow_config)
    return {
        "table": result.lift_table,
        "experiment_id": result.experiment_id,
        "run_id": result.run_id,
        "arms": result.arms,
    }


@flow(name="package-stage", log_prints=False)
def package_stage(
    config: PipelineConfig,
    retrieval: dict[str, Any],
    distill: dict[str, Any] | None = None,
    ranking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Register the best retriever, the popularity fallback and the ranker in the model store: the ranking
    stage's run of ``config.ranker`` when it names one, else (when this run distilled one) the distilled
    student; build the bento that serves them."""
    from recsys.experiments.distillation import ServedStudent
    from recsys.flows.package import (
        register_distilled_ranker,
        register_learned_retriever,
        register_popularity,
        register_trained_ranker,
    )
    from recsys.serving.build import build_bento
    from recsys.serving.service import ServingConfig

    log = _logger()
    paths = PathsConfig()
    dataset = config.dataset.dataset
    best = retrieval["best"]
    if best is None:
        raise ValueError("package: no learned retrieval model was trained (retrieval_models has none)")
    trained = (ranking or {}).get("served_ranker")
    if config.ranker is not None and trained is None:  # refused before anything is registered
        raise ValueError(
            f"ranker: the ranking stage left no trained {config.ranker!r} to serve (no ranking record, "
            "or its run has no best weights)"
        )
    model = retrieval["models"][best]
    retriever = register_learned_retriever(
        paths.warehouse,
        dataset,
        best,
        Path(model["checkpoint"]),
        model_config_json=model["model_config"],
        temperature=model["temperature"],
        metrics=model["test"],
    )
    # The same model under a stable name: what deployments pin (``<dataset>-retriever:latest``).
    served = register_learned_retriever(
        paths.warehouse,
        dataset,
        best,
        Path(model["checkpoint"]),
        model_config_json=model["model_config"],
        temperature=model["temperature"],
        metrics=model["test"],
        store=f"{_slug(dataset)}-retriever",
    )
    control = register_popularity(paths.warehouse, dataset)
    ranker: str | None = None
    architecture: str | None = None
    source: str | None = None
    if config.ranker is not None:
        # The chosen ranking model (a generative ranker is scored through M-FALCON by the service).
        run = ServedStudent.model_validate(trained)
        ranker = register_trained_ranker(paths.warehouse, run, store=f"{_slug(dataset)}-ranker")
        architecture, source = run.architecture, "ranking"
    elif (record := (distill or {}).get("student")) is not None:
        # The distilled student re-ranks the retriever's pool, under the stable name deployments pin.
        student = ServedStudent.model_validate(record)
        ranker = register_distilled_ranker(paths.warehouse, student, store=f"{_slug(dataset)}-ranker")
        architecture, source = student.architecture, "distill"
    else:
        log.info("package: no distilled student in this run; serving without a ranker")
    bento = build_bento(ServingConfig(retriever=served, ranker=ranker))
    log.info("packaged %s (control %s, ranker %s) as bento %s", retriever, control, ranker, bento)
    return {
        "retriever": retriever,
        "served": served,
        "control": control,
        "ranker": ranker,
        "ranker_architecture": architecture,
        "ranker_source": source,
        "bento": bento,
    }


def package_key(
    dataset: str,
    retrieval: dict[str, Any],
    distill: dict[str, Any] | None,
    ranking: dict[str, Any] | None = None,
    ranker: str | None = None,
) -> str:
    """The package stage's cache key: the retriever it registers and the ranker it serves, the distilled
    student or the ranking stage's run of ``ranker`` (either record names the checkpoint's sha256, so a
    re-trained ranker re-packages)."""
    if ranker is not None:
        served = (ranking or {}).get("served_ranker")
        return stage_cache.stage_key(
            "package", dataset, retrieval["best"], retrieval["models"], ranker, served
        )
    student = (distill or {}).get("student")
    return stage_cache.stage_key("package", dataset, retrieval["best"], retrieval["models"], student)


# -- the pipeline -------------------------------------------------------------------------------------------


def _needed(stage: str, wanted: tuple[str, ...], ranker: str | None = None) -> bool:
    """Stages run because a wanted later one needs their record (package and ab need retrieval, and the
    ranking stage when it trains the served ranker)."""
    needs = {"retrieval": ("package", "ab"), "package": ("ab",)}
    if ranker is not None:
        needs["ranking"] = ("package", "ab")
    return any(w in wanted for w in needs.get(stage, ()))


def _slug(name: str) -> str:
    return name.replace("_", "-").lower()


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run logger inside a flow; the module logger when a stage's ``.fn`` is called directly."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@task(name="record-stage", **IO_RETRIES)
def record_stage(warehouse_path: Path, name: str, key: str, result: dict[str, Any], seconds: float) -> None:
    """The stage's cache record (a warehouse write: retried on I/O errors such as a locked file)."""
    stage_cache.store(warehouse_path, name, key, result, seconds)


def _run_stage(
    name: str,
    key: str,
    run: Callable[[], dict[str, Any]],
    records: dict[str, dict[str, Any]],
    skipped: list[str],
    seconds: dict[str, float],
    warehouse_path: Path,
    progress: StageProgress | None = None,
) -> dict[str, Any]:
    log = get_run_logger()
    cached = stage_cache.lookup(warehouse_path, name, key)
    if cached is not None:
        log.info("stage %s: unchanged inputs (key %s), skipped", name, key)
        records[name] = cached
        skipped.append(name)
        seconds[name] = 0.0
        if progress is not None:
            progress.step(f"{name} (unchanged, skipped)")
        return cached
    log.info("stage %s: starting", name)
    start = time.perf_counter()
    with heartbeat(log, f"stage {name}", every_s=60.0):
        result = run()
    seconds[name] = time.perf_counter() - start
    record_stage(warehouse_path, name, key, result, seconds[name])
    records[name] = result
    if progress is not None:
        progress.step(f"{name} ({seconds[name]:.0f} s)")
    return result


@flow(name="recsys-pipeline", log_prints=False)
def pipeline_flow(config: PipelineConfig) -> PipelineResult:
    """Run every stage in order; each is a subflow with its own artifact in the Prefect UI."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; known, in order: {STAGES}")
    log = get_run_logger()
    paths = PathsConfig()
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    with stage_cache.pipeline_lock(paths.home):
        swept = sweep_stale_temps(paths.home)
        interrupted = stage_cache.close_interrupted_runs(paths.warehouse)
        if swept or interrupted:
            log.info("cleaned up after an interrupted run: %d temp files, %d runs", len(swept), interrupted)

        seconds: dict[str, float] = {}
        records: dict[str, dict[str, Any]] = {}
        skipped: list[str] = []
        ds = config.dataset.dataset

        def want(stage: str) -> bool:
            return stage in config.stages

        planned = ["features"] + [
            s for s in STAGES[1:] if want(s) or _needed(s, config.stages, config.ranker)
        ]
        progress = StageProgress(artifact_key("pipeline", ds, "progress"), len(planned), "pipeline", log)
        log.info("pipeline on %s: stages %s", ds, " -> ".join(planned))
        start = time.perf_counter()
        features = build_features_flow(config.dataset, config.features)
        seconds["features"] = time.perf_counter() - start
        progress.step(f"features ({seconds['features']:.0f} s)")
        versions = features["versions"]
        wh = paths.warehouse

        if want("retrieval") or want("package") or want("ab"):
            key = stage_cache.stage_key(
                "retrieval",
                versions,
                config.retrieval_models,
                config.retrieval_train,
                config.retrieval_loop,
                config.seeds,
                config.features.max_seq_len,
                # Records cached before they carried each model's trained config are not reused.
                "model-config-record",
            )
            _run_stage(
                "retrieval", key, lambda: retrieval_stage(config), records, skipped, seconds, wh, progress
            )
        if want("ranking") or _needed("ranking", config.stages, config.ranker):
            # Without a chosen ranker the key is what it always was (cached stages stay valid).
            served = () if config.ranker is None else (config.ranking_stage_config(), config.ranker)
            key = stage_cache.stage_key(
                "ranking", versions, config.ranking, config.seeds, config.features, *served
            )
            _run_stage("ranking", key, lambda: ranking_stage(config), records, skipped, seconds, wh, progress)
        if want("distill"):
            # "student-record": records cached before they carried the served student are not reused
            # (re-running is cheap: finished training runs come back from their content-keyed checkpoints).
            key = stage_cache.stage_key("distill", versions, config.distill_config(), "student-record")
            _run_stage("distill", key, lambda: distill_stage(config), records, skipped, seconds, wh, progress)
        if want("package") or want("ab"):
            retrieval = records["retrieval"]
            distill = records.get("distill")  # only this run's: None when the distill stage is not run
            ranking = records.get("ranking")
            key = package_key(ds, retrieval, distill, ranking, config.ranker)
            _run_stage(
                "package",
                key,
                lambda: package_stage(config, retrieval, distill, ranking),
                records,
                skipped,
                seconds,
                wh,
                progress,
            )
        if want("ab"):
            package = records["package"]
            key = stage_cache.stage_key("ab", versions, package["retriever"], package["control"], config.ab)
            _run_stage("ab", key, lambda: ab_stage(config, package), records, skipped, seconds, wh, progress)

        result = PipelineResult(
            dataset=ds,
            features=features,
            stages=records,
            skipped=tuple(skipped),
            stage_seconds=seconds,
        )
        report = paths.home / "reports" / f"pipeline_{ds}.md"
        markdown = summary_markdown(result)
        with atomic_path(report) as tmp:
            tmp.write_text(markdown)
        create_markdown_artifact(
            key=f"pipeline-{_slug(ds)}", markdown=markdown, description="Pipeline summary"
        )
        log.info("pipeline finished: %s", {k: round(v, 1) for k, v in seconds.items()})
        return result.model_copy(update={"report": report})


def summary_markdown(result: PipelineResult) -> str:
    """The run's key figures per stage, as the report file and the Prefect artifact show them."""
    lines = [f"# Pipeline on {result.dataset}", ""]
    lines.append("| stage | seconds | |")
    lines.append("|---|---|---|")
    for stage, secs in result.stage_seconds.items():
        lines.append(f"| {stage} | {secs:.1f} | {'skipped (unchanged)' if stage in result.skipped else ''} |")
    for stage in ("retrieval", "ranking", "distill", "ab"):
        if stage in result.stages and result.stages[stage].get("table"):
            lines += ["", f"## {TITLES[stage]}", "", result.stages[stage]["table"]]
    if "package" in result.stages:
        pkg = result.stages["package"]
        served = f"Bento `{pkg['bento']}` serves retriever `{pkg.get('served', pkg['retriever'])}` and "
        if pkg.get("ranker") and pkg.get("ranker_source") == "ranking":
            served += f"ranker `{pkg['ranker']}`, the ranking stage's {pkg.get('ranker_architecture')}."
        elif pkg.get("ranker"):
            served += f"ranker `{pkg['ranker']}`, the distilled student ({pkg.get('ranker_architecture')})."
        else:
            served += "no ranker (no distilled student in this run): lists are ranked by retrieval scores."
        lines += ["", "## Package", "", served]
        lines += ["", "```json", json.dumps(pkg, indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def example_user(warehouse: Path, dataset: str) -> str:
    """One real user id of ``dataset`` as JSON (the user's own id: a string for string-id data), for the
    serve hint; ``1`` when the warehouse holds no user index for it."""
    check_dataset(dataset)
    with Warehouse(warehouse, read_only=True) as wh:
        if wh.has_table(f"{dataset}.user_ids"):
            rows = wh.con.execute(f"SELECT min(raw_id) FROM {dataset}.user_ids").fetchall()
        elif wh.has_table(f"{dataset}.user_index"):
            rows = wh.con.execute(f"SELECT min(user_id) FROM {dataset}.user_index").fetchall()
        else:
            rows = [(None,)]
    return json.dumps(rows[0][0]) if rows[0][0] is not None else "1"


def describe(result: PipelineResult, paths: PathsConfig | None = None) -> str:
    """What a newcomer needs after the run: where the results are and what to open next."""
    paths = paths or PathsConfig()
    done = ", ".join(
        f"{k} {v:.0f} s" + (" (skipped)" if k in result.skipped else "")
        for k, v in result.stage_seconds.items()
    )
    lines = [f"Pipeline finished on dataset '{result.dataset}'.", f"Stage wall times: {done}", ""]
    for stage in ("retrieval", "ranking", "distill", "ab"):
        if stage in result.stages and result.stages[stage].get("table"):
            lines += [f"{TITLES[stage]}:", result.stages[stage]["table"], ""]
    lines += [
        f"Summary report:   {result.report}",
        f"Warehouse:        {paths.warehouse}  (tables, lineage, runs)",
        f"Parquet exports:  {paths.exports}",
        f"Checkpoints:      {paths.artifacts}",
    ]
    pkg = result.stages.get("package")
    if pkg:
        lines += [
            f"Bento:            {pkg['bento']}  (retriever {pkg.get('served', pkg['retriever'])}, "
            f"ranker {pkg.get('ranker') or 'none'})",
            "Serve it:         .venv/bin/recsys serve   (then POST http://127.0.0.1:3000/recommend "
            f'{{"user_id": {example_user(paths.warehouse, result.dataset)}, "k": 10}})',
        ]
    lines += [
        "Dashboard:        .venv/bin/recsys dashboard   (opens http://127.0.0.1:8501)",
        "Recorded runs:    .venv/bin/recsys runs",
    ]
    return "\n".join(lines)
