"""simulation.response: the true world reuses the generator's click model exactly; the fitted world learns the
signal of real-looking logs; responses follow their probabilities; the DR reward model."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.simulation.response import (
    FittedResponse,
    FittedResponseConfig,
    ItemPositionCTR,
    SessionBehaviour,
    TrueResponse,
)
from recsys.synthetic.click_model import ClickModel, sigmoid
from recsys.warehouse import Warehouse
from tests.simulation.test_simulator import N_ITEMS, tiny_config, tiny_world

T0 = 1_704_067_200 + 10 * 86_400


def _clicks() -> pl.DataFrame:
    return pl.DataFrame(
        {"user_id": [3, 3, 3, 7], "item_id": [5, 17, 5, 40], "ts": [T0, T0 + 60, T0 + 3_000, T0 + 10]}
    )


def test_true_response_is_the_generators_click_model() -> None:
    config = tiny_config()
    world = TrueResponse(config, np.arange(10), _clicks())
    model = ClickModel(config)
    events = _clicks()
    state = model.state_from_history(
        np.arange(10), events["user_id"].to_numpy(), events["item_id"].to_numpy(), events["ts"].to_numpy()
    )
    users = np.array([3, 7, 0])
    items = np.tile(np.arange(N_ITEMS), (3, 1))
    ts = np.full(3, T0 + 3_100)
    expected = model.probability(state.take(users), items, ts, position=np.arange(N_ITEMS))
    assert world.click_probability(users, items, ts, np.arange(N_ITEMS)) == pytest.approx(expected, rel=1e-6)
    assert world.initial_history(3)[0].tolist() == [5, 17, 5] and world.initial_history(0)[0].size == 0
    assert world.start_ts() == (T0 + 3_000) // 86_400 * 86_400 + 86_400  # midnight after the last event
    # Updating with a simulated click = rebuilding the state from the longer history (the generator's update).
    clicked_at = T0 + 3_200
    world.update(np.array([3]), np.array([[23, 24]]), np.array([[True, False]]), np.array([[clicked_at, 0]]),
                 np.array([T0 + 3_199]))  # fmt: skip
    longer = pl.concat([events, pl.DataFrame({"user_id": [3], "item_id": [23], "ts": [clicked_at]})])
    rebuilt = model.state_from_history(
        np.arange(10), longer["user_id"].to_numpy(), longer["item_id"].to_numpy(), longer["ts"].to_numpy()
    )
    later = np.full(3, clicked_at + 100)
    assert world.click_logits(users, items, later) == pytest.approx(
        model.logit(rebuilt.take(users), items, later), rel=1e-5, abs=1e-5
    )


def test_responses_follow_their_probabilities() -> None:
    world = tiny_world(SessionBehaviour(leave_after_click=0.0, leave_after_no_click=1.0))
    rng = np.random.default_rng(0)
    n, k = 4_000, 6
    users = np.full(n, 11)
    items = np.tile(np.arange(k), (n, 1))
    valid = np.ones((n, k), dtype=bool)
    valid[:, -1] = False  # an empty slot is never clicked
    ts = np.full(n, world.start_ts())
    out = world.respond(users, items, valid, ts, rng)
    expected = sigmoid(world.click_logits(users[:1], items[:1], ts[:1]))[0] * world.examine(np.arange(k))
    assert out.p_click[0, :-1] == pytest.approx(expected[:-1])
    assert out.click[:, :-1].mean(axis=0) == pytest.approx(expected[:-1], abs=0.03)
    assert not out.click[:, -1].any() and out.p_click[0, -1] == 0
    assert np.isnan(out.dwell[~out.click]).all() and (out.dwell[out.click] >= 1).all()
    assert not (out.like & ~out.click).any()
    assert (out.leave == ~out.click.any(axis=1)).all()  # leave exactly when nothing was clicked
    for row in range(50):  # a slate's clicks happen one after the other, each after the previous dwell
        times = out.click_ts[row][out.click[row]]
        assert np.all(np.diff(times) >= out.dwell[row][out.click[row]][:-1] - 1)
    clicked_ts = np.where(out.click, out.click_ts, 0)
    assert (out.end_ts > clicked_ts.max(axis=1)).all() and (out.click_ts[out.click] > ts[0]).all()


def test_the_true_world_needs_the_generating_config(tmp_path) -> None:  # noqa: ANN001
    with Warehouse(tmp_path / "wh.duckdb") as wh:
        wh.publish("synthetic.users", pl.DataFrame({"user_id": [0, 1]}))
        wh.publish("synthetic.events", _clicks(), inputs={"synthetic_config": "not-this-one"})
        with pytest.raises(ValueError, match="config: its data version .* differs"):
            TrueResponse.from_warehouse(wh, "synthetic", tiny_config())
    with pytest.raises(ValueError, match="outside this config's catalogue"):
        TrueResponse(tiny_config(), np.arange(10), _clicks().with_columns(pl.lit(N_ITEMS).alias("item_id")))
    with pytest.raises(ValueError, match=r"user_ids: \[999\] are not in this world's population"):
        tiny_world().click_logits(np.array([999]), np.zeros((1, 1), dtype=np.int64), np.array([T0]))


def _category_logs(seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Users who consume items of their favourite category (4 categories x 25 items)."""
    rng = np.random.default_rng(seed)
    items = pl.DataFrame({"item_id": np.arange(100), "category": [f"c{i % 4}" for i in range(100)]})
    rows = []
    for user in range(120):
        fav = user % 4
        for step in range(20):
            item = int(rng.choice(np.arange(fav, 100, 4))) if rng.random() < 0.85 else int(rng.integers(100))
            rows.append((user, item, T0 + 1000 * step + user))
    return pl.DataFrame(rows, schema=["user_id", "item_id", "ts"], orient="row"), items


