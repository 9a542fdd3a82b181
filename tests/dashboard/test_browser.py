"""End to end: ``streamlit run recsys/dashboard/app.py`` on loopback, every page in headless Chromium.

Two warehouses:

- the one ``test_data.build_warehouse`` writes (fixtures for every table contract): each page must finish
  its script run with no Streamlit exception box and with every chart drawn; full-page PNGs go to
  ``$RECSYS_SCREENSHOT_DIR`` (default ``var/test-artifacts/screenshots/``) beside the server's log;
- the one a real ``recsys pipeline`` run writes (the tiny synthetic preset with popularity, SASRec and HSTU,
  a DeepFM ranker, the distillation, the package and the A/B stage; built once per module, a minute or two):
  the pages a user browses, in the order of the sidebar, by clicking the sidebar as a user does. It checks
  that the retrieval comparison is one group holding popularity, SASRec and HSTU, that the User page shows
  a real user's history and what each packaged model recommends, and that no "Deploy" button is shown.
  Each page's load time (click to the page fully drawn) is measured on a first and a second visit and
  printed (``-s`` shows it); the screenshots of the second visit are written to ``docs/screenshots/``
  (``$RECSYS_DOCS_SCREENSHOT_DIR``), palette-quantised to keep them small.

The browser is Debian's ``chromium`` package (``/usr/bin/chromium``, or ``$RECSYS_CHROMIUM``) driven by the
Python ``playwright`` package; Playwright's own browser download is never used. Without Chromium the tests
skip, except under ``CI=true``, where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from recsys.dashboard import data, explore
from tests.dashboard.test_data import Built, built_warehouse

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("RECSYS_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOT_DIR = Path(
    os.environ.get("RECSYS_SCREENSHOT_DIR", REPO / "var" / "test-artifacts" / "screenshots")
).expanduser()
DOCS_SCREENSHOT_DIR = Path(
    os.environ.get("RECSYS_DOCS_SCREENSHOT_DIR", REPO / "docs" / "screenshots")
).expanduser()
# Flags for a closed network: without the background-networking ones Chromium keeps dialling Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


@dataclass(frozen=True)
class PageSpec:
    url_path: str  # the st.Page file stem ("" for the default page)
    title: str
    min_charts: int = 0
    min_frames: int = 0

    @property
    def png(self) -> str:
        """``ab_results`` -> ``ab-results.png``; the default page (Runs) -> ``runs.png``."""
        return f"{(self.url_path or 'runs').replace('_', '-')}.png"


# Pages on the fixture warehouse (test_data.build_warehouse).
FIXTURE_PAGES = [
    PageSpec("", "Runs"),
    PageSpec("offline", "Offline comparison", 3),
    PageSpec("evidence", "Evidence", 1),
    PageSpec("ab_results", "A/B results", 5),
    PageSpec("continual", "Continual training", 3),
    PageSpec("serving", "Serving", 2),
]
# Pages on the pipeline's warehouse, in sidebar order.
PIPELINE_PAGES = [
    PageSpec("", "Runs", 0, 1),
    PageSpec("offline", "Offline comparison", 2, 1),
    PageSpec("evidence", "Evidence", 1, 2),
    PageSpec("ab_results", "A/B results", 4, 1),
    PageSpec("continual", "Continual training"),
    PageSpec("dataset", "Dataset", 4),
    PageSpec("user", "User", 0, 4),
    PageSpec("serving", "Serving"),
]
# The smallest pipeline that still has every stage: the tiny synthetic world, two epochs per retriever.
PIPELINE_CONFIG = {
    "dataset": {"kind": "synthetic", "synthetic_preset": "tiny"},
    "retrieval_models": ["popularity", "sasrec", "hstu"],
    "retrieval_loop": {"max_epochs": 2, "patience": 2, "progress": False},
    "ranking": {
        "models": ["deepfm"],
        "short_len": 20,
        "long_len": 50,
        "data": {"max_train_examples": 4000, "max_valid_examples": 2000, "max_test_examples": 2000},
        "loop": {"monitor": "auc", "mode": "max", "max_epochs": 1, "patience": 1, "progress": False},
    },
    "torch_threads": 1,
}
PIPELINE_S = 900
SERVER_START_S = 90  # a cold start imports streamlit, polars and altair on a loaded 2-core box
PAGE_S = 120
WIDTH = 1400


def _require_browser() -> None:
    """Skip without Chromium or Playwright, or fail under CI=true, naming what to install."""
    reason = None
    if not CHROMIUM.is_file():
        reason = (
            f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian's package), or set RECSYS_CHROMIUM"
        )
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright Python package is missing: pip install playwright (no browser download)"
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@contextmanager
def _streamlit(env: dict[str, str], log: Path) -> Iterator[str]:
    """The dashboard served on 127.0.0.1 (a free port) with the repository's own config (viewer toolbar);
    yields its base URL."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "recsys/dashboard/app.py",
        f"--server.port={port}",
        "--server.fileWatcherType=none",
        "--server.runOnSave=false",
        "--global.developmentMode=false",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                    if resp.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"streamlit did not answer /_stcore/health in {SERVER_START_S} s:\n{log.read_text()}"
                )
            time.sleep(0.3)
        yield url
    finally:
        _stop(proc)


