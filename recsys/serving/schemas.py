"""Request and response models of the recommendation service (pydantic; BentoML turns a validation error
into HTTP 400 whose ``detail[].loc`` names the field).

User and item ids are the dataset's own (``serving.ids``): a strict 64-bit integer or a non-empty string, as
the dataset's ids are; a float (NaN included), a bool or an integer outside int64 is rejected, never
coerced, and the service answers 400 when the type is not the model's (a string id for a model whose ids
are integers, or the other way round). Timestamps are strict unix seconds. The static ``max_length`` caps
here only bound what is parsed; the configurable limits (``ServingConfig.max_history``, ``max_candidates``,
``max_k``) are checked by the service, which answers 400 naming the field as well.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
#: A user or item id as the dataset has it: an integer, or a string (SKU, UUID, "u_0042").
RawId = Int64 | Annotated[StrictStr, Field(min_length=1, max_length=512)]
Timestamp = Annotated[StrictInt, Field(ge=0, le=2**63 - 1, description="Unix seconds (UTC).")]
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]

# Parse-time caps, far above any sensible configured limit: they only stop absurd payloads early.
HARD_MAX_LIST = 100_000
HARD_MAX_K = 10_000

ColdStart = Literal["unknown_user", "empty_history"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HistoryEvent(_Strict):
    item_id: RawId
    ts: Timestamp
    value: FiniteFloat | None = Field(
        None, description="The event's value (rating, dwell seconds); feature-based rankers read it."
    )


class _UserRequest(_Strict):
    user_id: RawId | None = Field(
        None,
        description="The user's own id. A known user's stored history is used when no history is sent; "
        "an unknown one is served the popularity ranking, flagged cold_start 'unknown_user'.",
    )
    history: list[HistoryEvent] | None = Field(
        None,
        max_length=HARD_MAX_LIST,
        description="Explicit recent history (any order; sorted by ts); overrides the stored one. [] = cold.",
    )
    ts: Timestamp | None = Field(None, description="Request time; the server's clock when omitted.")

    @model_validator(mode="after")
    def _someone(self) -> _UserRequest:
        if self.user_id is None and self.history is None:
            raise ValueError("give user_id or history (or both)")
        return self


class RecommendOptions(_Strict):
    exclude_seen: StrictBool = Field(True, description="Never return an item of the user's history.")
    categories: list[str] | None = Field(
        None, min_length=1, max_length=1000, description="Only items whose category is one of these."
    )
    exclude_items: list[RawId] | None = Field(None, max_length=HARD_MAX_LIST)


Policy = Literal["top_k", "explore"]
POLICY_DESCRIPTION = (
    "top_k (default): the best-scored items in score order, propensity 1.0 each. explore: a Plackett-Luce "
    "draw over the scores (the serving policy temperature) with each item's propensity, for A/B tests and "
    "off-policy evaluation."
)


class RecommendRequest(_UserRequest):
    k: StrictInt = Field(10, ge=1, le=HARD_MAX_K, description="How many items to return.")
    options: RecommendOptions = RecommendOptions()
    policy: Policy = Field("top_k", description=POLICY_DESCRIPTION)


class RankRequest(_UserRequest):
    candidates: list[RawId] = Field(
        min_length=1,
        max_length=HARD_MAX_LIST,
        description="Item ids; an id the model does not know is a 400.",
    )
    policy: Policy = Field("top_k", description=POLICY_DESCRIPTION)


class ScoredItem(BaseModel):
    item_id: int | str = Field(description="The item's own id (as the dataset has it).")
    score: float
    position: int
    propensity: float


class ModelVersions(BaseModel):
    retriever: str
    ranker: str | None


#: Which scoring path produced a response's final scores: the generative ranker through M-FALCON (history
#: encoded once, candidates against its cached keys/values), a feature ranker's forward pass per candidate
#: row, the retrieval model's user-item dot product, a generative retriever's constrained beam search
#: (sequence log-probabilities), or the popularity prior.
ScoredBy = Literal["m-falcon", "per-candidate", "user-dot", "beam-search", "popularity"]


class RecommendResponse(BaseModel):
    request_id: int
    items: list[ScoredItem]
    source: Literal["ranker", "retrieval", "popularity"] = Field(
        description="What produced the scores: the ranker, the retrieval model, or the popularity fallback."
    )
    scored_by: ScoredBy | None = Field(
        None, description="The scoring path of the final scores (None: not scored by the service)."
    )
    cold_start: ColdStart | None
    unknown_history_items: list[int | str] = Field(
        description="History item ids the model does not know (ignored)."
    )
    models: ModelVersions


class RankResponse(BaseModel):
    request_id: int
    scores: dict[str, list[float]] = Field(description="Per task, one score per candidate, in request order.")
    ranking: list[int | str] = Field(
        description="The candidates in served order (by score, or the explore policy's draw)."
    )
    propensities: list[float] = Field(description="Propensity of each item of ``ranking`` at its position.")
    source: Literal["ranker", "retrieval", "popularity"]
    scored_by: ScoredBy | None = Field(
        None, description="The scoring path of the scores (None: not scored by the service)."
    )
    cold_start: ColdStart | None
    unknown_history_items: list[int | str]
    models: ModelVersions


class HealthResponse(BaseModel):
    status: Literal["ok"]
    ready: bool


class ModelInfo(BaseModel):
    tag: str
    architecture: str
    task: str
    data_version: str
    metrics: dict[str, float]
    registered_at: str
    num_items: int
    known_users: int
    user_id_type: Literal["int", "str"] = Field(description="Whether the model's user ids are strings.")
    item_id_type: Literal["int", "str"] = Field(description="Whether the model's item ids are strings.")


class MetadataResponse(BaseModel):
    service: str
    retriever: ModelInfo
    ranker: ModelInfo | None
    build_time: str | None = Field(description="When the bento was built (None when served from source).")
    started_at: str
    limits: dict[str, int]
    policy: dict[str, float | str] = Field(
        description="default (top_k); explore: the sampled policy (plackett-luce, greedy at temperature 0)."
    )
    retrieval_index: dict[str, bool | int | str] = Field(
        description="How recommend retrieves: kind 'exact' (every item scored) or 'ivf' (lists, probe)."
    )
