from __future__ import annotations

import pytest
from pydantic import ValidationError

from recsys.features.config import DAY_S, FeatureConfig


def test_defaults_and_column_names() -> None:
    cfg = FeatureConfig()
    assert cfg.max_seq_len == 200 and cfg.split_quantiles == (0.8, 0.9)
    assert [cfg.decay_column(h) for h in cfg.decay_half_lives_s] == ["u_decay_1d", "u_decay_30d"]
    assert FeatureConfig(decay_half_lives_s=(7_200.0, 90.0)).decay_column(90.0) == "u_decay_90s"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"decay_half_lives_s": ()}, "decay_half_lives_s"),
        ({"decay_half_lives_s": (-1.0,)}, "decay_half_lives_s"),
        ({"decay_half_lives_s": (DAY_S, DAY_S)}, "decay_half_lives_s"),
        ({"split_quantiles": (0.0, 0.5)}, "split_quantiles"),
        ({"examples": "clicks"}, "examples"),
        ({"max_len": 5}, "max_len"),  # unknown keys are errors, not silently ignored
    ],
)
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        FeatureConfig(**kwargs)


def test_config_is_frozen() -> None:
    with pytest.raises(ValidationError):
        FeatureConfig().max_seq_len = 5  # type: ignore[misc]
