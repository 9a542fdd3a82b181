"""The arms of a simulated A/B test: anything with ``recommend(RecommendRequest) -> RecommendResponse``.

- ``InProcessArm``: the serving engine (``serving.service.Recommender``) in this process: the same request
  checks, retrieval, ranker, Plackett-Luce policy and propensities as the BentoML service, without HTTP.
- ``HttpArm``: a running BentoML service at ``base_url`` (``/recommend``, ``/metadata``), with the optional
  API key; ``recommend_many`` sends a batch concurrently, so the server's adaptive batcher sees real load.

Both served arms ask for the service's exploration policy (``"policy": "explore"``: a Plackett-Luce draw
with its propensities; the service's default is the deterministic top-k), because the simulator's slates and
off-policy estimates need a stochastic logging policy. The simulator speaks the world's ids (the warehouse's
internal ids); a served model of a dataset with string ids speaks the dataset's own ids, so these arms
translate requests and responses with the model's id maps (``serving.ids``; over HTTP, read from the local
model store).
- ``OracleArm`` and ``RandomArm``: reference policies that need no model: the true best items of a
  ``ResponseModel`` (the upper bound of a synthetic world) and a uniformly random slate (the floor). They
  serve through the same Plackett-Luce policy (``serving.impressions.plackett_luce_order``), so their
  propensities mean the same thing.

``arm_from_tag`` builds an in-process or HTTP arm from a registered model tag; ``register_pipeline_models``
registers the pipeline's trained retrieval models (its checkpoints, reused when present) so that they can
be arms.

OPEN choices and what was picked: every arm exposes ``policy_temperature`` and ``pool_size`` (read from
``/metadata`` over HTTP) because off-policy estimation re-scores logged requests with the target arm's pool
and needs its policy; the simulator draws every arm's requests with ``exclude_seen`` as configured.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
import numpy as np

from recsys.serving.ids import IdMaps
from recsys.serving.impressions import plackett_luce_order
from recsys.serving.schemas import (
    HistoryEvent,
    ModelVersions,
    RecommendOptions,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
)
from recsys.serving.service import API_KEY_HEADER, Recommender, ServingConfig


class ArmError(RuntimeError):
    """An arm could not answer a request (HTTP error, unreachable server, bad response)."""


@runtime_checkable
class ArmClient(Protocol):
    """What the simulator needs of an arm."""

    name: str
    policy_temperature: float
    pool_size: int

    def recommend(self, request: RecommendRequest) -> RecommendResponse: ...

    def recommend_many(self, requests: Sequence[RecommendRequest]) -> list[RecommendResponse]: ...


# ----------------------------------------------------------------------------------------------------------
# Served models
# ----------------------------------------------------------------------------------------------------------


def to_served(request: RecommendRequest, ids: IdMaps) -> RecommendRequest:
    """A simulator request (internal ids) as the service takes it: the explore policy, the model's own ids.
    History events and excluded items the model has no id for are left out (it does not know them)."""
    update: dict[str, object] = {"policy": "explore"}
    if ids.users is not None and request.user_id is not None:
        update["user_id"] = ids.user_raw(int(request.user_id))
    if ids.items is not None:
        if request.history:
            raw = ids.items_raw(np.array([e.item_id for e in request.history], dtype=np.int64))
            update["history"] = [
                HistoryEvent(item_id=r, ts=e.ts, value=e.value)
                for r, e in zip(raw, request.history, strict=True)
                if r is not None
            ]
        excluded = request.options.exclude_items
        if excluded:
            raw = ids.items_raw(np.asarray(excluded, dtype=np.int64))
            update["options"] = RecommendOptions(
                exclude_seen=request.options.exclude_seen,
                categories=request.options.categories,
                exclude_items=[r for r in raw if r is not None],
            )
    return request.model_copy(update=update)


def from_served(response: RecommendResponse, ids: IdMaps) -> RecommendResponse:
    """A service response back in the world's internal ids."""
    if ids.items is None:
        return response
    internal = ids.items_internal([it.item_id for it in response.items], "items").internal
    items = [
        it.model_copy(update={"item_id": int(i)}) for it, i in zip(response.items, internal, strict=True)
    ]
    unknown = ids.items_internal(response.unknown_history_items, "unknown_history_items").internal
    return response.model_copy(update={"items": items, "unknown_history_items": unknown.tolist()})


