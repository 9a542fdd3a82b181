"""Where the platform (and the test suite) finds MovieLens-100K without downloading it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import recsys.core.environment
from recsys.ingest.movielens import (
    ML100K_ENV,
    ML100K_FILES,
    find_movielens_100k,
    movielens_100k_missing_reason,
)


def _fake(folder: Path, marker: bool = False) -> Path:
    """A folder with every ML-100K file name (finding it needs only the files to be there)."""
    folder.mkdir(parents=True)
    for name in ML100K_FILES:
        (folder / name).write_text("")
    if marker:
        (folder / ".source.json").write_text(json.dumps({"checksums": []}))
    return folder


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root with no sibling shared/ and no RECSYS_ML100K_DIR: a fresh clone."""
    root = tmp_path / "clone" / "repo"
    root.mkdir(parents=True)
    monkeypatch.setattr(recsys.core.environment, "PROJECT_ROOT", root)
    monkeypatch.delenv(ML100K_ENV, raising=False)
    return root


def test_the_order_is_env_then_sibling_then_verified_cache(
    project: Path, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    assert find_movielens_100k(cache) is None
    reason = movielens_100k_missing_reason(cache)
    assert (
        f"${ML100K_ENV} (unset)" in reason and str(project.parent / "shared" / "data" / "ml-100k") in reason
    )

    unverified = _fake(cache / "ml-100k")  # unpacked by hand, never checksum-verified: not used
    assert find_movielens_100k(cache) is None
    (unverified / ".source.json").write_text("{}")
    assert find_movielens_100k(cache) == unverified

    sibling = _fake(project.parent / "shared" / "data" / "ml-100k")
    assert find_movielens_100k(cache) == sibling

    mine = _fake(tmp_path / "mine" / "ml-100k")
    monkeypatch.setenv(ML100K_ENV, str(mine.parent))  # the folder holding ml-100k/ is accepted too
    assert find_movielens_100k(cache) == mine


def test_an_incomplete_folder_is_skipped(project: Path, tmp_path: Path, monkeypatch) -> None:
    partial = _fake(tmp_path / "partial")
    (partial / "u.item").unlink()
    monkeypatch.setenv(ML100K_ENV, str(partial))
    assert find_movielens_100k(tmp_path / "cache") is None
    assert f"${ML100K_ENV} ({partial})" in movielens_100k_missing_reason(tmp_path / "cache")
