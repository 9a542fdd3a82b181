"""Knobs of the feature layer: one frozen config that every build step hashes into its cache key."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from recsys.core.config import FrozenModel

DAY_S = 86_400.0


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
    examples: Literal["auto", "impressions", "events"] = Field(
        "auto",
        description="Ranking example rows: impressions (labels click, like), events with a value (label ="
        " value >= label_threshold), or auto = impressions when a non-empty impressions table exists.",
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
