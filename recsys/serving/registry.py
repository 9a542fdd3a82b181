"""The model registry: trained models in the BentoML model store, with checksums, data version and metrics.

A registered model is one BentoML model ``<name>:<version>`` (the store lives under ``BENTOML_HOME``, which
``import core`` puts at ``var/bentoml``, outside any bento build context). Its directory holds:

- ``card.json``           the ``ModelCard``: architecture (a ``models.registry`` name), task, model config,
                          score temperature, data version, metrics, task names;
- ``weights.safetensors`` the state dict (safetensors: loading never unpickles anything);
- ``items.parquet``       the item catalogue: ``item_id`` (internal id, the warehouse's) -> ``item_idx`` (the
                          model's dense index, 1..n), ``category`` (nullable, for request filters),
                          ``popularity`` (event count, the cold-start prior) and, when the dataset's item ids
                          are strings, ``raw_id`` (the item's own id: requests and responses use it);
- ``histories.parquet``   optional: each known user's history (``user_id``, ``item_id`` list, ``ts`` list, in
                          internal ids, oldest first), so that a request may name a user instead of sending
                          events; when the dataset's user ids are strings, ``raw_user_id`` too;
- ``features*.json/parquet`` feature-based rankers only: the ``serving.featurize.RankingFeaturizer`` (the
                          vocabularies, dense standardisation, item attribute table, value buckets, stored
                          histories and item event log the ranker's request-time features are built from);
                          ``register_ranker`` builds it from the warehouse the ranker was trained from.

The model's metadata records the sha256 of every file; ``load_model`` verifies all of them before reading
anything and refuses a model whose files changed. The version is ``<data version>-<8 hex of the content
hash>``: the tag says which data the model was trained on, and registering the same files twice returns the
existing tag instead of a duplicate. ``<name>:latest`` resolves to the most recently registered version.

OPEN choice, and what was picked: the card lives in a file (checksummed like the weights) and is mirrored
in the BentoML metadata for listing; loading trusts only the checksummed file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import bentoml
import numpy as np
import polars as pl
import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn

import recsys.core  # noqa: F401  (BENTOML_HOME and telemetry defaults before BentoML reads them)
from recsys.core.atomic import atomic_dir
from recsys.core.config import FrozenModel
from recsys.core.environment import state_dir
from recsys.core.hashing import file_sha256, stable_hash
from recsys.ingest.schema import check_dataset
from recsys.models.registry import REGISTRY, build_model, entry
from recsys.serving.featurize import FEATURES_FILE, RankingFeaturizer
from recsys.serving.ids import IdMap, IdMaps
from recsys.warehouse import Warehouse

if TYPE_CHECKING:
    from recsys.training.ranking import RankingData

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"
ITEMS_FILE = "items.parquet"
HISTORIES_FILE = "histories.parquet"
LABEL_PREFIX = "recsys"
# Files BentoML writes into a model directory itself (its own metadata), outside the registered checksums.
BENTOML_OWN_FILES = frozenset({"model.yaml"})
log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")


class RegistryError(RuntimeError):
    """A model is missing, corrupt (checksum mismatch) or does not match what was asked for."""


class ModelCard(FrozenModel):
    """What is needed to rebuild and describe a registered model (stored as card.json)."""

    name: str = Field(description="Store name (the tag's name part).")
    architecture: str = Field(description="A models.registry name: hstu, hstu-large, sasrec, popularity, ...")
    task: Literal["retrieval", "ranking"]
    model_config_json: dict[str, Any] = Field(description="The model's config (its config class's fields).")
    temperature: float = Field(
        0.05,
        gt=0.0,
        description="Served score = user · item / temperature (cosine where the model L2-normalises).",
    )
    tasks: tuple[str, ...] = Field(("score",), min_length=1, description="Score names the model returns.")
    data_version: str = Field(min_length=1)
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(description="UTC ISO time of registration.")

    @field_validator("architecture")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in REGISTRY:
            raise ValueError(f"architecture {v!r} is not in models.registry (known: {sorted(REGISTRY)})")
        return v


@dataclass(frozen=True)
class Catalog:
    """The item catalogue of one model, as arrays indexed by item_idx (0 = padding)."""

    item_ids: np.ndarray  # [n + 1] int64, item_ids[idx]; 0 at padding
    popularity: np.ndarray  # [n + 1] float64 event counts; 0 at padding
    category: np.ndarray  # [n + 1] object (str or None)
    index: dict[int, int]  # item_id -> item_idx
    raw_ids: np.ndarray | None = None  # [n + 1] object: the items' own (string) ids; None: integer ids

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1


@dataclass(frozen=True)
class LoadedModel:
    tag: str
    card: ModelCard
    module: nn.Module
    catalog: Catalog
    histories: dict[int, tuple[np.ndarray, np.ndarray]]  # user_id -> (item_ids, ts), oldest first
    created_at: str
    featurizer: RankingFeaturizer | None = None  # feature-based rankers: request-time features
    ids: IdMaps = IdMaps()  # raw <-> internal ids (serving.ids); empty: integer ids


# -- validation of what gets registered ---------------------------------------------------------------------
def _check_items(items: pl.DataFrame, num_items: int | None) -> pl.DataFrame:
    for column in ("item_id", "item_idx"):
        if column not in items.columns:
            raise RegistryError(f"items frame has no column {column!r} (has {items.columns})")
    if items.height == 0:
        raise RegistryError("items frame is empty")
    frame = items.select(
        pl.col("item_id").cast(pl.Int64),
        pl.col("item_idx").cast(pl.Int64),
        (pl.col("category").cast(pl.Utf8) if "category" in items.columns else pl.lit(None, pl.Utf8)).alias(
            "category"
        ),
        (
            pl.col("popularity").cast(pl.Float64).fill_null(0.0)
            if "popularity" in items.columns
            else pl.lit(0.0)
        ).alias("popularity"),
        *([pl.col("raw_id").cast(pl.Utf8)] if "raw_id" in items.columns else []),
    ).sort("item_idx")
    if "raw_id" in frame.columns and (
        frame["raw_id"].null_count() or frame["raw_id"].n_unique() != frame.height
    ):
        raise RegistryError("items: raw_id (the items' own string ids) must be unique and not null")
    if frame["item_id"].null_count() or frame["item_idx"].null_count():
        raise RegistryError("items: item_id and item_idx must not be null")
    if frame["item_id"].n_unique() != frame.height:
        raise RegistryError("items: item_id values must be unique")
    idx = frame["item_idx"].to_numpy()
    if not np.array_equal(idx, np.arange(1, frame.height + 1)):
        raise RegistryError("items: item_idx must be exactly 1..n (dense, 0 is padding)")
    if bool((frame["popularity"] < 0).any()):
        raise RegistryError("items: popularity must be >= 0")
    if num_items is not None and frame.height != num_items:
        raise RegistryError(f"items has {frame.height} rows but the model has num_items = {num_items}")
    return frame


def _check_histories(histories: pl.DataFrame) -> pl.DataFrame:
    for column in ("user_id", "item_id", "ts"):
        if column not in histories.columns:
            raise RegistryError(f"histories frame has no column {column!r} (has {histories.columns})")
    frame = histories.select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("item_id").cast(pl.List(pl.Int64)),
        pl.col("ts").cast(pl.List(pl.Int64)),
        *([pl.col("raw_user_id").cast(pl.Utf8)] if "raw_user_id" in histories.columns else []),
    )
    if frame["user_id"].null_count() or frame["user_id"].n_unique() != frame.height:
        raise RegistryError("histories: user_id must be unique and not null")
    if "raw_user_id" in frame.columns and (
        frame["raw_user_id"].null_count() or frame["raw_user_id"].n_unique() != frame.height
    ):
        raise RegistryError("histories: raw_user_id (the users' own string ids) must be unique and not null")
    if not (frame["item_id"].list.len() == frame["ts"].list.len()).all():
        raise RegistryError("histories: item_id and ts lists must have equal lengths per user")
    return frame


def _version(data_version: str, digest: str) -> str:
    clean = re.sub(r"[^a-z0-9._-]+", "-", data_version.lower()).strip("-._") or "data"
    return f"{clean[:48]}-{digest[:8]}"


def register_model(
    name: str,
    *,
    architecture: str,
    task: Literal["retrieval", "ranking"],
    model: nn.Module,
    items: pl.DataFrame,
    data_version: str,
    metrics: Mapping[str, float] | None = None,
    histories: pl.DataFrame | None = None,
    temperature: float = 0.05,
    tasks: tuple[str, ...] = ("score",),
    featurizer: RankingFeaturizer | None = None,
) -> str:
    """Store ``model`` (an instance of the registry's ``architecture`` class, with its ``config``) and return
    its tag ``name:version``. Same content registered again returns the existing tag. A feature-based
    ranker needs its ``featurizer`` (see ``register_ranker``), whose spec must be the model's."""
    if not _NAME.match(name):
        raise RegistryError(f"name {name!r} must be lower-case letters, digits, '.', '_' or '-'")
    e = entry(architecture)
    if not isinstance(model, e.model_cls):
        raise RegistryError(
            f"architecture {architecture!r} needs a {e.model_cls.__name__}, got {type(model)}"
        )
    config = getattr(model, "config", None)
    if not isinstance(config, e.config_cls):
        raise RegistryError(f"model.config must be a {e.config_cls.__name__}")
    features = getattr(config, "features", None)
    if features is not None and featurizer is None:
        raise RegistryError(
            f"{architecture} reads request-time features: register it with its featurizer (register_ranker)"
        )
    if featurizer is not None and featurizer.spec != features:
        raise RegistryError("featurizer.spec must be the model's config.features (the spec it was built for)")
    num_items = getattr(config, "num_items", None) or (features.n_items if features is not None else None)
    item_frame = _check_items(items, num_items)
    card = ModelCard(
        name=name,
        architecture=architecture,
        task=task,
        model_config_json=config.model_dump(mode="json"),
        temperature=temperature,
        tasks=tasks,
        data_version=data_version,
        metrics={k: float(v) for k, v in (metrics or {}).items()},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    # Staged under the state directory: a process killed here leaves an owned temp that the sweep removes.
    with atomic_dir(state_dir() / "tmp", f"register-{name}") as staging:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE))
        item_frame.write_parquet(staging / ITEMS_FILE)
        if histories is not None:
            _check_histories(histories).write_parquet(staging / HISTORIES_FILE)
        if featurizer is not None:
            featurizer.save(staging)
        content = {f.name: file_sha256(f) for f in sorted(staging.iterdir())}
        # The created_at stamp is not part of the identity: the same content is the same version.
        digest = stable_hash(content, card.model_dump(mode="json", exclude={"created_at"}), length=64)
        version = _version(data_version, digest)
        existing = _get(f"{name}:{version}")
        if existing is not None:
            try:
                verify(str(existing.tag))
                return str(existing.tag)
            except RegistryError as exc:  # a damaged copy of this exact content: replace it
                log.warning("re-registering %s: the stored copy failed verification (%s)", existing.tag, exc)
                bentoml.models.delete(str(existing.tag))
        (staging / CARD_FILE).write_text(json.dumps(card.model_dump(mode="json"), indent=2, sort_keys=True))
        content[CARD_FILE] = file_sha256(staging / CARD_FILE)
        metadata = {
            "architecture": architecture,
            "task": task,
            "data_version": data_version,
            "metrics": dict(card.metrics),
            "sha256": content,
        }
        labels = {f"{LABEL_PREFIX}.task": task, f"{LABEL_PREFIX}.architecture": architecture}
        with bentoml.models.create(bentoml.Tag(name, version), labels=labels, metadata=metadata) as stored:
            target = Path(stored.path)
            for file in content:
                (target / file).write_bytes((staging / file).read_bytes())
        return str(stored.tag)


