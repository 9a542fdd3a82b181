"""Pieces the experiment modules (ranking, retrieval, distillation, continual) share: config checks, the
markdown report helpers and the CLI's output.

Each helper keeps the exact wording and format the experiments had when each wrote its own copy, so reports,
tables and error messages do not change with the move.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from recsys.core.atomic import atomic_path
from recsys.evaluation.significance import PairedTest, paired_t_over_seeds
from recsys.synthetic.config import SyntheticConfig

R = TypeVar("R")

# -- config checks ------------------------------------------------------------------------------------------


def check_seeds(seeds: Sequence[int]) -> None:
    """Raise ValueError unless ``seeds`` is non-empty and has no repeats (runs are paired by seed)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")


def check_comparisons(comparisons: Iterable[tuple[str, str]], models: Sequence[str]) -> None:
    """Raise ValueError when a compared pair names a model that the experiment does not train."""
    for a, b in comparisons:
        if a not in models or b not in models:
            raise ValueError(f"comparisons: ({a}, {b}) names a model that is not in models {models}")


# -- evidence profiles -------------------------------------------------------------------------------------

#: The ``paper`` profile's floor: every training example, early stopping with at least this patience, at
#: least this many seeds (mean ± std and paired tests over them), and an epoch cap early stopping can reach.
PAPER_PATIENCE = 3
PAPER_SEEDS = 3
PAPER_MAX_EPOCHS = 12
PROFILES = ("budget", "paper")


@dataclass(frozen=True)
class EvidenceProfile:
    """What a ``--profile`` resolves to: the seeds, epoch cap and patience to use, and whether the caps on
    examples (training subsample, examples per epoch, validation and test samples) are dropped."""

    name: str
    seeds: int
    max_epochs: int
    patience: int
    all_examples: bool

    def describe(self) -> str:
        examples = "all examples" if self.all_examples else "the example caps given"
        return (
            f"{examples}, {self.seeds} seeds, at most {self.max_epochs} epochs, early stopping on validation "
            f"with patience {self.patience}"
        )


def evidence_profile(name: str, *, seeds: int, max_epochs: int, patience: int) -> EvidenceProfile:
    """``budget`` keeps the figures given; ``paper`` raises them to the evidence floor (PAPER_*) and uses
    every example. Raises ValueError naming the choices for any other name."""
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {name!r}")
    if name == "budget":
        return EvidenceProfile(name, seeds, max_epochs, patience, all_examples=False)
    return EvidenceProfile(
        name,
        max(seeds, PAPER_SEEDS),
        max(max_epochs, PAPER_MAX_EPOCHS),
        max(patience, PAPER_PATIENCE),
        all_examples=True,
    )


def cli_profile(name: str, *, seeds: int, max_epochs: int, patience: int) -> EvidenceProfile:
    """``evidence_profile`` for a command's ``--profile``: an unknown name is a usage error on that option."""
    try:
        return evidence_profile(name, seeds=seeds, max_epochs=max_epochs, patience=patience)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile") from exc


#: The ``--profile`` option of the evidence commands (its default differs per command).
ProfileOpt = Annotated[
    str, typer.Option(help="budget (the caps given) or paper (all examples, patience >= 3, >= 3 seeds).")
]
#: The data-source options of the commands built on the ranking data (``RankingDataSource``).
DatasetOpt = Annotated[str, typer.Option(help="Warehouse schema name of the dataset.")]
SourceDirOpt = Annotated[
    Path | None, typer.Option(help="Unzipped MovieLens-100K folder (default: download).")
]
SyntheticPresetOpt = Annotated[
    str | None,
    typer.Option(help=f"Generate a synthetic dataset: {', '.join(SyntheticConfig.preset_names())}."),
]
SyntheticSeedOpt = Annotated[int, typer.Option(help="Seed of the synthetic data.")]


# -- significance -------------------------------------------------------------------------------------------


def paired_seed_tests(
    a: str,
    b: str,
    runs_a: Sequence[R],
    runs_b: Sequence[R],
    metrics: Iterable[str],
    value: Callable[[R, str], float],
) -> list[PairedTest]:
    """One paired t-test over seeds of ``a`` against ``b`` per metric; ``runs_a`` and ``runs_b`` hold one
    run per seed in the same seed order, and ``value(run, metric)`` reads a run's test figure."""
    return [
        paired_t_over_seeds(
            [value(r, metric) for r in runs_a],
            [value(r, metric) for r in runs_b],
            metric=metric,
            a_name=a,
            b_name=b,
        )
        for metric in metrics
    ]


# -- report formatting --------------------------------------------------------------------------------------


def format_count(value: float) -> str:
    """A parameter or FLOP count with a G / M / k suffix (``1.23 M``, ``4.5 k``, ``12``)."""
    if value >= 1e9:
        return f"{value / 1e9:.2f} G"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


def markdown_row(cells: Sequence[str]) -> str:
    """One markdown table row: ``| a | b |``."""
    return "| " + " | ".join(cells) + " |"


def markdown_head(header: Sequence[str]) -> list[str]:
    """The header row and the separator row of a markdown table."""
    return [markdown_row(header), "|" + "---|" * len(header)]


def write_report(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file, then rename) and return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


# -- CLI ----------------------------------------------------------------------------------------------------


def split_csv(text: str) -> tuple[str, ...]:
    """The non-empty, stripped parts of a comma-separated CLI option."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def echo_table_and_tests(table: str, tests: Iterable[PairedTest]) -> None:
    """Print the comparison table, then one line per paired test (what the ``run`` commands end with)."""
    typer.echo("")
    typer.echo(table)
    typer.echo("")
    for t in tests:
        typer.echo(t.format())
