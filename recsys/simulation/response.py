"""How simulated users respond to a served slate: the world of an A/B simulation.

A ``ResponseModel`` owns the per-user state of a population and answers three questions for a batch of
requests: the position-free click logit of any (user, item) at a time (``click_logits``), the examination
probability of a slate position (``examine``), and the whole response to a served slate (``respond``:
clicks, likes, dwell, the click times and whether the user leaves the session). ``update`` advances the
users' states past their clicks. The simulator never looks inside.

- ``TrueResponse`` (synthetic data): the generator's own ``synthetic.click_model.ClickModel`` with the
  users' states rebuilt from their logged clicks (``ClickModel.state_from_history``): profile x category
  taste, the profile x item crosses, short-term interest, creator loyalty, drift, hour of day, position
  (``examine``), like given click and dwell exactly as ``synthetic.generator`` draws them. Probabilities
  are the truth, so off-policy estimates can be checked against it.
- ``FittedResponse`` (real data): an APPROXIMATION. A logistic model of "the user interacts with the item"
  on four request-time features (log item popularity, the user's smoothed share of history in the item's
  category, the share of the last ``recent`` history items in that category, already seen), fitted on the
  held-out tail of the logs (events after a global temporal cut, with the history before the cut as
  context) against uniformly sampled negatives. Sampled negatives make the intercept meaningless, so it is
  shifted until a random (user, item) pair has click probability ``random_item_ctr``; the position effect
  is assumed, not learned: ``(1 + k)^-position_eta``. Real logs say nothing about what users would have
  done with items they were never shown, so lifts measured against this world are indicative only.
- ``ItemPositionCTR``: a context-free reward model (smoothed item CTR x estimated position curve) fitted
  on a logged impressions table; the simulator uses it as the doubly-robust estimator's reward model.

OPEN choices and what was picked:

- Leaving the session (no such process in the generator): after each slate the user leaves with
  probability ``SessionBehaviour.leave_after_no_click`` when nothing was clicked, else
  ``leave_after_click``; a better recommender therefore also earns longer sessions.
- Clicks within a slate are independent given examination (no cascade), as in the generator; a click's
  time is the request time + 1 s + the dwell of the slate's earlier clicks, and the user is busy until
  the last click ends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import polars as pl
from pydantic import Field

from recsys.core.config import FrozenModel
from recsys.synthetic.click_model import DAY_S, ClickModel, UserState, sigmoid
from recsys.synthetic.config import ResponseConfig, SyntheticConfig
from recsys.warehouse import Warehouse


class SessionBehaviour(FrozenModel):
    """When a simulated user leaves the session (after a slate)."""

    leave_after_no_click: float = Field(
        0.35, ge=0.0, le=1.0, description="P(leave) after a slate without any click."
    )
    leave_after_click: float = Field(0.12, ge=0.0, le=1.0, description="P(leave) after a slate with a click.")


@dataclass(frozen=True)
class SlateResponse:
    """The response of B users to their slates [B, k] (invalid slots: no click, p = 0)."""

    p_click: np.ndarray  # [B, k] P(click | shown at the position) under this response model
    logit: np.ndarray  # [B, k] position-free click logits
    click: np.ndarray  # [B, k] bool
    like: np.ndarray  # [B, k] bool
    dwell: np.ndarray  # [B, k] seconds, NaN without a click
    click_ts: np.ndarray  # [B, k] int64, the click's event time (request ts where no click)
    end_ts: np.ndarray  # [B] int64, when the user is done with this slate
    leave: np.ndarray  # [B] bool, the user ends the session after this slate


class ResponseModel(ABC):
    """The protocol every simulated world follows (see the module docstring)."""

    name: str
    is_truth: bool  # True: probabilities are the data's ground truth (off-policy true values are exact)
    behaviour: SessionBehaviour
    response: ResponseConfig

    @abstractmethod
    def population(self) -> np.ndarray:
        """The user ids that can arrive (sorted int64)."""

    @abstractmethod
    def start_ts(self) -> int:
        """The first simulated day starts here: midnight after every event the world was built from."""

    @abstractmethod
    def initial_history(self, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The user's logged history before the simulation (item ids, ts), oldest first."""

    @abstractmethod
    def click_logits(self, user_ids: np.ndarray, item_ids: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Position-free click logits [B, m] of items [B, m] for users [B] at times ts [B]."""

    @abstractmethod
    def examine(self, positions: np.ndarray) -> np.ndarray:
        """P(the user examines 0-based position k)."""

    @abstractmethod
    def update(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        clicked: np.ndarray,
        click_ts: np.ndarray,
        ts: np.ndarray,
    ) -> None:
        """Advance the users' states past a slate: items [B, k], clicked [B, k], click_ts [B, k], ts [B]."""

    def click_probability(
        self, user_ids: np.ndarray, item_ids: np.ndarray, ts: np.ndarray, positions: np.ndarray
    ) -> np.ndarray:
        """P(click | shown at ``positions``) [B, m]."""
        return sigmoid(self.click_logits(user_ids, item_ids, ts)) * self.examine(positions)

    def respond(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        valid: np.ndarray,
        ts: np.ndarray,
        rng: np.random.Generator,
    ) -> SlateResponse:
        """Draw the users' responses to slates ``item_ids`` [B, k] (``valid`` marks real slots) at ``ts``."""
        items = np.asarray(item_ids, dtype=np.int64)
        ok = np.asarray(valid, dtype=bool)
        ts = np.asarray(ts, dtype=np.int64)
        b, k = items.shape
        logit = self.click_logits(user_ids, items, ts)
        p = np.where(ok, sigmoid(logit) * self.examine(np.arange(k))[None, :], 0.0)
        u = rng.random((b, k, 3))
        click = ok & (u[..., 0] < p)
        r = self.response
        like = click & (u[..., 1] < sigmoid(r.like_bias + r.like_slope * logit))
        normal = rng.standard_normal((b, k))
        dwell = np.clip(
            np.exp(r.dwell_log_mean + r.dwell_slope * logit + r.dwell_log_sd * normal), 1.0, r.dwell_max_s
        )
        spent = np.where(click, np.ceil(dwell), 0).astype(np.int64)
        click_ts = ts[:, None] + 1 + np.cumsum(spent, axis=1) - spent
        end_ts = ts + 1 + spent.sum(axis=1)
        any_click = click.any(axis=1)
        leave_p = np.where(any_click, self.behaviour.leave_after_click, self.behaviour.leave_after_no_click)
        leave = u[:, 0, 2] < leave_p
        return SlateResponse(
            p_click=p,
            logit=logit,
            click=click,
            like=like,
            dwell=np.where(click, dwell, np.nan),
            click_ts=np.where(click, click_ts, ts[:, None]),
            end_ts=end_ts,
            leave=leave,
        )


def _next_midnight(ts: int) -> int:
    return (int(ts) // DAY_S + 1) * DAY_S


def _histories(events: pl.DataFrame) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """user_id -> (item ids, ts) ordered by (ts, src_row when present)."""
    order = ["user_id", "ts", *(["src_row"] if "src_row" in events.columns else [])]
    grouped = (
        events.sort(order)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").cast(pl.Int64), pl.col("ts").cast(pl.Int64))
    )
    return {
        int(u): (np.asarray(i, dtype=np.int64), np.asarray(t, dtype=np.int64))
        for u, i, t in zip(
            grouped["user_id"].to_list(), grouped["item_id"].to_list(), grouped["ts"].to_list(), strict=True
        )
    }


class _Rows:
    """user id -> row of the population arrays."""

    def __init__(self, user_ids: np.ndarray) -> None:
        ids = np.asarray(user_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("user_ids must be a non-empty 1-D array")
        if np.unique(ids).size != ids.size:
            raise ValueError("user_ids must be unique")
        self.ids = np.sort(ids)

    def __call__(self, user_ids: np.ndarray) -> np.ndarray:
        u = np.asarray(user_ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, u).clip(max=self.ids.size - 1)
        missing = self.ids[pos] != u
        if missing.any():
            raise ValueError(f"user_ids: {u[missing][:5].tolist()} are not in this world's population")
        return pos


# ----------------------------------------------------------------------------------------------------------
# Synthetic data: the generator's true model
# ----------------------------------------------------------------------------------------------------------


class TrueResponse(ResponseModel):
    """The synthetic generator's true click model over users whose states continue from their logged clicks.

    ``events`` (user_id, item_id, ts[, src_row]) are the users' logged clicks (``<ds>.events``); users
    without events start with an empty history (a fresh profile and taste from the seed).
    """

    is_truth = True

    def __init__(
        self,
        config: SyntheticConfig,
        user_ids: np.ndarray,
        events: pl.DataFrame | None = None,
        *,
        behaviour: SessionBehaviour | None = None,
        start_ts: int | None = None,
    ) -> None:
        self.name = f"synthetic truth {config.data_version()}"
        self.model = ClickModel(config)
        self.config = config
        self.behaviour = behaviour or SessionBehaviour()
        self.response = config.response
        self._rows = _Rows(user_ids)
        ids = self._rows.ids
        self._history: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        last = config.sessions.start_ts
        if events is not None and events.height:
            for column in ("user_id", "item_id", "ts"):
                if column not in events.columns:
                    raise ValueError(f"events is missing column {column!r}; it has {events.columns}")
            events = events.filter(pl.col("user_id").is_in(ids.tolist()))
            self._history = _histories(events)
            n_items = self.model.catalogue.n_items
            bad = events.filter((pl.col("item_id") < 0) | (pl.col("item_id") >= n_items))
            if bad.height:
                raise ValueError(
                    f"events: item_id {bad['item_id'][0]} is outside this config's catalogue [0, {n_items})"
                )
            rows = self._rows(events["user_id"].to_numpy())
            self.state = self.model.state_from_history(
                ids, rows, events["item_id"].to_numpy(), events["ts"].to_numpy()
            )
            last = max(last, int(events["ts"].max()))
        else:
            self.state = self.model.initial_state(ids)
        self._start = _next_midnight(last) if start_ts is None else int(start_ts)
        if self._start <= last and events is not None and events.height:
            raise ValueError(f"start_ts {self._start} must follow the last logged event ({last})")

    @classmethod
    def from_warehouse(
        cls,
        wh: Warehouse,
        dataset: str,
        config: SyntheticConfig,
        *,
        behaviour: SessionBehaviour | None = None,
    ) -> TrueResponse:
        """The world of a synthetic dataset in the warehouse; ``config`` must be the one that generated it."""
        latest = wh.latest(f"{dataset}.events")
        if latest is None:
            raise ValueError(f"dataset {dataset!r} has no published events table in {wh.path}")
        recorded = latest.inputs.get("synthetic_config")
        if recorded != config.data_version():
            raise ValueError(
                f"config: its data version {config.data_version()} differs from the one {dataset}.events "
                f"was generated from ({recorded}); pass the generating SyntheticConfig"
            )
        users = wh.sql(f"SELECT user_id FROM {dataset}.users ORDER BY user_id")["user_id"].to_numpy()
        events = wh.sql(f"SELECT user_id, item_id, ts, src_row FROM {dataset}.events")
        return cls(config, users, events, behaviour=behaviour)

    def population(self) -> np.ndarray:
        return self._rows.ids

    def start_ts(self) -> int:
        return self._start

    def initial_history(self, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros(0, dtype=np.int64)
        return self._history.get(int(user_id), (empty, empty))

    def click_logits(self, user_ids: np.ndarray, item_ids: np.ndarray, ts: np.ndarray) -> np.ndarray:
        sub = self.state.take(self._rows(user_ids))
        return self.model.logit(sub, item_ids, np.asarray(ts, dtype=np.int64))

    def examine(self, positions: np.ndarray) -> np.ndarray:
        return self.model.examine(positions)

    def update(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        clicked: np.ndarray,
        click_ts: np.ndarray,
        ts: np.ndarray,
    ) -> None:
        rows = self._rows(user_ids)
        if np.unique(rows).size != rows.size:
            raise ValueError("update: a user may appear only once per batch")
        sub = self.state.take(rows)
        self.model.update(sub, item_ids, np.asarray(clicked, dtype=bool), click_ts, ts)
        for name in UserState.__dataclass_fields__:
            getattr(self.state, name)[rows] = getattr(sub, name)


# ----------------------------------------------------------------------------------------------------------
# Real data: a fitted approximation
# ----------------------------------------------------------------------------------------------------------


class FittedResponseConfig(FrozenModel):
    """Knobs of ``FittedResponse.fit`` (see the module docstring: an approximation, not the truth)."""

    holdout_share: float = Field(
        0.2, gt=0.0, lt=1.0, description="Events after this share's quantile of ts are the fit's targets."
    )
    negatives: int = Field(4, ge=1, description="Uniformly sampled negative items per held-out event.")
    max_targets_per_user: int = Field(20, ge=1, description="At most this many held-out events per user.")
    recent: int = Field(10, ge=1, description="History items that count as recent (short-term feature).")
    random_item_ctr: float = Field(
        0.02, gt=0.0, lt=1.0, description="Calibrated P(click) of a random item at position 0."
    )
    position_eta: float = Field(0.8, ge=0.0, description="Assumed examination (1 + k)^-eta.")
    l2: float = Field(1.0, gt=0.0, description="Inverse L2 strength C of the logistic regression.")
    seed: int = 0


FEATURES = ("log_popularity", "category_share", "recent_share", "seen")


class FittedResponse(ResponseModel):
    """A logistic response model fitted on held-out logs (real data); see the module docstring."""

    is_truth = False

    def __init__(
        self,
        coef: np.ndarray,
        intercept: float,
        items: pl.DataFrame,
        histories: dict[int, tuple[np.ndarray, np.ndarray]],
        config: FittedResponseConfig,
        *,
        behaviour: SessionBehaviour | None = None,
        response: ResponseConfig | None = None,
        start_ts: int,
    ) -> None:
        self.name = "fitted logistic response (approximation)"
        self.coef = np.asarray(coef, dtype=np.float64)
        if self.coef.shape != (len(FEATURES),):
            raise ValueError(f"coef must have {len(FEATURES)} values ({FEATURES}), got {self.coef.shape}")
        self.intercept = float(intercept)
        self.config = config
        self.behaviour = behaviour or SessionBehaviour()
        self.response = response or ResponseConfig()
        self._start = int(start_ts)
        # Item lookups: sorted ids -> dense index; category codes (the last code = unknown).
        ids = items["item_id"].cast(pl.Int64).to_numpy()
        order = np.argsort(ids)
        self._item_ids = ids[order]
        cats = (
            items["category"].cast(pl.Utf8).fill_null("?").to_numpy()[order]
            if "category" in items.columns
            else np.full(ids.size, "?")
        )
        self._cat_names, cat_codes = np.unique(cats, return_inverse=True)
        self.n_categories = self._cat_names.size + 1
        self._item_cat = cat_codes.astype(np.int64)
        self._log_pop = np.log1p(items["popularity"].cast(pl.Float64).to_numpy()[order])
        users = np.array(sorted(histories), dtype=np.int64)
        self._rows = _Rows(users)
        self._history = histories
        self._cat_counts = np.zeros((users.size, self.n_categories))
        self._recent = np.full((users.size, config.recent), -1, dtype=np.int64)
        self._seen: list[set[int]] = []
        for r, u in enumerate(users.tolist()):
            hist_items = histories[u][0]
            codes = self._categories(hist_items)
            np.add.at(self._cat_counts[r], codes, 1.0)
            tail = codes[-config.recent :]
            if tail.size:
                self._recent[r, -tail.size :] = tail
            self._seen.append(set(hist_items.tolist()))

    # -- features ---------------------------------------------------------------------------------------
    def _lookup(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self._item_ids, ids).clip(max=self._item_ids.size - 1)
        return pos, self._item_ids[pos] == ids

    def _categories(self, item_ids: np.ndarray) -> np.ndarray:
        pos, known = self._lookup(item_ids)
        return np.where(known, self._item_cat[pos], self.n_categories - 1)

    def features(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """[B, m, 4] features of items [B, m] for users [B] in their current state."""
        rows = self._rows(user_ids)
        items = np.asarray(item_ids, dtype=np.int64)
        pos, known = self._lookup(items)
        cat = np.where(known, self._item_cat[pos], self.n_categories - 1)
        log_pop = np.where(known, self._log_pop[pos], 0.0)
        counts = self._cat_counts[rows]  # [B, C]
        share = np.log(
            (np.take_along_axis(counts, cat, axis=1) + 1.0)
            / (counts.sum(axis=1, keepdims=True) + self.n_categories)
        )
        recent = self._recent[rows]  # [B, R]
        recent_share = (recent[:, None, :] == cat[:, :, None]).mean(axis=2)
        seen = np.array(
            [
                [it in self._seen[r] for it in row]
                for r, row in zip(rows.tolist(), items.tolist(), strict=True)
            ],
            dtype=np.float64,
        ).reshape(items.shape)
        return np.stack([log_pop, share, recent_share, seen], axis=-1)

    # -- fitting ----------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        events: pl.DataFrame,
        items: pl.DataFrame,
        config: FittedResponseConfig | None = None,
        *,
        behaviour: SessionBehaviour | None = None,
        response: ResponseConfig | None = None,
    ) -> FittedResponse:
        """Fit on the held-out tail of ``events`` (user_id, item_id, ts); ``items`` has item_id and
        optionally category. Popularity is counted on the events before the cut (the context)."""
        from sklearn.linear_model import LogisticRegression

        cfg = config or FittedResponseConfig()
        for column in ("user_id", "item_id", "ts"):
            if column not in events.columns:
                raise ValueError(f"events is missing column {column!r}; it has {events.columns}")
        if "item_id" not in items.columns:
            raise ValueError(f"items is missing column 'item_id'; it has {items.columns}")
        if events.height < 10:
            raise ValueError(f"events has {events.height} rows; fitting a response model needs at least 10")
        cut = float(np.quantile(events["ts"].to_numpy(), 1.0 - cfg.holdout_share))
        before = events.filter(pl.col("ts") <= cut)
        after = events.filter(pl.col("ts") > cut)
        if after.height == 0 or before.height == 0:
            raise ValueError("events: every event has the same time; no held-out tail to fit on")
        pop = before.group_by("item_id").len("popularity")
        item_frame = (
            items.select(
                pl.col("item_id").cast(pl.Int64),
                *([pl.col("category")] if "category" in items.columns else []),
            )
            .unique("item_id")
            .join(pop.with_columns(pl.col("item_id").cast(pl.Int64)), on="item_id", how="left")
            .with_columns(pl.col("popularity").fill_null(0).cast(pl.Float64))
        )
        context = _histories(before)
        targets = (
            after.filter(pl.col("user_id").is_in(list(context)))
            .sort("user_id", "ts")
            .group_by("user_id", maintain_order=True)
            .head(cfg.max_targets_per_user)
        )
        if targets.height == 0:
            raise ValueError("events: no user has both history before the cut and events after it")
        probe = cls(np.zeros(len(FEATURES)), 0.0, item_frame, context, cfg, start_ts=0)
        rng = np.random.default_rng(cfg.seed)
        users = targets["user_id"].to_numpy().astype(np.int64)
        pos_items = targets["item_id"].to_numpy().astype(np.int64)[:, None]
        neg_items = rng.choice(probe._item_ids, size=(users.size, cfg.negatives))
        x = np.concatenate(
            [probe.features(users, pos_items).reshape(-1, 4), probe.features(users, neg_items).reshape(-1, 4)]
        )
        y = np.concatenate([np.ones(users.size), np.zeros(users.size * cfg.negatives)])
        clf = LogisticRegression(C=cfg.l2, max_iter=1000).fit(x, y)
        coef = clf.coef_[0].astype(np.float64)
        # Calibrate: a random (user, item) pair (the negatives) gets random_item_ctr on average.
        z_neg = x[users.size :] @ coef
        target = cfg.random_item_ctr
        lo, hi = -30.0, 30.0
        for _ in range(80):  # bisection on the intercept: mean sigmoid is monotone in it
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if sigmoid(z_neg + mid).mean() < target else (lo, mid)
        full = _histories(events)
        last = int(events["ts"].max())
        # The simulation continues from the whole log (context + held-out tail), popularity from all of it.
        all_pop = events.group_by("item_id").len("popularity").with_columns(pl.col("item_id").cast(pl.Int64))
        final_items = (
            item_frame.drop("popularity")
            .join(all_pop, on="item_id", how="left")
            .with_columns(pl.col("popularity").fill_null(0).cast(pl.Float64))
        )
        return cls(
            coef,
            0.5 * (lo + hi),
            final_items,
            full,
            cfg,
            behaviour=behaviour,
            response=response,
            start_ts=_next_midnight(last),
        )

    @classmethod
    def from_warehouse(
        cls, wh: Warehouse, dataset: str, config: FittedResponseConfig | None = None, **kw: object
    ) -> FittedResponse:
        events = wh.sql(f"SELECT user_id, item_id, ts, src_row FROM {dataset}.events")
        items = (
            wh.sql(f"SELECT item_id, category FROM {dataset}.items")
            if wh.has_table(f"{dataset}.items")
            else events.select("item_id").unique()
        )
        return cls.fit(events, items, config, **kw)  # type: ignore[arg-type]

    # -- the protocol -----------------------------------------------------------------------------------
    def population(self) -> np.ndarray:
        return self._rows.ids

    def start_ts(self) -> int:
        return self._start

    def initial_history(self, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        return self._history[int(user_id)]

    def click_logits(self, user_ids: np.ndarray, item_ids: np.ndarray, ts: np.ndarray) -> np.ndarray:
        return self.features(user_ids, item_ids) @ self.coef + self.intercept

    def examine(self, positions: np.ndarray) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.float64)
        if np.any(pos < 0):
            raise ValueError("position must be >= 0 (0-based)")
        return (1.0 + pos) ** -self.config.position_eta

    def update(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        clicked: np.ndarray,
        click_ts: np.ndarray,
        ts: np.ndarray,
    ) -> None:
        rows = self._rows(user_ids)
        items = np.asarray(item_ids, dtype=np.int64)
        clicked = np.asarray(clicked, dtype=bool)
        order = np.argsort(np.where(clicked, click_ts, np.iinfo(np.int64).max), axis=1, kind="stable")
        for b, r in enumerate(rows.tolist()):
            picked = items[b][order[b]][clicked[b][order[b]]]
            if not picked.size:
                continue
            codes = self._categories(picked)
            np.add.at(self._cat_counts[r], codes, 1.0)
            self._recent[r] = np.concatenate([self._recent[r], codes])[-self.config.recent :]
            self._seen[r].update(picked.tolist())


# ----------------------------------------------------------------------------------------------------------
# A reward model for doubly-robust off-policy estimates
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemPositionCTR:
    """q(item, position) = smoothed examined-CTR of the item x the estimated examination of the position.

    Fitted on a logged impressions table (item_id, position, click); the position curve is each position's
    CTR relative to position 0 (monotone by construction is not enforced: it is what the log says), and an
    item's CTR is shrunk towards the global rate with ``prior_strength`` pseudo-impressions.
    """

    item_ids: np.ndarray  # sorted
    item_ctr: np.ndarray
    global_ctr: float
    position_curve: np.ndarray  # [max position + 1]

    @classmethod
    def fit(cls, log: pl.DataFrame, prior_strength: float = 20.0) -> ItemPositionCTR:
        for column in ("item_id", "position", "click"):
            if column not in log.columns:
                raise ValueError(f"log is missing column {column!r}; it has {log.columns}")
        if log.height == 0:
            raise ValueError("log is empty: nothing to fit a reward model on")
        by_pos = (
            log.group_by("position")
            .agg(pl.col("click").cast(pl.Float64).mean().alias("ctr"))
            .sort("position")
        )
        n_pos = int(by_pos["position"].max()) + 1
        ctr_pos = np.zeros(n_pos)
        ctr_pos[by_pos["position"].to_numpy()] = by_pos["ctr"].to_numpy()
        base = ctr_pos[0] if ctr_pos[0] > 0 else max(float(ctr_pos.max()), 1e-9)
        curve = np.clip(ctr_pos / base, 1e-6, None)
        exposure = log.with_columns(_e=pl.Series(curve[log["position"].to_numpy().astype(np.int64)]))
        global_ctr = float(log["click"].cast(pl.Float64).sum() / exposure["_e"].sum())
        items = (
            exposure.group_by("item_id")
            .agg(pl.col("click").cast(pl.Float64).sum().alias("c"), pl.col("_e").sum().alias("e"))
            .sort("item_id")
        )
        ctr = (items["c"].to_numpy() + prior_strength * global_ctr) / (items["e"].to_numpy() + prior_strength)
        return cls(items["item_id"].to_numpy().astype(np.int64), ctr, global_ctr, curve)

    def predict(self, item_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, ids).clip(max=self.item_ids.size - 1)
        ctr = np.where(self.item_ids[pos] == ids, self.item_ctr[pos], self.global_ctr)
        p = np.asarray(positions, dtype=np.int64)
        curve = self.position_curve[np.minimum(p, self.position_curve.size - 1)]
        return np.clip(ctr * curve, 0.0, 1.0)


def true_response_for(
    wh: Warehouse,
    dataset: str,
    config: SyntheticConfig | None = None,
    *,
    behaviour: SessionBehaviour | None = None,
) -> TrueResponse:
    """``TrueResponse.from_warehouse`` with the generating config found from the data version when not given.

    The data version recorded in ``<dataset>.events``' lineage names the generator run: its manifest under
    ``<home>/cache/synthetic/<version>/`` (where the pipeline generates) holds the config; failing that, the
    presets (``quick``, ``long_history``, seeds 0-9) are tried. Anything else must be passed as ``config``.
    """
    if config is None:
        from recsys.core.config import PathsConfig
        from recsys.synthetic.generator import read_manifest

        latest = wh.latest(f"{dataset}.events")
        recorded = latest.inputs.get("synthetic_config") if latest is not None else None
        if recorded is None:
            raise ValueError(f"{dataset}.events was not generated by synthetic/ (no synthetic_config input)")
        try:
            config = read_manifest(PathsConfig().cache / "synthetic" / recorded).config
        except FileNotFoundError:
            candidates = [SyntheticConfig.preset(p, s) for p in ("quick", "long_history") for s in range(10)]
            config = next((c for c in candidates if c.data_version() == recorded), None)
        if config is None:
            raise ValueError(
                f"{dataset}.events was generated from data version {recorded}: no generator manifest in the "
                "cache and no preset matches; pass its SyntheticConfig"
            )
    return TrueResponse.from_warehouse(wh, dataset, config, behaviour=behaviour)


__all__ = [
    "FEATURES",
    "FittedResponse",
    "FittedResponseConfig",
    "ItemPositionCTR",
    "ResponseModel",
    "SessionBehaviour",
    "SlateResponse",
    "TrueResponse",
    "true_response_for",
]
