"""Knobs of the synthetic generator. The config and its seed ARE the data version (``data_version()``).

Every coefficient of the click model, the catalogue, the population, the sessions and the logging policy is a
field here, so two runs with equal configs produce identical files, and any change yields a new version.
Execution settings that do not change the output (chunk size, worker processes) are arguments of
``synthetic.generator.generate``, not fields, so they never change the version.

Presets: ``SyntheticConfig.quick()`` (tests and the default pipeline), ``SyntheticConfig.long_history()``
(>= 1,000 clicks per user for the long-sequence ranking models) and ``SyntheticConfig.for_events(n)``
(exactly ``n`` click events for the scale benchmark, impressions not logged); the signal presets below
(``preset_names()``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from recsys.core.config import FrozenModel
from recsys.core.hashing import stable_hash

#: Bumped whenever the generator's algorithm changes what a given config produces.
GENERATOR_VERSION = "1"

#: Relative session-start intensity per UTC hour (quiet nights, an evening peak).
DEFAULT_DIURNAL: tuple[float, ...] = (
    0.5, 0.3, 0.2, 0.15, 0.15, 0.2, 0.4, 0.7, 0.9, 1.0, 1.0, 1.0,
    1.1, 1.1, 1.0, 1.0, 1.1, 1.3, 1.6, 1.9, 2.0, 1.8, 1.3, 0.8,
)  # fmt: skip


def _vocab(name: str, values: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        raise ValueError(f"{name} must name at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a value, got {values}")
    return values


class CatalogueConfig(FrozenModel):
    """Items: category, creator, price band, Zipf exposure popularity, release time and a latent quality."""

    n_items: int = Field(5_000, ge=20, le=50_000_000, description="Catalogue size (item ids 0..n_items-1).")
    n_categories: int = Field(20, ge=2, le=4_096, description="Number of item categories.")
    n_creators: int = Field(1_000, ge=1, le=5_000_000, description="Number of creators (item authors).")
    n_price_bands: int = Field(5, ge=1, le=64, description="Number of price bands.")
    zipf_exponent: float = Field(0.9, ge=0.0, le=3.0, description="Exposure popularity of rank r ~ r^-s.")
    creator_zipf_exponent: float = Field(0.6, ge=0.0, le=3.0, description="Creator catalogue sizes ~ r^-s.")
    creator_focus: float = Field(
        0.8, ge=0.0, le=1.0, description="Share of a creator's items in the creator's home category."
    )
    quality_popularity_corr: float = Field(
        0.4, ge=-1.0, le=1.0, description="Correlation of the latent quality with log popularity."
    )
    back_catalogue_share: float = Field(
        0.7, ge=0.0, le=1.0, description="Share of items released before the simulation starts."
    )
    back_catalogue_days: float = Field(730.0, gt=0.0, description="Back-catalogue release dates span this.")


class UserConfig(FrozenModel):
    """Users: categorical profile (age bucket, gender, region, device) and a sparse long-term taste."""

    n_users: int = Field(2_000, ge=1, le=2_000_000_000, description="Users (ids 0..n_users-1).")
    age_buckets: tuple[str, ...] = ("18-24", "25-34", "35-44", "45-54", "55+")
    genders: tuple[str, ...] = ("female", "male", "other")
    regions: tuple[str, ...] = ("north", "south", "east", "west", "central", "islands")
    devices: tuple[str, ...] = ("android", "ios", "web")
    favourite_categories_mean: float = Field(
        2.0, ge=0.0, description="Mean number of favourite categories beyond the first (Poisson)."
    )
    taste_profile_strength: float = Field(
        1.5, ge=0.0, description="How strongly the profile shapes which categories become favourites."
    )

    @field_validator("age_buckets", "genders", "regions", "devices")
    @classmethod
    def _vocabularies(cls, v: tuple[str, ...], info) -> tuple[str, ...]:  # noqa: ANN001
        return _vocab(info.field_name, v)


class SessionConfig(FrozenModel):
    """When users come: requests per user, sessions, gaps, the time window, slate and candidate-pool sizes."""

    start_ts: int = Field(1_704_067_200, ge=0, description="Unix seconds of the simulation start (UTC).")
    horizon_days: float = Field(90.0, gt=0.0, description="Sessions start within this many days.")
    requests_per_user_mean: float = Field(15.0, ge=1.0, description="Mean requests (slates) per user.")
    requests_per_user_sigma: float = Field(
        0.6, ge=0.0, le=3.0, description="Log-normal spread of the requests per user."
    )
    requests_per_session_mean: float = Field(6.0, ge=1.0, description="Mean requests per session.")
    request_gap_mean_s: float = Field(30.0, gt=0.0, description="Mean seconds between requests in a session.")
    min_session_gap_s: int = Field(1_800, ge=1, description="Minimum seconds between two sessions.")
    diurnal_weights: tuple[float, ...] = Field(
        DEFAULT_DIURNAL, description="24 relative session-start intensities, one per UTC hour."
    )
    slate_size: int = Field(10, ge=1, le=256, description="Items shown per request (k).")
    pool_size: int = Field(30, ge=1, le=1_024, description="Candidates the logging policy ranks per request.")

    @field_validator("diurnal_weights")
    @classmethod
    def _diurnal(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) != 24:
            raise ValueError(f"diurnal_weights must have 24 values (one per hour), got {len(v)}")
        if any(w < 0 for w in v) or sum(v) <= 0:
            raise ValueError("diurnal_weights must be >= 0 with a positive sum")
        return v

    @model_validator(mode="after")
    def _slate_fits_pool(self) -> SessionConfig:
        if self.slate_size > self.pool_size:
            raise ValueError(f"slate_size ({self.slate_size}) must be <= pool_size ({self.pool_size})")
        return self


class PolicyConfig(FrozenModel):
    """The logging policy: Plackett-Luce over a noisy score; which requests' impressions are written."""

    logit_weight: float = Field(
        0.7, description="Weight of the true (position-free) click logit in the score."
    )
    popularity_weight: float = Field(0.3, description="Weight of log exposure popularity in the score.")
    noise_std: float = Field(1.0, ge=0.0, description="Std of the Gaussian score noise (the logger's error).")
    temperature: float = Field(1.0, gt=0.0, description="Plackett-Luce temperature: P ~ exp(score / T).")
    impression_log_rate: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of requests whose impressions are written (0 = none)."
    )
    resurface_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of candidate-pool slots given to a dormant interest: an item of a creator the "
        "user clicked more than resurface_min_age clicks ago (0 = pools by popularity only).",
    )
    resurface_min_age: int = Field(
        100, ge=0, description="A resurfaced creator comes from a click at least this many clicks back."
    )


