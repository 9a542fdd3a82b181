"""Prefect flow: the feature build of an ingested dataset, partitioned by user hash, run on a Dask cluster.

The work is ``recsys.features.partitioned``'s; this flow maps its two worker steps over the partitions through
``prefect_dask.DaskTaskRunner``: a local cluster of ``n_workers`` single-threaded processes by default, or an
existing Dask scheduler (``address="tcp://host:8786"``) for a real cluster. The plan and the publish run in
the flow's own process (they hold the warehouse's write connection); the workers only read. Then the
leave-one-out split and the Parquet export are built as in ``flows/build_features.py``.

Ingest first (``recsys features build`` ingests and builds single-process; afterwards this flow rebuilds
nothing unless the inputs changed, because both builds share their cache keys).

CLI (the lead mounts ``app`` as ``parallel-features``):
``recsys parallel-features build --dataset synthetic --partitions 4 --workers 2``
``recsys parallel-features build --dataset synthetic --address tcp://scheduler:8786``
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL
from prefect_dask import DaskTaskRunner

import recsys.core  # noqa: F401  (telemetry off, Prefect home) before Prefect starts its server
from recsys.core.config import PathsConfig
from recsys.features.config import FeatureConfig
from recsys.features.partitioned import (
    ItemPart,
    PartitionConfig,
    PartitionPlan,
    UserPart,
    cleanup,
    plan_partitioned,
    publish_partitioned,
    run_item_partition,
    run_user_partition,
)
from recsys.features.sequences import check_dataset
from recsys.flows.build_features import export, splits
from recsys.warehouse import Warehouse


def local_cluster(n_workers: int = 2) -> dict[str, Any]:
    """Dask LocalCluster arguments: one single-threaded process per worker (numpy and DuckDB inside a
    task use their own threads; processes sidestep the GIL for the Python parts)."""
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    return {"n_workers": n_workers, "threads_per_worker": 1, "processes": True}


def dask_runner(address: str | None = None, n_workers: int = 2) -> DaskTaskRunner:
    """A runner on the scheduler at ``address`` or, when None, on a temporary local cluster."""
    if address is not None:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs=local_cluster(n_workers))


@contextmanager
def workers_share_api() -> Iterator[None]:
    """Point the Dask worker processes at this process's Prefect API.

    Workers are new Python processes: with no ``PREFECT_API_URL`` each one starts its own temporary Prefect
    server (minutes on a loaded machine) and its task runs land there. When no API is configured, this
    starts the ephemeral server that the flow would use anyway and exports its URL for the workers to
    inherit. A real cluster's workers need ``PREFECT_API_URL`` of a real server set on their side.
    """
    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process-wide instance the flow's own client uses
    server.start()
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old


# Our own cache is the warehouse lineage (is_fresh): Prefect's input hashing would only cost time.
@task(cache_policy=NO_CACHE)
def plan(
    warehouse_path: Path, dataset: str, features: FeatureConfig, partition: PartitionConfig
) -> PartitionPlan:
    with Warehouse(warehouse_path) as wh:
        return plan_partitioned(wh, dataset, features, partition)


@task(cache_policy=NO_CACHE)
def user_partition(plan: PartitionPlan, part: int) -> UserPart:
    return run_user_partition(plan, part)


@task(cache_policy=NO_CACHE)
def item_partition(plan: PartitionPlan, part: int, user_parts: list[UserPart]) -> ItemPart:
    return run_item_partition(plan, part, user_parts)


@task(cache_policy=NO_CACHE)
def publish(
    warehouse_path: Path, plan: PartitionPlan, user_parts: list[UserPart], item_parts: list[ItemPart]
) -> dict[str, str]:
    with Warehouse(warehouse_path) as wh:
        seq, ex = publish_partitioned(wh, plan, user_parts, item_parts)
    return {seq.table_name: seq.version, ex.table_name: ex.version}


@flow(name="parallel-features", log_prints=False, task_runner=dask_runner())
def parallel_features_flow(
    dataset: str,
    features: FeatureConfig | None = None,
    partition: PartitionConfig | None = None,
    warehouse_path: Path | None = None,
    export_root: Path | None = None,
    export_features: bool = True,
) -> dict[str, Any]:
    """Sequences and examples built by partition on the flow's Dask runner, then split_loo and the export.

    Returns the published versions, per-partition sizes and worker seconds, and the export directory.
    """
    check_dataset(dataset)
    features = features or FeatureConfig()
    partition = partition or PartitionConfig()
    paths = PathsConfig()
    warehouse_path = Path(warehouse_path or paths.warehouse)
    log = get_run_logger()
    p = plan(warehouse_path, dataset, features, partition)
    try:
        parts = p.partitions
        users = [f.result() for f in user_partition.map(unmapped(p), parts)]
        items = [f.result() for f in item_partition.map(unmapped(p), parts, unmapped(users))]
        versions = publish(warehouse_path, p, users, items)
    finally:
        cleanup(p)
    splits(warehouse_path, dataset, features)
    out: dict[str, Any] = {
        "dataset": dataset,
        "partitions": partition.partitions,
        "skipped": p.fresh,
        "versions": versions,
        "users_per_partition": [u.users for u in users],
        "events_per_partition": [u.events for u in users],
        "worker_seconds": {"users": [round(u.seconds, 3) for u in users]}
        | {"items": [round(i.seconds, 3) for i in items]},
    }
    if export_features:
        out["export_dir"] = str(export(warehouse_path, dataset, features, Path(export_root or paths.exports)))
    log.info("parallel features of %s over %d partitions: %s", dataset, partition.partitions, versions)
    return out


def run_parallel_features(
    dataset: str,
    *,
    features: FeatureConfig | None = None,
    partition: PartitionConfig | None = None,
    address: str | None = None,
    n_workers: int = 2,
    warehouse_path: Path | None = None,
    export_root: Path | None = None,
    export_features: bool = True,
) -> dict[str, Any]:
    """Run the flow on the scheduler at ``address`` or on a local cluster of ``n_workers`` processes."""
    runner = dask_runner(address, n_workers)
    with workers_share_api():
        return parallel_features_flow.with_options(task_runner=runner)(
            dataset,
            features=features,
            partition=partition,
            warehouse_path=warehouse_path,
            export_root=export_root,
            export_features=export_features,
        )


# -- CLI --------------------------------------------------------------------------------------------------

app = typer.Typer(
    help="Feature build partitioned by user hash on a Dask cluster (local or at a scheduler address).",
    no_args_is_help=True,
)


@app.callback()
def _group() -> None:
    """Parallel feature builds."""


@app.command("build")
def build_command(
    dataset: Annotated[str, typer.Option(help="An ingested dataset (warehouse schema).")] = "synthetic",
    partitions: Annotated[int, typer.Option(min=1, help="User (and item) partitions.")] = 4,
    workers: Annotated[int, typer.Option(min=1, help="Local cluster: worker processes.")] = 2,
    address: Annotated[
        str | None, typer.Option(help="An existing Dask scheduler, e.g. tcp://host:8786 (no local cluster).")
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option(help="Parts folder parent; on a real cluster, storage every worker sees.")
    ] = None,
    max_seq_len: Annotated[int, typer.Option(min=1, help="History length models read.")] = 200,
    no_export: Annotated[bool, typer.Option("--no-export", help="Skip the Parquet export.")] = False,
) -> None:
    """Build sequences, examples, split_loo (and the export) of DATASET in parallel; print what it did."""
    out = run_parallel_features(
        dataset,
        features=FeatureConfig(max_seq_len=max_seq_len),
        partition=PartitionConfig(partitions=partitions, work_dir=work_dir),
        address=address,
        n_workers=workers,
        export_features=not no_export,
    )
    for key, value in out.items():
        typer.echo(f"{key:22s} {value}")