def _get(tag: str) -> Any | None:
    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        return None


def resolve(tag: str) -> str:
    """``name``, ``name:latest`` or ``name:version`` -> the concrete ``name:version`` in the store."""
    stored = _get(tag if ":" in tag else f"{tag}:latest")
    if stored is None:
        raise RegistryError(f"model {tag!r} is not in the BentoML model store (BENTOML_HOME)")
    return str(stored.tag)


def list_models(name: str | None = None) -> list[dict[str, Any]]:
    """Registered recsys models (newest first): tag, task, architecture, data version, metrics, time."""
    rows = []
    try:
        stored_models = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return []
    for stored in stored_models:
        meta = stored.info.metadata
        if "sha256" not in meta:
            continue  # not one of ours
        rows.append(
            {
                "tag": str(stored.tag),
                "task": meta.get("task"),
                "architecture": meta.get("architecture"),
                "data_version": meta.get("data_version"),
                "metrics": meta.get("metrics", {}),
                "created_at": stored.info.creation_time.isoformat(),
            }
        )
    return sorted(rows, key=lambda r: r["created_at"], reverse=True)


def verify(tag: str) -> Path:
    """Check every file of ``tag`` against the sha256 recorded at registration; return the model's path."""
    stored = _get(tag)
    if stored is None:
        raise RegistryError(f"model {tag!r} is not in the BentoML model store (BENTOML_HOME)")
    expected = stored.info.metadata.get("sha256")
    if not isinstance(expected, dict) or CARD_FILE not in expected or WEIGHTS_FILE not in expected:
        raise RegistryError(f"model {tag!r} has no checksums in its metadata: not registered by serving")
    root = Path(stored.path)
    unlisted = sorted(
        p.name for p in root.iterdir() if p.name not in expected and p.name not in BENTOML_OWN_FILES
    )
    if unlisted:
        raise RegistryError(f"model {tag!r}: file(s) {unlisted} were not registered (no checksum)")
    for file, digest in expected.items():
        path = root / file
        if not path.is_file():
            raise RegistryError(f"model {tag!r}: file {file} is missing")
        actual = file_sha256(path)
        if actual != digest:
            raise RegistryError(f"model {tag!r}: file {file} has sha256 {actual}, registered {digest}")
    return root


