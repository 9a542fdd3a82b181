"""The ranking / CTR comparison: DeepFM, DIN, RankMixer, LONGER, LONGER+RankMixer and HyFormer on one dataset.

Pipeline: the dataset into the warehouse (MovieLens-100K through ``ingest.movielens``, or a synthetic run
generated with ``synthetic.generate`` and loaded with ``synthetic.load_into_warehouse``) ->
``features.point_in_time.build_examples`` (point-in-time features, global temporal split) ->
``training.ranking.load_ranking_data`` -> every model x seed trained with early stopping on validation AUC,
the test split evaluated once on the best weights -> a markdown table of mean ± std over seeds with the cost
columns -> paired t-tests over seeds between neighbours of the expected ordering (HyFormer vs
LONGER+RankMixer, LONGER+RankMixer vs RankMixer, RankMixer vs DeepFM) -> ``<home>/reports/ranking_<ds>.md``.
Every run is recorded in the run registry (kind ``ranking``); checkpoints live in
``<home>/artifacts/ranking/<ds>/<model>/seed<k>-<key>``, so a second invocation reuses finished runs.

History length per model (the comparison is about long histories): the short models (DeepFM, DIN,
RankMixer) read the ``short_len`` most recent events (default 100; DeepFM and RankMixer mean-pool them), the
long models (LONGER, LONGER+RankMixer, HyFormer) read up to ``long_len`` (default 1,000).

Model configs: each config class's defaults, plus the presets of the ranking entries in
``models/registry.py`` (LONGER: token merge K = 8, the paper's best; HyFormer: the LONGER-style sequence
encoder, the only one of the three whose cost does not grow with L x D^2 per layer at L = 1,000, and width
D = 60 instead of 96, which puts its parameters next to LONGER+RankMixer's as in the paper's comparison),
plus ``model_overrides``.
OPEN choices picked for the CPU budget are the experiment config's fields, recorded with every run.

CLI: ``app`` (typer); ``python -m recsys.experiments.ranking run --help``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from pydantic import Field, model_validator

from recsys.core.config import FrozenModel, PathsConfig, describe_config_error
from recsys.core.hashing import stable_hash
from recsys.evaluation.significance import PairedTest, summarize
from recsys.experiments.common import (
    DatasetOpt,
    ProfileOpt,
    SourceDirOpt,
    SyntheticPresetOpt,
    SyntheticSeedOpt,
    check_comparisons,
    check_seeds,
    cli_profile,
    echo_table_and_tests,
    format_count,
    markdown_head,
    markdown_row,
    paired_seed_tests,
    split_csv,
    write_report,
)
from recsys.features.config import FeatureConfig
from recsys.features.point_in_time import build_examples
from recsys.ingest.movielens import ingest_movielens
from recsys.models.registry import REGISTRY, ModelEntry
from recsys.synthetic.config import SyntheticConfig
from recsys.synthetic.generator import SyntheticManifest, generate, read_manifest
from recsys.synthetic.warehouse_load import load_into_warehouse
from recsys.training.hstu_ranking import train_ranking_model
from recsys.training.loop import LoopConfig, OptimizerConfig, loop_key, seed_everything
from recsys.training.ranking import (
    PROTOCOL,
    RankingData,
    RankingDataConfig,
    RankingRunResult,
    RankingTrainConfig,
    load_ranking_data,
)
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog, hardware_description

#: The ranking models of the registry (name -> class, config class, preset, long/short history).
RANKING_MODELS: dict[str, ModelEntry] = {
    k: e for k, e in REGISTRY.items() if e.task == "ranking" and k != "dlrm"
}
DEFAULT_MODELS = tuple(RANKING_MODELS)
#: Neighbours in the ordering the papers lead one to expect:
#: HyFormer >= LONGER+RankMixer > RankMixer > DeepFM.
EXPECTED_PAIRS: tuple[tuple[str, str], ...] = (
    ("hyformer", "longer-rankmixer"),
    ("longer-rankmixer", "rankmixer"),
    ("rankmixer", "deepfm"),
)
#: The generative ranker against the target-attention baseline and the strongest long-history model.
GENERATIVE_PAIRS: tuple[tuple[str, str], ...] = (("hstu-ranker", "din"), ("hstu-ranker", "hyformer"))
#: The ordering claims the report checks: (a, b, strict) reads "a > b" (strict) or "a >= b".
CLAIMS: tuple[tuple[str, str, bool], ...] = (
    ("hyformer", "longer-rankmixer", False),
    ("longer-rankmixer", "rankmixer", True),
    ("rankmixer", "deepfm", True),
)
#: Significance level of the verdicts (paired t-test over seeds on test AUC).
ALPHA = 0.05
#: The long-range dial counts as on when at least this share of the achievable lift needs > 100 events.
LONG_RANGE_ON = 0.01
PRETTY = {
    "deepfm": "DeepFM",
    "din": "DIN",
    "rankmixer": "RankMixer",
    "longer": "LONGER",
    "longer-rankmixer": "LONGER+RankMixer",
    "hyformer": "HyFormer",
    "hstu-ranker": "HSTU ranker",
}


class RankingDataSource(FrozenModel):
    """The dataset fields that ``prepare_data`` reads, shared by the experiments built on the ranking data
    (this one, ``recsys.experiments.distillation``, ``recsys.experiments.continual``)."""

    dataset: str = Field("ml100k", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Warehouse schema name.")
    source_dir: Path | None = Field(
        None, description="MovieLens-100K folder (dataset ml100k); None downloads."
    )
    synthetic: SyntheticConfig | None = Field(None, description="Generate and load this synthetic run.")
    features: FeatureConfig = FeatureConfig()
    data: RankingDataConfig = RankingDataConfig()

    def _check_one_source(self) -> None:
        if self.synthetic is not None and self.source_dir is not None:
            raise ValueError("give either synthetic or source_dir, not both")

    def _ranking_config(self, models: tuple[str, ...], seeds: tuple[int, ...]) -> RankingExperimentConfig:
        """The ranking experiment config over this data source (for ``prepare_data``), without comparisons."""
        return RankingExperimentConfig(
            dataset=self.dataset,
            source_dir=self.source_dir,
            synthetic=self.synthetic,
            features=self.features,
            data=self.data,
            models=models,
            seeds=seeds,
            comparisons=(),
        )


def ranking_loop(
    *, max_epochs: int, patience: int, lr: float, progress: bool = True, device: str = "auto"
) -> LoopConfig:
    """The ranking-data experiments' training loop: AdamW at ``lr``, early stopping on validation AUC."""
    return LoopConfig(
        monitor="auc",
        mode="max",
        max_epochs=max_epochs,
        patience=patience,
        device=device,
        progress=progress,
        optimizer=OptimizerConfig(lr=lr),
    )


