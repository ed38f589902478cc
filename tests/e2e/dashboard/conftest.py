"""The dashboard in a real browser: Debian's headless Chromium (never a downloaded build), driven by
Playwright, against one real `xrayq up` stack shared by every test here.

The stack is the embedded one (SQLite, a spool folder, a local object store: it starts in seconds)
with API keys switched on, so sign-in, sessions and organisations are what services mode has. Each
test writes a screenshot of each page it visits to test-artifacts/screenshots/ (kept by the run).
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtest.harness.images import CHEST_TRAIN
from tests.conftest import ADMIN_KEY
from tests.e2e.conftest import ROOT, Stack

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class Keys:
    admin: str
    north: str  # organisation "north": submit and train
    north_submit: str  # organisation "north": submit only
    south: str  # organisation "south": submit


@pytest.fixture(scope="session")
def dashboard_stack(embedded_env, tmp_path_factory) -> Iterator[Stack]:
    """A copy of the embedded home with its tiny trained model, served with API keys required."""
    home = tmp_path_factory.mktemp("dashboard-home") / "home"
    shutil.copytree(embedded_env["XRAYQ_HOME"], home, ignore=shutil.ignore_patterns("broker", "*.log"))
    env = {**embedded_env, "XRAYQ_HOME": str(home), "XRAYQ_AUTH": "on", "XRAYQ_ADMIN_KEY": ADMIN_KEY}
    stack = Stack(env, tmp_path_factory.mktemp("logs") / "dashboard.log")
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def keys(dashboard_stack: Stack) -> Keys:
    def key(name: str, organisation: str, roles: list[str]) -> str:
        response = dashboard_stack.http.post(
            "/v1/api-keys", json={"name": name, "organisation": organisation, "roles": roles}
        )
        assert response.status_code == 201, response.text
        return response.json()["key"]

    return Keys(
        admin=ADMIN_KEY,
        north=key("north lab", "north", ["submit", "train"]),
        north_submit=key("north ward", "north", ["submit"]),
        south=key("south ward", "south", ["submit"]),
    )


# Package scope: sync_playwright keeps an event loop running on this thread until it exits, and
# later tests that call asyncio.run() must not find it.
@pytest.fixture(scope="package")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run does).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Chromium's sandbox needs an unprivileged user; CI runs these as root.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield launched
        launched.close()


class Dashboard:
    """One signed-in browser context: its page, and the console errors it logged (CSP refusals are)."""

    def __init__(self, browser, stack: Stack, key: str | None, name: str) -> None:
        self.context = browser.new_context(base_url=stack.url, viewport={"width": 1360, "height": 900})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.name = name
        self.errors: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        if key is not None:
            self.sign_in(key)

    def sign_in(self, key: str) -> None:
        self.page.goto("/")
        self.page.fill("#api-key", key)
        self.page.click("#sign-in-form button[type=submit]")
        self.page.wait_for_selector("header nav a")

    def open(self, path: str) -> None:
        self.page.goto(path)
        self.page.wait_for_load_state("domcontentloaded")

    def screenshot(self, page_name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{self.name}-{page_name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def dashboard(browser, dashboard_stack, request):
    """`dashboard(key)`: a fresh signed-in browser context, closed after the test; no console errors allowed."""
    opened: list[Dashboard] = []

    def open_dashboard(key: str | None) -> Dashboard:
        opened.append(Dashboard(browser, dashboard_stack, key, request.node.name.removeprefix("test_")))
        return opened[-1]

    yield open_dashboard
    for board in opened:
        board.close()
    errors = [error for board in opened for error in board.errors if "401" not in error and "403" not in error]
    assert not errors, f"the pages logged errors: {errors}"


def chest_zip(data_dir: Path, per_class: int, *, with_folders: bool) -> bytes:
    """Real chest X-rays in a ZIP: CLASS/ folders (a dataset) or flat (a batch)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for label in ("NORMAL", "PNEUMONIA"):
            for path in sorted((data_dir / CHEST_TRAIN / label).glob("*.jpeg"))[:per_class]:
                archive.write(path, f"{label}/{path.name}" if with_folders else f"{label.lower()}-{path.name}")
    return buffer.getvalue()
