"""The sequential-retrieval experiment: popularity, SASRec, HSTU and HSTU-large on one dataset, several seeds,
under one or more training objectives; and a sweep that picks objective and hyper-parameters on validation.

Pipeline: ingest (MovieLens-100K from a folder or the download, or the user's own events file through
``ingest.events``) -> ``features.sequences`` -> leave-one-out split -> train each model per objective per
seed (early stopping on validation NDCG@10, test evaluated once on the best checkpoint) -> a markdown table of
mean ± std over seeds with parameters, FLOPs, time per epoch, time to quality and epochs -> paired
significance tests -> the report at ``<home>/reports/retrieval_<dataset>.md``. Every run is recorded in the
warehouse's run registry.

Objectives are named presets (``OBJECTIVE_PRESETS``); ``auto`` is the data's rule
(``training.retrieval.default_recipe``: full softmax up to 1M items, else sampled softmax with logQ; history,
dimension and dropout by events per user), and history / dimension / dropout not given explicitly come from
the same rule. ``gr`` is the GR paper's recipe (128 uniform negatives, L2, temperature 0.05, d 50).

Sweep (``run_sweep``): every (objective, dimension, dropout, learning rate) of a grid is trained with early
stopping and compared on validation NDCG@10 only; the test set is evaluated once, for the winner.

Checkpoints live in ``<home>/artifacts/retrieval/<dataset>/<model>/seed<k>-<key>`` (key = hash of every
config but the epoch cap, and the data version): running the command again resumes unfinished runs, reuses
finished ones, and continues runs that ended at a lower ``--max-epochs`` than the one asked for.

CLI: ``app`` (typer), mounted by the platform CLI; ``python -m recsys.experiments.retrieval --help`` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import Field, model_validator

from recsys.core.config import FrozenModel, PathsConfig, describe_config_error
from recsys.core.hashing import stable_hash
from recsys.evaluation.retrieval import PROTOCOL, LeaveOneOutSplit, RetrievalEvaluation, leave_one_out
from recsys.evaluation.significance import PairedTest, paired_tests_over_users, summarize
from recsys.experiments.common import (
    check_comparisons,
    check_seeds,
    echo_table_and_tests,
    format_count,
    markdown_head,
    markdown_row,
    paired_seed_tests,
    split_csv,
    write_report,
)
from recsys.features.sequences import build_sequences, load_sequences, num_items
from recsys.ingest.events import EventSchema, ingest_events
from recsys.ingest.movielens import ingest_movielens
from recsys.models.losses import FullSoftmaxConfig, GBCEConfig, RetrievalObjective, SampledSoftmaxConfig
from recsys.models.registry import REGISTRY, trainable_retrieval_models
from recsys.synthetic.config import SyntheticConfig
from recsys.synthetic.generator import generate, read_manifest
from recsys.synthetic.warehouse_load import load_into_warehouse
from recsys.training.loop import LoopConfig, OptimizerConfig, loop_key, record
from recsys.training.retrieval import (
    Recipe,
    RetrievalRunResult,
    RetrievalTrainConfig,
    served_temperature,
    split_recipe,
    train_retrieval,
)
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog, hardware_description

DEFAULT_MODELS = ("popularity", "sasrec", "hstu", "hstu-large")
TABLE_METRICS = tuple(f"{kind}@{k}" for k in (10, 50, 200) for kind in ("hr", "ndcg", "mrr"))
NAME_PATTERN = r"^[A-Za-z0-9_-]+$"


class ObjectiveVariant(FrozenModel):
    """One training recipe of the table: an objective (None = the data's rule), model fields and a history
    length that override the data's defaults (e.g. the GR recipe's d 50, dropout 0.2, history 200)."""

    name: str = Field(pattern=NAME_PATTERN)
    objective: RetrievalObjective | None = None
    model_params: dict[str, int | float] = Field(default_factory=dict)
    max_len: int | None = Field(None, gt=0, description="History length; None = the data's rule.")
    stochastic_length_alpha: float | None = Field(
        None,
        ge=1.0,
        le=2.0,
        description="Stochastic Length's alpha for this variant; None = the train config's.",
    )


OBJECTIVE_PRESETS: dict[str, ObjectiveVariant] = {
    v.name: v
    for v in (
        ObjectiveVariant(name="auto"),
        ObjectiveVariant(
            name="gr",
            objective=SampledSoftmaxConfig(),
            model_params={"embedding_dim": 50, "dropout": 0.2},
            max_len=200,
        ),
        ObjectiveVariant(name="sampled", objective=SampledSoftmaxConfig()),
        ObjectiveVariant(name="full", objective=FullSoftmaxConfig()),
        ObjectiveVariant(name="full-l2", objective=FullSoftmaxConfig(normalize=True, temperature=0.05)),
        ObjectiveVariant(
            name="full-l2-learned-t",
            objective=FullSoftmaxConfig(normalize=True, temperature=0.05, learn_temperature=True),
        ),
        ObjectiveVariant(name="uniform-1024", objective=SampledSoftmaxConfig(num_negatives=1024)),
        ObjectiveVariant(
            name="mixed-logq",
            objective=SampledSoftmaxConfig(num_negatives=1024, negatives="mixed", logq_correction=True),
        ),
        ObjectiveVariant(
            name="in-batch-logq",
            objective=SampledSoftmaxConfig(num_negatives=1024, negatives="in_batch", logq_correction=True),
        ),
        ObjectiveVariant(name="gbce", objective=GBCEConfig()),
    )
}


def objective_variants(names: str) -> tuple[ObjectiveVariant, ...]:
    """Comma-separated preset names -> variants; an unknown name is a ValueError listing the known ones."""
    chosen = split_csv(names)
    unknown = [n for n in chosen if n not in OBJECTIVE_PRESETS]
    if unknown or not chosen:
        raise ValueError(f"objectives: unknown preset(s) {unknown}; known: {sorted(OBJECTIVE_PRESETS)}")
    return tuple(OBJECTIVE_PRESETS[n] for n in chosen)


def length_variants(
    variants: tuple[ObjectiveVariant, ...], lengths: tuple[int, ...], alpha: float | None
) -> tuple[ObjectiveVariant, ...]:
    """Each variant at each history length (``<name>-L<n>``; none given keeps the variant's own), and with
    ``alpha`` a Stochastic Length twin of each (``<name>[-L<n>]-sl<alpha>``), in that order."""
    if any(n < 2 for n in lengths):
        raise ValueError(f"lengths: history lengths must be >= 2, got {list(lengths)}")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"lengths: give each history length once, got {list(lengths)}")
    out: list[ObjectiveVariant] = []
    for v in variants:
        sized = (
            [v.model_copy(update={"name": f"{v.name}-L{n}", "max_len": n}) for n in lengths]
            if lengths
            else [v]
        )
        for s in sized:
            out.append(s)
            if alpha is not None:
                out.append(
                    s.model_copy(update={"name": f"{s.name}-sl{alpha:g}", "stochastic_length_alpha": alpha})
                )
    return tuple(out)


def length_comparisons(
    models: tuple[str, ...], variants: tuple[ObjectiveVariant, ...]
) -> tuple[tuple[str, str], ...]:
    """For ``length_variants``' tables: each Stochastic Length twin against its plain variant, each longer
    history against the shortest (plain), and HSTU(-large) against SASRec at every plain variant."""
    plain = [v for v in variants if v.stochastic_length_alpha is None]
    pairs: list[tuple[str, str]] = []
    for m in models:
        if m == "popularity":
            continue
        for v in variants:
            if v.stochastic_length_alpha is not None:
                base = v.name.rsplit("-sl", 1)[0]
                pairs.append((run_key(m, v.name, variants), run_key(m, base, variants)))
        pairs += [(run_key(m, v.name, variants), run_key(m, plain[0].name, variants)) for v in plain[1:]]
    pairs += [
        (run_key(a, v.name, variants), run_key(b, v.name, variants))
        for v in plain
        for a, b in (("hstu", "sasrec"), ("hstu-large", "sasrec"))
        if a in models and b in models
    ]
    return tuple(pairs)


def run_key(model: str, variant: str, variants: tuple[ObjectiveVariant, ...]) -> str:
    """Row name of a run: the model alone with one objective (and for popularity), else model/objective."""
    return model if len(variants) == 1 or model == "popularity" else f"{model}/{variant}"


def default_comparisons(
    models: tuple[str, ...], variants: tuple[ObjectiveVariant, ...]
) -> tuple[tuple[str, str], ...]:
    """Every other objective against the first, per model; then HSTU(-large) vs SASRec under the first."""
    first = variants[0].name
    pairs = [
        (run_key(m, v.name, variants), run_key(m, first, variants))
        for m in models
        if m != "popularity"
        for v in variants[1:]
    ]
    pairs += [
        (run_key(a, first, variants), run_key(b, first, variants))
        for a, b in (("hstu", "sasrec"), ("hstu-large", "sasrec"))
        if a in models and b in models
    ]
    return tuple(pairs)


class RetrievalExperimentConfig(FrozenModel):
    dataset: str = Field("ml100k", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Warehouse schema name.")
    source_dir: Path | None = Field(None, description="MovieLens-100K folder; None downloads it.")
    events_path: Path | None = Field(None, description="A user's own events file (CSV/Parquet) instead.")
    event_schema: EventSchema = EventSchema()
    synthetic: SyntheticConfig | None = Field(
        None, description="Generate this synthetic dataset (its click log) and load it as ``dataset``."
    )
    models: tuple[str, ...] = DEFAULT_MODELS
    seeds: tuple[int, ...] = (0, 1, 2)
    objectives: tuple[ObjectiveVariant, ...] = Field(
        (OBJECTIVE_PRESETS["auto"],),
        description="The recipes to compare; default the data's rule ('auto'), which the pipeline trains, "
        "packages (from each run's recorded model config, ``serving_record``) and serves.",
    )
    train: RetrievalTrainConfig = Field(
        RetrievalTrainConfig(),
        description="Training knobs; its max_len when set explicitly, else the data's rule; its loss is "
        "ignored (the objectives decide).",
    )
    model_params: dict[str, int | float] = Field(
        default_factory=dict,
        description="Model fields for every run (e.g. embedding_dim, dropout); fields "
        "not given come from the objective variant, then from the data's rule.",
    )
    loop: LoopConfig = LoopConfig(max_epochs=100, patience=10)
    comparisons: tuple[tuple[str, str], ...] | None = Field(
        None, description="Pairs of run names to test; None = default_comparisons."
    )
    test_metrics: tuple[str, ...] = ("ndcg@10", "hr@10")

    @model_validator(mode="after")
    def _check(self) -> RetrievalExperimentConfig:
        own = {m: REGISTRY[m].own_trainer for m in self.models if m in REGISTRY and REGISTRY[m].own_trainer}
        if own:
            raise ValueError(f"models: {own} train with their own command, not the retrieval experiment")
        unknown = [m for m in self.models if m not in REGISTRY or REGISTRY[m].task != "retrieval"]
        if unknown:
            known = trainable_retrieval_models()
            raise ValueError(f"models: unknown retrieval model(s) {unknown}; known: {known}")
        if not self.models:
            raise ValueError("models: name at least one model")
        check_seeds(self.seeds)
        given = [n for n in ("source_dir", "events_path", "synthetic") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)}: give one data source, not several")
        names = [v.name for v in self.objectives]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"objectives: need at least one, with distinct names; got {names}")
        check_comparisons(self.resolved_comparisons(), self.run_names())
        return self

    def run_names(self) -> list[str]:
        return list(
            dict.fromkeys(run_key(m, v.name, self.objectives) for m in self.models for v in self.objectives)
        )

    def resolved_comparisons(self) -> tuple[tuple[str, str], ...]:
        if self.comparisons is not None:
            return self.comparisons
        return default_comparisons(self.models, self.objectives)


def resolve_run(
    recipe: Recipe,
    variant: ObjectiveVariant,
    train: RetrievalTrainConfig,
    model_fields: dict[str, int | float],
) -> tuple[RetrievalTrainConfig, dict[str, int | float]]:
    """The train config and model fields of one variant: explicit values first (the experiment's, then the
    variant's), then the data's rule for history, dimension, dropout and objective."""
    if "max_len" in train.model_fields_set:
        max_len = train.max_len
    else:
        max_len = variant.max_len if variant.max_len is not None else recipe.max_len
    objective = variant.objective if variant.objective is not None else recipe.objective
    fields: dict[str, int | float] = {
        "embedding_dim": recipe.embedding_dim,
        "dropout": recipe.dropout,
        **variant.model_params,
        **model_fields,
    }
    update: dict[str, Any] = {"max_len": max_len, "loss": objective}
    if variant.stochastic_length_alpha is not None:
        update["stochastic_length_alpha"] = variant.stochastic_length_alpha
    return train.model_copy(update=update), fields


@dataclass
class ExperimentResult:
    config: RetrievalExperimentConfig
    data_version: str
    num_items: int
    num_users: int
    num_eval_users: int
    runs: dict[str, list[RetrievalRunResult]]
    tests: list[PairedTest] = field(default_factory=list)
    hardware: str = ""
    report_path: Path | None = None
    recipe: Recipe | None = None
    settings: dict[str, RunSettings] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSettings:
    """What one table row was trained with (resolved from the objective variant and the data's rule)."""

    train: RetrievalTrainConfig
    model_fields: dict[str, int | float]

    def describe(self) -> str:
        fields = ", ".join(f"{k} {v}" for k, v in sorted(self.model_fields.items()))
        loss = self.train.loss.model_dump(mode="json") if self.train.loss is not None else "auto"
        alpha = self.train.stochastic_length_alpha
        sl = f"; Stochastic Length alpha {alpha:g}" if alpha is not None else ""
        return f"history {self.train.max_len}{sl}; {fields}; loss {loss}"


def model_fields_of(name: str, fields: dict[str, int | float]) -> dict[str, int | float]:
    """Fields one model takes: popularity none; SASRec's FFN as wide as its embedding (Kang & McAuley)."""
    if name == "popularity":
        return {}
    if name == "sasrec" and "ffn_dim" not in fields and "embedding_dim" in fields:
        return {**fields, "ffn_dim": fields["embedding_dim"]}
    return dict(fields)


def train_one(
    name: str,
    split: LeaveOneOutSplit,
    seed: int,
    train: RetrievalTrainConfig,
    fields: dict[str, int | float],
    config: RetrievalExperimentConfig,
    paths: PathsConfig,
    run_log: RunLog | None,
    data_version: str,
    *,
    loop: LoopConfig | None = None,
    evaluate_test: bool = True,
) -> RetrievalRunResult:
    """Train (or reuse the checkpoint of) one run; its checkpoint key covers all config but the epoch cap."""
    loop = loop or config.loop
    key = stable_hash(name, train, fields, loop_key(loop), data_version, length=12)
    ckpt = paths.artifacts / "retrieval" / config.dataset / name / f"seed{seed}-{key}"
    return train_retrieval(
        name,
        split,
        seed=seed,
        train_config=train,
        loop_config=loop,
        model_fields=fields,
        checkpoint_dir=ckpt if name != "popularity" else None,
        run_log=run_log,
        data_version=data_version,
        dataset=config.dataset,
        evaluate_test=evaluate_test,
    )


def prepare_split(
    wh_path: Path, config: RetrievalExperimentConfig, *, synthetic_root: Path | None = None
) -> tuple[LeaveOneOutSplit, str]:
    """Ingest (or generate and load) the dataset, skipped when unchanged, build its sequences, and split them
    leave-one-out. A synthetic run is written under ``synthetic_root`` (default: beside the warehouse)."""
    with Warehouse(wh_path) as wh:
        if config.synthetic is not None:
            root = synthetic_root if synthetic_root is not None else Path(wh_path).parent / "synthetic"
            out_dir = root / f"{config.dataset}-{config.synthetic.data_version()}"
            try:
                reuse = read_manifest(out_dir).data_version == config.synthetic.data_version()
            except FileNotFoundError:
                reuse = False
            if not reuse:
                generate(config.synthetic, out_dir)
            load_into_warehouse(wh, out_dir, dataset=config.dataset)
        elif config.events_path is not None:
            ingest_events(wh, config.dataset, Path(config.events_path), schema=config.event_schema)
        elif config.dataset == "ml100k" or config.source_dir is not None:
            ingest_movielens(wh, config.source_dir, dataset=config.dataset)
        elif not wh.has_table(f"{config.dataset}.events"):
            raise ValueError(
                f"dataset {config.dataset!r}: give events_path (own data) or source_dir (MovieLens-100K), "
                "or ingest it first"
            )
        version = build_sequences(wh, config.dataset).version
        sequences = load_sequences(wh, config.dataset)
        n_items = num_items(wh, config.dataset)
    return leave_one_out(sequences, n_items), version


def run_retrieval_experiment(
    config: RetrievalExperimentConfig, paths: PathsConfig | None = None, *, echo: Any = None
) -> ExperimentResult:
    """Train and test every model for every seed, run the paired tests and write the markdown report."""
    paths = paths or PathsConfig()
    say = echo or (lambda _msg: None)
    split, data_version = record(
        prepare_split, paths.warehouse, config, synthetic_root=paths.home / "synthetic"
    )
    say(
        f"{config.dataset}: {split.num_items} items, {len(split.train_users)} users, "
        f"{len(split.test)} evaluated (data version {data_version})"
    )
    recipe = split_recipe(split)
    say(f"data rule: {recipe.reason}")
    run_log = record(RunLog, paths.warehouse)
    runs: dict[str, list[RetrievalRunResult]] = {}
    settings: dict[str, RunSettings] = {}
    for name in config.models:
        for variant in config.objectives if name != "popularity" else config.objectives[:1]:
            key_name = run_key(name, variant.name, config.objectives)
            train, fields = resolve_run(recipe, variant, config.train, config.model_params)
            fields = model_fields_of(name, fields)
            settings[key_name] = RunSettings(train, fields)
            for seed in config.seeds:
                result = train_one(name, split, seed, train, fields, config, paths, run_log, data_version)
                runs.setdefault(key_name, []).append(result)
                assert result.test is not None
                say(
                    f"{key_name} seed {seed}: test ndcg@10 {result.test.metrics['ndcg@10']:.4f} "
                    f"hr@10 {result.test.metrics['hr@10']:.4f} (best epoch {result.best_epoch}/"
                    f"{result.epochs_run}, {result.train_time_s:.0f} s)"
                )
    result = ExperimentResult(
        config,
        data_version,
        split.num_items,
        len(split.train_users),
        len(split.test),
        runs,
        paired_tests(runs, config),
        hardware_description(),
        recipe=recipe,
        settings=settings,
    )
    result.report_path = write_report(
        paths.home / "reports" / f"retrieval_{config.dataset}.md", format_report(result)
    )
    return result


def serving_record(run: RetrievalRunResult, settings: RunSettings) -> dict[str, Any]:
    """What packaging needs to serve a trained run as it was trained: its model config (JSON) and the
    temperature its scores are divided by (``served_temperature``); popularity has neither."""
    model = run.model
    config = getattr(model, "config", None)
    if model is None or config is None or settings.train.loss is None or run.model_name == "popularity":
        return {"model_config": None, "temperature": None}
    return {
        "model_config": config.model_dump(mode="json"),
        "temperature": served_temperature(settings.train.loss, model),
    }


def tested(run: RetrievalRunResult) -> RetrievalEvaluation:
    """A run's test evaluation (every table run has one; sweep candidates do not)."""
    if run.test is None:
        raise ValueError(f"{run.model_name} seed {run.seed} was not evaluated on test")
    return run.test


def seconds_per_epoch(run: RetrievalRunResult) -> float:
    """Training wall time per epoch (validation included) of one run."""
    return run.train_time_s / max(run.epochs_run, 1)


def paired_tests(
    runs: dict[str, list[RetrievalRunResult]], config: RetrievalExperimentConfig
) -> list[PairedTest]:
    """Per comparison: a paired t-test over seeds per metric; Wilcoxon and t over users for the first seed."""
    tests: list[PairedTest] = []
    for a, b in config.resolved_comparisons():
        ra, rb = runs[a], runs[b]
        tests += paired_seed_tests(a, b, ra, rb, config.test_metrics, lambda r, m: tested(r).metrics[m])
        first_a, first_b = ra[0], rb[0]
        if list(tested(first_a).users) != list(tested(first_b).users):
            raise ValueError(f"{a} and {b} were evaluated on different users: cannot pair them")
        metric = config.test_metrics[0]
        for t in paired_tests_over_users(
            tested(first_a).per_user(metric),
            tested(first_b).per_user(metric),
            metric=metric,
            a_name=a,
            b_name=b,
        ):
            tests.append(replace(t, test=f"{t.test}, seed {first_a.seed}"))
    return tests


def format_table(result: ExperimentResult) -> str:
    """Markdown table: one row per model, mean ± std over seeds of the test metrics, then cost columns."""
    header = [
        "Model",
        *[m.upper() for m in TABLE_METRICS],
        "Params",
        "FLOPs/user",
        "s/epoch",
        "Time to quality (s)",
        "Best epoch / run",
    ]
    lines = markdown_head(header)
    for name, runs in result.runs.items():
        cells = [name]
        for metric in TABLE_METRICS:
            cells.append(summarize([tested(r).metrics[metric] for r in runs]).format())
        ttq = summarize([r.time_to_quality_s for r in runs])
        best = summarize([r.best_epoch for r in runs])
        ran = summarize([r.epochs_run for r in runs])
        per_epoch = summarize([seconds_per_epoch(r) for r in runs])
        cells += [
            format_count(runs[0].num_parameters),
            format_count(runs[0].flops_per_example),
            f"{per_epoch.mean:.1f}",
            f"{ttq.mean:.0f} ± {ttq.std:.0f}",
            f"{best.mean:.0f} / {ran.mean:.0f}",
        ]
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def format_report(result: ExperimentResult) -> str:
    c = result.config
    seeds = ", ".join(str(s) for s in c.seeds)
    lines = [
        f"# Sequential retrieval: {c.dataset}",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {result.hardware}; data version "
        f"{result.data_version}; {result.num_items} items, {result.num_users} users, "
        f"{result.num_eval_users} test users.",
        "",
        f"Protocol: {PROTOCOL}; history per row (below); seeds {seeds} (mean ± std over seeds, test set "
        f"evaluated once per run on the checkpoint with the best validation {c.loop.monitor}).",
        f"Data rule: {result.recipe.reason if result.recipe else '-'}.",
        f"Training: AdamW lr {c.loop.optimizer.lr} "
        f"betas {tuple(c.loop.optimizer.betas)} wd {c.loop.optimizer.weight_decay}, "
        f"batch {c.train.batch_size}, at most {c.loop.max_epochs} epochs, "
        f"validation every {c.loop.eval_every} epoch(s), patience {c.loop.patience}. Per row:",
        *[f"- {name}: {st.describe()}" for name, st in result.settings.items() if st.model_fields],
        "",
        "Time to quality = training wall time (validation included) until the epoch with the best validation "
        "NDCG@10. FLOPs/user = forward FLOPs to score one user against all items (torch flop counter).",
        "",
        format_table(result),
        "",
        "## Significance",
        "",
    ]
    lines += [f"- {t.format()}" for t in result.tests] or ["- (no comparisons configured)"]
    lines += [
        "",
        "## Per seed",
        "",
        "| Model | Seed | NDCG@10 | HR@10 | Best epoch | Epochs | Time to quality (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in result.runs.items():
        for r in runs:
            m = tested(r).metrics
            lines.append(
                f"| {name} | {r.seed} | {m['ndcg@10']:.4f} | {m['hr@10']:.4f} "
                f"| {r.best_epoch} | {r.epochs_run} | {r.time_to_quality_s:.0f} |"
            )
    return "\n".join(lines) + "\n"


# -- sweep --------------------------------------------------------------------------------------------------
class SweepConfig(FrozenModel):
    dataset: str = Field("ml100k", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Warehouse schema name.")
    source_dir: Path | None = None
    events_path: Path | None = None
    event_schema: EventSchema = EventSchema()
    synthetic: SyntheticConfig | None = None
    model: str = "sasrec"
    objectives: tuple[ObjectiveVariant, ...] = (OBJECTIVE_PRESETS["auto"], OBJECTIVE_PRESETS["gr"])
    dims: tuple[int, ...] = (64,)
    dropouts: tuple[float, ...] = (0.2, 0.5)
    lrs: tuple[float, ...] = (1e-3,)
    seed: int = 0
    train: RetrievalTrainConfig = RetrievalTrainConfig()
    loop: LoopConfig = LoopConfig(max_epochs=100, patience=10)
    select_metric: str = Field("ndcg@10", description="Validation metric the winner is chosen on.")

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        known = trainable_retrieval_models(with_popularity=False)
        if self.model not in known:
            raise ValueError(f"model: {self.model!r} is not a trainable retrieval model; known: {known}")
        for name in ("objectives", "dims", "dropouts", "lrs"):
            if not getattr(self, name):
                raise ValueError(f"{name}: give at least one value")
        if any(d < 1 for d in self.dims):
            raise ValueError(f"dims: dimensions must be >= 1, got {self.dims}")
        if any(not 0.0 <= p < 1.0 for p in self.dropouts):
            raise ValueError(f"dropouts: rates must be in [0, 1), got {self.dropouts}")
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs: learning rates must be > 0, got {self.lrs}")
        return self

    def experiment(self) -> RetrievalExperimentConfig:
        """The experiment config sharing this sweep's data, checkpoints and loop."""
        return RetrievalExperimentConfig(
            dataset=self.dataset,
            source_dir=self.source_dir,
            events_path=self.events_path,
            event_schema=self.event_schema,
            synthetic=self.synthetic,
            models=(self.model,),
            seeds=(self.seed,),
            train=self.train,
            loop=self.loop,
        )


@dataclass
class SweepCandidate:
    objective: str
    dim: int
    dropout: float
    lr: float
    run: RetrievalRunResult

    @property
    def label(self) -> str:
        return f"{self.objective} d={self.dim} dropout={self.dropout} lr={self.lr}"


@dataclass
class SweepResult:
    config: SweepConfig
    data_version: str
    recipe: Recipe
    candidates: list[SweepCandidate]
    winner: SweepCandidate
    sweep_run_id: str | None = None
    report_path: Path | None = None


def run_sweep(config: SweepConfig, paths: PathsConfig | None = None, *, echo: Any = None) -> SweepResult:
    """Train every grid point (early stopping on validation), pick the best validation ``select_metric``, then
    evaluate the test set once, for the winner only (on its stored best checkpoint, no retraining)."""
    paths = paths or PathsConfig()
    say = echo or (lambda _msg: None)
    experiment = config.experiment()
    split, data_version = record(
        prepare_split, paths.warehouse, experiment, synthetic_root=paths.home / "synthetic"
    )
    recipe = split_recipe(split)
    say(f"data rule: {recipe.reason}")
    run_log = record(RunLog, paths.warehouse)
    candidates: list[SweepCandidate] = []
    grid = [
        (v, d, p, lr)
        for v in config.objectives
        for d in config.dims
        for p in config.dropouts
        for lr in config.lrs
    ]

    def loop_for(lr: float) -> LoopConfig:
        optimizer = config.loop.optimizer.model_copy(update={"lr": lr})
        return config.loop.model_copy(update={"optimizer": optimizer})

    def train_point(
        v: ObjectiveVariant, d: int, p: float, lr: float, evaluate_test: bool
    ) -> RetrievalRunResult:
        train, fields = resolve_run(recipe, v, config.train, {"embedding_dim": d, "dropout": p})
        fields = model_fields_of(config.model, fields)
        return train_one(
            config.model,
            split,
            config.seed,
            train,
            fields,
            experiment,
            paths,
            run_log,
            data_version,
            loop=loop_for(lr),
            evaluate_test=evaluate_test,
        )

    for v, d, p, lr in grid:
        run = train_point(v, d, p, lr, evaluate_test=False)
        candidates.append(SweepCandidate(v.name, d, p, lr, run))
        say(f"{candidates[-1].label}: valid {config.select_metric} {run.valid[config.select_metric]:.4f}")
    best = max(candidates, key=lambda c: c.run.valid[config.select_metric])  # first wins ties (grid order)
    tested_run = train_point(
        next(v for v in config.objectives if v.name == best.objective), best.dim, best.dropout, best.lr, True
    )
    winner = replace(best, run=tested_run)
    test = tested(tested_run)
    if tested_run.run_id is not None:
        record(run_log.log_metrics, tested_run.run_id, test.metrics, step=tested_run.best_epoch, split="test")
    sweep_id = record(
        run_log.start,
        "retrieval-sweep",
        config.model,
        config={**config.model_dump(mode="json"), "winner": winner.label, "winner_run_id": tested_run.run_id},
        data_version=data_version,
        protocol=f"{PROTOCOL}; selection on validation {config.select_metric}; test once for the winner",
        seed=config.seed,
    )
    record(
        run_log.finish,
        sweep_id,
        metrics={
            "candidates": float(len(candidates)),
            **{f"valid/{k}": v for k, v in tested_run.valid.items()},
            **{f"test/{k}": v for k, v in test.metrics.items()},
        },
    )
    result = SweepResult(config, data_version, recipe, candidates, winner, sweep_id)
    result.report_path = write_report(
        paths.home / "reports" / f"retrieval_sweep_{config.dataset}_{config.model}.md", format_sweep(result)
    )
    return result


def format_sweep(result: SweepResult) -> str:
    """Markdown: every candidate's validation figures and time per epoch; the winner's test figures."""
    c, metric = result.config, result.config.select_metric
    lines = [
        f"# Retrieval sweep: {c.model} on {c.dataset}",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; data version {result.data_version}; "
        f"data rule: {result.recipe.reason}; seed {c.seed}; selection on validation {metric}, test evaluated "
        "once for the winner.",
        "",
        *markdown_head(
            [
                "Objective",
                "d",
                "Dropout",
                "LR",
                f"Valid {metric.upper()}",
                "Valid HR@10",
                "s/epoch",
                "Best epoch / run",
            ]
        ),
    ]
    for cand in result.candidates:
        r = cand.run
        lines.append(
            markdown_row(
                [
                    cand.objective
                    + (" (winner)" if cand is result.winner or cand.label == result.winner.label else ""),
                    str(cand.dim),
                    f"{cand.dropout:g}",
                    f"{cand.lr:g}",
                    f"{r.valid[metric]:.4f}",
                    f"{r.valid['hr@10']:.4f}",
                    f"{seconds_per_epoch(r):.1f}",
                    f"{r.best_epoch} / {r.epochs_run}",
                ]
            )
        )
    test = tested(result.winner.run).metrics
    lines += [
        "",
        f"Winner: {result.winner.label}: test NDCG@10 {test['ndcg@10']:.4f}, HR@10 {test['hr@10']:.4f}.",
    ]
    return "\n".join(lines) + "\n"


# -- CLI ----------------------------------------------------------------------------------------------------
app = typer.Typer(help="Sequential retrieval experiments (SASRec, HSTU, popularity).", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Sequential retrieval experiments (SASRec, HSTU, popularity)."""


def _dataset_fields(
    dataset: str,
    source_dir: Path | None,
    events: Path | None,
    user_col: str,
    item_col: str,
    time_col: str,
    time_format: str,
    synthetic_preset: str | None = None,
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "source_dir": source_dir,
        "events_path": events,
        "synthetic": SyntheticConfig.preset(synthetic_preset) if synthetic_preset is not None else None,
        "event_schema": EventSchema(
            user_id=user_col, item_id=item_col, timestamp=time_col, timestamp_format=time_format
        ),
    }


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


DatasetOpt = Annotated[str, typer.Option(help="Warehouse schema name of the dataset.")]
SourceOpt = Annotated[Path | None, typer.Option(help="Unzipped MovieLens-100K folder (default: download).")]
EventsOpt = Annotated[Path | None, typer.Option(help="Your own events file (CSV/Parquet) to ingest.")]
UserColOpt = Annotated[str, typer.Option(help="Events column with the user id.")]
ItemColOpt = Annotated[str, typer.Option(help="Events column with the item id.")]
TimeColOpt = Annotated[str, typer.Option(help="Events column with the event time.")]
TimeFormatOpt = Annotated[str, typer.Option(help="'unix', 'iso8601' or a strptime format.")]
SyntheticOpt = Annotated[
    str | None,
    typer.Option(
        help="Generate a synthetic dataset (its click log) and load it as --dataset: "
        + ", ".join(SyntheticConfig.preset_names())
        + " (sparse_retrieval: 4,000 items, ~8 clicks per user)."
    ),
]
MaxLenOpt = Annotated[
    int | None, typer.Option(min=2, help="History length (default: the data's rule, 200 dense / 50 sparse).")
]
ThreadsOpt = Annotated[
    int | None, typer.Option(min=1, help="torch CPU threads (default: torch's choice; 1 on a busy machine).")
]
PRESETS_HELP = "Comma-separated objective presets: " + ", ".join(OBJECTIVE_PRESETS)


@app.command("run")
def run_command(
    dataset: DatasetOpt = "ml100k",
    source_dir: SourceOpt = None,
    events: EventsOpt = None,
    user_col: UserColOpt = "user_id",
    item_col: ItemColOpt = "item_id",
    time_col: TimeColOpt = "timestamp",
    time_format: TimeFormatOpt = "unix",
    synthetic_preset: SyntheticOpt = None,
    models: Annotated[str, typer.Option(help="Comma-separated models.")] = ",".join(DEFAULT_MODELS),
    objectives: Annotated[str, typer.Option(help=PRESETS_HELP + " ('auto' = the data's rule).")] = "auto",
    seeds: Annotated[int, typer.Option(min=1, help="Number of seeds (0..n-1).")] = 3,
    max_epochs: Annotated[int, typer.Option(min=1)] = 100,
    patience: Annotated[
        int, typer.Option(min=1, help="Validations without improvement before stopping.")
    ] = 10,
    eval_every: Annotated[int, typer.Option(min=1, help="Validate every this many epochs.")] = 1,
    max_len: MaxLenOpt = None,
    lengths: Annotated[
        str | None,
        typer.Option(help="Comma-separated history lengths: every objective at each (e.g. 200,1000)."),
    ] = None,
    stochastic_length: Annotated[
        float | None,
        typer.Option(min=1.0, max=2.0, help="Also train each variant with Stochastic Length at this alpha."),
    ] = None,
    dim: Annotated[int | None, typer.Option(min=1, help="Embedding dimension (default: the rule's).")] = None,
    dropout: Annotated[float | None, typer.Option(min=0.0, max=0.99, help="Default: the rule's.")] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show tqdm progress bars.")] = True,
    threads: ThreadsOpt = None,
) -> None:
    """Train popularity, SASRec, HSTU and HSTU-large per objective over several seeds; print the table.
    With ``--lengths`` / ``--stochastic-length`` every objective runs at each history length and with and
    without Stochastic Length, and the tests compare those twins."""
    if lengths is not None and max_len is not None:
        raise typer.BadParameter("give --lengths or --max-len, not both", param_hint="--lengths")
    fields: dict[str, int | float] = {}
    if dim is not None:
        fields["embedding_dim"] = dim
    if dropout is not None:
        fields["dropout"] = dropout
    train = {"batch_size": batch_size, **({"max_len": max_len} if max_len is not None else {})}
    try:
        variants = objective_variants(objectives)
        comparisons = None
        if lengths is not None or stochastic_length is not None:
            try:
                sizes = tuple(int(n) for n in split_csv(lengths)) if lengths is not None else ()
            except ValueError:
                raise ValueError(f"lengths: comma-separated integers, got {lengths!r}") from None
            variants = length_variants(variants, sizes, stochastic_length)
            comparisons = length_comparisons(tuple(split_csv(models)), variants)
        config = RetrievalExperimentConfig(
            **_dataset_fields(
                dataset, source_dir, events, user_col, item_col, time_col, time_format, synthetic_preset
            ),
            models=split_csv(models),
            objectives=variants,
            comparisons=comparisons,
            seeds=tuple(range(seeds)),
            train=RetrievalTrainConfig(**train),
            model_params=fields,
            loop=LoopConfig(
                max_epochs=max_epochs,
                patience=patience,
                eval_every=eval_every,
                device=device,
                progress=progress,
                optimizer=OptimizerConfig(lr=lr),
            ),
        )
    except ValueError as exc:
        raise typer.BadParameter(describe_config_error(exc)) from exc
    _set_threads(threads)
    result = run_retrieval_experiment(config, echo=typer.echo)
    echo_table_and_tests(format_table(result), result.tests)
    typer.echo(f"\nreport: {result.report_path}")


@app.command("sweep")
def sweep_command(
    dataset: DatasetOpt = "ml100k",
    source_dir: SourceOpt = None,
    events: EventsOpt = None,
    user_col: UserColOpt = "user_id",
    item_col: ItemColOpt = "item_id",
    time_col: TimeColOpt = "timestamp",
    time_format: TimeFormatOpt = "unix",
    synthetic_preset: SyntheticOpt = None,
    model: Annotated[str, typer.Option(help="Sequential retrieval model.")] = "sasrec",
    objectives: Annotated[str, typer.Option(help=PRESETS_HELP + ".")] = "auto,gr,gbce",
    dims: Annotated[str, typer.Option(help="Comma-separated embedding dimensions.")] = "64",
    dropouts: Annotated[str, typer.Option(help="Comma-separated dropout rates.")] = "0.2,0.5",
    lrs: Annotated[str, typer.Option(help="Comma-separated AdamW learning rates.")] = "0.001",
    seed: Annotated[int, typer.Option(help="Seed of every candidate.")] = 0,
    max_epochs: Annotated[int, typer.Option(min=1)] = 100,
    patience: Annotated[int, typer.Option(min=1)] = 10,
    max_len: MaxLenOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show tqdm progress bars.")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Grid over objective x dimension x dropout x learning rate, selected on validation NDCG@10; the test set
    is evaluated once, for the winner. Every candidate is recorded in the run registry."""
    try:
        config = SweepConfig(
            **_dataset_fields(
                dataset, source_dir, events, user_col, item_col, time_col, time_format, synthetic_preset
            ),
            model=model,
            objectives=objective_variants(objectives),
            dims=tuple(int(x) for x in split_csv(dims)),
            dropouts=tuple(float(x) for x in split_csv(dropouts)),
            lrs=tuple(float(x) for x in split_csv(lrs)),
            seed=seed,
            train=RetrievalTrainConfig(
                batch_size=batch_size, **({"max_len": max_len} if max_len is not None else {})
            ),
            loop=LoopConfig(max_epochs=max_epochs, patience=patience, device=device, progress=progress),
        )
    except ValueError as exc:
        raise typer.BadParameter(describe_config_error(exc)) from exc
    _set_threads(threads)
    result = run_sweep(config, echo=typer.echo)
    typer.echo("\n" + format_sweep(result))
    typer.echo(f"\nreport: {result.report_path}")


if __name__ == "__main__":
    app()
