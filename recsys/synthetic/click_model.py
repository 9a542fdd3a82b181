"""The world of the synthetic data and its TRUE click model: catalogue, users' states, click probabilities.

The click logit of user u for item i at time t (position-free, ``ClickModel.logit``)::

    logit = b + a * taste_u[cat_i]                                   long-term taste (sparse, profile prior)
              + x * (W_ag(t)[age_u, gender_u, cat_i] + W_rd[region_u, device_u, band_i])   profile x item
              + xc * W_ac[age_u, cat_i, daypart(t)]                  profile x item x context cross
              + s * log1p(short_u,t[cat_i])                          short-term interest
              + l * 1[u clicked creator_i at any time before t]      long-range creator loyalty
              + r * 1[u clicked creator_i before, not in the last R clicks]   a dormant interest returning
              + q * quality_i
              + v * A_i(t)                                           item appeal (optionally drifting)
              + d * sin(2 pi (H(t) - H0) / period_c + phase_c)       slow drift of category appeal
              + h * cos(2 pi (hour(t) - peak_c) / 24)                hour-of-day effect

    P(click | shown at 0-based position k) = sigmoid(logit) * examine(k),   examine(k) = (1 + k)^-eta

``short_u,t[c] = sum over u's clicks j in category c before t of exp(-(t - t_j) / tau)`` (time-based, so it
decays within a session and is ~0 at the next session); ``H(t) = floor(t / 3600)`` and ``hour(t) = H(t) mod
24`` (UTC), ``H0 = H(start_ts)``, ``daypart(t) = hour(t) // 6``; ``W_ag(t) = cos(r) W_ag + sin(r) W_ag'`` with
``r = interaction_drift * (t - start_ts) / horizon`` (W_ag' an independent draw; r = 0 without drift);
likewise ``A_i(t) = cos(g) A_i + sin(g) A_i'`` with ``g = item_appeal_drift * (t - start_ts) / horizon``
(A, A' independent N(0, 1) per item; the term is absent while v = 0).
All coefficients are ``ClickModelConfig`` fields; the world's random parts (catalogue, W, phases, peaks,
taste prior) derive from the config seed. OPEN choices picked: the short-term term is log1p of the decayed
count (the raw count feeds back on itself within a session); the long-range effect is creator loyalty (not
returning categories), and ``PolicyConfig.resurface_share`` makes it a dormant interest that returns: that
share of the candidate pool shows creators the user clicked more than ``resurface_min_age`` clicks ago, so
the response depends on events beyond the last 100; W is two third-order crosses (plus an optional
profile x category x daypart cross) so that a feature-interaction model has something an additive one
cannot fit.

``ClickModel.probability(state, item_ids, ts, position)`` returns the true probability for ANY batch of user
states, items and times; ``ClickModel.state_from_history`` rebuilds a user's state from a logged click
history, so the stored ``impressions.p_click`` can be recomputed from the warehouse tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.synthetic import rng
from recsys.synthetic.config import SyntheticConfig

HOUR_S = 3_600
DAY_S = 86_400

# Streams of the per-user static draws (step -1 in synthetic.rng).
_S_PROFILE, _S_FAV_COUNT, _S_FAV_PICK, _S_FAV_STRENGTH = 0, 1, 2, 3


def world_rng(seed: int, part: str) -> np.random.Generator:
    """A generator for one static part of the world (catalogue, weights), independent of the other parts."""
    tag = int.from_bytes(part.encode()[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng(np.random.SeedSequence([seed, tag]))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class AliasSampler:
    """O(1) draws from a fixed discrete distribution (Vose's alias method), one uniform per draw."""

    def __init__(self, weights: np.ndarray, values: np.ndarray | None = None) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("alias weights must be a non-empty 1-D array of non-negative numbers, sum > 0")
        n = w.size
        scaled = (w * (n / w.sum())).tolist()
        prob = [1.0] * n
        alias = list(range(n))
        small = [i for i, p in enumerate(scaled) if p < 1.0]
        large = [i for i, p in enumerate(scaled) if p >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            prob[s] = scaled[s]
            alias[s] = g
            scaled[g] = scaled[g] + scaled[s] - 1.0
            (small if scaled[g] < 1.0 else large).append(g)
        self.n = n
        self.prob = np.asarray(prob)
        self.alias = np.asarray(alias, dtype=np.int64)
        self.values = None if values is None else np.asarray(values, dtype=np.int64)

    def sample(self, u: np.ndarray) -> np.ndarray:
        """Map uniforms in (0, 1) to draws (same shape): indices of ``weights``, or ``values`` if given."""
        x = u * self.n
        col = x.astype(np.int64)  # u < 1 - 2^-33, so col <= n - 1 for any catalogue size we accept
        x -= col
        out = np.where(x < self.prob[col], col, self.alias[col])
        return out if self.values is None else self.values[out]


@dataclass(frozen=True)
class Catalogue:
    """Item attributes as arrays indexed by item id; ``quality`` and ``popularity`` are latent, not published.

    Creators are numbered by their total exposure (creator 0 has the most popular catalogue); the published
    creator names are a seeded relabelling (``creator_name``), so the numbering carries no signal.
    """

    category: np.ndarray  # [n_items] int64
    creator: np.ndarray  # [n_items] int64
    price_band: np.ndarray  # [n_items] int64
    quality: np.ndarray  # [n_items] float64, standard normal
    popularity: np.ndarray  # [n_items] float64, the pool's exposure probabilities, sum 1
    release_ts: np.ndarray  # [n_items] int64
    rank: np.ndarray  # [n_items] int64, popularity rank (0 = most popular)
    creator_home: np.ndarray  # [n_creators] int64, each creator's home category
    creator_label: np.ndarray  # [n_creators] int64, the number in the creator's published name

    @property
    def n_items(self) -> int:
        return int(self.category.size)

    def creator_name(self, creator: np.ndarray) -> np.ndarray:
        return np.char.add("creator_", np.char.zfill(self.creator_label[creator].astype(str), 5))

    @classmethod
    def build(cls, config: SyntheticConfig) -> Catalogue:
        c, s = config.catalogue, config.sessions
        g = world_rng(config.seed, "catalog")
        n = c.n_items
        # Drawn in popularity-rank order, then given random ids.
        pop = np.arange(1.0, n + 1.0) ** -c.zipf_exponent
        pop /= pop.sum()
        creator_w = (g.permutation(c.n_creators) + 1.0) ** -c.creator_zipf_exponent
        creator = g.choice(c.n_creators, size=n, p=creator_w / creator_w.sum())
        by_mass = np.argsort(-np.bincount(creator, weights=pop, minlength=c.n_creators), kind="stable")
        renumber = np.empty(c.n_creators, dtype=np.int64)
        renumber[by_mass] = np.arange(c.n_creators)
        creator = renumber[creator]
        home = g.integers(0, c.n_categories, size=c.n_creators)
        off_home = g.random(n) >= c.creator_focus
        category = np.where(off_home, g.integers(0, c.n_categories, size=n), home[creator])
        band = g.integers(0, c.n_price_bands, size=n)
        logpop = np.log(pop)
        z = (logpop - logpop.mean()) / (logpop.std() or 1.0)
        rho = c.quality_popularity_corr
        quality = rho * z + np.sqrt(1.0 - rho * rho) * g.standard_normal(n)
        back = g.random(n) < c.back_catalogue_share
        back[0] = True  # the most popular item is available from the start: no pool is ever empty
        age = g.random(n)
        release = np.where(
            back,
            s.start_ts - age * c.back_catalogue_days * DAY_S,
            s.start_ts + age * s.horizon_days * DAY_S,
        )
        id_of_rank = g.permutation(n)
        by_id = np.empty(n, dtype=np.int64)
        by_id[id_of_rank] = np.arange(n)  # item id -> rank

        def ids(a: np.ndarray) -> np.ndarray:
            return a[by_id]

        return cls(
            category=ids(category).astype(np.int64),
            creator=ids(creator).astype(np.int64),
            price_band=ids(band).astype(np.int64),
            quality=ids(quality),
            popularity=ids(pop),
            release_ts=ids(np.floor(release).astype(np.int64)),
            rank=by_id,
            creator_home=home.astype(np.int64),
            creator_label=g.permutation(c.n_creators),
        )


@dataclass
class UserState:
    """The state of a batch of users at a moment (rows = users). Mutated in place by ``ClickModel.update``.

    ``short`` holds the decayed short-term counts as of ``short_ts`` (per row); ``static`` is the
    time-invariant part of the logit per (category, price band), derived from ``profile`` and ``taste``.
    Both are float32 by design (the per-step gathers from them are the generator's hot path, and float32
    halves their cache footprint); the true model is defined on these float32 values.
    """

    user_ids: np.ndarray  # [B] int64
    profile: np.ndarray  # [B, 4] int64: age bucket, gender, region, device (indices into the vocabularies)
    taste: np.ndarray  # [B, n_categories] float64
    static: np.ndarray  # [B, n_categories * n_price_bands] float32
    short: np.ndarray  # [B, n_categories] float32
    short_ts: np.ndarray  # [B] int64
    loyal: np.ndarray  # [B, n_creators] uint8, 1 = clicked this creator before
    n_clicks: np.ndarray  # [B] int64
    # [B, n_creators] int32: 1 + the ordinal of the user's latest click on the creator (0 = never); [B, 0]
    # when the dormant term is off (it is then never read).
    last_click: np.ndarray

    def __len__(self) -> int:
        return int(self.user_ids.size)

    def head(self, n: int) -> UserState:
        """The first ``n`` rows as views (updates through the view change this state)."""
        return UserState(*(getattr(self, f)[:n] for f in self.__dataclass_fields__))

    def take(self, rows: np.ndarray) -> UserState:
        """A copy of the given rows."""
        return UserState(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


class ClickModel:
    """The true click model of a config's world. Construction is deterministic in the config."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.catalogue = Catalogue.build(config)
        u, c, cm = config.users, config.catalogue, config.click
        self.n_categories = c.n_categories
        self.n_bands = c.n_price_bands
        self.n_creators = c.n_creators
        g = world_rng(config.seed, "clicks")
        shape = (len(u.age_buckets), len(u.genders), len(u.regions), len(u.devices))
        # Profile frequencies: mildly uneven, fixed by the seed.
        self.profile_probs = [g.dirichlet(np.full(m, 5.0)) for m in shape]
        self._profile_cdf = [np.cumsum(p) for p in self.profile_probs]
        self.w_age_gender_cat = g.standard_normal((shape[0], shape[1], c.n_categories))
        self.w_region_device_band = g.standard_normal((shape[2], shape[3], c.n_price_bands))
        self.taste_prior = g.standard_normal((shape[0], shape[1], shape[2], c.n_categories))
        lo, hi = cm.drift_period_days
        self.drift_period_h = g.uniform(lo, hi, c.n_categories) * 24.0
        self.drift_phase = g.uniform(0.0, 2 * np.pi, c.n_categories)
        self.hour_peak = g.uniform(0.0, 24.0, c.n_categories)
        self.h0 = config.sessions.start_ts // HOUR_S
        # Separate streams: worlds of configs without these terms stay exactly as they were.
        self.w_age_cat_daypart = world_rng(config.seed, "context").standard_normal(
            (shape[0], c.n_categories, 4)
        )
        self.w_age_gender_cat_late = world_rng(config.seed, "interaction_drift").standard_normal(
            (shape[0], shape[1], c.n_categories)
        )
        self._horizon_s = config.sessions.horizon_days * DAY_S
        # Item appeal at the start and the independent draw it turns towards, by item id (drawn only when
        # the term is on: catalogues may hold millions of items).
        appeal = world_rng(config.seed, "item_appeal").standard_normal(
            (2, c.n_items if cm.item_appeal else 0)
        )
        self.item_appeal_early, self.item_appeal_late = appeal
        # Time effects tabulated per (hour, category) over the simulated window plus a margin.
        self._t_lo = self.h0 - 24 * 30
        self._t_hi = self.h0 + int(np.ceil(config.sessions.horizon_days + 60)) * 24
        hours = np.arange(self._t_lo, self._t_hi, dtype=np.int64)
        self._time_table = self._time_effect_hours(hours[:, None], np.arange(c.n_categories)[None, :]).ravel()
        # Per-item parts of the logit, in popularity-rank order: the Zipf-skewed draws of the generator then
        # hit a small, cache-resident head of these arrays. ``_r`` arrays are indexed by rank.
        cat = self.catalogue
        self.id_of_rank = np.argsort(cat.rank)
        self.category_r = cat.category[self.id_of_rank]
        self.cat_band_r = self.category_r * c.n_price_bands + cat.price_band[self.id_of_rank]
        self.creator_r = cat.creator[self.id_of_rank]
        self.base_r = cm.bias + cm.quality * cat.quality[self.id_of_rank]
        self.release_r = cat.release_ts[self.id_of_rank]
        on = self.id_of_rank if cm.item_appeal else np.zeros(0, dtype=np.int64)
        self.appeal_early_r = self.item_appeal_early[on]
        self.appeal_late_r = self.item_appeal_late[on]
        # Poisson(mean) CDF for the number of extra favourite categories.
        k = np.arange(c.n_categories)
        pmf = np.exp(-u.favourite_categories_mean) * np.cumprod(
            np.r_[1.0, u.favourite_categories_mean / np.maximum(k[1:], 1)]
        )
        self._fav_cdf = np.cumsum(pmf)

    # -- users ------------------------------------------------------------------------------------------
    def initial_state(self, user_ids: np.ndarray) -> UserState:
        """Users' profiles and tastes (deterministic per user id and seed) with an empty history."""
        ids = np.asarray(user_ids, dtype=np.int64)
        keys = rng.user_keys(self.config.seed, ids)
        up = rng.uniform(keys, -1, _S_PROFILE, 4)
        profile = np.stack(
            [np.searchsorted(self._profile_cdf[j], up[:, j] * self._profile_cdf[j][-1]) for j in range(4)],
            axis=1,
        ).astype(np.int64)
        profile = np.minimum(profile, [len(p) - 1 for p in self.profile_probs])
        taste = self.draw_taste(keys, profile)
        return self.state_for(ids, profile, taste)

    def draw_taste(self, keys: np.ndarray, profile: np.ndarray) -> np.ndarray:
        """Sparse taste: 1 + Poisson favourites drawn from a profile-dependent prior, each U(0.5, 1.5)."""
        n, n_cat = len(keys), self.n_categories
        extra = np.searchsorted(self._fav_cdf, rng.uniform(keys, -1, _S_FAV_COUNT, 1)[:, 0])
        n_fav = np.minimum(1 + extra, n_cat)
        prior = self.taste_prior[profile[:, 0], profile[:, 1], profile[:, 2]]  # [n, C]
        keys_fav = self.config.users.taste_profile_strength * prior + rng.gumbel(keys, -1, _S_FAV_PICK, n_cat)
        order = np.argsort(
            -keys_fav, axis=1
        )  # Gumbel top-k = sampling without replacement from softmax(prior)
        strength = 0.5 + rng.uniform(keys, -1, _S_FAV_STRENGTH, n_cat)
        taste = np.zeros((n, n_cat))
        r, j = np.nonzero(np.arange(n_cat)[None, :] < n_fav[:, None])
        taste[r, order[r, j]] = strength[r, j]
        return taste

    def state_for(self, user_ids: np.ndarray, profile: np.ndarray, taste: np.ndarray) -> UserState:
        """A fresh state (no clicks yet) for users with the given profiles and tastes."""
        ids = np.asarray(user_ids, dtype=np.int64)
        profile = np.asarray(profile, dtype=np.int64)
        taste = np.asarray(taste, dtype=np.float64)
        n = ids.size
        if profile.shape != (n, 4) or taste.shape != (n, self.n_categories):
            raise ValueError(
                f"profile must be [{n}, 4] and taste [{n}, {self.n_categories}], "
                f"got {profile.shape} and {taste.shape}"
            )
        cm = self.config.click
        w_cat = self.w_age_gender_cat[profile[:, 0], profile[:, 1]]  # [n, C]
        w_band = self.w_region_device_band[profile[:, 2], profile[:, 3]]  # [n, P]
        static = (cm.taste * taste + cm.interaction * w_cat)[:, :, None] + cm.interaction * w_band[:, None, :]
        return UserState(
            user_ids=ids,
            profile=profile,
            taste=taste,
            static=static.reshape(n, -1).astype(np.float32),
            short=np.zeros((n, self.n_categories), dtype=np.float32),
            short_ts=np.zeros(n, dtype=np.int64),
            loyal=np.zeros((n, self.n_creators), dtype=np.uint8),
            n_clicks=np.zeros(n, dtype=np.int64),
            last_click=np.zeros((n, self.n_creators if cm.dormant else 0), dtype=np.int32),
        )

    def state_from_history(
        self, user_ids: np.ndarray, rows: np.ndarray, item_ids: np.ndarray, ts: np.ndarray
    ) -> UserState:
        """The users' states after the given clicks: event j is ``item_ids[j]`` clicked at ``ts[j]`` by user
        ``user_ids[rows[j]]``. Equal (up to float rounding) to the state the generator held at any time after
        the last of these clicks and before the next one."""
        state = self.initial_state(user_ids)
        rows = np.asarray(rows, dtype=np.int64)
        items = np.asarray(item_ids, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        if not rows.size:
            return state
        last = np.zeros(len(state), dtype=np.int64)
        np.maximum.at(last, rows, ts)
        w = np.exp((ts - last[rows]) / self.config.click.short_tau_s)
        np.add.at(state.short, (rows, self.catalogue.category[items]), w.astype(np.float32))
        state.short_ts[:] = last
        state.loyal[rows, self.catalogue.creator[items]] = 1
        state.n_clicks[:] = np.bincount(rows, minlength=len(state))
        if self.config.click.dormant:
            order = np.lexsort((ts, rows))  # each user's clicks in time order
            first = np.searchsorted(rows[order], rows[order])
            ordinal = np.empty(rows.size, dtype=np.int32)
            ordinal[order] = np.arange(rows.size) - first + 1
            np.maximum.at(state.last_click, (rows, self.catalogue.creator[items]), ordinal)
        return state

    # -- the true model ---------------------------------------------------------------------------------
    def _time_effect_hours(self, hours: np.ndarray, cats: np.ndarray) -> np.ndarray:
        cm = self.config.click
        drift = np.sin(2 * np.pi * (hours - self.h0) / self.drift_period_h[cats] + self.drift_phase[cats])
        hour = np.cos(2 * np.pi * ((hours % 24) - self.hour_peak[cats]) / 24.0)
        return cm.drift * drift + cm.hour * hour

    def time_effect(self, categories: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """d * drift + h * hour effect for categories [B, m] at times ts [B] (unix seconds)."""
        hours = np.asarray(ts, dtype=np.int64) // HOUR_S
        cats = np.asarray(categories, dtype=np.int64)
        if hours.size and hours.min() >= self._t_lo and hours.max() < self._t_hi:
            return self._time_table[(hours - self._t_lo)[:, None] * self.n_categories + cats]
        return self._time_effect_hours(hours[:, None], cats)

    def logit(self, state: UserState, item_ids: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Position-free click logits [B, m] of items [B, m] for the users of ``state`` at times ts [B]."""
        items = np.asarray(item_ids, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        n = len(state)
        if items.ndim != 2 or items.shape[0] != n or ts.shape != (n,):
            raise ValueError(f"item_ids must be [{n}, m] and ts [{n}] for a state of {n} users")
        if items.size and (items.min() < 0 or items.max() >= self.catalogue.n_items):
            raise ValueError(f"item_ids must be in [0, {self.catalogue.n_items})")
        if np.any(ts < state.short_ts):
            raise ValueError(
                "ts must not precede the state's last update (the state already knows later clicks)"
            )
        return self.logit_ranks(state, self.catalogue.rank[items], ts)

    def logit_ranks(self, state: UserState, ranks: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """``logit`` for items given by popularity rank, without input checks (the generator's hot path)."""
        cm = self.config.click
        n = len(state)
        cat = self.category_r[ranks]
        row = np.arange(n, dtype=np.int64)[:, None]
        z = self.base_r[ranks]
        z += state.static.ravel()[row * state.static.shape[1] + self.cat_band_r[ranks]]
        decay = np.exp((state.short_ts - ts) / cm.short_tau_s).astype(np.float32)  # f32: no casting loop
        short = state.short.ravel()[row * self.n_categories + cat]
        short *= decay[:, None]
        z += cm.short * np.log1p(short)
        loyal = state.loyal.ravel()[row * self.n_creators + self.creator_r[ranks]]
        z += cm.loyalty * loyal
        if cm.dormant:
            last = state.last_click.ravel()[row * self.n_creators + self.creator_r[ranks]]
            z += cm.dormant * ((last > 0) & (state.n_clicks[:, None] - last >= cm.dormant_after))
        z += self.time_effect(cat, ts)
        if cm.context_interaction:
            age = state.profile[:, 0][:, None]
            daypart = ((ts // HOUR_S) % 24 // 6)[:, None]
            z += cm.context_interaction * self.w_age_cat_daypart[age, cat, daypart]
        if cm.interaction_drift:
            # W[age, gender, cat] turns towards an independent draw: the static part holds the t = start
            # weights, so only the change is added here.
            age, gender = state.profile[:, 0][:, None], state.profile[:, 1][:, None]
            theta = cm.interaction_drift * (ts - self.config.sessions.start_ts) / self._horizon_s
            early = self.w_age_gender_cat[age, gender, cat]
            late = self.w_age_gender_cat_late[age, gender, cat]
            z += cm.interaction * ((np.cos(theta) - 1.0)[:, None] * early + np.sin(theta)[:, None] * late)
        if cm.item_appeal:
            z += cm.item_appeal * self.item_appeal_at(ranks, ts)
        return z

    def category_preference(self, profile: np.ndarray, taste: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """[B, n_categories]: the part of the true logit that depends on the user's hidden profile and taste,
        the category and the time ts [B]: a * taste + x * W_ag(t)[age, gender] + xc * W_ac[age] (mean over
        the dayparts) + d * drift(t). What the user prefers at ts before any short-term or creator effect;
        the price-band cross, item quality and the hour-of-day effect are left out (they do not depend on
        the user's category preference)."""
        profile = np.asarray(profile, dtype=np.int64)
        taste = np.asarray(taste, dtype=np.float64)
        ts = np.asarray(ts, dtype=np.int64)
        n, c = len(profile), self.n_categories
        if profile.shape != (n, 4) or taste.shape != (n, c) or ts.shape != (n,):
            raise ValueError(
                f"profile must be [n, 4], taste [n, {c}] and ts [n], got {profile.shape}, {taste.shape}, "
                f"{ts.shape}"
            )
        cm = self.config.click
        age, gender = profile[:, 0], profile[:, 1]
        theta = cm.interaction_drift * (ts - self.config.sessions.start_ts) / self._horizon_s  # [n]
        w = (
            np.cos(theta)[:, None] * self.w_age_gender_cat[age, gender]
            + np.sin(theta)[:, None] * self.w_age_gender_cat_late[age, gender]
        )
        hours = ts // HOUR_S
        period, phase = self.drift_period_h[None, :], self.drift_phase[None, :]
        drift = np.sin(2 * np.pi * (hours[:, None] - self.h0) / period + phase)
        context = self.w_age_cat_daypart[age].mean(axis=2)  # [n, C]
        return cm.taste * taste + cm.interaction * w + cm.context_interaction * context + cm.drift * drift

    def item_appeal_at(self, ranks: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """A_i(t) [B, m] of items given by popularity rank [B, m] at times ts [B] (without the weight v)."""
        cm = self.config.click
        early = self.appeal_early_r[ranks]
        if not cm.item_appeal_drift:
            return early
        g = (
            cm.item_appeal_drift
            * (np.asarray(ts, dtype=np.int64) - self.config.sessions.start_ts)
            / self._horizon_s
        )
        return np.cos(g)[:, None] * early + np.sin(g)[:, None] * self.appeal_late_r[ranks]

    def examine(self, position: np.ndarray | int) -> np.ndarray:
        """P(the user examines 0-based slate position k) = (1 + k)^-eta."""
        pos = np.asarray(position, dtype=np.float64)
        if np.any(pos < 0):
            raise ValueError("position must be >= 0 (0-based)")
        return (1.0 + pos) ** -self.config.click.position_eta

    def probability(
        self,
        state: UserState,
        item_ids: np.ndarray,
        ts: np.ndarray,
        position: np.ndarray | int | None = None,
    ) -> np.ndarray:
        """TRUE P(click) [B, m]: sigmoid(logit), times examine(position) when a position is given."""
        p = sigmoid(self.logit(state, item_ids, ts))
        return p if position is None else p * self.examine(position)

    def like_probability(self, logit: np.ndarray) -> np.ndarray:
        """P(like | click) for clicks with these position-free logits."""
        r = self.config.response
        return sigmoid(r.like_bias + r.like_slope * logit)

    def update(
        self,
        state: UserState,
        item_ids: np.ndarray,
        clicked: np.ndarray,
        click_ts: np.ndarray,
        ts: np.ndarray,
    ) -> None:
        """Advance the state past a request at ts [B]: items [B, m] clicked (mask) at click_ts [B, m]."""
        self.update_ranks(
            state, self.catalogue.rank[np.asarray(item_ids, dtype=np.int64)], clicked, click_ts, ts
        )

    def update_ranks(
        self, state: UserState, ranks: np.ndarray, clicked: np.ndarray, click_ts: np.ndarray, ts: np.ndarray
    ) -> None:
        """``update`` for items given by popularity rank."""
        ts = np.asarray(ts, dtype=np.int64)
        tau = self.config.click.short_tau_s
        # The counts are kept relative to the latest event (the last click, or the request): every weight
        # added is <= 1, so nothing overflows whatever tau and the dwell times are.
        ref = np.where(clicked, click_ts, ts[:, None]).max(axis=1) if clicked.size else ts
        state.short *= np.exp((state.short_ts - ref) / tau).astype(np.float32)[:, None]
        state.short_ts[:] = ref
        rows, cols = np.nonzero(clicked)
        if rows.size:
            r = ranks[rows, cols]
            w = np.exp((np.asarray(click_ts)[rows, cols] - ref[rows]) / tau)
            np.add.at(state.short, (rows, self.category_r[r]), w.astype(np.float32))
            state.loyal[rows, self.creator_r[r]] = 1
            if self.config.click.dormant:
                # np.nonzero is row-major: a row's clicks in slate order, i.e. in time order.
                first = np.searchsorted(rows, rows)
                ordinal = (state.n_clicks[rows] + np.arange(rows.size) - first + 1).astype(np.int32)
                np.maximum.at(state.last_click, (rows, self.creator_r[r]), ordinal)
            state.n_clicks += np.bincount(rows, minlength=len(state))
