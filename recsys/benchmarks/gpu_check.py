"""The GPU path, checked in one run: kernel accuracy, kernel speed, training throughput, CPU/GPU agreement.

    python -m recsys.benchmarks.gpu_check --source-dir ../shared/data/ml-100k --out gpu_check.json
    TRITON_INTERPRET=1 python -m recsys.benchmarks.gpu_check --smoke   # the same code on a CPU, tiny shapes

Sections (each prints a table; everything also goes to the JSON file):
  a. accuracy: the Triton HSTU attention forward and backward, bf16 and fp32, against the fp32 PyTorch
     reference on ragged batches (lengths uniform in [N/2, N]) with position and time bias: max abs error
     and relative error (max abs error / max abs reference value) of the output and of every gradient.
  b. speed: forward + backward of the Triton kernel, the reference, ``torch.compile`` of the reference and
     PyTorch's ``scaled_dot_product_attention`` (causal softmax attention, same B, H, N, d, dtype): median ms
     and TFLOP/s of the useful work (causal pairs within each row's length).
  c. the unique-id pooling kernel against its reference (values and gradients).
  d. retrieval training throughput (sequences/s) of SASRec, HSTU and HSTU-large on MovieLens-100K with the
     platform's training task, on this device; ``--cpu-baseline FILE`` (the JSON of a CPU run of this script
     with ``--sections d``) adds the speedup over that machine.
  e. NDCG@10 of one seeded model evaluated on the CPU and on the GPU (under the training loop's bf16
     autocast): they must agree to 1e-4.
The run targets under 8 minutes on one GPU; ``--sections`` picks a subset.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from recsys.benchmarks.hstu_attention import fwd_bwd, make_inputs, measure, useful_flops
from recsys.models.ops import hstu_attention

RETRIEVAL_MODELS = ("sasrec", "hstu", "hstu-large")
NDCG_TOLERANCE = 1e-4


def _rel(err: float, scale: float) -> float:
    return err / scale if scale > 0 else err


def _grads(inputs: Any, backend: str, n: int, grad_out: torch.Tensor) -> list[torch.Tensor]:
    out = hstu_attention(
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.lengths,
        normalizer=float(n),
        pos_weight=inputs.pos_weight,
        ts_weight=inputs.ts_weight,
        query_ts=inputs.query_ts,
        key_ts=inputs.key_ts,
        backend=backend,
    )
    return [out.detach().float(), *(g.float() for g in torch.autograd.grad(out, inputs.leaves(), grad_out))]


def accuracy(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Section a: Triton (bf16, fp32) against the fp32 reference, output and every gradient."""
    rows = []
    names = ["out", "dq", "dk", "dv", "dpos", "dts"]
    for n in args.acc_lens:
        reference_inputs = make_inputs(args, n, device, torch.float32)
        grad_out = torch.randn(*reference_inputs.q.shape[:3], args.dv, device=device)
        expected = _grads(reference_inputs, "pytorch", n, grad_out)
        for dtype in (torch.float32, torch.bfloat16):
            inputs = make_inputs(args, n, device, dtype)  # same seed: the same values, rounded to dtype
            got = _grads(inputs, "triton", n, grad_out.to(dtype))
            row: dict[str, Any] = {"N": n, "dtype": str(dtype).removeprefix("torch.")}
            for name, e, g in zip(names, expected, got, strict=True):
                err = float((e - g).abs().max())
                row[f"{name}_abs"] = err
                row[f"{name}_rel"] = _rel(err, float(e.abs().max()))
            rows.append(row)
            del inputs, got
        del reference_inputs, expected
    print("\n(a) Triton HSTU attention vs the fp32 PyTorch reference (max abs error / relative error)")
    print(f"{'N':>6} {'dtype':>9} " + " ".join(f"{n:>17}" for n in names))
    for r in rows:
        cells = " ".join(f"{r[f'{n}_abs']:>8.1e}/{r[f'{n}_rel']:>8.1e}" for n in names)
        print(f"{r['N']:>6} {r['dtype']:>9} {cells}")
    return rows


def _sdpa_step(
    args: argparse.Namespace, n: int, device: torch.device, dtype: torch.dtype
) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(n)
    shape = (args.batch, args.heads, n, args.dqk)
    q, k = (torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_() for _ in range(2))
    v = torch.randn(args.batch, args.heads, n, args.dv, generator=gen).to(device, dtype).requires_grad_()
    grad_out = torch.randn(args.batch, args.heads, n, args.dv, device=device, dtype=dtype)

    def step() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), grad_out)

    return step