#: Default training loop of the ranking-data experiments.
RANKING_LOOP = ranking_loop(max_epochs=3, patience=1, lr=2e-3)


def check_ranking_monitor(name: str, loop: LoopConfig) -> None:
    """Raise ValueError unless ``loop`` monitors a ranking metric (``name`` is its config field)."""
    if loop.monitor.split("/")[-1] not in ("auc", "gauc", "log_loss", "ne"):
        raise ValueError(f"{name}.monitor must be a ranking metric, got {loop.monitor!r}")


class RankingExperimentConfig(RankingDataSource):
    models: tuple[str, ...] = DEFAULT_MODELS
    seeds: tuple[int, ...] = (0, 1, 2)
    short_len: int = Field(100, ge=1, description="History steps of DeepFM, DIN, RankMixer.")
    long_len: int = Field(1_000, ge=1, description="History steps of LONGER, LONGER+RankMixer, HyFormer.")
    train: RankingTrainConfig = RankingTrainConfig()
    loop: LoopConfig = RANKING_LOOP
    model_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Model name -> config fields that replace the preset's."
    )
    comparisons: tuple[tuple[str, str], ...] = EXPECTED_PAIRS
    test_metrics: tuple[str, ...] = ("auc", "gauc", "log_loss")

    @model_validator(mode="after")
    def _check(self) -> RankingExperimentConfig:
        if not self.models:
            raise ValueError("models: name at least one model")
        unknown = [m for m in self.models if m not in RANKING_MODELS]
        if unknown:
            raise ValueError(f"models: unknown ranking model(s) {unknown}; known: {sorted(RANKING_MODELS)}")
        bad = [m for m in self.model_overrides if m not in RANKING_MODELS]
        if bad:
            raise ValueError(f"model_overrides: unknown model(s) {bad}")
        check_seeds(self.seeds)
        check_comparisons(self.comparisons, self.models)
        self._check_one_source()
        check_ranking_monitor("loop", self.loop)
        return self

    def max_len(self, model: str) -> int:
        return self.long_len if RANKING_MODELS[model].long_sequence else self.short_len