def _catalog(frame: pl.DataFrame) -> Catalog:
    n = frame.height
    item_ids = np.zeros(n + 1, dtype=np.int64)
    popularity = np.zeros(n + 1, dtype=np.float64)
    category = np.empty(n + 1, dtype=object)
    idx = frame["item_idx"].to_numpy()
    item_ids[idx] = frame["item_id"].to_numpy()
    popularity[idx] = frame["popularity"].to_numpy()
    category[idx] = frame["category"].to_list()
    raw_ids = None
    if "raw_id" in frame.columns:
        raw_ids = np.full(n + 1, None, dtype=object)
        raw_ids[idx] = frame["raw_id"].to_list()
    return Catalog(
        item_ids,
        popularity,
        category,
        {int(i): int(x) for i, x in zip(item_ids[1:], idx, strict=True)},
        raw_ids,
    )


def _id_maps(
    catalog: Catalog, histories: pl.DataFrame | None, featurizer: RankingFeaturizer | None
) -> IdMaps:
    items = None
    if catalog.raw_ids is not None:
        items = IdMap.from_pairs("item", catalog.raw_ids[1:].tolist(), catalog.item_ids[1:])
    users = None
    if histories is not None and "raw_user_id" in histories.columns:
        users = IdMap.from_pairs("user", histories["raw_user_id"].to_list(), histories["user_id"].to_numpy())
    if featurizer is not None and featurizer.user_raw_ids is not None:
        ranker_users = IdMap.from_pairs("user", *featurizer.user_raw_ids)
        users = users.merged(ranker_users) if users is not None else ranker_users
    return IdMaps(users=users, items=items)


