"""The item-appeal drift dial (``click.item_appeal``, ``click.item_appeal_drift``) and the ``item_drift``
presets: the appeal turns with the dial on and stays put with it off, and every earlier preset keeps its data
(its data version and the files it generates)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from recsys.synthetic.click_model import DAY_S, ClickModel
from recsys.synthetic.config import ClickModelConfig, SyntheticConfig, UserConfig
from recsys.synthetic.generator import generate

#: Data versions of the presets as they were before the item-appeal fields existed: experiments, warehouse
#: tables and reports are keyed on them, so adding a dial must leave them as they are.
EARLIER_VERSIONS = {
    "tiny": "73c3f1cf47d5a750",
    "quick": "3cbd5c6e70dd78fd",
    "long_history": "d5b40f68c7343338",
    "long_range": "f08b772480e8c1b8",
    "long_range_control": "2fe6c240846f8782",
    "interactions": "17891972397c1035",
    "drift": "bbcb5ba6b8918b1f",
    "sparse_catalogue": "870892244df91d57",
    "long_sequence": "5e49cf5fde110b3b",
}


def _content_digest(config: SyntheticConfig, root: Path) -> tuple[str, int]:
    """A digest of the generated events and impressions (ids, times, positions, clicks) and the row count."""
    manifest = generate(config, root)
    h = hashlib.sha256()
    for table, cols in (
        ("events", ("user_id", "item_id", "ts")),
        ("impressions", ("user_id", "item_id", "ts", "position", "click")),
    ):
        df = pl.read_parquet(manifest.paths(table)).sort(list(cols))
        for c in cols:
            h.update(np.ascontiguousarray(df[c].to_numpy().astype(np.int64)).tobytes())
    return h.hexdigest()[:16], pl.read_parquet(manifest.paths("impressions")).height


def test_earlier_presets_keep_their_data_version() -> None:
    assert {n: SyntheticConfig.preset(n).data_version() for n in EARLIER_VERSIONS} == EARLIER_VERSIONS
    assert "item_appeal" not in SyntheticConfig.drift().click.model_dump()  # unused dials are not dumped


def test_the_drift_preset_generates_the_files_it_generated_before_the_dial_existed(tmp_path: Path) -> None:
    """Ids, times, positions and clicks of the drift preset (40 users), as generated before the item-appeal
    term existed: with the dial off the generator is unchanged."""
    small = SyntheticConfig.drift(seed=7).model_copy(update={"users": UserConfig(n_users=40)})
    assert _content_digest(small, tmp_path) == ("b1838757e39b9bca", 2520)


def test_item_drift_and_its_control_differ_only_in_the_drift_dial() -> None:
    on, control = SyntheticConfig.preset("item_drift"), SyntheticConfig.preset("item_drift_control")
    assert on.click.item_appeal == control.click.item_appeal > 0
    assert on.click.item_appeal_drift == pytest.approx(2 * np.pi) and control.click.item_appeal_drift == 0.0
    assert on.model_copy(update={"click": control.click}) == control
    # The dial is the only non-stationary term: no category drift, no interaction drift.
    assert on.click.drift == 0.0 and on.click.interaction_drift == 0.0
    assert SyntheticConfig.item_drift(turn=1.0).click.item_appeal_drift == 1.0
    assert SyntheticConfig.item_drift(appeal=0.0).click.item_appeal_drift == 0.0  # nothing left to turn
    assert (
        len({on.data_version(), control.data_version(), SyntheticConfig.item_drift(appeal=0).data_version()})
        == 3
    )


def test_item_appeal_turns_over_the_horizon_with_the_dial_on_and_not_with_it_off() -> None:
    """The logit gap to the same world without item appeal is v * A_i(t): with the dial on (a full turn) it
    is unrelated to the start a quarter of the way in, reversed halfway and back at the end; with the dial
    off it is the same at every time."""
    base = SyntheticConfig.item_drift(seed=2, appeal=0.0)
    users, items = np.arange(30), np.tile(np.arange(200), (30, 1))
    t0 = np.full(30, base.sessions.start_ts)
    horizon = int(base.sessions.horizon_days * DAY_S)
    times = {"start": t0, "quarter": t0 + horizon // 4, "half": t0 + horizon // 2, "end": t0 + horizon}
    plain = ClickModel(base)
    state0 = plain.initial_state(users)
    gaps: dict[str, dict[str, np.ndarray]] = {}
    for name in ("item_drift", "item_drift_control"):
        model = ClickModel(SyntheticConfig.preset(name, seed=2))
        state = model.initial_state(users)
        gaps[name] = {
            k: model.logit(state, items, t) - plain.logit(state0, items, t) for k, t in times.items()
        }
    v = SyntheticConfig.item_drift().click.item_appeal
    on, off = gaps["item_drift"], gaps["item_drift_control"]
    # An item's appeal is the same for every user at a time, and starts equal with the dial on or off.
    np.testing.assert_allclose(on["start"], np.broadcast_to(on["start"][0], on["start"].shape), atol=1e-9)
    np.testing.assert_allclose(on["start"], off["start"], atol=1e-9)
    assert np.std(on["start"][0]) == pytest.approx(v, rel=0.2)
    # Dial on: a quarter turn is an independent draw, half a turn reverses the appeal, a full one restores it.
    assert abs(np.corrcoef(on["start"][0], on["quarter"][0])[0, 1]) < 0.2
    np.testing.assert_allclose(on["half"], -on["start"], atol=1e-6)
    np.testing.assert_allclose(on["end"], on["start"], atol=1e-6)
    # Dial off: constant.
    for k in ("quarter", "half", "end"):
        np.testing.assert_allclose(off[k], off["start"], atol=1e-9)


def test_generated_clicks_follow_the_turning_appeal(tmp_path: Path) -> None:
    """In the generated data, items with a high appeal at the start are clicked more often than the others
    in the first and last tenth of the horizon and less often around its middle (half a turn)."""
    config = SyntheticConfig.item_drift(seed=1).model_copy(update={"users": UserConfig(n_users=200)})
    manifest = generate(config, tmp_path)
    imp = pl.read_parquet(manifest.paths("impressions"))
    model = ClickModel(config)
    high = model.item_appeal_early[imp["item_id"].to_numpy()] > 0
    frac = (imp["ts"].to_numpy() - config.sessions.start_ts) / (config.sessions.horizon_days * DAY_S)
    click = imp["click"].to_numpy()

    def lift(window: np.ndarray) -> float:
        return float(click[high & window].mean() - click[~high & window].mean())

    assert lift(frac < 0.1) > 0.03 and lift(frac > 0.9) > 0.03
    assert lift((frac > 0.4) & (frac < 0.6)) < -0.03


def test_appeal_drift_without_appeal_names_the_field() -> None:
    with pytest.raises(ValidationError, match="item_appeal_drift"):
        ClickModelConfig(item_appeal_drift=1.0)
    on = ClickModelConfig(item_appeal=1.0, item_appeal_drift=1.0)
    assert on.model_dump()["item_appeal_drift"] == 1.0
    assert ClickModelConfig.model_validate(on.model_dump()) == on  # the dump round-trips
