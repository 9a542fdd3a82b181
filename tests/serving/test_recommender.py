"""recsys.serving.recommender: the users file, the output file, and the cheap top-level front door (the
batch top-k itself is checked against the served one in tests/examples/test_sample_events.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from recsys.serving.recommender import read_user_ids, write_recommendations

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_import_recsys_stays_cheap_and_exports_recommender() -> None:
    code = (
        "import sys, recsys\n"
        "heavy = [m for m in ('torch', 'bentoml', 'polars', 'duckdb') if m in sys.modules]\n"
        "assert heavy == [], heavy\n"
        "from recsys.serving.recommender import Recommender\n"
        "assert recsys.Recommender is Recommender\n"
        "try:\n    recsys.Nope\nexcept AttributeError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "module 'recsys' has no attribute 'Nope'" in out.stdout


def test_users_files_keep_the_ids_as_written(tmp_path: Path) -> None:
    text = tmp_path / "users.txt"
    text.write_text("u_0042\n\n 0007 \n")
    assert read_user_ids(text, "str") == ["u_0042", "0007"]
    csv = tmp_path / "users.csv"
    csv.write_text("name,user_id\nx,0042\ny,u_1\n")
    assert read_user_ids(csv, "str") == ["0042", "u_1"]  # text: the leading zero stays
    parquet = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": [3, 1]}).write_parquet(parquet)
    assert read_user_ids(parquet, "int") == [3, 1]


def test_a_bad_users_file_names_the_line(tmp_path: Path) -> None:
    text = tmp_path / "users.txt"
    text.write_text("12\n13\nbob\n")
    with pytest.raises(ValueError, match=r"users.txt, line 3: 'bob' is not an integer id"):
        read_user_ids(text, "int")
    wide = tmp_path / "wide.csv"
    wide.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no user_id column"):
        read_user_ids(wide, "int")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_user_ids(tmp_path / "missing.txt", "str")


def test_recommendations_are_written_whole(tmp_path: Path) -> None:
    frame = pl.DataFrame({"user_id": ["a"], "rank": [1], "item_id": ["sku-1"], "score": [0.5]})
    assert pl.read_csv(write_recommendations(frame, tmp_path / "r.csv")).equals(frame)
    assert pl.read_parquet(write_recommendations(frame, tmp_path / "r.parquet")).equals(frame)
    with pytest.raises(ValueError, match="must end in .parquet or .csv"):
        write_recommendations(frame, tmp_path / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.parquet"]  # no temp file left