class InProcessArm:
    """The serving engine in this process (no server). ``recommend_many`` runs one batched model pass."""

    def __init__(self, engine: Recommender, name: str | None = None) -> None:
        self.engine = engine
        self.name = name or engine.versions.retriever
        self.policy_temperature = float(engine.config.policy_temperature)
        self.pool_size = int(engine.config.pool_size)

    @classmethod
    def from_tag(
        cls,
        retriever: str,
        *,
        ranker: str | None = None,
        name: str | None = None,
        policy_temperature: float = 1.0,
        pool_size: int = 200,
        device: str = "cpu",
        seed: int | None = None,
    ) -> InProcessArm:
        """Load registered models (checksums verified); the simulator keeps its own impressions log."""
        config = ServingConfig(
            retriever=retriever,
            ranker=ranker,
            policy_temperature=policy_temperature,
            pool_size=pool_size,
            max_k=max(200, pool_size),
            max_history=100_000,
            log_impressions=False,
            device=device,  # type: ignore[arg-type]
            request_id_seed=seed,  # reproducible Plackett-Luce draws for a seeded simulation
        )
        return cls(Recommender.from_config(config), name=name)

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        ids = self.engine.ids
        return from_served(self.engine.recommend(to_served(request, ids)), ids)

    def recommend_many(self, requests: Sequence[RecommendRequest]) -> list[RecommendResponse]:
        ids = self.engine.ids
        out: list[RecommendResponse] = []
        step = self.engine.config.max_batch_size
        for lo in range(0, len(requests), step):
            jobs = [self.engine.recommend_job(to_served(r, ids)) for r in requests[lo : lo + step]]
            pools = self.engine.recommend_many(jobs)
            out += [
                from_served(self.engine.finish_recommend(j, p), ids) for j, p in zip(jobs, pools, strict=True)
            ]
        return out

    def close(self) -> None:
        self.engine.close()


class HttpArm:
    """A running recommendation service over HTTP (``serving.service.RecommendationService``)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        name: str | None = None,
        timeout_s: float = 30.0,
        concurrency: int = 8,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self.concurrency = concurrency
        meta = self._post("metadata", None)
        self.metadata: dict[str, Any] = meta
        self.name = name or str(meta["retriever"]["tag"])
        self.policy_temperature = float(meta["policy"]["temperature"])
        self.pool_size = int(meta["limits"]["pool_size"])
        self.max_k = int(meta["limits"]["max_k"])
        self.ids = IdMaps()
        served = [meta["retriever"], *([meta["ranker"]] if meta.get("ranker") else [])]
        if any(m.get("user_id_type") == "str" or m.get("item_id_type") == "str" for m in served):
            from recsys.serving.registry import load_ids

            ids = IdMaps()
            for m in served:  # the served models' maps, from the local model store (checksummed)
                ids = ids.merged(load_ids(str(m["tag"])))
            self.ids = ids

    def _post(self, path: str, body: Any) -> dict[str, Any]:
        try:
            response = self._client.post(f"/{path}", json=body)
        except httpx.HTTPError as exc:
            raise ArmError(f"{self.base_url}/{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise ArmError(f"{self.base_url}/{path} answered {response.status_code}: {response.text[:500]}")
        return response.json()

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        body = to_served(request, self.ids).model_dump(mode="json", exclude_none=True)
        return from_served(RecommendResponse.model_validate(self._post("recommend", body)), self.ids)

    def recommend_many(self, requests: Sequence[RecommendRequest]) -> list[RecommendResponse]:
        if len(requests) <= 1 or self.concurrency == 1:
            return [self.recommend(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self.recommend, requests))

    def close(self) -> None:
        self._client.close()


def arm_from_tag(
    retriever: str,
    *,
    ranker: str | None = None,
    name: str | None = None,
    http: str | None = None,
    api_key: str | None = None,
    policy_temperature: float = 1.0,
    pool_size: int = 200,
    seed: int | None = None,
) -> InProcessArm | HttpArm:
    """An arm serving a registered model: in process, or through the service at ``http`` (which must serve
    exactly this retriever; its own temperature, pool size and request ids then apply). ``seed`` fixes an
    in-process arm's request ids, hence its policy draws: the same seed serves the same slates."""
    if http is None:
        return InProcessArm.from_tag(
            retriever,
            ranker=ranker,
            name=name,
            policy_temperature=policy_temperature,
            pool_size=pool_size,
            seed=seed,
        )
    from recsys.serving.registry import resolve

    arm = HttpArm(http, api_key=api_key, name=name)
    served = arm.metadata["retriever"]["tag"]
    if served != resolve(retriever):
        arm.close()
        raise ValueError(f"http: {http} serves {served}, not the retriever {retriever!r} asked for")
    return arm


