"""The platform's typed configuration root.

Each stage owns the config model of its own knobs (``synthetic.config.SyntheticConfig``,
``features.config.FeatureConfig``, ...); this module composes them into one frozen ``PlatformConfig``
that flows, the CLI and the run registry pass around. YAML/JSON files only ever produce this model.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from recsys.core.environment import state_dir


class FrozenModel(BaseModel):
    """Base for every config: immutable, unknown keys are an error (a typo must not pass silently)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PathsConfig(FrozenModel):
    home: Path = Field(default_factory=state_dir, description="Root of the platform's local state.")

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse.duckdb"

    @property
    def exports(self) -> Path:
        return self.home / "exports"

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"

    @property
    def cache(self) -> Path:
        return self.home / "cache"


def describe_config_error(exc: Exception) -> str:
    """A config error as a user reads it: one ``field.path: problem`` line per pydantic error (without
    pydantic's input dump and link), or the message of any other error."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        given = error.get("input")
        if error["type"] != "value_error" and isinstance(given, str | int | float | bool):
            message += f" (got {given!r})"  # a wrong literal or number: name what was given
        lines.append(f"{where}: {message}" if where and not message.startswith(f"{where}:") else message)
    return "; ".join(lines)
