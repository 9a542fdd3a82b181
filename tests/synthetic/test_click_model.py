from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.synthetic.click_model import DAY_S, HOUR_S, AliasSampler, ClickModel
from recsys.synthetic.config import CatalogueConfig, ClickModelConfig, SyntheticConfig
from recsys.synthetic.generator import SyntheticManifest

SMALL = SyntheticConfig(catalogue=CatalogueConfig(n_items=500, n_creators=50, n_categories=8))


@pytest.fixture(scope="module")
def model() -> ClickModel:
    return ClickModel(SMALL)


def test_examine_is_the_position_bias(model: ClickModel) -> None:
    e = model.examine(np.arange(10))
    assert e[0] == 1.0
    assert np.all(np.diff(e) < 0)
    np.testing.assert_allclose(e, (1.0 + np.arange(10)) ** -SMALL.click.position_eta)
    p = model.probability(
        model.initial_state(np.arange(3)), np.full((3, 2), 7), np.full(3, SMALL.sessions.start_ts)
    )
    p3 = model.probability(
        model.initial_state(np.arange(3)), np.full((3, 2), 7), np.full(3, SMALL.sessions.start_ts), position=3
    )
    np.testing.assert_allclose(p3, p * model.examine(3))
    with pytest.raises(ValueError, match="position"):
        model.examine(-1)


def test_users_are_the_same_whatever_batch_they_are_drawn_in(model: ClickModel) -> None:
    a = model.initial_state(np.arange(100))
    b = model.initial_state(np.array([57, 3, 99]))
    np.testing.assert_array_equal(b.profile, a.profile[[57, 3, 99]])
    np.testing.assert_array_equal(b.taste, a.taste[[57, 3, 99]])
    favourites = (a.taste > 0).sum(axis=1)
    assert favourites.min() >= 1 and favourites.max() < SMALL.catalogue.n_categories  # sparse


def test_taste_prior_depends_on_the_profile(model: ClickModel) -> None:
    state = model.initial_state(np.arange(20_000))
    age = state.profile[:, 0]
    share = np.stack([(state.taste[age == a] > 0).mean(axis=0) for a in range(2)])
    assert np.abs(share[0] - share[1]).max() > 0.1  # age groups favour different categories


def test_loyalty_adds_exactly_l_to_the_logit(model: ClickModel) -> None:
    state = model.initial_state(np.arange(2))
    items = np.array([[11], [11]])
    ts = np.full(2, SMALL.sessions.start_ts + DAY_S)
    before = model.logit(state, items, ts)
    state.loyal[0, model.catalogue.creator[11]] = 1
    after = model.logit(state, items, ts)
    assert after[0, 0] - before[0, 0] == pytest.approx(SMALL.click.loyalty)
    assert after[1, 0] == before[1, 0]


def test_short_term_interest_decays_within_a_session(model: ClickModel) -> None:
    start = SMALL.sessions.start_ts + DAY_S
    cat, creator = model.catalogue.category, model.catalogue.creator
    clicked = 3
    same = int(np.flatnonzero((cat == cat[clicked]) & (creator != creator[clicked]))[0])
    other = int(np.flatnonzero((cat != cat[clicked]) & (creator != creator[clicked]))[0])
    fresh = model.initial_state(np.arange(1))
    state = model.initial_state(np.arange(1))
    model.update(state, np.array([[clicked]]), np.array([[True]]), np.array([[start + 5]]), np.array([start]))
    assert state.n_clicks[0] == 1
    gains = []
    for dt in (60, 600, 1_800, 6 * 3_600):
        ts = np.array([start + dt])
        gains.append(
            (
                model.logit(state, np.array([[same, other]]), ts)
                - model.logit(fresh, np.array([[same, other]]), ts)
            )[0]
        )
    gains = np.array(gains)
    assert np.all(np.diff(gains[:, 0]) < 0)  # same category: the boost fades with time
    assert gains[0, 0] > 0.5 * SMALL.click.short
    assert gains[-1, 0] < 0.01
    np.testing.assert_array_equal(gains[:, 1], 0.0)  # another category and creator: no effect
    with pytest.raises(ValueError, match="precede"):
        model.logit(state, np.array([[same]]), np.array([start - 1]))


