"""Generate a synthetic dataset with known ground truth: users, items, impressions and the click log.

How: users are simulated in chunks of consecutive ids. Within a chunk every user advances one request (one
slate) per step, all users at once in numpy; users are sorted by their number of requests so that the
active ones are always a prefix. Each request: the logging policy draws a candidate pool by exposure
popularity (released items only), scores it with a noisy version of the true logit plus popularity, and
draws a k-item slate by Plackett-Luce (``synthetic.policy``); the user examines position k with probability
``examine(k)`` and clicks with the true probability; a click may be liked and has a dwell; the state
(short-term interest, creator loyalty) is then updated. Every random number is a hash of (seed, user, step,
stream, slot) (``synthetic.rng``), so the data do not depend on the chunk size or the number of processes.

Files under ``out_dir`` (Parquet, each written to a temp file and renamed): ``items.parquet``,
``users/part-*.parquet``, ``events/part-*.parquet``, ``impressions/part-*.parquet``; ``manifest.json`` is
written LAST, so a directory without it is an incomplete run (``read_manifest`` refuses it).

Ordering: users in id order; within a user, requests in time order and a slate's items by position;
``events.src_row`` and ``impressions.request_id`` are global 0-based counters in that order.
``impressions.p_click`` is the true P(click | shown at that position) (examination included);
``p_click_unbiased`` is the position-free sigmoid(logit); ``p_click_last100`` is p_click of the last-100
predictor (the true model with the history-dependent state rebuilt from only the user's last ``LAST_WINDOW``
clicks; files only, not loaded into the warehouse). ``dwell`` is NULL when there was no click. The manifest
gives the AUC of p_click (oracle) and of p_click_last100 over all logged impressions and over the test
impressions (ts from the ``TEST_QUANTILE`` quantile on), and the share of the achievable lift that needs more
than the last 100 clicks.

OPEN choices, and what was picked:

- Ids: ``user_id`` and ``item_id`` are dense 0-based integers (item ids are a seeded shuffle of the
  popularity ranks, so an id says nothing about popularity).
- Propensity: the Plackett-Luce probability of the item at its position given the pool and the items above
  it (``recsys.synthetic.policy``); position 0's propensities over the pool sum to 1.
- Clicks within one slate are independent given examination (no cascade). A click's event time is the
  request time + 1 s + the dwell of the slate's earlier clicks; the user's state is updated after the
  slate, so "events strictly before the impression's ts" is exactly the history the true model used.
- Time: requests per user are log-normal around the configured mean; they are split into sessions uniformly
  at random; session starts are sorted uniforms over the horizon, warped to the diurnal profile; requests
  within a session follow the previous one's last event by 1 s + an exponential gap.
- ``policy.impression_log_rate < 1`` logs whole requests at random; ``events`` is always the full click log.
- ``max_events``: users are kept in id order up to the one holding the last kept click; that user's
  impressions stop before the request of the first dropped click.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from recsys.core.atomic import atomic_path
from recsys.core.config import FrozenModel
from recsys.synthetic import rng
from recsys.synthetic.click_model import DAY_S, AliasSampler, ClickModel, UserState, sigmoid
from recsys.synthetic.config import GENERATOR_VERSION, SyntheticConfig
from recsys.synthetic.policy import plackett_luce_slate

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TABLES = ("users", "items", "impressions", "events")

# Per-step random streams (synthetic.rng), one hash call each: _S_STEP = (new session?, session start,
# gap, logged?) per user; _S_POLICY = (score noise, Plackett-Luce Gumbel) per pool slot; _S_RESPONSE =
# (click, like, dwell Box-Muller pair) per slate slot. Static per-user draws: step -1, streams 8.. (0..3 are
# the click model's).
_S_STEP, _S_POOL, _S_BACK, _S_POLICY, _S_RESPONSE, _S_RESURFACE = 0, 1, 2, 3, 4, 5
_S_N_REQUESTS, _S_N_SESSIONS = 8, 9

_AUC_BINS = 1 << 20

#: The window of the "last events" predictor: clicks a model that reads only the latest ones would see.
LAST_WINDOW = 100
#: The test impressions of the manifest's figures: ts at or after this quantile of the logged impressions'
#: ts, the test cut of the ranking split with the default ``FeatureConfig.split_quantiles``.
TEST_QUANTILE = 0.9
#: Above this many logged impressions the test figures (which read back ts and probabilities) are skipped.
_TEST_FIGURES_MAX = 50_000_000


class SyntheticManifest(FrozenModel):
    """What a generator run wrote. Files are relative to ``root`` (the output directory)."""

    data_version: str = Field(description="config.data_version(): the content version of these files.")
    generator_version: str
    config: SyntheticConfig
    files: dict[str, list[str]] = Field(
        description="Table -> Parquet files, relative to the output directory."
    )
    counts: dict[str, int] = Field(description="Rows per table, plus 'requests' (simulated, logged or not).")
    truncated: bool = Field(description="True when max_events cut the last user's history.")
    click_rate: float | None = Field(description="Clicks per logged impression (None if none were logged).")
    mean_p_click: float | None = Field(description="Mean true p_click over logged impressions.")
    oracle_auc: float | None = Field(
        description="AUC of p_click (the true probabilities) for the logged impressions' clicks."
    )
    last100_auc: float | None = Field(
        None,
        description="AUC of p_click_last100: the true model with the user's state rebuilt from only the "
        "last 100 clicks (the best a model reading the last 100 events can do, up to the static profile).",
    )
    test_start_ts: int | None = Field(None, description="The test cut: the 0.9 quantile of impression ts.")
    test_oracle_auc: float | None = Field(
        None, description="oracle_auc on the impressions from test_start_ts."
    )
    test_last100_auc: float | None = Field(
        None, description="last100_auc on the impressions from test_start_ts."
    )
    test_position_auc: float | None = Field(
        None,
        description="AUC of the slot position alone (top first) on the test impressions: how much of the "
        "click signal the logging policy's ranking hands to any model that sees the position.",
    )
    long_range_share: float | None = Field(
        None,
        description="Share of the achievable AUC lift over 0.5 that needs more than the last 100 clicks, on "
        "the test impressions: (test_oracle_auc - test_last100_auc) / (test_oracle_auc - 0.5).",
    )
    root: Path | None = Field(None, exclude=True, description="The directory the files are in (not stored).")

    def paths(self, table: str) -> list[Path]:
        if table not in self.files:
            raise KeyError(f"manifest has no table {table!r}; it has {sorted(self.files)}")
        if self.root is None:
            raise ValueError("manifest has no root directory; load it with read_manifest(out_dir)")
        return [self.root / f for f in self.files[table]]


def read_manifest(out_dir: str | Path) -> SyntheticManifest:
    """The manifest of a complete run in ``out_dir``; an error if the run is missing or was interrupted."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: {out_dir} holds no complete synthetic run (never run or interrupted)"
        )
    manifest = SyntheticManifest.model_validate_json(path.read_text())
    return manifest.model_copy(update={"root": out_dir.resolve()})


