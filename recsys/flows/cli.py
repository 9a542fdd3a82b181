"""The ``recsys`` command line: one entry point over the platform's flows and experiments.

Sub-apps live beside the code they drive (``experiments.retrieval.app``, ...) and are mounted here, so
``recsys --help`` lists every stage a newcomer can run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import recsys.core  # noqa: F401  (telemetry off before Prefect/BentoML are imported)
from recsys.core.config import PathsConfig, describe_config_error
from recsys.flows.options import (
    Delimiter,
    EventCol,
    Examples,
    ItemCol,
    Negatives,
    PositiveEvents,
    Sampling,
    ServedRanker,
    TimeCol,
    TimeFormat,
    UserCol,
    ValueCol,
)

app = typer.Typer(
    help="End-to-end recommender platform: data -> features -> models -> serving -> A/B readout.",
    no_args_is_help=True,
    add_completion=False,
)
#: Sub-apps, imported only when their command runs (``main``): importing every stage costs seconds, which a
#: re-run of the pipeline that skips every stage would otherwise pay. ``recsys --help`` mounts them all.
SUBAPPS: dict[str, tuple[str, str]] = {
    "features": ("recsys.flows.build_features", "Ingest a dataset and build its features and exports."),
    "retrieval": ("recsys.experiments.retrieval", "Sequential retrieval: SASRec, HSTU, popularity."),
    "ranking": ("recsys.experiments.ranking", "Ranking/CTR: DeepFM, DIN, RankMixer, LONGER, HyFormer."),
    "serving": ("recsys.serving.build", "Model registry, bento build, impressions log."),
    "scaling": ("recsys.experiments.scaling", "Scaling curves: AUC against FLOPs at several model sizes."),
    "distill": ("recsys.experiments.distillation", "Teacher -> student distillation for serving."),
    "continual": ("recsys.experiments.continual", "Continual training: fine-tune vs replay vs SDFT."),
    "ab": ("recsys.flows.ab_test", "Simulated A/B tests between served models."),
    "parallel-features": ("recsys.flows.parallel_features", "Feature build partitioned over a Dask cluster."),
    "train-ddp": ("recsys.training.distributed", "DistributedDataParallel training launched by torchrun."),
    "users": ("recsys.experiments.user_representation", "User representations: GG-SM mask schedules."),
    "tca4rec": ("recsys.experiments.tca4rec", "LLM-style generation of item titles with TCA4Rec alignment."),
    "genret": ("recsys.experiments.generative_retrieval", "Semantic-ID generative retrieval with V-STAR."),
}


def mount(names: list[str] | None = None) -> typer.Typer:
    """Mount the named sub-apps (all by default) on ``app``; returns it."""
    import importlib

    mounted = {group.name for group in app.registered_groups}
    for name in SUBAPPS if names is None else names:
        if name in mounted:
            continue
        module, help_text = SUBAPPS[name]
        app.add_typer(importlib.import_module(module).app, name=name, help=help_text)
    return app


console = Console()


@app.command("pipeline")
def pipeline_command(
    profile: Annotated[
        str, typer.Option(help="quick (minutes on 2 cores) or full (3 seeds, long budgets).")
    ] = "quick",
    dataset: Annotated[
        str, typer.Option(help="synthetic (default, with ground truth), movielens or events.")
    ] = ("synthetic"),
    movielens_dir: Annotated[
        Path | None, typer.Option(help="dataset=movielens: unzipped ml-100k folder (default: download).")
    ] = None,
    events: Annotated[
        Path | None, typer.Option(help="Your events CSV/TSV/Parquet (implies --dataset events).")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="dataset=events: its name in the warehouse (default: the file's).")
    ] = None,
    users: Annotated[Path | None, typer.Option(help="dataset=events: a users attribute file.")] = None,
    items: Annotated[Path | None, typer.Option(help="dataset=events: an items attribute file.")] = None,
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
    ranker: ServedRanker = None,
    config: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="A JSON or YAML file of PipelineConfig fields that override the profile's (see "
            'flows/pipeline.py), e.g. {"seeds": [0, 1], "stages": ["retrieval"]}.',
        ),
    ] = None,
) -> None:
    """Run the whole loop: data -> features -> retrieval and ranking models -> distillation -> package the
    service -> simulated A/B test, with a readout. Unchanged stages are skipped on a re-run."""
    from pydantic import ValidationError

    from recsys.flows.build_features import DatasetSpec
    from recsys.flows.options import dataset_name_for, event_schema_from_flags, feature_config_from_flags
    from recsys.flows.pipeline import PipelineConfig, describe, pipeline_flow
    from recsys.flows.stage_cache import PipelineBusy, ensure_free

    if profile not in ("quick", "full"):
        raise typer.BadParameter(f"profile must be 'quick' or 'full', got {profile!r}")
    kinds = {"synthetic": "synthetic", "movielens": "movielens", "ml100k": "movielens", "events": "events"}
    if events is not None and dataset == "synthetic":
        dataset = "events"
    if dataset not in kinds:
        raise typer.BadParameter(f"dataset must be one of {sorted(kinds)}, got {dataset!r}")
    overrides: dict = {}
    if config is not None:
        import yaml

        loaded = yaml.safe_load(config.read_text())
        if not isinstance(loaded, dict):
            raise typer.BadParameter(f"--config {config}: expected a mapping of PipelineConfig fields")
        overrides = loaded
    try:
        kind = kinds[dataset]
        spec = DatasetSpec(
            kind=kind,  # type: ignore[arg-type]
            movielens_dir=movielens_dir,
            events_path=events,
            users_path=users,
            items_path=items,
            name=name or (dataset_name_for(events) if kind == "events" and events is not None else None),
            event_schema=event_schema_from_flags(
                user_col, item_col, time_col, time_format, event_col, value_col, delimiter
            ),
        )
        if "dataset" in overrides:
            spec = DatasetSpec.model_validate(overrides.pop("dataset"))
        if "features" not in overrides:
            overrides["features"] = feature_config_from_flags(
                examples=examples, negatives=negatives, sampling=sampling, positive_events=positive_events
            )
        if ranker is not None:
            overrides["ranker"] = ranker
        pipeline_config = PipelineConfig.for_profile(profile, spec, **overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise typer.BadParameter(describe_config_error(exc)) from exc
    try:
        ensure_free(PathsConfig().home)
        result = pipeline_flow(pipeline_config)
    except PipelineBusy as exc:  # another pipeline holds this state directory: a message, not a traceback
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    typer.echo(describe(result))  # plain echo: rich would wrap the markdown tables


@app.command("serve")
def serve_command(
    retriever: Annotated[
        str | None, typer.Option(help="Retriever tag (default: the last pipeline's packaged retriever).")
    ] = None,
    ranker: Annotated[str | None, typer.Option(help="Ranker tag (default: the pipeline's, if any).")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 3000,
    host: Annotated[str, typer.Option(help="Bind address; loopback by default.")] = "127.0.0.1",
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="Allow a non-loopback --host without RECSYS_SERVING_API_KEY (anyone who reaches the port "
            "can call every endpoint).",
        ),
    ] = False,
    grace: Annotated[
        float, typer.Option(min=0.1, help="Seconds a graceful stop may take before the server is killed.")
    ] = 20.0,
) -> None:
    """Serve the recommendation endpoint (BentoML) with the packaged models.

    SIGTERM and SIGINT stop the server and its workers (recsys.core.process)."""
    import os
    import sys

    from recsys.core.process import run_supervised
    from recsys.serving.middleware import API_KEY_ENV, is_loopback_host, validate_api_key

    try:
        key = validate_api_key(os.environ.get(API_KEY_ENV))
    except ValueError as exc:
        console.print(f"[red]{API_KEY_ENV}: {exc}[/red]")
        raise typer.Exit(2) from None
    if key is None and not is_loopback_host(host):
        if not insecure_no_auth:
            console.print(
                f"[red]refusing to bind {host} without an API key: set {API_KEY_ENV}, bind a loopback "
                "address, or pass --insecure-no-auth[/red]"
            )
            raise typer.Exit(2)
        console.print(
            f"[bold red]WARNING: serving on {host} WITHOUT AUTHENTICATION (--insecure-no-auth): anyone who "
            "can reach this port can call every endpoint.[/bold red]"
        )
    if retriever is None:
        packaged = _last_package()
        if packaged is None:
            console.print("No packaged model yet: run `recsys pipeline` first, or pass --retriever.")
            raise typer.Exit(1)
        retriever = packaged.get("served", packaged["retriever"])
        ranker = ranker or packaged.get("ranker")
    env = dict(os.environ, RECSYS_SERVING_RETRIEVER=retriever)
    if ranker:
        env["RECSYS_SERVING_RANKER"] = ranker
    console.print(
        f"serving retriever {retriever}" + (f", ranker {ranker}" if ranker else "") + f" on {host}:{port}"
    )
    argv = [sys.executable, "-m", "bentoml", "serve", "recsys.serving.service:RecommendationService"]
    raise typer.Exit(run_supervised([*argv, "--host", host, "--port", str(port)], env=env, grace_s=grace))


def _last_package() -> dict | None:
    from recsys.flows.stage_cache import history

    path = PathsConfig().warehouse
    if not path.exists():
        return None
    for row in history(path):
        if row["stage"] == "package":
            return json.loads(row["result"])
    return None


@app.command("recommend")
def recommend_command(
    model: Annotated[str, typer.Option(help="Retriever tag: name, name:latest or name:version.")],
    out: Annotated[
        Path, typer.Option(help="Output .parquet or .csv: user_id, rank (1-based), item_id, score.")
    ],
    users: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Users to serve: a text file with one id per line, or a CSV/Parquet with a user_id column.",
        ),
    ] = None,
    all_users: Annotated[bool, typer.Option("--all", help="Every user the model knows.")] = False,
    k: Annotated[int, typer.Option(min=1, max=10_000, help="Items per user.")] = 10,
    ranker: Annotated[str | None, typer.Option(help="A ranker's tag to re-rank each pool.")] = None,
    include_seen: Annotated[bool, typer.Option(help="Allow items of the user's history.")] = False,
    ts: Annotated[int | None, typer.Option(help="Request time, unix seconds (default: now).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Users scored per batch.")] = 256,
) -> None:
    """Top-k items for users, in the dataset's own ids (the deterministic top-k the service serves)."""
    from recsys.serving.recommender import Recommender, read_user_ids, write_recommendations

    if (users is None) == (not all_users):
        raise typer.BadParameter("give exactly one of --users FILE or --all")
    try:
        rec = Recommender.load(model, ranker=ranker)
    except Exception as exc:  # a missing tag or a corrupt model: say which, without a traceback
        console.print(f"[red]--model {model}: {exc}[/red]")
        raise typer.Exit(1) from None
    try:
        wanted = rec.users if all_users else read_user_ids(users, rec.user_id_type)  # type: ignore[arg-type]
        frame = rec.recommend(
            wanted, k, exclude_seen=not include_seen, ts=ts, batch_size=batch_size, progress=True
        )
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    finally:
        rec.close()
    path = write_recommendations(frame, out)
    cold = sum(not rec.knows(u) for u in wanted)
    note = f" ({cold} unknown: popularity)" if cold else ""
    console.print(f"{frame.height} rows for {len(wanted)} users{note} from {rec.tag} -> {path}")