def test_drift_and_hour_move_category_appeal_over_time() -> None:
    drift_model = ClickModel(SMALL)
    flat = ClickModel(SMALL.model_copy(update={"click": ClickModelConfig(drift=0.0, hour=0.0)}))
    cats = np.arange(SMALL.catalogue.n_categories)[None, :]
    days = SMALL.sessions.start_ts + DAY_S * np.arange(0, 90, 3)  # same hour of day: drift only
    moved = drift_model.time_effect(np.repeat(cats, days.size, 0), days)
    assert (moved.max(axis=0) - moved.min(axis=0)).min() > 0.3 * SMALL.click.drift
    np.testing.assert_array_equal(flat.time_effect(np.repeat(cats, days.size, 0), days), 0.0)
    hours = SMALL.sessions.start_ts + HOUR_S * np.arange(24)
    by_hour = ClickModel(SMALL.model_copy(update={"click": ClickModelConfig(drift=0.0)}))
    h = by_hour.time_effect(np.repeat(cats, 24, 0), hours)
    np.testing.assert_allclose(h.max(axis=0), SMALL.click.hour, atol=0.02)
    # Outside the tabulated window the same formula applies.
    far = np.array([SMALL.sessions.start_ts + 400 * DAY_S])
    np.testing.assert_allclose(
        drift_model.time_effect(cats, far), drift_model._time_effect_hours(far[:, None] // HOUR_S, cats)
    )


def test_bad_queries_raise(model: ClickModel) -> None:
    state = model.initial_state(np.arange(2))
    with pytest.raises(ValueError, match="item_ids"):
        model.logit(state, np.array([[500], [0]]), np.full(2, SMALL.sessions.start_ts))
    with pytest.raises(ValueError, match="item_ids must be"):
        model.logit(state, np.array([1, 2]), np.full(2, SMALL.sessions.start_ts))


def test_alias_sampler_matches_its_weights() -> None:
    w = np.array([5.0, 1.0, 0.0, 3.0, 1.0])
    draws = AliasSampler(w).sample(np.random.default_rng(0).random(200_000))
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / draws.size, w / w.sum(), atol=0.005)
    with pytest.raises(ValueError, match="alias weights"):
        AliasSampler(np.array([-1.0, 2.0]))


def test_ground_truth_reproduces_the_stored_p_click(quick_run: SyntheticManifest) -> None:
    """Rebuilding users' states from the logged clicks gives back each impression's true p_click."""
    model = ClickModel(quick_run.config)
    imp = pl.read_parquet(quick_run.paths("impressions"))
    ev = pl.read_parquet(quick_run.paths("events")).sort("user_id", "ts", "src_row")
    sample = imp[np.random.default_rng(0).choice(imp.height, 400, replace=False)]
    eu, ets, eit = (ev[c].to_numpy() for c in ("user_id", "ts", "item_id"))
    users, ts = sample["user_id"].to_numpy(), sample["ts"].to_numpy()
    lo, hi = np.searchsorted(eu, users), np.searchsorted(eu, users, side="right")
    hist = [np.arange(a, b)[ets[a:b] < t] for a, b, t in zip(lo, hi, ts, strict=True)]
    rows = np.concatenate([np.full(h.size, i) for i, h in enumerate(hist)])
    idx = np.concatenate(hist)
    state = model.state_from_history(users, rows, eit[idx], ets[idx])
    items = sample["item_id"].to_numpy()[:, None]
    p = model.probability(state, items, ts, position=sample["position"].to_numpy()[:, None])[:, 0]
    np.testing.assert_allclose(p, sample["p_click"].to_numpy(), rtol=1e-5, atol=1e-9)
    p0 = model.probability(state, items, ts)[:, 0]
    np.testing.assert_allclose(p0, sample["p_click_unbiased"].to_numpy(), rtol=1e-5, atol=1e-9)