# -- simulation of one chunk of users ------------------------------------------------------------------
@dataclass
class ChunkResult:
    """One chunk's rows in user-major order (numpy columns), before global counters are assigned."""

    users: dict[str, np.ndarray]
    events: dict[str, np.ndarray]  # user_id, item_id, ts, value, request (user's request index j)
    impressions: dict[str, np.ndarray]  # request_local, user_id, item_id, ts, position, ..., request
    n_requests: np.ndarray  # [users] requests per user, in user-id order


def plan_users(model: ClickModel, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Requests and sessions per user (log-normal around the configured means)."""
    s = model.config.sessions
    z = rng.normal(keys, -1, _S_N_REQUESTS, 1)[:, 0]
    sig = s.requests_per_user_sigma
    n_req = np.maximum(1, np.rint(s.requests_per_user_mean * np.exp(sig * z - 0.5 * sig * sig))).astype(
        np.int64
    )
    z2 = rng.normal(keys, -1, _S_N_SESSIONS, 1)[:, 0]
    n_sess = np.rint(n_req / s.requests_per_session_mean * np.exp(0.4 * z2 - 0.08))
    return n_req, np.clip(n_sess, 1, n_req).astype(np.int64)


class _Timeline:
    """Maps a uniform position in the horizon to a timestamp with the configured diurnal pattern."""

    def __init__(self, model: ClickModel) -> None:
        s = model.config.sessions
        w = np.asarray(s.diurnal_weights, dtype=np.float64)
        self.cdf = np.r_[0.0, np.cumsum(w) / w.sum()]
        self.grid = np.linspace(0.0, 1.0, 25)
        self.start = s.start_ts
        self.span = s.horizon_days * DAY_S

    def warp(self, frac: np.ndarray) -> np.ndarray:
        """Monotone: a uniform position in [0, 1] -> unix seconds, denser in busy hours."""
        x = self.start + frac * self.span
        day = np.floor(x / DAY_S)
        within = np.interp((x - day * DAY_S) / DAY_S, self.cdf, self.grid)
        return np.floor(day * DAY_S + within * DAY_S).astype(np.int64)


class ChunkSimulator:
    """Simulates users [lo, hi) of a config's world; reusable across chunks (one per process)."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.model = ClickModel(config)
        # Everything below works on items by popularity rank (see ClickModel.logit_ranks).
        pop_r = self.model.catalogue.popularity[self.model.id_of_rank]
        self.pool_sampler = AliasSampler(pop_r)
        back = np.flatnonzero(self.model.release_r <= config.sessions.start_ts)
        self.back_sampler = AliasSampler(pop_r[back], values=back)
        self.log_pop_r = np.log(pop_r)
        self.timeline = _Timeline(self.model)
        # Items of each creator (by rank), for resurfacing a dormant creator: CSR over creators.
        by_creator = np.argsort(self.model.creator_r, kind="stable")
        self.creator_items = by_creator
        self.creator_start = np.searchsorted(
            self.model.creator_r[by_creator], np.arange(config.catalogue.n_creators + 1)
        )

    def _resurface(
        self,
        pool: np.ndarray,
        keys: np.ndarray,
        step: int,
        n_clicks: np.ndarray,
        hist_rank: np.ndarray,
        ts: np.ndarray,
    ) -> None:
        """Replace pool slots (in place) by items of dormant creators: for each slot drawn with probability
        ``resurface_share``, a click at least ``resurface_min_age`` clicks back is picked uniformly; unless
        its creator was clicked again within the last ``resurface_min_age`` clicks, the slot gets an item of
        its creator, popular ones more likely (the clicked item itself when the drawn one is not
        released yet)."""
        pol = self.config.policy
        model = self.model
        c = pool.shape[1]
        old = n_clicks - pol.resurface_min_age  # clicks [0, old) are old enough
        u = rng.uniform(keys, step, _S_RESURFACE, 3 * c)
        rows, slots = np.nonzero((u[:, :c] < pol.resurface_share) & (old > 0)[:, None])
        if not rows.size:
            return
        pick = np.minimum((u[rows, c + slots] * old[rows]).astype(np.int64), old[rows] - 1)
        clicked = hist_rank[rows, pick].astype(np.int64)
        creator = model.creator_r[clicked]
        lo, hi = self.creator_start[creator], self.creator_start[creator + 1]
        # Skewed to the creator's popular items (its items are stored by popularity rank): u^2.
        size = hi - lo
        offset = np.minimum((u[rows, 2 * c + slots] ** 2 * size).astype(np.int64), size - 1)
        item = self.creator_items[lo + offset]
        item = np.where(model.release_r[item] <= ts[rows], item, clicked)
        # Dormant only: a creator the user clicked within the last resurface_min_age clicks is not resurfaced
        # (the slot keeps its popularity draw), so the interest really returns after a long gap.
        recent = n_clicks[rows, None] - 1 - np.arange(pol.resurface_min_age)[None, :]
        recent_creators = model.creator_r[hist_rank[rows[:, None], np.maximum(recent, 0)]]
        dormant = ~((recent_creators == creator[:, None]) & (recent >= 0)).any(axis=1)
        pool[rows[dormant], slots[dormant]] = item[dormant]

    def _last_window_logit(
        self,
        state: UserState,
        rows: np.ndarray,
        ranks: np.ndarray,
        z: np.ndarray,
        ts: np.ndarray,
        hist_rank: np.ndarray,
        hist_ts: np.ndarray,
    ) -> np.ndarray:
        """The logits ``z`` of items ``ranks`` shown to users ``rows`` with the history-dependent terms
        (creator loyalty, dormant interest, short-term interest) recomputed from only the user's last
        LAST_WINDOW clicks: what the true model says with the older clicks forgotten."""
        model, cm = self.model, self.config.click
        out = z.copy()
        n = state.n_clicks[rows]
        cut = n > LAST_WINDOW
        if not cut.any():
            return out
        rows, ranks, n, idx = rows[cut], ranks[cut], n[cut], np.flatnonzero(cut)
        t = ts[rows]
        window = n[:, None] - LAST_WINDOW + np.arange(LAST_WINDOW)[None, :]
        w_rank = hist_rank[rows[:, None], window]
        creator = model.creator_r[ranks]
        match = model.creator_r[w_rank] == creator[:, None]  # [m, W]: the window's clicks on the creator
        in_window = match.any(axis=1)
        if cm.loyalty:
            loyal_full = state.loyal[rows, creator].astype(np.float64)
            out[idx] += cm.loyalty * (in_window - loyal_full)
        if cm.dormant:
            last = state.last_click[rows, creator].astype(np.int64)
            dormant_full = (last > 0) & (n - last >= cm.dormant_after)
            # Clicks after the window's latest click on the creator; a creator not in the window looks new.
            since = np.argmax(match[:, ::-1], axis=1)
            dormant_win = in_window & (since >= cm.dormant_after)
            out[idx] += cm.dormant * (dormant_win.astype(np.float64) - dormant_full)
        # Short-term: only when the newest dropped click still counts (within 30 time constants).
        dropped_ts = hist_ts[rows, n - LAST_WINDOW - 1]
        recent = (t - dropped_ts) < 30.0 * cm.short_tau_s
        if cm.short and recent.any():
            r, i = rows[recent], idx[recent]
            cat = model.category_r[ranks[recent]]
            decay = np.exp((state.short_ts[r] - t[recent]) / cm.short_tau_s)
            full = state.short[r, cat] * decay
            w = np.exp((hist_ts[r[:, None], window[recent]] - t[recent][:, None]) / cm.short_tau_s)
            win = (w * (model.category_r[w_rank[recent]] == cat[:, None])).sum(axis=1)
            out[i] += cm.short * (np.log1p(win) - np.log1p(full))
        return out

    def run(self, lo: int, hi: int) -> ChunkResult:
        cfg, model = self.config, self.model
        s, pol, resp = cfg.sessions, cfg.policy, cfg.response
        k, c = s.slate_size, s.pool_size
        ids_by_id = np.arange(lo, hi, dtype=np.int64)
        keys_by_id = rng.user_keys(cfg.seed, ids_by_id)
        n_req_by_id, n_sess_by_id = plan_users(model, keys_by_id)
        # Users with more requests first: the users still active at step j are then a prefix.
        order = np.argsort(-n_req_by_id, kind="stable")
        ids, keys, n_req, n_sess = (
            ids_by_id[order],
            keys_by_id[order],
            n_req_by_id[order],
            n_sess_by_id[order],
        )
        state = model.initial_state(ids)
        n_users = ids.size
        sessions_left = n_sess.copy()  # sessions not started yet
        frac = np.zeros(n_users)  # position of the last session start in the horizon (order statistics)
        busy_until = np.zeros(n_users, dtype=np.int64)  # last event time
        examine = model.examine(np.arange(k))
        # Every click of the chunk's users, in order (item rank, ts): resurfacing draws dormant creators from
        # it, and the last-100 predictor reads its last LAST_WINDOW entries. Grown on demand.
        track = pol.resurface_share > 0 or pol.impression_log_rate > 0
        hist_rank = np.zeros((n_users, 64 if track else 0), dtype=np.int32)
        hist_ts = np.zeros((n_users, 64 if track else 0), dtype=np.int64)
        n_active = np.searchsorted(-n_req, -np.arange(int(n_req.max()) + 1), side="left")
        ev: dict[str, list[np.ndarray]] = {f: [] for f in ("row", "item_id", "ts", "value", "request")}
        im: dict[str, list[np.ndarray]] = {
            f: []
            for f in ("row", "request", "item_id", "ts", "position", "propensity", "click", "like", "dwell",
                      "p_click", "p_click_unbiased", "p_click_last100")
        }  # fmt: skip
        for j in range(int(n_req.max())):
            n = int(n_active[j])
            kj, st = keys[:n], state.head(n)
            # -- when: a new session starts, or the next request follows the last event after a short gap
            left = sessions_left[:n]
            u_step = rng.uniform(kj, j, _S_STEP, 4)
            # A uniformly random split of the user's requests into sessions: the gap before request j is a
            # session break with probability (breaks left) / (gaps left).
            new = u_step[:, 0] * (n_req[:n] - j) < left if j else np.ones(n, dtype=bool)
            # Session starts are the sorted uniforms of the horizon, drawn in order.
            next_frac = 1.0 - (1.0 - frac[:n]) * u_step[:, 1] ** (1.0 / np.maximum(left, 1))
            gap = 1 + np.floor(-np.log(u_step[:, 2]) * s.request_gap_mean_s).astype(np.int64)
            session_ts = self.timeline.warp(next_frac)
            if j > 0:
                session_ts = np.maximum(session_ts, busy_until[:n] + s.min_session_gap_s)
            ts = np.where(new, session_ts, busy_until[:n] + gap)
            frac[:n] = np.where(new, next_frac, frac[:n])
            sessions_left[:n] -= new
            # -- candidate pool: popularity draws, unreleased items redrawn from the back catalogue
            pool = self.pool_sampler.sample(rng.uniform(kj, j, _S_POOL, c))
            unreleased = model.release_r[pool] > ts[:, None]
            rows, slots = np.nonzero(unreleased)
            if rows.size:
                pool[rows, slots] = self.back_sampler.sample(rng.uniform_at(kj[rows], j, _S_BACK, slots))
            if pol.resurface_share > 0:
                self._resurface(pool, kj, j, st.n_clicks, hist_rank, ts)
            pool.sort(axis=1)
            # -- logging policy: Plackett-Luce over a noisy score, duplicates of the pool excluded
            z_pool = model.logit_ranks(st, pool, ts)
            u_pol = rng.uniform(kj, j, _S_POLICY, 2 * c)
            score = pol.logit_weight * z_pool + pol.popularity_weight * self.log_pop_r[pool]
            if pol.noise_std > 0:  # logistic noise scaled to the configured std (cheaper than Gaussian)
                noise = u_pol[:, :c] / (1.0 - u_pol[:, :c])
                score += (pol.noise_std * np.sqrt(3.0) / np.pi) * np.log(noise)
            score /= pol.temperature
            score[:, 1:][pool[:, 1:] == pool[:, :-1]] = -np.inf
            gumbel = -np.log(-np.log(u_pol[:, c:]))
            picks, propensity, valid = plackett_luce_slate(score, k, gumbel)
            flat = picks + (np.arange(n, dtype=np.int64) * c)[:, None]
            shown, z = pool.ravel()[flat], z_pool.ravel()[flat]
            # -- responses
            u_resp = rng.uniform(kj, j, _S_RESPONSE, 4 * k)
            p_unbiased = sigmoid(z)
            p_click = p_unbiased * examine
            click = (u_resp[:, :k] < p_click) & valid
            like = click & (u_resp[:, k : 2 * k] < model.like_probability(z))
            radius = np.sqrt(-2.0 * np.log(u_resp[:, 2 * k : 3 * k]))
            normal = radius * np.cos(2.0 * np.pi * u_resp[:, 3 * k :])  # Box-Muller
            dwell = np.exp(resp.dwell_log_mean + resp.dwell_slope * z + resp.dwell_log_sd * normal)
            dwell = np.clip(dwell, 1.0, resp.dwell_max_s)
            spent = np.where(click, np.ceil(dwell), 0).astype(np.int64)
            click_ts = ts[:, None] + 1 + np.cumsum(spent, axis=1) - spent
            busy_until[:n] = ts + 1 + spent.sum(axis=1)
            logged = np.zeros((n, k), dtype=bool)
            if pol.impression_log_rate > 0:
                logged = (
                    valid
                    if pol.impression_log_rate >= 1
                    else (valid & (u_step[:, 3:4] < pol.impression_log_rate))
                )
                r, p = np.nonzero(logged)
                # Before the update: the state that produced z.
                p_last = sigmoid(self._last_window_logit(st, r, shown[r, p], z[r, p], ts, hist_rank, hist_ts))
                p_last *= examine[p]
            if track:
                rows, cols = np.nonzero(click)
                if rows.size:
                    need = int(st.n_clicks.max()) + k
                    if need > hist_rank.shape[1]:
                        grow = max(need, 2 * hist_rank.shape[1]) - hist_rank.shape[1]
                        hist_rank = np.pad(hist_rank, ((0, 0), (0, grow)))
                        hist_ts = np.pad(hist_ts, ((0, 0), (0, grow)))
                    first = np.searchsorted(rows, rows)  # rows are sorted: index of each row's first click
                    slot = st.n_clicks[rows] + np.arange(rows.size) - first
                    hist_rank[rows, slot] = shown[rows, cols]
                    hist_ts[rows, slot] = click_ts[rows, cols]
            model.update_ranks(st, shown, click, click_ts, ts)
            shown = model.id_of_rank[shown]
            # -- record
            r, p = np.nonzero(click)
            if r.size:
                ev["row"].append(r)
                ev["item_id"].append(shown[r, p])
                ev["ts"].append(click_ts[r, p])
                ev["value"].append(dwell[r, p])
                ev["request"].append(np.full(r.size, j, dtype=np.int64))
            if pol.impression_log_rate > 0:
                r, p = np.nonzero(logged)
                if r.size:
                    im["row"].append(r)
                    im["request"].append(np.full(r.size, j, dtype=np.int64))
                    im["item_id"].append(shown[r, p])
                    im["ts"].append(ts[r])
                    im["position"].append(p.astype(np.int32))
                    im["propensity"].append(propensity[r, p])
                    im["click"].append(click[r, p])
                    im["like"].append(like[r, p])
                    im["dwell"].append(np.where(click[r, p], dwell[r, p], np.nan))
                    im["p_click"].append(p_click[r, p])
                    im["p_click_unbiased"].append(p_unbiased[r, p])
                    im["p_click_last100"].append(p_last)
        # -- back to user-id order; a stable sort keeps each user's rows in time order
        profile = np.empty_like(state.profile)
        profile[order] = state.profile
        return ChunkResult(
            users={"user_id": ids_by_id, "profile": profile},
            events=_user_major(ev, ids),
            impressions=_user_major(im, ids),
            n_requests=n_req_by_id,
        )


def _user_major(cols: dict[str, list[np.ndarray]], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Concatenate step-major rows and sort them stably by user id (rows of one user stay in step order)."""
    out = {f: (np.concatenate(v) if v else np.zeros(0)) for f, v in cols.items()}
    row = out.pop("row").astype(np.int64)
    user = ids[row]
    perm = np.argsort(user, kind="stable")
    out = {f: v[perm] for f, v in out.items()}
    out["user_id"] = user[perm]
    return out


# -- the run: chunks in id order, global counters, Parquet parts, manifest last -----------------------
_WORKER: ChunkSimulator | None = None


def _init_worker(config_json: str) -> None:
    global _WORKER
    _WORKER = ChunkSimulator(SyntheticConfig.model_validate_json(config_json))


def _run_chunk(lo: int, hi: int) -> ChunkResult:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.run(lo, hi)


def default_chunk_users(config: SyntheticConfig) -> int:
    """Users per chunk so that a chunk's rows, state and per-step arrays stay within a few hundred MB."""
    s = config.sessions
    per_user = s.requests_per_user_mean * s.slate_size
    limits = (
        2_000_000 / (0.25 * per_user),  # click events held per chunk (a generous click rate)
        3_000_000 / max(per_user * config.policy.impression_log_rate, 1.0),  # impressions held per chunk
        200e6 / config.catalogue.n_creators,  # bytes of the loyalty matrix
        400_000 / s.pool_size,  # elements of each per-step [users, pool] array
    )
    return int(min(max(min(limits), 64), 16_384))


def _chunk_results(
    sim: ChunkSimulator,
    ranges: list[tuple[int, int]],
    workers: int,
    chunks_needed: Callable[[], float],
) -> Iterator[ChunkResult]:
    """Chunk results in id order; with workers > 1 computed ahead by a bounded window of processes.

    ``chunks_needed()`` estimates how many more chunks the run still needs (``inf`` when unknown), so that a
    run with ``max_events`` does not simulate several chunks ahead only to throw them away.
    """
    if workers <= 1:
        for lo, hi in ranges:
            yield sim.run(lo, hi)
        return
    ctx = multiprocessing.get_context("spawn")  # fork after pyarrow/duckdb threads exist is not safe
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(sim.config.model_dump_json(),)
    ) as pool:
        todo = iter(ranges)
        pending: list[Future[ChunkResult]] = []
        try:
            while True:
                needed = chunks_needed()
                window = 2 * workers if np.isinf(needed) else min(2 * workers, int(np.ceil(needed)) + 1)
                while len(pending) < max(window, 1) and (nxt := next(todo, None)) is not None:
                    pending.append(pool.submit(_run_chunk, *nxt))
                if not pending:
                    return
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()


def _dict_column(indices: np.ndarray, vocab: list[str] | np.ndarray) -> pa.DictionaryArray:
    """A string column stored dictionary-encoded (read back as plain strings: files carry no Arrow schema)."""
    return pa.DictionaryArray.from_arrays(
        pa.array(indices.astype(np.int32)), pa.array(list(vocab), pa.string())
    )


def _write(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=1, store_schema=False)


class _AucHistogram:
    """Streaming AUC of p_click: clicks and non-clicks counted in 2^20 bins of the probability."""

    def __init__(self) -> None:
        self.pos = np.zeros(_AUC_BINS, dtype=np.int64)
        self.neg = np.zeros(_AUC_BINS, dtype=np.int64)
        self.p_sum = 0.0

    def add(self, p: np.ndarray, y: np.ndarray) -> None:
        b = np.minimum((np.clip(p, 0.0, 1.0) * _AUC_BINS).astype(np.int64), _AUC_BINS - 1)
        self.pos += np.bincount(b[y], minlength=_AUC_BINS)
        self.neg += np.bincount(b[~y], minlength=_AUC_BINS)
        self.p_sum += float(p.sum())

    def result(self) -> tuple[float | None, float | None, float | None]:
        """(AUC, click rate, mean p) or Nones when nothing was logged."""
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        n = n_pos + n_neg
        if n == 0:
            return None, None, None
        rate, mean_p = n_pos / n, self.p_sum / n
        if n_pos == 0 or n_neg == 0:
            return None, rate, mean_p
        neg_below = np.cumsum(self.neg) - self.neg
        auc = float(((neg_below + 0.5 * self.neg) * self.pos).sum() / (n_pos * n_neg))
        return auc, rate, mean_p


def _test_figures(out_dir: Path, files: list[str]) -> dict[str, float | int | None]:
    """Oracle, last-100 and position-only AUC on the test impressions (ts >= the TEST_QUANTILE quantile)."""
    table = pa.concat_tables(
        pq.read_table(out_dir / f, columns=["ts", "position", "click", "p_click", "p_click_last100"])
        for f in files
    )
    ts = table["ts"].to_numpy()
    start = int(np.quantile(ts, TEST_QUANTILE, method="lower"))
    keep = ts >= start
    y = table["click"].to_numpy(zero_copy_only=False)[keep]
    if y.all() or not y.any():
        return {"test_start_ts": start}
    oracle = auc(y, table["p_click"].to_numpy()[keep])
    last = auc(y, table["p_click_last100"].to_numpy()[keep])
    share = (oracle - last) / (oracle - 0.5) if oracle > 0.5 else None
    position = auc(y, -table["position"].to_numpy()[keep].astype(np.float64))
    return {
        "test_start_ts": start,
        "test_oracle_auc": oracle,
        "test_last100_auc": last,
        "test_position_auc": position,
        "long_range_share": share,
    }


def _clear(out_dir: Path) -> None:
    """Remove a previous run's files (only the generator's own names) so no stale part survives."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    (out_dir / "items.parquet").unlink(missing_ok=True)
    for table in ("users", "events", "impressions"):
        if (out_dir / table).is_dir():
            shutil.rmtree(out_dir / table)


def generate(
    config: SyntheticConfig,
    out_dir: str | Path,
    *,
    chunk_users: int | None = None,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticManifest:
    """Generate the dataset of ``config`` into ``out_dir`` and return its manifest (written last).

    ``chunk_users`` (default: ``default_chunk_users``) bounds memory; ``workers`` > 1 simulates chunks in that
    many processes. Neither changes the data. ``progress(users_done, events_done)`` is called per chunk.
    """
    if chunk_users is not None and chunk_users < 1:
        raise ValueError(f"chunk_users must be >= 1, got {chunk_users}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)
    sim = ChunkSimulator(config)
    model = sim.model
    u = config.users
    files: dict[str, list[str]] = {t: [] for t in TABLES}
    counts = dict.fromkeys((*TABLES, "requests"), 0)

    cat = model.catalogue
    n_items = cat.n_items
    items = pa.table(
        {
            "item_id": pa.array(np.arange(n_items, dtype=np.int64)),
            "category": _dict_column(
                cat.category, [f"cat_{i:02d}" for i in range(config.catalogue.n_categories)]
            ),
            "creator": _dict_column(cat.creator, cat.creator_name(np.arange(config.catalogue.n_creators))),
            "price_band": _dict_column(
                cat.price_band, [f"price_{i}" for i in range(config.catalogue.n_price_bands)]
            ),
            "release_ts": pa.array(cat.release_ts),
        }
    )
    _write(items, out_dir / "items.parquet")
    files["items"].append("items.parquet")
    counts["items"] = n_items

    chunk = chunk_users or default_chunk_users(config)
    ranges = [(lo, min(lo + chunk, u.n_users)) for lo in range(0, u.n_users, chunk)]
    vocab = (u.age_buckets, u.genders, u.regions, u.devices)
    auc = _AucHistogram()
    auc_last = _AucHistogram()
    truncated = False

    def chunks_needed() -> float:
        if config.max_events is None or counts["events"] == 0:
            return float("inf")
        events_per_chunk = counts["events"] / counts["users"] * chunk
        return (config.max_events - counts["events"]) / events_per_chunk

    for part, res in enumerate(_chunk_results(sim, ranges, workers, chunks_needed)):
        ev, im, users = res.events, res.impressions, res.users
        lo = int(users["user_id"][0])
        req_start = np.concatenate([[0], np.cumsum(res.n_requests)[:-1]]) + counts["requests"]
        n_users_kept = users["user_id"].size
        n_requests = int(res.n_requests.sum())
        if config.max_events is not None and counts["events"] + ev["user_id"].size >= config.max_events:
            cut = config.max_events - counts["events"]
            truncated = cut < ev["user_id"].size
            if truncated:
                # Keep users up to the one whose click is the first to go; impressions up to its request.
                u_drop, j_drop = int(ev["user_id"][cut]), int(ev["request"][cut])
                keep_im = (im["user_id"] < u_drop) | ((im["user_id"] == u_drop) & (im["request"] < j_drop))
                im = {f: v[keep_im] for f, v in im.items()}
                ev = {f: v[:cut] for f, v in ev.items()}
                n_users_kept = u_drop - lo + 1
                n_requests = int(res.n_requests[: n_users_kept - 1].sum()) + j_drop
        n_ev, n_im = ev["user_id"].size, im["user_id"].size
        name = f"part-{part:05d}.parquet"
        prof = users["profile"][:n_users_kept]
        _write(
            pa.table(
                {
                    "user_id": pa.array(users["user_id"][:n_users_kept]),
                    **{
                        col: _dict_column(prof[:, i], vocab[i])
                        for i, col in enumerate(("age_bucket", "gender", "region", "device"))
                    },
                }
            ),
            out_dir / "users" / name,
        )
        files["users"].append(f"users/{name}")
        if n_ev:
            _write(
                pa.table(
                    {
                        "user_id": pa.array(ev["user_id"]),
                        "item_id": pa.array(ev["item_id"].astype(np.int64)),
                        "ts": pa.array(ev["ts"].astype(np.int64)),
                        "event": _dict_column(np.zeros(n_ev, dtype=np.int32), ["click"]),
                        "value": pa.array(ev["value"].astype(np.float64)),
                        "src_row": pa.array(
                            np.arange(counts["events"], counts["events"] + n_ev, dtype=np.int64)
                        ),
                    }
                ),
                out_dir / "events" / name,
            )
            files["events"].append(f"events/{name}")
        if n_im:
            click = im["click"].astype(bool)
            dwell = im["dwell"].astype(np.float64)
            _write(
                pa.table(
                    {
                        "request_id": pa.array(req_start[im["user_id"] - lo] + im["request"]),
                        "user_id": pa.array(im["user_id"]),
                        "item_id": pa.array(im["item_id"].astype(np.int64)),
                        "ts": pa.array(im["ts"].astype(np.int64)),
                        "position": pa.array(im["position"].astype(np.int32)),
                        "propensity": pa.array(im["propensity"].astype(np.float64)),
                        "click": pa.array(click),
                        "like": pa.array(im["like"].astype(bool)),
                        "dwell": pa.array(dwell, mask=~click),
                        "p_click": pa.array(im["p_click"].astype(np.float64)),
                        "p_click_unbiased": pa.array(im["p_click_unbiased"].astype(np.float64)),
                        "p_click_last100": pa.array(im["p_click_last100"].astype(np.float64)),
                    }
                ),
                out_dir / "impressions" / name,
            )
            files["impressions"].append(f"impressions/{name}")
            auc.add(im["p_click"], click)
            auc_last.add(im["p_click_last100"], click)
        counts["users"] += n_users_kept
        counts["events"] += n_ev
        counts["impressions"] += n_im
        counts["requests"] += n_requests
        if progress is not None:
            progress(counts["users"], counts["events"])
        if config.max_events is not None and counts["events"] >= config.max_events:
            break
    oracle, rate, mean_p = auc.result()
    test = (
        _test_figures(out_dir, files["impressions"]) if 0 < counts["impressions"] <= _TEST_FIGURES_MAX else {}
    )
    manifest = SyntheticManifest(
        data_version=config.data_version(),
        generator_version=GENERATOR_VERSION,
        config=config,
        files=files,
        counts=counts,
        truncated=truncated,
        click_rate=rate,
        mean_p_click=mean_p,
        oracle_auc=oracle,
        last100_auc=auc_last.result()[0],
        **test,
    )
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(json.loads(manifest.model_dump_json()), indent=2, sort_keys=True) + "\n")
    log.info("synthetic %s: %s", manifest.data_version, counts)
    return manifest.model_copy(update={"root": out_dir.resolve()})


# -- ground-truth metrics ------------------------------------------------------------------------------
def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC with ties counted half (the Mann-Whitney statistic)."""
    from scipy.stats import rankdata

    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both clicks and non-clicks")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def oracle_auc(source: SyntheticManifest | str | Path, score: str = "p_click") -> float:
    """The best achievable AUC on the logged impressions: the true probabilities as scores.

    ``source`` is a manifest or an output directory. ``score="p_click_unbiased"`` ranks by the
    position-free probability instead (what a model that ignores position can reach at best).
    """
    manifest = source if isinstance(source, SyntheticManifest) else read_manifest(source)
    if score not in ("p_click", "p_click_unbiased"):
        raise ValueError(f"score must be 'p_click' or 'p_click_unbiased', got {score!r}")
    paths = manifest.paths("impressions")
    if not paths:
        raise ValueError("this run logged no impressions (policy.impression_log_rate = 0): no oracle AUC")
    table = pa.concat_tables(pq.read_table(p, columns=["click", score]) for p in paths)
    return auc(table["click"].to_numpy(), table[score].to_numpy())
