"""Feature-build benchmark: events/s, wall time and peak memory of sequences + point-in-time features.

Run: ``.venv/bin/python -m recsys.benchmarks.feature_build --events 10000000``

It generates N events (``--source synthetic``: the platform's generator, ``SyntheticConfig.for_events(N)``,
impressions off, ``--threads`` worker processes; ``--source numpy``: a much faster rating-log generator
with Zipf-like user activity and item popularity, for 100M), loads them into a fresh warehouse in a temp
dir, and times, on the same data:

- the floor: a bare ``SELECT user_id, list(item_id ORDER BY ts) FROM events GROUP BY user_id``;
- the build: indexes + ``<ds>.sequences`` + ``<ds>.examples`` (every event an example, as on MovieLens,
  with all point-in-time features), i.e. exactly what ``features`` does in the flow, publishing (content
  hash + lineage) included, under ``BuildResources(chunk_events=--chunk-events, memory_limit=--memory-limit,
  temp_directory=<the run's temp dir>)``. The floor runs under the same DuckDB memory_limit and threads.

Peak memory is the RSS of the process tree (generator workers included) sampled every 50 ms in a thread
(DuckDB allocates outside Python's heap).
Targets (README): build within 1.5x of the floor; peak < 8 GB at 100M events on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.features.config import FeatureConfig
from recsys.features.point_in_time import BuildResources, build_examples
from recsys.features.sequences import build_sequences
from recsys.warehouse import Warehouse

DAY = 86_400


class PeakRSS:
    """Highest resident set size seen since the last ``reset()``."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self._proc = psutil.Process()
        self._interval = interval_s
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        """RSS of this process and all its children (generator workers), summed."""
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # exited between listing and reading
                total += child.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self._peak = self._rss()

    @property
    def peak(self) -> int:
        return max(self._peak, self._rss())


def generate_events(path: Path, n_events: int, *, seed: int = 0, chunk: int = 5_000_000) -> int:
    """A rating log: users ~ n/100 with Zipf-like activity, items ~ n/1000 (>= 1000), Zipf popularity.

    ``event`` is added at load time (the constant 'rating'). Timestamps: one-second resolution over 180
    days, roughly increasing with src_row (as in a log file).
    """
    rng = np.random.default_rng(seed)
    n_users = max(n_events // 100, 100)
    n_items = max(n_events // 1_000, 1_000)
    # Zipf-ish weights via a power of a uniform rank: heavy head, long tail, bounded ids.
    u_w = 1.0 / np.arange(1, n_users + 1) ** 0.8
    i_w = 1.0 / np.arange(1, n_items + 1) ** 1.0
    u_cdf, i_cdf = np.cumsum(u_w / u_w.sum()), np.cumsum(i_w / i_w.sum())
    u_perm, i_perm = rng.permutation(n_users) + 1, rng.permutation(n_items) + 1
    t0, span = 1_600_000_000, 180 * DAY
    schema = pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("ts", pa.int64()),
            ("value", pa.float64()),
            ("src_row", pa.int64()),
        ]
    )
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, n_events, chunk):
            m = min(chunk, n_events - start)
            src = np.arange(start, start + m, dtype=np.int64)
            users = u_perm[np.minimum(np.searchsorted(u_cdf, rng.random(m)), n_users - 1)].astype(np.int64)
            items = i_perm[np.minimum(np.searchsorted(i_cdf, rng.random(m)), n_items - 1)].astype(np.int64)
            ts = t0 + (src * span) // n_events + rng.integers(0, 60, m)  # roughly increasing, with jitter
            value = rng.integers(1, 6, m).astype(np.float64)
            writer.write_table(pa.table([users, items, ts, value, src], schema=schema))
    return n_events


@dataclass
class Phase:
    name: str
    wall_s: float
    peak_rss: int


def timed(name: str, fn: Callable[[], object], rss: PeakRSS) -> Phase:
    rss.reset()
    start = time.perf_counter()
    fn()
    phase = Phase(name, time.perf_counter() - start, rss.peak)
    print(f"  done: {name}: {phase.wall_s:.2f} s, peak {phase.peak_rss / 1e9:.2f} GB", flush=True)
    return phase


def configure(wh: Warehouse, memory_limit: str, threads: int, tmp: Path) -> None:
    wh.con.execute(f"SET memory_limit = '{memory_limit}'")
    wh.con.execute(f"SET threads = {int(threads)}")
    wh.con.execute(f"SET temp_directory = '{tmp}'")
    # Insertion order is irrelevant for the tables we build (versions are order-independent hashes).
    wh.con.execute("SET preserve_insertion_order = false")


