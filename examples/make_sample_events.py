"""Write examples/events.csv: a small behaviour log with string ids, from the synthetic generator.

    python examples/make_sample_events.py            # rewrites examples/events.csv (deterministic)

The ``tiny`` synthetic preset (300 users, 500 items) is generated into a temporary folder, and its click
events are written the way a shop's own export looks: user ids like ``u_0042``, item SKUs like
``sku-1a2b``, ISO-8601 UTC timestamps, and the dwell time of each click in seconds (the ``value`` the
ranking examples are labelled with: dwell >= 4 s). Same seed, same file.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import polars as pl

from recsys.synthetic.config import SyntheticConfig
from recsys.synthetic.generator import generate

OUT = Path(__file__).resolve().parent / "events.csv"
#: An odd multiplier modulo 2^16 is a bijection of 0..65535: distinct items keep distinct SKUs.
_SKU_MULTIPLIER = 40_503


def sku(item_id: int) -> str:
    if not 0 <= item_id < 1 << 16:
        raise ValueError(f"item_id {item_id} is outside 0..65535 (the SKU scheme's range)")
    return f"sku-{(item_id * _SKU_MULTIPLIER) & 0xFFFF:04x}"


def sample_events(seed: int = 0, max_users: int = 200) -> pl.DataFrame:
    """The click events of the ``tiny`` preset's first ``max_users`` users, in the shop-export format."""
    config = SyntheticConfig.tiny(seed)
    with tempfile.TemporaryDirectory(prefix="recsys-sample-") as tmp:
        generate(config, tmp)
        events = pl.read_parquet(Path(tmp) / "events" / "*.parquet")
    events = events.filter(pl.col("user_id") < max_users).sort(["ts", "user_id", "item_id"])
    return events.select(
        pl.format("u_{}", pl.col("user_id").cast(pl.Utf8).str.zfill(4)).alias("user_id"),
        pl.col("item_id").map_elements(sku, return_dtype=pl.Utf8).alias("item_id"),
        pl.from_epoch(pl.col("ts"), time_unit="s").dt.strftime("%Y-%m-%dT%H:%M:%SZ").alias("timestamp"),
        pl.col("value").round(1).alias("dwell_s"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    frame = sample_events(args.seed)
    frame.write_csv(args.out)
    print(
        f"{args.out}: {frame.height} events, {frame['user_id'].n_unique()} users, "
        f"{frame['item_id'].n_unique()} items, {args.out.stat().st_size / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()
