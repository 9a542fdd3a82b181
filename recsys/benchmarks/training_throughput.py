"""Training and evaluation throughput of every model, optionally against an earlier git revision.

    python -m recsys.benchmarks.training_throughput --source-dir ../shared/data/ml-100k --threads 1
    python -m recsys.benchmarks.training_throughput --source-dir ../shared/data/ml-100k --compare-to HEAD~3 \\
        --json throughput.json

What is measured, per dataset (MovieLens-100K from ``--source-dir``; the synthetic ``long_history`` preset
with ``--synthetic-users`` users) and model:

- ranking models (DeepFM, DIN, RankMixer at history ``--short-len``; LONGER, LONGER+RankMixer, HyFormer at
  ``--long-len``), built and fed exactly as the ranking table (``recsys ranking run``) builds and feeds them:
  ``load_ranking_data`` with the table's subsample caps, the registry presets, ``RankingTask``'s
  length-bucketed batches of 128, AdamW. Training examples/s over ``--steps`` steps after ``--warmup``
  steps, split into batch assembly, forward (with the loss), backward and the optimiser step; evaluation
  examples/s of ``predict`` over ``--eval-examples`` random test examples (after one warm-up pass).
- retrieval models (SASRec, HSTU, HSTU-large; ``RetrievalTask`` on the leave-one-out split of the same
  dataset, history 200, batch 128, sampled softmax over 128 uniform negatives in every tree): training
  sequences/s with the same split into phases.
- peak RSS of the process that measured the model (data loading included: each model runs in a process of
  its own, so one model's memory never inflates another's figure).

``--compare-to REV`` also measures the code of git revision REV: the revision is checked out into a
temporary ``git worktree`` under the state folder, this file is copied into it, and every measurement runs
in a subprocess whose ``PYTHONPATH`` is that tree; the two trees alternate per model, so a change in the
machine's load hits both alike. The worktree is removed at the end. Both trees read the same warehouse,
prepared once with the current code. Every process uses ``torch.set_num_threads(--threads)``; batches are
drawn with a fixed seed, so both trees train on the same examples.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RANKING_MODELS = ("deepfm", "din", "rankmixer", "longer", "longer-rankmixer", "hyformer")
LONG_MODELS = frozenset({"longer", "longer-rankmixer", "hyformer"})
RETRIEVAL_MODELS = ("sasrec", "hstu", "hstu-large")
DATASETS = ("ml100k", "synthetic_long")
#: The ranking table's subsample caps (README "Ranking / CTR results").
CAPS = {
    "ml100k": {"max_train_examples": 20_000, "max_valid_examples": 4_000},
    "synthetic_long": {"max_train_examples": 20_000, "max_valid_examples": 2_500, "max_test_examples": 5_000},
}
PHASES = ("batch", "forward", "backward", "optimizer")


@dataclass
class Measurement:
    """One model on one dataset in one tree."""

    dataset: str
    model: str
    history: int
    unit: str  # "examples" (ranking) or "sequences" (retrieval)
    train_per_s: float
    eval_per_s: float | None
    phases_s: dict[str, float]  # seconds per measured step, by phase
    peak_rss_mb: float
    steps: int
    items_per_step: float
    threads: int
    error: str | None = None


@dataclass
class Comparison:
    """The rows of one benchmark run: the current tree and, with --compare-to, the earlier revision."""

    current: list[Measurement] = field(default_factory=list)
    baseline: list[Measurement] = field(default_factory=list)
    baseline_rev: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def pairs(self) -> Iterator[tuple[Measurement, Measurement | None]]:
        """Each current measurement with the baseline of the same (dataset, model), if any."""
        base = {(m.dataset, m.model): m for m in self.baseline}
        for m in self.current:
            yield m, base.get((m.dataset, m.model))

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "baseline_rev": self.baseline_rev,
            "current": [asdict(m) for m in self.current],
            "baseline": [asdict(m) for m in self.baseline],
        }


def speedup(after: float | None, before: float | None) -> float | None:
    """after / before, or None when either is missing or before is not positive."""
    if after is None or before is None or before <= 0:
        return None
    return after / before


def phase_shares(phases: dict[str, float]) -> dict[str, float]:
    """Each phase's share of the step time (0..1; empty when nothing was timed)."""
    total = sum(phases.values())
    return {k: v / total for k, v in phases.items()} if total > 0 else {}


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def format_table(result: Comparison) -> str:
    """A markdown table: throughput before/after, speed-up, peak RSS and the current tree's phase split."""
    compare = result.baseline_rev is not None
    head = ["Dataset", "Model", "L", "Unit"]
    if compare:
        head += ["Train/s before", "Train/s after", "Speed-up", "Eval/s before", "Eval/s after", "Speed-up"]
        head += ["RSS MB before", "RSS MB after"]
    else:
        head += ["Train/s", "Eval/s", "RSS MB"]
    head += ["Batch / fwd / bwd / opt (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cur, base in result.pairs():
        row = [cur.dataset, cur.model, str(cur.history), cur.unit]
        if cur.error is not None:
            row += [f"error: {cur.error}"] + [""] * (len(head) - len(row) - 1)
            lines.append("| " + " | ".join(row) + " |")
            continue
        shares = phase_shares(cur.phases_s)
        split = " / ".join(f"{100 * shares.get(p, 0.0):.0f}" for p in PHASES)
        if compare:
            ok = base is not None and base.error is None
            b_train = base.train_per_s if ok and base else None
            b_eval = base.eval_per_s if ok and base else None
            s_train, s_eval = speedup(cur.train_per_s, b_train), speedup(cur.eval_per_s, b_eval)
            row += [_fmt(b_train), _fmt(cur.train_per_s), _fmt(s_train, 2) + ("x" if s_train else "")]
            row += [_fmt(b_eval), _fmt(cur.eval_per_s), _fmt(s_eval, 2) + ("x" if s_eval else "")]
            row += [_fmt(base.peak_rss_mb if ok and base else None), _fmt(cur.peak_rss_mb)]
        else:
            row += [_fmt(cur.train_per_s), _fmt(cur.eval_per_s), _fmt(cur.peak_rss_mb)]
        row.append(split)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- data preparation (parent process, current code) -------------------------------------------------------


def prepare(bench_dir: Path, dataset: str, source_dir: Path | None, synthetic_users: int) -> Path:
    """Build the dataset's warehouse (events, sequences, point-in-time examples) once; returns its path."""
    from recsys.features.config import FeatureConfig
    from recsys.features.point_in_time import build_examples
    from recsys.warehouse import Warehouse

    path = bench_dir / dataset / "warehouse.duckdb"  # the file name must differ from the schema
    with Warehouse(path) as wh:
        if dataset == "ml100k":
            from recsys.ingest.movielens import ingest_movielens

            ingest_movielens(wh, source_dir, dataset=dataset)
        else:
            from recsys.synthetic.config import SyntheticConfig
            from recsys.synthetic.generator import generate, read_manifest
            from recsys.synthetic.warehouse_load import load_into_warehouse

            preset = SyntheticConfig.long_history(0)
            config = preset.model_validate(
                {**preset.model_dump(), "users": {**preset.users.model_dump(), "n_users": synthetic_users}}
            )
            out_dir = bench_dir / f"synthetic-{config.data_version()}"
            try:
                reuse = read_manifest(out_dir).data_version == config.data_version()
            except FileNotFoundError:
                reuse = False
            if not reuse:
                generate(config, out_dir)
            load_into_warehouse(wh, out_dir, dataset=dataset)
        build_examples(wh, dataset, FeatureConfig())
    return path


# -- measurement (worker process, the tree on PYTHONPATH) ---------------------------------------------------


def _timed_steps(
    steps: Iterator[Any],
    loss_fn: Callable[[Any], Any],
    optimizer: Any,
    count: Callable[[Any], int],
    warmup: int,
    measured: int,
) -> tuple[dict[str, float], int, int]:
    """Run warmup + measured training steps; (seconds per phase over the measured ones, steps, items)."""
    phases = dict.fromkeys(PHASES, 0.0)
    done = items = 0
    for i in range(warmup + measured):
        t0 = time.perf_counter()
        try:
            batch = next(steps)
        except StopIteration as exc:
            raise RuntimeError(f"only {i} batches in an epoch: lower --warmup/--steps") from exc
        t1 = time.perf_counter()
        loss = loss_fn(batch)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        if i >= warmup:
            for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                phases[name] += dt
            done += 1
            items += count(batch)
    return phases, done, items


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _optimizer(model: Any, lr: float, device: Any) -> Any:
    """The optimiser the tree's training loop builds (``loop.build_optimizer``; a tree without it built
    plain AdamW inline)."""
    import torch

    from recsys.training import loop
    from recsys.training.loop import OptimizerConfig

    config = OptimizerConfig(lr=lr)
    build = getattr(loop, "build_optimizer", None)
    if build is not None:
        return build(model, config, device)
    return torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )


