"""Offline bento build and the ``serving`` CLI sub-app (register, list, build, publish-impressions).

``build_bento`` builds the recommendation service into the local bento store (under ``BENTOML_HOME``) with
no network step: ``lock_packages`` is false and the packages are exactly the pins of ``pyproject.toml``'s
``[project].dependencies``; the model tags are resolved to concrete versions (``name:latest`` ->
``name:<data version>-<hash>``), packed into the bento and pinned through ``RECSYS_SERVING_*`` environment
variables, together with the build time that ``/metadata`` reports. ``bentoml containerize <tag>`` turns
the bento into an OCI image where Docker exists (it then needs the package index to install the pins).
"""

from __future__ import annotations

import json
import shutil
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

import recsys.core  # noqa: F401  (BENTOML_HOME and telemetry defaults before BentoML is imported)
from recsys.core.atomic import owned_tempdir
from recsys.core.environment import PROJECT_ROOT, state_dir
from recsys.serving.service import ENV_PREFIX, ServingConfig

BENTOFILE = Path(__file__).with_name("bentofile.yaml")


def pinned_requirements(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> list[str]:
    """The project's runtime dependency pins, as written in pyproject.toml."""
    with open(pyproject, "rb") as f:
        data = tomllib.load(f)
    deps = data.get("project", {}).get("dependencies")
    if not deps:
        raise ValueError(f"{pyproject} has no [project].dependencies to pin the bento's packages with")
    return list(deps)


def effective_bentofile(config: ServingConfig, bentofile: Path = BENTOFILE) -> dict[str, Any]:
    """The static bentofile plus the pinned packages, models and ``RECSYS_SERVING_*`` environment."""
    from recsys.serving.registry import resolve

    with open(bentofile) as f:
        options: dict[str, Any] = yaml.safe_load(f)
    retriever = resolve(config.retriever)
    ranker = resolve(config.ranker) if config.ranker else None
    users = resolve(config.user_embeddings) if config.user_embeddings else None  # /user_embedding's table
    built = datetime.now(UTC).isoformat(timespec="seconds")
    pinned = config.model_copy(
        update={"retriever": retriever, "ranker": ranker, "user_embeddings": users, "build_time": built}
    )
    envs = []
    for name, value in pinned.model_dump(mode="json").items():
        if value is None or name in ("api_key", "impressions_dir"):
            continue  # secrets and machine paths are given where the bento runs, never baked in
        envs.append({"name": ENV_PREFIX + name.upper(), "value": str(value)})
    python = dict(options.get("python") or {})
    python.update({"packages": pinned_requirements(), "lock_packages": False})
    return {**options, "python": python, "models": [t for t in (retriever, ranker, users) if t], "envs": envs}


def build_bento(config: ServingConfig, bentofile: Path = BENTOFILE, version: str | None = None) -> str:
    """Build the bento offline from the effective bentofile; returns its tag (``recsys-recommender:<v>``)."""
    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer

    options = effective_bentofile(config, bentofile)
    # BentoML stages a bento in <BENTOML_HOME>/tmp under a name no sweep can tell is abandoned; staged in an
    # owned temp under RECSYS_HOME instead, a build killed mid-way leaves a directory the next start-up sweep
    # removes once this process is gone (BentoML has no public option for it: its container's provider).
    staging = owned_tempdir(state_dir() / "tmp", "bento-build")
    BentoMLContainer.tmp_bento_store_dir.set(str(staging))
    try:
        path = staging / "bentofile.yaml"
        path.write_text(yaml.safe_dump(options, sort_keys=False))
        bento = bentoml.bentos.build_bentofile(str(path), build_ctx=str(PROJECT_ROOT), version=version)
    finally:
        BentoMLContainer.tmp_bento_store_dir.reset()
        shutil.rmtree(staging, ignore_errors=True)
    return str(bento.tag)


# -- CLI ----------------------------------------------------------------------------------------------------
app = typer.Typer(help="Model registry, bento build and the impressions log.", no_args_is_help=True)


@app.command("register")
def register_command(
    name: Annotated[str, typer.Option(help="Store name, e.g. ml100k-hstu.")],
    architecture: Annotated[
        str, typer.Option(help="models.registry name: hstu, hstu-large, sasrec, popularity.")
    ],
    weights: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="A .safetensors state dict.")],
    config: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="The model config as JSON.")],
    dataset: Annotated[str, typer.Option(help="Warehouse dataset: catalogue and histories come from it.")],
    task: Annotated[str, typer.Option(help="retrieval or ranking.")] = "retrieval",
    metrics: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Metrics JSON.")] = None,
    warehouse: Annotated[
        Path | None, typer.Option(help="Warehouse file (default var/warehouse.duckdb).")
    ] = None,
) -> None:
    """Register trained weights with the dataset's catalogue, histories and data version."""
    from safetensors.torch import load_file

    from recsys.core.config import PathsConfig
    from recsys.models.registry import build_model, entry
    from recsys.serving.registry import catalog_from_warehouse, histories_from_warehouse, register_model
    from recsys.warehouse import Warehouse

    if task not in ("retrieval", "ranking"):
        raise typer.BadParameter("task must be retrieval or ranking")
    model = build_model(architecture, entry(architecture).config_cls(**json.loads(config.read_text())))
    model.load_state_dict(load_file(str(weights)), strict=True)
    with Warehouse(warehouse or PathsConfig().warehouse, read_only=True) as wh:
        items = catalog_from_warehouse(wh, dataset)
        histories = histories_from_warehouse(wh, dataset)
        data_version = wh.version(f"{dataset}.sequences")
    tag = register_model(
        name,
        architecture=architecture,
        task=task,  # type: ignore[arg-type]
        model=model,
        items=items,
        data_version=data_version,
        metrics=json.loads(metrics.read_text()) if metrics else {},
        histories=histories,
    )
    typer.echo(tag)


@app.command("list")
def list_command(name: Annotated[str | None, typer.Argument(help="Only this store name.")] = None) -> None:
    """Registered models, newest first."""
    from recsys.serving.registry import list_models

    for row in list_models(name):
        typer.echo(json.dumps(row, sort_keys=True))


@app.command("build")
def build_command(
    retriever: Annotated[str, typer.Option(help="Retriever tag (name:latest is resolved and pinned).")],
    ranker: Annotated[str | None, typer.Option(help="Ranker tag.")] = None,
    version: Annotated[str | None, typer.Option(help="Bento version (default: generated).")] = None,
    user_embeddings: Annotated[
        str | None, typer.Option(help="Tag of registered user embeddings (/user_embedding).")
    ] = None,
) -> None:
    """Build the service bento offline (no lock step); prints its tag."""
    config = ServingConfig(retriever=retriever, ranker=ranker, user_embeddings=user_embeddings)
    typer.echo(build_bento(config, version=version))


@app.command("publish-impressions")
def publish_impressions_command(
    warehouse: Annotated[
        Path | None, typer.Option(help="Warehouse file (default var/warehouse.duckdb).")
    ] = None,
    spool: Annotated[Path | None, typer.Option(help="Spool dir (default var/serving/impressions).")] = None,
    table: Annotated[str, typer.Option(help="Target table.")] = "serving_impressions",
) -> None:
    """Load the impressions spool into the warehouse (one transaction)."""
    from recsys.core.config import PathsConfig
    from recsys.serving.impressions import publish_impressions

    version = publish_impressions(warehouse or PathsConfig().warehouse, spool, table=table)
    typer.echo(f"{version.table_name}: {version.row_count} rows, version {version.version}")


if __name__ == "__main__":
    app()
