"""The explicit model registry: a plain mapping from a model's name to its class, its config class and the
config fields that define the name (``hstu-large`` is the HSTU class with the large preset).

Add a model by adding an entry; nothing is looked up by string elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from torch import nn

from core.config import FrozenModel
from models.hstu import HSTU, HSTU_LARGE, HSTUConfig
from models.popularity import Popularity, PopularityConfig
from models.sasrec import SASRec, SASRecConfig


@dataclass(frozen=True)
class ModelEntry:
    model_cls: type[nn.Module]
    config_cls: type[FrozenModel]
    task: Literal["retrieval", "ranking"]
    preset: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


REGISTRY: Mapping[str, ModelEntry] = MappingProxyType(
    {
        "popularity": ModelEntry(Popularity, PopularityConfig, "retrieval", description="item counts"),
        "sasrec": ModelEntry(SASRec, SASRecConfig, "retrieval", description="SASRec, 2 blocks, 1 head, d=50"),
        "hstu": ModelEntry(HSTU, HSTUConfig, "retrieval", description="HSTU base, 2 blocks, 1 head, d=50"),
        "hstu-large": ModelEntry(
            HSTU, HSTUConfig, "retrieval", preset=HSTU_LARGE, description="HSTU large, 8 blocks, 2 heads, 25"
        ),
    }
)


def entry(name: str) -> ModelEntry:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def model_config(name: str, **fields: Any) -> FrozenModel:
    """The named model's config: the preset, then ``fields`` (which win)."""
    e = entry(name)
    return e.config_cls(**{**e.preset, **fields})


def build_model(name: str, config: FrozenModel | None = None, **fields: Any) -> nn.Module:
    """Instantiate the named model from ``config`` or from ``model_config(name, **fields)``."""
    e = entry(name)
    if config is None:
        config = model_config(name, **fields)
    elif fields:
        raise ValueError("pass either a config or config fields, not both")
    if not isinstance(config, e.config_cls):
        raise TypeError(f"model {name!r} needs a {e.config_cls.__name__}, got {type(config).__name__}")
    return e.model_cls(config)