def _rendered(page, spec: PageSpec) -> None:  # noqa: ANN001 - playwright's Page
    """The script run finished (``stApp`` reports ``notRunning``), no element is still a loading skeleton,
    every chart has drawn its canvas or SVG and the expected tables are there (or an exception box is
    shown, which the tests report)."""
    ms = PAGE_S * 1000
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=ms)
    page.wait_for_function(
        """([minCharts, minFrames]) => {
            if (document.querySelector('[data-testid="stException"]')) return true;  // reported by the test
            const app = document.querySelector('[data-testid="stApp"]');
            if (!app || app.getAttribute('data-test-script-state') !== 'notRunning') return false;
            const charts = [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')];
            const frames = document.querySelectorAll('[data-testid="stDataFrame"]').length;
            return !document.querySelector('[data-testid="stSkeleton"]')
                && charts.length >= minCharts && frames >= minFrames
                && charts.every(c => c.querySelector('canvas, svg'));
        }""",
        arg=[spec.min_charts, spec.min_frames],
        timeout=ms,
        polling=50,
    )


def _settled(page, spec: PageSpec) -> None:  # noqa: ANN001
    """Rendered twice in a row a moment apart: a page can rerun once (a widget settling its value)."""
    page.wait_for_timeout(300)
    _rendered(page, spec)


def _open(page, url: str, spec: PageSpec) -> float:  # noqa: ANN001
    """Load ``spec`` by URL (a new session: the app boots); seconds until drawn."""
    started = time.perf_counter()
    page.goto(f"{url}/{spec.url_path}", wait_until="domcontentloaded", timeout=PAGE_S * 1000)
    page.get_by_role("heading", name=spec.title, exact=True).first.wait_for(timeout=PAGE_S * 1000)
    _rendered(page, spec)
    return time.perf_counter() - started


def _navigate(page, spec: PageSpec) -> float:  # noqa: ANN001
    """Click the page's sidebar link as a user does; seconds from the click until the page is drawn."""
    link = page.locator('[data-testid="stSidebarNav"] a').filter(has_text=spec.title).first
    started = time.perf_counter()
    link.click()
    page.get_by_role("heading", name=spec.title, exact=True).first.wait_for(timeout=PAGE_S * 1000)
    _rendered(page, spec)
    return time.perf_counter() - started


def _full_page_png(page, path: Path) -> None:  # noqa: ANN001
    """A screenshot of the whole page: Streamlit scrolls inside its own container, so the viewport is
    stretched to the content's height first (capped so a runaway page cannot exhaust memory)."""
    height = page.evaluate(
        """() => Math.max(...['[data-testid="stMain"]', '[data-testid="stAppViewContainer"]', 'body']
            .map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight))"""
    )
    page.set_viewport_size({"width": WIDTH, "height": max(800, min(int(height) + 40, 8000))})
    page.wait_for_timeout(700)  # charts re-lay out to the new size
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": WIDTH, "height": 900})


def _small_png(source: Path, target: Path) -> None:
    """``source`` as a 256-colour PNG (a dashboard page compresses to a fraction of its RGB size)."""
    from PIL import Image

    with Image.open(source) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


def _exception(page) -> str | None:  # noqa: ANN001
    errors = page.locator('[data-testid="stException"]')
    return errors.first.inner_text() if errors.count() else None


def _deploy_buttons(page) -> int:  # noqa: ANN001
    """Streamlit's Deploy button, by test id or by its text anywhere in the toolbar and header."""
    return (
        page.locator('[data-testid="stAppDeployButton"]').count()
        + page.locator('header >> text="Deploy"').count()
        + page.get_by_role("button", name="Deploy").count()
    )


def _menu(page) -> str:  # noqa: ANN001
    """The text of Streamlit's main menu (top right), opened and closed again; empty when there is none."""
    button = page.locator('[data-testid="stMainMenu"]')
    if not button.count():
        return ""
    button.first.click()
    items = page.locator('[data-testid="stMainMenuList"]')
    items.wait_for(timeout=10_000)
    text = items.inner_text()
    page.keyboard.press("Escape")
    return text


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Path:
    _require_browser()
    return CHROMIUM


