"""Teacher -> student distillation for serving: teacher vs distilled student vs the same student trained
without distillation vs the DeepFM baseline, on one dataset.

Pipeline: the data (``experiments.ranking.prepare_data``: ingest or generate, point-in-time examples, arrays)
-> the teacher (default HyFormer over the last 1,000 events; several names = an ensemble averaging logits),
trained once with seed ``seeds[0]`` -> its scores on every train/valid example and K unlabelled candidates
per training example published as ``<ds>.teacher_scores`` (``training.distillation``; skipped when fresh)
-> per seed: the DeepFM baseline (history 100), the student without distillation and the student distilled
from the stored scores (``models.losses.distillation_loss``), each with early stopping on validation AUC and
the test split evaluated once -> one table with AUC, GAUC, log loss, calibration, ECE, parameters, FLOPs per
example and CPU latency per 1,000 candidates, the goal check, and a paired t-test over seeds (distilled vs
plain student, when there are >= 2 seeds) -> ``<home>/artifacts/distill/report_<ds>.md`` (written
atomically). Teacher, baseline and plain student are recorded as kind ``ranking`` runs, the distilled
student and the summary (every figure of the table) as kind ``distill``. The first seed's distilled student
is returned as a ``ServedStudent`` (architecture, config, best-checkpoint path and sha256, data config and
version), which the pipeline's package stage registers as the bento's ranker.

Goal: the distilled student keeps at least ``lift_goal`` (95%) of the teacher's AUC lift over the
baseline, (student AUC - baseline AUC) / (teacher AUC - baseline AUC), at no more than ``flops_goal`` (1/10)
of the teacher's FLOPs per example.

CPU latency per 1,000 candidates: the model's forward pass on one batch of 1,000 candidates of one user (the
test example with the longest history; candidates = items with known attributes), on the CPU with the torch
threads the process has, the fastest of ``latency_repeats`` timed runs after one warm-up (the least disturbed
by other processes on a shared machine); batch building is not
timed. An ensemble's latency and FLOPs are the sums over its members.

OPEN choices picked: the teacher is trained once (the precomputed scores are one table; the student seeds
vary); the student is a small RankMixer (4 tokens, D = 32, one block, FFN x2, embeddings 8) reading the last
50 events; lambda = 1, tau = 1 (calibration), K = 2 candidates per training example; ``epoch_examples`` counts
labelled examples for every model, so the distilled student's epochs also carry those examples' candidates
(it sees the same labels per epoch as the plain student, plus the teacher-scored candidates).

CLI: ``app`` (typer) with the command ``teacher-student``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import typer
from pydantic import Field, model_validator

from recsys.core.config import FrozenModel, PathsConfig, describe_config_error
from recsys.core.hashing import file_sha256, stable_hash
from recsys.evaluation.ranking import ranking_metrics
from recsys.evaluation.significance import PairedTest, summarize
from recsys.experiments.common import (
    ProfileOpt,
    check_seeds,
    cli_profile,
    markdown_head,
    markdown_row,
    paired_seed_tests,
    split_csv,
    write_report,
)
from recsys.experiments.ranking import (
    PRETTY,
    RANKING_LOOP,
    RANKING_MODELS,
    RankingDataSource,
    RankingExperimentConfig,
    build_model,
    check_ranking_monitor,
    prepare_data,
    ranking_loop,
)
from recsys.synthetic.config import SyntheticConfig
from recsys.training.checkpoint import weights_path
from recsys.training.distillation import (
    DistillConfig,
    TeacherMember,
    TeacherScoreConfig,
    candidate_arrays,
    item_lookup,
    load_teacher_scores,
    precompute_teacher_scores,
    score_logits,
    train_distilled,
)
from recsys.training.hstu_ranking import train_ranking_model
from recsys.training.loop import LoopConfig, loop_key, resolve_device, seed_everything
from recsys.training.ranking import (
    PROTOCOL,
    RankingData,
    RankingDataConfig,
    RankingRunResult,
    RankingTrainConfig,
    metric_dict,
    train_ranking,
)
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog, hardware_description

#: The small serving student: few tokens, small width, one block.
STUDENT_PRESET: dict[str, Any] = {
    "embedding_dim": 8,
    "n_tokens": 4,
    "token_dim": 32,
    "n_blocks": 1,
    "ffn_expansion": 2,
}
ROLES = ("teacher", "student_distilled", "student_plain", "baseline")
ROLE_NAMES = {
    "teacher": "Teacher",
    "student_distilled": "Student, distilled",
    "student_plain": "Student, no distillation",
    "baseline": "Baseline",
}


class TeacherStudentConfig(RankingDataSource):
    teacher: tuple[str, ...] = Field(("hyformer",), description="Teacher model(s); several = an ensemble.")
    teacher_len: int = Field(1_000, ge=1, description="History steps the teacher reads.")
    teacher_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    student: str = "rankmixer"
    student_len: int = Field(50, ge=1, description="History steps the student reads.")
    student_overrides: dict[str, Any] = Field(default_factory=lambda: dict(STUDENT_PRESET))
    baseline: str = "deepfm"
    baseline_len: int = Field(100, ge=1)
    seeds: tuple[int, ...] = (0, 1, 2)
    train: RankingTrainConfig = RankingTrainConfig()
    teacher_loop: LoopConfig | None = Field(None, description="The teacher's loop; None = ``loop``.")
    loop: LoopConfig = RANKING_LOOP
    scores: TeacherScoreConfig = TeacherScoreConfig()
    distill: DistillConfig = DistillConfig()
    latency_candidates: int = Field(1_000, ge=1)
    latency_repeats: int = Field(5, ge=1)
    lift_goal: float = Field(0.95, gt=0.0, description="Share of the teacher's AUC lift to keep.")
    flops_goal: float = Field(0.1, gt=0.0, description="Largest student/teacher FLOPs ratio.")

    @model_validator(mode="after")
    def _check(self) -> TeacherStudentConfig:
        if not self.teacher:
            raise ValueError("teacher: name at least one model")
        for role, names in (
            ("teacher", self.teacher),
            ("student", (self.student,)),
            ("baseline", (self.baseline,)),
        ):
            unknown = [m for m in names if m not in RANKING_MODELS]
            if unknown:
                raise ValueError(
                    f"{role}: unknown ranking model(s) {unknown}; known: {sorted(RANKING_MODELS)}"
                )
        bad = [m for m in self.teacher_overrides if m not in self.teacher]
        if bad:
            raise ValueError(f"teacher_overrides: model(s) {bad} are not in teacher {self.teacher}")
        check_seeds(self.seeds)
        self._check_one_source()
        for name, loop in (("loop", self.loop), ("teacher_loop", self.teacher_loop)):
            if loop is not None:
                check_ranking_monitor(name, loop)
        return self

    @classmethod
    def quick(
        cls,
        dataset: str = "synthetic",
        *,
        source_dir: Path | None = None,
        synthetic: SyntheticConfig | None = None,
        **overrides: Any,
    ) -> TeacherStudentConfig:
        """A small budget for the main pipeline (about a minute on 2 CPU cores on the quick synthetic data):
        HyFormer over 200 steps as the teacher, 3,000 training examples, one pass, one seed."""
        base: dict[str, Any] = {
            "dataset": dataset,
            "source_dir": source_dir,
            "synthetic": synthetic,
            "data": RankingDataConfig(
                max_train_examples=3_000, max_valid_examples=1_000, max_test_examples=2_000
            ),
            "teacher_len": 200,
            "seeds": (0,),
            "train": RankingTrainConfig(batch_size=128, flop_examples=256),
            "loop": ranking_loop(max_epochs=2, patience=1, lr=2e-3, progress=False),
            "scores": TeacherScoreConfig(candidates_per_example=1),
            "latency_repeats": 3,
        }
        return cls(**(base | overrides))

    def ranking_config(self) -> RankingExperimentConfig:
        """The ranking experiment config whose data preparation this experiment shares."""
        return self._ranking_config((self.baseline,), self.seeds)


GOAL_ALPHA = 0.05  # significance the goal's student-vs-baseline paired test must reach


@dataclass
class RoleResult:
    """One row of the table: a role's model(s), test metrics per seed and cost."""

    role: str
    model: str
    max_len: int
    test: list[dict[str, float]]  # one per seed (the teacher: one)
    num_parameters: int
    flops_per_example: float
    latency_ms_per_1k: float
    train_time_s: list[float]
    run_ids: list[str] = field(default_factory=list)

    def mean(self, metric: str) -> float:
        values = [t[metric] for t in self.test if metric in t]
        return float(np.mean(values)) if values else float("nan")


