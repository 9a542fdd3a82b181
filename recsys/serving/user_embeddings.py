"""User embeddings served at ``/user_embedding``: a table of user vectors registered in the model store.

``register_user_embeddings`` stores one BentoML model ``<name>:<version>`` (``recsys.task`` label
``user_embedding``) holding ``user_embeddings.parquet`` (``user_id``: the warehouse's internal id,
``embedding``: float32 list, and ``raw_user_id`` when the dataset's user ids are strings) and ``card.json``
(dimension, count, data version, where the vectors came from). The sha256 of both files is recorded at
registration and checked by ``load_user_embeddings`` before anything is read, as ``serving.registry`` does
for models; the checksums sit under their own metadata key, so ``registry.list_models`` (trained models
only) does not list these tables.

The service loads the tag named by ``RECSYS_SERVING_USER_EMBEDDINGS`` at start. A request names the user by
the dataset's own id (``serving.ids``); the answer is the stored vector. An id of the wrong type is a 400 and
an id the table does not hold is a 404, both naming ``user_id``; a service started without embeddings
answers 404 naming the setting.

OPEN choice, and what was picked: the vectors are the exported ones (``recsys users register``: a finished
``recsys users run``), not computed per request from a sent history: the encoder's embedding of a history is
what the probes judged, and a table lookup needs no model at serving time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
import polars as pl
from bentoml.exceptions import InvalidArgument, NotFound
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

import recsys.core  # noqa: F401  (BENTOML_HOME before BentoML reads it)
from recsys.core.atomic import atomic_dir
from recsys.core.config import FrozenModel
from recsys.core.environment import state_dir
from recsys.core.hashing import file_sha256, stable_hash
from recsys.serving.ids import IdError, IdMap, IdMaps
from recsys.serving.registry import RegistryError, resolve

TABLE_FILE = "user_embeddings.parquet"
CARD_FILE = "card.json"
CHECKSUMS = "user_embedding_sha256"  # not "sha256": registry.list_models lists trained models only
TASK_LABEL = "user_embedding"
ENV_VARIABLE = "RECSYS_SERVING_USER_EMBEDDINGS"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")

Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
RawUserId = Int64 | Annotated[StrictStr, Field(min_length=1, max_length=512)]


class UserEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: RawUserId = Field(
        description="The user's own id (an integer or a string, as the dataset has it)."
    )


class UserEmbeddingResponse(BaseModel):
    user_id: RawUserId
    embedding: list[float] = Field(description="The user's vector (L2-normalised by the user encoder).")
    dimension: int
    source: str = Field(description="Tag of the served user embeddings (name:version).")


class UserEmbeddingCard(FrozenModel):
    name: str
    dimension: int = Field(gt=0)
    users: int = Field(gt=0)
    data_version: str = Field(min_length=1)
    source: str = Field(description="Where the vectors come from, e.g. 'user_repr ml100k ggsm seed 0'.")
    created_at: str


def _check_table(frame: pl.DataFrame) -> pl.DataFrame:
    missing = {"user_id", "embedding"} - set(frame.columns)
    if missing:
        raise ValueError(f"embeddings: missing column(s) {sorted(missing)}; need user_id and embedding")
    if frame.height == 0:
        raise ValueError("embeddings: the table is empty")
    if frame["user_id"].null_count() or frame["user_id"].n_unique() != frame.height:
        raise ValueError("embeddings.user_id: every row needs a distinct, non-null user id")
    lengths = frame["embedding"].list.len()
    if lengths.n_unique() != 1 or lengths[0] == 0:
        raise ValueError("embeddings.embedding: every vector must have the same, non-zero length")
    matrix = np.asarray(frame["embedding"].to_list(), dtype=np.float32)
    if not np.isfinite(matrix).all():
        raise ValueError("embeddings.embedding: vectors must be finite (no NaN or inf)")
    columns = {
        "user_id": frame["user_id"].cast(pl.Int64),
        "embedding": pl.Series("embedding", matrix.tolist(), dtype=pl.List(pl.Float32)),
    }
    if "raw_user_id" in frame.columns:
        raw = frame["raw_user_id"].cast(pl.Utf8)
        if raw.null_count() or raw.n_unique() != frame.height:
            raise ValueError("embeddings.raw_user_id: every row needs a distinct, non-null raw id")
        columns["raw_user_id"] = raw
    return pl.DataFrame(columns)


def register_user_embeddings(name: str, frame: pl.DataFrame, *, data_version: str, source: str) -> str:
    """Store ``frame`` (``user_id``, ``embedding``, optional ``raw_user_id``) as ``name:<version>``; the same
    content registered again returns the existing tag."""
    if not _NAME.match(name):
        raise RegistryError(f"name {name!r} must be lower-case letters, digits, '.', '_' or '-'")
    table = _check_table(frame)
    with atomic_dir(state_dir() / "tmp", f"register-{name}") as staging:
        table.write_parquet(staging / TABLE_FILE)
        table_sha = file_sha256(staging / TABLE_FILE)
        version = f"{re.sub(r'[^a-z0-9._-]+', '-', data_version.lower()).strip('-._')[:48] or 'data'}-"
        version += stable_hash(table_sha, source, length=8)
        try:
            existing = bentoml.models.get(f"{name}:{version}")
        except bentoml.exceptions.NotFound:
            existing = None
        if existing is not None:
            return str(existing.tag)
        card = UserEmbeddingCard(
            name=name,
            dimension=len(table["embedding"][0]),
            users=table.height,
            data_version=data_version,
            source=source,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        (staging / CARD_FILE).write_text(json.dumps(card.model_dump(mode="json"), indent=2, sort_keys=True))
        content = {TABLE_FILE: table_sha, CARD_FILE: file_sha256(staging / CARD_FILE)}
        metadata = {"task": TASK_LABEL, "data_version": data_version, "source": source, CHECKSUMS: content}
        labels = {"recsys.task": TASK_LABEL}
        with bentoml.models.create(bentoml.Tag(name, version), labels=labels, metadata=metadata) as stored:
            for file in content:
                (Path(stored.path) / file).write_bytes((staging / file).read_bytes())
        return str(stored.tag)


@dataclass(frozen=True)
class UserEmbeddings:
    """A loaded table: raw user id -> vector."""

    tag: str
    card: UserEmbeddingCard
    matrix: np.ndarray  # [U, D] float32
    row: dict[int, int]  # internal user id -> row of matrix
    ids: IdMaps  # raw <-> internal user ids (users=None: integer ids)

    def lookup(self, user_id: int | str) -> np.ndarray:
        """The vector of the user with this raw id; ``IdError`` (wrong type) or ``KeyError`` (unknown)."""
        internal = self.ids.user_internal(user_id)
        if internal is None or internal not in self.row:
            raise KeyError(user_id)
        return self.matrix[self.row[internal]]

    def respond(self, request: UserEmbeddingRequest) -> UserEmbeddingResponse:
        """The response for one request; 400 (wrong id type) or 404 (unknown user), naming user_id."""
        try:
            vector = self.lookup(request.user_id)
        except IdError as exc:
            raise InvalidArgument(f"{exc.field}: {exc.problem}") from None
        except KeyError:
            raise NotFound(
                f"user_id: unknown user {request.user_id!r}: the user embeddings {self.tag} hold no such "
                f"user ({self.card.users} users)"
            ) from None
        return UserEmbeddingResponse(
            user_id=request.user_id, embedding=vector.tolist(), dimension=self.card.dimension, source=self.tag
        )


def load_user_embeddings(tag: str) -> UserEmbeddings:
    """Resolve ``tag``, check both files against their registered sha256, load the table."""
    concrete = resolve(tag)
    stored = bentoml.models.get(concrete)
    expected = stored.info.metadata.get(CHECKSUMS)
    if not isinstance(expected, dict) or set(expected) != {TABLE_FILE, CARD_FILE}:
        raise RegistryError(f"{concrete!r} is not a registered user-embedding table (no {CHECKSUMS})")
    root = Path(stored.path)
    for file, digest in expected.items():
        path = root / file
        if not path.is_file():
            raise RegistryError(f"{concrete!r}: file {file} is missing")
        if file_sha256(path) != digest:
            raise RegistryError(f"{concrete!r}: file {file} does not match its registered sha256")
    card = UserEmbeddingCard.model_validate_json((root / CARD_FILE).read_text())
    table = pl.read_parquet(root / TABLE_FILE)
    matrix = np.asarray(table["embedding"].to_list(), dtype=np.float32)
    internal = table["user_id"].to_numpy()
    users = None
    if "raw_user_id" in table.columns:
        users = IdMap.from_pairs("user", table["raw_user_id"].to_list(), internal)
    row = {int(u): r for r, u in enumerate(internal)}
    return UserEmbeddings(concrete, card, matrix, row, IdMaps(users=users))


def not_served() -> NotFound:
    """The answer of a service started without user embeddings."""
    return NotFound(f"user_embedding: this service serves no user embeddings (set {ENV_VARIABLE} to a tag)")
