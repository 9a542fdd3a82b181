"""The recommendation service: one BentoML service class (``RecommendationService``) over a plain engine
(``Recommender``) that unit tests drive without a server.

Models are loaded once, at start, from pinned tags given by the environment (``ServingConfig.from_env``:
``RECSYS_SERVING_RETRIEVER``, optional ``RECSYS_SERVING_RANKER``, ...); every file is checksum-verified by
``serving.registry.load_model``.

recommend: the retrieval model scores every catalogue item (exact: one matrix product, then top-N), minus
the user's history (``exclude_seen``), the excluded items and the items outside the requested categories.
The top ``pool_size`` form the pool; the ranker (if one is served) re-scores the pool; the request's
``policy`` picks the k served items: ``top_k`` (the default) the k best scores, in score order, each logged
with propensity 1.0; ``explore`` a draw of the serving policy (``serving.impressions``: Plackett-Luce over
the final scores, temperature ``policy_temperature``), logged with its propensities (what the A/B simulator
and off-policy evaluation ask for).

rank: one score per candidate and per task of the scoring model (the ranker, else the retriever), plus the
served order of all candidates under the same policy choice. A generative ranker (``hstu-ranker``) scores
through M-FALCON (``recsys.serving.mfalcon``): the history is encoded once and the candidates are scored
against its cached keys/values in micro-batches; /rank and /recommend's re-ranking both take that path. Every
response says which path scored it (``scored_by``: ``m-falcon``, ``per-candidate`` for a feature ranker's
forward pass per candidate row, ``user-dot`` for the retrieval score, ``popularity``).

Ids: requests and responses use the dataset's own user and item ids (strings or integers, as ingested);
``serving.ids`` translates them to the internal ids the models, histories and impressions log use, with the
maps stored in the registered models. An id of the wrong type is a 400 naming the field.

OPEN choices, and what was picked:
- A retrieval HSTU or SASRec scores a candidate by cos(user vector, item) / temperature, the score it was
  trained for (``user-dot``); the user vector of an HSTU comes from the last query of its last block only
  (``serving.mfalcon.encode_user``).
- Supported models: retrievers ``hstu``, ``hstu-large``, ``sasrec``, ``popularity``; rankers of the same
  sequence family (e.g. ``hstu-large`` re-ranking a ``sasrec`` pool), the generative ranker
  ``hstu-ranker`` (M-FALCON), and the feature-based rankers (DeepFM,
  DLRM, DIN, RankMixer, LONGER, HyFormer, and distilled students of them) registered with
  ``serving.registry.register_ranker``, which packs their ``serving.featurize.RankingFeaturizer``. A feature
  ranker registered without one is refused at start with that reason. A feature ranker scores (user,
  candidate) rows built exactly as training's ``make_batch`` builds them (``recsys.serving.featurize``: same
  vocabularies, point-in-time statistics from the history strictly before the request ts, item-side
  statistics from the event log frozen at registration, candidates at slot position 0), ``ranker_rows``
  rows per forward pass (the generative ranker: M-FALCON per user over the same features, the history
  window read off the same ``UserFeatures``); its score is the task's logit (probability =
  sigmoid(score)), so the policy's Plackett-Luce draw is a softmax over logits. It reads the history sent
  with the request (``value`` per event optional) or, for a user id without one, its own stored history
  (with values), else the retriever's.
- Cold start: a user without a usable history (unknown user id, empty history, or only unknown items) gets
  the popularity ranking, log(1 + event count), flagged ``cold_start`` (``unknown_user`` or
  ``empty_history``) with ``source = popularity``: an unknown user is served, not refused (a 404 would make
  every new visitor an error). History items the model does not know are ignored and listed in
  ``unknown_history_items``. In rank, a candidate the scoring model does not know is a 400 naming it: a
  score for it would be a guess. When a ranker re-scores recommend's pool, a pool item the ranker does not
  know gets the prior of a never-seen item (the lowest known score minus 1).
- History: sorted by ts (stable); the model reads its most recent items (``max_len`` for SASRec,
  ``max_len - 1`` for HSTU, whose next slot is the query/candidate slot); ``exclude_seen`` uses all of it.
- Batching: requests of each endpoint are batched adaptively (``AdaptiveBatcher``): while one batch runs,
  arriving requests queue, and the next batch takes all of them (up to ``max_batch_size``); an idle
  service runs a lone request at once (``batch_wait_ms`` = 0 adds no wait). Inside a batch, histories are
  grouped by padded length (powers of two), so a short history never pays for the longest one. Batches run
  on the event loop's thread (a worker thread only traded the GIL with the loop).
- Processes and threads: ``workers`` (2) worker processes, each with its own models and batchers, one core
  each; ``torch_threads`` (1; 0 = torch's default) intra-op threads per process. On a busy CPU box 1 thread
  is much faster: one 199-item HSTU encoding took ~10 ms with 1 thread and ~900 ms with 2 threads
  competing with other processes.
- Per-request overhead (profiled with py-spy under 32 clients): BentoML's OpenTelemetry span and access log
  line per request are off (``OTEL_SDK_DISABLED``, ``access_log``), uvicorn runs on uvloop and httptools,
  request ids come from a counter (not one urandom read each), the user head encodes only the last query
  of the last HSTU block (``serving.mfalcon.encode_user``), the impressions spool writes from its own
  thread only.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, Literal, Self, TypeVar

import bentoml
import numpy as np
import torch
from bentoml.exceptions import InvalidArgument
from pydantic import Field, ValidationError, field_validator

import recsys.core  # noqa: F401  (environment defaults)
from recsys.core.config import FrozenModel
from recsys.models.hstu import HSTU
from recsys.models.hstu_ranker import HSTURanker
from recsys.models.popularity import Popularity
from recsys.models.sasrec import SASRec
from recsys.models.sequential import last_valid, valid_mask
from recsys.serving.ann import IvfItemIndex
from recsys.serving.errors import document_service
from recsys.serving.featurize import RankingFeaturizer, UserFeatures
from recsys.serving.ids import IdError, IdMaps, RawId
from recsys.serving.impressions import ImpressionLogger, plackett_luce_order
from recsys.serving.mfalcon import MFalconScorer, encode_user, from_features, truncate_history
from recsys.serving.middleware import (
    OPEN_PATHS,
    ConnectionRecycler,
    Readiness,
    RequestGuard,
    validate_api_key,
)
from recsys.serving.registry import LoadedModel, load_model
from recsys.serving.schemas import (
    HealthResponse,
    MetadataResponse,
    ModelInfo,
    ModelVersions,
    RankRequest,
    RankResponse,
    RecommendRequest,
    RecommendResponse,
    ScoredBy,
    ScoredItem,
)
from recsys.serving.user_embeddings import (
    UserEmbeddingRequest,
    UserEmbeddingResponse,
    load_user_embeddings,
    not_served,
)

# BentoML records an OpenTelemetry span per request even with tracing off (sample rate 0: the spans only
# feed the trace ids of the access log), ~10% of a rank request's CPU under load. Off unless the deployment
# sets OTEL_SDK_DISABLED itself (e.g. to export traces with BentoML's tracing settings).
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

ENV_PREFIX = "RECSYS_SERVING_"
API_KEY_HEADER = "x-api-key"
SEQUENCE_ARCHITECTURES = (HSTU, SASRec)


class ServerProcessConfig(FrozenModel):
    """The knobs BentoML reads when it imports the service (worker processes, access log), before any
    model tag is known; ``ServingConfig`` holds them too, so one ``from_env`` validates every variable."""

    workers: int = Field(
        2,
        ge=1,
        description="Worker processes, each with its own copy of the models and its own batchers. One "
        "process uses about one core (the GIL): 2 fills a 2-core box.",
    )
    access_log: bool = Field(
        False,
        description="BentoML's per-request access log line. Off by default: the impressions log already "
        "records every served list, and the log line cost ~9% of a rank request's CPU under load.",
    )
    keepalive_requests: int = Field(
        100,
        ge=0,
        description="End every n-th response of a worker with 'Connection: close' (0: never), so that "
        "keep-alive clients spread over the workers instead of staying where they first connected "
        "(serving/middleware.py).",
    )
    metrics: bool = Field(
        True,
        description="BentoML's Prometheus request metrics (GET /metrics). They cost ~4% of a rank request's "
        "CPU under load; a deployment that scrapes nothing can turn them off.",
    )
    api_key: str | None = Field(
        None,
        description="If set, every route but GET /livez, /healthz and /readyz needs header X-API-Key "
        "(checked before the body is read, serving.middleware.RequestGuard). Unset: no authentication; "
        "set but empty: an error.",
    )
    max_body_bytes: int = Field(
        1 << 20,
        ge=1,
        description="Largest request body (413 above it, before it is read). 1 MiB is ~6x the largest "
        "request the default limits allow (1000 history events with values, 2000 candidates).",
    )

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        return validate_api_key(value)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            # An empty variable means "unset", except the API key: an empty key must not turn auth off.
            if raw is not None and (raw != "" or name == "api_key"):
                values[name] = raw
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENV_PREFIX}{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"invalid serving configuration: {problems}") from None


class ServingConfig(ServerProcessConfig):
    """Every knob of the service; ``from_env`` reads ``RECSYS_SERVING_<FIELD>`` (upper case)."""

    retriever: str = Field(
        min_length=1, description="Tag of the retrieval model (name:version or name:latest)."
    )
    ranker: str | None = Field(None, description="Tag of the ranker; None = rank by retrieval scores.")
    user_embeddings: str | None = Field(
        None,
        description="Tag of registered user embeddings served at /user_embedding (serving.user_embeddings).",
    )
    max_history: int = Field(1000, ge=1, description="Most history events a request may send.")
    max_candidates: int = Field(2000, ge=1, description="Most candidates (and excluded items) per request.")
    max_k: int = Field(200, ge=1, description="Largest k of recommend.")
    pool_size: int = Field(200, ge=1, description="Retrieval top-N that the ranker and the policy see.")
    policy_temperature: float = Field(1.0, ge=0.0, description="Plackett-Luce temperature; 0 = greedy.")
    retrieval_index: Literal["exact", "ivf"] = Field(
        "exact",
        description="recommend's retrieval: 'exact' scores every item; 'ivf' searches a FAISS IVF index of "
        "the item vectors (large catalogues; serving.ann). Popularity retrievers are always exact.",
    )
    ivf_lists: int | None = Field(None, ge=1, description="IVF cells; None = 4 * sqrt(items).")
    ivf_probe: int = Field(64, ge=1, description="IVF cells searched per request (recall 0.97 at 1M items).")
    ivf_overfetch: int = Field(
        4, ge=1, description="IVF: fetch this many times the pool when a category filter applies."
    )
    ivf_cache: bool = Field(
        True, description="IVF: reuse the index a previous start built, from <state>/cache/ann (checksummed)."
    )
    micro_batch: int = Field(256, ge=1, description="M-FALCON candidates per micro-batch.")
    beam_width: int | None = Field(
        None, ge=1, description="Generative retrievers: beam width of /recommend; None = the registered one."
    )
    ranker_rows: int = Field(
        4096, ge=1, description="Feature rankers: most (user, candidate) rows per forward pass."
    )
    unique_pooling: bool = Field(
        False,
        description="Feature rankers: behaviour sequences as unique ids + inverse index (built on the host, "
        "pooled on the device: models.ops.unique_pooling); same scores, fewer bytes to a GPU.",
    )
    max_batch_size: int = Field(32, ge=1, description="Most requests per model batch.")
    batch_wait_ms: float = Field(0.0, ge=0.0, description="Extra wait to fill a batch (0: none).")
    log_impressions: bool = True
    impressions_dir: Path | None = Field(
        None, description="Spool directory; default <state>/serving/impressions."
    )
    impressions_max_positions: int = Field(
        100, ge=1, description="Positions of a served list that are logged."
    )
    impressions_max_buffered_rows: int = Field(
        500_000,
        ge=1,
        description="Most impression rows held in memory awaiting the spool writer; lists past it are "
        "dropped and counted (recsys_impressions_dropped_rows_total), never waited for.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(
        1,
        ge=0,
        description="Intra-op threads of the server process (torch.set_num_threads at start); 0 = torch's "
        "default. 1 suits a busy or shared CPU box: the event loop, the batch worker and the impressions "
        "spool already keep the cores busy, and intra-op threads only contend with them.",
    )
    request_id_seed: int | None = Field(
        None,
        ge=0,
        description="Fixes the request ids (and so the policy's draws) of a fresh engine: for reproducible "
        "simulations. None (serving): a random prefix per process.",
    )
    build_time: str | None = Field(None, description="Set by serving.build in the bento's environment.")


class InvalidRequest(InvalidArgument):
    """400 whose message starts with the offending field."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name


