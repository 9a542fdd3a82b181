"""Benchmark of the full-softmax retrieval loss: one forward + backward, chunked vs one fused logits matrix.

    python -m recsys.benchmarks.full_softmax                       # 1,024 positions, 100,000 items, d 64
    python -m recsys.benchmarks.full_softmax --items 1000000 --chunk-sizes 8192 --threads 2

Each configuration runs in its own process, so the peak resident memory growth it prints is that
configuration's alone (fused = a chunk size at least the catalogue: ``F.cross_entropy`` over all logits).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch


def _one(positions: int, items: int, dim: int, chunk: int, threads: int, queue: mp.Queue) -> None:
    from recsys.models.losses import FullSoftmaxConfig, full_softmax_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    user = torch.randn(positions, dim, requires_grad=True)
    table = torch.randn(items + 1, dim, requires_grad=True)
    positives = torch.randint(1, items + 1, (positions,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    loss = full_softmax_loss(user, positives, table, FullSoftmaxConfig(chunk_size=chunk))
    loss.backward()
    seconds = time.perf_counter() - started
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    queue.put((float(loss.detach()), seconds, peak_mib))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-sizes", default="8192", help="Comma-separated; the fused run is added.")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    chunks = [int(c) for c in args.chunk_sizes.split(",") if c] + [args.items]
    ctx = mp.get_context("spawn")
    for chunk in chunks:
        queue: mp.Queue = ctx.Queue()
        proc = ctx.Process(
            target=_one, args=(args.positions, args.items, args.dim, chunk, args.threads, queue)
        )
        proc.start()
        loss, seconds, peak = queue.get()
        proc.join()
        label = "fused" if chunk >= args.items else f"chunk {chunk}"
        print(
            f"P={args.positions} N={args.items} d={args.dim} {label}: loss {loss:.4f}, "
            f"forward+backward {seconds:.2f} s, peak RSS growth {peak:.0f} MiB"
        )


if __name__ == "__main__":
    main()
