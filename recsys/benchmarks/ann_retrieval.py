"""Exact retrieval vs the IVF index (``serving.ann``) on large synthetic catalogues: the index's start-up
cost (built, or loaded from its on-disk cache), latency per request (batch 1 and 32, one thread, as the
service runs) and recall of the exact top-k.

    python -m recsys.benchmarks.ann_retrieval                        # 100k and 1M items, d = 50, k = 200
    python -m recsys.benchmarks.ann_retrieval --items 200000 --probes 4,16,64 --k 100

``build s`` is a first start, ``IvfItemIndex.build_or_load`` missing the cache: hash the vectors, k-means,
assign, write the index file and its sidecar. ``load s`` is every later start, the same call hitting the
cache: hash the vectors, verify the file's sha256, read it, with the row's ``probe``. The cache lives in a
temporary directory removed at the end (``--cache-dir`` to keep it).

Item vectors are unit vectors around 1,000 random centres (a catalogue with structure, like trained item
embeddings); user vectors are drawn the same way. Exact search is what the service does without the
index: one matrix product over every item, then ``torch.topk``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recsys.serving.ann import IvfItemIndex


def _catalogue(n: int, d: int, seed: int, centres: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, d)).astype(np.float32)
    x = middle[rng.integers(0, centres, n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _ms_per_request(
    fn: Callable[[np.ndarray], np.ndarray], users: np.ndarray, batch: int, repeats: int
) -> float:
    fn(users[:batch])  # warm-up
    started = time.perf_counter()
    for r in range(repeats):
        lo = (r * batch) % (len(users) - batch + 1)
        fn(users[lo : lo + batch])
    return (time.perf_counter() - started) / (repeats * batch) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", default="100000,1000000", help="Catalogue sizes, comma separated.")
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--k", type=int, default=200, help="Top-k (the service's pool size).")
    parser.add_argument("--probes", default="8,16,64")
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=None, help="Keep the index cache here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cache_dir is not None:
        _run(args, args.cache_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="ann-cache-") as cache:
            _run(args, Path(cache))


def _run(args: argparse.Namespace, cache: Path) -> None:
    print(
        f"{'items':>9} {'index':>12} {'build s':>8} {'load s':>7} {'ms/req b=1':>11} {'ms/req b=32':>12} "
        f"{'recall@' + str(args.k):>11}   (d={args.dim}, {args.threads} thread(s))"
    )
    for n in (int(x) for x in args.items.split(",")):
        items = _catalogue(n, args.dim, seed=0)
        users = _catalogue(args.users, args.dim, seed=1)
        table = torch.from_numpy(items)

        def exact(u: np.ndarray, table: torch.Tensor = table) -> np.ndarray:
            return torch.topk(torch.from_numpy(u) @ table.T, args.k, dim=1).indices.numpy() + 1

        truth = exact(users)
        ms1 = _ms_per_request(exact, users, 1, 20)
        ms32 = _ms_per_request(exact, users, 32, 4)
        print(f"{n:>9} {'exact':>12} {'-':>8} {'-':>7} {ms1:>11.2f} {ms32:>12.2f} {1.0:>11.3f}")
        padded = np.vstack([np.zeros((1, args.dim), dtype=np.float32), items])
        started = time.perf_counter()
        built = IvfItemIndex.build_or_load(padded, threads=args.threads, cache_dir=cache)
        build = time.perf_counter() - started
        if built.loaded_from_cache:  # a kept --cache-dir already held it: no build was timed
            build = float("nan")
        for probe in (int(p) for p in args.probes.split(",")):
            started = time.perf_counter()
            index = IvfItemIndex.build_or_load(padded, probe=probe, threads=args.threads, cache_dir=cache)
            load = time.perf_counter() - started
            if not index.loaded_from_cache:
                raise RuntimeError(f"the cache in {cache} did not serve the index built a moment ago")

            def ivf(u: np.ndarray, index: IvfItemIndex = index) -> np.ndarray:
                return index.search(u, args.k).item_idx

            found = ivf(users)
            recall = float(
                np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth, strict=True)])
            )
            ms1 = _ms_per_request(ivf, users, 1, 50)
            ms32 = _ms_per_request(ivf, users, 32, 8)
            label = f"ivf {index.lists}/{index.probe}"
            print(f"{n:>9} {label:>12} {build:>8.1f} {load:>7.2f} {ms1:>11.2f} {ms32:>12.2f} {recall:>11.3f}")


if __name__ == "__main__":
    main()
