"""The sequential-retrieval experiment: popularity, SASRec, HSTU and HSTU-large on one dataset, several seeds.

Pipeline: ingest (MovieLens-100K from a folder or the download, or the user's own events file through
``ingest.events``) -> ``features.sequences`` -> leave-one-out split -> train each model per seed (early
stopping on validation NDCG@10, test evaluated once on the best checkpoint) -> a markdown table of mean ± std
over seeds with parameters, FLOPs, time to quality and epochs -> paired significance tests -> the report at
``<home>/reports/retrieval_<dataset>.md``. Every run is recorded in the warehouse's run registry.

Checkpoints live in ``<home>/artifacts/retrieval/<dataset>/<model>/seed<k>-<key>`` (key = hash of every
config but the epoch cap, and the data version): running the command again resumes unfinished runs, reuses
finished ones, and continues runs that ended at a lower ``--max-epochs`` than the one asked for.

CLI: ``app`` (typer), mounted by the platform CLI; ``python -m recsys.experiments.retrieval --help`` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import Field, model_validator

from recsys.core.config import FrozenModel, PathsConfig
from recsys.core.hashing import stable_hash
from recsys.evaluation.retrieval import PROTOCOL, LeaveOneOutSplit, leave_one_out
from recsys.evaluation.significance import PairedTest, paired_tests_over_users, summarize
from recsys.experiments.common import (
    check_comparisons,
    check_seeds,
    echo_table_and_tests,
    format_count,
    markdown_head,
    markdown_row,
    paired_seed_tests,
    split_csv,
    write_report,
)
from recsys.features.sequences import build_sequences, load_sequences, num_items
from recsys.ingest.events import EventSchema, ingest_events
from recsys.ingest.movielens import ingest_movielens
from recsys.models.registry import REGISTRY
from recsys.training.loop import LoopConfig, record
from recsys.training.retrieval import RetrievalRunResult, RetrievalTrainConfig, train_retrieval
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog, hardware_description

DEFAULT_MODELS = ("popularity", "sasrec", "hstu", "hstu-large")
TABLE_METRICS = tuple(f"{kind}@{k}" for k in (10, 50, 200) for kind in ("hr", "ndcg", "mrr"))


class RetrievalExperimentConfig(FrozenModel):
    dataset: str = Field("ml100k", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Warehouse schema name.")
    source_dir: Path | None = Field(None, description="MovieLens-100K folder; None downloads it.")
    events_path: Path | None = Field(None, description="A user's own events file (CSV/Parquet) instead.")
    event_schema: EventSchema = EventSchema()
    models: tuple[str, ...] = DEFAULT_MODELS
    seeds: tuple[int, ...] = (0, 1, 2)
    train: RetrievalTrainConfig = RetrievalTrainConfig()
    loop: LoopConfig = LoopConfig(max_epochs=100, patience=10)
    comparisons: tuple[tuple[str, str], ...] = (("hstu", "sasrec"), ("hstu-large", "sasrec"))
    test_metrics: tuple[str, ...] = ("ndcg@10", "hr@10")

    @model_validator(mode="after")
    def _check(self) -> RetrievalExperimentConfig:
        unknown = [m for m in self.models if m not in REGISTRY or REGISTRY[m].task != "retrieval"]
        if unknown:
            known = sorted(k for k, e in REGISTRY.items() if e.task == "retrieval")
            raise ValueError(f"models: unknown retrieval model(s) {unknown}; known: {known}")
        if not self.models:
            raise ValueError("models: name at least one model")
        check_seeds(self.seeds)
        check_comparisons(self.comparisons, self.models)
        return self


@dataclass
class ExperimentResult:
    config: RetrievalExperimentConfig
    data_version: str
    num_items: int
    num_users: int
    num_eval_users: int
    runs: dict[str, list[RetrievalRunResult]]
    tests: list[PairedTest] = field(default_factory=list)
    hardware: str = ""
    report_path: Path | None = None


def prepare_split(wh_path: Path, config: RetrievalExperimentConfig) -> tuple[LeaveOneOutSplit, str]:
    """Ingest the dataset (skipped when unchanged), build its sequences, and split them leave-one-out."""
    with Warehouse(wh_path) as wh:
        if config.events_path is not None:
            ingest_events(wh, config.dataset, Path(config.events_path), schema=config.event_schema)
        elif config.dataset == "ml100k" or config.source_dir is not None:
            ingest_movielens(wh, config.source_dir, dataset=config.dataset)
        elif not wh.has_table(f"{config.dataset}.events"):
            raise ValueError(
                f"dataset {config.dataset!r}: give events_path (own data) or source_dir (MovieLens-100K), "
                "or ingest it first"
            )
        version = build_sequences(wh, config.dataset).version
        sequences = load_sequences(wh, config.dataset)
        n_items = num_items(wh, config.dataset)
    return leave_one_out(sequences, n_items), version


def run_retrieval_experiment(
    config: RetrievalExperimentConfig, paths: PathsConfig | None = None, *, echo: Any = None
) -> ExperimentResult:
    """Train and test every model for every seed, run the paired tests and write the markdown report."""
    paths = paths or PathsConfig()
    say = echo or (lambda _msg: None)
    split, data_version = record(prepare_split, paths.warehouse, config)
    say(
        f"{config.dataset}: {split.num_items} items, {len(split.train_users)} users, "
        f"{len(split.test)} evaluated (data version {data_version})"
    )
    run_log = record(RunLog, paths.warehouse)
    runs: dict[str, list[RetrievalRunResult]] = {}
    for name in config.models:
        for seed in config.seeds:
            loop_key = config.loop.model_dump(mode="json", exclude={"progress", "resume", "max_epochs"})
            key = stable_hash(name, config.train, loop_key, data_version, length=12)
            ckpt = paths.artifacts / "retrieval" / config.dataset / name / f"seed{seed}-{key}"
            result = train_retrieval(
                name,
                split,
                seed=seed,
                train_config=config.train,
                loop_config=config.loop,
                checkpoint_dir=ckpt if name != "popularity" else None,
                run_log=run_log,
                data_version=data_version,
                dataset=config.dataset,
            )
            runs.setdefault(name, []).append(result)
            say(
                f"{name} seed {seed}: test ndcg@10 {result.test.metrics['ndcg@10']:.4f} "
                f"hr@10 {result.test.metrics['hr@10']:.4f} (best epoch {result.best_epoch}/"
                f"{result.epochs_run}, {result.train_time_s:.0f} s)"
            )
    result = ExperimentResult(
        config,
        data_version,
        split.num_items,
        len(split.train_users),
        len(split.test),
        runs,
        paired_tests(runs, config),
        hardware_description(),
    )
    result.report_path = write_report(
        paths.home / "reports" / f"retrieval_{config.dataset}.md", format_report(result)
    )
    return result


def paired_tests(
    runs: dict[str, list[RetrievalRunResult]], config: RetrievalExperimentConfig
) -> list[PairedTest]:
    """Per comparison: a paired t-test over seeds per metric; Wilcoxon and t over users for the first seed."""
    tests: list[PairedTest] = []
    for a, b in config.comparisons:
        ra, rb = runs[a], runs[b]
        tests += paired_seed_tests(a, b, ra, rb, config.test_metrics, lambda r, m: r.test.metrics[m])
        first_a, first_b = ra[0], rb[0]
        if list(first_a.test.users) != list(first_b.test.users):
            raise ValueError(f"{a} and {b} were evaluated on different users: cannot pair them")
        metric = config.test_metrics[0]
        for t in paired_tests_over_users(
            first_a.test.per_user(metric), first_b.test.per_user(metric), metric=metric, a_name=a, b_name=b
        ):
            tests.append(replace(t, test=f"{t.test}, seed {first_a.seed}"))
    return tests


def format_table(result: ExperimentResult) -> str:
    """Markdown table: one row per model, mean ± std over seeds of the test metrics, then cost columns."""
    header = [
        "Model",
        *[m.upper() for m in TABLE_METRICS],
        "Params",
        "FLOPs/user",
        "Time to quality (s)",
        "Best epoch / run",
    ]
    lines = markdown_head(header)
    for name, runs in result.runs.items():
        cells = [name]
        for metric in TABLE_METRICS:
            cells.append(summarize([r.test.metrics[metric] for r in runs]).format())
        ttq = summarize([r.time_to_quality_s for r in runs])
        best = summarize([r.best_epoch for r in runs])
        ran = summarize([r.epochs_run for r in runs])
        cells += [
            format_count(runs[0].num_parameters),
            format_count(runs[0].flops_per_example),
            f"{ttq.mean:.0f} ± {ttq.std:.0f}",
            f"{best.mean:.0f} / {ran.mean:.0f}",
        ]
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def format_report(result: ExperimentResult) -> str:
    c = result.config
    seeds = ", ".join(str(s) for s in c.seeds)
    lines = [
        f"# Sequential retrieval: {c.dataset}",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {result.hardware}; data version "
        f"{result.data_version}; {result.num_items} items, {result.num_users} users, "
        f"{result.num_eval_users} test users.",
        "",
        f"Protocol: {PROTOCOL}; history {c.train.max_len}; seeds {seeds} (mean ± std over seeds, test set "
        f"evaluated once per run on the checkpoint with the best validation {c.loop.monitor}).",
        f"Training: sampled softmax ({c.train.loss.num_negatives} uniform negatives, temperature "
        f"{c.train.loss.temperature}), AdamW lr {c.loop.optimizer.lr} "
        f"betas {tuple(c.loop.optimizer.betas)} wd {c.loop.optimizer.weight_decay}, "
        f"batch {c.train.batch_size}, at most {c.loop.max_epochs} epochs, "
        f"validation every {c.loop.eval_every} epoch(s), patience {c.loop.patience}.",
        "Time to quality = training wall time (validation included) until the epoch with the best validation "
        "NDCG@10. FLOPs/user = forward FLOPs to score one user against all items (torch flop counter).",
        "",
        format_table(result),
        "",
        "## Significance",
        "",
    ]
    lines += [f"- {t.format()}" for t in result.tests] or ["- (no comparisons configured)"]
    lines += [
        "",
        "## Per seed",
        "",
        "| Model | Seed | NDCG@10 | HR@10 | Best epoch | Epochs | Time to quality (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in result.runs.items():
        for r in runs:
            lines.append(
                f"| {name} | {r.seed} | {r.test.metrics['ndcg@10']:.4f} | {r.test.metrics['hr@10']:.4f} "
                f"| {r.best_epoch} | {r.epochs_run} | {r.time_to_quality_s:.0f} |"
            )
    return "\n".join(lines) + "\n"


# -- CLI ----------------------------------------------------------------------------------------------------
app = typer.Typer(help="Sequential retrieval experiments (SASRec, HSTU, popularity).", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Sequential retrieval experiments (SASRec, HSTU, popularity)."""


