"""What the packaged models recommend for one user, for the User page: registered models are loaded through
``recsys.serving.registry`` (checksums verified, CPU) and scored here, and the running service is asked too
when its URL is known.

- Retrieval models score every item for the user's whole stored history (the most recent ``max_len`` items
  the model knows) at the request time, as the evaluation does: a sequence model's user vector at its last
  position against the item table (cosine), popularity its event counts. Items of the history are left out
  (the service's default ``exclude_seen``).
- A ranker re-scores the top ``pool`` items of the served retriever: a feature-based ranker through its
  ``RankingFeaturizer`` (the user's stored history and attributes), shown as the probability of each task.
- Models belong to the dataset whose tables their ``data_version`` names (the warehouse lineage); a store
  name registered several times counts once (its newest version), and names whose weights are
  byte-identical (``<ds>-retriever`` is the best model registered again under a stable name) are shown
  once, with the other names as aliases.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

SERVICE_URL_ENV = "RECSYS_SERVICE_URL"
API_KEY_ENV = "RECSYS_SERVING_API_KEY"  # the service's own setting: the header it expects
API_KEY_HEADER = "x-api-key"
WEIGHTS_FILE = "weights.safetensors"


@dataclass(frozen=True)
class PackagedModel:
    tag: str  # name:version, the newest of its store name
    name: str
    task: str  # retrieval | ranking
    architecture: str
    data_version: str
    aliases: tuple[str, ...] = ()  # other store names holding the same weights
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        also = f" (= {', '.join(self.aliases)})" if self.aliases else ""
        return f"{self.name}{also} · {self.architecture}"


def packaged_models(listing: Iterable[dict[str, Any]], data_versions: Iterable[str]) -> list[PackagedModel]:
    """The models of ``registry.list_models()`` (newest first) trained on one of ``data_versions``: the
    newest version of each store name, identical weights merged (the name that sorts first keeps the
    model, retrieval before ranking)."""
    versions = set(data_versions)
    newest: dict[str, dict[str, Any]] = {}
    for row in listing:
        name = str(row["tag"]).split(":", 1)[0]
        if row.get("data_version") in versions and name not in newest:
            newest[name] = row
    by_weights: dict[str, list[str]] = {}
    for name, row in sorted(newest.items()):
        digest = str((row.get("sha256") or {}).get(WEIGHTS_FILE) or row["tag"])
        by_weights.setdefault(f"{row.get('task')}:{digest}", []).append(name)
    out = []
    for names in by_weights.values():
        # The stable serving name (``<ds>-retriever``, ``<ds>-ranker``) is what a user knows the model by.
        names.sort(key=lambda n: (not n.endswith(("-retriever", "-ranker")), n))
        row = newest[names[0]]
        out.append(
            PackagedModel(
                tag=str(row["tag"]),
                name=names[0],
                task=str(row.get("task")),
                architecture=str(row.get("architecture")),
                data_version=str(row.get("data_version")),
                aliases=tuple(names[1:]),
                metrics={str(k): float(v) for k, v in (row.get("metrics") or {}).items()},
            )
        )
    return sorted(out, key=lambda m: (m.task != "retrieval", m.name))


def list_registered() -> list[dict[str, Any]]:
    """``registry.list_models()`` with each model's file checksums (to spot identical weights)."""
    import bentoml

    from recsys.serving import registry

    rows = registry.list_models()
    for row in rows:
        try:
            row["sha256"] = dict(bentoml.models.get(row["tag"]).info.metadata.get("sha256") or {})
        except bentoml.exceptions.NotFound:  # removed between the listing and now
            row["sha256"] = {}
    return rows


def load(tag: str) -> Any:
    """``registry.load_model(tag, "cpu")``: checksums verified, weights loaded, eval mode."""
    from recsys.serving import registry

    return registry.load_model(tag, device="cpu")


def _is_sequence(module: torch.nn.Module) -> bool:
    return hasattr(module, "item_vectors") and hasattr(getattr(module, "config", None), "max_len")


def _top(scores: np.ndarray, item_ids: np.ndarray, k: int) -> pl.DataFrame:
    """The ``k`` best finite scores (index = item_idx) as rank, item_id, score."""
    finite = np.flatnonzero(np.isfinite(scores))
    k = min(k, finite.size)
    best = finite[np.argsort(-scores[finite], kind="stable")[:k]]
    return pl.DataFrame(
        {
            "rank": np.arange(1, k + 1, dtype=np.int64),
            "item_id": item_ids[best].astype(np.int64),
            "score": scores[best].astype(np.float64),
        }
    )


