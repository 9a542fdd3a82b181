"""Scaling curves of the long-history rankers: test AUC against FLOPs per example at several model sizes.

The HyFormer paper's claim: against LONGER+RankMixer, better AUC at equal FLOPs and a steeper curve as the
model grows. For every model and target size (total parameters, embeddings included; default about 0.3M, 1M
and 3M) ``size_overrides`` scales the model's widths (embedding, token, attention and query widths together)
by one factor picked from a ladder so that the built model's parameter count is the nearest to the target;
the size nearest the model's default config uses that config itself, so those runs share checkpoints with
``recsys ranking run``. Every model x size x seed trains like a ``recsys ranking run`` row (same data,
loop, early stopping) and is recorded as ``<model>@<size>`` (the preset under the model's own name; kind
``ranking``: the dashboard's Evidence page draws AUC against FLOPs with a line per model).

The analysis is one least-squares fit over every run: ``AUC ~ 1 + x + hy + hy·x`` with ``x`` = log10(FLOPs)
centred on the middle of the measured range and ``hy`` = 1 for the first model. ``hy`` is the AUC gap at
equal FLOPs (at that centre) and ``hy·x`` the slope gap (AUC per 10x FLOPs), each with a t-test
(statsmodels OLS).

CLI: ``recsys scaling run --help``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import polars as pl
import torch
import typer
from pydantic import Field, model_validator

from recsys.core.config import PathsConfig, describe_config_error
from recsys.evaluation.significance import summarize
from recsys.experiments.common import (
    DatasetOpt,
    ProfileOpt,
    SourceDirOpt,
    SyntheticPresetOpt,
    SyntheticSeedOpt,
    check_seeds,
    cli_profile,
    format_count,
    markdown_head,
    markdown_row,
    split_csv,
    write_report,
)
from recsys.experiments.ranking import (
    ALPHA,
    PRETTY,
    RANKING_MODELS,
    RankingDataSource,
    build_model,
    prepare_data,
    ranking_loop,
    train_seed,
)
from recsys.synthetic.config import SyntheticConfig
from recsys.training.loop import LoopConfig
from recsys.training.loop import count_parameters as count_all_parameters
from recsys.training.ranking import RankingData, RankingDataConfig, RankingRunResult, RankingTrainConfig
from recsys.warehouse.runs import RunLog, hardware_description

#: Config fields that set a model's width, scaled together by one factor (those the model's config has).
WIDTH_FIELDS: tuple[str, ...] = ("embedding_dim", "token_dim", "model_dim", "query_hidden")
#: Width factors tried: 2^(k/4), from 1/8 to 8.
LADDER: tuple[float, ...] = tuple(2 ** (k / 4) for k in range(-12, 13))
#: The default config stands for a size when its parameter count is within this factor of the target.
DEFAULT_TOLERANCE = 1.3


def size_label(target: float) -> str:
    """``0.3M``, ``1M``, ``3M``, ``300k``: the name a target size is recorded under."""
    if target >= 1e6:
        return f"{target / 1e6:g}M"
    return f"{target / 1e3:g}k"


class ScalingExperimentConfig(RankingDataSource):
    models: tuple[str, ...] = ("hyformer", "longer-rankmixer")
    sizes: tuple[float, ...] = Field((3e5, 1e6, 3e6), description="Target parameter counts, ascending.")
    seeds: tuple[int, ...] = (0, 1, 2)
    long_len: int = Field(1_000, ge=1, description="History steps of the models.")
    train: RankingTrainConfig = RankingTrainConfig()
    loop: LoopConfig = ranking_loop(max_epochs=12, patience=3, lr=2e-3)
    default_tolerance: float = Field(DEFAULT_TOLERANCE, gt=1.0)

    @model_validator(mode="after")
    def _check(self) -> ScalingExperimentConfig:
        if len(self.models) < 1:
            raise ValueError("models: name at least one model")
        for m in self.models:
            if m not in RANKING_MODELS:
                raise ValueError(f"models: unknown ranking model {m!r}; known: {sorted(RANKING_MODELS)}")
            fields = RANKING_MODELS[m].config_cls.model_fields
            if "model_dim" not in fields or "embedding_dim" not in fields:
                scalable = sorted(
                    k for k, e in RANKING_MODELS.items() if "model_dim" in e.config_cls.model_fields
                )
                raise ValueError(
                    f"models: {m!r} has no model_dim / embedding_dim to scale; scalable: {scalable}"
                )
        if len(self.sizes) < 2:
            raise ValueError("sizes: give at least two target sizes for a curve")
        if any(s <= 0 for s in self.sizes) or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sizes: positive, distinct and ascending, got {list(self.sizes)}")
        check_seeds(self.seeds)
        self._check_one_source()
        return self


@dataclass(frozen=True)
class SizedModel:
    """One model at one target size: the overrides that build it and what it counts."""

    model: str
    target: float
    factor: float  # width factor against the preset (1.0 = the preset itself)
    overrides: dict[str, Any]
    parameters: int
    dense_parameters: int  # without embedding tables

    @property
    def label(self) -> str:
        return size_label(self.target)

    @property
    def run_name(self) -> str:
        """``<model>@<size>``; the preset keeps the model's own name, so its runs (and checkpoints, whose
        config names the run) are those of ``recsys ranking run``."""
        return self.model if not self.overrides else f"{self.model}@{self.label}"


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, those outside ``nn.Embedding`` / ``nn.EmbeddingBag`` tables)."""
    total = count_all_parameters(model)
    tables = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag)
        for p in m.parameters(recurse=False)
    )
    return total, total - tables