class ServedStudent(FrozenModel):
    """The distilled student that gets served: everything needed to rebuild it and register it later.

    Which run: the distilled student of the first seed (``seeds[0]``, the teacher's seed too); the table
    reports the mean over seeds, and every seed's student is the same architecture and budget, so the first
    one stands for them. Its weights are the ``best`` checkpoint of that run (``training.loop.fit`` writes it
    temp-then-rename under ``<home>/artifacts/distill/...``); ``weights_sha256`` pins those bytes.
    """

    architecture: str = Field(description="models.registry name of the student (e.g. rankmixer).")
    model_config_json: dict[str, Any] = Field(description="The student's config, FeatureSpec included.")
    max_len: int = Field(ge=1, description="History steps the student reads.")
    checkpoint: Path = Field(description="The run's checkpoint directory (best weights inside).")
    weights_sha256: str = Field(min_length=64, max_length=64)
    seed: int
    dataset: str
    data: RankingDataConfig = Field(description="The load_ranking_data config it was trained on.")
    data_version: str = Field(min_length=1, description="Version of <dataset>.examples it was trained on.")
    test: dict[str, float] = Field(default_factory=dict, description="Test metrics of this run.")
    run_id: str | None = None

    @property
    def weights(self) -> Path:
        return weights_path(self.checkpoint, "best")