@torch.inference_mode()
def retrieve(
    loaded: Any, history_ids: Sequence[int], history_ts: Sequence[int], request_ts: int, k: int
) -> pl.DataFrame:
    """The top ``k`` items of a retrieval model for this history at ``request_ts``, history items excluded;
    a history the model knows nothing of falls back to popularity (as the service does)."""
    catalog = loaded.catalog
    ids = np.asarray(history_ids, dtype=np.int64)
    ts = np.asarray(history_ts, dtype=np.int64)
    idx = np.array([catalog.index.get(int(i), 0) for i in ids], dtype=np.int64)
    known = idx > 0
    idx, ts = idx[known], ts[known]
    module = loaded.module
    if _is_sequence(module) and idx.size:
        n = min(idx.size, int(module.config.max_len))
        items = torch.from_numpy(idx[-n:]).unsqueeze(0)
        times = torch.from_numpy(ts[-n:]).unsqueeze(0)
        query = times.clone()
        query[0, :-1] = times[0, 1:]
        query[0, -1] = int(request_ts)
        lengths = torch.tensor([n])
        users = module(items, times, query, lengths)  # [1, n, D], L2-normalised
        scores = (users[0, n - 1] @ module.item_vectors().T).double().numpy()
    else:
        scores = np.log1p(catalog.popularity.astype(np.float64))
    scores = scores.copy()
    scores[0] = -math.inf
    scores[idx] = -math.inf  # seen
    return _top(scores, catalog.item_ids, k)


@torch.inference_mode()
def rank(
    loaded: Any,
    user_id: int,
    history_ids: Sequence[int],
    history_ts: Sequence[int],
    request_ts: int,
    candidates: Sequence[int],
    k: int,
) -> pl.DataFrame:
    """The ranker's order of ``candidates`` (raw item ids) for the user, by its first task: rank, item_id and
    one ``p(<task>)`` per task of a feature ranker (``score`` for a sequence model). Candidates the ranker
    does not know are left out."""
    cand = np.asarray(candidates, dtype=np.int64)
    featurizer = loaded.featurizer
    tasks = tuple(loaded.card.tasks)
    if featurizer is not None:
        if featurizer.knows_user(user_id):  # its own stored history, with event values
            user = featurizer.user_features(user_id, int(request_ts))
        else:
            history = (np.asarray(history_ids, dtype=np.int64), np.asarray(history_ts, dtype=np.int64), None)
            user = featurizer.user_features(user_id, int(request_ts), history)
        cidx = featurizer.map_items(cand)
        keep = cidx > 0
        cand, cidx = cand[keep], cidx[keep]
        if cand.size == 0:
            schema = {"rank": pl.Int64, "item_id": pl.Int64} | {f"p({t})": pl.Float64 for t in tasks}
            return pl.DataFrame(schema=schema)
        batch = featurizer.batch([user], [cidx])
        logits = loaded.module(batch.to("cpu")).logits
        probs = {t: torch.sigmoid(logits[t].float()).double().numpy().reshape(-1) for t in tasks}
    else:
        catalog = loaded.catalog
        cidx = np.array([catalog.index.get(int(i), 0) for i in cand], dtype=np.int64)
        keep = cidx > 0
        cand, cidx = cand[keep], cidx[keep]
        full = retrieve(loaded, history_ids, history_ts, request_ts, k=catalog.num_items)
        lookup = dict(zip(full["item_id"].to_list(), full["score"].to_list(), strict=True))
        probs = {tasks[0]: np.array([lookup.get(int(i), -math.inf) for i in cand], dtype=np.float64)}
    first = probs[tasks[0]]
    order = np.argsort(-first, kind="stable")[:k]
    frame = pl.DataFrame({"rank": np.arange(1, order.size + 1, dtype=np.int64), "item_id": cand[order]})
    if featurizer is None:
        return frame.with_columns(pl.Series("score", first[order]))
    return frame.with_columns(pl.Series(f"p({t})", probs[t][order]) for t in tasks)


def served(
    url: str, user_id: int, k: int, *, api_key: str | None = None, timeout_s: float = 3.0
) -> dict[str, Any]:
    """POST ``{url}/recommend`` for a known user; the decoded response. Raises ``OSError`` (connection
    refused, timeout, HTTP error with the service's message) when the service cannot answer."""
    body = json.dumps({"user_id": int(user_id), "k": int(k)}).encode()
    headers = {"content-type": "application/json"}
    if api_key:
        headers[API_KEY_HEADER] = api_key
    request = urllib.request.Request(
        f"{url.rstrip('/')}/recommend", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return json.loads(resp.read().decode())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise OSError(f"HTTP {exc.code}: {detail}") from exc
