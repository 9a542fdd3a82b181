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

Tasks on synthetic data (``--synthetic PRESET``: a ``recsys.synthetic`` preset generated into the state
directory, without impressions, and loaded as the dataset), all ground truth of the generator that the
encoder never reads: the hidden profile (age bucket, gender, region, device); the top category of the
user's hidden long-term taste; the next period's observed top category; and the *true* future top category,
the argmax over categories of ``ClickModel.category_preference`` at the time of the user's first held-out
event (taste, the profile x category crosses as they stand then, and the category drift then).

The training loss around the step where the mask starts to move is drawn (Altair: ``<report>.html``, its
values in ``<report>_transition.csv``), and the cost of a training step with and without reading the
gradient norms is measured on the same batches, interleaved (``measure_step_cost``).

Every run is recorded (kind ``user_repr``) with its per-step training loss (split ``train_step``), and writes
its embeddings (``embeddings.parquet``: the user's own id and the vector) beside its result. A finished
(mask, seed) is read back instead of trained again.

CLI (mounted by the platform CLI): ``recsys users run --source-dir ../shared/data/ml-100k`` or
``recsys users run --synthetic interactions``; ``recsys users export`` copies a run's embeddings to Parquet
and ``recsys users register`` puts them in the model store for the service's ``/user_embedding``.
"""

from __future__ import annotations

import copy
import json
import time
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
from recsys.synthetic import ClickModel, SyntheticConfig, generate, load_into_warehouse, read_manifest
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
SYNTHETIC_TASKS = (
    "age bucket",
    "gender",
    "region",
    "device",
    "top taste category",
    "next-period top category",
    "true future top category",
)
TRANSITION_WINDOW = 16  # steps before and after the mask starts to move
CHART_WINDOW = 32  # steps either side of the transition that the chart draws
CHART_BIN = 4  # steps per row of the transition table


class SyntheticSource(FrozenModel):
    """Synthetic data for the probes: a generator preset, optionally resized (fewer users, fewer requests)."""

    preset: str = Field(description="A recsys.synthetic preset name (SyntheticConfig.preset_names()).")
    seed: int = Field(0, ge=0, description="The generator's seed (the data), not the training seed.")
    n_users: int | None = Field(None, ge=10, description="Users to generate; None: the preset's.")
    requests_per_user: float | None = Field(
        None, ge=1.0, description="Mean requests per user; None: the preset's."
    )

    def model_post_init(self, _context: Any) -> None:
        if self.preset not in SyntheticConfig.preset_names():
            raise ValueError(
                f"synthetic.preset {self.preset!r} is not a synthetic preset; choose one of "
                f"{sorted(SyntheticConfig.preset_names())}"
            )

    def config(self) -> SyntheticConfig:
        """The generator config: the preset, resized, with no impressions logged (the probes read clicks)."""
        base = SyntheticConfig.preset(self.preset, seed=self.seed)
        users = base.users
        if self.n_users is not None:
            users = users.model_copy(update={"n_users": self.n_users})
        sessions = base.sessions
        if self.requests_per_user is not None:
            sessions = sessions.model_copy(update={"requests_per_user_mean": self.requests_per_user})
        policy = base.policy.model_copy(update={"impression_log_rate": 0.0})
        # Validated again as a whole: model_copy does not run the validators.
        return SyntheticConfig.model_validate(
            base.model_copy(update={"users": users, "sessions": sessions, "policy": policy}).model_dump()
        )


class EncoderSettings(FrozenModel):
    max_len: int = Field(100, gt=0, description="The most recent history events the encoder reads.")
    dim: int = Field(64, gt=0)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class UserRepresentationConfig(FrozenModel):
    dataset: str = Field("ml100k", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    source_dir: Path | None = Field(None, description="MovieLens-100K folder; None: the dataset is loaded.")
    synthetic: SyntheticSource | None = Field(None, description="Generate synthetic data instead.")
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
        if self.synthetic is not None and self.source_dir is not None:
            raise ValueError("source_dir and synthetic are exclusive: give MovieLens-100K or a preset")


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
    data_version: str = ""  # the sequences version trained on ("" in runs recorded before it was kept)

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


def _probe_split(user_ids: list[Any], test_fraction: float) -> np.ndarray:
    # A fixed split by user id: the same test users for every mask and seed (paired comparisons).
    hashed = np.array([int(stable_hash(str(u), length=8), 16) / 16**8 for u in user_ids])
    return hashed < test_fraction


def _top(categories: list[Any]) -> Any:
    counts = Counter(c for c in categories if c is not None)
    return counts.most_common(1)[0][0] if counts else None


def prepare(wh_path: Path, config: UserRepresentationConfig, home: Path | None = None) -> UserData:
    """Sequences, the history / next-period split, the probe labels and the fixed probe split."""
    if config.synthetic is not None:
        return _prepare_synthetic(wh_path, config, home or wh_path.parent)
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
        labels["next-period top genre"].append(_top([category.get(int(i)) for i in future]))
    labels = {task: values for task, values in labels.items() if any(v is not None for v in values)}
    return UserData(histories, labels, _probe_split(histories.user_ids, config.probe_test_fraction), version)


def synthetic_data(home: Path, source: SyntheticSource) -> Path:
    """The generated run of ``source`` under ``<home>/synthetic/<data version>`` (generated once)."""
    syn = source.config()
    out = home / "synthetic" / f"{source.preset}-{syn.data_version()[:12]}"
    try:
        read_manifest(out)
    except FileNotFoundError:
        generate(syn, out)
    return out


def _prepare_synthetic(wh_path: Path, config: UserRepresentationConfig, home: Path) -> UserData:
    """Synthetic clicks -> sequences; labels from the generator's hidden profile, taste and true model."""
    assert config.synthetic is not None
    out = synthetic_data(home, config.synthetic)
    manifest = read_manifest(out)
    with Warehouse(wh_path) as wh:
        load_into_warehouse(wh, manifest, dataset=config.dataset)
        version = build_sequences(wh, config.dataset).version
        sequences = load_sequences(wh, config.dataset)
        n_items = num_items(wh, config.dataset)
        items = wh.sql(
            f"SELECT x.item_idx, i.category FROM {config.dataset}.item_index x "
            f"JOIN {config.dataset}.items i USING (item_id)"
        )
    histories = split_history_future(sequences, n_items, config.contrastive)
    category = dict(zip(items["item_idx"].to_list(), items["category"].to_list(), strict=True))
    ts_of = dict(zip(sequences["user_id"].to_list(), sequences["ts"].to_list(), strict=True))
    model = ClickModel(manifest.config)
    user_ids = np.asarray(histories.user_ids, dtype=np.int64)  # the generator's own user ids
    state = model.initial_state(user_ids)  # the hidden profile and taste, as generated
    first_future_ts = np.array(
        [ts_of[u][len(h)] for u, h in zip(histories.user_ids, histories.history, strict=True)], dtype=np.int64
    )
    truth = model.category_preference(state.profile, state.taste, first_future_ts).argmax(axis=1)
    vocab = manifest.config.users
    names = [f"cat_{c:02d}" for c in range(manifest.config.catalogue.n_categories)]
    labels: dict[str, list[Any]] = {
        "age bucket": [vocab.age_buckets[a] for a in state.profile[:, 0]],
        "gender": [vocab.genders[g] for g in state.profile[:, 1]],
        "region": [vocab.regions[r] for r in state.profile[:, 2]],
        "device": [vocab.devices[d] for d in state.profile[:, 3]],
        "top taste category": [names[c] for c in state.taste.argmax(axis=1)],
        "next-period top category": [_top([category.get(int(i)) for i in f]) for f in histories.future],
        "true future top category": [names[c] for c in truth],
    }
    return UserData(histories, labels, _probe_split(histories.user_ids, config.probe_test_fraction), version)


def probe_all(embeddings: np.ndarray, data: UserData) -> dict[str, float]:
    out = {}
    for task, labels in data.labels.items():
        known = np.array([y is not None for y in labels])
        train, test = known & ~data.test_users, known & data.test_users
        y = np.array(labels, dtype=object)
        out[task] = linear_probe(embeddings[train], list(y[train]), embeddings[test], list(y[test])).auc
    return out


def _run_key(config: UserRepresentationConfig) -> str:
    # Runs without synthetic data keep the key they had before the synthetic source existed.
    exclude = {"masks", "seeds", "source_dir"} | ({"synthetic"} if config.synthetic is None else set())
    return stable_hash(config.model_dump(mode="json", exclude=exclude), length=10)


def _run_dir(home: Path, config: UserRepresentationConfig, mask: str, seed: int) -> Path:
    key = _run_key(config)
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
        data_version=data.data_version,
    )
    frame = pl.DataFrame({"user_id": data.histories.user_ids, "embedding": embeddings.tolist()})
    with atomic_path(out / "embeddings.parquet") as tmp:
        frame.write_parquet(tmp)
    with atomic_path(result_file) as tmp:
        tmp.write_text(json.dumps(run.__dict__))
    return run