def load_model(tag: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Resolve ``tag``, verify every checksum, rebuild the module and load its weights (no pickle)."""
    concrete = resolve(tag)
    root = verify(concrete)
    card = ModelCard.model_validate_json((root / CARD_FILE).read_text())
    e = entry(card.architecture)
    module = build_model(card.architecture, e.config_cls(**card.model_config_json))
    tensors = load_file(str(root / WEIGHTS_FILE), device=str(device))
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise RegistryError(f"model {concrete!r}: weights do not fit {card.architecture}: {exc}") from exc
    module.to(device).eval()
    items = pl.read_parquet(root / ITEMS_FILE)
    histories: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    frame = pl.read_parquet(root / HISTORIES_FILE) if (root / HISTORIES_FILE).exists() else None
    if frame is not None:
        for user, its, ts in zip(
            frame["user_id"].to_list(), frame["item_id"].to_list(), frame["ts"].to_list(), strict=True
        ):
            histories[int(user)] = (np.asarray(its, dtype=np.int64), np.asarray(ts, dtype=np.int64))
    featurizer = RankingFeaturizer.load(root) if (root / FEATURES_FILE).exists() else None
    if featurizer is not None and featurizer.spec != getattr(module.config, "features", None):
        raise RegistryError(f"model {concrete!r}: its featurizer was built for another FeatureSpec")
    catalog = _catalog(items)
    ids = _id_maps(catalog, frame, featurizer)
    return LoadedModel(concrete, card, module, catalog, histories, card.created_at, featurizer, ids)


def load_ids(tag: str) -> IdMaps:
    """Only the id maps of ``tag`` (checksums verified): what a client of the service needs to translate
    between its own ids and the model's, without loading the weights."""
    root = verify(resolve(tag))
    catalog = _catalog(_check_items(pl.read_parquet(root / ITEMS_FILE), None))
    histories = pl.read_parquet(root / HISTORIES_FILE) if (root / HISTORIES_FILE).exists() else None
    featurizer = RankingFeaturizer.load(root) if (root / FEATURES_FILE).exists() else None
    return _id_maps(catalog, histories, featurizer)


def register_ranker(
    name: str,
    *,
    architecture: str,
    model: nn.Module,
    wh: Warehouse,
    data: RankingData,
    metrics: Mapping[str, float] | None = None,
    length_multiple: int = 8,
    serving_position: int = 0,
) -> str:
    """Register a feature-based ranker (DeepFM, DIN, RankMixer, LONGER, HyFormer, a distilled student of one
    of them, or the generative ranker ``hstu-ranker``, which the service scores through M-FALCON) trained on
    ``data`` (``training.ranking.load_ranking_data`` of ``wh``), with the featurizer its request-time
    features are built from, the dataset's catalogue and the tasks as score names."""
    config = getattr(model, "config", None)
    spec = getattr(config, "features", None)
    if spec is None:
        raise RegistryError(
            f"{architecture}: model.config has no FeatureSpec 'features': not a feature ranker"
        )
    featurizer = RankingFeaturizer.from_warehouse(
        wh, data, spec, length_multiple=length_multiple, serving_position=serving_position
    )
    return register_model(
        name,
        architecture=architecture,
        task="ranking",
        model=model,
        items=catalog_from_warehouse(wh, data.dataset),
        data_version=data.data_version,
        metrics=metrics,
        tasks=tuple(data.tasks),
        featurizer=featurizer,
    )


# -- building the registered files from the warehouse -------------------------------------------------------
def catalog_from_warehouse(wh: Warehouse, dataset: str) -> pl.DataFrame:
    """``items.parquet`` content for a dataset: item_index + items.category + event counts, and the items'
    own ids (``raw_id``) when they are strings (``<ds>.item_ids``)."""
    check_dataset(dataset)
    has_items = wh.has_table(f"{dataset}.items")
    category = "it.category" if has_items else "NULL::VARCHAR"
    join = f"LEFT JOIN {dataset}.items it USING (item_id)" if has_items else ""
    raw, raw_join = "", ""
    if wh.has_table(f"{dataset}.item_ids"):
        raw, raw_join = ", m.raw_id", f"LEFT JOIN {dataset}.item_ids m USING (item_id)"
    return wh.sql(
        f"SELECT ii.item_id, ii.item_idx, {category} AS category, "
        f"coalesce(c.n, 0)::DOUBLE AS popularity{raw} "
        f"FROM {dataset}.item_index ii {join} {raw_join} "
        f"LEFT JOIN (SELECT item_id, count(*) AS n FROM {dataset}.events GROUP BY item_id) c USING (item_id) "
        "ORDER BY ii.item_idx"
    )


def histories_from_warehouse(wh: Warehouse, dataset: str) -> pl.DataFrame:
    """``histories.parquet`` content: every user's whole history in internal item ids, oldest first, and
    the users' own ids (``raw_user_id``) when they are strings (``<ds>.user_ids``)."""
    check_dataset(dataset)
    raw, raw_join = "", ""
    if wh.has_table(f"{dataset}.user_ids"):
        raw, raw_join = ", m.raw_id AS raw_user_id", f"LEFT JOIN {dataset}.user_ids m USING (user_id)"
    return wh.sql(
        f"SELECT s.user_id, list_transform(s.item_idx, lambda x: ids[x]) AS item_id, s.ts{raw} "
        f"FROM {dataset}.sequences s {raw_join}, "
        f"(SELECT list(item_id ORDER BY item_idx) AS ids FROM {dataset}.item_index) "
        "ORDER BY s.user_id"
    )