def measure_ranking(spec: dict[str, Any]) -> Measurement:
    import numpy as np
    import torch

    from recsys.experiments.ranking import build_model
    from recsys.training.loop import seed_everything
    from recsys.training.ranking import RankingDataConfig, RankingTask, RankingTrainConfig, load_ranking_data
    from recsys.training.ranking import predict as rank_predict
    from recsys.warehouse import Warehouse

    name, dataset, history = spec["model"], spec["dataset"], spec["history"]
    with Warehouse(spec["warehouse"], read_only=True) as wh:
        data = load_ranking_data(wh, dataset, RankingDataConfig(**CAPS[dataset]))
    seed_everything(0)
    model, _ = build_model(name, data, history)
    config = RankingTrainConfig(max_len=history)
    task = RankingTask(model, data, config, seed=0)
    device = torch.device("cpu")
    optimizer = _optimizer(model, 2e-3, device)
    model.train()
    steps = iter(task.train_batches(1, np.random.default_rng(spec["seed"])))
    phases, done, items = _timed_steps(
        steps,
        lambda b: task.loss(model, b, device),
        optimizer,
        lambda b: b.batch_size,
        spec["warmup"],
        spec["steps"],
    )
    test = data.splits["test"]
    rng = np.random.default_rng(spec["seed"])
    n_eval = min(len(test), spec["eval_examples"])
    sample = test.subset(np.sort(rng.choice(len(test), size=n_eval, replace=False)))
    rank_predict(model, data, test.subset(np.arange(min(len(test), 256))), history, device)  # warm-up
    started = time.perf_counter()
    rank_predict(model, data, sample, history, device, batch_size=config.eval_batch_size)
    eval_s = time.perf_counter() - started
    total = sum(phases.values())
    return Measurement(
        dataset=dataset,
        model=name,
        history=history,
        unit="examples",
        train_per_s=items / total,
        eval_per_s=n_eval / eval_s,
        phases_s={k: v / done for k, v in phases.items()},
        peak_rss_mb=_peak_rss_mb(),
        steps=done,
        items_per_step=items / done,
        threads=torch.get_num_threads(),
    )


