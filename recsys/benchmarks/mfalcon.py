"""Benchmark of M-FALCON against naive per-candidate scoring for HSTU (serving.mfalcon).

    python -m recsys.benchmarks.mfalcon                                  # history 512, m = 100, 1,000, 10,000
    python -m recsys.benchmarks.mfalcon --candidates 1000 --micro-batch 512 --threads 2 --naive-max 500

M-FALCON: the history is encoded once (its per-block K/V cached), then the m candidates are scored against
the cache in micro-batches of ``--micro-batch``; the time includes the history encoding (once per request).
Naive: every candidate gets its own forward pass over ``[history; candidate]`` (the same op, the same
scores), run ``--naive-batch`` sequences per call. Naive cost is exactly linear in m, so above
``--naive-max`` candidates it is timed on ``--naive-max`` of them and scaled (printed as "extrapolated").
Both paths score with the candidate-state head (``TargetDotHead``), and their scores are compared.

The model is HSTU base (2 blocks, 1 head, d = 50) with ``max_len`` = history + 1 and random weights: the
cost does not depend on the weights. CPU timings on a shared machine move with the other load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from recsys.models.hstu import HSTU
from recsys.models.registry import build_model
from recsys.serving.mfalcon import MFalconScorer, TargetDotHead, encode_history, naive_candidate_states


def _time(fn, repeats: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--history", type=int, default=512)
    parser.add_argument("--candidates", type=str, default="100,1000,10000")
    parser.add_argument("--micro-batch", type=int, default=256)
    parser.add_argument(
        "--naive-batch", type=int, default=16, help="Per-candidate sequences per forward call."
    )
    parser.add_argument(
        "--naive-max", type=int, default=500, help="Time naive on at most this many candidates."
    )
    parser.add_argument("--num-items", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared box).")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = build_model("hstu", num_items=args.num_items, max_len=args.history + 1, dropout=0.0)
    assert isinstance(model, HSTU)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(1)
    items = torch.randint(1, args.num_items + 1, (1, args.history), generator=gen).to(device)
    ts = (torch.sort(torch.randint(0, 10**7, (1, args.history), generator=gen)).values).to(device)
    lengths = torch.tensor([args.history], device=device)
    request = torch.tensor([10**7 + 3600], device=device)
    head = TargetDotHead()
    scorer = MFalconScorer(model, head, micro_batch=args.micro_batch)

    print(
        f"HSTU base (2 blocks, 1 head, d=50), history {args.history}, device {device}, "
        f"threads {args.threads}, micro-batch {args.micro_batch}, naive batch {args.naive_batch}"
    )
    with torch.no_grad():
        scorer.score(items, ts, lengths, request, items[:, :8])  # warm-up
        encode_s, _ = _time(lambda: encode_history(model, items, ts, lengths, request), args.repeats)
    print(f"history encoding alone (once per request, included below): {encode_s * 1e3:.1f} ms")
    print(f"{'candidates':>10} {'m-falcon ms':>12} {'naive ms':>12} {'speedup':>9} {'max |diff|':>11}  note")
    with torch.no_grad():
        for m in (int(x) for x in args.candidates.split(",")):
            candidates = torch.randint(1, args.num_items + 1, (1, m), generator=gen).to(device)
            fast_s, fast = _time(
                lambda c=candidates: scorer.score(items, ts, lengths, request, c), args.repeats
            )
            timed = min(m, args.naive_max)
            sub = candidates[:, :timed]

            def naive(sub: torch.Tensor = sub) -> torch.Tensor:
                states = naive_candidate_states(
                    model, items, ts, lengths, request, sub, batch=args.naive_batch
                )
                return head(model, None, sub, states)["score"]  # type: ignore[arg-type]

            naive_s, slow = _time(naive, 1)
            naive_s *= m / timed
            assert isinstance(fast, dict) and isinstance(slow, torch.Tensor)
            diff = float((fast["score"][:, :timed] - slow).abs().max())
            note = f"naive extrapolated from {timed}" if timed < m else ""
            print(
                f"{m:>10,} {fast_s * 1e3:>12.1f} {naive_s * 1e3:>12.1f} {naive_s / fast_s:>8.1f}x "
                f"{diff:>11.2e}  {note}"
            )


if __name__ == "__main__":
    main()
