"""Benchmark of HSTU attention, forward + backward: time, peak memory and TFLOP/s, reference vs Triton kernel.

    python -m recsys.benchmarks.hstu_attention                      # N = 256 .. 8192, B=2, H=2, dqk=dv=64
    python -m recsys.benchmarks.hstu_attention --batch 8 --heads 4 --seq-lens 512,1024 --ragged --dtype bf16
    python -m recsys.benchmarks.hstu_attention --model-step hstu,hstu-large --batch 128 \
        --seq-lens 200 --threads 1

On a GPU both backends run (bf16 by default) and the speedup of the kernel is printed. On a CPU only the
PyTorch reference runs (fp32): the Triton kernels need a GPU, and the Triton interpreter is a test tool,
100-1000x slower than eager. CPU sizes whose extrapolated time or memory exceeds the budget are skipped, with
the reason printed. FLOPs count the useful work only (the causal pairs within each row's length):
forward 2 * H * pairs * (dqk + dv), backward twice that, no recomputation counted.

``--model-step`` times whole training steps of registry models instead (HSTU's forward, the sampled-softmax
loss over every position, backward and an AdamW step, timestamps a day apart on average): the cost of the
attention inside the model, bias and mask included, on the shapes training sees.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from recsys.models.ops import hstu_attention

NUM_BUCKETS = 129


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    pos_weight: torch.Tensor | None
    ts_weight: torch.Tensor | None
    query_ts: torch.Tensor | None
    key_ts: torch.Tensor | None

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.q, self.k, self.v, self.pos_weight, self.ts_weight) if t is not None]


@dataclass(frozen=True)
class Result:
    ms: float  # median forward + backward wall time
    peak_mb: float  # peak memory above what the inputs already held


def make_lengths(args: argparse.Namespace, n: int) -> torch.Tensor:
    if not args.ragged:
        return torch.full((args.batch,), n)
    lengths = torch.randint(n // 2, n + 1, (args.batch,), generator=torch.Generator().manual_seed(n))
    lengths[0] = n  # jagged batch: lengths uniform in [N/2, N], one full row
    return lengths


def make_inputs(args: argparse.Namespace, n: int, device: torch.device, dtype: torch.dtype) -> Inputs:
    gen = torch.Generator().manual_seed(n)
    b, h = args.batch, args.heads
    lengths = make_lengths(args, n)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(device, dtype).requires_grad_()

    query_ts = key_ts = pos_weight = ts_weight = None
    if not args.no_bias:
        times = torch.cumsum(torch.randint(0, 86_400, (b, n + 1), generator=gen), dim=1)
        query_ts, key_ts = times[:, 1:].contiguous().to(device), times[:, :-1].contiguous().to(device)
        pos_weight = (0.02 * torch.randn(2 * n - 1, generator=gen)).to(device).requires_grad_()
        ts_weight = (0.02 * torch.randn(NUM_BUCKETS, generator=gen)).to(device).requires_grad_()
    return Inputs(
        q=randn(b, n, h, args.dqk, scale=0.3),
        k=randn(b, n, h, args.dqk, scale=0.3),
        v=randn(b, n, h, args.dv, scale=1.0),
        lengths=lengths.to(device),
        pos_weight=pos_weight,
        ts_weight=ts_weight,
        query_ts=query_ts,
        key_ts=key_ts,
    )


def useful_flops(args: argparse.Namespace, n: int) -> float:
    lengths = make_lengths(args, n).double()
    pairs = float((lengths * (lengths + 1) / 2).sum())
    return 3 * 2 * args.heads * pairs * (args.dqk + args.dv)


def fwd_bwd(
    inputs: Inputs, backend: str, n: int, attention: Callable[..., torch.Tensor] | None = None
) -> Callable[[], None]:
    """One forward + backward of ``attention`` (default: the dispatcher with ``backend``) on ``inputs``."""
    attend = attention or (lambda *args, **kwargs: hstu_attention(*args, **kwargs, backend=backend))
    grad_out = torch.randn(
        *inputs.q.shape[:3], inputs.v.shape[3], device=inputs.q.device, dtype=inputs.q.dtype
    )

    def step() -> None:
        out = attend(
            inputs.q,
            inputs.k,
            inputs.v,
            inputs.lengths,
            normalizer=float(n),
            pos_weight=inputs.pos_weight,
            ts_weight=inputs.ts_weight,
            query_ts=inputs.query_ts,
            key_ts=inputs.key_ts,
        )
        torch.autograd.grad(out, inputs.leaves(), grad_out)

    return step


class PeakRss:
    """Samples the process RSS every millisecond in a thread; CPU tensors have no allocator statistics."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.peak = self.base = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def measure(step: Callable[[], None], device: torch.device, reps: int) -> Result:
    if device.type == "cuda":
        step()  # compile / warm up
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with PeakRss() as rss:  # the untimed first run: fresh allocations, so the RSS rise is the working set
            step()
        peak = (rss.peak - rss.base) / 2**20
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return Result(ms=sorted(times)[len(times) // 2], peak_mb=peak)


def model_step(args: argparse.Namespace, name: str, n: int, device: torch.device) -> Callable[[], None]:
    """One training step of registry model ``name`` on a random [B, n] batch (next item at every position)."""
    from recsys.models.losses import SampledSoftmaxConfig, sample_uniform_negatives, sampled_softmax_loss
    from recsys.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(name, num_items=args.num_items, max_len=n).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(n)
    lengths = make_lengths(args, n)
    items = torch.randint(1, args.num_items + 1, (args.batch, n + 1), generator=gen)
    items = items * (torch.arange(n + 1)[None, :] <= lengths[:, None])  # right padding
    times = torch.cumsum(torch.randint(0, 2 * 86_400, (args.batch, n + 1), generator=gen), dim=1)
    inputs, targets = items[:, :-1].to(device), items[:, 1:].to(device)
    ts, query_ts = times[:, :-1].contiguous().to(device), times[:, 1:].contiguous().to(device)
    lengths = lengths.to(device)
    supervised = targets != 0
    loss_config = SampledSoftmaxConfig()

    def step() -> None:
        users = model(inputs, ts, query_ts, lengths)  # [B, n, D]
        positives = targets[supervised]
        negatives = sample_uniform_negatives(
            args.num_items, (positives.shape[0], loss_config.num_negatives), device=device
        )
        user = users[supervised]  # [P, D]
        loss = sampled_softmax_loss(user, positives, negatives, model.item_vectors(), loss_config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run_model_steps(args: argparse.Namespace, device: torch.device, where: str) -> None:
    names = [x.strip() for x in args.model_step.split(",") if x.strip()]
    print(
        f"Training step (forward, sampled softmax, backward, AdamW) on {where}: B={args.batch} "
        f"num_items={args.num_items} lengths={'ragged [N/2, N]' if args.ragged else 'all N'} "
        f"reps={args.reps} after one warm-up"
    )
    if device.type != "cuda":
        print(
            "cpu ms = process CPU time per step (median): with one thread, the figure that a busy shared "
            "machine distorts least"
        )
    header = f"{'model':>12} {'N':>6} {'median ms':>10} {'min ms':>10} {'cpu ms':>10} {'peak MB':>10}"
    print(header)
    print("-" * len(header))
    for name in names:
        for n in (int(x) for x in args.seq_lens.split(",")):
            step = model_step(args, name, n, device)
            cpu = "-"
            if device.type == "cuda":
                result = measure(step, device, args.reps)
                fastest = result.ms
            else:
                with PeakRss() as rss:
                    step()
                times, cpu_times = [], []
                for _ in range(args.reps):
                    t0, c0 = time.perf_counter(), time.process_time()
                    step()
                    times.append((time.perf_counter() - t0) * 1e3)
                    cpu_times.append((time.process_time() - c0) * 1e3)
                result = Result(ms=sorted(times)[len(times) // 2], peak_mb=(rss.peak - rss.base) / 2**20)
                fastest = min(times)
                cpu = f"{sorted(cpu_times)[len(cpu_times) // 2]:.1f}"
            print(f"{name:>12} {n:>6} {result.ms:>10.1f} {fastest:>10.1f} {cpu:>10} {result.peak_mb:>10.0f}")


def reference_bytes(args: argparse.Namespace, n: int, elem: int) -> float:
    """Rough working set of the reference: ~12 live [B, H, N, N] tensors (scores, bias, SiLU, mask, grads)."""
    return 12.0 * args.batch * args.heads * n * n * elem


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dqk", type=int, default=64)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--seq-lens", default="256,512,1024,2048,4096,8192")
    parser.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="GPU: bf16, CPU: fp32"
    )
    parser.add_argument("--ragged", action="store_true", help="lengths uniform in [N/2, N] instead of all N")
    parser.add_argument("--no-bias", action="store_true", help="leave out the position and time tables")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--model-step",
        default=None,
        help="Comma-separated registry models (e.g. hstu,hstu-large): time training steps instead of the op",
    )
    parser.add_argument("--num-items", type=int, default=1682, help="Catalogue size for --model-step")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--cpu-max-gb", type=float, default=6.0, help="skip CPU sizes needing more memory")
    parser.add_argument(
        "--cpu-max-seconds", type=float, default=60.0, help="skip CPU sizes extrapolated slower"
    )
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if cuda else "fp32")
    ]
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = ["pytorch", "triton"] if cuda else ["pytorch"]
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    if args.model_step:
        run_model_steps(args, device, where)
        return
    print(
        f"HSTU attention fwd+bwd on {where}: B={args.batch} H={args.heads} dqk={args.dqk} dv={args.dv} "
        f"{str(dtype).removeprefix('torch.')} bias={'off' if args.no_bias else 'pos+time'} "
        f"lengths={'ragged [N/2, N]' if args.ragged else 'all N'} reps={args.reps} (median)"
    )
    if not cuda:
        print(
            "No GPU: the PyTorch reference only (the Triton kernels need CUDA; the interpreter is for tests)."
        )
    header = f"{'N':>6} {'backend':>8} {'ms':>10} {'peak MB':>10} {'TFLOP/s':>8} {'speedup':>8}"
    print(header)
    print("-" * len(header))

    last_cpu_ms: dict[int, float] = {}
    for n in (int(x) for x in args.seq_lens.split(",")):
        ref_ms = None
        for backend in backends:
            if not cuda:
                need_gb = reference_bytes(args, n, dtype.itemsize) / 2**30
                if need_gb > args.cpu_max_gb:
                    print(
                        f"{n:>6} {backend:>8}  skipped: needs ~{need_gb:.1f} GB "
                        f"> --cpu-max-gb {args.cpu_max_gb}"
                    )
                    continue
                if last_cpu_ms:
                    prev_n, prev_ms = max(last_cpu_ms.items())
                    guess_s = args.reps * prev_ms * (n / prev_n) ** 2 / 1e3
                    if guess_s > args.cpu_max_seconds:
                        print(
                            f"{n:>6} {backend:>8}  skipped: ~{guess_s:.0f} s extrapolated from N={prev_n} "
                            f"> --cpu-max-seconds {args.cpu_max_seconds:.0f}"
                        )
                        continue
            inputs = make_inputs(args, n, device, dtype)
            try:
                result = measure(fwd_bwd(inputs, backend, n), device, args.reps)
            except torch.OutOfMemoryError:
                print(f"{n:>6} {backend:>8}  out of memory")
                torch.cuda.empty_cache()
                continue
            finally:
                del inputs
            tflops = useful_flops(args, n) / result.ms / 1e9
            speedup = f"{ref_ms / result.ms:>7.1f}x" if ref_ms is not None and backend == "triton" else ""
            print(
                f"{n:>6} {backend:>8} {result.ms:>10.1f} {result.peak_mb:>10.0f} {tflops:>8.3g} {speedup:>8}"
            )
            if backend == "pytorch":
                ref_ms = result.ms
                if not cuda:
                    last_cpu_ms[n] = result.ms


if __name__ == "__main__":
    main()