# ----------------------------------------------------------------------------------------------------------
# Reference policies (no model)
# ----------------------------------------------------------------------------------------------------------


class _ScoredArm(ABC):
    """Scores every catalogue item, keeps the top ``pool_size`` and serves a Plackett-Luce draw."""

    source = "ranker"

    def __init__(
        self, item_ids: np.ndarray, name: str, policy_temperature: float, pool_size: int | None, seed: int
    ) -> None:
        ids = np.unique(np.asarray(item_ids, dtype=np.int64))
        if ids.size == 0:
            raise ValueError("item_ids must name at least one item")
        if policy_temperature < 0:
            raise ValueError(f"policy_temperature must be >= 0, got {policy_temperature}")
        self.item_ids = ids
        self.name = name
        self.policy_temperature = float(policy_temperature)
        self.pool_size = int(pool_size or ids.size)
        self._rng = np.random.default_rng(seed)

    @abstractmethod
    def scores(self, requests: Sequence[RecommendRequest]) -> np.ndarray:
        """[len(requests), len(item_ids)] scores of every catalogue item for each request."""

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        return self.recommend_many([request])[0]

    def recommend_many(self, requests: Sequence[RecommendRequest]) -> list[RecommendResponse]:
        if not requests:
            return []
        scores = np.array(self.scores(requests), dtype=np.float64)
        out = []
        for row, request in enumerate(requests):
            s = scores[row]
            if request.options.exclude_seen and request.history:
                seen = np.fromiter((e.item_id for e in request.history), dtype=np.int64)
                s[np.isin(self.item_ids, seen)] = -np.inf
            if request.options.exclude_items:
                s[np.isin(self.item_ids, np.asarray(request.options.exclude_items, dtype=np.int64))] = -np.inf
            finite = np.flatnonzero(np.isfinite(s))
            pool = finite[np.argsort(-s[finite], kind="stable")[: self.pool_size]]
            request_id = int(self._rng.integers(0, 2**63 - 1))
            items: list[ScoredItem] = []
            if pool.size:
                order, prop = plackett_luce_order(
                    s[pool], self.policy_temperature, min(request.k, pool.size), seed=request_id
                )
                items = [
                    ScoredItem(
                        item_id=int(self.item_ids[pool[o]]),
                        score=float(s[pool[o]]),
                        position=p,
                        propensity=float(prop[p]),
                    )
                    for p, o in enumerate(order)
                ]
            out.append(
                RecommendResponse(
                    request_id=request_id,
                    items=items,
                    source=self.source,  # type: ignore[arg-type]
                    cold_start=None,
                    unknown_history_items=[],
                    models=ModelVersions(retriever=self.name, ranker=None),
                )
            )
        return out


class OracleArm(_ScoredArm):
    """Ranks by the TRUE position-free click logit of a ``ResponseModel`` (needs ``ts`` and ``user_id``)."""

    def __init__(
        self,
        response: Any,
        item_ids: np.ndarray,
        *,
        name: str = "oracle",
        policy_temperature: float = 0.25,
        pool_size: int | None = 200,
        seed: int = 0,
    ) -> None:
        super().__init__(item_ids, name, policy_temperature, pool_size, seed)
        self.response = response

    def scores(self, requests: Sequence[RecommendRequest]) -> np.ndarray:
        if any(r.user_id is None or r.ts is None for r in requests):
            raise ValueError("OracleArm needs user_id and ts on every request")
        users = np.array([r.user_id for r in requests], dtype=np.int64)
        ts = np.array([r.ts for r in requests], dtype=np.int64)
        items = np.broadcast_to(self.item_ids, (len(requests), self.item_ids.size))
        return self.response.click_logits(users, items, ts)


