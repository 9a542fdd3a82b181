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

from recsys.core.config import FrozenModel
from recsys.models.deepfm import DeepFM, DeepFMConfig
from recsys.models.din import DIN, DINConfig
from recsys.models.generative_retrieval import ServedGenerator, ServedGeneratorConfig
from recsys.models.hstu import HSTU, HSTU_LARGE, HSTUConfig
from recsys.models.hstu_ranker import HSTURanker, HSTURankerConfig
from recsys.models.hyformer import HyFormer, HyFormerConfig
from recsys.models.longer import Longer, LongerConfig, LongerRankMixerConfig
from recsys.models.popularity import Popularity, PopularityConfig
from recsys.models.rankmixer import RankMixer, RankMixerConfig
from recsys.models.sasrec import SASRec, SASRecConfig


@dataclass(frozen=True)
class ModelEntry:
    model_cls: type[nn.Module]
    config_cls: type[FrozenModel]
    task: Literal["retrieval", "ranking"]
    preset: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    long_sequence: bool = (
        False  # ranking: built to read the long history (LONGER, HyFormer), else a short one
    )
    #: The command that trains it, where the shared retrieval / ranking experiments cannot.
    own_trainer: str = ""


REGISTRY: Mapping[str, ModelEntry] = MappingProxyType(
    {
        "popularity": ModelEntry(Popularity, PopularityConfig, "retrieval", description="item counts"),
        "sasrec": ModelEntry(SASRec, SASRecConfig, "retrieval", description="SASRec, 2 blocks, 1 head, d=50"),
        "hstu": ModelEntry(HSTU, HSTUConfig, "retrieval", description="HSTU base, 2 blocks, 1 head, d=50"),
        "hstu-large": ModelEntry(
            HSTU, HSTUConfig, "retrieval", preset=HSTU_LARGE, description="HSTU large, 8 blocks, 2 heads, 25"
        ),
        "genret": ModelEntry(
            ServedGenerator,
            ServedGeneratorConfig,
            "retrieval",
            description="semantic-ID generator (TIGER-style), served by constrained beam search",
            own_trainer="recsys genret run",
        ),
        # Ranking models are built from a FeatureSpec, passed as the config field ``features``.
        "deepfm": ModelEntry(
            DeepFM, DeepFMConfig, "ranking", description="DeepFM: FM + MLP, history mean-pooled"
        ),
        "dlrm": ModelEntry(
            DeepFM,
            DeepFMConfig,
            "ranking",
            preset={"interaction": "dot"},
            description="DLRM-style dot interaction",
        ),
        "din": ModelEntry(DIN, DINConfig, "ranking", description="DIN: target attention over the history"),
        "rankmixer": ModelEntry(
            RankMixer,
            RankMixerConfig,
            "ranking",
            description="RankMixer: 8 tokens, 2 blocks, history mean-pooled",
        ),
        "longer": ModelEntry(
            Longer,
            LongerConfig,
            "ranking",
            preset={"merge_k": 8},
            description="LONGER: merge K=8 (InnerTrans), 2 layers",
            long_sequence=True,
        ),
        "longer-rankmixer": ModelEntry(
            Longer,
            LongerConfig,
            "ranking",
            preset={"merge_k": 8, "rankmixer": LongerRankMixerConfig()},
            description="LONGER + RankMixer blocks over [features; global tokens]",
            long_sequence=True,
        ),
        "hyformer": ModelEntry(
            HyFormer,
            HyFormerConfig,
            "ranking",
            # D=60 puts its parameters next to LONGER+RankMixer's, as in the paper's comparison.
            preset={"sequence_encoder": "longer", "model_dim": 60},
            description="HyFormer: query decoding + boosting, LONGER-style sequence encoder, D=60",
            long_sequence=True,
        ),
        "hstu-ranker": ModelEntry(
            HSTURanker,
            HSTURankerConfig,
            "ranking",
            description="HSTU generative ranker: interleaved item/action tokens, 2 blocks, d=64, "
            "trained one forward per user; served with M-FALCON",
            long_sequence=True,
        ),
    }
)


def trainable_retrieval_models(*, with_popularity: bool = True) -> list[str]:
    """Retrieval models the shared retrieval experiment trains (not those with ``own_trainer``), sorted;
    ``with_popularity=False`` leaves out the count baseline (nothing to sweep or time)."""
    return sorted(
        k
        for k, e in REGISTRY.items()
        if e.task == "retrieval" and not e.own_trainer and (with_popularity or k != "popularity")
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