class TeacherStudentSummary(FrozenModel):
    """The figures of one run, small enough for a Prefect result or a run record."""

    dataset: str
    data_version: str
    teacher: str
    student: str
    seeds: tuple[int, ...]
    auc: dict[str, float]
    gauc: dict[str, float]
    calibration: dict[str, float]
    flops_per_example: dict[str, float]
    num_parameters: dict[str, int]
    latency_ms_per_1k: dict[str, float]
    lift_retained: float | None
    flops_ratio: float
    goal_met: bool
    goal_line: str
    table: str
    report_path: Path | None
    summary_run_id: str | None
    served_student: ServedStudent | None = None  # the first seed's distilled student (see ServedStudent)


@dataclass
class TeacherStudentResult:
    config: TeacherStudentConfig
    data: RankingData
    roles: dict[str, RoleResult]
    scores_rows: int
    scores_computed: bool
    scores_version: str
    tests: list[PairedTest] = field(default_factory=list)
    hardware: str = ""
    wall_time_s: float = 0.0
    report_path: Path | None = None
    summary_run_id: str | None = None
    served_student: ServedStudent | None = None  # the first seed's distilled student

    @property
    def lift_retained(self) -> float | None:
        """(student - baseline) / (teacher - baseline) AUC; None if the teacher does not beat the baseline."""
        t, s, b = (self.roles[r].mean("auc") for r in ("teacher", "student_distilled", "baseline"))
        return (s - b) / (t - b) if t - b > 0 else None

    @property
    def flops_ratio(self) -> float:
        teacher = self.roles["teacher"].flops_per_example
        return self.roles["student_distilled"].flops_per_example / teacher if teacher > 0 else float("inf")

    @property
    def goal_reached_on_means(self) -> bool:
        """The goal's figures (lift retained, FLOPs ratio) on the mean AUCs, without any significance."""
        lift = self.lift_retained
        return (
            lift is not None and lift >= self.config.lift_goal and self.flops_ratio <= self.config.flops_goal
        )

    @property
    def student_vs_baseline(self) -> PairedTest | None:
        """The paired test of the distilled student against the baseline on AUC (None with one seed)."""
        return next((t for t in self.tests if t.b == "baseline" and t.metric == "auc"), None)

    @property
    def goal_met(self) -> bool:
        """Met only as evidence: the figures reach the goal over >= 2 seeds and the distilled student beats
        the baseline significantly (paired t-test over seeds, p < GOAL_ALPHA). One seed is never a success."""
        t = self.student_vs_baseline
        return (
            self.goal_reached_on_means
            and t is not None
            and t.mean_diff > 0
            and not np.isnan(t.p_value)
            and t.p_value < GOAL_ALPHA
        )

    def summary(self) -> TeacherStudentSummary:
        roles = self.roles
        return TeacherStudentSummary(
            dataset=self.config.dataset,
            data_version=self.data.data_version,
            teacher=roles["teacher"].model,
            student=roles["student_distilled"].model,
            seeds=self.config.seeds,
            auc={r: v.mean("auc") for r, v in roles.items()},
            gauc={r: v.mean("gauc") for r, v in roles.items()},
            calibration={r: v.mean("calibration") for r, v in roles.items()},
            flops_per_example={r: v.flops_per_example for r, v in roles.items()},
            num_parameters={r: v.num_parameters for r, v in roles.items()},
            latency_ms_per_1k={r: v.latency_ms_per_1k for r, v in roles.items()},
            lift_retained=self.lift_retained,
            flops_ratio=self.flops_ratio,
            goal_met=self.goal_met,
            goal_line=goal_line(self),
            table=format_table(self),
            report_path=self.report_path,
            summary_run_id=self.summary_run_id,
            served_student=self.served_student,
        )