class RandomArm(_ScoredArm):
    """A uniformly random slate from the catalogue (propensity 1 / items left at each position)."""

    source = "popularity"

    def __init__(self, item_ids: np.ndarray, *, name: str = "random", seed: int = 0) -> None:
        super().__init__(item_ids, name, 1.0, None, seed)

    def scores(self, requests: Sequence[RecommendRequest]) -> np.ndarray:
        return np.zeros((len(requests), self.item_ids.size))


# ----------------------------------------------------------------------------------------------------------
# The pipeline's trained models as arms
# ----------------------------------------------------------------------------------------------------------


def register_pipeline_models(
    dataset: str = "synthetic",
    models: Sequence[str] = ("popularity", "sasrec"),
    *,
    seed: int = 0,
    max_epochs: int | None = None,
    home: Path | None = None,
) -> dict[str, str]:
    """Register the pipeline's retrieval models of ``dataset`` (quick profile) as ``<dataset>-<model>``.

    Each model is trained as the pipeline's retrieval stage trains it (the data's rule: objective, dimension
    and dropout; history the features' ``max_seq_len``), so the checkpoint of a model the pipeline already
    trained is reused (``experiments.retrieval.train_one``'s key: model, train config, model fields, loop
    config but the epoch cap, data version); a missing one is trained now with the pipeline's quick loop
    (``max_epochs`` overrides its cap). The trained module is registered with the temperature it was
    trained at. Returns ``{model: tag}``; registering unchanged weights again returns the same tag.
    """
    from recsys.core.config import PathsConfig
    from recsys.evaluation.retrieval import leave_one_out
    from recsys.experiments.retrieval import (
        OBJECTIVE_PRESETS,
        RetrievalExperimentConfig,
        RunSettings,
        model_fields_of,
        resolve_run,
        serving_record,
        train_one,
    )
    from recsys.features.config import FeatureConfig
    from recsys.features.sequences import build_sequences, load_sequences, num_items
    from recsys.serving.registry import catalog_from_warehouse, histories_from_warehouse, register_model
    from recsys.training.loop import LoopConfig
    from recsys.training.presets import QUICK_RETRIEVAL_LOOP
    from recsys.training.retrieval import RetrievalTrainConfig, fit_popularity, split_recipe
    from recsys.warehouse import Warehouse

    paths = PathsConfig(home=home) if home is not None else PathsConfig()
    # The pipeline's quick-profile settings (its PipelineConfig defaults are these same objects).
    train = RetrievalTrainConfig(max_len=FeatureConfig().max_seq_len)
    loop = QUICK_RETRIEVAL_LOOP
    if max_epochs is not None:
        loop = LoopConfig(**{**loop.model_dump(), "max_epochs": max_epochs})
    with Warehouse(paths.warehouse) as wh:
        if not wh.has_table(f"{dataset}.events"):
            raise ValueError(f"dataset {dataset!r} is not in {paths.warehouse}: run the pipeline first")
        data_version = build_sequences(wh, dataset).version
        split = leave_one_out(load_sequences(wh, dataset), num_items(wh, dataset))
        items = catalog_from_warehouse(wh, dataset)
        histories = histories_from_warehouse(wh, dataset)
    experiment = RetrievalExperimentConfig(dataset=dataset, seeds=(seed,), loop=loop, train=train)
    recipe = split_recipe(split)
    tags: dict[str, str] = {}
    for name in models:
        temperature = 0.05  # popularity: the registry's default (its scores are not divided by it)
        if name == "popularity":
            module = fit_popularity(split)
        else:
            run_train, fields = resolve_run(recipe, OBJECTIVE_PRESETS["auto"], train, {})
            fields = model_fields_of(name, fields)
            run = train_one(name, split, seed, run_train, fields, experiment, paths, None, data_version)
            assert run.model is not None
            module = run.model
            temperature = serving_record(run, RunSettings(run_train, fields))["temperature"]
        tags[name] = register_model(
            f"{dataset.lower().replace('_', '-')}-{name}",
            architecture=name,
            task="retrieval",
            model=module.eval(),
            items=items,
            data_version=data_version,
            histories=histories,
            temperature=temperature,
        )
    return tags