@dataclass
class RankingExperimentResult:
    config: RankingExperimentConfig
    data: RankingData
    runs: dict[str, list[RankingRunResult]]
    tests: list[PairedTest] = field(default_factory=list)
    hardware: str = ""
    wall_time_s: float = 0.0
    prepare_time_s: float = 0.0
    report_path: Path | None = None
    synthetic_oracle_auc: float | None = None  # the generator's own figure over all logged impressions
    manifest: SyntheticManifest | None = None  # the synthetic run's manifest (oracle / last-100 figures)


def build_model(name: str, data: RankingData, max_len: int, overrides: dict[str, Any] | None = None):  # noqa: ANN201
    """(model, its config) for ``data.feature_spec(max_len)``: the preset, then ``overrides``."""
    choice = RANKING_MODELS[name]
    config = choice.config_cls(features=data.feature_spec(max_len), **{**choice.preset, **(overrides or {})})
    return choice.model_cls(config), config


def prepare_data(
    paths: PathsConfig, config: RankingExperimentConfig, say: Any
) -> tuple[RankingData, float | None]:
    """Ingest or generate + load the dataset, build the examples, load the arrays."""
    oracle = None
    with Warehouse(paths.warehouse) as wh:
        if config.synthetic is not None:
            syn = config.synthetic
            out_dir = paths.home / "synthetic" / f"{config.dataset}-{syn.data_version()}"
            try:
                manifest = read_manifest(out_dir)
                reuse = manifest.data_version == syn.data_version()
            except FileNotFoundError:
                reuse = False
            if not reuse:
                started = time.perf_counter()
                manifest = generate(syn, out_dir)
                say(
                    f"generated synthetic data {manifest.data_version} in "
                    f"{time.perf_counter() - started:.0f} s"
                )
            oracle = manifest.oracle_auc
            c = manifest.counts
            say(
                f"synthetic {manifest.data_version}: {c['users']:,} users, {c['items']:,} items, "
                f"{c['events']:,} click events ({c['events'] / max(c['users'], 1):.0f} per user), "
                f"{c['impressions']:,} logged impressions"
            )
            load_into_warehouse(wh, out_dir, dataset=config.dataset)
        elif config.dataset == "ml100k" or config.source_dir is not None:
            ingest_movielens(wh, config.source_dir, dataset=config.dataset)
        elif not wh.has_table(f"{config.dataset}.events"):
            raise ValueError(
                f"dataset {config.dataset!r} is not in the warehouse: give source_dir (MovieLens-100K) or "
                "synthetic, or ingest it first"
            )
        build_examples(wh, config.dataset, config.features)
        data = load_ranking_data(wh, config.dataset, config.data)
    return data, oracle


def run_key(
    name: str,
    model_config: Any,
    train_config: RankingTrainConfig,
    loop: LoopConfig,
    data_config: RankingDataConfig,
    data_version: str,
) -> str:
    """The checkpoint key of one model x seed: what it trains (model, training, loop, data), not how fast."""
    return stable_hash(
        name,
        model_config.model_dump(mode="json", exclude={"features"}),
        train_config.key_fields(),
        loop_key(loop),
        data_config,
        data_version,
        length=12,
    )


def synthetic_manifest(paths: PathsConfig, config: RankingDataSource) -> SyntheticManifest | None:
    """The generator's manifest of the experiment's synthetic run (None for real data or not generated)."""
    if config.synthetic is None:
        return None
    try:
        return read_manifest(paths.home / "synthetic" / f"{config.dataset}-{config.synthetic.data_version()}")
    except FileNotFoundError:
        return None


