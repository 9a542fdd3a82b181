"""Prefect flows of continual training: the whole streaming protocol, and the nightly retrain.

The logic lives in ``experiments.continual`` (``run_continual``, ``continue_from_latest``); the flows wrap
it, log through Prefect and attach the forgetting matrices as markdown artifacts.

- ``continual_flow(config)``: every method learns periods 1..k; artifact ``continual-<ds>``.
- ``nightly_incremental_flow(dataset, method)``: loads the newest checkpoint and learns only the next unseen
  period; artifact ``continual-nightly-<ds>-<method>``. ``nightly_deployment()`` is its scheduled
  deployment (cron ``NIGHTLY_CRON``, UTC); ``python -m recsys.flows.continual`` serves it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.deployments.runner import RunnerDeployment

import recsys.core  # noqa: F401  (telemetry off, Prefect home) before Prefect starts its server
from recsys.evaluation.forgetting import format_matrix
from recsys.experiments.continual import (
    ContinualConfig,
    claim_verdict,
    continue_from_latest,
    format_matrices,
    gate_lines,
    run_continual,
    summary_table,
)

NIGHTLY_CRON = "0 3 * * *"


def _key(*parts: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only.
    return "-".join(p.replace("_", "-").lower() for p in parts)


@flow(name="continual-training", log_prints=False)
def continual_flow(config: ContinualConfig) -> dict[str, Any]:
    """Run the streaming protocol for every method of ``config``; returns the summary per method."""
    log = get_run_logger()
    result = run_continual(config, echo=log.info)
    markdown = "\n".join(
        [
            f"# Continual training on {config.dataset}",
            "",
            f"Experiment `{result.experiment_id}`, examples {result.data_version}.",
            "",
            summary_table(result),
            "",
            claim_verdict(result),
            "",
            *gate_lines(result),
            "",
            "## Forgetting matrices (AUC)",
            "",
            format_matrices(result),
        ]
    )
    create_markdown_artifact(
        key=_key("continual", config.dataset),
        markdown=markdown,
        description="AUC after each step (rows) on every learned period (columns), per method",
    )
    return {
        "experiment_id": result.experiment_id,
        "report": str(result.report_path),
        "methods": {name: r.summary.as_dict() for name, r in result.methods.items()},
    }


@flow(name="continual-nightly", log_prints=False)
def nightly_incremental_flow(dataset: str = "synthetic", method: str = "sdft") -> dict[str, Any]:
    """Learn the newest unseen period from the latest checkpoint of ``dataset`` / ``method``."""
    log = get_run_logger()
    result = continue_from_latest(dataset, method, echo=log.info)  # type: ignore[arg-type]
    lines = [f"# Nightly continual step: {dataset} / {method}", "", result.message, ""]
    if result.auc is not None:
        lines += ["Forgetting matrix so far (AUC):", "", format_matrix(result.auc)]
    create_markdown_artifact(
        key=_key("continual-nightly", dataset, method),
        markdown="\n".join(lines),
        description="The period learned tonight and the method's forgetting matrix so far",
    )
    return {"experiment_id": result.experiment_id, "step": result.step, "message": result.message}


def nightly_deployment(
    dataset: str = "synthetic", method: str = "sdft", cron: str = NIGHTLY_CRON
) -> RunnerDeployment:
    """The scheduled deployment of the nightly retrain (serve it with ``prefect.serve`` or ``__main__``)."""
    return nightly_incremental_flow.to_deployment(
        name=f"continual-nightly-{_key(dataset, method)}",
        cron=cron,
        parameters={"dataset": dataset, "method": method},
        description="Nightly: learn the newest unseen period from the latest continual checkpoint.",
        tags=["continual", dataset, method],
    )


if __name__ == "__main__":  # pragma: no cover - a long-running server process
    from prefect import serve

    serve(nightly_deployment())