def scaled_overrides(
    name: str, factor: float, data: RankingData, max_len: int
) -> tuple[dict[str, Any], tuple[int, int]] | None:
    """Width fields of ``name``'s preset times ``factor`` (each at least 2), ``model_dim`` moved up to the
    next width the model accepts, and the built model's (parameters, dense parameters); None when no width
    within +50% builds."""
    entry = RANKING_MODELS[name]
    base = entry.config_cls(features=data.feature_spec(max_len), **entry.preset)
    out: dict[str, Any] = {}
    for f in WIDTH_FIELDS:
        if f in entry.config_cls.model_fields and f != "model_dim":
            out[f] = max(2, round(getattr(base, f) * factor))
    want = max(2, round(base.model_dim * factor))
    for dim in range(want, math.ceil(want * 1.5) + 2):
        overrides = {**out, "model_dim": dim}
        try:
            model, _ = build_model(name, data, max_len, overrides)
        except ValueError:  # a width the config or the model's token mixing refuses
            continue
        return overrides, count_parameters(model)
    return None


def size_overrides(
    name: str, data: RankingData, max_len: int, targets: tuple[float, ...], tolerance: float
) -> list[SizedModel]:
    """For every target, the width factor on ``LADDER`` whose built model's parameter count is nearest (in
    log ratio); the preset itself for the target nearest it when within ``tolerance``."""

    def measure(overrides: dict[str, Any]) -> tuple[int, int]:
        model, _ = build_model(name, data, max_len, overrides)
        return count_parameters(model)

    default = measure({})
    nearest_default = min(targets, key=lambda t: abs(math.log(default[0] / t)))
    use_default = abs(math.log(default[0] / nearest_default)) <= math.log(tolerance)
    cache: dict[float, tuple[dict[str, Any], tuple[int, int]] | None] = {}
    out: list[SizedModel] = []
    for target in targets:
        if use_default and target == nearest_default:
            out.append(SizedModel(name, target, 1.0, {}, *default))
            continue
        best: tuple[float, float, dict[str, Any], tuple[int, int]] | None = None
        for factor in LADDER:
            if factor not in cache:
                cache[factor] = scaled_overrides(name, factor, data, max_len)
            hit = cache[factor]
            if hit is None:
                continue
            gap = abs(math.log(hit[1][0] / target))
            if best is None or gap < best[0]:
                best = (gap, factor, hit[0], hit[1])
            if hit[1][0] > 2 * target:  # the ladder only grows from here
                break
        if best is None:
            raise ValueError(f"sizes: no width of {name!r} builds a model near {target:,.0f} parameters")
        out.append(SizedModel(name, target, best[1], best[2], *best[3]))
    for smaller, larger in zip(out, out[1:], strict=False):
        if smaller.parameters >= larger.parameters:
            raise ValueError(
                f"sizes: {smaller.label} and {larger.label} give the same {name} ({smaller.parameters:,} "
                "parameters, the nearest the width ladder reaches): space the sizes further apart"
            )
    return out