@app.command("run")
def run_command(
    dataset: Annotated[str, typer.Option(help="Warehouse schema name of the dataset.")] = "ml100k",
    source_dir: Annotated[
        Path | None, typer.Option(help="Unzipped MovieLens-100K folder (default: download).")
    ] = None,
    events: Annotated[Path | None, typer.Option(help="Your own events file (CSV/Parquet) to ingest.")] = None,
    user_col: Annotated[str, typer.Option(help="Events column with the user id.")] = "user_id",
    item_col: Annotated[str, typer.Option(help="Events column with the item id.")] = "item_id",
    time_col: Annotated[str, typer.Option(help="Events column with the event time.")] = "timestamp",
    time_format: Annotated[str, typer.Option(help="'unix', 'iso8601' or a strptime format.")] = "unix",
    models: Annotated[str, typer.Option(help="Comma-separated models.")] = ",".join(DEFAULT_MODELS),
    seeds: Annotated[int, typer.Option(min=1, help="Number of seeds (0..n-1).")] = 3,
    max_epochs: Annotated[int, typer.Option(min=1)] = 100,
    patience: Annotated[
        int, typer.Option(min=1, help="Validations without improvement before stopping.")
    ] = 10,
    eval_every: Annotated[int, typer.Option(min=1, help="Validate every this many epochs.")] = 1,
    max_len: Annotated[int, typer.Option(min=2, help="History length (200 for MovieLens).")] = 200,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show tqdm progress bars.")] = True,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="torch CPU threads (default: torch's choice; 1 on a busy machine)."),
    ] = None,
) -> None:
    """Train popularity, SASRec, HSTU and HSTU-large over several seeds and print the comparison table."""
    chosen = split_csv(models)
    comparisons = tuple(
        pair
        for pair in (("hstu", "sasrec"), ("hstu-large", "sasrec"))
        if pair[0] in chosen and pair[1] in chosen
    )
    try:
        config = RetrievalExperimentConfig(
            dataset=dataset,
            source_dir=source_dir,
            events_path=events,
            event_schema=EventSchema(
                user_id=user_col, item_id=item_col, timestamp=time_col, timestamp_format=time_format
            ),
            models=chosen,
            seeds=tuple(range(seeds)),
            train=RetrievalTrainConfig(max_len=max_len, batch_size=batch_size),
            loop=LoopConfig(
                max_epochs=max_epochs,
                patience=patience,
                eval_every=eval_every,
                device=device,
                progress=progress,
            ),
            comparisons=comparisons,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    result = run_retrieval_experiment(config, echo=typer.echo)
    echo_table_and_tests(format_table(result), result.tests)
    typer.echo(f"\nreport: {result.report_path}")


if __name__ == "__main__":
    app()
