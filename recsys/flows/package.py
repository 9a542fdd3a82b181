"""Turn the pipeline's trained checkpoints into registered, servable models (the package stage's library).

The retrieval stage records each model's best checkpoint with the model config it trained and the temperature
its scores were divided by (``experiments.retrieval.serving_record``); here the model is rebuilt from that
config, its best weights loaded, and it is registered in the BentoML model store with that temperature and
the dataset's catalogue and histories (``serving.registry``), so it serves the scores it was trained for.
Popularity, the A/B control and cold-start fallback, is refit from the dataset's events. The distill stage
records its served student (``experiments.distillation.ServedStudent``); ``register_distilled_ranker``
rebuilds it from that record, checks its weights against the recorded sha256 and registers it as a
feature-based ranker with the featurizer of the data it was trained on (``serving.registry.register_ranker``).
With a chosen served ranker (``PipelineConfig.ranker``, e.g. the generative ``hstu-ranker``), the ranking
stage records that model's first-seed run the same way and ``register_trained_ranker`` registers it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from recsys.core.hashing import file_sha256
from recsys.models.registry import build_model, entry
from recsys.serving.registry import (
    catalog_from_warehouse,
    histories_from_warehouse,
    register_model,
    register_ranker,
)
from recsys.training.checkpoint import load_weights, weights_path
from recsys.training.ranking import load_ranking_data
from recsys.warehouse import Warehouse

if TYPE_CHECKING:
    from recsys.experiments.distillation import ServedStudent


def _dataset_inputs(warehouse_path: Path, dataset: str):  # noqa: ANN202
    with Warehouse(warehouse_path, read_only=True) as wh:
        return (
            catalog_from_warehouse(wh, dataset),
            histories_from_warehouse(wh, dataset),
            wh.version(f"{dataset}.sequences"),
        )


def store_name(dataset: str, model: str) -> str:
    """The model store name of ``model`` trained on ``dataset`` (lower-case, as the store requires)."""
    return f"{dataset}-{model}".lower().replace("_", "-")


def register_learned_retriever(
    warehouse_path: Path,
    dataset: str,
    name: str,
    checkpoint_dir: Path,
    *,
    model_config_json: Mapping[str, Any],
    temperature: float,
    metrics: Mapping[str, float] | None = None,
    store: str | None = None,
) -> str:
    """Rebuild ``name`` from the config it was trained with (``model_config_json``), load the best weights,
    register it under ``store`` (default ``<dataset>-<name>``) serving ``dot / temperature``; returns the
    tag."""
    best = weights_path(checkpoint_dir, "best")
    if not best.exists():
        raise FileNotFoundError(
            f"checkpoint_dir: no best weights at {best} (did the retrieval stage finish?)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    try:
        config = entry(name).config_cls(**model_config_json)
    except ValidationError as exc:
        raise ValueError(f"model_config_json: not a {name} config: {exc}") from exc
    model = build_model(name, config)
    load_weights(model, best)
    items, histories, data_version = _dataset_inputs(warehouse_path, dataset)
    return register_model(
        store or store_name(dataset, name),
        architecture=name,
        task="retrieval",
        model=model.eval(),
        items=items,
        data_version=data_version,
        metrics=metrics,
        histories=histories,
        temperature=temperature,
    )


def register_popularity(warehouse_path: Path, dataset: str) -> str:
    """Popularity over the dataset's events (the catalogue's event counts), registered; returns the tag."""
    items, histories, data_version = _dataset_inputs(warehouse_path, dataset)
    n = int(items["item_idx"].max())
    model = build_model("popularity", num_items=n)
    counts = torch.zeros(n + 1)
    counts[torch.as_tensor(items["item_idx"].to_numpy())] = torch.as_tensor(
        items["popularity"].to_numpy(), dtype=torch.float32
    )
    model.load_counts(counts)
    return register_model(
        store_name(dataset, "popularity"),
        architecture="popularity",
        task="retrieval",
        model=model,
        items=items,
        data_version=data_version,
        histories=histories,
    )


def register_distilled_ranker(warehouse_path: Path, student: ServedStudent, *, store: str) -> str:
    """Rebuild the distilled ``student`` from its record, load its best weights and register it under
    ``store`` as a feature-based ranker, with the featurizer of the examples it was trained on (the same
    ``load_ranking_data`` config, so vocabularies and dense transforms match); returns the tag."""
    return _register_ranking_run(warehouse_path, student, store=store, field="student", stage="distill")


def register_trained_ranker(warehouse_path: Path, run: ServedStudent, *, store: str) -> str:
    """``register_distilled_ranker`` for a run of the ranking stage (the same record: architecture and
    config, best checkpoint and sha256, data config and version), e.g. the generative ``hstu-ranker``, which
    the service then scores through M-FALCON; returns the tag."""
    return _register_ranking_run(warehouse_path, run, store=store, field="served_ranker", stage="ranking")


def _register_ranking_run(
    warehouse_path: Path, run: ServedStudent, *, store: str, field: str, stage: str
) -> str:
    best = run.weights
    if not best.exists():
        raise FileNotFoundError(
            f"{field}.checkpoint: no best weights at {best} (did the {stage} stage finish?)"
        )
    digest = file_sha256(best)
    if digest != run.weights_sha256:
        raise ValueError(
            f"{field}.weights_sha256: {best} has sha256 {digest}, the {stage} stage recorded "
            f"{run.weights_sha256}: the checkpoint changed since; re-run the {stage} stage"
        )
    config = entry(run.architecture).config_cls(**run.model_config_json)
    model = build_model(run.architecture, config)
    load_weights(model, best)
    with Warehouse(warehouse_path, read_only=True) as wh:
        data = load_ranking_data(wh, run.dataset, run.data)
        if data.data_version != run.data_version:
            raise ValueError(
                f"{field}.data_version: the {stage} stage trained on {run.dataset}.examples "
                f"{run.data_version}, the warehouse now holds {data.data_version}: re-run the {stage} stage"
            )
        return register_ranker(
            store,
            architecture=run.architecture,
            model=model.eval(),
            wh=wh,
            data=data,
            metrics=run.test,
        )