@dataclass
class ScalingFit:
    """``AUC ~ 1 + x + hy + hy·x`` over every run (x = log10 FLOPs - centre)."""

    centre_flops: float
    slopes: dict[str, tuple[float, float]]  # model -> (AUC per 10x FLOPs, its standard error)
    gap_at_equal_flops: float  # first model - second at the centre
    gap_p: float
    slope_gap: float
    slope_gap_p: float
    n_runs: int


@dataclass
class ScalingResult:
    config: ScalingExperimentConfig
    sized: dict[str, list[SizedModel]]
    runs: dict[tuple[str, float], list[RankingRunResult]]
    fit: ScalingFit | None
    hardware: str = ""
    wall_time_s: float = 0.0
    report_path: Path | None = None
    points_path: Path | None = None
    chart_paths: list[Path] = field(default_factory=list)


def fit_scaling(points: pl.DataFrame, first: str, second: str) -> ScalingFit | None:
    """The least-squares fit over the runs of two models (``points``: model, flops, auc per run); None when
    either model has fewer than two sizes (no slope) or there are no residual degrees of freedom."""
    import statsmodels.api as sm

    rows = points.filter(pl.col("model").is_in([first, second]))
    for m in (first, second):
        if rows.filter(pl.col("model") == m)["flops"].n_unique() < 2:
            return None
    if rows.height <= 4:
        return None
    logf = np.log10(rows["flops"].to_numpy())
    centre = float((logf.min() + logf.max()) / 2)
    x = logf - centre
    hy = (rows["model"] == first).cast(pl.Float64).to_numpy()
    design = np.column_stack([np.ones_like(x), x, hy, hy * x])
    ols = sm.OLS(rows["auc"].to_numpy(), design).fit()
    b, se, p = ols.params, ols.bse, ols.pvalues
    cov = ols.cov_params()
    first_slope_se = float(math.sqrt(cov[1, 1] + cov[3, 3] + 2 * cov[1, 3]))
    return ScalingFit(
        centre_flops=float(10**centre),
        slopes={first: (float(b[1] + b[3]), first_slope_se), second: (float(b[1]), float(se[1]))},
        gap_at_equal_flops=float(b[2]),
        gap_p=float(p[2]),
        slope_gap=float(b[3]),
        slope_gap_p=float(p[3]),
        n_runs=rows.height,
    )


def run_points(result_runs: dict[tuple[str, float], list[RankingRunResult]]) -> pl.DataFrame:
    """One row per run: model, target size, seed, parameters, FLOPs per example, test AUC, train time."""
    records = [
        {
            "model": model,
            "size": size_label(target),
            "target": target,
            "seed": r.seed,
            "parameters": r.num_parameters,
            "flops": r.flops_per_example,
            "auc": r.test["auc"],
            "train_time_s": r.train_time_s,
            "best_epoch": r.best_epoch,
        }
        for (model, target), runs in result_runs.items()
        for r in runs
    ]
    return pl.DataFrame(records)


def verdict(diff: float, p: float) -> str:
    """HOLDS / CONTRADICTED / NOT SHOWN for "the first model's figure is higher" at ``ALPHA``."""
    if math.isnan(p):
        return "NOT TESTABLE"
    if p < ALPHA:
        return "HOLDS" if diff > 0 else "CONTRADICTED"
    return "NOT SHOWN (not significant)"


