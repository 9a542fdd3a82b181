"""Top-k recommendations in the dataset's own ids, from Python and from ``recsys recommend``.

    from recsys import Recommender

    rec = Recommender.load("shop-retriever:latest")      # a registered model (checksums verified)
    top = rec.recommend(["u_0042", "u_0007"], k=10)        # polars: user_id, rank, item_id, score
    everyone = rec.recommend_all(k=10, progress=True)      # every user the model knows

It runs the service's own engine (``serving.service.Recommender``: the same id checks, history lookup,
exclusions, scoring and deterministic top-k policy) in batches, without HTTP, so the list it gives a user is
the list ``/recommend`` serves that user at the same request time. ``rank`` is 1-based; ``score`` is the
model's score (retrieval: user · item / temperature; a ranker's logit when one re-ranks the pool); user and
item ids are the dataset's own (strings or integers, as ingested; ``serving.ids``). A user the model does not
know gets the popularity ranking, as the service's cold start does (``knows`` tells them apart).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import ValidationError

from recsys.core.atomic import atomic_path
from recsys.serving import service
from recsys.serving.ids import IdError, IdType, RawId
from recsys.serving.schemas import HARD_MAX_K, RecommendOptions, RecommendRequest

OUTPUT_COLUMNS = ("user_id", "rank", "item_id", "score")


def _id_dtype(kind: IdType) -> pl.DataType:
    return pl.Utf8() if kind == "str" else pl.Int64()


class Recommender:
    """Batch top-k over a registered retriever (and optional ranker), in the dataset's own ids."""

    def __init__(self, engine: service.Recommender) -> None:
        self.engine = engine

    @classmethod
    def load(
        cls, tag: str, *, ranker: str | None = None, device: str = "cpu", pool_size: int = 200
    ) -> Recommender:
        """Load ``tag`` (``name``, ``name:latest`` or ``name:version``) and optionally a ranker's tag."""
        config = service.ServingConfig(
            retriever=tag,
            ranker=ranker,
            device=device,  # type: ignore[arg-type]
            pool_size=pool_size,
            max_k=HARD_MAX_K,
            max_history=10**9,
            log_impressions=False,  # an offline batch is not a served impression
        )
        return cls(service.Recommender.from_config(config))

    @property
    def tag(self) -> str:
        return self.engine.retriever.tag

    @property
    def user_id_type(self) -> IdType:
        return self.engine.ids.user_type

    @property
    def item_id_type(self) -> IdType:
        return self.engine.ids.item_type

    @property
    def users(self) -> list[RawId]:
        """Every user with a stored history (the users ``recommend_all`` serves), in internal-id order."""
        internal = sorted(self.engine.histories)
        if self.engine.ids.users is None:
            return [int(u) for u in internal]
        raw = self.engine.ids.users.raw_of(np.asarray(internal, dtype=np.int64))
        return [str(r) for r in raw if r is not None]

    def knows(self, user: RawId) -> bool:
        """Whether ``user`` has a stored history (else it is served the popularity ranking)."""
        try:
            internal = self.engine.ids.user_internal(user)
        except IdError:
            return False
        return internal is not None and internal in self.engine.histories

    def recommend(
        self,
        users: Sequence[RawId],
        k: int = 10,
        *,
        exclude_seen: bool = True,
        ts: int | None = None,
        batch_size: int = 256,
        progress: bool = False,
    ) -> pl.DataFrame:
        """The top ``k`` items of each of ``users`` (their own ids): one row per (user, rank), users in the
        given order. ``ts`` is the request time (unix seconds; now by default, one time for the whole
        call); ``exclude_seen`` leaves out the items of each user's history."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        request_ts = int(time.time()) if ts is None else int(ts)
        options = RecommendOptions(exclude_seen=exclude_seen)
        user_col: list[RawId] = []
        rank_col: list[int] = []
        item_col: list[RawId] = []
        score_col: list[float] = []
        for chunk in self._batches(users, batch_size, progress):
            jobs = []
            for user in chunk:
                try:
                    request = RecommendRequest(user_id=user, k=k, ts=request_ts, options=options)
                    jobs.append(self.engine.recommend_job(request))
                except (ValidationError, service.InvalidRequest) as exc:
                    raise ValueError(f"user {user!r}: {exc}") from None
            pools = self.engine.recommend_many(jobs)
            for user, job, pool in zip(chunk, jobs, pools, strict=True):
                response = self.engine.finish_recommend(job, pool)
                for item in response.items:
                    user_col.append(user)
                    rank_col.append(item.position + 1)
                    item_col.append(item.item_id)
                    score_col.append(item.score)
        return pl.DataFrame(
            {
                "user_id": pl.Series(user_col, dtype=_id_dtype(self.user_id_type)),
                "rank": pl.Series(rank_col, dtype=pl.Int32),
                "item_id": pl.Series(item_col, dtype=_id_dtype(self.item_id_type)),
                "score": pl.Series(score_col, dtype=pl.Float64),
            }
        )

    def recommend_all(self, k: int = 10, **options: object) -> pl.DataFrame:
        """``recommend`` for every user the model knows (``users``)."""
        return self.recommend(self.users, k, **options)  # type: ignore[arg-type]

    def close(self) -> None:
        self.engine.close()

    @staticmethod
    def _batches(users: Sequence[RawId], size: int, progress: bool) -> Iterator[Sequence[RawId]]:
        from tqdm.auto import tqdm

        with tqdm(total=len(users), unit="user", disable=not progress, desc="recommend") as bar:
            for lo in range(0, len(users), size):
                chunk = users[lo : lo + size]
                yield chunk
                bar.update(len(chunk))


def read_user_ids(path: str | Path, kind: IdType) -> list[RawId]:
    """The users of ``path``: a Parquet or CSV file with a ``user_id`` column (or a single column), or a text
    file with one id per line (blank lines skipped). Ids are read as text and, for a model whose user ids
    are integers, parsed as integers; a bad line is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"users file {path} does not exist")
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith(".parquet") or suffix.endswith(".csv") or suffix.endswith(".csv.gz"):
        frame = (
            pl.read_parquet(path)
            if suffix.endswith(".parquet")
            else pl.read_csv(path, infer_schema=False)  # text, so "0042" keeps its zeros
        )
        column = "user_id" if "user_id" in frame.columns else frame.columns[0] if frame.width == 1 else None
        if column is None:
            raise ValueError(f"users file {path}: no user_id column (columns: {frame.columns})")
        values = [str(v) for v in frame[column].drop_nulls().to_list()]
        first_line = 2  # the header is line 1 (Parquet: row numbers, 1-based, shifted alike)
    else:
        values = [line.strip() for line in path.read_text().splitlines()]
        first_line = 1
    out: list[RawId] = []
    for n, text in enumerate(values, start=first_line):
        if not text:
            continue
        if kind == "str":
            out.append(text)
            continue
        try:
            out.append(int(text))
        except ValueError:
            raise ValueError(
                f"users file {path}, line {n}: {text!r} is not an integer id "
                "(this model's user ids are integers)"
            ) from None
    return out


def write_recommendations(frame: pl.DataFrame, out: str | Path) -> Path:
    """Write ``frame`` (``Recommender.recommend``'s columns) to ``out`` (.parquet or .csv), through a
    temporary file renamed at the end (a reader never sees half a file)."""
    out = Path(out)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise ValueError(f"out: {out} must end in .parquet or .csv")
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".parquet":
            frame.write_parquet(tmp)
        else:
            frame.write_csv(tmp)
    return out
