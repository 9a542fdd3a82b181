"""Knobs of the feature layer: one frozen config that every build step hashes into its cache key."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from recsys.core.config import FrozenModel

DAY_S = 86_400.0


class ImplicitConfig(FrozenModel):
    """Ranking examples from implicit feedback (a click log: user, item, time and no label).

    Every interaction is a positive; ``negatives`` catalogue items are sampled for it at the same time
    (``recsys.features.implicit`` documents the sampling and why it keeps the point-in-time rule).
    """

    negatives: int = Field(4, ge=1, le=100, description="Sampled negatives per positive interaction.")
    sampling: Literal["popularity", "uniform"] = Field(
        "popularity",
        description="popularity: items drawn in proportion to their interactions strictly before the"
        " positive; uniform: every item first seen strictly before the positive, equally likely.",
    )
    seed: int = Field(0, ge=0, description="Seed of the negative sampler (same seed, same examples).")
    positive_events: tuple[str, ...] = Field(
        (),
        description="Event types that count as positives (e.g. ('purchase',)); empty: every event."
        " Negatives are drawn from every event type.",
    )

    @field_validator("positive_events")
    @classmethod
    def _events(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not e for e in v) or len(set(v)) != len(v):
            raise ValueError(f"positive_events must be distinct, non-empty event types, got {v}")
        return v


class FeatureConfig(FrozenModel):
    """What the feature build computes and how the splits are cut.

    ``max_seq_len`` only limits what models read (the export keeps the most recent ``max_seq_len`` items of
    each sequence); the warehouse tables always hold the whole history, so changing it never rebuilds them.
    """

    max_seq_len: int = Field(200, ge=1, description="Most recent items per sequence that the export keeps.")
    decay_half_lives_s: tuple[float, ...] = Field(
        (DAY_S, 30 * DAY_S),
        description="Half-lives (seconds) of the user's exponentially decayed event counters.",
    )
    split_quantiles: tuple[float, float] = Field(
        (0.8, 0.9),
        description="Ranking split: t1, t2 = these ts quantiles (train < t1 <= valid < t2 <= test).",
    )
    examples: Literal["auto", "impressions", "events", "implicit"] = Field(
        "auto",
        description="Ranking example rows: impressions (labels click, like; the unclicked exposures are the"
        " negatives), events with a value (label = value >= label_threshold), implicit (every event a"
        " positive plus sampled negatives: `implicit`), or auto = impressions when a non-empty impressions"
        " table exists, else events when some event has a value, else implicit.",
    )
    implicit: ImplicitConfig = Field(
        default_factory=ImplicitConfig, description="Negative sampling of implicit-feedback examples."
    )
    label_threshold: float = Field(
        4.0, description="Event-log datasets (MovieLens): label = value >= label_threshold."
    )
    loo_min_events: int = Field(
        3, ge=3, description="Users with fewer events than this stay in training only (leave-one-out)."
    )

    @field_validator("decay_half_lives_s")
    @classmethod
    def _half_lives(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("decay_half_lives_s must name at least one half-life")
        if any(h <= 0 for h in v):
            raise ValueError(f"decay_half_lives_s must all be > 0 seconds, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"decay_half_lives_s must not repeat a half-life, got {v}")
        return v

    @model_validator(mode="after")
    def _quantiles(self) -> FeatureConfig:
        q1, q2 = self.split_quantiles
        if not 0.0 < q1 < q2 < 1.0:
            raise ValueError(f"split_quantiles must satisfy 0 < q1 < q2 < 1, got {self.split_quantiles}")
        return self

    def decay_column(self, half_life_s: float) -> str:
        """Column name of the decayed counter with this half-life (``u_decay_1d``, ``u_decay_12h``, ...)."""
        if half_life_s % DAY_S == 0:
            return f"u_decay_{int(half_life_s // DAY_S)}d"
        if half_life_s % 3600 == 0:
            return f"u_decay_{int(half_life_s // 3600)}h"
        return f"u_decay_{int(round(half_life_s))}s"

    @model_validator(mode="after")
    def _distinct_names(self) -> FeatureConfig:
        names = [self.decay_column(h) for h in self.decay_half_lives_s]
        if len(set(names)) != len(names):
            raise ValueError(f"decay_half_lives_s give clashing column names {names}")
        return self