class ClickModelConfig(FrozenModel):
    """Coefficients of the true click model (see synthetic.click_model for the formula)."""

    bias: float = Field(-3.0, description="b: intercept of the click logit.")
    taste: float = Field(2.0, description="a: weight of the long-term category taste (0..~1.5).")
    short: float = Field(
        1.0, description="s: weight of log1p(decayed count of recent clicks in the category)."
    )
    short_tau_s: float = Field(900.0, gt=0.0, description="Time constant (s) of the short-term decay.")
    loyalty: float = Field(1.0, description="l: added when the user ever clicked the item's creator before.")
    dormant: float = Field(
        0.0,
        description="r: added when the user clicked the item's creator before, but not within the last "
        "dormant_after clicks: a dormant interest that returns (the long-range dial).",
    )
    dormant_after: int = Field(
        100, ge=1, description="Clicks since the last click on a creator after which it counts as dormant."
    )
    quality: float = Field(0.4, description="q: weight of the item's latent quality (standard normal).")
    interaction: float = Field(
        0.6, description="x: weight of W[age, gender, category] + W[region, device, price band] (N(0,1))."
    )
    context_interaction: float = Field(
        0.0, description="xc: weight of W[age, category, daypart] (N(0,1); daypart = UTC hour // 6)."
    )
    interaction_drift: float = Field(
        0.0,
        description="Radians W[age, gender, category] rotates over the horizon (towards an independent "
        "draw): profile x category tastes that change over time, which counters cannot track.",
    )
    item_appeal: float = Field(
        0.0,
        description="v: weight of a per-item appeal A_i(t) (N(0,1)); only the item's id reveals it, and no "
        "user's history does (an item rarely recurs in one history).",
    )
    item_appeal_drift: float = Field(
        0.0,
        description="Radians A_i(t) turns over the horizon (towards an independent draw): item appeal that "
        "changes over time, so what a model memorised about an item early is wrong later "
        "(needs item_appeal).",
    )
    drift: float = Field(0.5, description="d: amplitude of the slow per-category sinusoid.")
    drift_period_days: tuple[float, float] = Field(
        (30.0, 120.0), description="Per-category drift periods are drawn uniformly in this range (days)."
    )
    hour: float = Field(0.3, description="h: amplitude of the per-category hour-of-day cosine.")
    position_eta: float = Field(0.8, ge=0.0, description="examine(k) = (1 + k)^-eta, k the 0-based position.")

    @field_validator("drift_period_days")
    @classmethod
    def _periods(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1]:
            raise ValueError(f"drift_period_days must satisfy 0 < low <= high, got {v}")
        return v

    @model_validator(mode="after")
    def _appeal_drift_needs_appeal(self) -> ClickModelConfig:
        if self.item_appeal_drift and not self.item_appeal:
            raise ValueError(
                f"item_appeal_drift ({self.item_appeal_drift}) turns the item appeal, but item_appeal is 0: "
                "set item_appeal too"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_unused_late_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Fields added after data had been versioned are left out while at 0, so every config that does not
        # use them dumps (and hashes: data_version, experiment ids) exactly as before they existed.
        data = handler(self)
        for name in _LATE_CLICK_FIELDS:
            if getattr(self, name) == 0.0:
                data.pop(name, None)
        return data


#: ClickModelConfig fields that are omitted from its dump while 0 (see ``_omit_unused_late_fields``).
_LATE_CLICK_FIELDS: tuple[str, ...] = ("item_appeal", "item_appeal_drift")


class ResponseConfig(FrozenModel):
    """Responses given a click: like and dwell, both rising with the true click logit."""

    like_bias: float = Field(-1.0, description="P(like | click) = sigmoid(like_bias + like_slope * logit).")
    like_slope: float = Field(0.5)
    dwell_log_mean: float = Field(3.4, description="log dwell ~ N(dwell_log_mean + dwell_slope * logit, sd).")
    dwell_slope: float = Field(0.3)
    dwell_log_sd: float = Field(0.8, ge=0.0)
    dwell_max_s: float = Field(3_600.0, ge=1.0, description="Dwell is clipped to [1, dwell_max_s] seconds.")


class SyntheticConfig(FrozenModel):
    """Everything that defines a synthetic dataset; ``data_version()`` hashes it."""

    seed: int = Field(
        0, ge=0, lt=2**63, description="Master seed: world, users and every draw derive from it."
    )
    catalogue: CatalogueConfig = CatalogueConfig()
    users: UserConfig = UserConfig()
    sessions: SessionConfig = SessionConfig()
    policy: PolicyConfig = PolicyConfig()
    click: ClickModelConfig = ClickModelConfig()
    response: ResponseConfig = ResponseConfig()
    max_events: int | None = Field(
        None, ge=1, description="Stop after exactly this many click events (users in id order; the last cut)."
    )

    def data_version(self) -> str:
        """The content version of the data this config generates (config + seed + generator version)."""
        return stable_hash("synthetic", GENERATOR_VERSION, self)

    # -- presets ---------------------------------------------------------------------------------------
    @classmethod
    def quick(cls, seed: int = 0) -> SyntheticConfig:
        """Tiny: 2,000 users, ~300k impressions, ~40k clicks, seconds to generate: tests, default pipeline."""
        return cls(seed=seed)

    @classmethod
    def tiny(cls, seed: int = 0) -> SyntheticConfig:
        """300 users, 500 items, ~30k impressions: the pipeline's smoke runs and interruption tests."""
        return cls(
            seed=seed,
            catalogue=CatalogueConfig(n_items=500, n_categories=8, n_creators=100),
            users=UserConfig(n_users=300),
        )

    @classmethod
    def long_history(cls, seed: int = 0) -> SyntheticConfig:
        """3,000 users with >= 1,000 clicks each on average; 2% of requests' impressions are logged.

        Many creators (8,000) so that a creator rarely recurs within the last 50 clicks: loyalty is a signal
        only the long history reveals.
        """
        return cls(
            seed=seed,
            catalogue=CatalogueConfig(n_items=40_000, n_categories=24, n_creators=8_000),
            users=UserConfig(n_users=3_000),
            sessions=SessionConfig(
                requests_per_user_mean=700.0,
                requests_per_user_sigma=0.25,
                requests_per_session_mean=8.0,
                horizon_days=180.0,
            ),
            policy=PolicyConfig(impression_log_rate=0.02),
        )

    @classmethod
    def for_events(cls, n_events: int, seed: int = 0, *, log_impressions: bool = False) -> SyntheticConfig:
        """Exactly ``n_events`` click events (the scale benchmark: 10M, 100M), impressions off by default.

        Users (~120 clicks each) are simulated in id order until ``n_events`` is reached; ``n_users`` is only
        an upper bound, set with a wide margin.
        """
        if n_events < 1:
            raise ValueError(f"n_events must be >= 1, got {n_events}")
        return cls(
            seed=seed,
            catalogue=CatalogueConfig(n_items=200_000, n_categories=32, n_creators=20_000),
            users=UserConfig(n_users=max(1_000, n_events // 30)),
            sessions=SessionConfig(requests_per_user_mean=100.0, requests_per_user_sigma=0.5, pool_size=20),
            policy=PolicyConfig(impression_log_rate=1.0 if log_impressions else 0.0),
            max_events=n_events,
        )

    @classmethod
    def long_range(
        cls, seed: int = 0, *, long_range: float = 4.0, impression_log_rate: float = 0.006
    ) -> SyntheticConfig:
        """Long-range recurrence on: 2,000 users with ~400 clicks each; half of every candidate pool's slots
        try to resurface a creator the user last clicked more than 100 clicks ago, and the response to such
        a dormant creator gets ``click.dormant`` (the long-range dial, = ``long_range``), which only a
        history longer than 100 clicks reveals. The other signals are moderate (taste 1, the profile and
        context crosses, short-term interest, drift). 0.6% of requests' impressions are logged (~36k),
        sized for the ranking table on 2 cores.
        """
        return cls(
            seed=seed,
            catalogue=CatalogueConfig(n_items=20_000, n_categories=24, n_creators=4_000),
            users=UserConfig(n_users=2_000),
            sessions=SessionConfig(
                requests_per_user_mean=300.0,
                requests_per_user_sigma=0.25,
                requests_per_session_mean=8.0,
                horizon_days=120.0,
            ),
            policy=PolicyConfig(
                impression_log_rate=impression_log_rate, resurface_share=0.5, resurface_min_age=100
            ),
            click=ClickModelConfig(
                taste=1.0, loyalty=0.0, dormant=long_range, dormant_after=100, context_interaction=0.5
            ),
        )

    @classmethod
    def long_range_control(cls, seed: int = 0) -> SyntheticConfig:
        """``long_range`` with the long-range dial at 0: nothing beyond the last 100 clicks matters."""
        return cls.long_range(seed, long_range=0.0)

    @classmethod
    def long_range_blind(cls, seed: int = 0, *, impression_log_rate: float = 0.006) -> SyntheticConfig:
        """``long_range`` with a logging policy that does not see the click logit (``policy.logit_weight``
        0: slates ranked by popularity and noise). In ``long_range`` the logger ranks a resurfaced creator the
        user will click near the top, so slot position alone carries most of the long-range term to any
        model; here position carries popularity only, and the long-range term is left to the history."""
        base = cls.long_range(seed, impression_log_rate=impression_log_rate)
        return base.model_copy(update={"policy": base.policy.model_copy(update={"logit_weight": 0.0})})

    @classmethod
    def long_range_blind_x5(cls, seed: int = 0) -> SyntheticConfig:
        """``long_range_blind`` with five times the logged impressions (3% of requests, a superset)."""
        return cls.long_range_blind(seed, impression_log_rate=0.03)

    @classmethod
    def long_range_x5(cls, seed: int = 0) -> SyntheticConfig:
        """``long_range`` with five times the logged impressions (3% of requests, ~180k): the same users,
        clicks and dials (logging draws a fixed uniform per request, so these impressions are a superset of
        ``long_range``'s), for checking whether the long-history models need more examples than 30k."""
        return cls.long_range(seed, impression_log_rate=0.03)

    @classmethod
    def interactions(cls, seed: int = 0) -> SyntheticConfig:
        """Feature interactions dominate: profile x category, profile x price band and profile x category x
        daypart crosses at high weight; no long-range signal. 3,000 users, ~60k logged impressions."""
        return cls(
            seed=seed,
            users=UserConfig(n_users=3_000),
            sessions=SessionConfig(requests_per_user_mean=25.0),
            policy=PolicyConfig(impression_log_rate=0.08),
            click=ClickModelConfig(taste=1.0, interaction=1.5, context_interaction=1.5, loyalty=0.0),
        )

    @classmethod
    def drift(cls, seed: int = 0) -> SyntheticConfig:
        """Drift across time: category appeal swings slowly (amplitude 2, 240-360 day periods, so a 30-day
        period sees one direction, not a whole cycle) and the profile x category tastes, the strongest
        signal here, turn half a circle over the 120 days, so what holds late contradicts what held early
        (the continual-training benchmark). 3,000 users, no long-range signal."""
        return cls(
            seed=seed,
            users=UserConfig(n_users=3_000),
            sessions=SessionConfig(requests_per_user_mean=25.0, horizon_days=120.0),
            policy=PolicyConfig(impression_log_rate=0.25),
            click=ClickModelConfig(
                taste=0.5,
                interaction=2.5,
                interaction_drift=3.141592653589793,
                drift=2.0,
                drift_period_days=(240.0, 360.0),
                loyalty=0.0,
            ),
        )

    @classmethod
    def item_drift(
        cls, seed: int = 0, *, turn: float = 6.283185307179586, appeal: float = 2.5
    ) -> SyntheticConfig:
        """Item appeal that drifts, the one non-stationary signal (the continual-training benchmark): each of
        500 items has an appeal of weight ``appeal`` (``click.item_appeal``) that turns ``turn`` radians over
        the 120 days (``click.item_appeal_drift``, the drift dial; a full turn by default, so the appeal a
        model learned in one 30-day period is unrelated or opposite a period or two later). Only the item's
        id reveals it (no history, no counter tracks it): a model must relearn it, and forgets what held
        before. Users, sessions and logging as in ``drift``; static taste and profile x item crosses at
        weight 1; category drift and interaction drift off. ``turn=0`` is the stationary control."""
        base = cls.drift(seed)
        return cls(
            seed=seed,
            catalogue=CatalogueConfig(n_items=500, n_creators=250),
            users=base.users,
            sessions=base.sessions,
            policy=base.policy,
            click=ClickModelConfig(
                taste=1.0,
                interaction=1.0,
                drift=0.0,
                loyalty=0.0,
                item_appeal=appeal,
                item_appeal_drift=turn if appeal else 0.0,
            ),
        )

    @classmethod
    def item_drift_control(cls, seed: int = 0) -> SyntheticConfig:
        """``item_drift`` with the drift dial at 0: the same item appeal, constant over time (stationary)."""
        return cls.item_drift(seed, turn=0.0)

    @classmethod
    def sparse_catalogue(cls, seed: int = 0) -> SyntheticConfig:
        """Retrieval with sparse feedback: 20,000 users with a few requests each (~6 clicks) over a
        200,000-item catalogue; 10% of requests' impressions are logged."""
        return cls(
            seed=seed,
            catalogue=CatalogueConfig(n_items=200_000, n_categories=64, n_creators=20_000),
            users=UserConfig(n_users=20_000),
            sessions=SessionConfig(
                requests_per_user_mean=4.0, requests_per_user_sigma=0.5, requests_per_session_mean=2.0
            ),
            policy=PolicyConfig(impression_log_rate=0.1),
        )

    @classmethod
    def sparse_retrieval(cls, seed: int = 0) -> SyntheticConfig:
        """Sequential retrieval on sparse data, sized for a 3-seed objective table on 2 cores: 5,000 users
        with ~8 clicks each over a 4,000-item catalogue (800 creators); otherwise ``quick``."""
        return cls(
            seed=seed,
            catalogue=CatalogueConfig(n_items=4_000, n_creators=800),
            users=UserConfig(n_users=5_000),
            sessions=SessionConfig(requests_per_user_mean=7.0),
        )

    @classmethod
    def long_sequence(cls, seed: int = 0) -> SyntheticConfig:
        """Sequential retrieval with long-range recurrence: 1,000 users with ~1,200 clicks each (histories of
        200 and 1,000 are both meaningful); half of the pool slots try to resurface creators last clicked
        more than 100 clicks ago, and the response to such a dormant creator is strong (``dormant`` 4).
        1% of requests' impressions are logged (the oracle and last-100 figures; retrieval learns from the
        click log)."""
        return cls(
            seed=seed,
            catalogue=CatalogueConfig(n_items=20_000, n_categories=24, n_creators=4_000),
            users=UserConfig(n_users=1_000),
            sessions=SessionConfig(
                requests_per_user_mean=700.0,
                requests_per_user_sigma=0.25,
                requests_per_session_mean=8.0,
                horizon_days=180.0,
            ),
            policy=PolicyConfig(impression_log_rate=0.01, resurface_share=0.5, resurface_min_age=100),
            click=ClickModelConfig(taste=1.0, loyalty=0.0, dormant=4.0, dormant_after=100),
        )

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        """The names ``preset`` accepts."""
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str, seed: int = 0) -> SyntheticConfig:
        """A named preset (``preset_names()``); use ``for_events(n)`` for an exact event count."""
        if name not in _PRESETS:
            raise ValueError(f"unknown synthetic preset {name!r}; choose one of {sorted(_PRESETS)}")
        return getattr(cls, _PRESETS[name])(seed)


#: Preset name -> the SyntheticConfig classmethod that builds it.
_PRESETS: dict[str, str] = {
    "tiny": "tiny",
    "quick": "quick",
    "long_history": "long_history",
    "long_range": "long_range",
    "long_range_control": "long_range_control",
    "long_range_x5": "long_range_x5",
    "long_range_blind": "long_range_blind",
    "long_range_blind_x5": "long_range_blind_x5",
    "interactions": "interactions",
    "drift": "drift",
    "item_drift": "item_drift",
    "item_drift_control": "item_drift_control",
    "sparse_catalogue": "sparse_catalogue",
    "sparse_retrieval": "sparse_retrieval",
    "long_sequence": "long_sequence",
}
