"""The project installs as one import package, ``recsys``, with the data files it reads at run time."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The project's wheel, built without dependencies from a copy of the tracked sources (the build
    writes build/ and egg-info beside its input: never into the working tree)."""
    src = tmp_path_factory.mktemp("src")
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "pyproject.toml", "README.md", "recsys"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (t.decode() for t in tracked)):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=src,
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("recsys_platform-*.whl")
    return zipfile.ZipFile(path)


def test_the_only_top_level_package_is_recsys(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    (record,) = [n for n in names if n.endswith(".dist-info/RECORD")]
    listed = [line.split(",")[0] for line in wheel.read(record).decode().splitlines() if line]
    tops = {p.split("/")[0] for p in listed if not p.split("/")[0].endswith(".dist-info")}
    assert tops == {"recsys"}
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level).decode().split() == ["recsys"]
    assert not [n for n in names if n.startswith("tests/")]


def test_run_time_data_files_are_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert "recsys/serving/bentofile.yaml" in names
    # Every page the dashboard's navigation names is shipped next to app.py.
    app = wheel.read("recsys/dashboard/app.py").decode()
    pages = re.findall(r'st\.Page\("([^"]+)"', app)
    assert pages and all(f"recsys/dashboard/{page}" in names for page in pages)
    # Every module of the source tree is in the wheel.
    sources = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "recsys").rglob("*.py")}
    assert sources <= names