def train_seed(
    name: str,
    seed: int,
    data: RankingData,
    overrides: dict[str, Any],
    train_config: RankingTrainConfig,
    config: RankingDataSource,
    paths: PathsConfig,
    run_log: RunLog | None,
    *,
    loop: LoopConfig,
    run_name: str | None = None,
) -> RankingRunResult:
    """Train (or reuse the checkpoint of) one model x seed: the preset plus ``overrides`` at
    ``train_config.max_len``, its checkpoint under ``<artifacts>/ranking/<dataset>/<name>/seed<k>-<key>``,
    recorded as ``run_name`` (default ``name``)."""
    seed_everything(seed)  # the model's initial weights
    model, model_config = build_model(name, data, train_config.max_len, overrides)
    key = run_key(name, model_config, train_config, loop, config.data, data.data_version)
    return train_ranking_model(
        run_name or name,
        model,
        data,
        seed=seed,
        train_config=train_config,
        loop_config=loop,
        model_config=model_config,
        checkpoint_dir=paths.artifacts / "ranking" / config.dataset / name / f"seed{seed}-{key}",
        run_log=run_log,
    )


def run_ranking_experiment(
    config: RankingExperimentConfig, paths: PathsConfig | None = None, *, echo: Any = None
) -> RankingExperimentResult:
    """Train and test every model for every seed, run the paired tests and write the markdown report."""
    paths = paths or PathsConfig()
    say = echo or (lambda _msg: None)
    started = time.perf_counter()
    data, oracle = prepare_data(paths, config, say)
    prepared = time.perf_counter() - started
    used = {k: len(v) for k, v in data.splits.items()}
    say(
        f"{config.dataset}: examples {data.data_version}; train/valid/test {data.split_sizes} "
        f"(used {used}); mean history per user {data.histories.mean_length:.0f} events, "
        f"mean history before a test example {data.mean_history('test'):.0f}"
    )
    run_log = RunLog(paths.warehouse)
    runs: dict[str, list[RankingRunResult]] = {}
    for name in config.models:
        max_len = config.max_len(name)
        train_config = config.train.model_copy(update={"max_len": max_len})
        overrides = config.model_overrides.get(name, {})
        for seed in config.seeds:
            result = train_seed(
                name, seed, data, overrides, train_config, config, paths, run_log, loop=config.loop
            )
            runs.setdefault(name, []).append(result)
            extra = (
                f" oracle share {result.test['oracle_share']:.3f}" if "oracle_share" in result.test else ""
            )
            say(
                f"{name} (L={max_len}) seed {seed}: test AUC {result.test['auc']:.4f} GAUC "
                f"{result.test.get('gauc', float('nan')):.4f} logloss {result.test['log_loss']:.4f}{extra} "
                f"(best epoch {result.best_epoch}/{result.epochs_run}, {result.train_time_s:.0f} s)"
            )
    result = RankingExperimentResult(
        config=config,
        data=data,
        runs=runs,
        tests=paired_tests(runs, config),
        hardware=hardware_description(),
        wall_time_s=time.perf_counter() - started,
        prepare_time_s=prepared,
        synthetic_oracle_auc=oracle,
        manifest=synthetic_manifest(paths, config),
    )
    result.report_path = write_report(
        paths.home / "reports" / f"ranking_{config.dataset}.md", format_report(result)
    )
    return result


def paired_tests(
    runs: dict[str, list[RankingRunResult]], config: RankingExperimentConfig
) -> list[PairedTest]:
    """A paired t-test over seeds per comparison and test metric (runs paired by seed)."""
    tests: list[PairedTest] = []
    for a, b in config.comparisons:
        tests += paired_seed_tests(a, b, runs[a], runs[b], config.test_metrics, _test_value)
    return tests


def _test_value(run: RankingRunResult, metric: str) -> float:
    """A run's test figure; NaN when the run did not report it (e.g. GAUC without groups)."""
    return run.test.get(metric, float("nan"))


def _cell(runs: list[RankingRunResult], metric: str, digits: int = 4) -> str:
    values = [r.test[metric] for r in runs if metric in r.test]
    return summarize(values).format(digits) if len(values) == len(runs) else "n/a"