# -- measurement --------------------------------------------------------------------------------------------


def latency_ms_per_1k(
    models: list[tuple[torch.nn.Module, int]],
    data: RankingData,
    *,
    n_candidates: int = 1_000,
    repeats: int = 5,
    split: str = "test",
) -> float:
    """Best-of-``repeats`` CPU milliseconds of one forward pass over ``n_candidates`` candidates of one user,
    scaled to 1,000 candidates, summed over ``models`` (an ensemble runs every member)."""
    s = data.splits[split]
    row = int(np.argmax(s.seq_offset))  # the user with the longest history: the costly case
    lookup = item_lookup(data)
    pool = lookup.items
    items = pool[np.arange(n_candidates) % pool.size]
    cands = candidate_arrays(s, np.full(n_candidates, row), items, lookup, data.dense_names)
    total = 0.0
    for model, max_len in models:
        device = next(model.parameters()).device
        model.to("cpu").eval()
        batch = data.make_batch(cands, np.arange(n_candidates), max_len)
        times = []
        with torch.no_grad():
            model(batch)  # warm-up
            for _ in range(repeats):
                started = time.perf_counter()
                model(batch)
                times.append(time.perf_counter() - started)
        model.to(device)
        total += min(times) * 1_000.0 * (1_000 / n_candidates)
    return total


def _teacher_test(members: list[TeacherMember], data: RankingData, device: torch.device) -> dict[str, float]:
    """The teacher's (ensemble's) test metrics from its mean logits, as ``training.ranking`` reports them."""
    s = data.splits["test"]
    logits = score_logits(members, data, s, device)
    out: dict[str, float] = {}
    for t in data.tasks:
        if s.labels[t].min() == s.labels[t].max():
            continue
        m = ranking_metrics(
            s.labels[t],
            1.0 / (1.0 + np.exp(-logits[t])),
            groups=s.user,
            oracle_probs=s.oracle if t == "click" else None,
        )
        out.update(metric_dict(m, "" if t == "click" else f"{t}/"))
    return out


def _checkpoint(
    paths: PathsConfig, config: TeacherStudentConfig, role: str, name: str, seed: int, *key: Any
) -> Path:
    digest = stable_hash(name, *key, length=12)
    return paths.artifacts / "distill" / config.dataset / role / f"{name}-seed{seed}-{digest}"


def _served_student(
    config: TeacherStudentConfig,
    data: RankingData,
    name: str,
    model_config: FrozenModel,
    max_len: int,
    checkpoint: Path,
    run: RankingRunResult,
) -> ServedStudent | None:
    """The distilled run's record for serving; None when it left no best weights (no validation ever
    improved, e.g. a NaN metric), since there is then nothing trustworthy to serve."""
    best = weights_path(checkpoint, "best")
    if not best.exists():
        return None
    return ServedStudent(
        architecture=name,
        model_config_json=model_config.model_dump(mode="json"),
        max_len=max_len,
        checkpoint=checkpoint,
        weights_sha256=file_sha256(best),
        seed=run.seed,
        dataset=config.dataset,
        data=data.config,
        data_version=data.data_version,
        test={k: float(v) for k, v in run.test.items()},
        run_id=run.run_id,
    )