def measure_retrieval(spec: dict[str, Any]) -> Measurement:
    import numpy as np
    import torch

    from recsys.evaluation.retrieval import leave_one_out
    from recsys.features.sequences import load_sequences, num_items
    from recsys.models.registry import build_model, model_config
    from recsys.training.loop import seed_everything
    from recsys.training.retrieval import RetrievalTask, RetrievalTrainConfig
    from recsys.warehouse import Warehouse

    name, dataset = spec["model"], spec["dataset"]
    with Warehouse(spec["warehouse"], read_only=True) as wh:
        split = leave_one_out(load_sequences(wh, dataset), num_items(wh, dataset))
    from recsys.models.losses import SampledSoftmaxConfig

    # The same objective in every tree (128 uniform negatives, the earlier default): the data rule that
    # picks it now would compare full softmax against sampled softmax, not the code's speed.
    config = RetrievalTrainConfig(loss=SampledSoftmaxConfig())
    seed_everything(0)
    model = build_model(name, model_config(name, num_items=split.num_items, max_len=config.max_len))
    task = RetrievalTask(model, split, config)
    device = torch.device("cpu")
    optimizer = _optimizer(model, 1e-3, device)
    model.train()
    steps = iter(task.train_batches(1, np.random.default_rng(spec["seed"])))
    phases, done, items = _timed_steps(
        steps,
        lambda s: task.loss(model, s, device),
        optimizer,
        lambda s: s.num_sequences,
        spec["warmup"],
        spec["steps"],
    )
    total = sum(phases.values())
    return Measurement(
        dataset=dataset,
        model=name,
        history=config.max_len,
        unit="sequences",
        train_per_s=items / total,
        eval_per_s=None,
        phases_s={k: v / done for k, v in phases.items()},
        peak_rss_mb=_peak_rss_mb(),
        steps=done,
        items_per_step=items / done,
        threads=torch.get_num_threads(),
    )


def worker(spec_json: str) -> None:
    """Measure one model (the spec) with the ``recsys`` on sys.path; write the Measurement as JSON."""
    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    measure = measure_retrieval if spec["model"] in RETRIEVAL_MODELS else measure_ranking
    result = measure(spec)
    Path(spec["out"]).write_text(json.dumps(asdict(result)))


