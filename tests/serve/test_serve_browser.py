"""The explorer in headless Chromium (Playwright driving the system's /usr/bin/chromium; never a
downloaded browser): search → concept → its labelled subject features; explain; steer; a run page.

Screenshots go to the test's temporary folder, or to ``$ATLAS_SCREENSHOTS`` (of this random store; the
docs' come from the tiny world's store: tests/serve/shoot_explorer.py). Skips, saying why, where Chromium
or Playwright is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server's tests need the serve extra: pip install 'concept-atlas[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need Playwright: pip install playwright")

from tests.serve.conftest import CHROMIUM, NO_CHROMIUM  # noqa: E402

# a real browser per test: slow (CI runs them; `-m "not slow"` skips them)
pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=NO_CHROMIUM), pytest.mark.slow]


def test_search_then_concept_then_its_labelled_features(page, shots):
    page.goto("/")
    page.fill("#q", "animals")
    page.click("button[type=submit]")
    page.wait_for_selector("#hits tr.hit")
    page.screenshot(path=str(shots / "search.png"))
    page.click("#hits a:has-text('animals')")
    page.wait_for_selector("#label")
    assert page.url.endswith("/c/fdn/2") and page.inner_text("#label") == "animals"
    assert "fdn-directions.npy" in page.inner_text("dl.prov") and page.locator("#neighbours tbody tr").count() == 9 - 5
    features = page.locator("details.features[data-map=m1]")
    features.locator("summary").click()
    rows = features.locator("tr.feature")
    rows.first.wait_for()
    assert rows.count() > 0 and "r1" in rows.first.inner_text()
    page.screenshot(path=str(shots / "concept.png"), full_page=True)
    rows.first.locator("a").click()  # on to the run the label came from
    page.wait_for_selector("#rows tr.run-row")
    assert "/runs/r1" in page.url


def test_concept_page_shows_top_contexts_with_the_token_highlighted(page, base_url):
    import httpx

    [api] = httpx.get(base_url + "/api/concepts/fdn/2/contexts").json()
    page.goto("/c/fdn/2")
    block = page.locator("details.contexts[data-source='map:m1']")
    block.locator("li.ctx mark.ctx-tok").first.wait_for()
    items = block.locator("li.ctx")
    assert items.count() == len(api["contexts"]) == 8
    assert block.locator("mark.ctx-tok").all_inner_texts() == [c["token"] for c in api["contexts"]]
    first = api["contexts"][0]
    assert items.first.locator(".ctx-text").inner_text() == ("…" if first["window_start"] > 0 else "") + first["window"]
    assert "m1" in block.locator("summary").inner_text()
    page.goto("/c/other/1")
    page.wait_for_selector("#label")
    assert "atlas contexts other --corpus FILE" in page.inner_text("main")


def test_run_page_sorts_and_pages(page, shots):
    page.goto("/runs/r1")
    page.wait_for_selector("#rows tr.run-row")
    assert page.locator("#rows tr.run-row").count() == 100 and "1–100 of 300" in page.inner_text("#range")
    page.click("th[data-sort=margin]")
    sync_api.expect(page.locator("th[data-sort=margin]")).to_contain_text("▼")  # the new page is drawn
    margins = [float(t) for t in page.locator("#rows tr.run-row td:nth-child(4)").all_inner_texts()]
    assert margins == sorted(margins, reverse=True)
    page.click("text=next →")
    sync_api.expect(page.locator("#range")).to_contain_text("101–200 of 300")
    page.screenshot(path=str(shots / "run.png"))
    assert page.get_attribute("a:has-text('csv')", "href") == "/api/runs/r1/export?format=csv"


def test_explain_colours_tokens(page, shots):
    page.goto("/explain")
    page.fill("#explain-text", "the red lion and the blue bear in the rain")
    page.click("#explain-go")
    page.wait_for_selector("#tokens .tok")
    tokens = page.locator("#tokens .tok")
    assert tokens.count() == 10
    assert all("hsla(" in (tokens.nth(i).get_attribute("style") or "") or "rgba(" in (tokens.nth(i).get_attribute("style") or "")
               for i in range(tokens.count()))
    tokens.nth(2).hover()
    page.wait_for_selector("#tip:not([hidden]) tr")
    assert page.locator(".summary-max tbody tr").count() > 0
    page.screenshot(path=str(shots / "explain.png"))


def test_steer_shows_both_outputs_and_saves_the_plan(page, shots):
    page.goto("/steer")
    page.fill("#steer-concepts", "weather")
    page.fill("#steer-prompt", "the\nit was the")
    page.locator("#steer-strength").fill("2.5")
    assert page.inner_text("#strength-value") == "2.5"
    page.fill("#steer-n", "6")
    page.click("#steer-go")
    page.wait_for_selector("#steer-out .pair")
    assert page.locator(".pair").count() == 2
    assert page.locator(".out.unsteered").first.inner_text().strip() != "unsteered"
    assert page.locator(".out.steered").first.inner_text().strip() != "steered"
    assert "perplexity" in page.inner_text("#perplexity")
    page.screenshot(path=str(shots / "steer.png"), full_page=True)
    link = page.locator("#save-plan")
    assert link.is_visible() and link.get_attribute("download") == "steering-plan.json"
    plan = page.evaluate("fetch(document.getElementById('save-plan').href).then((r) => r.json())")
    assert plan["map"] == "m1" and plan["concepts"][0]["ref"] == "fdn/0" and plan["strength"] == 2.5
