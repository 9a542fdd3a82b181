"""The A/B simulator: simulated users arrive day by day, are served by their arm and respond.

Each simulated day ``users_per_day`` distinct users of the world's population arrive (drawn uniformly, a
user may come back on later days) at times drawn from a diurnal profile. A user's arm is a stable hash of
the user id (``simulation.stats.assign_arm`` with the config's salt and weights), so a returning user stays
in the same arm. A session is up to ``session_length`` requests: each request sends the user's history
(the logged one plus every click simulated so far, the most recent ``history_len`` events) to the arm's
``recommend``, the world (``simulation.response.ResponseModel``) draws clicks, likes and dwell for the
served slate and whether the user leaves, and the user's state moves past the clicks. Users of a day are
advanced in lockstep (one request per active user per step) so that each arm gets batched requests.

Before the experiment, ``pre_period_days`` days serve EVERY user with the control arm: their per-user
metrics are the CUPED covariates, and (when off-policy evaluation is on) the pre-period log fits the
doubly-robust estimator's reward model (``ItemPositionCTR``).

The impressions log records every served slot with its propensity from the served policy (the arm's
Plackett-Luce draw), the outcome and the world's P(click) of that slot. For off-policy evaluation a share
``ope_share`` of the experiment's control requests is re-scored by each treatment arm in the same context
(same history, same time, the arm's whole candidate pool): each logged slot gets the target policy's
probability of that item at that position given the logged items above it (``target_propensity``), the
true value of the target's choice in that slot (``true_value``: the target's conditional distribution over
its pool times the world's click probabilities at that position) and the reward model's ``q_hat`` / ``v_hat``.

OPEN choices and what was picked:

- Arrivals: a fixed number of distinct users per day (no growth, no churn); a user's next session starts
  no earlier than ``min_session_gap_s`` after the previous one ended.
- Off-policy decisions are per slot, conditional on the logged items above (the propensity definition of
  ``serving.impressions``). A target item outside the logger's pool has no logged support: IPS/SNIPS then
  underestimate, and the true value shows by how much.
- Requests that get an empty slate end the session (there is nothing to respond to).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from pydantic import Field, field_validator, model_validator

from recsys.core.config import FrozenModel
from recsys.serving.schemas import HistoryEvent, RecommendOptions, RecommendRequest, RecommendResponse
from recsys.simulation.arms import ArmClient
from recsys.simulation.response import ItemPositionCTR, ResponseModel
from recsys.simulation.stats import assign_arm
from recsys.synthetic.click_model import DAY_S, sigmoid
from recsys.synthetic.config import DEFAULT_DIURNAL

PRE, EXPERIMENT = "pre", "experiment"


class SimulationConfig(FrozenModel):
    """Every knob of one simulated experiment."""

    days: int = Field(14, ge=1, le=365, description="Experiment days.")
    users_per_day: int = Field(200, ge=2, description="Distinct users arriving per simulated day.")
    session_length: int = Field(10, ge=1, le=1000, description="Most requests (slates) per session.")
    k: int = Field(10, ge=1, le=200, description="Slate size.")
    arms: tuple[str, ...] = Field(("control", "treatment"), description="Arm names; the first is control.")
    weights: tuple[float, ...] | None = Field(None, description="Traffic split per arm (default equal).")
    control: str | None = Field(None, description="The control arm (default: the first arm).")
    salt: str = Field("ab", description="Assignment salt: a new salt re-randomises the users.")
    seed: int = Field(0, ge=0, description="Seed of arrivals and responses.")
    pre_period_days: int = Field(7, ge=0, le=365, description="Days served by control before the start.")
    history_len: int = Field(100, ge=0, description="Most recent history events sent with a request.")
    request_gap_mean_s: float = Field(30.0, gt=0.0, description="Mean seconds between a session's requests.")
    min_session_gap_s: int = Field(1_800, ge=1, description="Least seconds between two sessions of a user.")
    exclude_seen: bool = Field(True, description="Ask arms never to serve an item of the history.")
    ope_share: float = Field(
        0.25, ge=0.0, le=1.0, description="Share of experiment control requests re-scored for off-policy."
    )
    diurnal_weights: tuple[float, ...] = Field(DEFAULT_DIURNAL, description="24 arrival weights, UTC hours.")

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) < 1 or len(set(v)) != len(v) or any(not a for a in v):
            raise ValueError(f"arms must be non-empty, distinct names, got {v}")
        return v

    @field_validator("diurnal_weights")
    @classmethod
    def _diurnal(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) != 24 or any(w < 0 for w in v) or sum(v) <= 0:
            raise ValueError("diurnal_weights must be 24 values >= 0 with a positive sum")
        return v

    @model_validator(mode="after")
    def _design(self) -> SimulationConfig:
        if self.weights is not None:
            if len(self.weights) != len(self.arms):
                raise ValueError(
                    f"weights must have one value per arm ({len(self.arms)}), got {self.weights}"
                )
            if any(not (w > 0) for w in self.weights):
                raise ValueError(f"weights must be > 0, got {self.weights}")
        if self.control is not None and self.control not in self.arms:
            raise ValueError(f"control {self.control!r} is not one of the arms {self.arms}")
        return self

    @property
    def control_arm(self) -> str:
        return self.control or self.arms[0]

    @property
    def treatments(self) -> tuple[str, ...]:
        return tuple(a for a in self.arms if a != self.control_arm)

    def design(self) -> dict[str, float]:
        """{arm: share of traffic} (sums to 1)."""
        w = np.ones(len(self.arms)) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        return {a: float(x) for a, x in zip(self.arms, w / w.sum(), strict=True)}

    @classmethod
    def quick(cls, **overrides: object) -> SimulationConfig:
        """A few thousand requests: seconds with small models, for tests and the default pipeline."""
        base: dict[str, object] = {"days": 5, "users_per_day": 120, "session_length": 5, "pre_period_days": 2}
        return cls(**(base | overrides))


@dataclass
class SimulationLog:
    """What a simulation produced. ``impressions`` has the ``<ds>.impressions`` columns plus ``arm``,
    ``period`` (pre/experiment), ``day`` (0-based from the experiment start; negative in the pre-period),
    ``step`` (request index in the session), ``score`` and ``source``; ``arrivals`` one row per user and
    day; ``off_policy`` the re-scored control slots (empty when off-policy evaluation is off)."""

    config: SimulationConfig
    impressions: pl.DataFrame
    arrivals: pl.DataFrame
    off_policy: pl.DataFrame
    start_ts: int  # unix seconds of the experiment's first day (the pre-period precedes it)
    response_name: str
    is_truth: bool
    arm_names: dict[str, str] = field(default_factory=dict)  # arm -> what it serves (model tag, oracle...)

    def experiment(self) -> pl.DataFrame:
        return self.impressions.filter(pl.col("period") == EXPERIMENT)


class _Recorder:
    def __init__(self) -> None:
        self.cols: dict[str, list[np.ndarray]] = {}

    def add(self, **columns: np.ndarray) -> None:
        for name, values in columns.items():
            self.cols.setdefault(name, []).append(np.asarray(values))

    def frame(self, schema: dict[str, pl.DataType]) -> pl.DataFrame:
        if not self.cols:
            return pl.DataFrame(schema=schema)
        return pl.DataFrame({n: np.concatenate(self.cols[n]) for n in schema}).cast(schema)  # type: ignore[arg-type]


IMPRESSION_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.Int64(),
    "user_id": pl.Int64(),
    "item_id": pl.Int64(),
    "ts": pl.Int64(),
    "position": pl.Int32(),
    "propensity": pl.Float64(),
    "click": pl.Boolean(),
    "like": pl.Boolean(),
    "dwell": pl.Float64(),
    "p_click": pl.Float64(),
    "arm": pl.String(),
    "period": pl.String(),
    "day": pl.Int32(),
    "step": pl.Int32(),
    "score": pl.Float64(),
    "source": pl.String(),
}
ARRIVAL_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64(),
    "day": pl.Int32(),
    "period": pl.String(),
    "arm": pl.String(),
    "arrival_ts": pl.Int64(),
    "requests": pl.Int32(),
}
OPE_SCHEMA: dict[str, pl.DataType] = {
    "policy": pl.String(),
    "request_id": pl.Int64(),
    "user_id": pl.Int64(),
    "day": pl.Int32(),
    "position": pl.Int32(),
    "item_id": pl.Int64(),
    "click": pl.Boolean(),
    "propensity": pl.Float64(),
    "target_propensity": pl.Float64(),
    "p_click": pl.Float64(),
    "true_value": pl.Float64(),
    "q_hat": pl.Float64(),
    "v_hat": pl.Float64(),
}


def _slates(responses: list[RecommendResponse], k: int) -> tuple[np.ndarray, ...]:
    """items, valid, propensity, score [B, k] and request ids / sources [B] from the arm's responses."""
    b = len(responses)
    items = np.zeros((b, k), dtype=np.int64)
    valid = np.zeros((b, k), dtype=bool)
    prop = np.ones((b, k))
    score = np.zeros((b, k))
    for r, resp in enumerate(responses):
        n = min(len(resp.items), k)
        if n:
            items[r, :n] = [it.item_id for it in resp.items[:n]]
            prop[r, :n] = [it.propensity for it in resp.items[:n]]
            score[r, :n] = [it.score for it in resp.items[:n]]
            valid[r, :n] = True
            items[r, n:] = items[r, 0]  # padding: a real item (never shown, never clicked)
    ids = np.array([resp.request_id for resp in responses], dtype=np.int64)
    sources = np.array([resp.source for resp in responses], dtype=object)
    return items, valid, prop, score, ids, sources