def speed(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Section b: ms and TFLOP/s of Triton, the reference, the compiled reference and SDPA."""
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compiled = None
    if args.compile:
        import recsys.models.ops.hstu_attention as op_module

        compiled = torch.compile(op_module.hstu_attention_reference, dynamic=False)
    for n in args.speed_lens:
        flops = useful_flops(args, n)
        row: dict[str, Any] = {"N": n, "dtype": str(dtype).removeprefix("torch.")}
        inputs = make_inputs(args, n, device, dtype)
        steps: dict[str, Callable[[], None]] = {
            "triton": fwd_bwd(inputs, "triton", n),
            "reference": fwd_bwd(inputs, "pytorch", n),
            "sdpa": _sdpa_step(args, n, device, dtype),
        }
        if compiled is not None:
            steps["compiled"] = fwd_bwd(inputs, "pytorch", n, attention=compiled)
        for name, step in steps.items():
            try:
                ms = measure(step, device, args.reps).ms
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                ms = math.nan
            row[f"{name}_ms"] = ms
            row[f"{name}_tflops"] = flops / ms / 1e9 if ms == ms else math.nan
        row["speedup_vs_reference"] = row["reference_ms"] / row["triton_ms"]
        row["time_vs_sdpa"] = row["triton_ms"] / row["sdpa_ms"]
        rows.append(row)
        del inputs, steps
    names = (
        ["triton", "reference", "compiled", "sdpa"]
        if compiled is not None
        else ["triton", "reference", "sdpa"]
    )
    print("\n(b) forward + backward, median ms (TFLOP/s of the useful work)")
    print(f"{'N':>6} " + " ".join(f"{n:>20}" for n in names) + f" {'x ref':>7} {'/ sdpa':>7}")
    for r in rows:
        cells = " ".join(f"{r[f'{n}_ms']:>10.3f} ({r[f'{n}_tflops']:>6.2f})" for n in names)
        print(f"{r['N']:>6} {cells} {r['speedup_vs_reference']:>7.1f} {r['time_vs_sdpa']:>7.2f}")
    return rows


def pooling(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Section c: unique-id gather/pool, Triton against the reference, values and the table gradient."""
    from recsys.models.ops.unique_pooling import deduplicate, unique_gather

    rows = []
    for batch, seq_len, dim in args.pool_shapes:
        gen = torch.Generator().manual_seed(batch * seq_len)
        ids = torch.randint(0, args.pool_items, (batch, seq_len), generator=gen).to(device)
        table = torch.randn(args.pool_items, dim, generator=gen).to(device)
        grad = torch.randn(batch, seq_len, dim, generator=gen).to(device)
        unique, inverse = deduplicate(ids)
        results = {}
        for backend in ("pytorch", "triton"):
            weights = table.clone().requires_grad_()
            out = unique_gather(weights[unique], inverse, backend=backend)  # [B, L, D]
            (g,) = torch.autograd.grad(out, weights, grad)
            results[backend] = (out.detach(), g)
        out_err = float((results["pytorch"][0] - results["triton"][0]).abs().max())
        grad_err = float((results["pytorch"][1] - results["triton"][1]).abs().max())
        rows.append(
            {"batch": batch, "seq_len": seq_len, "dim": dim, "out_abs": out_err, "grad_abs": grad_err}
        )
    print("\n(c) unique-id pooling, Triton vs reference (max abs error)")
    for r in rows:
        print(
            f"  B={r['batch']:>5} L={r['seq_len']:>5} d={r['dim']:>4}: "
            f"out {r['out_abs']:.1e}  grad {r['grad_abs']:.1e}"
        )
    return rows


def _split(args: argparse.Namespace) -> Any:
    from recsys.core.config import PathsConfig
    from recsys.experiments.retrieval import RetrievalExperimentConfig, prepare_split

    config = RetrievalExperimentConfig(dataset="ml100k", source_dir=args.source_dir)
    split, _ = prepare_split(PathsConfig().warehouse, config)
    return split


def throughput(args: argparse.Namespace, device: torch.device, split: Any) -> list[dict[str, Any]]:
    """Section d: training sequences/s of the retrieval models on MovieLens-100K (the platform's task)."""
    import numpy as np

    from recsys.models.registry import build_model
    from recsys.training.loop import LoopConfig, _autocast
    from recsys.training.retrieval import RetrievalTask, RetrievalTrainConfig

    baseline = json.loads(Path(args.cpu_baseline).read_text())["throughput"] if args.cpu_baseline else []
    base = {r["model"]: r["sequences_per_s"] for r in baseline}
    loop = LoopConfig()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        train = RetrievalTrainConfig()
        model = build_model(name, num_items=split.num_items, max_len=train.max_len).to(device).train()
        task = RetrievalTask(model, split, train)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
        steps = list(task.train_batches(0, np.random.default_rng(0)))[: args.train_steps + 1]
        sequences = 0
        for k, step in enumerate(steps):
            if k == 1:  # the first step warms up (allocator, kernels' compilation)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started, sequences = time.perf_counter(), 0
            with _autocast(device, loop):
                loss = task.loss(model, step, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sequences += step.num_sequences
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = sequences / (time.perf_counter() - started)
        rows.append(
            {
                "model": name,
                "steps": len(steps) - 1,
                "sequences_per_s": rate,
                "speedup_vs_cpu": rate / base[name] if name in base else None,
            }
        )
    print(f"\n(d) retrieval training throughput on MovieLens-100K ({_device_name(device)})")
    for r in rows:
        speedup = f"  {r['speedup_vs_cpu']:.1f}x the CPU baseline" if r["speedup_vs_cpu"] else ""
        print(
            f"  {r['model']:>11}: {r['sequences_per_s']:>9.1f} sequences/s over {r['steps']} steps{speedup}"
        )
    return rows


def agreement(args: argparse.Namespace, device: torch.device, split: Any) -> dict[str, Any]:
    """Section e: NDCG@10 of one seeded model on the CPU and on ``device`` (bf16 autocast on CUDA)."""
    from recsys.models.registry import build_model
    from recsys.training.loop import LoopConfig, _autocast
    from recsys.training.retrieval import RetrievalTask, RetrievalTrainConfig

    train = RetrievalTrainConfig()
    torch.manual_seed(0)
    model = build_model("hstu", num_items=split.num_items, max_len=train.max_len).eval()
    figures = {}
    for where in ("cpu", device.type):
        dev = torch.device(where)
        task = RetrievalTask(model.to(dev), split, train)
        with torch.no_grad(), _autocast(dev, LoopConfig()):
            figures[where] = task.evaluate(model, split.test, dev).metrics["ndcg@10"]
    diff = abs(figures["cpu"] - figures[device.type])
    result = {"cpu_ndcg10": figures["cpu"], "device_ndcg10": figures[device.type], "abs_diff": diff}
    result["agrees"] = diff <= NDCG_TOLERANCE
    verdict = "agree" if result["agrees"] else f"DISAGREE (> {NDCG_TOLERANCE})"
    print(
        f"\n(e) NDCG@10 of one seeded HSTU: CPU {figures['cpu']:.6f}, "
        f"{device.type} {figures[device.type]:.6f}: {verdict}"
    )
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", default="abcde", help="which sections to run, e.g. 'ab'")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on a CPU")
    parser.add_argument("--source-dir", type=Path, default=None, help="MovieLens-100K folder (sections d, e)")
    parser.add_argument("--cpu-baseline", type=Path, default=None, help="JSON of a CPU run (section d)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args(argv)
    # The shapes the benchmark helpers read (recsys.benchmarks.hstu_attention).
    args.batch, args.heads, args.dqk, args.dv, args.ragged, args.no_bias = 2, 2, 64, 64, True, False
    args.acc_lens = [200, 1024, 4096, 8192]
    args.speed_lens = [1024, 2048, 4096, 8192]
    args.pool_shapes = [(256, 200, 64), (64, 2000, 64)]
    args.pool_items = 100_000
    args.models = list(RETRIEVAL_MODELS)
    if args.smoke:
        args.dqk = args.dv = 16
        args.acc_lens, args.speed_lens = [9, 24], [16]
        args.pool_shapes, args.pool_items = [(3, 7, 8)], 20
        args.reps, args.compile, args.train_steps = 1, False, 2
        args.models = ["sasrec"]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {"device": _device_name(device), "torch": torch.__version__, "smoke": args.smoke}
    print(f"GPU check on {report['device']} (torch {torch.__version__})")
    started = time.perf_counter()
    if "a" in args.sections:
        report["accuracy"] = accuracy(args, device)
    if "b" in args.sections:
        report["speed"] = speed(args, device)
    if "c" in args.sections:
        report["pooling"] = pooling(args, device)
    if "d" in args.sections or "e" in args.sections:
        split = _split(args)
        if "d" in args.sections:
            report["throughput"] = throughput(args, device, split)
        if "e" in args.sections:
            report["agreement"] = agreement(args, device, split)
    report["wall_s"] = time.perf_counter() - started
    print(f"\ntotal {report['wall_s']:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
