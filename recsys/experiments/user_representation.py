"""User representations: the GG-SM mask schedules compared by what a linear probe reads from the embeddings.

Pipeline: MovieLens-100K (or a dataset already in the warehouse) -> ``<ds>.sequences`` -> each user's
history and held-out next period (``recsys.training.user_representation``) -> per mask schedule and seed:
the user encoder trained contrastively with the shared loop (checkpoint selected on validation pair
retrieval, ``pair_recall@10``) -> user embeddings of the whole history under the inference mask -> a fixed
linear probe (``recsys.evaluation.probe``) per user-level task, trained on 70% of the users and tested on the
other 30% (a fixed split by user id) -> a markdown table of test AUC (mean ± std over seeds), paired t-tests
over seeds against the causal mask, the training loss around the mask transition, and the cost per step.

Tasks on MovieLens-100K: gender; age group (<25, 25-34, 35-44, 45+); occupation group (student, technical,
arts and media, professional and services, other); the next period's top genre (the most frequent primary
genre of the held-out events, which training never reads).

Every run is recorded (kind ``user_repr``) with its per-step training loss (split ``train_step``), and writes
its embeddings (``embeddings.parquet``: the user's own id and the vector) beside its result. A finished
(mask, seed) is read back instead of trained again.

CLI: ``recsys users run --source-dir ../shared/data/ml-100k`` (mounted by the platform CLI).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import polars as pl
import torch
import typer
from pydantic import Field

from recsys.core.atomic import atomic_path
from recsys.core.config import FrozenModel, PathsConfig
from recsys.core.hashing import stable_hash
from recsys.evaluation.probe import linear_probe
from recsys.evaluation.significance import PairedTest, summarize
from recsys.experiments.common import (
    check_seeds,
    markdown_head,
    markdown_row,
    paired_seed_tests,
    split_csv,
    write_report,
)
from recsys.features.sequences import build_sequences, load_sequences, num_items
from recsys.ingest import ingest_movielens
from recsys.models.user_encoder import UserEncoder, UserEncoderConfig
from recsys.training.loop import LoopConfig, fit, seed_everything
from recsys.training.user_representation import (
    MASK_KINDS,
    ContrastiveConfig,
    ContrastiveTask,
    MaskKind,
    MaskSchedule,
    MaskScheduleConfig,
    UserHistories,
    embed_users,
    split_history_future,
)
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog

OCCUPATION_GROUPS = {
    "student": "student",
    **dict.fromkeys(("engineer", "programmer", "technician", "scientist"), "technical"),
    **dict.fromkeys(("artist", "writer", "entertainment", "marketing"), "arts and media"),
    **dict.fromkeys(
        ("administrator", "executive", "lawyer", "doctor", "healthcare", "educator", "librarian", "salesman"),
        "professional and services",
    ),
}
TASKS = ("gender", "age group", "occupation group", "next-period top genre")
TRANSITION_WINDOW = 16  # steps before and after the mask starts to move


class EncoderSettings(FrozenModel):
    max_len: int = Field(100, gt=0, description="The most recent history events the encoder reads.")
    dim: int = Field(64, gt=0)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class UserRepresentationConfig(FrozenModel):
    dataset: str = Field("ml100k", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    source_dir: Path | None = Field(None, description="MovieLens-100K folder; None: the dataset is loaded.")
    masks: tuple[MaskKind, ...] = MASK_KINDS  # type: ignore[assignment]
    seeds: tuple[int, ...] = (0, 1, 2)
    encoder: EncoderSettings = EncoderSettings()
    contrastive: ContrastiveConfig = ContrastiveConfig()
    warmup_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    ema: float = Field(0.9, ge=0.0, lt=1.0)
    loop: LoopConfig = LoopConfig(max_epochs=40, patience=40, monitor="pair_recall@10", progress=False)
    probe_test_fraction: float = Field(0.3, gt=0.0, lt=1.0)

    def model_post_init(self, _context: Any) -> None:
        check_seeds(self.seeds)
        if not self.masks or len(set(self.masks)) != len(self.masks):
            raise ValueError(f"masks must be distinct and non-empty, got {self.masks}")


@dataclass(frozen=True)
class MaskRun:
    mask: str
    seed: int
    probes: dict[str, float]
    valid: dict[str, float]
    step_losses: list[float]
    step_seconds: list[float]
    warmup_steps: int
    total_steps: int
    train_time_s: float
    num_parameters: int
    best_epoch: int

    @property
    def mean_auc(self) -> float:
        return float(np.mean(list(self.probes.values())))

    def transition(self) -> tuple[float, float]:
        """Mean loss over the window before the mask starts to move, max over the window after."""
        t, w = self.warmup_steps, TRANSITION_WINDOW
        before = self.step_losses[max(0, t - w) : t]
        after = self.step_losses[t : t + w]
        return float(np.mean(before)), float(np.max(after))

    def warmup_ms_per_step(self) -> float:
        window = self.step_seconds[1 : self.warmup_steps]  # the first interval includes the loop's set-up
        return 1e3 * float(np.median(window)) if window else float("nan")


@dataclass(frozen=True)
class UserData:
    histories: UserHistories
    labels: dict[str, list[Any]]  # task -> one label per user (None: no label)
    test_users: np.ndarray  # bool per user: in the probe's test split
    data_version: str


def _age_group(age: int | None) -> str | None:
    if age is None:
        return None
    return "<25" if age < 25 else "25-34" if age < 35 else "35-44" if age < 45 else "45+"


def prepare(wh_path: Path, config: UserRepresentationConfig) -> UserData:
    """Sequences, the history / next-period split, the probe labels and the fixed probe split."""
    with Warehouse(wh_path) as wh:
        if config.source_dir is not None:
            ingest_movielens(wh, config.source_dir, dataset=config.dataset)
        version = build_sequences(wh, config.dataset).version
        sequences = load_sequences(wh, config.dataset)
        n_items = num_items(wh, config.dataset)
        users = wh.sql(f"SELECT * FROM {config.dataset}.users")
        items = wh.sql(
            f"SELECT x.item_idx, i.category FROM {config.dataset}.item_index x "
            f"JOIN {config.dataset}.items i USING (item_id)"
        )
    histories = split_history_future(sequences, n_items, config.contrastive)
    category = dict(zip(items["item_idx"].to_list(), items["category"].to_list(), strict=True))
    by_user = {row["user_id"]: row for row in users.iter_rows(named=True)}
    labels: dict[str, list[Any]] = {task: [] for task in TASKS}
    for user_id, future in zip(histories.user_ids, histories.future, strict=True):
        row = by_user.get(user_id, {})
        labels["gender"].append(row.get("gender"))
        labels["age group"].append(_age_group(row.get("age")))
        occupation = row.get("occupation")
        labels["occupation group"].append(
            None if occupation is None else OCCUPATION_GROUPS.get(occupation, "other")
        )
        genres = Counter(category.get(int(i)) for i in future if category.get(int(i)) is not None)
        labels["next-period top genre"].append(genres.most_common(1)[0][0] if genres else None)
    labels = {task: values for task, values in labels.items() if any(v is not None for v in values)}
    # A fixed split by user id: the same test users for every mask and seed (paired comparisons).
    hashed = np.array([int(stable_hash(str(u), length=8), 16) / 16**8 for u in histories.user_ids])
    return UserData(histories, labels, hashed < config.probe_test_fraction, version)


def probe_all(embeddings: np.ndarray, data: UserData) -> dict[str, float]:
    out = {}
    for task, labels in data.labels.items():
        known = np.array([y is not None for y in labels])
        train, test = known & ~data.test_users, known & data.test_users
        y = np.array(labels, dtype=object)
        out[task] = linear_probe(embeddings[train], list(y[train]), embeddings[test], list(y[test])).auc
    return out


def _run_dir(home: Path, config: UserRepresentationConfig, mask: str, seed: int) -> Path:
    key = stable_hash(config.model_dump(mode="json", exclude={"masks", "seeds", "source_dir"}), length=10)
    return home / "artifacts" / "user_repr" / config.dataset / key / f"{mask}-seed{seed}"


def train_mask(
    data: UserData, config: UserRepresentationConfig, mask: MaskKind, seed: int, paths: PathsConfig
) -> MaskRun:
    """Train, select, embed and probe one (mask, seed); a finished one is read back from its result."""
    out = _run_dir(paths.home, config, mask, seed)
    result_file = out / "result.json"
    if result_file.exists():
        saved = json.loads(result_file.read_text())
        return MaskRun(**saved)
    seed_everything(seed)
    enc = config.encoder
    model = UserEncoder(
        UserEncoderConfig(
            num_items=data.histories.num_items,
            max_len=enc.max_len,
            dim=enc.dim,
            num_layers=enc.num_layers,
            num_heads=enc.num_heads,
            dropout=enc.dropout,
        )
    )
    steps_per_epoch = -(-len(data.histories.user_ids) // config.contrastive.batch_size)
    schedule = MaskSchedule(
        MaskScheduleConfig(kind=mask, warmup_fraction=config.warmup_fraction, ema=config.ema),
        total_steps=config.loop.max_epochs * steps_per_epoch,
        max_len=enc.max_len,
    )
    task = ContrastiveTask(model, data.histories, config.contrastive, schedule)
    run_log = RunLog(paths.warehouse)
    loop = config.loop.model_copy(update={"seed": seed, "resume": False})
    result = fit(
        task,
        loop,
        checkpoint_dir=out / "checkpoints",
        run_log=run_log,
        run_kind="user_repr",
        run_name=mask,
        run_config=config.model_dump(mode="json", exclude={"seeds", "masks", "source_dir"}) | {"mask": mask},
        data_version=data.data_version,
        protocol=f"{config.dataset}: next-period InfoNCE; linear probes on a fixed 70/30 user split",
    )
    embeddings = embed_users(model, data.histories.history, schedule.inference_visibility())
    probes = probe_all(embeddings, data)
    if result.run_id is not None:
        run_log.log_metrics(
            result.run_id, {f"probe_auc/{t}": v for t, v in probes.items()}, step=0, split="test"
        )
        for step, value in enumerate(task.step_losses):
            run_log.log_metrics(result.run_id, {"loss": value}, step=step, split="train_step")
    run = MaskRun(
        mask=mask,
        seed=seed,
        probes=probes,
        valid=result.best_valid,
        step_losses=task.step_losses,
        step_seconds=task.step_seconds,
        warmup_steps=schedule.warmup_steps,
        total_steps=schedule.total_steps,
        train_time_s=result.train_time_s,
        num_parameters=result.num_parameters,
        best_epoch=result.best_epoch,
    )
    frame = pl.DataFrame({"user_id": data.histories.user_ids, "embedding": embeddings.tolist()})
    with atomic_path(out / "embeddings.parquet") as tmp:
        frame.write_parquet(tmp)
    with atomic_path(result_file) as tmp:
        tmp.write_text(json.dumps(run.__dict__))
    return run


def report(config: UserRepresentationConfig, runs: dict[str, list[MaskRun]]) -> tuple[str, list[PairedTest]]:
    tasks = list(next(iter(runs.values()))[0].probes)
    lines = [
        f"# User representations on {config.dataset}: mask schedules, linear-probe test AUC",
        "",
        f"Seeds {list(config.seeds)}; encoder d={config.encoder.dim}, {config.encoder.num_layers} layers, "
        f"history {config.encoder.max_len}; {config.loop.max_epochs} epochs, warm-up "
        f"{config.warmup_fraction:.0%} of the steps; probe: logistic regression on a fixed 70/30 user split.",
        "",
        *markdown_head(["Mask", *tasks, "Mean AUC", "Valid pair R@10", "Params", "Train s"]),
    ]
    for mask, rs in runs.items():
        cells = [mask]
        for task in tasks:
            s = summarize([r.probes[task] for r in rs])
            cells.append(f"{s.mean:.4f} ± {s.std:.4f}")
        s = summarize([r.mean_auc for r in rs])
        v = summarize([r.valid.get("pair_recall@10", float("nan")) for r in rs])
        cells += [
            f"{s.mean:.4f} ± {s.std:.4f}",
            f"{v.mean:.3f}",
            f"{rs[0].num_parameters / 1e3:.1f} k",
            f"{np.mean([r.train_time_s for r in rs]):.0f}",
        ]
        lines.append(markdown_row(cells))
    tests: list[PairedTest] = []
    if "causal" in runs:
        for mask, rs in runs.items():
            if mask == "causal":
                continue
            tests += paired_seed_tests(
                mask,
                "causal",
                rs,
                runs["causal"],
                ["mean AUC", *tasks],
                lambda r, m: r.mean_auc if m == "mean AUC" else r.probes[m],
            )
    if tests:
        lines += ["", "Paired t-tests over seeds against the causal mask:", ""]
        lines += [f"- {t.format()}" for t in tests]
    lines += [
        "",
        f"Training loss around the step where the mask starts to move (step {rs[0].warmup_steps} of "
        f"{rs[0].total_steps}): mean over the {TRANSITION_WINDOW} steps before, max over the "
        f"{TRANSITION_WINDOW} after, and the median ms per step during the warm-up (GG-SM reads gradient "
        "norms there):",
        "",
        *markdown_head(["Mask", "Loss before", "Max loss after", "Jump", "ms / step (warm-up)"]),
    ]
    for mask, rs in runs.items():
        before = np.mean([r.transition()[0] for r in rs])
        after = np.mean([r.transition()[1] for r in rs])
        ms = np.mean([r.warmup_ms_per_step() for r in rs])
        lines.append(
            markdown_row([mask, f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}", f"{ms:.1f}"])
        )
    return "\n".join(lines) + "\n", tests


def run_user_representation(
    config: UserRepresentationConfig, paths: PathsConfig | None = None, *, echo: Any = None
) -> tuple[dict[str, list[MaskRun]], Path]:
    paths = paths or PathsConfig()
    say = echo or (lambda _msg: None)
    data = prepare(paths.warehouse, config)
    say(
        f"{config.dataset}: {len(data.histories.user_ids)} users, tasks {list(data.labels)}, "
        f"{int(data.test_users.sum())} probe test users"
    )
    runs: dict[str, list[MaskRun]] = {}
    for mask in config.masks:
        for seed in config.seeds:
            run = train_mask(data, config, mask, seed, paths)
            runs.setdefault(mask, []).append(run)
            say(f"{mask} seed {seed}: mean probe AUC {run.mean_auc:.4f} ({run.train_time_s:.0f} s)")
    text, _ = report(config, runs)
    path = write_report(paths.home / "reports" / f"user_repr_{config.dataset}.md", text)
    return runs, path


app = typer.Typer(
    help="User representations: GG-SM mask schedules judged by linear probes.", no_args_is_help=True
)


@app.command("run")
def run_command(
    source_dir: Annotated[Path | None, typer.Option(help="MovieLens-100K folder.")] = None,
    dataset: Annotated[str, typer.Option(help="Warehouse dataset name.")] = "ml100k",
    masks: Annotated[
        str, typer.Option(help="Comma-separated: causal,bidirectional,scheduler,ggsm.")
    ] = ",".join(MASK_KINDS),
    seeds: Annotated[int, typer.Option(help="Seeds 0..n-1.")] = 3,
    max_epochs: Annotated[int, typer.Option(help="Training epochs (the schedule spans them).")] = 40,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
) -> None:
    """Train the user encoder under each mask schedule and seed, probe the embeddings, write the report."""
    if threads:
        torch.set_num_threads(threads)
    base = UserRepresentationConfig()
    config = UserRepresentationConfig(
        dataset=dataset,
        source_dir=source_dir,
        masks=split_csv(masks),  # type: ignore[arg-type]
        seeds=tuple(range(seeds)),
        loop=base.loop.model_copy(update={"max_epochs": max_epochs, "patience": max_epochs}),
    )
    _, path = run_user_representation(config, echo=typer.echo)
    typer.echo(path.read_text())
    typer.echo(f"report: {path}")


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="Parquet file to write: user_id, embedding.")],
    mask: Annotated[str, typer.Option(help="The mask schedule of the run to export.")] = "ggsm",
    seed: Annotated[int, typer.Option(help="The seed of the run to export.")] = 0,
    dataset: Annotated[str, typer.Option(help="Warehouse dataset name.")] = "ml100k",
    max_epochs: Annotated[int, typer.Option(help="The --max-epochs the run was trained with.")] = 40,
) -> None:
    """Copy the user embeddings of a finished ``recsys users run`` to a Parquet file."""
    base = UserRepresentationConfig()
    config = UserRepresentationConfig(
        dataset=dataset, loop=base.loop.model_copy(update={"max_epochs": max_epochs, "patience": max_epochs})
    )
    source = _run_dir(PathsConfig().home, config, mask, seed) / "embeddings.parquet"
    if not source.exists():
        raise typer.BadParameter(
            f"no finished run for mask={mask!r} seed={seed} dataset={dataset!r} max_epochs={max_epochs} "
            f"(expected {source}); train it with `recsys users run`"
        )
    frame = pl.read_parquet(source)
    with atomic_path(out) as tmp:
        frame.write_parquet(tmp)
    typer.echo(f"{frame.height} user embeddings (dimension {len(frame['embedding'][0])}) -> {out}")


if __name__ == "__main__":
    app()
