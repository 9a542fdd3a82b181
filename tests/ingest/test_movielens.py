"""MovieLens-100K ingest on the real files, and the verified download against a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from recsys.core.hashing import file_sha256
from recsys.ingest.movielens import (
    ML100K_FILES,
    IngestError,
    MovieLensFormatError,
    download_movielens_100k,
    ingest_movielens,
    load_movielens_100k,
)
from recsys.warehouse import Warehouse


@pytest.fixture
def ml_copy(ml100k_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the real files, for tests that damage them."""
    dst = tmp_path / "ml-100k"
    dst.mkdir()
    for name in ML100K_FILES:
        shutil.copy(ml100k_dir / name, dst / name)
    return dst


def test_load_reads_the_real_files(ml100k_dir: Path) -> None:
    frames = load_movielens_100k(ml100k_dir)
    assert frames.ratings.height == 100_000
    assert frames.users.height == 943
    assert frames.items.height == 1682
    assert (frames.ratings["rating"].min(), frames.ratings["rating"].max()) == (1, 5)
    assert frames.genres[:3] == ("unknown", "Action", "Adventure") and len(frames.genres) == 19
    assert len(frames.occupations) == 21
    first = frames.ratings.row(0, named=True)
    assert first == {"user_id": 196, "item_id": 242, "rating": 3, "ts": 881250949, "src_row": 0}
    toy_story = frames.items.filter(item_id=1).row(0, named=True)
    assert toy_story["genres"] == ["Animation", "Children's", "Comedy"]
    assert toy_story["release_ts"] == 788918400  # 1995-01-01 00:00 UTC
    # u.item is latin-1: the accented title must survive decoding.
    assert frames.items.filter(item_id=543)["title"][0] == "Misérables, Les (1995)"


def test_ingest_publishes_the_contract_tables(ml100k_dir: Path, warehouse_path: Path) -> None:
    with Warehouse(warehouse_path) as wh:
        versions = ingest_movielens(wh, ml100k_dir)
        assert set(versions) == {"ml100k.events", "ml100k.users", "ml100k.items", "ml100k.rejects"}
        assert {k: v.row_count for k, v in versions.items()} == {
            "ml100k.events": 100_000,
            "ml100k.users": 943,
            "ml100k.items": 1682,
            "ml100k.rejects": 0,
        }
        types = {r[0]: r[1] for r in wh.con.execute("DESCRIBE ml100k.events").fetchall()}
        assert types == {
            "user_id": "BIGINT",
            "item_id": "BIGINT",
            "ts": "BIGINT",
            "event": "VARCHAR",
            "value": "DOUBLE",
            "src_row": "BIGINT",
        }
        row = wh.sql("SELECT * FROM ml100k.events WHERE src_row = 0").row(0, named=True)
        assert row == {
            "user_id": 196,
            "item_id": 242,
            "ts": 881250949,
            "event": "rating",
            "value": 3.0,
            "src_row": 0,
        }
        stats = wh.sql(
            "SELECT count(DISTINCT user_id) AS u, count(DISTINCT item_id) AS i, min(value) AS lo,"
            " max(value) AS hi, count(DISTINCT src_row) AS rows FROM ml100k.events"
        ).row(0, named=True)
        assert stats == {"u": 943, "i": 1682, "lo": 1.0, "hi": 5.0, "rows": 100_000}

        user = wh.sql("SELECT * FROM ml100k.users WHERE user_id = 1").row(0, named=True)
        assert user == {
            "user_id": 1,
            "age": 24,
            "age_bucket": "18-24",
            "gender": "M",
            "occupation": "technician",
            "zip_prefix": "8",
        }
        items = wh.sql("SELECT * FROM ml100k.items WHERE item_id IN (2, 267) ORDER BY item_id").to_dicts()
        assert items[0]["category"] == "Action" and items[0]["genres"] == ["Action", "Adventure", "Thriller"]
        assert items[1] == {
            "item_id": 267,
            "title": "unknown",
            "release_ts": None,
            "category": "unknown",
            "genres": ["unknown"],
        }
        assert wh.sql("SELECT count(*) AS n FROM ml100k.items WHERE category IS NULL")["n"][0] == 0

        lineage = wh.latest("ml100k.events")
        assert lineage is not None
        assert lineage.inputs["file:u.data"] == file_sha256(ml100k_dir / "u.data")
        assert lineage.params["loader"].startswith("movielens-100k/")