@pytest.fixture(scope="module")
def built(chromium: Path, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_warehouse(tmp_path_factory)


@pytest.fixture(scope="module")
def pipeline_home(chromium: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home holding what ``recsys pipeline`` writes on the tiny config: warehouse, model store, reports.
    Chromium is checked first, so a machine without it skips (or fails under CI) before the minutes here."""
    root = tmp_path_factory.mktemp("pipeline")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(PIPELINE_CONFIG))
    home = root / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BENTOML_"))}
    env["RECSYS_HOME"] = str(home)
    log = root / "pipeline.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsys.flows.cli", "pipeline", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        code = proc.wait(timeout=PIPELINE_S)
    finally:
        _stop(proc)
    assert code == 0, f"recsys pipeline exited {code}:\n{log.read_text()[-4000:]}"
    return home


def _dashboard_env(warehouse: Path, home: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENTOML_")}
    env[data.WAREHOUSE_ENV] = str(warehouse)
    if home is not None:  # the pipeline's model store: BENTOML_HOME follows RECSYS_HOME
        env["RECSYS_HOME"] = str(home)
    return env


# -- tests -------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_page_renders_on_the_fixture_warehouse(chromium: Path, built: Built, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    log = tmp_path / "server.log"
    shots: list[Path] = []
    failures: list[str] = []
    with _streamlit(_dashboard_env(built.path), log) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": WIDTH, "height": 900}).new_page()
            for spec in FIXTURE_PAGES:
                _open(page, url, spec)
                _settled(page, spec)
                shot = tmp_path / spec.png
                _full_page_png(page, shot)
                shots.append(shot)
                if error := _exception(page):
                    failures.append(f"{spec.title}: {error}")
                if _deploy_buttons(page):
                    failures.append(f"{spec.title}: a Deploy button is shown")
        finally:
            browser.close()
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            for shot in shots:
                shutil.copy(shot, SCREENSHOT_DIR / shot.name)
            shutil.copy(log, SCREENSHOT_DIR / "streamlit-server.log")
    assert not failures, f"on the pages (screenshots in {SCREENSHOT_DIR}):\n" + "\n".join(failures)
    assert [s.name for s in shots] == [p.png for p in FIXTURE_PAGES]
    assert all(s.stat().st_size > 10_000 for s in shots)  # an image of a drawn page, not a blank one
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_the_pipeline_records_every_run_with_its_dataset_and_code(pipeline_home: Path) -> None:
    import duckdb

    con = duckdb.connect(str(pipeline_home / "warehouse.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT kind, name, dataset, code_version FROM runs ORDER BY started_at"
        ).fetchall()
    finally:
        con.close()
    kinds = {kind for kind, *_ in rows}
    assert {"retrieval", "ranking", "distill", "ab"} <= kinds
    assert {name for kind, name, *_ in rows if kind == "retrieval"} == {"popularity", "sasrec", "hstu"}
    assert all(dataset == "synthetic" for _, _, dataset, _ in rows), rows
    assert all(code and code.startswith(("git:", "package:")) for *_, code in rows), rows


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_user_browses_the_pipeline_warehouse(chromium: Path, pipeline_home: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    warehouse = pipeline_home / "warehouse.duckdb"
    user = int(explore.users(warehouse, "synthetic")["user_id"][0])  # the User page opens on the most active
    log = tmp_path / "server.log"
    failures: list[str] = []
    first: dict[str, float] = {}
    second: dict[str, float] = {}
    texts: dict[str, str] = {}
    with _streamlit(_dashboard_env(warehouse, pipeline_home), log) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": WIDTH, "height": 900}).new_page()
            boot = _open(page, url, PIPELINE_PAGES[0])
            menu = _menu(page)  # viewer mode: no developer items (rerun, clear cache, settings)
            for spec in PIPELINE_PAGES[1:] + PIPELINE_PAGES[:1]:
                first[spec.title] = _navigate(page, spec)
            for spec in PIPELINE_PAGES:
                second[spec.title] = _navigate(page, spec)
                _settled(page, spec)
                texts[spec.title] = page.locator('[data-testid="stMain"]').inner_text()
                if error := _exception(page):
                    failures.append(f"{spec.title}: {error}")
                if _deploy_buttons(page):
                    failures.append(f"{spec.title}: a Deploy button is shown")
                shot = tmp_path / spec.png
                _full_page_png(page, shot)
                DOCS_SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
                _small_png(shot, DOCS_SCREENSHOT_DIR / spec.png)
        finally:
            browser.close()
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, SCREENSHOT_DIR / "streamlit-server-pipeline.log")

    print(f"\nPage load times on the pipeline's warehouse (click to drawn; app boot + Runs: {boot:.2f} s):")
    print(f"{'page':<22}{'first visit (s)':>17}{'second visit (s)':>18}")
    for spec in PIPELINE_PAGES:
        print(f"{spec.title:<22}{first[spec.title]:>17.2f}{second[spec.title]:>18.2f}")
    print(json.dumps({"boot_s": round(boot, 3), "first_s": first, "second_s": second}))

    assert not failures, "\n".join(failures)
    assert "Traceback" not in log.read_text()
    assert not {"Rerun", "Clear cache", "Settings", "Developer options"} & set(menu.splitlines()), menu
    # One comparison group for the retrieval runs, holding all three models.
    offline = texts["Offline comparison"]
    assert offline.count("leave-one-out") == 1, offline
    assert "3 models: hstu, popularity, sasrec" in offline
    assert "(none)" not in offline
    # The User page: the most active user's history and each packaged model's list.
    user_page = texts["User"]
    assert f"User {user}" in user_page
    assert "synthetic-retriever (= synthetic-sasrec) · sasrec" in user_page
    assert "synthetic-popularity · popularity" in user_page
    assert "synthetic-ranker · rankmixer" in user_page
    assert "History" in user_page and "Recommendations" in user_page
    assert all(s.stat().st_size > 10_000 for s in DOCS_SCREENSHOT_DIR.glob("*.png"))
