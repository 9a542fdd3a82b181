"""The A/B stage: a simulated experiment between served models, as a Prefect flow and a CLI command.

``ab_test_flow(config)`` picks the arms (registered model tags, control first; none = the pipeline's own
retrieval models, registered on the fly by ``simulation.arms.register_pipeline_models``), builds the world
of the dataset (the generator's true model for synthetic data, a response model fitted on the held-out logs
otherwise: ``simulation.response``), runs ``simulation.experiment.run_ab_experiment`` (which publishes the
six ``ab_*`` tables and records the run) and attaches the lift table as a markdown artifact.

``--http URL`` sends the requests of the arm whose model the service at URL serves through HTTP (the
BentoML endpoint); the other arms run the same engine in process.

CLI: ``app`` (typer); the platform CLI mounts it (``recsys ab run``); ``python -m recsys.flows.ab_test run``
works too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field, SecretStr, field_validator

import recsys.core  # noqa: F401  (telemetry off before Prefect/BentoML are imported)
from recsys.core.config import FrozenModel, PathsConfig, describe_config_error
from recsys.flows.observe import StageProgress, artifact_key, table_artifact
from recsys.simulation.experiment import ABExperimentConfig, run_ab_experiment
from recsys.simulation.simulator import SimulationConfig


class ABTestFlowConfig(FrozenModel):
    """What one A/B flow run compares and how long it simulates."""

    dataset: str = Field("synthetic", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Warehouse dataset.")
    tags: tuple[str, ...] = Field(
        (), description="Retriever tags of the arms, control first; empty = the pipeline's models."
    )
    pipeline_models: tuple[str, ...] = Field(
        ("popularity", "sasrec"), description="Without tags: these pipeline models, control first."
    )
    http: str | None = Field(None, description="URL of a running service that serves one of the arms.")
    api_key: SecretStr | None = Field(None, description="X-API-Key of that service (never recorded).")
    policy_temperature: float = Field(
        1.0, ge=0.0, description="Plackett-Luce temperature of in-process arms."
    )
    pool_size: int = Field(200, ge=1, description="Candidate pool of in-process arms.")
    max_epochs: int | None = Field(
        None, ge=1, description="Cap for pipeline models that must be trained first."
    )
    experiment: ABExperimentConfig = ABExperimentConfig()

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) == 1:
            raise ValueError("tags: an experiment needs at least two arms (control first)")
        if len(set(v)) != len(v):
            raise ValueError(f"tags must be distinct, got {v}")
        return v

    @classmethod
    def quick(cls, **overrides: Any) -> ABTestFlowConfig:
        """The default pipeline's A/B stage: ``ABExperimentConfig.quick()`` (well under a minute)."""
        return cls(**({"experiment": ABExperimentConfig.quick()} | overrides))


class ABTestFlowResult(FrozenModel):
    experiment_id: str
    run_id: str | None
    arms: dict[str, str]  # arm -> model tag
    lift_table: str


def _arm_name(tag: str) -> str:
    return tag.split(":", 1)[0]


def _world(dataset: str, warehouse: Path) -> tuple[Any, str | None]:
    """The dataset's simulated world and its data version (synthetic: the truth; else: fitted)."""
    from recsys.simulation.response import FittedResponse, true_response_for
    from recsys.warehouse import Warehouse

    with Warehouse(warehouse) as wh:
        latest = wh.latest(f"{dataset}.events")
        if latest is None:
            raise ValueError(f"dataset {dataset!r} has no events in {warehouse}: run the pipeline first")
        if "synthetic_config" in latest.inputs:
            return true_response_for(wh, dataset), latest.version
        return FittedResponse.from_warehouse(wh, dataset), latest.version


