"""Screenshots of the explorer over a store whose concepts mean something (the tiny world's demo store),
for the README and docs/guide/serve.md. Not a test: run by hand after a change to the pages.

    python -m engine.cli demo --size tiny --quick --store /tmp/explorer-store --out /tmp/explorer-demo
    cut -f2 /tmp/explorer-store/models/world-tiny-*/corpus/heldout.tsv > /tmp/corpus.txt
    python -m engine.cli contexts world-tiny-subject-a-L2-ridge --corpus /tmp/corpus.txt --store /tmp/explorer-store
    python -m tests.serve.shoot_explorer /tmp/explorer-store docs/img
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.serve.app import create_app
from engine.store.store import Store
from tests.serve.conftest import ARGS, CHROMIUM
from tests.serve_helpers import running


def shoot(store_dir: str, out: str, concept: str = "world-tiny/2") -> list[Path]:
    from playwright.sync_api import sync_playwright

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    store = Store.open(store_dir)
    made = []
    with running(create_app(store)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        for width, suffix in ((1280, ""), (390, "-390")):
            page = browser.new_page(base_url=url, viewport={"width": width, "height": 900})
            page.goto(f"/c/{concept}")
            page.wait_for_selector("details.contexts[data-shaded]", timeout=120_000)
            page.wait_for_selector("#logits .logits", timeout=120_000)
            page.locator("div.density button").first.click()
            page.wait_for_selector("div.density figcaption", timeout=120_000)
            page.fill("#try-text", "the rain fell on the roof and the wind came over the hills")
            page.click("#try-go")
            page.wait_for_selector("#try-tokens")
            page.fill("#cs-n", "12")
            page.click("#cs-go")
            page.wait_for_selector("#cs-out .pair", timeout=120_000)
            made.append(folder / f"concept{suffix}.png")
            page.screenshot(path=str(made[-1]), full_page=True)
            page.close()
        page = browser.new_page(base_url=url, viewport={"width": 1280, "height": 800})
        page.goto("/?q=weather")
        page.wait_for_selector("#hits tr.hit")
        made.append(folder / "search.png")
        page.screenshot(path=str(made[-1]))
        page.goto("/explain")
        page.fill("#explain-text", "the storm brought rain and snow while the violin played on the farm")
        page.click("#explain-go")
        page.wait_for_selector("#tokens .tok")
        made.append(folder / "explain.png")
        page.screenshot(path=str(made[-1]), full_page=True)
        page.goto("/steer?concept=Weather")
        page.fill("#steer-prompt", "the\nonce again there was")
        page.fill("#steer-n", "12")
        page.click("#steer-go")
        page.wait_for_selector("#steer-out .pair", timeout=120_000)
        made.append(folder / "steer.png")
        page.screenshot(path=str(made[-1]), full_page=True)
        run = store.runs()[0].name
        page.goto(f"/runs/{run}")
        page.wait_for_selector("#rows tr.run-row")
        made.append(folder / "run.png")
        page.screenshot(path=str(made[-1]))
        page.goto("/a/world-tiny-sae?labelled=true")
        page.wait_for_selector("#concepts tr.concept")
        made.append(folder / "atlas.png")
        page.screenshot(path=str(made[-1]))
        browser.close()
    store.close()
    return made


if __name__ == "__main__":
    for path in shoot(*sys.argv[1:3]):
        print(path)
