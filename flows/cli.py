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

import core  # noqa: F401  (telemetry off before Prefect/BentoML are imported)
from core.config import PathsConfig
from experiments.retrieval import app as retrieval_app

app = typer.Typer(
    help="End-to-end recommender platform: data -> features -> models -> serving -> A/B readout.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(retrieval_app, name="retrieval", help="Sequential retrieval: SASRec, HSTU, popularity.")

console = Console()


@app.command("runs")
def runs_command(
    kind: Annotated[str | None, typer.Option(help="Only runs of this kind (train, eval, benchmark...).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show the most recent N runs.")] = 30,
) -> None:
    """List the runs recorded in the warehouse (what the dashboard shows)."""
    from warehouse.runs import RunLog

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
            row["run_id"], row["kind"], row["name"], row["status"], str(row["seed"]),
            str(row["data_version"]), wall, short,
        )
    console.print(table)


@app.command("where")
def where_command() -> None:
    """Print where the platform keeps its state (warehouse, exports, artefacts)."""
    paths = PathsConfig()
    for name in ("home", "warehouse", "exports", "artifacts", "cache"):
        console.print(f"{name:10s} {getattr(paths, name)}")


def main() -> None:  # pragma: no cover - console-script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