def run_teacher_student(
    config: TeacherStudentConfig, paths: PathsConfig | None = None, *, echo: Any = print
) -> TeacherStudentResult:
    """Train the teacher, precompute its scores, train baseline / plain student / distilled student per seed,
    measure cost and latency, record the summary run and write the report."""
    paths = paths or PathsConfig()
    say = echo or (lambda _msg: None)
    started = time.perf_counter()
    data, _oracle = prepare_data(paths, config.ranking_config(), say)
    used = {k: len(v) for k, v in data.splits.items()}
    say(f"{config.dataset}: examples {data.data_version}; used {used}; tasks {data.tasks}")
    run_log = RunLog(paths.warehouse)
    loop = config.loop
    device = resolve_device(loop.device)

    # 1. The teacher, trained once.
    teacher_seed = config.seeds[0]
    t_loop = config.teacher_loop or loop
    t_train = config.train.model_copy(update={"max_len": config.teacher_len})
    members: list[TeacherMember] = []
    teacher_runs: list[RankingRunResult] = []
    for name in config.teacher:
        seed_everything(teacher_seed)
        model, model_config = build_model(name, data, config.teacher_len, config.teacher_overrides.get(name))
        ckpt = _checkpoint(
            paths,
            config,
            "teacher",
            name,
            teacher_seed,
            model_config.model_dump(mode="json", exclude={"features"}),
            t_train,
            loop_key(t_loop),
            data.config,
            data.data_version,
        )
        run = train_ranking_model(
            name,
            model,
            data,
            seed=teacher_seed,
            train_config=t_train,
            loop_config=t_loop,
            model_config=model_config,
            checkpoint_dir=ckpt,
            run_log=run_log,
        )
        teacher_runs.append(run)
        members.append(TeacherMember.from_checkpoint(name, model, config.teacher_len, ckpt))
        say(
            f"teacher {name} (L={config.teacher_len}): test AUC {run.test['auc']:.4f} "
            f"({run.train_time_s:.0f} s)"
        )
    teacher_test = _teacher_test(members, data, device)

    # 2. Its scores in the warehouse (the student reads only these).
    with Warehouse(paths.warehouse) as wh:
        build = precompute_teacher_scores(wh, data, members, config.scores, device=device)
        distill_set = load_teacher_scores(wh, data, use_unlabelled=config.distill.use_unlabelled)
    say(
        f"teacher scores {build.version.version}: {build.rows:,} rows "
        + (f"computed in {build.seconds:.0f} s" if build.computed else "(fresh, reused)")
    )
    teacher_pretty = " + ".join(PRETTY.get(n, n) for n in config.teacher)
    roles: dict[str, RoleResult] = {
        "teacher": RoleResult(
            role="teacher",
            model=teacher_pretty,
            max_len=config.teacher_len,
            test=[teacher_test],
            num_parameters=sum(r.num_parameters for r in teacher_runs),
            flops_per_example=sum(r.flops_per_example for r in teacher_runs),
            latency_ms_per_1k=latency_ms_per_1k(
                [(m.model, m.max_len) for m in members],
                data,
                n_candidates=config.latency_candidates,
                repeats=config.latency_repeats,
            ),
            train_time_s=[sum(r.train_time_s for r in teacher_runs)],
            run_ids=[r.run_id for r in teacher_runs if r.run_id],
        )
    }
    del members  # the students never see the teacher

    # 3. Per seed: baseline, plain student, distilled student.
    s_train = config.train.model_copy(update={"max_len": config.student_len})
    b_train = config.train.model_copy(update={"max_len": config.baseline_len})
    student_label = PRETTY.get(config.student, config.student) + (
        " (small)" if config.student_overrides else ""
    )
    served_student: ServedStudent | None = None
    for seed in config.seeds:
        for role in ("baseline", "student_plain", "student_distilled"):
            name = config.baseline if role == "baseline" else config.student
            max_len = config.baseline_len if role == "baseline" else config.student_len
            overrides = None if role == "baseline" else config.student_overrides
            train_cfg = b_train if role == "baseline" else s_train
            seed_everything(seed)
            model, model_config = build_model(name, data, max_len, overrides)
            mc = model_config.model_dump(mode="json", exclude={"features"})
            if role == "student_distilled":
                if train_cfg.epoch_examples is not None:  # the same labelled examples per epoch as the others
                    rows_per_labelled = len(distill_set) / max(int(distill_set.labelled.sum()), 1)
                    train_cfg = train_cfg.model_copy(
                        update={"epoch_examples": round(train_cfg.epoch_examples * rows_per_labelled)}
                    )
                ckpt = _checkpoint(
                    paths,
                    config,
                    role,
                    name,
                    seed,
                    mc,
                    train_cfg,
                    loop_key(loop),
                    data.config,
                    data.data_version,
                    config.distill,
                    distill_set.scores_version,
                )
                run = train_distilled(
                    f"{name}-distilled",
                    model,
                    data,
                    distill_set,
                    seed=seed,
                    train_config=train_cfg,
                    loop_config=loop,
                    distill_config=config.distill,
                    model_config=model_config,
                    checkpoint_dir=ckpt,
                    run_log=run_log,
                )
                if seed == config.seeds[0]:
                    served_student = _served_student(config, data, name, model_config, max_len, ckpt, run)
            else:
                ckpt = _checkpoint(
                    paths,
                    config,
                    role,
                    name,
                    seed,
                    mc,
                    train_cfg,
                    loop_key(loop),
                    data.config,
                    data.data_version,
                )
                run = train_ranking(
                    name,
                    model,
                    data,
                    seed=seed,
                    train_config=train_cfg,
                    loop_config=loop,
                    model_config=model_config,
                    checkpoint_dir=ckpt,
                    run_log=run_log,
                )
            if role not in roles:
                roles[role] = RoleResult(
                    role=role,
                    model=PRETTY.get(name, name) if role == "baseline" else student_label,
                    max_len=max_len,
                    test=[],
                    num_parameters=run.num_parameters,
                    flops_per_example=run.flops_per_example,
                    latency_ms_per_1k=latency_ms_per_1k(
                        [(model, max_len)],
                        data,
                        n_candidates=config.latency_candidates,
                        repeats=config.latency_repeats,
                    ),
                    train_time_s=[],
                )
            roles[role].test.append(run.test)
            roles[role].train_time_s.append(run.train_time_s)
            if run.run_id:
                roles[role].run_ids.append(run.run_id)
            say(f"{role} seed {seed}: test AUC {run.test['auc']:.4f} ({run.train_time_s:.0f} s)")

    tests = []
    if len(config.seeds) >= 2:
        tests = paired_seed_tests(
            "student distilled",
            "student plain",
            roles["student_distilled"].test,
            roles["student_plain"].test,
            ("auc", "gauc", "log_loss"),
            lambda t, m: t.get(m, float("nan")),
        )
        # The goal's other claim: the distilled student beats the baseline it is measured against.
        tests += paired_seed_tests(
            "student distilled",
            "baseline",
            roles["student_distilled"].test,
            roles["baseline"].test,
            ("auc",),
            lambda t, m: t.get(m, float("nan")),
        )
    result = TeacherStudentResult(
        config=config,
        data=data,
        roles={r: roles[r] for r in ROLES},
        scores_rows=build.rows,
        scores_computed=build.computed,
        scores_version=build.version.version,
        tests=tests,
        hardware=hardware_description(),
        served_student=served_student,
    )
    result.wall_time_s = time.perf_counter() - started
    result.summary_run_id = _record_summary(run_log, result)
    result.report_path = write_report(
        paths.artifacts / "distill" / f"report_{config.dataset}.md", format_report(result)
    )
    return result


