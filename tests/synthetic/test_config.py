from __future__ import annotations

import pytest
from pydantic import ValidationError

from recsys.synthetic.config import ClickModelConfig, SessionConfig, SyntheticConfig


def test_data_version_is_the_config_and_seed() -> None:
    base = SyntheticConfig.quick()
    assert base.data_version() == SyntheticConfig.quick().data_version()
    assert base.data_version() != SyntheticConfig.quick(seed=1).data_version()
    changed = base.model_copy(update={"click": ClickModelConfig(loyalty=0.5)})
    assert changed.data_version() != base.data_version()


def test_presets() -> None:
    quick = SyntheticConfig.preset("quick")
    assert quick.users.n_users == 2_000
    assert quick.sessions.requests_per_user_mean * quick.sessions.slate_size >= 100  # ~300k impressions
    long = SyntheticConfig.preset("long_history")
    assert long.users.n_users == 3_000
    assert long.catalogue.n_creators >= 5_000
    bench = SyntheticConfig.for_events(10_000_000)
    assert bench.max_events == 10_000_000
    assert bench.policy.impression_log_rate == 0.0
    assert SyntheticConfig.for_events(1_000, log_impressions=True).policy.impression_log_rate == 1.0
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        SyntheticConfig.preset("huge")
    with pytest.raises(ValueError, match="n_events"):
        SyntheticConfig.for_events(0)


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ValidationError, match="slate_size"):
        SessionConfig(slate_size=40, pool_size=30)
    with pytest.raises(ValidationError, match="diurnal_weights"):
        SessionConfig(diurnal_weights=(1.0,) * 23)
    with pytest.raises(ValidationError, match="drift_period_days"):
        ClickModelConfig(drift_period_days=(50.0, 10.0))
    with pytest.raises(ValidationError, match="genders"):
        SyntheticConfig.model_validate({"users": {"genders": ["f", "f"]}})
    with pytest.raises(ValidationError, match="n_userz"):
        SyntheticConfig.model_validate({"users": {"n_userz": 5}})


def test_config_is_frozen() -> None:
    with pytest.raises(ValidationError):
        SyntheticConfig.quick().seed = 3  # type: ignore[misc]
