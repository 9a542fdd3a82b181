"""Prefect flow: source data -> warehouse -> sequences, splits, point-in-time examples -> Parquet export.

The logic lives in ``ingest/``, ``synthetic/`` and ``features/``; the tasks here only open the warehouse,
call those functions and pass versions along. Every step is cached on its inputs' versions (``is_fresh``),
so a re-run on unchanged input rebuilds nothing and writes no lineage row. Only I/O is retried (the
MovieLens download, and the steps that write the warehouse when the write fails on I/O, e.g. a file another
process holds locked: ``observe.IO_RETRIES``). A progress artifact follows the steps, a heartbeat log line
keeps the terminal alive during long ones, and the run ends with a table artifact of the key figures.

CLI (the lead mounts ``app`` as ``features``):
``recsys features build --kind movielens --movielens-dir ../shared/data/ml-100k``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from prefect import flow, get_run_logger, task
from pydantic import Field, ValidationError, model_validator

import recsys.core  # noqa: F401  (telemetry off, Prefect home) before Prefect starts its server
from recsys.core.config import FrozenModel, PathsConfig, describe_config_error
from recsys.features.config import FeatureConfig
from recsys.features.export import export_features, read_manifest
from recsys.features.point_in_time import build_examples
from recsys.features.sequences import build_sequences, check_dataset
from recsys.features.splits import build_split_loo
from recsys.flows.observe import IO_RETRIES, StageProgress, artifact_key, heartbeat, table_artifact
from recsys.flows.options import (
    Delimiter,
    EventCol,
    Examples,
    ItemCol,
    Negatives,
    PositiveEvents,
    Sampling,
    TimeCol,
    TimeFormat,
    UserCol,
    ValueCol,
    dataset_name_for,
    event_schema_from_flags,
    feature_config_from_flags,
)
from recsys.ingest.events import EventSchema
from recsys.warehouse import Warehouse

DEFAULT_NAMES = {"synthetic": "synthetic", "movielens": "ml100k"}


class DatasetSpec(FrozenModel):
    """Which data the flow builds features for, and where it comes from."""

    kind: Literal["synthetic", "movielens", "events"]
    name: str | None = Field(
        None, description="Warehouse schema; default 'synthetic' / 'ml100k'; required for kind='events'."
    )
    # kind = "synthetic"
    synthetic_preset: Literal["tiny", "quick", "long_history"] = "quick"
    synthetic_events: int | None = Field(
        None, ge=1, description="Generate exactly this many click events (SyntheticConfig.for_events)."
    )
    synthetic_impressions: bool = Field(
        True, description="With synthetic_events: log impressions (the ranking examples) too."
    )
    seed: int = Field(0, ge=0)
    # kind = "movielens"
    movielens_dir: Path | None = Field(None, description="Folder with u.data...; None: verified download.")
    # kind = "events"
    events_path: Path | None = None
    users_path: Path | None = None
    items_path: Path | None = None
    event_schema: EventSchema = EventSchema()

    @model_validator(mode="after")
    def _fields_for_kind(self) -> DatasetSpec:
        if self.name is not None:
            check_dataset(self.name)
        own = {
            "synthetic": {"synthetic_events"},
            "movielens": {"movielens_dir"},
            "events": {"events_path", "users_path", "items_path"},
        }
        for kind, fields in own.items():
            stray = sorted(f for f in fields if kind != self.kind and getattr(self, f) is not None)
            if stray:
                raise ValueError(f"{stray} only apply to kind={kind!r}, not kind={self.kind!r}")
        if self.kind == "events":
            if self.events_path is None:
                raise ValueError("kind='events' needs events_path (the events CSV/Parquet file)")
            if self.name is None:
                raise ValueError("kind='events' needs a name (the warehouse schema for this dataset)")
        return self

    @property
    def dataset(self) -> str:
        return self.name or DEFAULT_NAMES[self.kind]


# -- tasks: thin wrappers over the library -------------------------------------------------------------


@task(**(IO_RETRIES | {"retries": 3, "retry_delay_seconds": 10}))
def download_movielens(cache_dir: Path) -> Path:
    """Network I/O, retried on network errors (a checksum mismatch is final)."""
    from recsys.ingest.movielens import download_movielens_100k

    return download_movielens_100k(cache_dir)


@task
def generate_synthetic(spec: DatasetSpec, cache_dir: Path) -> Path:
    """Generate the synthetic run into a folder named by its data version (reused when complete)."""
    from recsys.synthetic.config import SyntheticConfig
    from recsys.synthetic.generator import generate, read_manifest

    if spec.synthetic_events is not None:
        config = SyntheticConfig.for_events(
            spec.synthetic_events, spec.seed, log_impressions=spec.synthetic_impressions
        )
    else:
        config = SyntheticConfig.preset(spec.synthetic_preset, spec.seed)
    out = cache_dir / "synthetic" / config.data_version()
    try:
        if read_manifest(out).data_version == config.data_version():
            return out
    except FileNotFoundError:
        pass
    generate(config, out)
    return out


@task(**IO_RETRIES)
def ingest(spec: DatasetSpec, warehouse_path: Path, source: Path | None) -> dict[str, str]:
    """Publish the source tables (each ingest skips itself when its input is unchanged)."""
    with Warehouse(warehouse_path) as wh:
        if spec.kind == "movielens":
            from recsys.ingest.movielens import ingest_movielens

            versions = ingest_movielens(wh, source, dataset=spec.dataset)
            return {name: v.version for name, v in versions.items()}
        if spec.kind == "synthetic":
            from recsys.synthetic.warehouse_load import load_into_warehouse

            assert source is not None
            versions = load_into_warehouse(wh, source, spec.dataset)
            return {f"{spec.dataset}.{t}": v.version for t, v in versions.items()}
        from recsys.ingest.events import ingest_events

        assert spec.events_path is not None
        report = ingest_events(
            wh,
            spec.dataset,
            spec.events_path,
            users=spec.users_path,
            items=spec.items_path,
            schema=spec.event_schema,
        )
        return dict(report.versions)


@task(**IO_RETRIES)
def sequences(warehouse_path: Path, dataset: str) -> str:
    with Warehouse(warehouse_path) as wh:
        return build_sequences(wh, dataset).version


@task(**IO_RETRIES)
def splits(warehouse_path: Path, dataset: str, features: FeatureConfig) -> str:
    with Warehouse(warehouse_path) as wh:
        return build_split_loo(wh, dataset, features).version


@task(**IO_RETRIES)
def examples(warehouse_path: Path, dataset: str, features: FeatureConfig) -> str:
    with Warehouse(warehouse_path) as wh:
        return build_examples(wh, dataset, features).version


@task(**IO_RETRIES)
def export(warehouse_path: Path, dataset: str, features: FeatureConfig, export_root: Path) -> Path:
    with Warehouse(warehouse_path) as wh:
        return export_features(wh, dataset, features, root=export_root)


def key_figures(warehouse_path: Path, dataset: str, export_dir: Path) -> dict[str, Any]:
    """Rows, users, items, versions: what the artifact and the CLI print."""
    manifest = read_manifest(export_dir)
    with Warehouse(warehouse_path, read_only=True) as wh:
        n_events = int(wh.con.execute(f"SELECT count(*) FROM {dataset}.events").fetchall()[0][0])
        n_examples = int(wh.con.execute(f"SELECT count(*) FROM {dataset}.examples").fetchall()[0][0])
        positive = wh.con.execute(f"SELECT avg(label::DOUBLE) FROM {dataset}.examples").fetchall()[0][0]
    return {
        "dataset": dataset,
        "events": n_events,
        "users": manifest["n_users"],
        "items": manifest["n_items"],
        "examples": n_examples,
        "positive_rate": round(float(positive), 4) if positive is not None else None,
        "examples_per_split": manifest["splits"]["ranking"]["rows"],
        "loo_users_evaluated": manifest["splits"]["retrieval"]["users_evaluated"],
        "temporal_cut": {k: manifest["splits"]["ranking"][k] for k in ("t1", "t2", "q1", "q2")},
        "versions": manifest["tables"],
        "export_dir": str(export_dir),
    }


def _rows(fig: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("events", f"{fig['events']:,}"),
        ("users / items", f"{fig['users']:,} / {fig['items']:,}"),
        ("ranking examples", f"{fig['examples']:,} (positive rate {fig['positive_rate']})"),
        ("train / valid / test", " / ".join(f"{v:,}" for v in fig["examples_per_split"].values())),
        ("temporal cut", f"t1={fig['temporal_cut']['t1']}, t2={fig['temporal_cut']['t2']}"),
        ("leave-one-out users", f"{fig['loo_users_evaluated']:,}"),
        ("export", f"`{fig['export_dir']}`"),
    ]
    return rows + [(f"version `{name}`", f"`{v}`") for name, v in fig["versions"].items()]


@flow(name="build-features", log_prints=False)
def build_features_flow(
    dataset: DatasetSpec,
    features: FeatureConfig | None = None,
    warehouse_path: Path | None = None,
    export_root: Path | None = None,
) -> dict[str, Any]:
    """Ingest (or generate) ``dataset``, build its feature tables and export them; returns the key figures."""
    features = features or FeatureConfig()
    paths = PathsConfig()
    warehouse_path = Path(warehouse_path or paths.warehouse)
    export_root = Path(export_root or paths.exports)
    log = get_run_logger()
    name = dataset.dataset
    progress = StageProgress(artifact_key("features", name, "progress"), 6, f"features of {name}", log)
    source: Path | None = None
    with heartbeat(log, f"features of {name}: reading the source"):
        if dataset.kind == "movielens":
            source = dataset.movielens_dir or download_movielens(paths.cache)
        elif dataset.kind == "synthetic":
            source = generate_synthetic(dataset, paths.cache)
    progress.step("source")
    with heartbeat(log, f"features of {name}: ingest"):
        ingest(dataset, warehouse_path, source)
    progress.step("ingest")
    with heartbeat(log, f"features of {name}: sequences"):
        sequences(warehouse_path, name)
    progress.step("sequences")
    splits(warehouse_path, name, features)
    progress.step("leave-one-out split")
    with heartbeat(log, f"features of {name}: point-in-time ranking examples"):
        examples(warehouse_path, name, features)
    progress.step("ranking examples")
    with heartbeat(log, f"features of {name}: Parquet export"):
        export_dir = export(warehouse_path, name, features, export_root)
    progress.step("export")
    fig = key_figures(warehouse_path, name, export_dir)
    table_artifact(
        artifact_key("features", name),
        [{"figure": k, "value": v} for k, v in _rows(fig)],
        f"Feature build of {name}",
    )
    log.info("features of %s: %s examples, export %s", name, fig["examples"], export_dir)
    return fig


# -- CLI --------------------------------------------------------------------------------------------------

app = typer.Typer(
    help="Build features: sequences, splits, point-in-time ranking examples, Parquet export.",
    no_args_is_help=True,
)


@app.callback()
def _group() -> None:
    """Feature builds (a command group, so that more commands can join ``build``)."""


@app.command("build")
def build_command(
    kind: Annotated[str, typer.Option(help="synthetic | movielens | events")] = "synthetic",
    name: Annotated[
        str | None, typer.Option(help="Warehouse schema (dataset name); events: default the file's name.")
    ] = None,
    preset: Annotated[str, typer.Option(help="Synthetic preset: quick | long_history.")] = "quick",
    movielens_dir: Annotated[Path | None, typer.Option(help="MovieLens-100K folder (else download).")] = None,
    events: Annotated[
        Path | None, typer.Option(help="Your events file (CSV/TSV/Parquet); implies --kind events.")
    ] = None,
    users: Annotated[Path | None, typer.Option(help="kind=events: the users file.")] = None,
    items: Annotated[Path | None, typer.Option(help="kind=events: the items file.")] = None,
    user_col: UserCol = "user_id",
    item_col: ItemCol = "item_id",
    time_col: TimeCol = "timestamp",
    time_format: TimeFormat = "unix",
    event_col: EventCol = None,
    value_col: ValueCol = None,
    delimiter: Delimiter = None,
    examples: Examples = "auto",
    negatives: Negatives = 4,
    sampling: Sampling = "popularity",
    positive_events: PositiveEvents = None,
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the synthetic data and the negative sampler.")
    ] = 0,
    max_seq_len: Annotated[int, typer.Option(min=1, help="History length models read.")] = 200,
) -> None:
    """Run the build-features flow and print its key figures."""
    if events is not None and kind == "synthetic":
        kind = "events"
    try:
        spec = DatasetSpec(
            kind=kind,  # type: ignore[arg-type]  (pydantic validates the literal)
            name=name or (dataset_name_for(events) if events is not None and kind == "events" else None),
            synthetic_preset=preset,  # type: ignore[arg-type]
            movielens_dir=movielens_dir,
            events_path=events,
            users_path=users,
            items_path=items,
            event_schema=event_schema_from_flags(
                user_col, item_col, time_col, time_format, event_col, value_col, delimiter
            ),
            seed=seed,
        )
        features = feature_config_from_flags(
            max_seq_len, examples, negatives, sampling, positive_events, seed
        )
    except ValidationError as exc:
        raise typer.BadParameter(describe_config_error(exc)) from exc
    fig = build_features_flow(spec, features)
    for key, value in fig.items():
        typer.echo(f"{key:22s} {value}")