def test_unchanged_files_skip_the_rebuild(ml100k_dir: Path, warehouse_path: Path) -> None:
    with Warehouse(warehouse_path) as wh:
        first = ingest_movielens(wh, ml100k_dir, dataset="ml")
        n_lineage = wh.con.execute("SELECT count(*) FROM lineage").fetchone()[0]
        again = ingest_movielens(wh, ml100k_dir, dataset="ml")
        assert again == first
        assert wh.con.execute("SELECT count(*) FROM lineage").fetchone()[0] == n_lineage


def test_value_problems_go_to_rejects(ml_copy: Path, warehouse_path: Path) -> None:
    with open(ml_copy / "u.data", "a") as f:
        f.write("1\t1\t7\t880000000\n")  # line 100001: rating out of range
        f.write("9999\t1\t3\t880000000\n")  # line 100002: unknown user
        f.write("196\t242\t4\t881250950\n")  # line 100003: second rating of (196, 242)
    with Warehouse(warehouse_path) as wh:
        versions = ingest_movielens(wh, ml_copy)
        assert versions["ml100k.events"].row_count == 100_000
        rejects = wh.sql("SELECT * FROM ml100k.rejects ORDER BY row").rows()
        assert rejects == [
            ("u.data", 100001, "bad_rating"),
            ("u.data", 100002, "unknown_user_id"),
            ("u.data", 100003, "duplicate_rating"),
        ]


def test_malformed_line_and_missing_file_are_named(ml_copy: Path) -> None:
    lines = (ml_copy / "u.data").read_text().splitlines()
    lines[4] = "186\t302\t3"
    (ml_copy / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(MovieLensFormatError, match=r"u\.data line 5: expected 4"):
        load_movielens_100k(ml_copy)
    (ml_copy / "u.item").unlink()
    with pytest.raises(MovieLensFormatError, match=r"u\.item not found"):
        load_movielens_100k(ml_copy)


class _Server:
    def __init__(self, root: Path) -> None:
        self.requests = 0
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.requests += 1
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ml-100k.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@dataclass(frozen=True)
class _Served:
    server: _Server
    sha256: str
    md5: str


@pytest.fixture
def served_zip(ml100k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Served]:
    """A zip of the fixture's files, laid out like GroupLens's, served on 127.0.0.1, with its digests."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "www"
    root.mkdir()
    with zipfile.ZipFile(root / "ml-100k.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ml-100k/", "")
        for name in ML100K_FILES:
            zf.write(ml100k_dir / name, f"ml-100k/{name}")
    server = _Server(root)
    try:
        data = (root / "ml-100k.zip").read_bytes()
        yield _Served(server, hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def test_download_with_the_right_checksum(served_zip: _Served, tmp_path: Path) -> None:
    server, checksums = served_zip.server, (f"md5:{served_zip.md5}", f"sha256:{served_zip.sha256}")
    cache = tmp_path / "cache"
    folder = download_movielens_100k(cache, url=server.url, checksum=checksums)
    assert folder == cache / "ml-100k"
    assert all((folder / name).is_file() for name in ML100K_FILES)
    frames = load_movielens_100k(cache_dir=cache, url=server.url, checksum=checksums)
    assert frames.ratings.height == 100_000
    assert server.requests == 1  # the verified, unpacked copy is reused
    with Warehouse(tmp_path / "w.duckdb") as wh:
        versions = ingest_movielens(wh, cache_dir=cache, url=server.url, checksum=checksums)
    assert versions["ml100k.users"].row_count == 943
    assert server.requests == 1
    # A single digest is enough when given alone.
    other = download_movielens_100k(tmp_path / "other", url=server.url, checksum=f"md5:{served_zip.md5}")
    assert (other / "u.data").is_file()


def test_download_with_a_wrong_checksum_leaves_nothing(served_zip: _Served, tmp_path: Path) -> None:
    server = served_zip.server
    cache = tmp_path / "cache"
    # The md5 matches but the sha256 does not: every given digest must match.
    with pytest.raises(IngestError, match="checksum mismatch.*sha256 expected 0{64}"):
        download_movielens_100k(
            cache, url=server.url, checksum=[f"md5:{served_zip.md5}", "sha256:" + "0" * 64]
        )
    assert list(cache.iterdir()) == []
    with pytest.raises(ValueError, match="checksum must be"):
        download_movielens_100k(cache, url=server.url, checksum=served_zip.sha256)  # no algorithm prefix
