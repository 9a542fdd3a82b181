"""Benchmark of GPU pooling of unique ids (``recsys.models.ops.unique_pooling``) on Zipf-distributed batches.

For B sequences of up to L item ids drawn from a Zipf(s) popularity over ``n_items`` items, it reports:
- the deduplication: valid steps vs unique ids;
- bytes moved host -> device: the ids alone (int64 [B, L] vs int64 [U] + int32 inverse [B, L]) and, for the
  parameter-server setting where embeddings are looked up on the host, the embeddings too
  (float32 [B, L, D] vs [U, D] + the inverse);
- device embedding memory of the pooled path: the naive lookup materialises [B, L, D], the unique path [U, D];
- timings in ms (median of ``repeats``) of forward + backward of a mean-pooled sequence embedding, all with
  sparse gradients into the table: "naive" = lookup of [B, L, D] + masked mean; "bag" = ``F.embedding_bag`` on
  all B*L ids (the strongest baseline without dedup); "unique" = lookup of the U unique rows +
  ``unique_gather(pool="mean")``; "dedup" = the host-side ``deduplicate`` (torch.unique). On CPU the
  reference backend runs; on CUDA the Triton kernel.

Run: ``python -m recsys.benchmarks.unique_pooling`` (``--help`` for the knobs).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer

from recsys.core.atomic import atomic_path
from recsys.models.ops.unique_pooling import deduplicate, unique_gather

app = typer.Typer(add_completion=False, help="GPU pooling of unique ids: bytes moved and timings.")


def zipf_batch(batch: int, seq_len: int, n_items: int, exponent: float, seed: int) -> torch.Tensor:
    """[B, L] int64 left-padded item ids (1..n_items, popularity rank r with probability ~ r^-s), lengths
    uniform in [L/4, L]; item ids are a random permutation of the ranks so popular ids are not all small."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, n_items + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights / weights.sum())
    ranks = np.searchsorted(cdf, rng.random((batch, seq_len)), side="right")  # 0-based popularity ranks
    ids = rng.permutation(n_items)[np.minimum(ranks, n_items - 1)] + 1
    lengths = rng.integers(max(1, seq_len // 4), seq_len + 1, batch)
    ids[np.arange(seq_len)[None, :] < (seq_len - lengths)[:, None]] = 0
    return torch.from_numpy(ids.astype(np.int64))


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (and Triton compilation)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(
    batch: int,
    seq_len: int,
    n_items: int,
    exponent: float,
    dim: int,
    repeats: int,
    device: torch.device,
    seed: int,
) -> dict[str, float | int | str]:
    ids = zipf_batch(batch, seq_len, n_items, exponent, seed)
    valid = ids != 0
    n_valid = int(valid.sum())
    dedup_seconds = _median_seconds(lambda: deduplicate(ids), repeats, lambda: None)
    unique, inverse = deduplicate(ids)
    n_unique = int(unique.numel())
    table = torch.nn.Parameter(torch.randn(n_items + 1, dim, device=device) * 0.01)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids_d, valid_d = ids.to(device), valid.to(device)
    unique_d, inverse_d = unique.to(device), inverse.to(device)

    def naive() -> None:
        table.grad = None
        steps = F.embedding(ids_d, table, padding_idx=0, sparse=True)  # [B, L, D]
        pooled = (steps * valid_d.unsqueeze(-1)).sum(1) / valid_d.sum(1, keepdim=True).clamp_min(1)
        pooled.sum().backward()

    def naive_bag() -> None:
        table.grad = None
        F.embedding_bag(ids_d, table, mode="mean", padding_idx=0, sparse=True).sum().backward()

    def dedup() -> None:
        table.grad = None
        rows = F.embedding(unique_d, table, sparse=True)  # [U, D]
        unique_gather(rows, inverse_d, pool="mean").sum().backward()

    naive_seconds = _median_seconds(naive, repeats, sync)
    bag_seconds = _median_seconds(naive_bag, repeats, sync)
    dedup_op_seconds = _median_seconds(dedup, repeats, sync)
    steps = batch * seq_len
    return {
        "device": str(device),
        "backend": "triton" if device.type == "cuda" else "pytorch",
        "batch": batch,
        "seq_len": seq_len,
        "n_items": n_items,
        "zipf_s": exponent,
        "dim": dim,
        "valid_steps": n_valid,
        "unique_ids": n_unique,
        "unique_share": n_unique / max(n_valid, 1),
        "id_bytes_naive": steps * 8,
        "id_bytes_dedup": n_unique * 8 + steps * 4,
        "emb_bytes_naive": steps * dim * 4,
        "emb_bytes_dedup": n_unique * dim * 4 + steps * 4,
        "pooled_activation_bytes_naive": steps * dim * 4,
        "pooled_activation_bytes_dedup": n_unique * dim * 4,
        "host_dedup_ms": dedup_seconds * 1e3,
        "naive_fwd_bwd_ms": naive_seconds * 1e3,
        "naive_bag_fwd_bwd_ms": bag_seconds * 1e3,
        "dedup_fwd_bwd_ms": dedup_op_seconds * 1e3,
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:8.2f}"


def _print(rows: list[dict[str, float | int | str]]) -> None:
    header = (
        f"{'B':>4} {'L':>5} {'s':>4} {'valid':>8} {'unique':>8} {'uniq%':>6} | {'ids MiB naive/dedup':>19} | "
        f"{'emb MiB naive/dedup':>19} | {'dedup':>6} {'naive':>7} {'bag':>7} {'unique':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['batch']:>4} {r['seq_len']:>5} {r['zipf_s']:>4} {r['valid_steps']:>8} {r['unique_ids']:>8} "
            f"{100 * float(r['unique_share']):>5.1f}% | "
            f"{_mib(float(r['id_bytes_naive']))}/{_mib(float(r['id_bytes_dedup']))} | "
            f"{_mib(float(r['emb_bytes_naive']))}/{_mib(float(r['emb_bytes_dedup']))} | "
            f"{float(r['host_dedup_ms']):6.1f} {float(r['naive_fwd_bwd_ms']):7.1f} "
            f"{float(r['naive_bag_fwd_bwd_ms']):7.1f} "
            f"{float(r['dedup_fwd_bwd_ms']):7.1f}"
        )


@app.command()
def main(
    batch: int = typer.Option(256, help="Sequences per batch (B)."),
    seq_lens: str = typer.Option("200,1000", help="Comma-separated window lengths L."),
    exponents: str = typer.Option("0.8,1.1", help="Comma-separated Zipf exponents s."),
    n_items: int = typer.Option(1_000_000, help="Catalogue size."),
    dim: int = typer.Option(64, help="Embedding width D."),
    repeats: int = typer.Option(5, help="Timed repetitions (median reported)."),
    threads: int = typer.Option(1, help="torch CPU threads (benchmarks pin them for stable figures)."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu or cuda."),
    seed: int = typer.Option(0),
    out: Path | None = typer.Option(None, help="Also write the rows as JSON here."),  # noqa: B008
) -> None:
    torch.set_num_threads(threads)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    rows = [
        run_case(batch, int(length), n_items, float(s), dim, repeats, dev, seed)
        for length in seq_lens.split(",")
        for s in exponents.split(",")
    ]
    print(
        f"unique-id pooling, device {dev}, D = {dim}, {n_items:,} items, {threads} thread(s), "
        "mean pool, forward + backward (ms, median)"
    )
    _print(rows)
    if out is not None:
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    app()
