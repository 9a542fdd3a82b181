"""The signal dials: the long-range (dormant interest) term, the last-100 predictor and its AUC, the context
cross, the interaction drift, and the named presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from recsys.synthetic.click_model import DAY_S, HOUR_S, ClickModel
from recsys.synthetic.config import (
    CatalogueConfig,
    ClickModelConfig,
    PolicyConfig,
    SessionConfig,
    SyntheticConfig,
    UserConfig,
)
from recsys.synthetic.generator import LAST_WINDOW, SyntheticManifest, auc, generate


def _long_range(dormant: float) -> SyntheticConfig:
    """A small world with histories of a few hundred clicks: the long_range preset, scaled down."""
    base = SyntheticConfig.long_range(seed=3, long_range=dormant)
    return base.model_copy(
        update={
            "catalogue": CatalogueConfig(n_items=3_000, n_categories=12, n_creators=600),
            "users": UserConfig(n_users=80),
            "sessions": base.sessions.model_copy(update={"requests_per_user_mean": 220.0}),
            "policy": base.policy.model_copy(update={"impression_log_rate": 0.25}),
        }
    )


@pytest.fixture(scope="module")
def dial_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SyntheticManifest]:
    root = tmp_path_factory.mktemp("dials")
    return {name: generate(_long_range(d), root / name) for name, d in (("off", 0.0), ("on", 4.0))}


def test_with_the_long_range_dial_at_zero_the_last_100_predictor_is_the_oracle(
    dial_runs: dict[str, SyntheticManifest],
) -> None:
    off = dial_runs["off"]
    assert off.counts["events"] / off.counts["users"] > 2 * LAST_WINDOW  # histories reach past the window
    assert off.last100_auc == pytest.approx(off.oracle_auc, abs=1e-6)
    assert off.test_last100_auc == pytest.approx(off.test_oracle_auc, abs=1e-6)
    assert off.long_range_share == pytest.approx(0.0, abs=1e-5)


def test_with_the_dial_on_the_last_100_events_fall_short(dial_runs: dict[str, SyntheticManifest]) -> None:
    on = dial_runs["on"]
    assert on.last100_auc < on.oracle_auc - 0.02
    assert on.test_last100_auc < on.test_oracle_auc - 0.02
    assert on.long_range_share == pytest.approx(
        (on.test_oracle_auc - on.test_last100_auc) / (on.test_oracle_auc - 0.5)
    )
    # The manifest's figures are those of the stored columns.
    imp = pl.read_parquet(on.paths("impressions"))
    y = imp["click"].to_numpy()
    assert on.last100_auc == pytest.approx(auc(y, imp["p_click_last100"].to_numpy()), abs=1e-5)
    test = imp.filter(pl.col("ts") >= on.test_start_ts)
    assert test.height == pytest.approx(0.1 * imp.height, rel=0.05)
    assert on.test_oracle_auc == pytest.approx(auc(test["click"].to_numpy(), test["p_click"].to_numpy()))
    top_first = -test["position"].to_numpy().astype(float)
    assert on.test_position_auc == pytest.approx(auc(test["click"].to_numpy(), top_first))


def test_a_logger_blind_to_the_click_logit_leaves_less_signal_in_the_slot_position(
    dial_runs: dict[str, SyntheticManifest], tmp_path: Path
) -> None:
    on = dial_runs["on"]
    config = _long_range(4.0)
    blind = generate(
        config.model_copy(update={"policy": config.policy.model_copy(update={"logit_weight": 0.0})}),
        tmp_path / "blind",
    )
    assert blind.test_position_auc < on.test_position_auc - 0.03


def test_ground_truth_with_dormant_interests_is_rebuilt_from_the_click_log(
    dial_runs: dict[str, SyntheticManifest],
) -> None:
    """state_from_history (every click) reproduces p_click; the last 100 clicks reproduce p_click_last100."""
    run = dial_runs["on"]
    model = ClickModel(run.config)
    imp = pl.read_parquet(run.paths("impressions"))
    ev = pl.read_parquet(run.paths("events")).sort("user_id", "ts", "src_row")
    sample = imp[np.random.default_rng(0).choice(imp.height, 300, replace=False)]
    eu, ets, eit = (ev[c].to_numpy() for c in ("user_id", "ts", "item_id"))
    users, ts = sample["user_id"].to_numpy(), sample["ts"].to_numpy()
    items, pos = sample["item_id"].to_numpy()[:, None], sample["position"].to_numpy()[:, None]
    lo, hi = np.searchsorted(eu, users), np.searchsorted(eu, users, side="right")
    hist = [np.arange(a, b)[ets[a:b] < t] for a, b, t in zip(lo, hi, ts, strict=True)]
    for column, keep in (("p_click", None), ("p_click_last100", LAST_WINDOW)):
        kept = [h if keep is None else h[-keep:] for h in hist]
        rows = np.concatenate([np.full(h.size, i) for i, h in enumerate(kept)])
        idx = np.concatenate(kept)
        state = model.state_from_history(users, rows, eit[idx], ets[idx])
        if keep is not None:  # the window predictor does not know how many clicks came before the window
            state.n_clicks[:] = np.array([h.size for h in hist])
            state.last_click[:] = np.where(
                state.last_click > 0, state.last_click + (state.n_clicks - [h.size for h in kept])[:, None], 0
            )
        p = model.probability(state, items, ts, position=pos)[:, 0]
        np.testing.assert_allclose(p, sample[column].to_numpy(), rtol=1e-4, atol=1e-9, err_msg=column)
    assert (sample["p_click"] != sample["p_click_last100"]).any()


def test_dormant_term_needs_a_creator_untouched_for_dormant_after_clicks() -> None:
    config = SyntheticConfig(
        seed=1,
        catalogue=CatalogueConfig(n_items=400, n_categories=4, n_creators=40),
        click=ClickModelConfig(dormant=2.0, dormant_after=5, loyalty=0.0, short=0.0),
    )
    off = config.model_copy(update={"click": config.click.model_copy(update={"dormant": 0.0})})
    model, plain = ClickModel(config), ClickModel(off)
    cat = model.catalogue
    target = int(np.flatnonzero(cat.creator == cat.creator[0])[0])
    others = np.flatnonzero(cat.creator != cat.creator[0])[:10]
    start = config.sessions.start_ts + DAY_S
    # One click on the target's creator, then k clicks on other creators.
    gaps = []
    for k in (0, 4, 5, 9):
        items = np.r_[target, others[:k]]
        ts = start + HOUR_S * np.arange(items.size)
        state = model.state_from_history(np.array([5]), np.zeros(items.size, int), items, ts)
        ref = plain.state_from_history(np.array([5]), np.zeros(items.size, int), items, ts)
        t = np.array([ts[-1] + HOUR_S])
        gaps.append(float(model.logit(state, [[target]], t)[0, 0] - plain.logit(ref, [[target]], t)[0, 0]))
    assert gaps == pytest.approx([0.0, 0.0, 2.0, 2.0])  # dormant once 5 clicks followed the last one


def test_context_cross_and_interaction_drift_move_the_logit_with_time() -> None:
    base = SyntheticConfig.quick(seed=2)
    model0 = ClickModel(base)
    dialled = SyntheticConfig.model_validate(
        {**base.model_dump(), "click": {**base.click.model_dump(), "context_interaction": 1.0}}
    )
    drifting = SyntheticConfig.model_validate(
        {**base.model_dump(), "click": {**base.click.model_dump(), "interaction_drift": np.pi}}
    )
    users = np.arange(50)
    items = np.tile(np.arange(20), (50, 1))
    t0 = np.full(50, base.sessions.start_ts)
    for config in (dialled, drifting):
        model = ClickModel(config)
        state, state0 = model.initial_state(users), model0.initial_state(users)
        # At the start the drift has not moved anything; the context cross has.
        same = np.allclose(model.logit(state, items, t0), model0.logit(state0, items, t0))
        assert same == (config is drifting)
        late = t0 + int(base.sessions.horizon_days * DAY_S) - HOUR_S
        assert not np.allclose(model.logit(state, items, late), model0.logit(state0, items, late))


def test_presets_are_deterministic_and_their_dials_are_set() -> None:
    for name in SyntheticConfig.preset_names():
        a, b = SyntheticConfig.preset(name, seed=4), SyntheticConfig.preset(name, seed=4)
        assert a == b and a.data_version() == b.data_version()
        assert a.data_version() != SyntheticConfig.preset(name, seed=5).data_version()
    lr, control = SyntheticConfig.preset("long_range"), SyntheticConfig.preset("long_range_control")
    assert (
        lr.click.dormant > 0 and control.click.dormant == 0 and lr.click.loyalty == control.click.loyalty == 0
    )
    assert lr.model_copy(update={"click": control.click}) == control  # identical but the dial
    x5 = SyntheticConfig.preset("long_range_x5")
    assert x5.policy.impression_log_rate == pytest.approx(5 * lr.policy.impression_log_rate)
    assert x5.model_copy(update={"policy": lr.policy}) == lr  # identical but how much is logged
    blind = SyntheticConfig.preset("long_range_blind")
    assert blind.policy.logit_weight == 0 < lr.policy.logit_weight
    assert blind.model_copy(update={"policy": lr.policy}) == lr  # identical but what the logger sees
    blind_x5 = SyntheticConfig.preset("long_range_blind_x5")
    assert blind_x5.model_copy(update={"policy": blind.policy}) == blind  # identical but how much is logged
    assert SyntheticConfig.preset("interactions").click.context_interaction > 0
    assert SyntheticConfig.preset("drift").click.interaction_drift > 0
    sparse = SyntheticConfig.preset("sparse_catalogue")
    assert sparse.catalogue.n_items >= 50 * sparse.sessions.requests_per_user_mean
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        SyntheticConfig.preset("long-range")


def test_a_preset_generates_the_same_files_twice(tmp_path) -> None:  # noqa: ANN001
    config = _long_range(4.0).model_copy(update={"users": UserConfig(n_users=20)})
    a, b = generate(config, tmp_path / "a"), generate(config, tmp_path / "b", chunk_users=7)
    for table in ("events", "impressions"):
        assert pl.read_parquet(a.paths(table)).equals(pl.read_parquet(b.paths(table))), table
    assert a.model_dump(exclude={"root", "files"}) == b.model_dump(exclude={"root", "files"})


def test_bad_dials_name_the_field() -> None:
    with pytest.raises(ValidationError, match="resurface_share"):
        PolicyConfig(resurface_share=1.5)
    with pytest.raises(ValidationError, match="resurface_min_age"):
        PolicyConfig(resurface_min_age=-1)
    with pytest.raises(ValidationError, match="dormant_after"):
        ClickModelConfig(dormant_after=0)
    with pytest.raises(ValidationError, match="requests_per_user_mean"):
        SessionConfig(requests_per_user_mean=0.5)
