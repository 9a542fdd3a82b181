from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from recsys.core.atomic import atomic_path
from recsys.core.config import PathsConfig
from recsys.core.environment import TELEMETRY_OFF
from recsys.core.hashing import stable_hash


def test_telemetry_is_off_after_import() -> None:
    for key, value in TELEMETRY_OFF.items():
        assert os.environ[key] == value


def test_stable_hash_ignores_key_order_but_not_values() -> None:
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_configs_are_frozen_and_strict(tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path)
    assert paths.warehouse == tmp_path / "warehouse.duckdb"
    with pytest.raises(ValidationError):
        PathsConfig(home=tmp_path, hom=tmp_path)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        paths.home = Path("/")  # type: ignore[misc]


def test_config_errors_read_as_field_and_problem() -> None:
    from pydantic import Field, ValidationError, model_validator

    from recsys.core.config import FrozenModel, describe_config_error

    class Inner(FrozenModel):
        k: int = Field(1, ge=1)

    class Outer(FrozenModel):
        inner: Inner = Inner()
        sizes: tuple[int, ...] = (1, 2)

        @model_validator(mode="after")
        def _check(self) -> Outer:
            if len(self.sizes) < 2:
                raise ValueError("sizes: give at least two")
            return self

    with pytest.raises(ValidationError) as nested:
        Outer(inner={"k": 0})
    expected = "inner.k: Input should be greater than or equal to 1 (got 0)"
    assert describe_config_error(nested.value) == expected
    with pytest.raises(ValidationError) as own:
        Outer(sizes=(1,))
    assert describe_config_error(own.value) == "sizes: give at least two"  # no pydantic input dump or link
    assert describe_config_error(ValueError("plain")) == "plain"