def format_table(result: RankingExperimentResult) -> str:
    """One row per model: mean ± std over seeds of the test metrics, then the cost columns."""
    oracle = result.data.has_oracle
    multi = "like" in result.data.tasks
    header = ["Model", "History L", "AUC", "GAUC", "Log loss", "NE", "Calibration"]
    if oracle:
        header += ["Oracle share"]
    if multi:
        header += ["Like AUC"]
    header += ["Params", "FLOPs/example", "Train time (s)", "Train ex/s", "Best epoch / run"]
    lines = markdown_head(header)
    for name, runs in result.runs.items():
        cells = [PRETTY.get(name, name), str(runs[0].max_len)]
        cells += [_cell(runs, m) for m in ("auc", "gauc", "log_loss", "ne")]
        cells.append(_cell(runs, "calibration", 3))
        if oracle:
            cells.append(_cell(runs, "oracle_share", 3))
        if multi:
            cells.append(_cell(runs, "like/auc"))
        t = summarize([r.train_time_s for r in runs])
        cells += [
            format_count(runs[0].num_parameters),
            format_count(runs[0].flops_per_example),
            f"{t.mean:.0f} ± {t.std:.0f}",
            f"{summarize([_examples_per_s(r, result) for r in runs]).mean:,.0f}",
            f"{summarize([r.best_epoch for r in runs]).mean:.1f} / "
            f"{summarize([r.epochs_run for r in runs]).mean:.1f}",
        ]
        lines.append(markdown_row(cells))
    if oracle:
        first = next(iter(result.runs.values()))
        lines.append("")
        lines.append(
            f"Oracle AUC (the generator's p_click on the same test examples): {_cell(first, 'oracle_auc')}"
        )
    return "\n".join(lines)


def _examples_per_s(run: RankingRunResult, result: RankingExperimentResult) -> float:
    """Training examples per second of a run's train time (validation included)."""
    n = len(result.data.splits["train"])
    per_epoch = min(result.config.train.epoch_examples or n, n)
    return run.epochs_run * per_epoch / run.train_time_s if run.train_time_s > 0 else float("nan")


def _claim_verdict(t: PairedTest, strict: bool) -> str:
    """HOLDS / NOT SHOWN / CONTRADICTED for "a > b" (strict) or "a >= b" from a paired test on AUC."""
    if math.isnan(t.p_value):
        return "NOT TESTABLE (fewer than 2 seeds or identical runs)"
    significant = t.p_value < ALPHA
    if strict:
        if t.mean_diff > 0 and significant:
            return "HOLDS"
        return "CONTRADICTED" if t.mean_diff < 0 and significant else "NOT SHOWN (not significant)"
    return "CONTRADICTED" if t.mean_diff < 0 and significant else "HOLDS (not significantly lower)"


def claim_verdicts(result: RankingExperimentResult) -> list[str]:
    """One line per claim: the papers' ordering (paired t-tests over seeds on test AUC, alpha 0.05) and, on
    synthetic data with a generator manifest, that the long-history models lead the best short-history model
    where the long-range dial is on and do not where it is off."""
    lines: list[str] = []
    auc_tests = {(t.a, t.b): t for t in result.tests if t.metric == "auc"}
    for a, b, strict in CLAIMS:
        t = auc_tests.get((a, b))
        if t is None:
            continue
        rel = ">" if strict else ">="
        lines.append(
            f"- {PRETTY[a]} {rel} {PRETTY[b]}: {_claim_verdict(t, strict)} "
            f"(AUC {t.mean_a:.4f} vs {t.mean_b:.4f}, diff {t.mean_diff:+.4f}, p={t.p_value:.3g})"
        )
    share = result.manifest.long_range_share if result.manifest is not None else None
    short = [m for m in result.runs if not RANKING_MODELS[m].long_sequence]
    long = [m for m in result.runs if RANKING_MODELS[m].long_sequence]
    if share is None or not short or not long:
        return lines
    dial_on = share >= LONG_RANGE_ON
    shown = f"{max(share, 0.0):.1%}"  # a tiny negative share is sampling noise of the short-term term

    def mean_auc(m: str) -> float:
        return summarize([r.test["auc"] for r in result.runs[m]]).mean

    best_short = max(short, key=mean_auc)
    ahead = []
    for m in long:
        t = paired_seed_tests(m, best_short, result.runs[m], result.runs[best_short], ("auc",), _test_value)[
            0
        ]
        is_ahead = t.mean_diff > 0 and not math.isnan(t.p_value) and t.p_value < ALPHA
        ahead.append(is_ahead)
        lines.append(
            f"  - {PRETTY[m]} vs best short-history model {PRETTY[best_short]}: diff {t.mean_diff:+.4f}, "
            f"p={t.p_value:.3g} ({'ahead' if is_ahead else 'not significantly ahead'})"
        )
    if dial_on:
        claim = f"- long-history models ahead (long-range dial on: {shown} of the lift needs > 100 events)"
        verdict = "HOLDS" if all(ahead) else ("PARTLY (some models)" if any(ahead) else "NOT SHOWN")
    else:
        claim = (
            f"- long-history models not ahead (long-range dial off: {shown} of the lift needs > 100 events)"
        )
        verdict = "HOLDS" if not any(ahead) else "CONTRADICTED"
    lines.insert(len(lines) - len(long), f"{claim}: {verdict}")
    return lines


