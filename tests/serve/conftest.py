"""The browser tests' shared pieces: one server over the serve store and one headless Chromium per
module (Playwright driving the system's /usr/bin/chromium; never a downloaded browser), a fresh page
per test that fails the test on any uncaught script error or console error."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("ATLAS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
NO_CHROMIUM = f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (Debian) to run the browser tests"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    pytest.importorskip("fastapi", reason="the server's tests need the serve extra: pip install 'concept-atlas[serve]'")
    import torch

    from engine.serve.app import create_app
    from tests.serve_helpers import build_serve_store, running
    from tests.steering.test_steering import save_tiny_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve-browser")
    store = build_serve_store(root, save_tiny_model("llama", root / "subject"))
    with running(create_app(store)) as url:
        yield url
    store.close()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(NO_CHROMIUM)
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need Playwright: pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def new_page(browser, base_url, width: int = 1280, height: int = 820):
    """A page in a new context whose uncaught errors and console errors are collected in ``page.errors``."""
    context = browser.new_context(base_url=base_url, viewport={"width": width, "height": height}, accept_downloads=True)
    p = context.new_page()
    p.set_default_timeout(15_000)
    p.errors = []
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    p.on("console", lambda m: p.errors.append(m.text) if m.type == "error" and not expected_console(m.text) else None)
    return p


def expected_console(text: str) -> bool:
    """Console errors a test provokes on purpose: the 404 of an unknown page, the 4xx of a refused request."""
    return "status of 404" in text or "status of 400" in text or "status of 422" in text


@pytest.fixture
def page(browser, base_url):
    p = new_page(browser, base_url)
    yield p
    errors = p.errors
    p.context.close()
    assert errors == []  # no uncaught script error or console error on any page


@pytest.fixture
def narrow(browser, base_url):
    p = new_page(browser, base_url, width=390, height=844)
    yield p
    errors = p.errors
    p.context.close()
    assert errors == []


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("ATLAS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