def scaling_chart(points: pl.DataFrame):  # noqa: ANN201  (altair is imported lazily)
    """Test AUC against FLOPs per example (log), mean ± std over seeds, a line per model."""
    import altair as alt

    means = (
        points.group_by("model", "size")
        .agg(
            pl.col("flops").mean(),
            pl.col("auc").mean().alias("auc_mean"),
            pl.col("auc").std().fill_null(0.0).alias("auc_std"),
            pl.col("parameters").mean(),
        )
        .with_columns(
            (pl.col("auc_mean") - pl.col("auc_std")).alias("low"),
            (pl.col("auc_mean") + pl.col("auc_std")).alias("high"),
            pl.col("model").replace(PRETTY).alias("Model"),
        )
        .sort("model", "flops")
    )
    base = alt.Chart(means.to_pandas()).encode(
        x=alt.X(
            "flops:Q",
            title="FLOPs per example (log)",
            scale=alt.Scale(type="log", nice=False, padding=24),
            axis=alt.Axis(format="~s"),
        ),
        color=alt.Color("Model:N"),
    )
    line = base.mark_line(point=True).encode(
        y=alt.Y("auc_mean:Q", title="test AUC (mean ± std over seeds)", scale=alt.Scale(zero=False)),
        tooltip=["Model:N", "size:N", alt.Tooltip("parameters:Q", format=",.0f"), "auc_mean:Q"],
    )
    bars = base.mark_errorbar().encode(
        y=alt.Y("low:Q", title="test AUC (mean ± std over seeds)", scale=alt.Scale(zero=False)), y2="high:Q"
    )
    labels = base.mark_text(align="left", dx=6, dy=8, fontSize=10).encode(y="auc_mean:Q", text="size:N")
    return alt.layer(bars, line, labels).properties(width=520, height=320)


def save_chart(points: pl.DataFrame, stem: Path) -> list[Path]:
    """``<stem>.html`` always; ``<stem>.svg`` too when vl-convert is installed (the README's image)."""
    chart = scaling_chart(points)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".html")]
    chart.save(str(paths[0]))
    try:
        import vl_convert  # noqa: F401
    except ImportError:
        return paths
    svg = stem.with_suffix(".svg")
    chart.save(str(svg))
    return [*paths, svg]


def run_scaling_experiment(
    config: ScalingExperimentConfig, paths: PathsConfig | None = None, *, echo: Any = None
) -> ScalingResult:
    """Size every model, train every model x size x seed (reusing finished checkpoints), fit and report."""
    paths = paths or PathsConfig()
    say = echo or (lambda _msg: None)
    started = time.perf_counter()
    data, _ = prepare_data(paths, config._ranking_config(config.models, config.seeds), say)
    max_len = config.long_len
    train_config = config.train.model_copy(update={"max_len": max_len})
    sized = {
        m: size_overrides(m, data, max_len, config.sizes, config.default_tolerance) for m in config.models
    }
    for m, sizes in sized.items():
        for s in sizes:
            say(
                f"{m} @ {s.label}: width x{s.factor:.2f} {s.overrides or '(the preset)'} -> "
                f"{s.parameters:,} parameters ({s.dense_parameters:,} outside embedding tables)"
            )
    run_log = RunLog(paths.warehouse)
    runs: dict[tuple[str, float], list[RankingRunResult]] = {}
    for m, sizes in sized.items():
        for s in sizes:
            for seed in config.seeds:
                r = train_seed(
                    m,
                    seed,
                    data,
                    s.overrides,
                    train_config,
                    config,
                    paths,
                    run_log,
                    loop=config.loop,
                    run_name=s.run_name,
                )
                runs.setdefault((m, s.target), []).append(r)
                say(
                    f"{s.run_name} seed {seed}: test AUC {r.test['auc']:.4f}, "
                    f"{format_count(r.flops_per_example)} FLOPs/example "
                    f"(best epoch {r.best_epoch}/{r.epochs_run}, {r.train_time_s:.0f} s)"
                )
    points = run_points(runs)
    fit = fit_scaling(points, config.models[0], config.models[1]) if len(config.models) >= 2 else None
    result = ScalingResult(
        config=config,
        sized=sized,
        runs=runs,
        fit=fit,
        hardware=hardware_description(),
        wall_time_s=time.perf_counter() - started,
    )
    reports = paths.home / "reports"
    stem = reports / f"scaling_{config.dataset}"
    result.points_path = stem.with_suffix(".csv")
    reports.mkdir(parents=True, exist_ok=True)
    points.write_csv(result.points_path)
    result.chart_paths = save_chart(points, stem)
    result.report_path = write_report(stem.with_suffix(".md"), format_report(result))
    return result