# -- one served model --------------------------------------------------------------------------------------
@dataclass
class MappedHistory:
    """A history in one model's index: idx/ts of the known items (oldest first), and the unknown raw ids."""

    idx: np.ndarray
    ts: np.ndarray
    unknown: list[int]


class ModelRuntime:
    """A loaded model with its catalogue lookups and batched scoring functions (no grad, eval mode)."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        micro_batch: int,
        ranker_rows: int = 4096,
        unique_pooling: bool = False,
    ) -> None:
        module = loaded.module
        self.featurizer: RankingFeaturizer | None = loaded.featurizer
        if not isinstance(module, (*SEQUENCE_ARCHITECTURES, Popularity)) and self.featurizer is None:
            raise ValueError(
                f"{loaded.tag}: {loaded.card.architecture} needs request-time features but was registered "
                "without a featurizer; register it with serving.registry.register_ranker"
            )
        self.ranker_rows = ranker_rows
        self.unique_pooling = unique_pooling
        self.loaded = loaded
        self.tag = loaded.tag
        self.card = loaded.card
        self.catalog = loaded.catalog
        self.device = device
        self.module = module.to(device).eval()
        self.tasks = tuple(loaded.card.tasks)
        self._index_catalogue(loaded.catalog.item_ids[1:])
        self.prior = torch.log1p(
            torch.as_tensor(loaded.catalog.popularity, dtype=torch.float32, device=device)
        )
        self.prior[0] = float("-inf")
        self._category_masks: dict[tuple[str, ...], torch.Tensor] = {}
        self.mfalcon: MFalconScorer | None = None
        self.item_table: torch.Tensor | None = None
        self.ann: IvfItemIndex | None = None  # set by the Recommender when retrieval_index is 'ivf'
        if isinstance(module, SEQUENCE_ARCHITECTURES):
            with torch.inference_mode():
                self.item_table = module.item_vectors().detach()  # [N + 1, D], computed once
            self.max_history = (
                module.config.max_len - 1 if isinstance(module, HSTU) else module.config.max_len
            )
        elif self.featurizer is not None:
            self.max_history = self.featurizer.max_len
            if isinstance(module, HSTURanker):
                self.mfalcon = MFalconScorer(self.module, micro_batch)
        else:
            self.max_history = 0

    def _index_catalogue(self, ids: np.ndarray) -> None:
        """Raw item ids (item_idx 1..N in order) -> the lookups of ``map_items``."""
        order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[order]
        self._sorted_idx = (order + 1).astype(np.int64)
        # Integer ids that are dense enough (at most 4 slots per item): a direct table instead of a binary
        # search (3 lookups of 1,000 ids per rank request; searchsorted was ~10% of its CPU under load).
        self._id_table: np.ndarray | None = None
        if ids.size and ids.dtype.kind == "i" and ids.min() >= 0 and ids.max() < 4 * ids.size + 1024:
            self._id_table = np.zeros(int(ids.max()) + 1, dtype=np.int64)
            self._id_table[self._sorted_ids] = self._sorted_idx

    @property
    def is_popularity(self) -> bool:
        return isinstance(self.module, Popularity)

    @property
    def scored_by(self) -> ScoredBy:
        """The scoring path of this model's candidate scores."""
        if self.is_popularity:
            return "popularity"
        if self.mfalcon is not None:
            return "m-falcon"
        return "per-candidate" if self.featurizer is not None else "user-dot"

    def map_items(self, ids: np.ndarray) -> np.ndarray:
        """Raw item ids -> this model's item_idx (0 for unknown ids)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self._sorted_ids) == 0 or ids.size == 0:
            return np.zeros(ids.shape, dtype=np.int64)
        table = self._id_table
        if table is not None:
            inside = (ids >= 0) & (ids < table.size)
            return np.where(inside, table[np.where(inside, ids, 0)], 0)
        pos = np.searchsorted(self._sorted_ids, ids).clip(max=len(self._sorted_ids) - 1)
        return np.where(self._sorted_ids[pos] == ids, self._sorted_idx[pos], 0)

    def map_history(self, ids: np.ndarray, ts: np.ndarray) -> MappedHistory:
        idx = self.map_items(ids)
        known = idx > 0
        return MappedHistory(idx[known], ts[known], [int(i) for i in ids[~known]])

    def category_mask(self, categories: tuple[str, ...]) -> torch.Tensor:
        """[N + 1] bool: items whose category is one of ``categories`` (cached per set)."""
        mask = self._category_masks.get(categories)
        if mask is None:
            wanted = set(categories)
            allowed = np.fromiter((c in wanted for c in self.catalog.category), dtype=bool)
            mask = torch.as_tensor(allowed, device=self.device)
            if len(self._category_masks) < 1024:
                self._category_masks[categories] = mask
        return mask

    def _padded(self, histories: list[MappedHistory]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded [B, L] items/ts of each history's most recent ``max_history`` items, lengths [B]."""
        recent = [(h.idx[-self.max_history :], h.ts[-self.max_history :]) for h in histories]
        width = max(1, max(len(i) for i, _ in recent))
        items = np.zeros((len(recent), width), dtype=np.int64)
        ts = np.zeros_like(items)
        lengths = np.zeros(len(recent), dtype=np.int64)
        for r, (i, t) in enumerate(recent):
            items[r, : len(i)], ts[r, : len(t)], lengths[r] = i, t, len(i)
        return (
            torch.from_numpy(items).to(self.device),
            torch.from_numpy(ts).to(self.device),
            torch.from_numpy(lengths).to(self.device),
        )

    def _length_groups(self, histories: list[MappedHistory]) -> list[np.ndarray]:
        """Row indices grouped by padded width (next power of two, at least 8): a short history is not
        padded to the batch's longest one (attention costs the square of the padded width)."""
        groups: dict[int, list[int]] = {}
        for row, h in enumerate(histories):
            n = min(len(h.idx), self.max_history)
            groups.setdefault(max(8, 1 << max(n - 1, 0).bit_length()), []).append(row)
        return [np.asarray(rows, dtype=np.int64) for _, rows in sorted(groups.items())]

    @torch.inference_mode()
    def user_vectors(self, histories: list[MappedHistory], request_ts: np.ndarray) -> torch.Tensor:
        """[B, D] user vectors at the request time, as the model scores them (batched by history length)."""
        request_ts = np.asarray(request_ts, dtype=np.int64)
        out: torch.Tensor | None = None
        for rows in self._length_groups(histories):
            part = self._user_vectors([histories[r] for r in rows], request_ts[rows])
            if out is None:
                out = part.new_empty(len(histories), part.shape[-1])
            out[torch.from_numpy(rows).to(self.device)] = part
        assert out is not None
        return out

    def _user_vectors(self, histories: list[MappedHistory], request_ts: np.ndarray) -> torch.Tensor:
        items, ts, lengths = self._padded(histories)
        req = torch.from_numpy(request_ts).to(self.device)
        if isinstance(self.module, HSTU):
            items, ts, lengths = truncate_history(items, ts, lengths, self.max_history)
            return encode_user(self.module, items, ts, lengths, req)
        query_ts = ts.clone()
        query_ts[:, :-1] = ts[:, 1:]
        rows = torch.arange(items.shape[0], device=self.device)
        query_ts[rows, (lengths - 1).clamp(min=0)] = req
        query_ts = query_ts * valid_mask(lengths, items.shape[1]).to(ts.dtype)
        return last_valid(self.module(items, ts, query_ts, lengths), lengths)

    @torch.inference_mode()
    def score_all(self, histories: list[MappedHistory], request_ts: np.ndarray) -> torch.Tensor:
        """[B, N + 1] retrieval scores of every item (column 0, padding, is -inf)."""
        if self.is_popularity:
            return self.prior.expand(len(histories), -1).clone()
        assert self.item_table is not None
        scores = self.user_vectors(histories, request_ts) @ self.item_table.T / self.card.temperature
        scores[:, 0] = float("-inf")
        return scores

    @torch.inference_mode()
    def score_candidates(
        self, histories: list[MappedHistory], request_ts: np.ndarray, candidates: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """candidates [B, M] item_idx (0 = padding or unknown) -> {task: [B, M]} (unknown/padding: 0)."""
        if self.is_popularity:
            prior = self.prior[candidates].clamp(min=0.0)
            return {task: prior for task in self.tasks}
        assert self.item_table is not None
        user = self.user_vectors(histories, request_ts)  # [B, D]
        dots = torch.einsum("bd,bmd->bm", user, self.item_table[candidates]) / self.card.temperature
        return {task: dots for task in self.tasks}

    @torch.inference_mode()
    def score_features(
        self, users: list[UserFeatures], candidates: list[np.ndarray]
    ) -> list[dict[str, np.ndarray]]:
        """Feature rankers: per user, {task: logit per candidate} (candidates: item_idx, 0 = unknown, whose
        score is left 0). Rows of all users are scored together, ``ranker_rows`` per forward pass."""
        f = self.featurizer
        assert f is not None
        out = [{t: np.zeros(len(c), dtype=np.float64) for t in self.tasks} for c in candidates]
        if self.mfalcon is not None:
            return self._score_mfalcon(users, candidates, out)
        pieces: list[tuple[int, np.ndarray]] = []  # (user row, positions of its known candidates)
        for r, c in enumerate(candidates):
            known = np.flatnonzero(c > 0)
            pieces += [(r, known[a : a + self.ranker_rows]) for a in range(0, known.size, self.ranker_rows)]
        group: list[tuple[int, np.ndarray]] = []
        rows = 0
        for piece in [*pieces, None]:
            if piece is not None and rows + piece[1].size <= self.ranker_rows:
                group.append(piece)
                rows += piece[1].size
                continue
            if group:
                batch = f.batch([users[r] for r, _ in group], [candidates[r][pos] for r, pos in group])
                if self.unique_pooling:
                    batch = batch.deduplicated()
                logits = self.module(batch.to(self.device)).logits
                at = 0
                for r, pos in group:
                    for t in self.tasks:
                        out[r][t][pos] = logits[t][at : at + pos.size].double().cpu().numpy()
                    at += pos.size
            group, rows = ([piece], piece[1].size) if piece is not None else ([], 0)
        return out

    def _score_mfalcon(
        self,
        users: list[UserFeatures],
        candidates: list[np.ndarray],
        out: list[dict[str, np.ndarray]],
    ) -> list[dict[str, np.ndarray]]:
        """The generative ranker: each user's history encoded once, its known candidates scored against the
        cache (M-FALCON); users grouped by history length as the retriever groups them."""
        f, scorer = self.featurizer, self.mfalcon
        assert f is not None and scorer is not None
        known = [np.flatnonzero(c > 0) for c in candidates]
        rows = [r for r, k in enumerate(known) if k.size]
        groups: dict[int, list[int]] = {}
        for r in rows:  # attention costs the square of the padded width: group by it (powers of two)
            groups.setdefault(max(8, 1 << max(users[r].items.size - 1, 0).bit_length()), []).append(r)
        for group in groups.values():
            cand = [candidates[r][known[r]] for r in group]
            batch = f.batch([users[r] for r in group], cand)
            history, targets = from_features([users[r] for r in group], cand, batch)
            logits = scorer.score(history.to(self.device), targets.to(self.device))
            for i, r in enumerate(group):
                for t in self.tasks:
                    out[r][t][known[r]] = logits[t][i, : known[r].size].double().cpu().numpy()
        return out

    def info(self) -> ModelInfo:
        return ModelInfo(
            tag=self.tag,
            architecture=self.card.architecture,
            task=self.card.task,
            data_version=self.card.data_version,
            metrics=dict(self.card.metrics),
            registered_at=self.loaded.created_at,
            num_items=self.catalog.num_items,
            known_users=self.featurizer.n_users if self.featurizer else len(self.loaded.histories),
            user_id_type=self.loaded.ids.user_type,
            item_id_type=self.loaded.ids.item_type,
        )


# -- requests as the engine sees them ----------------------------------------------------------------------
@dataclass
class UserContext:
    user_id: int | None
    history_ids: np.ndarray  # raw ids, time order (all of them)
    history_ts: np.ndarray
    request_ts: int
    unknown_user: bool
    mapped: dict[str, MappedHistory] = field(default_factory=dict)  # model tag -> history in its index
    history_values: np.ndarray | None = None  # event values (NaN: none) of a history sent with the request
    explicit: bool = False  # the history came with the request (else: a stored one)
    unknown_raw: dict[int, RawId] = field(default_factory=dict)  # placeholder id -> raw id (serving.ids)

    def history_for(self, model: ModelRuntime) -> MappedHistory:
        if model.tag not in self.mapped:
            self.mapped[model.tag] = model.map_history(self.history_ids, self.history_ts)
        return self.mapped[model.tag]

    def cold_start(self, model: ModelRuntime) -> Literal["unknown_user", "empty_history"] | None:
        if self.unknown_user:
            return "unknown_user"
        return "empty_history" if len(self.history_for(model).idx) == 0 else None

    def features_for(self, featurizer: RankingFeaturizer) -> UserFeatures:
        """The user at the request time as a feature ranker sees it: the sent history (with its values), or
        the ranker's own stored history (with values) of a user it knows, else the retriever's stored one."""
        if not self.explicit and featurizer.knows_user(self.user_id):
            return featurizer.user_features(self.user_id, self.request_ts)
        history = (self.history_ids, self.history_ts, self.history_values)
        return featurizer.user_features(self.user_id, self.request_ts, history)


Policy = Literal["top_k", "explore"]


@dataclass
class RecommendJob:
    user: UserContext
    k: int
    exclude_seen: bool
    categories: tuple[str, ...] | None
    exclude_items: np.ndarray
    policy: Policy = "top_k"
    model_s: float = 0.0  # CPU seconds of this job's share of its batch (timed_batches)


@dataclass
class RankJob:
    user: UserContext
    candidates: np.ndarray  # internal ids, request order
    policy: Policy = "top_k"
    model_s: float = 0.0  # CPU seconds of this job's share of its batch (timed_batches)


@dataclass
class Pool:
    """What the policy draws from: item ids and their final scores (recommend) or all candidates (rank)."""

    item_ids: np.ndarray
    scores: np.ndarray
    source: Literal["ranker", "retrieval", "popularity"]
    task_scores: dict[str, np.ndarray] = field(default_factory=dict)  # rank: per task, request order


J = TypeVar("J")
R = TypeVar("R")


class AdaptiveBatcher(Generic[J, R]):
    """Runs ``fn`` over batches of jobs on the event loop's thread, one batch at a time per batcher.

    A job that arrives while a batch runs waits for the next one, which takes every queued job (up to
    ``max_batch_size``): batches grow with the load and a lone request is not delayed (``max_wait_ms`` 0).
    ``fn`` runs inline, not in a worker thread: the model's steps are short and mostly Python, so a thread
    only traded the GIL back and forth with the loop (measured: inline gives ~15% more requests/s and a
    lower p99 under load); the loop reads the sockets again between batches, and more worker processes
    (``RECSYS_SERVING_WORKERS``) use more cores.
    """

    COLLECT_YIELDS = 4  # loop iterations a new batch waits for requests already being parsed

    def __init__(
        self, fn: Callable[[list[J]], list[R]], max_batch_size: int, max_wait_ms: float = 0.0
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_ms >= 0")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[tuple[J, asyncio.Future[R]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # recent batch sizes (bounded), for tests and metrics

    async def submit(self, job: J) -> R:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(self._queue))
        future: asyncio.Future[R] = loop.create_future()
        await self._queue.put((job, future))
        return await future

    async def _run(self, queue: asyncio.Queue[tuple[J, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            # Let the loop finish the requests whose bodies already arrived (each passes a few awaits in
            # the middleware before it reaches submit): they join this batch instead of the next one.
            for _ in range(self.COLLECT_YIELDS):
                await asyncio.sleep(0)
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            live = [(j, f) for j, f in batch if not f.cancelled()]
            if not live:
                continue
            self.batch_sizes = [*self.batch_sizes[-999:], len(live)]
            try:
                results = self.fn([j for j, _ in live])
            except Exception as exc:
                if len(live) == 1:
                    if not live[0][1].done():
                        live[0][1].set_exception(exc)
                    continue
                # One bad request must not fail the others: run each job of the failed batch alone, so
                # each caller gets its own result or its own error.
                results = None
            if results is None:
                self._run_alone(live)
                continue
            for (_, f), result in zip(live, results, strict=True):
                if not f.done():
                    f.set_result(result)

    def _run_alone(self, live: list[tuple[J, asyncio.Future[R]]]) -> None:
        for job, future in live:
            try:
                (result,) = self.fn([job])
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)


TimedJob = TypeVar("TimedJob", RecommendJob, RankJob)


def timed_batches(fn: Callable[[list[TimedJob]], list[R]]) -> Callable[[list[TimedJob]], list[R]]:
    """``fn`` that also records on each job its share of the batch's CPU time (``model_s``): the model's
    part of a request, reported in the ``server-timing`` header. Thread CPU, so a neighbour process
    holding the core does not count."""

    def run(jobs: list[TimedJob]) -> list[R]:
        started = time.thread_time()
        out = fn(jobs)
        share = (time.thread_time() - started) / max(len(jobs), 1)
        for job in jobs:
            job.model_s = share
        return out

    return run


def server_timing(parts: Mapping[str, float]) -> str:
    """A ``server-timing`` header value: ``name;dur=<ms>`` per part (seconds in)."""
    return ", ".join(f"{name};dur={seconds * 1e3:.4f}" for name, seconds in parts.items())


class RequestIds:
    """Unique 63-bit request ids: a random 31-bit prefix per engine, then a counter.

    One urandom read per process instead of one per request (``secrets.randbits`` per request was ~7% of a
    rank request's CPU under load); the prefix keeps ids of different workers and restarts apart (a clash
    needs two engines drawing the same prefix: about one in 2^31 per pair)."""

    def __init__(self, prefix: int | None = None) -> None:
        self.prefix = secrets.randbits(31) if prefix is None else prefix
        if not 0 <= self.prefix < 2**31:
            raise ValueError(f"prefix must be in [0, 2^31), got {self.prefix}")
        self._counter = itertools.count()  # next() is atomic under the GIL: safe across batch threads

    @classmethod
    def seeded(cls, seed: int, *names: str) -> RequestIds:
        """A reproducible sequence; ``names`` (e.g. the model tags) keep engines of one seed apart."""
        digest = hashlib.blake2b(repr((seed, names)).encode(), digest_size=4).digest()
        return cls(prefix=int.from_bytes(digest, "big") >> 1)

    def next(self) -> int:
        return (self.prefix << 32) | (next(self._counter) & 0xFFFFFFFF)


# -- the engine --------------------------------------------------------------------------------------------
def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Recommender:
    """The service logic without BentoML: request checks, batched scoring, the policy, impression logging."""

    def __init__(
        self,
        config: ServingConfig,
        retriever: LoadedModel,
        ranker: LoadedModel | None = None,
        logger: ImpressionLogger | None = None,
    ) -> None:
        device = _resolve_device(config.device)
        self.config = config
        if retriever.featurizer is not None:
            raise ValueError(f"{retriever.tag} is a feature-based ranker, not a retriever")
        from recsys.serving.generative import GenerativeRuntime, is_generative  # imports this module

        self.retriever = (
            GenerativeRuntime(retriever, device, config.beam_width)
            if is_generative(retriever)
            else ModelRuntime(retriever, device, config.micro_batch)
        )
        self.ranker = (
            ModelRuntime(ranker, device, config.micro_batch, config.ranker_rows, config.unique_pooling)
            if ranker
            else None
        )
        if retriever.card.task != "retrieval":
            raise ValueError(f"{retriever.tag} is a {retriever.card.task} model, not a retriever")
        if config.retrieval_index == "ivf" and self.retriever.item_table is not None:
            vectors = self.retriever.item_table.cpu().numpy()
            lists, probe, threads = config.ivf_lists, config.ivf_probe, config.torch_threads or None
            self.retriever.ann = (  # the cache: serving.ann.default_cache_dir(), <state>/cache/ann
                IvfItemIndex.build_or_load(vectors, lists=lists, probe=probe, threads=threads)
                if config.ivf_cache
                else IvfItemIndex(vectors, lists=lists, probe=probe, threads=threads)
            )
        if ranker is not None and ranker.card.task != "ranking":
            raise ValueError(f"{ranker.tag} is a {ranker.card.task} model, not a ranker")
        self.logger = logger
        self.last_log_s = 0.0  # CPU seconds of the last served list's impressions logging (request path)
        self._request_ids = (
            RequestIds()
            if config.request_id_seed is None
            else RequestIds.seeded(config.request_id_seed, retriever.tag, ranker.tag if ranker else "")
        )
        self.histories = retriever.histories
        # Raw <-> internal ids: the retriever's maps, with the ranker's users (a user only it knows).
        self.ids: IdMaps = retriever.ids
        if ranker is not None:
            try:
                retriever.ids.check_item_type(ranker.ids)
                self.ids = retriever.ids.merged(ranker.ids)
            except IdError as exc:
                raise ValueError(
                    f"{retriever.tag} and {ranker.tag} do not name users/items alike: {exc}"
                ) from exc
        self.versions = ModelVersions(
            retriever=self.retriever.tag, ranker=self.ranker.tag if self.ranker else None
        )

    @classmethod
    def from_config(cls, config: ServingConfig, logger: ImpressionLogger | None = None) -> Recommender:
        retriever = load_model(config.retriever)
        ranker = load_model(config.ranker) if config.ranker else None
        return cls(config, retriever, ranker, logger)

    # -- request checks -------------------------------------------------------------------------------------
    def _internal_items(self, raw: list[RawId], field_name: str) -> tuple[np.ndarray, dict[int, RawId]]:
        try:
            translated = self.ids.items_internal(raw, field_name)
        except IdError as exc:
            raise InvalidRequest(exc.field, exc.problem) from None
        return translated.internal, translated.unknown

    def user_context(self, request: RecommendRequest | RankRequest) -> UserContext:
        request_ts = request.ts if request.ts is not None else int(time.time())
        try:
            user_id = self.ids.user_internal(request.user_id)  # None: no id, or a raw id nobody knows
        except IdError as exc:
            raise InvalidRequest(exc.field, exc.problem) from None
        if request.history is not None:
            if len(request.history) > self.config.max_history:
                raise InvalidRequest(
                    "history",
                    f"{len(request.history)} events exceed the limit of {self.config.max_history} "
                    f"({ENV_PREFIX}MAX_HISTORY)",
                )
            ids, unknown_raw = self._internal_items([e.item_id for e in request.history], "history.item_id")
            ts = np.fromiter((e.ts for e in request.history), dtype=np.int64, count=len(request.history))
            values = np.fromiter(
                (np.nan if e.value is None else e.value for e in request.history),
                dtype=np.float64,
                count=len(request.history),
            )
            order = np.argsort(ts, kind="stable")
            return UserContext(
                user_id,
                ids[order],
                ts[order],
                request_ts,
                unknown_user=False,
                history_values=values[order],
                explicit=True,
                unknown_raw=unknown_raw,
            )
        stored = self.histories.get(user_id) if user_id is not None else None
        featurizer = self.ranker.featurizer if self.ranker is not None else None
        if stored is None and featurizer is not None:  # a user only the ranker's data knows
            ranker_history = featurizer.stored_history(user_id)
            if ranker_history is not None:
                ids, ts, values = ranker_history
                return UserContext(user_id, ids, ts, request_ts, unknown_user=False, history_values=values)
        if stored is None:
            empty = np.zeros(0, dtype=np.int64)
            return UserContext(user_id, empty, empty, request_ts, unknown_user=True)
        return UserContext(user_id, stored[0], stored[1], request_ts, unknown_user=False)

    def recommend_job(self, request: RecommendRequest) -> RecommendJob:
        if request.k > self.config.max_k:
            raise InvalidRequest(
                "k", f"{request.k} exceeds the limit of {self.config.max_k} ({ENV_PREFIX}MAX_K)"
            )
        excluded = request.options.exclude_items or []
        if len(excluded) > self.config.max_candidates:
            raise InvalidRequest(
                "options.exclude_items",
                f"{len(excluded)} items exceed the limit of {self.config.max_candidates} "
                f"({ENV_PREFIX}MAX_CANDIDATES)",
            )
        categories = request.options.categories
        excluded_ids, _unknown = self._internal_items(excluded, "options.exclude_items")
        return RecommendJob(
            user=self.user_context(request),
            k=request.k,
            exclude_seen=request.options.exclude_seen,
            categories=tuple(sorted(set(categories))) if categories is not None else None,
            exclude_items=excluded_ids,  # unknown items (placeholders < 0) cannot be served anyway
            policy=request.policy,
        )

    def rank_job(self, request: RankRequest) -> RankJob:
        n = len(request.candidates)
        if n > self.config.max_candidates:
            raise InvalidRequest(
                "candidates",
                f"{n} items exceed the limit of {self.config.max_candidates} ({ENV_PREFIX}MAX_CANDIDATES)",
            )
        candidates, unknown_raw = self._internal_items(request.candidates, "candidates")
        ordered = np.sort(candidates)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if repeated.size:
            names = self.ids.items_raw(np.unique(repeated)[:10], unknown_raw)
            raise InvalidRequest("candidates", f"duplicate item ids {names}")
        model = self.ranker or self.retriever
        unknown = candidates[model.map_items(candidates) == 0]
        if unknown.size:
            names = self.ids.items_raw(unknown[:10], unknown_raw)
            more = f" and {unknown.size - 10} more" if unknown.size > 10 else ""
            raise InvalidRequest(
                "candidates", f"unknown item ids {names}{more}: not in the catalogue of {model.tag}"
            )
        return RankJob(user=self.user_context(request), candidates=candidates, policy=request.policy)

    # -- batched scoring ------------------------------------------------------------------------------------
    def _dropped(self, job: RecommendJob) -> np.ndarray:
        """item_idx (> 0) that recommend must not return for this job: excluded items, and the history."""
        model = self.retriever
        drop = model.map_items(job.exclude_items)
        if job.exclude_seen:
            drop = np.concatenate([drop, model.map_items(job.user.history_ids)])
        return drop[drop > 0]

    def _masked_scores(self, jobs: list[RecommendJob]) -> tuple[torch.Tensor, list[str | None]]:
        """[B, N + 1] retrieval (or popularity, for cold users) scores with exclusions set to -inf."""
        model = self.retriever
        cold = [job.user.cold_start(model) for job in jobs]
        warm = [i for i, c in enumerate(cold) if c is None]
        scores = model.prior.expand(len(jobs), -1).clone()  # popularity for the cold rows
        if warm:
            histories = [jobs[i].user.history_for(model) for i in warm]
            request_ts = np.array([jobs[i].user.request_ts for i in warm], dtype=np.int64)
            scores[warm] = model.score_all(histories, request_ts).to(scores.dtype)
        for row, job in enumerate(jobs):
            drop = self._dropped(job)
            if drop.size:
                scores[row, torch.from_numpy(drop).to(scores.device)] = float("-inf")
            if job.categories is not None:
                scores[row, ~model.category_mask(job.categories)] = float("-inf")
        return scores, cold

    def _exact_pools(self, jobs: list[RecommendJob], pool_size: int) -> list[Pool]:
        """Every item scored, exclusions removed, the top ``pool_size`` of each row."""
        model = self.retriever
        scores, cold = self._masked_scores(jobs)
        top_scores, top_idx = torch.topk(scores, pool_size, dim=1)  # exact top-N, [B, P]
        top_scores, top_idx = top_scores.cpu().numpy(), top_idx.cpu().numpy()
        pools = []
        for row, c in enumerate(cold):
            finite = np.isfinite(top_scores[row])
            ids = model.catalog.item_ids[top_idx[row][finite]]
            source: Literal["ranker", "retrieval", "popularity"] = "popularity" if c else "retrieval"
            if model.is_popularity:
                source = "popularity"
            pools.append(Pool(ids, top_scores[row][finite].astype(np.float64), source))
        return pools

    def _ann_pools(self, jobs: list[RecommendJob], pool_size: int) -> list[Pool]:
        """Warm users through the IVF index (exclusions applied to what it returns); cold users, and rows
        the index left with fewer than k items after the exclusions, scored exactly."""
        model = self.retriever
        assert model.ann is not None
        pools: list[Pool | None] = [None] * len(jobs)
        cold = [job.user.cold_start(model) is not None for job in jobs]
        exact = [i for i, c in enumerate(cold) if c]
        warm = [i for i, c in enumerate(cold) if not c]
        if warm:
            histories = [jobs[i].user.history_for(model) for i in warm]
            request_ts = np.array([jobs[i].user.request_ts for i in warm], dtype=np.int64)
            users = model.user_vectors(histories, request_ts).float().cpu().numpy()
            drops = [self._dropped(jobs[i]) for i in warm]
            fetch = pool_size + max(d.size for d in drops)
            if any(jobs[i].categories is not None for i in warm):
                fetch *= self.config.ivf_overfetch
            found = model.ann.search(users, fetch)
            for row, (i, drop) in enumerate(zip(warm, drops, strict=True)):
                idx, score = found.item_idx[row], found.scores[row]
                keep = (idx > 0) & ~np.isin(idx, drop)
                if jobs[i].categories is not None:
                    keep &= model.category_mask(jobs[i].categories).cpu().numpy()[idx]
                idx, score = idx[keep][:pool_size], score[keep][:pool_size]
                if idx.size < jobs[i].k:  # the probed cells ran short: this row is scored exactly
                    exact.append(i)
                    continue
                scores = score.astype(np.float64) / model.card.temperature  # = the exact path's scores
                pools[i] = Pool(model.catalog.item_ids[idx], scores, "retrieval")
        if exact:
            exact.sort()
            for i, pool in zip(exact, self._exact_pools([jobs[i] for i in exact], pool_size), strict=True):
                pools[i] = pool
        return [p for p in pools if p is not None]

    def recommend_many(self, jobs: list[RecommendJob]) -> list[Pool]:
        model = self.retriever
        cold = [job.user.cold_start(model) for job in jobs]
        pool_size = min(max(self.config.pool_size, max(job.k for job in jobs)), model.catalog.num_items)
        pools = (
            self._ann_pools(jobs, pool_size) if model.ann is not None else self._exact_pools(jobs, pool_size)
        )
        if self.ranker is not None:
            rerank = [i for i, c in enumerate(cold) if c is None and len(pools[i].item_ids)]
            if rerank:
                primary = self._rank_scores(
                    [jobs[i].user for i in rerank], [pools[i].item_ids for i in rerank]
                )
                for i, (task_scores, _unknown) in zip(rerank, primary, strict=True):
                    pools[i] = Pool(pools[i].item_ids, task_scores[self.ranker.tasks[0]], "ranker")
        return pools

    def _rank_scores(
        self, users: list[UserContext], candidates: list[np.ndarray], model: ModelRuntime | None = None
    ) -> list[tuple[dict[str, np.ndarray], list[int]]]:
        """Per user: {task: scores in candidate order} and the unknown candidate ids (warm users only)."""
        model = model or self.ranker or self.retriever
        idx = [model.map_items(c) for c in candidates]
        if model.featurizer is not None:
            f = model.featurizer
            per_user = model.score_features([u.features_for(f) for u in users], idx)
            return [
                ({t: _with_prior(s, i > 0) for t, s in scores.items()}, [int(x) for x in c[i == 0]])
                for scores, i, c in zip(per_user, idx, candidates, strict=True)
            ]
        width = max(1, max(len(i) for i in idx))
        padded = np.zeros((len(idx), width), dtype=np.int64)
        for r, i in enumerate(idx):
            padded[r, : len(i)] = i
        request_ts = np.array([u.request_ts for u in users], dtype=np.int64)
        scores = model.score_candidates(
            [u.history_for(model) for u in users], request_ts, torch.from_numpy(padded).to(model.device)
        )
        out = []
        for r, i in enumerate(idx):
            known = i > 0
            per_task = {}
            for task, s in scores.items():
                row = s[r, : len(i)].float().cpu().numpy().astype(np.float64)
                per_task[task] = _with_prior(row, known)
            out.append((per_task, [int(x) for x in candidates[r][~known]]))
        return out

    def rank_many(self, jobs: list[RankJob]) -> list[Pool]:
        model = self.ranker or self.retriever
        cold = [job.user.cold_start(model) for job in jobs]
        pools: list[Pool | None] = [None] * len(jobs)
        warm = [i for i, c in enumerate(cold) if c is None]
        if warm:
            scored = self._rank_scores(
                [jobs[i].user for i in warm], [jobs[i].candidates for i in warm], model
            )
            source: Literal["ranker", "retrieval", "popularity"] = (
                "popularity" if model.is_popularity else ("ranker" if model is self.ranker else "retrieval")
            )
            for i, (per_task, _unknown) in zip(warm, scored, strict=True):  # rank_job refused unknown ones
                pools[i] = Pool(jobs[i].candidates, per_task[model.tasks[0]], source, task_scores=per_task)
        for i, c in enumerate(cold):
            if c is None:
                continue
            idx = model.map_items(jobs[i].candidates)
            known = idx > 0
            prior = _with_prior(np.log1p(model.catalog.popularity[idx]), known)
            pools[i] = Pool(
                jobs[i].candidates, prior, "popularity", task_scores={task: prior for task in model.tasks}
            )
        return [p for p in pools if p is not None]

    # -- policy, logging, responses -------------------------------------------------------------------------
    def _serve(
        self,
        pool: Pool,
        k: int,
        user: UserContext,
        endpoint: str,
        cold: str | None,
        model: ModelRuntime,
        policy: Policy = "top_k",
    ) -> tuple[int, np.ndarray, np.ndarray]:
        request_id = self._request_ids.next()
        if len(pool.item_ids) == 0:
            return request_id, np.zeros(0, dtype=np.int64), np.zeros(0)
        # top_k is the greedy policy: the k best scores in order (stable on ties), each with propensity 1.
        temperature = self.config.policy_temperature if policy == "explore" else 0.0
        order, propensity = plackett_luce_order(
            pool.scores, temperature, min(k, len(pool.item_ids)), seed=request_id
        )
        if self.logger is not None:
            started = time.thread_time()
            shown = order[: self.config.impressions_max_positions]
            self.logger.log(
                request_id=request_id,
                user_id=user.user_id,
                ts=user.request_ts,
                item_ids=pool.item_ids[shown],
                scores=pool.scores[shown],
                propensities=propensity[: len(shown)],
                endpoint=endpoint,
                model_version=model.tag,
                cold_start=cold,
                policy_temperature=temperature,
            )
            self.last_log_s = time.thread_time() - started
        return request_id, order, propensity

    def finish_recommend(self, job: RecommendJob, pool: Pool) -> RecommendResponse:
        cold = job.user.cold_start(self.retriever)
        model = self.ranker if pool.source == "ranker" and self.ranker is not None else self.retriever
        request_id, order, propensity = self._serve(
            pool, job.k, job.user, "recommend", cold, model, job.policy
        )
        raw = self.ids.items_raw(pool.item_ids[order])
        items = [
            ScoredItem(
                item_id=raw[p],
                score=float(pool.scores[o]),
                position=p,
                propensity=float(propensity[p]),
            )
            for p, o in enumerate(order)
        ]
        return RecommendResponse(
            request_id=request_id,
            items=items,
            source=pool.source,
            scored_by="popularity" if pool.source == "popularity" else model.scored_by,
            cold_start=cold,
            unknown_history_items=self._unknown_history(job.user, self.retriever),
            models=self.versions,
        )

    def _unknown_history(self, user: UserContext, model: ModelRuntime) -> list[RawId]:
        unknown = user.history_for(model).unknown
        return self.ids.items_raw(np.asarray(unknown, dtype=np.int64), user.unknown_raw) if unknown else []

    def finish_rank(self, job: RankJob, pool: Pool) -> RankResponse:
        model = self.ranker or self.retriever
        cold = job.user.cold_start(model)
        request_id, order, propensity = self._serve(
            pool, len(pool.item_ids), job.user, "rank", cold, model, job.policy
        )
        # Built from the engine's own arrays: no validation pass over the 3 x M numbers (a test checks that
        # the response still validates).
        return RankResponse.model_construct(
            request_id=request_id,
            scores={task: s.tolist() for task, s in pool.task_scores.items()},
            ranking=self.ids.items_raw(pool.item_ids[order]),
            propensities=propensity.tolist(),
            source=pool.source,
            scored_by="popularity" if pool.source == "popularity" else model.scored_by,
            cold_start=cold,
            unknown_history_items=self._unknown_history(job.user, model),
            models=self.versions,
        )

    def retrieval_index(self) -> dict[str, int | str | bool]:
        ann = self.retriever.ann
        if ann is None:
            return {"kind": "exact", "items": self.retriever.catalog.num_items}
        return {
            "kind": "ivf",
            "items": ann.num_items,
            "lists": ann.lists,
            "probe": ann.probe,
            "loaded_from_cache": ann.loaded_from_cache,
        }

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        """One request, unbatched (the service batches ``recommend_many`` instead)."""
        job = self.recommend_job(request)
        return self.finish_recommend(job, self.recommend_many([job])[0])

    def rank(self, request: RankRequest) -> RankResponse:
        job = self.rank_job(request)
        return self.finish_rank(job, self.rank_many([job])[0])

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


def _with_prior(scores: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Unknown candidates get the popularity prior of a never-seen item: the lowest known score minus 1."""
    if known.all():
        return scores
    floor = float(scores[known].min()) - 1.0 if known.any() else 0.0
    return np.where(known, scores, floor)


# -- the BentoML service -----------------------------------------------------------------------------------
# Read when BentoML imports this module (serve and build), before the models are known.
_PROCESS = ServerProcessConfig.from_env()
READINESS = Readiness()  # this worker process's readiness, answered by RequestGuard at GET /readyz


@bentoml.service(
    name="recsys-recommender",
    resources={"cpu": "2", "memory": "4Gi"},
    traffic={"timeout": 30, "max_concurrency": 256},
    http={"host": "127.0.0.1", "port": 3000},
    workers=_PROCESS.workers,
    logging={"access": {"enabled": _PROCESS.access_log, "skip_paths": ["/livez", "/readyz", "/metrics"]}},
    metrics={"enabled": _PROCESS.metrics},
    # With the OpenTelemetry SDK off (the default, above) no span is recorded, yet BentoML's ASGI tracing
    # middleware still wraps every request and send (~5% of a rank request's CPU): skip it for every URL.
    tracing={"excluded_urls": ["/"] if os.environ.get("OTEL_SDK_DISABLED") == "true" else None},
)
class RecommendationService:
    """Endpoints /recommend, /rank, /user_embedding, /health, /metadata (POST, JSON); BentoML adds GET
    /readyz and /livez."""

    def __init__(self) -> None:
        READINESS.set("starting: loading models")
        self.config = ServingConfig.from_env()
        if self.config.torch_threads > 0:  # a deployment setting of this server process only
            torch.set_num_threads(self.config.torch_threads)
        logger = (
            ImpressionLogger(
                self.config.impressions_dir, max_buffered_rows=self.config.impressions_max_buffered_rows
            )
            if self.config.log_impressions
            else None
        )
        self.engine = Recommender.from_config(self.config, logger)
        tag = self.config.user_embeddings
        self.user_embeddings = load_user_embeddings(tag) if tag else None
        if logger is not None:
            READINESS.add_check(logger.failure)
        READINESS.set("starting: warming up")
        warm_up(self.engine)
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self._recommend = AdaptiveBatcher(
            timed_batches(self.engine.recommend_many), self.config.max_batch_size, self.config.batch_wait_ms
        )
        self._rank = AdaptiveBatcher(
            timed_batches(self.engine.rank_many), self.config.max_batch_size, self.config.batch_wait_ms
        )
        # The models, histories and catalogue live as long as the process: freeze them out of the cyclic
        # collector's reach, so that a full collection under load does not walk them (a pause that grows
        # with the number of users and items).
        gc.collect()
        gc.freeze()
        # A request allocates thousands of short-lived objects: collect the young generation every 20,000
        # allocations instead of 700 (p99 -2 ms under load, measured; nothing long-lived is left to scan).
        gc.set_threshold(20_000, 20, 20)
        # The impressions spool thread needs the GIL for a flush while the event loop keeps it busy: at the
        # default 5 ms switch interval a 50k-row flush took ~160 ms and stalled the loop ~50 ms in all, at
        # 0.5 ms 30 ms and ~10 ms (measured). Only matters while another thread waits for the GIL.
        sys.setswitchinterval(0.0005)
        READINESS.set(None)

    def __is_ready__(self) -> bool:
        return READINESS.reason() is None

    def __metrics__(self, content: str) -> str:
        """BentoML's metrics plus this worker's impressions spool counters (per worker process: labelled
        with its pid; a scrape reaches one worker)."""
        logger = self.engine.logger
        if logger is None:
            return content
        return content + logger.prometheus(labels={"worker_pid": str(os.getpid())})

    @bentoml.api
    async def recommend(self, request: RecommendRequest, /, ctx: bentoml.Context) -> RecommendResponse:
        t0 = time.thread_time()
        job = self.engine.recommend_job(request)
        t1 = time.thread_time()
        pool = await self._recommend.submit(job)
        t2 = time.thread_time()
        response = self.engine.finish_recommend(job, pool)
        self._timing(ctx, t1 - t0, job.model_s, time.thread_time() - t2)
        return response

    @bentoml.api
    async def rank(self, request: RankRequest, /, ctx: bentoml.Context) -> RankResponse:
        t0 = time.thread_time()
        job = self.engine.rank_job(request)
        t1 = time.thread_time()
        pool = await self._rank.submit(job)
        t2 = time.thread_time()
        response = self.engine.finish_rank(job, pool)
        self._timing(ctx, t1 - t0, job.model_s, time.thread_time() - t2)
        return response

    def _timing(self, ctx: bentoml.Context, job_s: float, model_s: float, finish_s: float) -> None:
        """Where the request's CPU went inside the handler (``server-timing``, ms): request checks and id
        mapping, its share of the model batch, impressions logging, the policy and the response object.
        BentoML's parsing, serialisation and middleware are the server's CPU per request minus these."""
        log = self.engine.last_log_s if self.engine.logger is not None else 0.0
        parts = {"job": job_s, "model": model_s, "log": log, "respond": finish_s - log}
        ctx.response.headers["server-timing"] = server_timing(parts)

    @bentoml.api
    def user_embedding(self, request: UserEmbeddingRequest, /) -> UserEmbeddingResponse:
        """The stored vector of a user (by the dataset's own id); 404 naming user_id for an unknown one."""
        if self.user_embeddings is None:
            raise not_served()
        return self.user_embeddings.respond(request)

    @bentoml.api
    def health(self) -> HealthResponse:
        return HealthResponse(status="ok", ready=self.__is_ready__())

    @bentoml.api
    def metadata(self, ctx: bentoml.Context) -> MetadataResponse:
        c = self.config
        return MetadataResponse(
            service="recsys-recommender",
            retriever=self.engine.retriever.info(),
            ranker=self.engine.ranker.info() if self.engine.ranker else None,
            build_time=c.build_time,
            started_at=self.started_at,
            limits={
                "max_history": c.max_history,
                "max_candidates": c.max_candidates,
                "max_k": c.max_k,
                "pool_size": c.pool_size,
            },
            policy={
                "default": "top_k",
                "explore": "plackett-luce" if c.policy_temperature > 0 else "greedy",
                "temperature": c.policy_temperature,
            },
            retrieval_index=self.engine.retrieval_index(),
        )

    @bentoml.on_shutdown
    def _close(self) -> None:
        READINESS.set("shutting down")
        self.engine.close()


def warm_up(engine: Recommender) -> None:
    """One batched inference through recommend and through rank (nothing logged): readiness then means the
    models answer, and the first client does not pay the one-off costs (allocations, kernel set-up)."""
    catalog = engine.retriever.catalog
    internal = catalog.item_ids[1].item() if catalog.num_items else 1
    item = engine.ids.items_raw(np.array([internal]))[0]  # the model's own id type (string or integer)
    history = [{"item_id": item, "ts": 0}]
    recommend = RecommendRequest.model_validate({"history": history, "k": 1, "ts": 1})
    engine.recommend_many([engine.recommend_job(recommend)])
    rank = RankRequest.model_validate({"history": history, "candidates": [item], "ts": 1})
    engine.rank_many([engine.rank_job(rank)])


def openapi_document() -> dict[str, Any]:
    """The service's OpenAPI document as ``GET /docs.json`` serves it (serving.errors.document_service)."""
    spec = RecommendationService.openapi_spec.asdict()
    apis = {
        "/" + method.route.lstrip("/"): (method.input_spec, method.output_spec)
        for method in RecommendationService.apis.values()
    }
    return document_service(spec, apis, auth=_PROCESS.api_key is not None, open_paths=OPEN_PATHS)


RecommendationService.add_asgi_middleware(ConnectionRecycler, every=_PROCESS.keepalive_requests)
RecommendationService.add_asgi_middleware(
    RequestGuard,
    api_key=_PROCESS.api_key,
    max_body_bytes=_PROCESS.max_body_bytes,
    json_routes=frozenset("/" + m.route.lstrip("/") for m in RecommendationService.apis.values()),
    readiness=READINESS,
    openapi=openapi_document,
)
