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


def test_the_control_with_the_dial_off_is_the_drift_preset_and_generates_its_files(tmp_path: Path) -> None:
    off = SyntheticConfig.item_drift(seed=7, appeal=0.0)
    assert (
        off == SyntheticConfig.drift(seed=7) and off.data_version() == SyntheticConfig.drift(7).data_version()
    )
    # The files the drift preset (40 users) generated before the dial existed: same ids, times and clicks.
    small = off.model_copy(update={"users": UserConfig(n_users=40)})
    assert _content_digest(small, tmp_path) == ("b1838757e39b9bca", 2520)


def test_item_drift_and_its_control_differ_only_in_the_drift_dial() -> None:
    on, control = SyntheticConfig.preset("item_drift"), SyntheticConfig.preset("item_drift_control")
    assert on.click.item_appeal == control.click.item_appeal > 0
    assert on.click.item_appeal_drift == pytest.approx(np.pi) and control.click.item_appeal_drift == 0.0
    assert on.model_copy(update={"click": control.click}) == control
    assert on.model_copy(update={"click": SyntheticConfig.drift().click}) == SyntheticConfig.drift()
    assert len({on.data_version(), control.data_version(), SyntheticConfig.drift().data_version()}) == 3


def test_item_appeal_turns_over_the_horizon_with_the_dial_on_and_not_with_it_off() -> None:
    """The logit gap to the drift preset is v * A_i(t): it reverses over the horizon (half a turn) with the
    dial on, and is the same at every time with the dial off."""
    base = SyntheticConfig.drift(seed=2)
    users, items = np.arange(30), np.tile(np.arange(200), (30, 1))
    t0 = np.full(30, base.sessions.start_ts)
    horizon = int(base.sessions.horizon_days * DAY_S)
    times = {"start": t0, "middle": t0 + horizon // 2, "end": t0 + horizon}
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
    # Dial on: half a turn reverses the appeal; halfway it is independent of the start.
    np.testing.assert_allclose(on["end"], -on["start"], atol=1e-6)
    assert abs(np.corrcoef(on["start"][0], on["middle"][0])[0, 1]) < 0.2
    # Dial off: constant.
    for k in ("middle", "end"):
        np.testing.assert_allclose(off[k], off["start"], atol=1e-9)


def test_generated_clicks_follow_the_turning_appeal(tmp_path: Path) -> None:
    """In the generated data, items with a high early appeal are clicked more often early than late."""
    config = SyntheticConfig.item_drift(seed=1).model_copy(update={"users": UserConfig(n_users=150)})
    manifest = generate(config, tmp_path)
    imp = pl.read_parquet(manifest.paths("impressions"))
    model = ClickModel(config)
    high = model.item_appeal_early[imp["item_id"].to_numpy()] > 0
    late = imp["ts"].to_numpy() >= config.sessions.start_ts + config.sessions.horizon_days * DAY_S / 2
    click = imp["click"].to_numpy()
    lift_early = click[high & ~late].mean() - click[~high & ~late].mean()
    lift_late = click[high & late].mean() - click[~high & late].mean()
    assert lift_early > 0.02 and lift_late < -0.02


def test_appeal_drift_without_appeal_names_the_field() -> None:
    with pytest.raises(ValidationError, match="item_appeal_drift"):
        ClickModelConfig(item_appeal_drift=1.0)
    on = ClickModelConfig(item_appeal=1.0, item_appeal_drift=1.0)
    assert on.model_dump()["item_appeal_drift"] == 1.0
    assert ClickModelConfig.model_validate(on.model_dump()) == on  # the dump round-trips