@flow(name="ab-test", log_prints=False)
def ab_test_flow(config: ABTestFlowConfig) -> ABTestFlowResult:
    """Simulate the experiment, publish the A/B tables and attach the lift table as an artifact."""
    from recsys.serving.registry import resolve
    from recsys.simulation.arms import arm_from_tag, register_pipeline_models

    log = get_run_logger()
    paths = PathsConfig()
    if config.tags:
        tags = {_arm_name(t): resolve(t) for t in config.tags}
        if len(tags) != len(config.tags):
            raise ValueError(f"tags: two arms share a model name {list(config.tags)}")
    else:
        tags = register_pipeline_models(
            config.dataset, config.pipeline_models, max_epochs=config.max_epochs, home=paths.home
        )
    log.info("arms (control first): %s", tags)
    http_served = None
    if config.http is not None:
        from recsys.simulation.arms import HttpArm

        probe = HttpArm(config.http, api_key=config.api_key.get_secret_value() if config.api_key else None)
        http_served = probe.metadata["retriever"]["tag"]
        probe.close()
        if http_served not in tags.values():
            raise ValueError(f"http: {config.http} serves {http_served}, which is none of the arms {tags}")
    arms = {
        name: arm_from_tag(
            tag,
            name=tag,
            http=config.http if tag == http_served else None,
            api_key=config.api_key.get_secret_value() if config.api_key else None,
            policy_temperature=config.policy_temperature,
            pool_size=config.pool_size,
            seed=config.experiment.simulation.seed,
        )
        for name, tag in tags.items()
    }
    world, data_version = _world(config.dataset, paths.warehouse)
    simulation = config.experiment.simulation.model_copy(update={"arms": tuple(tags), "control": None})
    experiment = config.experiment.model_copy(
        update={"simulation": SimulationConfig(**simulation.model_dump()), "dataset": config.dataset}
    )
    sim = experiment.simulation
    days = StageProgress(
        artifact_key("ab", config.dataset, "progress"),
        sim.pre_period_days + sim.days,
        f"A/B on {config.dataset}: simulated days",
        log,
    )
    try:
        result = run_ab_experiment(
            experiment,
            arms,
            world,
            warehouse=paths.warehouse,
            data_version=data_version,
            progress=lambda day, n: days.step(f"day {day} ({n} impressions)"),
        )
    finally:
        for arm in arms.values():
            arm.close()
    key = re.sub(r"[^a-z0-9-]+", "-", f"ab-{config.dataset}".lower())
    wanted = ("metric", "arm", "lift", "ci_low", "ci_high", "p_value")
    comparisons = result.tables["ab_comparisons"]
    table_artifact(
        artifact_key("ab", config.dataset, "lift"),
        comparisons.select([c for c in wanted if c in comparisons.columns]).to_dicts(),
        f"Simulated A/B {result.experiment_id}: relative lift vs the control, 95% CI, p",
    )
    create_markdown_artifact(
        key=key,
        markdown=f"# A/B {result.experiment_id} on {config.dataset}\n\n{result.lift_table}\n",
        description=f"Simulated A/B: {', '.join(f'{a}={t}' for a, t in tags.items())}",
    )
    return ABTestFlowResult(
        experiment_id=result.experiment_id, run_id=result.run_id, arms=tags, lift_table=result.lift_table
    )


# -- CLI ----------------------------------------------------------------------------------------------------
app = typer.Typer(help="Simulated A/B tests between served models.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Simulated A/B tests between served models."""


@app.command("run")
def run_command(
    tags: Annotated[
        list[str] | None,
        typer.Argument(help="Retriever tags of the arms, control first; none (or 'pipeline') = defaults."),
    ] = None,
    dataset: Annotated[str, typer.Option(help="Warehouse dataset whose world is simulated.")] = "synthetic",
    days: Annotated[int, typer.Option(min=1, help="Experiment days.")] = 14,
    users_per_day: Annotated[int, typer.Option(min=2, help="Users arriving per day.")] = 200,
    pre_days: Annotated[int, typer.Option(min=0, help="Pre-period days (CUPED covariates).")] = 7,
    session_length: Annotated[int, typer.Option(min=1, help="Most requests per session.")] = 10,
    k: Annotated[int, typer.Option(min=1, help="Slate size.")] = 10,
    seed: Annotated[int, typer.Option(min=0, help="Simulation seed.")] = 0,
    salt: Annotated[str, typer.Option(help="Assignment salt.")] = "ab",
    name: Annotated[str | None, typer.Option(help="Experiment name.")] = None,
    http: Annotated[
        str | None, typer.Option(help="URL of a running service serving one of the arms.")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="RECSYS_SERVING_API_KEY", help="X-API-Key of that service.")
    ] = None,
    quick: Annotated[bool, typer.Option(help="The quick preset (overrides days/users/sessions).")] = False,
) -> None:
    """Simulate an A/B test, publish the ab_* tables (dashboard: A/B page) and print the lift table."""
    from pydantic import ValidationError

    arm_tags = tuple(t for t in (tags or []) if t != "pipeline")
    try:
        simulation = (
            SimulationConfig.quick(seed=seed, salt=salt, k=k)
            if quick
            else SimulationConfig(
                days=days,
                users_per_day=users_per_day,
                pre_period_days=pre_days,
                session_length=session_length,
                k=k,
                seed=seed,
                salt=salt,
            )
        )
        config = ABTestFlowConfig(
            dataset=dataset,
            tags=arm_tags,
            http=http,
            api_key=SecretStr(api_key) if api_key else None,
            experiment=ABExperimentConfig(name=name, simulation=simulation),
        )
    except ValidationError as exc:
        raise typer.BadParameter(describe_config_error(exc)) from exc
    result = ab_test_flow(config)
    typer.echo(f"experiment {result.experiment_id} (run {result.run_id}): {result.arms}\n")
    typer.echo(result.lift_table)


if __name__ == "__main__":
    app()