def format_table(result: ScalingResult) -> str:
    """One row per model x size: parameters, FLOPs per example, test AUC mean ± std, train time."""
    header = ["Model", "Size", "Width x", "Params", "Dense params", "FLOPs/example", "AUC", "Train time (s)"]
    header += ["Best epoch / run"]
    lines = markdown_head(header)
    for m, sizes in result.sized.items():
        for s in sizes:
            rs = result.runs[(m, s.target)]
            auc = summarize([r.test["auc"] for r in rs])
            t = summarize([r.train_time_s for r in rs])
            lines.append(
                markdown_row(
                    [
                        PRETTY.get(m, m),
                        s.label,
                        f"{s.factor:.2f}",
                        format_count(s.parameters),
                        format_count(s.dense_parameters),
                        format_count(rs[0].flops_per_example),
                        auc.format(4),
                        f"{t.mean:.0f} ± {t.std:.0f}",
                        f"{summarize([r.best_epoch for r in rs]).mean:.1f} / "
                        f"{summarize([r.epochs_run for r in rs]).mean:.1f}",
                    ]
                )
            )
    return "\n".join(lines)


def claim_lines(result: ScalingResult) -> list[str]:
    """The fit's slopes and the two claims (first model vs second) as verdict lines."""
    f = result.fit
    if f is None:
        return ["- (no fit: two models with at least two sizes each are needed)"]
    a, b = result.config.models[0], result.config.models[1]
    lines = [
        f"- slope (AUC per 10x FLOPs): {PRETTY.get(m, m)} {s:+.4f} ± {se:.4f}"
        for m, (s, se) in f.slopes.items()
    ]
    lines += [
        f"- {PRETTY.get(a, a)} better AUC than {PRETTY.get(b, b)} at equal FLOPs "
        f"({format_count(f.centre_flops)} per example): {verdict(f.gap_at_equal_flops, f.gap_p)} "
        f"(gap {f.gap_at_equal_flops:+.4f}, p={f.gap_p:.3g})",
        f"- {PRETTY.get(a, a)} steeper curve: {verdict(f.slope_gap, f.slope_gap_p)} "
        f"(slope gap {f.slope_gap:+.4f} per 10x FLOPs, p={f.slope_gap_p:.3g})",
    ]
    return lines


def format_report(result: ScalingResult) -> str:
    c = result.config
    loop = c.loop
    lines = [
        f"# Scaling: {', '.join(PRETTY.get(m, m) for m in c.models)} on {c.dataset}",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {result.hardware}; seeds "
        f"{', '.join(map(str, c.seeds))}; history {c.long_len}; target sizes "
        f"{', '.join(size_label(s) for s in c.sizes)} (total parameters, embedding tables included).",
        f"Training as `recsys ranking run`: AdamW lr {loop.optimizer.lr}, batch {c.train.batch_size}, "
        f"{c.train.epoch_examples or 'all'} examples per epoch, at most {loop.max_epochs} epochs, early "
        f"stopping on validation {loop.monitor} with patience {loop.patience}; test once on the best "
        "checkpoint.",
        "Fit: ordinary least squares over every run, AUC ~ 1 + x + hy + hy·x, x = log10(FLOPs) centred on "
        "the middle of the measured range, hy = 1 for the first model; t-tests on hy (gap at equal FLOPs) "
        "and hy·x (slope gap).",
        f"Wall time: {result.wall_time_s:.0f} s.",
        "",
        format_table(result),
        "",
        "## Claims",
        "",
        *claim_lines(result),
        "",
        f"Per-run points: `{result.points_path.name if result.points_path else ''}`; chart: "
        + ", ".join(f"`{p.name}`" for p in result.chart_paths),
    ]
    return "\n".join(lines) + "\n"


