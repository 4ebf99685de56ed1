"""The explorer's defects of issue 23, each in a real browser (headless system Chromium): offline API
docs, explain's colours and messages, steer and search that can say no, the concept page's labels
and contexts, navigation, the 390 px layout, export names, keyboard access, browse pages."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server's tests need the serve extra: pip install 'concept-atlas[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need Playwright: pip install playwright")
httpx = pytest.importorskip("httpx", reason="the server's tests need httpx (the serve-test extra)")

from engine.atlas.lookup import semantic_available  # noqa: E402
from tests.serve.conftest import CHROMIUM, NO_CHROMIUM  # noqa: E402

# a real browser per test: slow (CI runs them; `-m "not slow"` skips them)
pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=NO_CHROMIUM), pytest.mark.slow]
expect = sync_api.expect


def explain(page, text, k=None):
    page.goto("/explain")
    page.fill("#explain-text", text)
    if k is not None:
        page.fill("#explain-k", str(k))
    page.click("#explain-go")


def no_overflow(page) -> int:
    """The page's width beyond the viewport (0: nothing scrolls sideways)."""
    return page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")


# 1 ------------------------------------------------------------------ the API docs offline


@pytest.mark.parametrize("path, ready", [("/docs", ".swagger-ui .opblock"), ("/redoc", "h1:has-text('Concept Atlas')")])
def test_api_docs_render_without_the_internet(page, base_url, path, ready):
    outside: list[str] = []

    def only_local(route):
        if route.request.url.startswith(base_url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(path)
    page.wait_for_selector(ready, timeout=20_000)
    page.wait_for_load_state("networkidle")
    # nothing outside the server, not even ReDoc's footer logo (served replaced): no aborted load, and so
    # no console error, which the page fixture would report
    assert outside == []


# 2 ------------------------------------------------------------------ explain


def test_explain_colours_each_top_concept_apart_with_a_legend(page):
    explain(page, "the red lion and the blue bear in the rain with snow and a guitar")
    page.wait_for_selector("#tokens .tok")
    tokens = page.locator("#tokens .tok")
    tops = tokens.evaluate_all("ts => ts.map(t => [t.dataset.concept, getComputedStyle(t).backgroundColor])")
    colour = {}
    for concept, bg in tops:
        colour.setdefault(concept, set()).add(bg.split(",")[:3].__str__())
    assert all(len(c) == 1 for c in colour.values())  # one hue per concept
    assert len({next(iter(c)) for c in colour.values()}) == len(colour) >= 2  # no two concepts share it
    legend = page.locator("#legend li")
    assert legend.count() == len(colour)
    assert set(legend.evaluate_all("ls => ls.map(l => l.dataset.concept)")) == set(colour)


def test_explain_names_unknown_words_and_says_when_nothing_is_left(page):
    explain(page, "the red zorblat and the quixotry bear")
    page.wait_for_selector("#tokens .tok")
    unknown = page.locator("#tokens .tok-unknown")
    assert unknown.all_inner_texts() == ["zorblat", "quixotry"]
    assert "zorblat" in page.inner_text("#unknown-words") and "quixotry" in page.inner_text("#unknown-words")
    explain(page, "天気は雨です ☔ café")
    msg = page.locator("#explain-out [role=status]")
    expect(msg).to_contain_text("no token")


def test_explain_and_steer_default_to_a_map_into_a_labelled_atlas(page):
    page.goto("/explain")
    expect(page.locator("#explain-map")).to_have_value("m1")  # not eval-sae.subj (better R², unlabelled atlas)
    page.goto("/steer")
    expect(page.locator("#steer-map")).to_have_value("m1")


# 3 ------------------------------------------------------------------ steer says no


def test_steer_refuses_a_concept_that_matches_nothing(page):
    page.goto("/steer")
    page.fill("#steer-concepts", "zzzqqq")
    page.fill("#steer-n", "3")
    page.click("#steer-go")
    alert = page.locator("#steer-out [role=alert]")
    expect(alert).to_contain_text("no concept")
    expect(alert).to_contain_text("zzzqqq")
    assert page.locator("#steer-out .pair").count() == 0


# 4 ------------------------------------------------------------------ search says no


@pytest.mark.skipif(not semantic_available(), reason="the semantic extra is what ranks every concept")
def test_search_can_say_no_concept_matches_and_scores_in_words(page, base_url):
    assert httpx.get(base_url + "/api/lookup", params={"q": "zzzqqq"}).json()["hits"] == []
    page.goto("/?q=zzzqqq")
    expect(page.locator("#results")).to_contain_text("No concept matches")
    page.goto("/?q=weather")
    page.wait_for_selector("#hits tr.hit")
    assert set(page.locator("#hits tr.hit td.concept").all_inner_texts()) == {"weather", "weather forecast"}
    words = page.locator("#hits tr.hit td.match").all_inner_texts()
    assert words and all(w and not w.replace(".", "").isdigit() for w in words)


# 5 ------------------------------------------------------------------ the concept page


def test_concept_page_lists_only_real_labels_and_keeps_top_contexts(page, base_url):
    by_map = {m["map"]: m for m in httpx.get(base_url + "/api/concepts/fdn/2/features").json()}
    assert by_map["m1"]["features"] and all(f["rank"] == 1 for f in by_map["m1"]["features"])
    page.goto("/c/fdn/2")
    page.wait_for_selector("details.contexts li.ctx")
    assert page.locator("details.contexts[data-source='map:m1'] li.ctx").count() == 8  # --top 8 > 5 concepts
    summary = page.locator("details.features[data-map=m1] summary").inner_text()
    assert f": {len(by_map['m1']['features'])}" in summary


# 6 ------------------------------------------------------------------ navigation


def test_a_new_page_opens_at_the_top(page):
    page.set_viewport_size({"width": 1280, "height": 400})
    page.goto("/runs/r1")
    page.wait_for_selector("#rows tr.run-row")
    page.mouse.wheel(0, 3000)
    page.wait_for_function("window.scrollY > 500")
    page.locator("#rows tr.run-row a").nth(30).click()
    page.wait_for_selector("#label")
    assert page.evaluate("window.scrollY") == 0


def test_back_restores_explain(page):
    explain(page, "the red lion and the blue bear")
    page.wait_for_selector("#tokens .tok")
    page.locator(".summary-max a").first.click()
    page.wait_for_selector("#label")
    page.go_back()
    page.wait_for_selector("#tokens .tok")
    assert page.input_value("#explain-text") == "the red lion and the blue bear"
    assert page.locator("#tokens .tok").count() == 7


def test_searches_are_history_entries(page):
    page.goto("/")
    for q in ("weather", "music"):
        page.fill("#q", q)
        page.press("#q", "Enter")
        page.wait_for_url(f"**/?q={q}")
        expect(page.locator("#hits td.concept").get_by_text(q, exact=True)).to_be_visible()  # drawn anew
    page.go_back()
    page.wait_for_url("**/?q=weather")
    expect(page.locator("#q")).to_have_value("weather")
    page.go_back()
    assert page.url.rstrip("/").endswith(page.url.split("/")[2])  # the first search page, still in the app


@pytest.mark.parametrize("path", ["/nosuchpage", "/c/fdn", "/c/fdn/abc", "/c/nope/1", "/c/fdn/99"])
def test_unknown_pages_say_not_found(page, path):
    r = page.goto(path)
    if path in ("/nosuchpage", "/c/fdn", "/c/fdn/abc"):
        assert r.status == 404 and "text/html" in r.headers["content-type"]
    expect(page.locator("#not-found")).to_be_visible()
    assert page.locator("#q").count() == 0  # not the search page


# 7 ------------------------------------------------------------------ 390 px


@pytest.mark.parametrize("path", ["/", "/?q=weather", "/explain", "/steer", "/c/fdn/2", "/runs/r1", "/a/fdn",
                                  "/m/m1", "/models/subj"])
def test_no_sideways_scrolling_at_390px(narrow, path):
    narrow.goto(path)
    narrow.wait_for_selector("main h1")
    narrow.wait_for_load_state("networkidle")
    assert no_overflow(narrow) == 0


def test_steer_columns_stack_at_390px(narrow):
    narrow.goto("/steer")
    narrow.fill("#steer-concepts", "weather")
    narrow.fill("#steer-n", "3")
    narrow.click("#steer-go")
    narrow.wait_for_selector("#steer-out .pair")
    widths = narrow.locator(".out").evaluate_all("os => os.map(o => o.getBoundingClientRect().width)")
    assert min(widths) > 300 and no_overflow(narrow) == 0


# 8 ------------------------------------------------------------------ export names


@pytest.mark.parametrize("fmt, name", [("jsonl", "r1.jsonl"), ("csv", "r1.csv"), ("neuronpedia", "r1.neuronpedia.jsonl")])
def test_export_file_names(page, fmt, name):
    page.goto("/runs/r1")
    page.wait_for_selector("#rows tr.run-row")
    with page.expect_download() as d:
        page.click(f"#export a[data-format={fmt}]")
    assert d.value.suggested_filename == name


# 9 ------------------------------------------------------------------ keyboard, labels, favicon, bounds


def test_explain_tokens_take_focus_and_show_their_concepts(page):
    explain(page, "the red lion")
    page.wait_for_selector("#tokens .tok")
    page.focus("#explain-go")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.classList.contains('tok')")
    expect(page.locator("#tip")).to_be_visible()
    assert "the" in page.inner_text("#tip")


def test_steer_box_has_a_label_and_the_page_a_favicon(page, base_url):
    page.goto("/steer")
    assert page.locator("#steer-concepts").evaluate("e => e.labels.length") == 1
    href = page.locator("link[rel=icon]").get_attribute("href")
    assert httpx.get(base_url + href).status_code == 200


@pytest.mark.parametrize("k", [0, 500])
def test_explain_k_out_of_bounds_is_refused(page, k):
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/api/explain" in r.url else None)
    explain(page, "the red lion", k=k)
    expect(page.locator("#explain-out [role=alert]")).to_contain_text("1 to 20")
    assert requests == []


# 10 ----------------------------------------------------------------- browse


def test_home_links_atlases_and_maps_and_the_atlas_page_lists_concepts(page):
    page.goto("/")
    page.click("#atlases a:has-text('sae')")
    page.wait_for_selector("#concepts tr.concept")
    assert page.locator("#concepts tr.concept").count() == 6
    titles = page.locator("#concepts tr.concept td.label").all_inner_texts()
    assert all(not t.strip().isdigit() for t in titles)  # an unlabelled latent is not just "3"
    page.goto("/")
    page.click("#maps a:has-text('m1')")
    expect(page.locator("main h1")).to_contain_text("m1")  # waits for the map page (the home page's h1 is there first)
    assert "subj" in page.inner_text("main")


def test_concept_page_links_to_steer_and_explain_with_it(page):
    page.goto("/c/fdn/0")
    page.wait_for_selector("#label")
    page.click("a#steer-with")
    expect(page.locator("#steer-concepts")).to_have_value("fdn/0")
    page.goto("/c/fdn/0")
    page.click("a#explain-with")
    expect(page.locator("#explain-map")).to_have_value("m1")


def test_concept_page_histogram_density_logits_and_test_your_text(page):
    page.goto("/c/fdn/2")
    block = page.locator("details.contexts[data-source='map:m1']")
    expect(block.locator("figure.hist-fig svg rect")).not_to_have_count(0)
    page.wait_for_selector("details.contexts[data-shaded] .tok-max")  # every window token shaded, the max outlined
    assert block.locator("li.ctx").first.locator(".tok").count() > 1
    block.locator("div.density button").click()
    expect(block.locator("div.density figcaption")).to_contain_text("tokens of 24 texts")
    page.wait_for_selector("#logits .logits[data-map=m1] .top-logits li")
    assert page.locator("#logits .top-logits li").count() == 10
    page.fill("#try-text", "the red lion and zorblat")
    page.click("#try-go")
    page.wait_for_selector("#try-tokens .tok")
    assert page.locator("#try-tokens .tok").count() == 4 and page.locator("#try-tokens .tok-max").count() == 1
    expect(page.locator("#cs-map")).to_have_value("m1")
    expect(page.locator("#cs-concepts")).to_have_value("fdn/2")
