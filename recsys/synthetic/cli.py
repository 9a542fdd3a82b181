"""``synthetic`` commands (a typer sub-app; the lead mounts it on flows/cli.py).

python -m recsys.synthetic.cli generate --out var/synthetic/quick                 # the quick preset
python -m recsys.synthetic.cli generate --out var/synthetic/lr --preset long_range  # long-range dial on
python -m recsys.synthetic.cli generate --out /tmp/bench --events 10000000 --workers 2
python -m recsys.synthetic.cli load --out var/synthetic/quick --dataset synthetic
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Annotated

import typer

from recsys.core.config import PathsConfig
from recsys.synthetic.config import SyntheticConfig
from recsys.synthetic.generator import LAST_WINDOW, generate, read_manifest
from recsys.synthetic.warehouse_load import load_into_warehouse
from recsys.warehouse import Warehouse

app = typer.Typer(help="Synthetic data with known ground truth: generate it, load it into the warehouse.")


@app.command("generate")
def generate_cmd(
    out: Annotated[Path, typer.Option(help="Output directory (its previous run is replaced).")],
    preset: Annotated[
        str, typer.Option(help=f"{' | '.join(SyntheticConfig.preset_names())} (ignored with --events).")
    ] = "quick",
    events: Annotated[int | None, typer.Option(help="Exactly this many click events (benchmark).")] = None,
    seed: Annotated[int, typer.Option(help="Master seed.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes simulating chunks (the data do not change).")] = 1,
    chunk_users: Annotated[
        int | None, typer.Option(help="Users per chunk (default: bounded memory).")
    ] = None,
    log_impressions: Annotated[bool, typer.Option(help="With --events: also write the impressions.")] = False,
) -> None:
    """Generate a dataset and print its size, oracle AUC, throughput and peak memory."""
    if events is not None:
        config = SyntheticConfig.for_events(events, seed, log_impressions=log_impressions)
    else:
        config = SyntheticConfig.preset(preset, seed)
    start = time.perf_counter()
    manifest = generate(config, out, chunk_users=chunk_users, workers=workers)
    wall = time.perf_counter() - start
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    c = manifest.counts
    typer.echo(f"data version {manifest.data_version} -> {out}")
    typer.echo(
        f"users {c['users']:,}  items {c['items']:,}  requests {c['requests']:,}  "
        f"impressions {c['impressions']:,}  events {c['events']:,}  "
        f"({c['events'] / max(c['users'], 1):.1f} clicks/user)"
    )
    if manifest.oracle_auc is not None:
        typer.echo(
            f"oracle AUC {manifest.oracle_auc:.4f}  last-{LAST_WINDOW} AUC {manifest.last100_auc:.4f}  "
            f"click rate {manifest.click_rate:.4f}  (all logged impressions)"
        )
    if manifest.test_oracle_auc is not None and manifest.long_range_share is not None:
        typer.echo(
            f"test impressions (ts >= {manifest.test_start_ts}): oracle AUC {manifest.test_oracle_auc:.4f}  "
            f"last-{LAST_WINDOW} AUC {manifest.test_last100_auc:.4f}  share of the lift needing more "
            f"than the last {LAST_WINDOW} clicks {max(manifest.long_range_share, 0.0):.1%}"
            + (
                f"  slot position alone {manifest.test_position_auc:.4f}"
                if manifest.test_position_auc is not None
                else ""
            )
        )
    typer.echo(
        f"wall {wall:.1f} s  {c['events'] / wall:,.0f} events/s  {c['requests'] / wall:,.0f} requests/s  "
        f"workers {workers}  peak RSS main {rss_self:.0f} MiB, largest worker {rss_child:.0f} MiB"
    )


@app.command("load")
def load_cmd(
    out: Annotated[Path, typer.Option(help="A generated run's directory.")],
    warehouse: Annotated[Path | None, typer.Option(help="Warehouse file (default: the platform's).")] = None,
    dataset: Annotated[str, typer.Option(help="Schema to publish into.")] = "synthetic",
) -> None:
    """Publish a generated run as <dataset>.users/items/impressions/events."""
    manifest = read_manifest(out)
    with Warehouse(warehouse or PathsConfig().warehouse) as wh:
        for table, v in load_into_warehouse(wh, manifest, dataset).items():
            typer.echo(f"{dataset}.{table}: {v.row_count:,} rows, version {v.version}")


if __name__ == "__main__":
    app()