def run_worker(tree: Path, spec: dict[str, Any], timeout_s: float) -> Measurement:
    """Measure ``spec`` in a subprocess that imports ``recsys`` from ``tree``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(spec["threads"])}
        cmd = [
            sys.executable,
            "-m",
            "recsys.benchmarks.training_throughput",
            "--worker",
            json.dumps({**spec, "out": str(out)}),
        ]
        try:
            proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout_s)
            failed = proc.returncode != 0 or not out.exists()
            error = (proc.stderr.strip().splitlines() or ["no output"])[-1] if failed else None
        except subprocess.TimeoutExpired:
            failed, error = True, f"timed out after {timeout_s:.0f} s"
        if not failed:
            return Measurement(**json.loads(out.read_text()))
    history = spec["history"]
    return Measurement(
        spec["dataset"], spec["model"], history, "-", 0.0, None, {}, 0.0, 0, 0.0, spec["threads"], error=error
    )


def baseline_tree(repo: Path, rev: str, parent: Path) -> Path:
    """``git worktree add`` of ``rev`` (detached) under ``parent``, with this file copied in."""
    parent.mkdir(parents=True, exist_ok=True)
    tree = Path(tempfile.mkdtemp(prefix="throughput-", dir=parent))
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), rev],
        check=True,
        capture_output=True,
        text=True,
    )
    target = tree / "recsys" / "benchmarks" / Path(__file__).name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(__file__, target)
    return tree


def remove_tree(repo: Path, tree: Path) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
        check=False,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(tree, ignore_errors=True)


def main(argv: list[str] | None = None) -> Comparison | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--source-dir", type=Path, default=None, help="MovieLens-100K folder (ml100k).")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="ml100k and/or synthetic_long.")
    parser.add_argument("--models", default=",".join(RANKING_MODELS + RETRIEVAL_MODELS))
    parser.add_argument("--synthetic-users", type=int, default=300, help="Users of the long-history set.")
    parser.add_argument("--short-len", type=int, default=100, help="History of DeepFM, DIN, RankMixer.")
    parser.add_argument("--long-len", type=int, default=1000, help="History of LONGER(+RankMixer), HyFormer.")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every process.")
    parser.add_argument("--warmup", type=int, default=3, help="Training steps before timing.")
    parser.add_argument("--steps", type=int, default=12, help="Timed training steps (ranking).")
    parser.add_argument("--retrieval-steps", type=int, default=3, help="Timed training steps (retrieval).")
    parser.add_argument("--eval-examples", type=int, default=2048, help="Test examples predicted (ranking).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the batch order and the eval sample.")
    parser.add_argument("--compare-to", default=None, metavar="REV", help="Also measure git revision REV.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds per measurement process.")
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return None

    from recsys.core.config import PathsConfig

    datasets = [d for d in args.datasets.split(",") if d]
    models = [m for m in args.models.split(",") if m]
    for what, chosen, known in (
        ("datasets", datasets, DATASETS),
        ("models", models, RANKING_MODELS + RETRIEVAL_MODELS),
    ):
        bad = sorted(set(chosen) - set(known))
        if bad:
            parser.error(f"--{what}: unknown {bad}; known: {list(known)}")
    if args.warmup < 0 or args.steps < 1 or args.retrieval_steps < 1 or args.threads < 1:
        parser.error("--warmup must be >= 0; --steps, --retrieval-steps and --threads >= 1")
    home = PathsConfig().home
    bench_dir = home / "throughput"
    repo = Path(__file__).resolve().parents[2]
    result = Comparison(baseline_rev=args.compare_to, settings={k: str(v) for k, v in vars(args).items()})
    trees: list[tuple[str, Path]] = [("current", repo)]
    base: Path | None = None
    if args.compare_to is not None:
        base = baseline_tree(repo, args.compare_to, home / "worktrees")
        trees.insert(0, ("baseline", base))
    try:
        for dataset in datasets:
            started = time.perf_counter()
            wh_path = prepare(bench_dir, dataset, args.source_dir, args.synthetic_users)
            print(f"[{dataset}] warehouse ready in {time.perf_counter() - started:.0f} s", flush=True)
            for model in models:
                retrieval = model in RETRIEVAL_MODELS
                history = 200 if retrieval else (args.long_len if model in LONG_MODELS else args.short_len)
                spec = {
                    "dataset": dataset,
                    "model": model,
                    "history": history,
                    "warehouse": str(wh_path),
                    "threads": args.threads,
                    "warmup": 1 if retrieval else args.warmup,
                    "steps": args.retrieval_steps if retrieval else args.steps,
                    "eval_examples": args.eval_examples,
                    "seed": args.seed,
                }
                for label, tree in trees:
                    m = run_worker(tree, spec, args.timeout)
                    (result.baseline if label == "baseline" else result.current).append(m)
                    figure = m.error or f"train {m.train_per_s:,.0f} {m.unit}/s, eval {_fmt(m.eval_per_s)}/s"
                    print(f"[{dataset}] {model} ({label}): {figure}", flush=True)
    finally:
        if base is not None:
            remove_tree(repo, base)
    print(format_table(result))
    if args.json is not None:
        from recsys.core.atomic import atomic_path

        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(result.to_json(), indent=2))
    return result


if __name__ == "__main__":
    main()