@dataclass(frozen=True)
class StepCost:
    """Median ms per training step (forward, backward, optimiser) of one model on the same batches."""

    steps: int
    causal_ms: float  # the causal mask (no soft mask)
    soft_mask_ms: float  # a soft mask, no gradient norms read (the scheduler's warm-up path)
    gradient_norms_ms: float  # the same soft mask plus the gradient-norm hook and update (GG-SM's warm-up)

    @property
    def overhead(self) -> float:
        """Relative cost of reading the gradient norms: gradient_norms_ms / soft_mask_ms - 1."""
        return self.gradient_norms_ms / self.soft_mask_ms - 1.0


def measure_step_cost(
    data: UserData, config: UserRepresentationConfig, *, steps: int = 30, seed: int = 0
) -> StepCost:
    """Time training steps with and without GG-SM's gradient norms: three copies of one model (causal; a
    soft mask without gradient norms; the same soft mask with them) take turns on the same batches, the
    order rotating each step, so machine load falls on all three alike. The first step of each is dropped
    (one-off allocations)."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    seed_everything(seed)
    enc = config.encoder
    base = UserEncoder(
        UserEncoderConfig(
            num_items=data.histories.num_items,
            max_len=enc.max_len,
            dim=enc.dim,
            num_layers=enc.num_layers,
            num_heads=enc.num_heads,
            dropout=enc.dropout,
        )
    )
    kinds = {"causal": "causal", "soft mask": "scheduler", "gradient norms": "ggsm"}
    runners = {}
    for name, kind in kinds.items():
        model = copy.deepcopy(base)
        # A warm-up longer than the measurement: every timed step is a warm-up step.
        schedule = MaskSchedule(
            MaskScheduleConfig(kind=kind, warmup_fraction=0.5, ema=config.ema),  # type: ignore[arg-type]
            total_steps=4 * steps,
            max_len=enc.max_len,
        )
        task = ContrastiveTask(model, data.histories, config.contrastive, schedule)
        runners[name] = (model, task, torch.optim.AdamW(model.parameters(), lr=1e-3))
    rng = np.random.default_rng(seed)
    first_task = runners["causal"][1]
    batches: list[Any] = []
    epoch = 0
    while len(batches) < steps:
        batches += list(first_task.train_batches(epoch, rng))
        epoch += 1
    times: dict[str, list[float]] = {name: [] for name in kinds}
    names = list(kinds)
    device = torch.device("cpu")
    for i, batch in enumerate(batches[:steps]):
        for name in names[i % 3 :] + names[: i % 3]:
            model, task, optimizer = runners[name]
            model.train()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            task.loss(model, batch, device).backward()
            optimizer.step()
            if i > 0:
                times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    return StepCost(steps - 1, ms["causal"], ms["soft mask"], ms["gradient norms"])


def transition_frame(runs: dict[str, list[MaskRun]], window: int = CHART_WINDOW) -> pl.DataFrame:
    """Training loss per step around the step where the mask starts to move (offset 0), per mask: the
    mean and std over seeds (columns mask, offset, step, loss, loss_std)."""
    rows = []
    for mask, rs in runs.items():
        t = rs[0].warmup_steps
        for offset in range(-window, window):
            step = t + offset
            values = [r.step_losses[step] for r in rs if 0 <= step < len(r.step_losses)]
            if values:
                rows.append((mask, offset, step, float(np.mean(values)), float(np.std(values))))
    return pl.DataFrame(rows, schema=["mask", "offset", "step", "loss", "loss_std"], orient="row")


def transition_table(frame: pl.DataFrame, bin_steps: int = CHART_BIN) -> list[str]:
    """Markdown rows: the mean loss (over seeds and the steps of each bin) per mask, bins of ``bin_steps``
    steps relative to the transition."""
    binned = (
        frame.with_columns((pl.col("offset") // bin_steps * bin_steps).alias("bin"))
        .group_by("bin", "mask")
        .agg(pl.col("loss").mean())
    )
    masks = frame["mask"].unique(maintain_order=True).to_list()
    lines = markdown_head(["Steps from the transition", *masks])
    for b in sorted(binned["bin"].unique().to_list()):
        cells = [f"{b:+d} to {b + bin_steps - 1:+d}"]
        for mask in masks:
            value = binned.filter((pl.col("bin") == b) & (pl.col("mask") == mask))["loss"]
            cells.append(f"{value[0]:.4f}" if len(value) else "")
        lines.append(markdown_row(cells))
    return lines


def write_transition_chart(frame: pl.DataFrame, path: Path, title: str) -> Path:
    """The loss around the transition as an Altair line chart (one line per mask, a rule at the transition),
    written as a self-contained HTML page."""
    import altair as alt  # the dashboard's charting library; imported here, only the report draws

    lines = (
        alt.Chart(frame, title=title)
        .mark_line(point=True)
        .encode(
            x=alt.X("offset:Q", title="steps from the transition (the mask starts to move at 0)"),
            y=alt.Y("loss:Q", title="InfoNCE training loss (mean over seeds)", scale=alt.Scale(zero=False)),
            color=alt.Color("mask:N", title="mask"),
            tooltip=["mask", "step", "offset", alt.Tooltip("loss:Q", format=".4f"), "loss_std"],
        )
    )
    rule = alt.Chart(pl.DataFrame({"offset": [0]})).mark_rule(strokeDash=[4, 4]).encode(x="offset:Q")
    chart = (lines + rule).properties(width=640, height=320)
    with atomic_path(path) as tmp:
        chart.save(str(tmp), format="html")
    return path


def report(
    config: UserRepresentationConfig,
    runs: dict[str, list[MaskRun]],
    step_cost: StepCost | None = None,
    chart: Path | None = None,
) -> tuple[str, list[PairedTest]]:
    tasks = list(next(iter(runs.values()))[0].probes)
    source = (
        f"synthetic preset {config.synthetic.preset!r} (generator seed {config.synthetic.seed})"
        if config.synthetic is not None
        else config.dataset
    )
    lines = [
        f"# User representations on {source}: mask schedules, linear-probe test AUC",
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
    if "ggsm" in runs and "scheduler" in runs:
        tests += paired_seed_tests(
            "ggsm",
            "scheduler",
            runs["ggsm"],
            runs["scheduler"],
            ["mean AUC", *tasks],
            lambda r, m: r.mean_auc if m == "mean AUC" else r.probes[m],
        )
    if tests:
        lines += ["", "Paired t-tests over seeds (against the causal mask; GG-SM against the scheduler):", ""]
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
    lines += [
        "",
        f"The loss around the transition, mean over seeds and {CHART_BIN} steps"
        + (f" (chart: {chart.name}; per-step values: {chart.stem}_transition.csv)" if chart else "")
        + ":",
        "",
        *transition_table(transition_frame(runs)),
    ]
    if step_cost is not None:
        lines += [
            "",
            f"Cost per training step, same batches, interleaved (median of {step_cost.steps} steps each):",
            "",
            *markdown_head(["Step", "ms / step"]),
            markdown_row(["causal mask", f"{step_cost.causal_ms:.1f}"]),
            markdown_row(["soft mask, no gradient norms", f"{step_cost.soft_mask_ms:.1f}"]),
            markdown_row(["soft mask + gradient norms (GG-SM)", f"{step_cost.gradient_norms_ms:.1f}"]),
            "",
            f"Reading the gradient norms costs {step_cost.overhead:+.1%} per step.",
        ]
    return "\n".join(lines) + "\n", tests


def run_user_representation(
    config: UserRepresentationConfig,
    paths: PathsConfig | None = None,
    *,
    echo: Any = None,
    step_cost_steps: int = 0,
) -> tuple[dict[str, list[MaskRun]], Path]:
    """Every (mask, seed), the report, the transition chart and (``step_cost_steps`` > 0) the step cost."""
    paths = paths or PathsConfig()
    say = echo or (lambda _msg: None)
    data = prepare(paths.warehouse, config, paths.home)
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
    cost = measure_step_cost(data, config, steps=step_cost_steps) if step_cost_steps > 0 else None
    reports = paths.home / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    frame = transition_frame(runs)
    with atomic_path(reports / f"user_repr_{config.dataset}_transition.csv") as tmp:
        frame.write_csv(tmp)
    chart = write_transition_chart(
        frame,
        reports / f"user_repr_{config.dataset}.html",
        f"{config.dataset}: training loss around the mask transition",
    )
    text, _ = report(config, runs, cost, chart)
    path = write_report(reports / f"user_repr_{config.dataset}.md", text)
    return runs, path


app = typer.Typer(
    help="User representations: GG-SM mask schedules judged by linear probes.", no_args_is_help=True
)


def _config(
    dataset: str | None,
    source_dir: Path | None,
    synthetic: str | None,
    synthetic_users: int | None,
    synthetic_requests: float | None,
    max_epochs: int,
    max_len: int,
    masks: str = ",".join(MASK_KINDS),
    seeds: int = 3,
) -> UserRepresentationConfig:
    base = UserRepresentationConfig()
    source = (
        SyntheticSource(preset=synthetic, n_users=synthetic_users, requests_per_user=synthetic_requests)
        if synthetic is not None
        else None
    )
    return UserRepresentationConfig(
        dataset=dataset or (f"syn_{synthetic}" if synthetic else "ml100k"),
        source_dir=source_dir,
        synthetic=source,
        masks=split_csv(masks),  # type: ignore[arg-type]
        seeds=tuple(range(seeds)),
        encoder=base.encoder.model_copy(update={"max_len": max_len}),
        loop=base.loop.model_copy(update={"max_epochs": max_epochs, "patience": max_epochs}),
    )


SyntheticOpt = Annotated[
    str | None, typer.Option(help="A synthetic preset (e.g. interactions) instead of MovieLens-100K.")
]
SyntheticUsersOpt = Annotated[int | None, typer.Option(help="Synthetic: users to generate (preset's).")]
SyntheticRequestsOpt = Annotated[
    float | None, typer.Option(help="Synthetic: mean requests per user (preset's).")
]
MaxLenOpt = Annotated[int, typer.Option(help="History events the encoder reads.")]


@app.command("run")
def run_command(
    source_dir: Annotated[Path | None, typer.Option(help="MovieLens-100K folder.")] = None,
    synthetic: SyntheticOpt = None,
    synthetic_users: SyntheticUsersOpt = None,
    synthetic_requests: SyntheticRequestsOpt = None,
    dataset: Annotated[
        str | None, typer.Option(help="Warehouse dataset name (ml100k; syn_<preset> for synthetic).")
    ] = None,
    masks: Annotated[
        str, typer.Option(help="Comma-separated: causal,bidirectional,scheduler,ggsm.")
    ] = ",".join(MASK_KINDS),
    seeds: Annotated[int, typer.Option(help="Seeds 0..n-1.")] = 3,
    max_epochs: Annotated[int, typer.Option(help="Training epochs (the schedule spans them).")] = 40,
    max_len: MaxLenOpt = 100,
    step_cost_steps: Annotated[
        int, typer.Option(help="Steps timed with and without gradient norms (0: not measured).")
    ] = 30,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
) -> None:
    """Train the user encoder under each mask schedule and seed, probe the embeddings, write the report
    (with the loss chart around the transition and the cost per step with and without gradient norms)."""
    if threads:
        torch.set_num_threads(threads)
    config = _config(
        dataset, source_dir, synthetic, synthetic_users, synthetic_requests, max_epochs, max_len, masks, seeds
    )
    _, path = run_user_representation(config, echo=typer.echo, step_cost_steps=step_cost_steps)
    typer.echo(path.read_text())
    typer.echo(f"report: {path}  chart: {path.with_suffix('.html')}")


def finished_embeddings(config: UserRepresentationConfig, mask: str, seed: int, home: Path) -> Path:
    """The ``embeddings.parquet`` of a finished run (an error naming the run when there is none)."""
    source = _run_dir(home, config, mask, seed) / "embeddings.parquet"
    if not source.exists():
        raise FileNotFoundError(
            f"no finished run for mask={mask!r} seed={seed} dataset={config.dataset!r} "
            f"max_epochs={config.loop.max_epochs} (expected {source}); train it with `recsys users run`"
        )
    return source


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="Parquet file to write: user_id, embedding.")],
    mask: Annotated[str, typer.Option(help="The mask schedule of the run to export.")] = "ggsm",
    seed: Annotated[int, typer.Option(help="The seed of the run to export.")] = 0,
    dataset: Annotated[str | None, typer.Option(help="Warehouse dataset name.")] = None,
    synthetic: SyntheticOpt = None,
    synthetic_users: SyntheticUsersOpt = None,
    synthetic_requests: SyntheticRequestsOpt = None,
    max_epochs: Annotated[int, typer.Option(help="The --max-epochs the run was trained with.")] = 40,
    max_len: MaxLenOpt = 100,
) -> None:
    """Copy the user embeddings of a finished ``recsys users run`` to a Parquet file."""
    config = _config(dataset, None, synthetic, synthetic_users, synthetic_requests, max_epochs, max_len)
    try:
        source = finished_embeddings(config, mask, seed, PathsConfig().home)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from None
    frame = pl.read_parquet(source)
    with atomic_path(out) as tmp:
        frame.write_parquet(tmp)
    typer.echo(f"{frame.height} user embeddings (dimension {len(frame['embedding'][0])}) -> {out}")


def register_embeddings(
    config: UserRepresentationConfig, mask: str, seed: int, name: str, paths: PathsConfig | None = None
) -> str:
    """Register the embeddings of a finished run for serving (``/user_embedding``); returns the tag. The
    dataset's own user ids go with them when they are strings (``<dataset>.user_ids``)."""
    from recsys.serving.user_embeddings import register_user_embeddings  # the registry, not serving's engine

    paths = paths or PathsConfig()
    run_dir = finished_embeddings(config, mask, seed, paths.home).parent
    frame = pl.read_parquet(run_dir / "embeddings.parquet")
    data_version = json.loads((run_dir / "result.json").read_text()).get("data_version", "")
    with Warehouse(paths.warehouse) as wh:
        if not data_version:
            latest = wh.latest(f"{config.dataset}.sequences")
            data_version = latest.version if latest is not None else config.dataset
        if wh.has_table(f"{config.dataset}.user_ids"):
            raw = wh.sql(f"SELECT user_id, raw_id AS raw_user_id FROM {config.dataset}.user_ids")
            frame = frame.join(raw, on="user_id", how="left")
    source = f"user_repr {config.dataset} {mask} seed {seed} ({_run_key(config)})"
    return register_user_embeddings(name, frame, data_version=data_version, source=source)


@app.command("register")
def register_command(
    name: Annotated[str, typer.Option(help="Store name of the embeddings (e.g. ml100k-users).")],
    mask: Annotated[str, typer.Option(help="The mask schedule of the run to register.")] = "ggsm",
    seed: Annotated[int, typer.Option(help="The seed of the run to register.")] = 0,
    dataset: Annotated[str | None, typer.Option(help="Warehouse dataset name.")] = None,
    synthetic: SyntheticOpt = None,
    synthetic_users: SyntheticUsersOpt = None,
    synthetic_requests: SyntheticRequestsOpt = None,
    max_epochs: Annotated[int, typer.Option(help="The --max-epochs the run was trained with.")] = 40,
    max_len: MaxLenOpt = 100,
) -> None:
    """Register a finished run's user embeddings; serve them with RECSYS_SERVING_USER_EMBEDDINGS=<tag>."""
    config = _config(dataset, None, synthetic, synthetic_users, synthetic_requests, max_epochs, max_len)
    try:
        tag = register_embeddings(config, mask, seed, name)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"registered {tag}: serve it with RECSYS_SERVING_USER_EMBEDDINGS={tag}")


if __name__ == "__main__":
    app()