def load_source(wh: Warehouse, source: str, n_events: int, root: Path, seed: int, workers: int = 2) -> None:
    """Generate ``n_events`` and publish them as ``bench.events`` (+ users/items for ``synthetic``)."""
    t = time.perf_counter()
    if source == "synthetic":
        from recsys.synthetic.config import SyntheticConfig
        from recsys.synthetic.generator import generate
        from recsys.synthetic.warehouse_load import load_into_warehouse

        cfg = SyntheticConfig.for_events(n_events, seed, log_impressions=False)
        manifest = generate(cfg, root / "synthetic", workers=workers)
        print(f"generated {manifest.counts} in {time.perf_counter() - t:.1f} s", flush=True)
        load_into_warehouse(wh, manifest, "bench")
    else:
        path = root / "events.parquet"
        generate_events(path, n_events, seed=seed)
        print(f"generated {n_events:,} events in {time.perf_counter() - t:.1f} s", flush=True)
        wh.publish(
            "bench.events",
            f"SELECT user_id, item_id, ts, 'rating' AS event, value, src_row FROM read_parquet('{path}')",
        )


def run(
    n_events: int,
    *,
    source: str,
    memory_limit: str,
    threads: int,
    workdir: Path | None,
    seed: int,
    chunk_events: int = 2_000_000,
) -> list[Phase]:
    root = Path(tempfile.mkdtemp(prefix="feature-bench-", dir=workdir))
    try:
        phases: list[Phase] = []
        with Warehouse(root / "warehouse.duckdb") as wh, PeakRSS() as rss:
            configure(wh, memory_limit, threads, root / "duckdb_tmp")
            phases.append(
                timed(
                    "generate + load events (not counted)",
                    lambda: load_source(wh, source, n_events, root, seed, workers=threads),
                    rss,
                )
            )
            # Events as examples (as on MovieLens): the synthetic value is the dwell time.
            cfg = FeatureConfig(examples="events", label_threshold=30.0)
            # temp_directory: the connection's (set above; DuckDB cannot switch it once it has spilled).
            res = BuildResources(chunk_events=chunk_events, memory_limit=memory_limit)
            phases.append(
                timed(
                    "floor: list(item_id ORDER BY ts) GROUP BY user_id",
                    lambda: wh.con.execute(
                        "CREATE TABLE floor AS SELECT user_id, list(item_id ORDER BY ts) AS items"
                        " FROM bench.events GROUP BY user_id"
                    ),
                    rss,
                )
            )
            wh.con.execute("DROP TABLE floor")
            phases.append(timed("indexes + sequences", lambda: build_sequences(wh, "bench"), rss))
            phases.append(timed("point-in-time examples", lambda: build_examples(wh, "bench", cfg, res), rss))
        return phases
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(n_events: int, phases: list[Phase], threads: int, memory_limit: str, source: str) -> str:
    by = {p.name: p for p in phases}
    floor = next(p for p in phases if p.name.startswith("floor"))
    build = [by["indexes + sequences"], by["point-in-time examples"]]
    total = sum(p.wall_s for p in build)
    lines = [
        f"feature build benchmark: {n_events:,} events ({source}), DuckDB threads={threads},"
        f" memory_limit={memory_limit}",
        f"{'phase':<52} {'wall s':>9} {'events/s':>13} {'peak RSS GB':>12}",
    ]
    for p in phases:
        lines.append(f"{p.name:<52} {p.wall_s:>9.2f} {n_events / p.wall_s:>13,.0f} {p.peak_rss / 1e9:>12.2f}")
    peak = max(p.peak_rss for p in build)
    name = "full build (sequences + examples)"
    lines.append(f"{name:<52} {total:>9.2f} {n_events / total:>13,.0f} {peak / 1e9:>12.2f}")
    lines.append(
        f"build / floor = {total / floor.wall_s:.2f}x (target <= 1.5x); peak {peak / 1e9:.2f} GB (target < 8)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="number of events to generate")
    parser.add_argument("--memory-limit", default="4GB", help="DuckDB memory_limit")
    parser.add_argument(
        "--chunk-events", type=int, default=2_000_000, help="events per user chunk of the examples build"
    )
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp warehouse goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--source",
        choices=("synthetic", "numpy"),
        default="synthetic",
        help="event generator (see module doc)",
    )
    args = parser.parse_args()
    if args.events < 1_000:
        parser.error("--events must be at least 1000")
    phases = run(
        args.events,
        source=args.source,
        memory_limit=args.memory_limit,
        threads=args.threads,
        workdir=args.workdir,
        seed=args.seed,
        chunk_events=args.chunk_events,
    )
    print(report(args.events, phases, args.threads, args.memory_limit, args.source))


if __name__ == "__main__":
    main()