def format_report(result: RankingExperimentResult) -> str:
    c, d = result.config, result.data
    seeds = ", ".join(str(s) for s in c.seeds)
    used = {k: len(v) for k, v in d.splits.items()}
    lengths = ", ".join(f"{PRETTY.get(m, m)} {c.max_len(m)}" for m in c.models)
    loop = c.loop
    lines = [
        f"# Ranking / CTR: {c.dataset}",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {result.hardware}; "
        "examples version "
        f"{d.data_version}; {d.n_items:,} items; examples train/valid/test {d.split_sizes}, used {used} "
        f"(train: random subsample; valid/test: whole users sampled); tasks {', '.join(d.tasks)}.",
        f"Histories: {d.histories.mean_length:.0f} events per user on average; the examples used have "
        f"{d.mean_history('train'):.0f} / {d.mean_history('valid'):.0f} / {d.mean_history('test'):.0f} "
        "earlier events on average (train / valid / test).",
        "",
        f"Protocol: {PROTOCOL}; seeds {seeds} (mean ± std over seeds; test evaluated once per run on the "
        f"checkpoint with the best validation {loop.monitor}).",
        f"History steps read per model: {lengths}.",
        f"Training: BCE per task ({', '.join(d.tasks)}) + aux loss, AdamW lr {loop.optimizer.lr} betas "
        f"{tuple(loop.optimizer.betas)} wd {loop.optimizer.weight_decay}, batch {c.train.batch_size}, "
        f"{c.train.epoch_examples or 'all'} examples per epoch, at most "
        f"{loop.max_epochs} epochs, patience {loop.patience}; length-bucketed batches.",
        "FLOPs/example: forward FLOPs (torch flop counter, matmul-class ops) averaged over "
        f"{c.train.flop_examples} random test examples batched as in evaluation. Train time: wall time of "
        "training and validation, all epochs run.",
        f"Wall time of the whole experiment: {result.wall_time_s:.0f} s (data preparation "
        f"{result.prepare_time_s:.0f} s).",
    ]
    if result.synthetic_oracle_auc is not None:
        lines.append(
            f"Synthetic data: the generator's oracle AUC over all logged impressions is "
            f"{result.synthetic_oracle_auc:.4f}."
        )
    m = result.manifest
    if (
        m is not None
        and m.test_oracle_auc is not None
        and m.test_last100_auc is not None
        and m.long_range_share is not None
    ):
        lines.append(
            f"On its test impressions (the last 10% by time): oracle AUC {m.test_oracle_auc:.4f}, the true "
            f"model fed only the last 100 clicks {m.test_last100_auc:.4f}: "
            f"{max(m.long_range_share, 0):.1%} of the achievable lift needs the longer history."
        )
    lines += [
        "",
        format_table(result),
        "",
        "## Significance (paired t-test over seeds)",
        "",
    ]
    lines += [f"- {t.format()}" for t in result.tests] or ["- (no comparisons configured)"]
    lines += ["", "## Claims (paired t-test over seeds on test AUC, alpha 0.05)", ""]
    lines += claim_verdicts(result) or ["- (no claim applies to the models trained)"]
    lines += ["", "## Per seed", ""]
    header = "| Model | Seed | AUC | GAUC | Log loss | NE | Calibration | ECE |"
    oracle = d.has_oracle
    if oracle:
        header += " Oracle AUC | Oracle share |"
    header += " Best epoch | Epochs | Train time (s) |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, runs in result.runs.items():
        for r in runs:
            t = r.test
            row = (
                f"| {PRETTY.get(name, name)} | {r.seed} | {t['auc']:.4f} | "
                f"{t.get('gauc', float('nan')):.4f} | "
                f"{t['log_loss']:.4f} | {t['ne']:.4f} | {t['calibration']:.3f} | {t['ece']:.4f} |"
            )
            if oracle:
                row += (
                    f" {t.get('oracle_auc', float('nan')):.4f} | {t.get('oracle_share', float('nan')):.3f} |"
                )
            row += f" {r.best_epoch} | {r.epochs_run} | {r.train_time_s:.0f} |"
            lines.append(row)
    lines += ["", "## Models", ""]
    lines += [f"- {PRETTY.get(m, m)}: {RANKING_MODELS[m].description}" for m in c.models]
    return "\n".join(lines) + "\n"


