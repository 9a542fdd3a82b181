"""Benchmark of M-FALCON against naive per-candidate scoring for the generative ranker (serving.mfalcon).

    python -m recsys.benchmarks.mfalcon                       # 1,000 candidates, histories 200, 512, 2,000
    python -m recsys.benchmarks.mfalcon --histories 512 --candidates 1000 --micro-batch 256 --threads 1

M-FALCON: the history is encoded once (every block's keys/values cached), then the m candidates are scored
against the cache in micro-batches of ``--micro-batch``; the time includes the history encoding (once per
request). Naive: every candidate gets its own full forward pass over ``[history; candidate]``
(``HSTURanker.forward_full``, the same scores), ``--naive-batch`` candidate sequences per call. Naive cost is
exactly linear in m, so it is timed on at most ``--naive-max`` candidates and scaled to m (printed as
"extrapolated"); the scores of both paths on those candidates are compared.

Peak memory: each measurement runs in a fresh process (spawned), and the figure is that process's peak
resident set size (``ru_maxrss``) minus its resident size just before the measured call, so it counts what
the scoring itself allocated (on CUDA: ``torch.cuda.max_memory_allocated``).

The model is the registry's ``hstu-ranker`` default (interleaved item/action tokens, so a history of n
events is 2n tokens; 2 blocks, 2 heads, d = 64) with ``max_len`` = the history and random weights: the cost
does not depend on the weights. CPU timings on a shared machine move with the other load.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from typing import Any

import psutil
import torch

from recsys.models.batch import FeatureSpec, SequenceSpec, SideField, SparseField
from recsys.models.hstu_ranker import History, HSTURanker, HSTURankerConfig, Targets
from recsys.serving.mfalcon import MFalconScorer, naive_scores, request_targets

N_ITEMS = 20_000


def _spec(history: int) -> FeatureSpec:
    return FeatureSpec(
        n_items=N_ITEMS,
        sparse=(
            SparseField(name="user", cardinality=1000, group="user"),
            SparseField(name="category", cardinality=20, group="item"),
            SparseField(name="hour", cardinality=25, group="context"),
        ),
        dense=("d0", "d1", "d2"),
        sequences=(
            SequenceSpec(
                name="history",
                max_len=history,
                side=(SideField(name="category", cardinality=20), SideField(name="action", cardinality=8)),
            ),
        ),
        tasks=("click",),
    )


def _inputs(history: int, m: int, device: torch.device) -> tuple[HSTURanker, History, Targets]:
    torch.manual_seed(0)
    model = HSTURanker(HSTURankerConfig(features=_spec(history))).to(device).eval()
    g = torch.Generator().manual_seed(1)
    hist = History(
        items=torch.randint(1, N_ITEMS + 1, (1, history), generator=g),
        side={
            "category": torch.randint(1, 20, (1, history), generator=g),
            "action": torch.randint(1, 8, (1, history), generator=g),
        },
        ts=torch.sort(torch.randint(0, 10**7, (1, history), generator=g)).values,
        lengths=torch.tensor([history]),
    ).to(device)
    targets = request_targets(
        hist,
        torch.randint(1, N_ITEMS + 1, (1, m), generator=g),
        torch.tensor([10**7 + 3600]),
        sparse={
            "user": torch.full((1, m), 7),
            "category": torch.randint(1, 20, (1, m), generator=g),
            "hour": torch.full((1, m), 13),
        },
        dense=torch.randn(1, m, 3, generator=g),
    ).to(device)
    return model, hist, targets


def _measure(
    path: str,
    history: int,
    m: int,
    used: int,
    micro_batch: int,
    naive_batch: int,
    repeats: int,
    threads: int,
    device: str,
) -> dict[str, Any]:
    """One measurement in this (fresh) process, on the first ``used`` of the m candidates: median seconds,
    peak bytes, the scores."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    model, hist, targets = _inputs(history, m, dev)
    targets = targets.narrow(0, used)
    scorer = MFalconScorer(model, micro_batch=micro_batch)

    def run() -> torch.Tensor:
        if path == "m-falcon":
            return scorer.score(hist, targets)["click"]
        return naive_scores(model, hist, targets, batch=naive_batch)["click"]

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
    if path == "m-falcon":  # warm-up (the naive path is too slow to run twice at long histories)
        run()
    times, out = [], None
    for _ in range(repeats if path == "m-falcon" else 1):
        started = time.perf_counter()
        out = run()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:  # ru_maxrss: KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    assert out is not None
    return {"seconds": statistics.median(times), "peak_bytes": max(peak, 0), "scores": out.cpu()}


def _in_child(*args: Any) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--histories", default="200,512,2000", help="History lengths (events).")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument("--naive-batch", type=int, default=1, help="Candidate sequences per naive call.")
    parser.add_argument("--naive-max", type=int, default=32, help="Time naive on at most this many.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared box).")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = parser.parse_args(argv)
    m = args.candidates
    print(
        f"HSTU ranker (interleaved tokens, 2 blocks, 2 heads, d=64), {m:,} candidates, device {args.device}, "
        f"threads {args.threads}, micro-batch {args.micro_batch}, naive batch {args.naive_batch}"
    )
    print(
        f"{'history':>8} {'m-falcon ms':>12} {'m-falcon MiB':>13} {'naive ms':>12} {'naive MiB':>10} "
        f"{'speedup':>9} {'max |diff|':>11}  note"
    )
    for n in (int(x) for x in args.histories.split(",")):
        common = (args.micro_batch, args.naive_batch, args.repeats, args.threads, args.device)
        fast = _in_child("m-falcon", n, m, m, *common)
        timed = min(m, args.naive_max)
        slow = _in_child("naive", n, m, timed, *common)
        naive_s = slow["seconds"] * m / timed
        diff = float((fast["scores"][:, :timed] - slow["scores"]).abs().max())
        note = f"naive timed on {timed}, extrapolated" if timed < m else ""
        print(
            f"{n:>8,} {fast['seconds'] * 1e3:>12.1f} {fast['peak_bytes'] / 2**20:>13.1f} "
            f"{naive_s * 1e3:>12.0f} {slow['peak_bytes'] / 2**20:>10.1f} {naive_s / fast['seconds']:>8.0f}x "
            f"{diff:>11.1e}  {note}",
            flush=True,
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