def _record_summary(run_log: RunLog, result: TeacherStudentResult) -> str:
    """One kind 'distill' run holding every figure of the table (what the dashboard lists)."""
    c = result.config
    run_id = run_log.start(
        "distill",
        "teacher-student",
        config={"experiment": c.model_dump(mode="json"), "dataset": c.dataset},
        data_version=result.data.data_version,
        protocol=f"{PROTOCOL}; teacher scores {result.scores_version}; seeds {list(c.seeds)}",
        seed=c.seeds[0],
    )
    metrics: dict[str, float] = {}
    for role, r in result.roles.items():
        for m in ("auc", "gauc", "log_loss", "calibration", "ece", "oracle_share"):
            value = r.mean(m)
            if np.isfinite(value):
                metrics[f"{role}/{m}"] = value
        metrics[f"{role}/flops_per_example"] = r.flops_per_example
        metrics[f"{role}/num_parameters"] = float(r.num_parameters)
        metrics[f"{role}/latency_ms_per_1k"] = r.latency_ms_per_1k
    lift = result.lift_retained
    if lift is not None:
        metrics["lift_retained"] = lift
    metrics["flops_ratio"] = result.flops_ratio
    metrics["goal_met"] = float(result.goal_met)
    run_log.log_metrics(run_id, metrics, step=0, split="test")
    run_log.finish(run_id, metrics={**metrics, "wall_time_s": result.wall_time_s})
    return run_id


# -- formatting ---------------------------------------------------------------------------------------------