def _conditional(weights: np.ndarray, pool: np.ndarray, logged: np.ndarray, greedy: bool) -> np.ndarray:
    """[k, P]: the target's probability of each pool item at each logged position, given the logged items
    above (Plackett-Luce over ``weights``; greedy = the best remaining item with probability 1)."""
    k = logged.size
    above = np.zeros((k, pool.size), dtype=bool)
    for p in range(1, k):
        above[p] = above[p - 1] | (pool == logged[p - 1])
    w = np.where(above, 0.0, weights[None, :])
    if greedy:
        best = np.argmax(np.where(above, -np.inf, weights[None, :]), axis=1)
        out = np.zeros_like(w)
        out[np.arange(k), best] = 1.0
        return out
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def simulate(
    config: SimulationConfig,
    arms: Mapping[str, ArmClient],
    response: ResponseModel,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationLog:
    """Run the pre-period and the experiment; see the module docstring. ``progress(day, impressions)``."""
    if set(arms) != set(config.arms):
        raise ValueError(f"arms: got clients for {sorted(arms)}, the config names {sorted(config.arms)}")
    population = np.asarray(response.population(), dtype=np.int64)
    if config.users_per_day > population.size:
        raise ValueError(
            f"users_per_day ({config.users_per_day}) exceeds the world's population ({population.size} users)"
        )
    rng = np.random.default_rng(config.seed)
    design = config.design()
    assigned = dict(
        zip(
            population.tolist(),
            assign_arm(population, list(design), list(design.values()), salt=config.salt).tolist(),
            strict=True,
        )
    )
    control = config.control_arm
    histories: dict[int, tuple[list[int], list[int]]] = {}
    busy_until: dict[int, int] = {}
    hour_p = np.asarray(config.diurnal_weights, dtype=np.float64)
    hour_p /= hour_p.sum()
    exp_start = response.start_ts() + config.pre_period_days * DAY_S
    imp, arr, ope = _Recorder(), _Recorder(), _Recorder()
    reward_model: ItemPositionCTR | None = None
    n_impressions = 0
    options = RecommendOptions(exclude_seen=config.exclude_seen)

    def history_of(user: int) -> tuple[list[int], list[int]]:
        if user not in histories:
            items, ts = response.initial_history(user)
            histories[user] = (items.tolist(), ts.tolist())
        return histories[user]

    def request(user: int, ts: int, k: int) -> RecommendRequest:
        items, times = history_of(user)
        n = config.history_len
        hist = (
            []
            if n == 0
            else [HistoryEvent(item_id=i, ts=t) for i, t in zip(items[-n:], times[-n:], strict=True)]
        )
        return RecommendRequest(user_id=user, history=hist, ts=ts, k=k, options=options)

    for day in range(-config.pre_period_days, config.days):
        period = PRE if day < 0 else EXPERIMENT
        if day == 0 and config.pre_period_days and config.ope_share > 0 and n_impressions:
            reward_model = ItemPositionCTR.fit(imp.frame(IMPRESSION_SCHEMA))  # the pre-period: control only
        day_start = exp_start + day * DAY_S
        users = np.sort(rng.choice(population, config.users_per_day, replace=False))
        hours = rng.choice(24, size=users.size, p=hour_p)
        ts = day_start + hours * 3600 + rng.integers(0, 3600, users.size)
        ts = np.maximum(ts, [busy_until.get(u, -(10**12)) + config.min_session_gap_s for u in users.tolist()])
        arm_of = np.array([control if period == PRE else assigned[u] for u in users.tolist()], dtype=object)
        requests_made = np.zeros(users.size, dtype=np.int32)
        active = np.ones(users.size, dtype=bool)
        arr_ts = ts.copy()
        for step in range(config.session_length):
            idx_all = np.flatnonzero(active)
            if idx_all.size == 0:
                break
            for arm_name in config.arms:
                idx = idx_all[arm_of[idx_all] == arm_name]
                if idx.size == 0:
                    continue
                u_arm, ts_arm = users[idx], ts[idx]
                reqs = [request(int(u), int(t), config.k) for u, t in zip(u_arm, ts_arm, strict=True)]
                responses = arms[arm_name].recommend_many(reqs)
                items, valid, prop, score, req_ids, sources = _slates(responses, config.k)
                rescored = []
                if period == EXPERIMENT and arm_name == control and config.ope_share > 0:
                    pick = np.flatnonzero((rng.random(idx.size) < config.ope_share) & valid.any(axis=1))
                    rescored = [
                        _off_policy_rows(
                            arms[target], target, response, reward_model, reqs, pick, items, valid, prop,
                            req_ids, day,
                        )
                        for target in config.treatments
                    ]  # fmt: skip
                out = response.respond(u_arm, items, valid, ts_arm, rng)
                for rows in rescored:  # outcomes of the logged slots, now that the user responded
                    if rows:
                        at = (rows.pop("_row"), rows["position"])
                        ope.add(**rows, click=out.click[at], p_click=out.p_click[at])
                response.update(u_arm, items, out.click, out.click_ts, ts_arm)
                r, p = np.nonzero(valid)
                n_impressions += r.size
                imp.add(
                    request_id=req_ids[r],
                    user_id=u_arm[r],
                    item_id=items[r, p],
                    ts=ts_arm[r],
                    position=p,
                    propensity=prop[r, p],
                    click=out.click[r, p],
                    like=out.like[r, p],
                    dwell=out.dwell[r, p],
                    p_click=out.p_click[r, p],
                    arm=np.full(r.size, arm_name, dtype=object),
                    period=np.full(r.size, period, dtype=object),
                    day=np.full(r.size, day),
                    step=np.full(r.size, step),
                    score=score[r, p],
                    source=sources[r],
                )
                for row, user in enumerate(u_arm.tolist()):
                    hit = np.flatnonzero(out.click[row])
                    if hit.size:
                        h_items, h_ts = history_of(user)
                        h_items.extend(items[row, hit].tolist())
                        h_ts.extend(out.click_ts[row, hit].tolist())
                    busy_until[user] = int(out.end_ts[row])
                requests_made[idx] += 1
                gap = 1 + np.floor(rng.exponential(config.request_gap_mean_s, idx.size)).astype(np.int64)
                ts[idx] = out.end_ts + gap
                active[idx] &= ~out.leave & valid.any(axis=1)
        arr.add(
            user_id=users,
            day=np.full(users.size, day),
            period=np.full(users.size, period, dtype=object),
            arm=arm_of,
            arrival_ts=arr_ts,
            requests=requests_made,
        )
        if progress is not None:
            progress(day, n_impressions)
    return SimulationLog(
        config=config,
        impressions=imp.frame(IMPRESSION_SCHEMA).with_columns(pl.col("dwell").fill_nan(None)),
        arrivals=arr.frame(ARRIVAL_SCHEMA),
        off_policy=ope.frame(OPE_SCHEMA),
        start_ts=exp_start,
        response_name=response.name,
        is_truth=response.is_truth,
        arm_names={a: getattr(c, "name", a) for a, c in arms.items()},
    )


def _off_policy_rows(
    target: ArmClient,
    target_name: str,
    response: ResponseModel,
    reward_model: ItemPositionCTR | None,
    requests: list[RecommendRequest],
    pick: np.ndarray,
    items: np.ndarray,
    valid: np.ndarray,
    prop: np.ndarray,
    req_ids: np.ndarray,
    day: int,
) -> dict[str, np.ndarray]:
    """Re-score the picked control requests with ``target``'s whole pool, before the user responds (the
    same context the logger saw). Returns the off-policy columns (but the outcomes) and ``_row``, the
    batch row of each logged slot."""
    if pick.size == 0:
        return {}
    k_pool = min(target.pool_size, getattr(target, "max_k", target.pool_size))
    pools = target.recommend_many([requests[i].model_copy(update={"k": k_pool}) for i in pick.tolist()])
    greedy = target.policy_temperature == 0
    rows = _Recorder()
    for row, resp in zip(pick.tolist(), pools, strict=True):
        n = int(valid[row].sum())
        logged = items[row, :n]
        user = int(requests[row].user_id)  # type: ignore[arg-type]
        if resp.items:
            pool = np.array([it.item_id for it in resp.items], dtype=np.int64)
            s = np.array([it.score for it in resp.items], dtype=np.float64)
            w = s if greedy else np.exp((s - s.max()) / target.policy_temperature)
            cond = _conditional(w, pool, logged, greedy)  # [n, P]
            logits = response.click_logits(np.array([user]), pool[None, :], np.array([requests[row].ts]))[0]
            true_value = (cond * sigmoid(logits)[None, :]).sum(axis=1) * response.examine(np.arange(n))
            target_prop = (cond * (pool[None, :] == logged[:, None])).sum(axis=1)
            if reward_model is not None:
                grid = np.broadcast_to(np.arange(n)[:, None], (n, pool.size))
                v_hat = (cond * reward_model.predict(np.broadcast_to(pool, (n, pool.size)), grid)).sum(axis=1)
            else:
                v_hat = np.full(n, np.nan)
        else:  # the target serves nothing here: it takes no decision, and its value is 0
            target_prop, true_value, v_hat = np.zeros(n), np.zeros(n), np.zeros(n)
        q_hat = reward_model.predict(logged, np.arange(n)) if reward_model is not None else np.full(n, np.nan)
        rows.add(
            _row=np.full(n, row),
            policy=np.full(n, target_name, dtype=object),
            request_id=np.full(n, req_ids[row]),
            user_id=np.full(n, user),
            day=np.full(n, day),
            position=np.arange(n),
            item_id=logged,
            propensity=prop[row, :n],
            target_propensity=target_prop,
            true_value=true_value,
            q_hat=q_hat,
            v_hat=v_hat,
        )
    return {name: np.concatenate(parts) for name, parts in rows.cols.items()}
