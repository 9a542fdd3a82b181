"""Turn the pipeline's trained checkpoints into registered, servable models (the package stage's library).

The retrieval stage records each model's best checkpoint; here the model is rebuilt from the registry's
config (the same ``model_config(name, num_items, max_len)`` training used), its best weights loaded, and it is
registered in the BentoML model store with the dataset's catalogue and histories (``serving.registry``).
Popularity, the A/B control and cold-start fallback, is refit from the dataset's events.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from models.registry import build_model, model_config
from serving.registry import catalog_from_warehouse, histories_from_warehouse, register_model
from training.checkpoint import load_weights, weights_path
from warehouse import Warehouse


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
    num_items: int,
    max_len: int,
    metrics: Mapping[str, float] | None = None,
    store: str | None = None,
) -> str:
    """Rebuild ``name`` with its training config, load the best weights, register it under ``store``
    (default ``<dataset>-<name>``); returns the tag."""
    best = weights_path(checkpoint_dir, "best")
    if not best.exists():
        raise FileNotFoundError(
            f"checkpoint_dir: no best weights at {best} (did the retrieval stage finish?)"
        )
    model = build_model(name, model_config(name, num_items=num_items, max_len=max_len))
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
