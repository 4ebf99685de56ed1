"""The explorer's quality bars (issue 23, part 5), in headless Chromium: every page at 1280 px and at
390 px without sideways scrolling, no serious or critical axe-core violation (axe injected from
tests/serve/data, the npm package's file), a console free of errors (the ``page`` fixtures), and a
keyboard-only walk from a search to a concept to a steered text."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server's tests need the serve extra: pip install 'concept-atlas[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need Playwright: pip install playwright")

from tests.serve.conftest import CHROMIUM, NO_CHROMIUM, new_page  # noqa: E402

# a real browser per test: slow (CI runs them; `-m "not slow"` skips them)
pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=NO_CHROMIUM), pytest.mark.slow]
AXE = Path(__file__).parent / "data" / "axe.min.js"
PAGES = ["/", "/?q=weather", "/c/fdn/2", "/c/sae/3", "/a/fdn", "/a/sae?labelled=false", "/m/m1", "/models/subj",
         "/runs/r1", "/explain", "/steer", "/nosuchpage"]
SEVERE = "['serious', 'critical'].includes(v.impact)"


def settle(page, path):
    page.goto(path)
    page.wait_for_selector("main h1")
    page.wait_for_load_state("networkidle")  # the concept page's logits and shaded windows come after
    if path == "/explain":
        page.click("#explain-go")
        page.wait_for_selector("#tokens .tok")


def severe_violations(page) -> list[dict]:
    page.add_script_tag(path=str(AXE))
    return page.evaluate(f"""axe.run(document, {{ resultTypes: ['violations'] }}).then(r => r.violations
        .filter(v => {SEVERE}).map(v => ({{ id: v.id, impact: v.impact, help: v.help,
        nodes: v.nodes.slice(0, 3).map(n => n.target.join(' ')) }})))""")


@pytest.mark.parametrize("width", [1280, 390])
def test_every_page_fits_and_passes_axe(browser, base_url, width):
    page = new_page(browser, base_url, width=width, height=900)
    settle(page, "/")
    page.evaluate("document.body.append(Object.assign(document.createElement('img'), { src: '/static/favicon.svg' }))")
    assert "image-alt" in [v["id"] for v in severe_violations(page)]  # axe runs and sees what it should
    problems = {}
    for path in PAGES:
        settle(page, path)
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        found = severe_violations(page)
        if overflow > 0 or found:
            problems[path] = {"overflow_px": overflow, "axe": found}
    errors = page.errors
    page.context.close()
    assert problems == {} and errors == []


def test_keyboard_only_search_to_concept_to_steer(page):
    page.goto("/")
    page.wait_for_selector("#q")
    assert page.evaluate("document.activeElement.id") == "q"  # the box has the focus on arrival
    page.keyboard.type("animals")
    page.keyboard.press("Enter")
    page.wait_for_selector("#hits tr.hit")

    def tab_to(predicate: str, limit: int = 60) -> None:
        for _ in range(limit):
            page.keyboard.press("Tab")
            if page.evaluate(f"(e => {predicate})(document.activeElement)"):
                return
        raise AssertionError(f"Tab never reached {predicate}")

    tab_to("e.tagName === 'A' && e.textContent === 'animals'")
    page.keyboard.press("Enter")
    page.wait_for_selector("#label")
    assert page.url.endswith("/c/fdn/2")
    tab_to("e.id === 'steer-with'")
    page.keyboard.press("Enter")
    page.wait_for_selector("#steer-go")
    sync_api.expect(page.locator("#steer-concepts")).to_have_value("fdn/2")
    tab_to("e.id === 'steer-n'")
    page.keyboard.press("Control+a")
    page.keyboard.type("4")
    tab_to("e.id === 'steer-go'")
    page.keyboard.press("Enter")
    page.wait_for_selector("#steer-out .pair")
    assert "animals" in page.inner_text("#steer-out")
