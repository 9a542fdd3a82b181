"""Command-line options shared by ``recsys features build`` and ``recsys pipeline``: the events file's
column flags (named as ``recsys retrieval run`` names them) and the ranking-example flags, with the
functions that turn them into the typed configs. Light imports only: the CLI imports this at start-up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from recsys.features.config import FeatureConfig
    from recsys.ingest.events import EventSchema


def event_schema_from_flags(
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    time_format: str = "unix",
    event_col: str | None = None,
    value_col: str | None = None,
    delimiter: str | None = None,
) -> EventSchema:
    """The ``EventSchema`` of the command-line column flags (shared by ``features build`` and ``pipeline``,
    named as ``recsys retrieval run`` names them)."""
    from recsys.ingest.events import EventSchema

    return EventSchema(
        user_id=user_col,
        item_id=item_col,
        timestamp=time_col,
        timestamp_format=time_format,
        event=event_col,
        value=value_col,
        delimiter=delimiter,
    )


def dataset_name_for(events: Path) -> str:
    """A warehouse schema name from an events file's name: ``my-clicks.csv.gz`` -> ``my_clicks``."""
    stem = events.name.split(".", 1)[0]
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "events"
    return name if not name[0].isdigit() else f"d_{name}"


# Column flags, shared by `features build` and `pipeline` (same names as `recsys retrieval run`).
UserCol = Annotated[str, typer.Option(help="Events column with the user id (any string or integer).")]
ItemCol = Annotated[str, typer.Option(help="Events column with the item id (any string or integer).")]
TimeCol = Annotated[str, typer.Option(help="Events column with the event time.")]
TimeFormat = Annotated[str, typer.Option(help="'unix' (seconds), 'iso8601' or a strptime format.")]
EventCol = Annotated[
    str | None, typer.Option(help="Events column with the event type (optional: view, click, buy...).")
]
ValueCol = Annotated[
    str | None,
    typer.Option(help="Events column with a rating-like value; without one the log is implicit feedback."),
]
Delimiter = Annotated[str | None, typer.Option(help="CSV delimiter (default: ',' for .csv, tab for .tsv).")]
Examples = Annotated[
    str, typer.Option(help="Ranking examples: auto | impressions | events (rated) | implicit (click log).")
]
Negatives = Annotated[int, typer.Option(min=1, help="Implicit feedback: sampled negatives per interaction.")]
Sampling = Annotated[
    str, typer.Option(help="Implicit feedback: negatives by 'popularity' (so far) or 'uniform' over items.")
]
PositiveEvents = Annotated[
    str | None,
    typer.Option(
        help="Implicit feedback: comma-separated event types that count as positives (default all)."
    ),
]

# `pipeline` only: which model the package stage serves as the ranker.
ServedRanker = Annotated[
    str | None,
    typer.Option(
        help="Serve this ranking model as the ranker (e.g. hstu-ranker: the generative ranker, scored "
        "through M-FALCON), trained by the ranking stage on the pipeline's examples (default: the "
        "distilled student)."
    ),
]


def feature_config_from_flags(
    max_seq_len: int = 200,
    examples: str = "auto",
    negatives: int = 4,
    sampling: str = "popularity",
    positive_events: str | None = None,
    seed: int = 0,
) -> FeatureConfig:
    """The ``FeatureConfig`` of the command-line example flags (the rest keeps its defaults)."""
    from recsys.features.config import FeatureConfig

    positives = tuple(e.strip() for e in positive_events.split(",")) if positive_events else ()
    return FeatureConfig.model_validate(
        {
            "max_seq_len": max_seq_len,
            "examples": examples,
            "implicit": {
                "negatives": negatives,
                "sampling": sampling,
                "seed": seed,
                "positive_events": positives,
            },
        }
    )