def _fmt_count(value: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def _cell(r: RoleResult, metric: str, digits: int = 4) -> str:
    values = [t[metric] for t in r.test if metric in t]
    if len(values) != len(r.test) or not values:
        return "n/a"
    return summarize(values).format(digits) if len(values) > 1 else f"{values[0]:.{digits}f}"


def format_table(result: TeacherStudentResult) -> str:
    """One row per role: test metrics (mean ± std over seeds; the teacher is one run), then the cost."""
    oracle = result.data.has_oracle
    header = ["Role", "Model", "History L", "AUC", "GAUC", "Log loss", "Calibration", "ECE"]
    header += ["Oracle share"] if oracle else []
    header += ["Params", "FLOPs/example", "CPU ms / 1k candidates", "Train time (s)"]
    lines = markdown_head(header)
    for role, r in result.roles.items():
        cells = [ROLE_NAMES[role], r.model, str(r.max_len)]
        cells += [_cell(r, m) for m in ("auc", "gauc", "log_loss")]
        cells += [_cell(r, "calibration", 3), _cell(r, "ece")]
        if oracle:
            cells.append(_cell(r, "oracle_share", 3))
        cells += [
            _fmt_count(r.num_parameters),
            _fmt_count(r.flops_per_example),
            f"{r.latency_ms_per_1k:.1f}",
            f"{np.mean(r.train_time_s):.0f}",
        ]
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def goal_line(result: TeacherStudentResult) -> str:
    """The issue's check: >= lift_goal of the teacher's AUC lift over the baseline at <= flops_goal FLOPs."""
    c = result.config
    t, s, b = (result.roles[r].mean("auc") for r in ("teacher", "student_distilled", "baseline"))
    plain = result.roles["student_plain"].mean("auc")
    ratio = result.flops_ratio
    flops = (
        f"FLOPs ratio {ratio:.3f} (1/{1 / ratio:.0f}) vs <= {c.flops_goal:g}"
        if ratio > 0
        else "FLOPs ratio 0"
    )
    lift = result.lift_retained
    t_base = result.student_vs_baseline
    if result.goal_met:
        verdict = "MET"
    elif not result.goal_reached_on_means:
        verdict = "NOT MET"
    elif t_base is None:
        verdict = "NOT ESTABLISHED (one seed: no spread and no paired test, so no claim)"
    else:
        verdict = (
            f"NOT ESTABLISHED (the figures reach it, but the distilled student is not significantly above "
            f"the baseline: paired t over {t_base.n} seeds p={t_base.p_value:.3g})"
        )
    goal = (
        f"Goal ({c.lift_goal:.0%} of the teacher's AUC lift over the baseline at <= {c.flops_goal:g} of its "
        "FLOPs)"
    )
    if lift is None:
        return (
            f"{goal}: NOT MET - the teacher (AUC {t:.4f}) does not beat the baseline ({b:.4f}), so there is "
            f"no lift to keep; distilled student {s:.4f}, plain student {plain:.4f}; {flops}."
        )
    line = (
        f"{goal}: {verdict} - lift retained {lift:.1%} (student {s - b:+.4f} vs teacher {t - b:+.4f} over "
        f"baseline AUC {b:.4f}; the plain student {plain - b:+.4f}); {flops}."
    )
    baseline_aucs = [m["auc"] for m in result.roles["baseline"].test if "auc" in m]
    spread = 2 * summarize(baseline_aucs).std if len(baseline_aucs) > 1 else 0.0
    if t - b < spread:
        line += (
            f" Caution: the teacher's lift ({t - b:+.4f}) is below 2 std of the baseline's AUC over seeds "
            f"({spread:.4f}), so the retained share is not informative."
        )
    return line


def format_report(result: TeacherStudentResult) -> str:
    c, d = result.config, result.data
    used = {k: len(v) for k, v in d.splits.items()}
    loop = c.loop
    lines = [
        f"# Teacher -> student distillation: {c.dataset}",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {result.hardware}; examples "
        f"version {d.data_version}; examples train/valid/test {d.split_sizes}, used {used}; tasks "
        f"{', '.join(d.tasks)}.",
        "",
        f"Protocol: {PROTOCOL}; student and baseline seeds {', '.join(map(str, c.seeds))} (mean ± std); "
        f"the teacher is trained once (seed {c.seeds[0]}); test evaluated once per run on the checkpoint "
        f"with the best validation {loop.monitor}.",
        f"Teacher scores `{d.dataset}.teacher_scores` version {result.scores_version}: "
        f"{result.scores_rows:,} rows (every train/valid example + {c.scores.candidates_per_example} "
        f"unlabelled candidates per training example){'' if result.scores_computed else ', reused (fresh)'}.",
        f"Distillation loss: BCE(y, s(z_s)) + {c.distill.weight} * {c.distill.temperature}^2 * "
        f"BCE(s(z_t/{c.distill.temperature}), s(z_s/{c.distill.temperature})); soft term on labelled and "
        f"unlabelled rows ({'on' if c.distill.use_unlabelled else 'off'}).",
        f"Training: AdamW lr {loop.optimizer.lr}, batch {c.train.batch_size}, "
        f"{c.train.epoch_examples or 'all'} examples per epoch, at most {loop.max_epochs} epochs, patience "
        f"{loop.patience}. Student preset: {c.student_overrides}.",
        f"Cost: FLOPs/example by the torch flop counter over {c.train.flop_examples} test examples; CPU ms "
        f"per 1,000 candidates = best of {c.latency_repeats} forward passes over {c.latency_candidates} "
        f"candidates of one user (longest test history), {torch.get_num_threads()} torch thread(s); ensemble "
        "figures are sums over members.",
        f"Wall time: {result.wall_time_s:.0f} s.",
        "",
        format_table(result),
        "",
        goal_line(result),
        "",
    ]
    if result.tests:
        lines += ["## Distilled vs plain student (paired t-test over seeds)", ""]
        lines += [f"- {t.format()}" for t in result.tests]
        lines.append("")
    return "\n".join(lines)


# -- CLI ----------------------------------------------------------------------------------------------------
app = typer.Typer(help="Teacher -> student distillation for serving.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Teacher -> student distillation for serving."""


@app.command("teacher-student")
def teacher_student_command(
    dataset: Annotated[
        Literal["synthetic", "ml100k"], typer.Option(help="synthetic (generated) or ml100k.")
    ] = "ml100k",
    source_dir: Annotated[
        Path | None, typer.Option(help="MovieLens-100K folder (default: download).")
    ] = None,
    synthetic_preset: Annotated[
        str, typer.Option(help=f"Synthetic preset: {', '.join(SyntheticConfig.preset_names())}.")
    ] = "quick",
    seeds: Annotated[int, typer.Option(min=1, help="Student/baseline seeds (0..n-1).")] = 3,
    teacher: Annotated[
        str, typer.Option(help="Teacher model(s), comma-separated (several = ensemble).")
    ] = "hyformer",
    teacher_len: Annotated[int, typer.Option(min=1)] = 1000,
    student_len: Annotated[int, typer.Option(min=1)] = 50,
    candidates: Annotated[int, typer.Option(min=0, help="Unlabelled candidates per training example.")] = 2,
    weight: Annotated[float, typer.Option(min=0.0, help="lambda of the soft term.")] = 1.0,
    temperature: Annotated[float, typer.Option(min=0.01, help="tau.")] = 1.0,
    max_train: Annotated[int | None, typer.Option(min=1)] = None,
    max_valid: Annotated[int | None, typer.Option(min=1)] = None,
    max_test: Annotated[int | None, typer.Option(min=1)] = None,
    epoch_examples: Annotated[int | None, typer.Option(min=1)] = None,
    max_epochs: Annotated[int, typer.Option(min=1)] = 3,
    teacher_epochs: Annotated[
        int | None, typer.Option(min=1, help="The teacher's epoch cap (default: --max-epochs).")
    ] = None,
    patience: Annotated[int, typer.Option(min=1)] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option()] = 2e-3,
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0 = torch's default).")] = 1,
    progress: Annotated[bool, typer.Option()] = False,
    profile: ProfileOpt = "budget",
) -> None:
    """Teacher vs distilled student vs plain student vs DeepFM: the table and the goal check."""
    p = cli_profile(profile, seeds=seeds, max_epochs=max_epochs, patience=patience)
    if p.all_examples:
        max_train = max_valid = max_test = epoch_examples = None
        if teacher_epochs is not None:
            teacher_epochs = max(teacher_epochs, p.max_epochs)
    seeds, max_epochs, patience = p.seeds, p.max_epochs, p.patience
    typer.echo(f"profile {profile}: {p.describe()}")
    if threads:
        torch.set_num_threads(threads)
    try:
        config = TeacherStudentConfig(
            dataset=dataset,
            source_dir=source_dir if dataset == "ml100k" else None,
            synthetic=SyntheticConfig.preset(synthetic_preset) if dataset == "synthetic" else None,
            data=RankingDataConfig(
                max_train_examples=max_train, max_valid_examples=max_valid, max_test_examples=max_test
            ),
            teacher=split_csv(teacher),
            teacher_len=teacher_len,
            student_len=student_len,
            seeds=tuple(range(seeds)),
            train=RankingTrainConfig(batch_size=batch_size, epoch_examples=epoch_examples),
            loop=ranking_loop(max_epochs=max_epochs, patience=patience, lr=lr, progress=progress),
            teacher_loop=None
            if teacher_epochs is None
            else ranking_loop(max_epochs=teacher_epochs, patience=patience, lr=lr, progress=progress),
            scores=TeacherScoreConfig(candidates_per_example=candidates),
            distill=DistillConfig(weight=weight, temperature=temperature),
        )
    except ValueError as exc:
        raise typer.BadParameter(describe_config_error(exc)) from exc
    result = run_teacher_student(config, echo=typer.echo)
    typer.echo("")
    typer.echo(format_table(result))
    typer.echo("")
    typer.echo(goal_line(result))
    for t in result.tests:
        typer.echo(t.format())
    typer.echo(f"\nreport: {result.report_path} ({result.wall_time_s:.0f} s)")


if __name__ == "__main__":
    app()