def test_fitted_response_learns_category_taste_and_is_calibrated() -> None:
    events, items = _category_logs()
    cfg = FittedResponseConfig(random_item_ctr=0.05)
    world = FittedResponse.fit(events, items, cfg)
    coef = dict(zip(("log_popularity", "category_share", "recent_share", "seen"), world.coef, strict=True))
    assert coef["category_share"] > 0 or coef["recent_share"] > 0
    users = np.arange(8)
    grid = np.tile(np.arange(100), (8, 1))
    p = sigmoid(world.click_logits(users, grid, np.full(8, world.start_ts())))
    fav = np.array([[int(i % 4 == u % 4) for i in range(100)] for u in users], dtype=bool)
    assert p[fav].mean() > 2 * p[~fav].mean()  # the user's category is much more likely to be clicked
    assert 0.01 < p.mean() < 0.25  # calibrated near random_item_ctr (the taste lifts it a little)
    assert world.examine(np.arange(3)) == pytest.approx([1.0, 2**-0.8, 3**-0.8])
    # A click makes the item "seen" and moves the user's category counts.
    before = world.features(np.array([0]), np.array([[1]]))[0, 0]
    world.update(np.array([0]), np.array([[1]]), np.array([[True]]), np.array([[world.start_ts()]]),
                 np.array([world.start_ts() - 1]))  # fmt: skip
    after = world.features(np.array([0]), np.array([[1]]))[0, 0]
    assert before[3] in (0.0, 1.0) and after[3] == 1.0 and after[1] > before[1]
    assert world.initial_history(0)[0].size == 20 and not world.is_truth


def test_fitted_response_refuses_unusable_logs() -> None:
    events, items = _category_logs()
    with pytest.raises(ValueError, match="needs at least 10"):
        FittedResponse.fit(events.head(5), items)
    with pytest.raises(ValueError, match="every event has the same time"):
        FittedResponse.fit(events.with_columns(pl.lit(T0).alias("ts")), items)
    with pytest.raises(ValueError, match="missing column 'ts'"):
        FittedResponse.fit(events.drop("ts"), items)


def test_item_position_ctr_recovers_items_and_positions() -> None:
    rng = np.random.default_rng(1)
    n = 60_000
    item = rng.integers(0, 3, n)
    position = rng.integers(0, 3, n)
    truth = np.array([0.05, 0.1, 0.2])[item] * np.array([1.0, 0.5, 0.25])[position]
    log = pl.DataFrame({"item_id": item, "position": position, "click": rng.random(n) < truth})
    model = ItemPositionCTR.fit(log)
    assert model.position_curve == pytest.approx([1.0, 0.5, 0.25], abs=0.06)
    assert model.predict(np.arange(3), np.zeros(3, dtype=int)) == pytest.approx([0.05, 0.1, 0.2], rel=0.15)
    assert model.predict(np.array([99]), np.array([0]))[0] == pytest.approx(model.global_ctr)
    with pytest.raises(ValueError, match="log is empty"):
        ItemPositionCTR.fit(log.head(0))