@app.command("dashboard")
def dashboard_command(
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8501,
    host: Annotated[str, typer.Option(help="Bind address; loopback by default.")] = "127.0.0.1",
) -> None:
    """Open the Streamlit dashboard on the warehouse (read-only); SIGTERM and SIGINT stop it."""
    import sys

    from recsys.core.environment import PROJECT_ROOT
    from recsys.core.process import run_supervised

    argv = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(PROJECT_ROOT / "recsys" / "dashboard" / "app.py"),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    console.print(f"dashboard on http://{host}:{port}  (Ctrl-C to stop)")
    raise typer.Exit(run_supervised(argv))


@app.command("runs")
def runs_command(
    kind: Annotated[
        str | None, typer.Option(help="Only runs of this kind (train, eval, benchmark...).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show the most recent N runs.")] = 30,
) -> None:
    """List the runs recorded in the warehouse (what the dashboard shows)."""
    from recsys.warehouse.runs import RunLog

    path = PathsConfig().warehouse
    if not path.exists():
        console.print(f"No warehouse at {path} yet: run `recsys pipeline` first.")
        raise typer.Exit(1)
    frame = RunLog(path).runs(kind).tail(limit)
    table = Table(title=f"runs in {path}")
    for col in ("run_id", "kind", "name", "status", "seed", "data_version", "wall_time_s", "metrics"):
        table.add_column(col, overflow="fold")
    for row in frame.iter_rows(named=True):
        metrics = json.loads(row["metrics"] or "{}")
        short = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:4] if isinstance(v, int | float))
        wall = f"{row['wall_time_s']:.1f}" if row["wall_time_s"] is not None else ""
        table.add_row(
            row["run_id"],
            row["kind"],
            row["name"],
            row["status"],
            str(row["seed"]),
            str(row["data_version"]),
            wall,
            short,
        )
    console.print(table)


@app.command("where")
def where_command() -> None:
    """Print where the platform keeps its state (warehouse, exports, artefacts)."""
    paths = PathsConfig()
    for name in ("home", "warehouse", "exports", "artifacts", "cache"):
        console.print(f"{name:10s} {getattr(paths, name)}")


def main() -> None:
    """Console-script entry point: mounts only the sub-app the command line names (all for help)."""
    import sys

    first = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    core_commands = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    if first in SUBAPPS:
        mount([first])
    elif first not in core_commands:
        mount()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