# -- CLI ----------------------------------------------------------------------------------------------------
app = typer.Typer(
    help="Ranking / CTR experiments (DeepFM, DIN, RankMixer, LONGER, HyFormer).", no_args_is_help=True
)


@app.callback()
def _group() -> None:
    """Ranking / CTR experiments (DeepFM, DIN, RankMixer, LONGER, HyFormer)."""


@app.command("run")
def run_command(
    dataset: DatasetOpt = "ml100k",
    source_dir: SourceDirOpt = None,
    synthetic_preset: SyntheticPresetOpt = None,
    synthetic_seed: SyntheticSeedOpt = 0,
    models: Annotated[str, typer.Option(help="Comma-separated models.")] = ",".join(DEFAULT_MODELS),
    seeds: Annotated[int, typer.Option(min=1, help="Number of seeds (0..n-1).")] = 3,
    short_len: Annotated[int, typer.Option(min=1, help="History steps of DeepFM, DIN, RankMixer.")] = 100,
    long_len: Annotated[
        int, typer.Option(min=1, help="History steps of LONGER(+RankMixer), HyFormer.")
    ] = 1000,
    max_train: Annotated[
        int | None, typer.Option(min=1, help="Random subsample of training examples.")
    ] = None,
    max_valid: Annotated[int | None, typer.Option(min=1, help="Validation examples (whole users).")] = None,
    max_test: Annotated[int | None, typer.Option(min=1, help="Test examples (whole users).")] = None,
    multi_task: Annotated[bool, typer.Option(help="Impression logs: also learn 'like'.")] = True,
    max_epochs: Annotated[int, typer.Option(min=1)] = 3,
    patience: Annotated[
        int, typer.Option(min=1, help="Validations without improvement before stopping.")
    ] = 1,
    epoch_examples: Annotated[
        int | None, typer.Option(min=1, help="Training examples per epoch (default: a full pass).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[
        int, typer.Option(min=0, help="torch CPU threads (0 = torch's default; 1 on a busy shared machine).")
    ] = 0,
    progress: Annotated[bool, typer.Option(help="Show tqdm progress bars.")] = True,
    profile: ProfileOpt = "budget",
) -> None:
    """Train the ranking models over several seeds and print the comparison table."""
    p = cli_profile(profile, seeds=seeds, max_epochs=max_epochs, patience=patience)
    if p.all_examples:
        max_train = max_valid = max_test = epoch_examples = None
    seeds, max_epochs, patience = p.seeds, p.max_epochs, p.patience
    typer.echo(f"profile {profile}: {p.describe()}")
    chosen = split_csv(models)
    if threads:
        torch.set_num_threads(threads)
    try:
        synthetic = SyntheticConfig.preset(synthetic_preset, synthetic_seed) if synthetic_preset else None
        config = RankingExperimentConfig(
            dataset=dataset,
            source_dir=source_dir,
            synthetic=synthetic,
            data=RankingDataConfig(
                max_train_examples=max_train,
                max_valid_examples=max_valid,
                max_test_examples=max_test,
                multi_task=multi_task,
            ),
            models=chosen,
            seeds=tuple(range(seeds)),
            short_len=short_len,
            long_len=long_len,
            train=RankingTrainConfig(batch_size=batch_size, epoch_examples=epoch_examples),
            loop=ranking_loop(
                max_epochs=max_epochs, patience=patience, lr=lr, progress=progress, device=device
            ),
            comparisons=tuple(
                p for p in EXPECTED_PAIRS + GENERATIVE_PAIRS if p[0] in chosen and p[1] in chosen
            ),
        )
    except ValueError as exc:
        raise typer.BadParameter(describe_config_error(exc)) from exc
    result = run_ranking_experiment(config, echo=typer.echo)
    echo_table_and_tests(format_table(result), result.tests)
    typer.echo("\nClaims (paired t-test over seeds on test AUC, alpha 0.05):")
    for line in claim_verdicts(result):
        typer.echo(line)
    typer.echo(f"\nreport: {result.report_path} ({result.wall_time_s:.0f} s)")


if __name__ == "__main__":
    app()
