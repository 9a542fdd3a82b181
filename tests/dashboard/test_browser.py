"""End to end: ``streamlit run dashboard/app.py`` on loopback, every page loaded in headless Chromium.

The server reads the warehouse that ``test_data.build_warehouse`` writes; each page must finish its script
run with no Streamlit exception box on it and with every chart drawn. A full-page PNG of each page is kept
as a test artefact, in ``$RECSYS_SCREENSHOT_DIR`` (default ``var/test-artifacts/screenshots/`` in the
repository), beside the server's log.

The browser is Debian's ``chromium`` package (``/usr/bin/chromium``, or ``$RECSYS_CHROMIUM``) driven by the
Python ``playwright`` package; Playwright's own browser download is never used. Without Chromium the test
skips, except under ``CI=true``, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.dashboard import data
from tests.dashboard.test_data import Built, built_warehouse

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("RECSYS_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOT_DIR = Path(
    os.environ.get("RECSYS_SCREENSHOT_DIR", REPO / "var" / "test-artifacts" / "screenshots")
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
# (url path, title, charts the page must draw) -- url paths are the st.Page file stems (dashboard/app.py).
PAGES = [
    ("", "Runs", 0),
    ("offline", "Offline comparison", 3),
    ("ab_results", "A/B results", 5),
    ("continual", "Continual training", 3),
    ("serving", "Serving", 2),
]
SERVER_START_S = 90  # a cold start imports streamlit, polars and altair on a loaded 2-core box
PAGE_S = 90
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
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built_warehouse(tmp_path_factory)


@pytest.fixture(scope="module")
def chromium() -> Path:
    _require_browser()
    return CHROMIUM


@pytest.fixture(scope="module")
def server(
    chromium: Path, built: Built, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """The dashboard served on 127.0.0.1 (a free port): its base URL and its log file. Chromium is checked
    first, so a machine without it skips (or fails under CI) before the warehouse is built."""
    port = _free_port()
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = os.environ | {data.WAREHOUSE_ENV: str(built.path)}
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "recsys/dashboard/app.py",
        "--server.address=127.0.0.1",
        f"--server.port={port}",
        "--server.headless=true",
        "--server.fileWatcherType=none",
        "--server.runOnSave=false",
        "--browser.gatherUsageStats=false",
        "--global.developmentMode=false",
        "--client.toolbarMode=minimal",
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
        yield url, log
    finally:
        _stop(proc)
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, SCREENSHOT_DIR / "streamlit-server.log")


def _wait_until_rendered(page, min_charts: int) -> None:  # noqa: ANN001 - playwright's Page
    """The script run finished (``stApp`` reports ``notRunning``), no element is still a loading skeleton,
    and every chart has drawn its canvas or SVG (or an exception box is shown, which the test reports);
    checked twice in a row, since a page can rerun once."""
    ms = PAGE_S * 1000
    for _ in range(2):
        page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=ms)
        page.wait_for_function(
            """(minCharts) => {
                if (document.querySelector('[data-testid="stException"]')) return true;  // reported below
                const charts = [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')];
                return !document.querySelector('[data-testid="stSkeleton"]')
                    && charts.length >= minCharts
                    && charts.every(c => c.querySelector('canvas, svg'));
            }""",
            arg=min_charts,
            timeout=ms,
        )
        page.wait_for_timeout(300)


def _full_page_png(page, path: Path) -> None:  # noqa: ANN001
    """A screenshot of the whole page: Streamlit scrolls inside its own container, so the viewport is
    stretched to the content's height first (capped so a runaway page cannot exhaust memory)."""
    height = page.evaluate(
        """() => Math.max(...['[data-testid="stMain"]', '[data-testid="stAppViewContainer"]', 'body']
            .map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight))"""
    )
    page.set_viewport_size({"width": WIDTH, "height": max(800, min(int(height) + 40, 12000))})
    page.wait_for_timeout(700)  # charts re-lay out to the new size
    page.screenshot(path=str(path), full_page=True)


def _png(url_path: str) -> str:
    """``ab_results`` -> ``ab-results.png``; the default page (Runs) -> ``runs.png``."""
    return f"{(url_path or 'runs').replace('_', '-')}.png"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_every_page_renders_in_headless_chromium(
    chromium: Path, server: tuple[str, Path], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    url, log = server
    shots: list[Path] = []
    failures: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": WIDTH, "height": 900})
            page = context.new_page()
            for path, title, min_charts in PAGES:
                page.set_viewport_size({"width": WIDTH, "height": 900})
                page.goto(f"{url}/{path}", wait_until="domcontentloaded", timeout=PAGE_S * 1000)
                page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=PAGE_S * 1000)
                _wait_until_rendered(page, min_charts)
                shot = tmp_path / _png(path)
                _full_page_png(page, shot)
                shots.append(shot)
                errors = page.locator('[data-testid="stException"]')
                if errors.count():
                    failures.append(f"{title}: {errors.first.inner_text()}")
        finally:
            browser.close()
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            for shot in shots:
                shutil.copy(shot, SCREENSHOT_DIR / shot.name)
    assert not failures, (
        f"Streamlit exceptions on the pages (screenshots in {SCREENSHOT_DIR}):\n" + "\n".join(failures)
    )
    assert [s.name for s in shots] == [_png(p) for p, _, _ in PAGES]
    assert all(s.stat().st_size > 10_000 for s in shots)  # an image of a drawn page, not a blank one
    assert "Traceback" not in log.read_text()
