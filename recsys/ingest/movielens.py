"""MovieLens-100K: read the GroupLens files (from a folder, or downloaded and checksum-verified) and publish
``<dataset>.events/users/items/rejects`` as in docs/data-contracts.md.

Choices left open by the brief, and what was picked:
- Checksum: GroupLens publishes only an MD5 of ml-100k.zip (``ml-100k.zip.md5``: 0e33842e...), so that is
  verified. MD5 alone no longer resists deliberate tampering, so the default also requires SHA-256
  50d2a982..., the digest many independent loaders pin for the same 4,924,029-byte archive (their pinned
  u.data and u.item digests match the files of this repository's fixture). ``checksum`` takes one or several
  ``"md5:<hex>"``/``"sha256:<hex>"``; all must match.
- Structural problems (missing file, wrong field count, a non-integer id, an unparsable date, a genre flag
  that is not 0/1, an unknown occupation) are errors naming file and line: the input is then not ML-100K.
  Value problems (rating outside 1..5, duplicate ids, a duplicate (user, item) rating, a rating of an unknown
  user or item) go to ``<dataset>.rejects``; the clean files have none.
- ``age_bucket`` uses the MovieLens-1M age groups (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+);
  ``zip_prefix`` is the first character of the zip code (the US national area digit; a letter for the
  Canadian codes), coarse enough to be a usable categorical feature for 943 users.
- ``category`` is the first listed genre in u.genre order (flag columns left to right); ``release_ts`` is the
  release date at 00:00 UTC, NULL when the file has none (item 267).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from calendar import timegm
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.core.atomic import atomic_path, owned_tempdir
from recsys.core.config import PathsConfig
from recsys.core.hashing import stable_hash
from recsys.ingest.schema import IngestError, check_dataset, fresh_versions
from recsys.warehouse import TableVersion, Warehouse

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"  # the digest GroupLens itself publishes
#: Both must match by default: the MD5 GroupLens publishes, and the SHA-256 other loaders pin.
ML100K_CHECKSUMS = (f"md5:{ML100K_MD5}", f"sha256:{ML100K_SHA256}")
ML100K_FILES = ("u.data", "u.user", "u.item", "u.genre", "u.occupation")
#: Bumped whenever the parsing or the published columns change, so ``is_fresh`` forces a rebuild.
LOADER_VERSION = "movielens-100k/1"
RATING_RANGE = (1, 5)
AGE_BUCKETS: tuple[tuple[int, str], ...] = (
    (18, "<18"),
    (25, "18-24"),
    (35, "25-34"),
    (45, "35-44"),
    (50, "45-49"),
    (56, "50-55"),
)
ZIP_PREFIX_LEN = 1
_MONTHS = {
    m: i
    for i, m in enumerate(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], 1
    )
}
_MARKER = ".source.json"


class MovieLensFormatError(IngestError):
    """A MovieLens file is missing or a line of it is not in the documented format."""


@dataclass(frozen=True)
class MovieLensFrames:
    """The parsed files. ``src_row`` is the 0-based line number in the file each row came from."""

    source_dir: Path
    ratings: pl.DataFrame  # user_id, item_id, rating, ts, src_row
    users: pl.DataFrame  # user_id, age, gender, occupation, zip_code, src_row
    items: pl.DataFrame  # item_id, title, release_ts, imdb_url, genres (list[str]), src_row
    genres: tuple[str, ...]  # u.genre, in flag-column order
    occupations: tuple[str, ...]
    sha256: dict[str, str]  # file name -> digest of the bytes that were parsed


# -- download ------------------------------------------------------------------------------------------


def _parse_checksums(checksum: str | Sequence[str]) -> dict[str, str]:
    """'md5:<hex>' / 'sha256:<hex>' (one, or several that must all match) -> {algorithm: digest}."""
    items = [checksum] if isinstance(checksum, str) else list(checksum)
    if not items:
        raise ValueError("at least one checksum is required to download ML-100K")
    lengths = {"sha256": 64, "md5": 32}
    out: dict[str, str] = {}
    for item in items:
        algo, sep, digest = item.partition(":")
        digest = digest.strip().lower()
        if not sep or algo not in lengths or len(digest) != lengths[algo] or digest.strip("0123456789abcdef"):
            raise ValueError(f"checksum must be 'sha256:<64 hex>' or 'md5:<32 hex>', got {item!r}")
        if out.get(algo, digest) != digest:
            raise ValueError(f"two different {algo} checksums given: {out[algo]} and {digest}")
        out[algo] = digest
    return out


def _hash_file(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _mismatches(expected: dict[str, str], got: dict[str, str]) -> list[str]:
    return [f"{algo} expected {d}, got {got[algo]}" for algo, d in expected.items() if got[algo] != d]


def _fetch_verified(url: str, target: Path, expected: dict[str, str], timeout: float) -> None:
    """Download ``url`` to ``target`` through a temp file; the rename happens only if every digest matches."""
    with atomic_path(target) as tmp:
        hashes = {algo: hashlib.new(algo) for algo in expected}
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while block := response.read(1 << 20):
                    for h in hashes.values():
                        h.update(block)
                    out.write(block)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise IngestError(
                f"could not download {url}: {exc}; pass source_dir= to read already unpacked ML-100K files"
            ) from exc
        bad = _mismatches(expected, {algo: h.hexdigest() for algo, h in hashes.items()})
        if bad:
            raise IngestError(
                f"checksum mismatch for {url}: {'; '.join(bad)}. The download was discarded (pass checksum= "
                "only if you have verified a different release)"
            )


def _unpack(archive: Path, target: Path, stamp: list[str]) -> None:
    """Extract the ml-100k/ folder of ``archive`` beside ``target`` and rename it into place."""
    staging = owned_tempdir(target.parent, "ml-100k")
    try:
        unpacked = staging / "ml-100k"
        unpacked.mkdir()
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                parts = Path(member.filename).parts
                # Only the top-level ml-100k/ files; a name with '..' or a sub-folder is never written.
                if member.is_dir() or len(parts) != 2 or parts[0] != "ml-100k" or parts[1] in ("..", "."):
                    continue
                with zf.open(member) as src, open(unpacked / parts[1], "wb") as dst:
                    shutil.copyfileobj(src, dst)
        missing = [name for name in ML100K_FILES if not (unpacked / name).is_file()]
        if missing:
            raise MovieLensFormatError(f"{archive} has no ml-100k/{', ml-100k/'.join(missing)}")
        (unpacked / _MARKER).write_text(json.dumps({"checksums": stamp}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_movielens_100k(
    cache_dir: Path | None = None,
    *,
    url: str = ML100K_URL,
    checksum: str | Sequence[str] = ML100K_CHECKSUMS,
    timeout: float = 60.0,
) -> Path:
    """The folder of unpacked ML-100K files under ``cache_dir`` (default ``PathsConfig().cache``).

    Downloads ``url`` only when no verified copy is cached; the archive is checked against every digest of
    ``checksum`` before anything is unpacked, and a mismatch leaves nothing behind.
    """
    expected = _parse_checksums(checksum)
    stamp = sorted(f"{algo}:{digest}" for algo, digest in expected.items())
    cache_dir = Path(cache_dir) if cache_dir is not None else PathsConfig().cache
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / "ml-100k"
    marker = target / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("checksums") == stamp:
        return target
    archive = cache_dir / "ml-100k.zip"
    if not (archive.is_file() and not _mismatches(expected, {a: _hash_file(archive, a) for a in expected})):
        _fetch_verified(url, archive, expected, timeout)
    _unpack(archive, target, stamp)
    return target


#: Environment variable naming an unzipped ml-100k folder (looked at first by ``find_movielens_100k``).
ML100K_ENV = "RECSYS_ML100K_DIR"


def movielens_100k_candidates(cache_dir: Path | None = None) -> list[tuple[str, Path | None]]:
    """Where ``find_movielens_100k`` looks, in order, as ``(label, folder)``: ``$RECSYS_ML100K_DIR``
    (None when unset), the sibling ``../shared/data/ml-100k`` of the project root, and the download cache
    (``cache_dir``, default ``PathsConfig().cache``)."""
    from recsys.core.environment import PROJECT_ROOT

    env = os.environ.get(ML100K_ENV)
    cache = Path(cache_dir) if cache_dir is not None else PathsConfig().cache
    return [
        (f"${ML100K_ENV}", Path(env).expanduser() if env else None),
        ("../shared/data/ml-100k", PROJECT_ROOT.parent / "shared" / "data" / "ml-100k"),
        ("the verified download's cache", cache / "ml-100k"),
    ]


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ML100K_FILES)


def find_movielens_100k(cache_dir: Path | None = None) -> Path | None:
    """The first folder of ``movielens_100k_candidates`` that holds every ML-100K file (a cache folder
    only if ``download_movielens_100k`` verified it); None when there is none. Never downloads."""
    for label, folder in movielens_100k_candidates(cache_dir):
        if folder is None:
            continue
        folder = _resolve_candidate(folder)
        if not _complete(folder):
            continue
        if label.startswith("the verified") and not (folder / _MARKER).is_file():
            continue
        return folder
    return None


def _resolve_candidate(folder: Path) -> Path:
    # Like _resolve_dir: the folder that contains an unzipped ml-100k/ is accepted too.
    return folder / "ml-100k" if not _complete(folder) and _complete(folder / "ml-100k") else folder


def movielens_100k_missing_reason(cache_dir: Path | None = None) -> str:
    """Why ``find_movielens_100k`` found nothing: every place it looked."""
    looked = [
        f"{label} ({folder})" if folder is not None else f"{label} (unset)"
        for label, folder in movielens_100k_candidates(cache_dir)
    ]
    return (
        f"MovieLens-100K files not found; looked in {', '.join(looked)}. Set {ML100K_ENV} to an unzipped"
        " ml-100k folder, or download it once with `recsys features build --kind movielens`"
    )


# -- parsing -------------------------------------------------------------------------------------------


def _resolve_dir(source_dir: Path) -> Path:
    source_dir = Path(source_dir)
    # Accept the folder that contains the unzipped ml-100k/ as well as ml-100k/ itself.
    if not (source_dir / "u.data").exists() and (source_dir / "ml-100k" / "u.data").exists():
        source_dir = source_dir / "ml-100k"
    missing = [name for name in ML100K_FILES if not (source_dir / name).is_file()]
    if missing:
        raise MovieLensFormatError(
            f"MovieLens-100K file(s) {', '.join(missing)} not found in {source_dir} "
            "(expected the unzipped ml-100k folder; call without a directory to download it)"
        )
    return source_dir


def _read(path: Path) -> tuple[list[str], str]:
    raw = path.read_bytes()
    # u.item is latin-1 (titles such as "Misérables"); the other files are ASCII, a subset of it.
    return raw.decode("latin-1").splitlines(), hashlib.sha256(raw).hexdigest()


def _fields(path: Path, lineno: int, line: str, sep: str, n: int) -> list[str]:
    fields = line.split(sep)
    if len(fields) != n:
        raise MovieLensFormatError(
            f"{path} line {lineno}: expected {n} {sep!r}-separated fields, got {len(fields)}: {line[:120]!r}"
        )
    return fields


def _int(path: Path, lineno: int, field: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise MovieLensFormatError(f"{path} line {lineno}: {field} {text!r} is not an integer") from None


def _date_ts(path: Path, lineno: int, text: str) -> int | None:
    """'01-Jan-1995' -> unix seconds at 00:00 UTC (month names parsed without the locale); '' -> None."""
    if not text:
        return None
    parts = text.split("-")
    if len(parts) != 3 or parts[1] not in _MONTHS or not (parts[0].isdigit() and parts[2].isdigit()):
        raise MovieLensFormatError(f"{path} line {lineno}: release date {text!r} is not like '01-Jan-1995'")
    return timegm((int(parts[2]), _MONTHS[parts[1]], int(parts[0]), 0, 0, 0))


def _named_list(path: Path, lines: list[str]) -> list[tuple[str, int]]:
    out = []
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            name, index = _fields(path, lineno, line, "|", 2)
            out.append((name, _int(path, lineno, "genre index", index)))
    return out


def load_movielens_100k(
    source_dir: Path | None = None,
    *,
    cache_dir: Path | None = None,
    url: str = ML100K_URL,
    checksum: str | Sequence[str] = ML100K_CHECKSUMS,
) -> MovieLensFrames:
    """Parse u.data, u.user, u.item, u.genre and u.occupation from ``source_dir`` (downloaded when None)."""
    if source_dir is None:
        source_dir = download_movielens_100k(cache_dir, url=url, checksum=checksum)
    src = _resolve_dir(source_dir)
    sha: dict[str, str] = {}

    path = src / "u.genre"
    lines, sha["u.genre"] = _read(path)
    genre_rows = _named_list(path, lines)
    if [i for _, i in genre_rows] != list(range(len(genre_rows))):
        raise MovieLensFormatError(f"{path}: genre indices must be 0..{len(genre_rows) - 1} in order")
    genres = tuple(name for name, _ in genre_rows)

    path = src / "u.occupation"
    lines, sha["u.occupation"] = _read(path)
    occupations = tuple(line.strip() for line in lines if line.strip())

    path = src / "u.data"
    lines, sha["u.data"] = _read(path)
    cols: dict[str, list[int]] = {"user_id": [], "item_id": [], "rating": [], "ts": []}
    for lineno, line in enumerate(lines, start=1):
        fields = _fields(path, lineno, line, "\t", 4)
        for (name, values), text in zip(cols.items(), fields, strict=True):
            values.append(_int(path, lineno, name, text))
    ratings = pl.DataFrame(cols, schema=dict.fromkeys(cols, pl.Int64)).with_row_index("src_row")
    ratings = ratings.select("user_id", "item_id", "rating", "ts", pl.col("src_row").cast(pl.Int64))

    path = src / "u.user"
    lines, sha["u.user"] = _read(path)
    users: dict[str, list] = {"user_id": [], "age": [], "gender": [], "occupation": [], "zip_code": []}
    for lineno, line in enumerate(lines, start=1):
        uid, age, gender, occupation, zip_code = _fields(path, lineno, line, "|", 5)
        if gender not in ("M", "F"):
            raise MovieLensFormatError(f"{path} line {lineno}: gender {gender!r} is not 'M' or 'F'")
        if occupation not in occupations:
            raise MovieLensFormatError(
                f"{path} line {lineno}: occupation {occupation!r} is not in u.occupation"
            )
        users["user_id"].append(_int(path, lineno, "user id", uid))
        users["age"].append(_int(path, lineno, "age", age))
        users["gender"].append(gender)
        users["occupation"].append(occupation)
        users["zip_code"].append(zip_code)
    users_df = pl.DataFrame(
        users,
        schema={
            "user_id": pl.Int64,
            "age": pl.Int32,
            "gender": pl.String,
            "occupation": pl.String,
            "zip_code": pl.String,
        },
    ).with_row_index("src_row")

    path = src / "u.item"
    lines, sha["u.item"] = _read(path)
    items: dict[str, list] = {"item_id": [], "title": [], "release_ts": [], "imdb_url": [], "genres": []}
    n_fields = 5 + len(genres)
    for lineno, line in enumerate(lines, start=1):
        fields = _fields(path, lineno, line, "|", n_fields)
        flags = fields[5:]
        if any(f not in ("0", "1") for f in flags):
            raise MovieLensFormatError(
                f"{path} line {lineno}: genre flags must be 0 or 1, got {'|'.join(flags)}"
            )
        items["item_id"].append(_int(path, lineno, "movie id", fields[0]))
        items["title"].append(fields[1])
        items["release_ts"].append(_date_ts(path, lineno, fields[2]))
        items["imdb_url"].append(fields[4] or None)
        items["genres"].append([g for g, f in zip(genres, flags, strict=True) if f == "1"])
    items_df = pl.DataFrame(
        items,
        schema={
            "item_id": pl.Int64,
            "title": pl.String,
            "release_ts": pl.Int64,
            "imdb_url": pl.String,
            "genres": pl.List(pl.String),
        },
    ).with_row_index("src_row")

    return MovieLensFrames(
        source_dir=src,
        ratings=ratings,
        users=users_df.with_columns(pl.col("src_row").cast(pl.Int64)),
        items=items_df.with_columns(pl.col("src_row").cast(pl.Int64)),
        genres=genres,
        occupations=occupations,
        sha256=sha,
    )


# -- publishing ----------------------------------------------------------------------------------------


def _age_bucket() -> pl.Expr:
    expr = pl.when(pl.lit(False)).then(pl.lit(None, dtype=pl.String))
    for upper, label in AGE_BUCKETS:
        expr = expr.when(pl.col("age") < upper).then(pl.lit(label))
    return expr.otherwise(pl.lit(f"{AGE_BUCKETS[-1][0]}+"))


def _first_duplicate(keys: list[str]) -> pl.Expr:
    """True on every row after the first (in file order) with the same ``keys``."""
    return pl.int_range(pl.len()).over(keys) > 0


def _tables(frames: MovieLensFrames) -> dict[str, pl.DataFrame]:
    """The four contract tables, value-level problems moved to rejects (first occurrence of a key wins)."""
    users = frames.users.sort("src_row").with_columns(
        pl.when(_first_duplicate(["user_id"])).then(pl.lit("duplicate_user_id")).alias("reason")
    )
    items = frames.items.sort("src_row").with_columns(
        pl.when(_first_duplicate(["item_id"])).then(pl.lit("duplicate_item_id")).alias("reason")
    )
    known_users = users.filter(pl.col("reason").is_null())["user_id"].implode()
    known_items = items.filter(pl.col("reason").is_null())["item_id"].implode()
    lo, hi = RATING_RANGE
    ratings = frames.ratings.sort("src_row").with_columns(
        pl.when(~pl.col("rating").is_between(lo, hi))
        .then(pl.lit("bad_rating"))
        .when(~pl.col("user_id").is_in(known_users))
        .then(pl.lit("unknown_user_id"))
        .when(~pl.col("item_id").is_in(known_items))
        .then(pl.lit("unknown_item_id"))
        .alias("reason")
    )
    ok = pl.col("reason").is_null()
    dup = pl.int_range(pl.len()).over(["user_id", "item_id", ok]) > 0
    ratings = ratings.with_columns(
        pl.when(ok & dup).then(pl.lit("duplicate_rating")).otherwise("reason").alias("reason")
    )

    rejects = pl.concat(
        [
            frame.filter(pl.col("reason").is_not_null()).select(
                pl.lit(name).alias("file"), (pl.col("src_row") + 1).alias("row"), "reason"
            )
            for name, frame in (("u.data", ratings), ("u.user", users), ("u.item", items))
        ]
    )
    events = ratings.filter(ok).select(
        "user_id",
        "item_id",
        "ts",
        pl.lit("rating").alias("event"),
        pl.col("rating").cast(pl.Float64).alias("value"),
        "src_row",
    )
    users_out = users.filter(ok).select(
        "user_id",
        "age",
        _age_bucket().alias("age_bucket"),
        "gender",
        "occupation",
        pl.col("zip_code").str.slice(0, ZIP_PREFIX_LEN).str.to_uppercase().alias("zip_prefix"),
    )
    items_out = items.filter(ok).select(
        "item_id",
        "title",
        "release_ts",
        pl.col("genres").list.first().fill_null("unknown").alias("category"),
        "genres",
    )
    return {"events": events, "users": users_out, "items": items_out, "rejects": rejects}


def ingest_movielens(
    wh: Warehouse,
    source_dir: Path | None = None,
    *,
    dataset: str = "ml100k",
    cache_dir: Path | None = None,
    url: str = ML100K_URL,
    checksum: str | Sequence[str] = ML100K_CHECKSUMS,
) -> dict[str, TableVersion]:
    """Publish ``<dataset>.events/users/items/rejects`` (one transaction); returns versions by table name.

    The input key is the SHA-256 of the five source files plus ``LOADER_VERSION``: when every table is already
    published from that key, nothing is parsed or written and the existing versions are returned.
    """
    check_dataset(dataset)
    if source_dir is None:
        source_dir = download_movielens_100k(cache_dir, url=url, checksum=checksum)
    src = _resolve_dir(source_dir)
    inputs = {f"file:{name}": _hash_file(src / name, "sha256") for name in ML100K_FILES}
    params = {"loader": LOADER_VERSION}
    names = {t: f"{dataset}.{t}" for t in ("events", "users", "items", "rejects")}
    fresh = fresh_versions(wh, names.values(), stable_hash(inputs, params))
    if fresh is not None:
        return fresh
    frames = load_movielens_100k(src)
    # The parsed bytes are what the lineage names; a file changed between hashing and parsing is an error.
    if {f"file:{k}": v for k, v in frames.sha256.items()} != inputs:
        raise IngestError(f"MovieLens files in {src} changed while being read; run the ingest again")
    tables = _tables(frames)
    return wh.publish_many({names[t]: tables[t] for t in names}, inputs=inputs, params=params)