# -- CLI ----------------------------------------------------------------------------------------------------
app = typer.Typer(help="Scaling curves: test AUC against FLOPs at several model sizes.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Scaling curves: test AUC against FLOPs at several model sizes."""


def parse_sizes(text: str) -> tuple[float, ...]:
    """``0.3M,1M,3M`` or ``300k,1e6`` -> target parameter counts."""
    out = []
    for part in split_csv(text):
        scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(part[-1].lower(), 1.0)
        number = part[:-1] if scale != 1.0 else part
        try:
            out.append(float(number) * scale)
        except ValueError:
            raise ValueError(f"sizes: {part!r} is not a count such as 300k, 0.3M or 3e6") from None
    return tuple(out)


@app.command("run")
def run_command(
    dataset: DatasetOpt = "ml100k",
    source_dir: SourceDirOpt = None,
    synthetic_preset: SyntheticPresetOpt = None,
    synthetic_seed: SyntheticSeedOpt = 0,
    models: Annotated[
        str, typer.Option(help="Comma-separated models; the claims read the first against the second.")
    ] = "hyformer,longer-rankmixer",
    sizes: Annotated[str, typer.Option(help="Target parameter counts, ascending.")] = "0.3M,1M,3M",
    seeds: Annotated[int, typer.Option(min=1, help="Number of seeds (0..n-1).")] = 3,
    long_len: Annotated[int, typer.Option(min=1, help="History steps.")] = 1000,
    max_train: Annotated[
        int | None, typer.Option(min=1, help="Random subsample of training examples.")
    ] = None,
    max_epochs: Annotated[int, typer.Option(min=1)] = 12,
    patience: Annotated[int, typer.Option(min=1)] = 3,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-3,
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0 = torch's default).")] = 0,
    progress: Annotated[bool, typer.Option(help="Show tqdm progress bars.")] = True,
    profile: ProfileOpt = "paper",
) -> None:
    """Train every model at every size over several seeds; print the table, the fit and the verdicts."""
    p = cli_profile(profile, seeds=seeds, max_epochs=max_epochs, patience=patience)
    if p.all_examples:
        max_train = None
    if threads:
        torch.set_num_threads(threads)
    try:
        config = ScalingExperimentConfig(
            dataset=dataset,
            source_dir=source_dir,
            synthetic=SyntheticConfig.preset(synthetic_preset, synthetic_seed) if synthetic_preset else None,
            data=RankingDataConfig(max_train_examples=max_train),
            models=split_csv(models),
            sizes=parse_sizes(sizes),
            seeds=tuple(range(p.seeds)),
            long_len=long_len,
            train=RankingTrainConfig(batch_size=batch_size),
            loop=ranking_loop(max_epochs=p.max_epochs, patience=p.patience, lr=lr, progress=progress),
        )
    except ValueError as exc:
        raise typer.BadParameter(describe_config_error(exc)) from exc
    typer.echo(f"profile {profile}: {p.describe()}")
    result = run_scaling_experiment(config, echo=typer.echo)
    typer.echo("")
    typer.echo(format_table(result))
    typer.echo("")
    for line in claim_lines(result):
        typer.echo(line)
    typer.echo(f"\nreport: {result.report_path} ({result.wall_time_s:.0f} s)")


if __name__ == "__main__":
    app()
