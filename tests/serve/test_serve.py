"""`atlas serve`: the HTTP API against a real uvicorn server on loopback over a real store.

The store has two atlases, a tiny subject model with two maps and a labelling run
(`serve_helpers.build_serve_store`); explain and steer run the tiny subject for real.
"""

from __future__ import annotations

import io
import json
import threading

import pytest

pytest.importorskip("fastapi", reason="the server's tests need the serve extra: pip install 'concept-atlas[serve]'")
httpx = pytest.importorskip("httpx", reason="the server's tests need httpx (the serve-test extra)")

from click.testing import CliRunner  # noqa: E402

from engine.cli import cli  # noqa: E402
from engine.errors import BadValueError  # noqa: E402
from engine.labelling.export import export_run, label_page  # noqa: E402
from engine.serve.app import MAX_TEXT, create_app  # noqa: E402
from engine.serve.server import check_bind, is_loopback  # noqa: E402
from tests.serve_helpers import build_serve_store, running  # noqa: E402
from tests.steering.test_steering import save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def serve_store(tmp_path_factory):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: fastest on one thread on a busy machine
    root = tmp_path_factory.mktemp("serve")
    store = build_serve_store(root, save_tiny_model("llama", root / "subject"))
    yield store
    store.close()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def app(serve_store):
    return create_app(serve_store)


@pytest.fixture(scope="module")
def client(app):
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


def one_line_error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail, detail
    return detail


def test_bind_rule():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "a-long-secret")
    with pytest.raises(BadValueError, match="give --token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(BadValueError, match="at least 8"):
        check_bind("0.0.0.0", "short")


def test_cli_refuses_a_public_bind_without_a_token(serve_store):
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--store", str(serve_store.path)], env={"ATLAS_TOKEN": None})
    assert r.exit_code == 1 and "give --token (or env ATLAS_TOKEN)" in r.output and r.output.count("\n") == 1


def test_store_listings(client, serve_store):
    info = client.get("/api/info").json()
    assert (info["atlases"], info["maps"], info["runs"]) == (3, 3, 1)
    assert info["default_map"] == "m1"  # into the labelled atlas, though eval-sae.subj has the better R²
    atlases = client.get("/api/atlases").json()
    assert [a["name"] for a in atlases] == ["fdn", "other", "sae"] and atlases[0]["site"] == "foundation@1/resid_post"
    assert [m["name"] for m in client.get("/api/maps").json()] == ["eval-sae.subj", "m1", "m2"]
    runs = client.get("/api/runs").json()
    assert [(r["name"], r["status"], r["n_done"]) for r in runs] == [("r1", "done", 300)]
    assert client.get("/api/runs/r1").json()["map"] == "m1"


def test_lookup_ranks_by_text_with_atlas_site_and_score(client):
    hits = client.get("/api/lookup", params={"q": "weather"}).json()["hits"]
    assert {(h["atlas"], h["label"]) for h in hits} == {("fdn", "weather"), ("other", "weather forecast")}
    assert all(h["site"] and h["score"] > 0 and h["rank"] == i for i, h in enumerate(hits, start=1))
    only = client.get("/api/lookup", params={"q": "weather", "atlas": "other"}).json()["hits"]
    assert [(h["atlas"], h["ordinal"], h["site"]) for h in only] == [("other", 0, "foundation@2/resid_post")]
    assert client.get("/api/lookup", params={"q": "quantum chromodynamics"}).json()["hits"] == []
    assert one_line_error(client.get("/api/lookup", params={"q": "rain", "atlas": "nope"}), 404) == \
        "no atlas named 'nope'; `atlas atlases` lists them"


def test_concept_provenance_neighbours_and_labelled_features(client, serve_store):
    c = client.get("/api/concepts/fdn/2").json()
    assert (c["concept"]["ref"], c["concept"]["label"], c["concept"]["description"]) == ("fdn/2", "animals",
                                                                                        "lions and tigers")
    assert c["provenance"].items() >= {"model": "foundation", "layer": 1, "hook": "resid_post",
                                       "source_file": "fdn-directions.npy", "revision": "rev-1"}.items()
    neigh = client.get("/api/concepts/fdn/2/neighbors", params={"k": 3}).json()
    assert [h["ref"] for h in neigh] == [h.ref for h in serve_store.neighbors("fdn/2", k=3)] and len(neigh) == 3
    assert "fdn/2" not in [h["ref"] for h in neigh]
    by_map = {m["map"]: m for m in client.get("/api/concepts/fdn/2/features", params={"limit": 1000}).json()}
    assert set(by_map) == {"m1", "m2"} and by_map["m2"]["features"] == []
    expected = [(f, rank) for _, _, f, rank, _ in serve_store.concept_labels("fdn", 2, limit=1000, top_only=True,
                                                                             min_confidence=0.5)]
    got = by_map["m1"]["features"]
    assert [(f["feature"], f["rank"]) for f in got] == expected and expected and {r for _, r in expected} == {1}
    every = client.get("/api/concepts/fdn/2/features", params={"limit": 1000, "any_rank": True}).json()
    ranks = [f["rank"] for m in every if m["map"] == "m1" for f in m["features"]]
    assert len(ranks) > len(got) and max(ranks) > 1  # runners-up only when asked for
    assert all(f["run"] == "r1" for f in got) and [f["score"] for f in got] == sorted((f["score"] for f in got),
                                                                                      reverse=True)
    assert client.get("/api/concepts/other/1/features").json() == []  # no map into that atlas


def test_concept_contexts_with_the_token_marked(client, serve_store):
    [got] = client.get("/api/concepts/fdn/2/contexts").json()
    [(run, expected)] = serve_store.concept_contexts("fdn", 2)
    assert (got["map"], got["model"], got["layer"], got["status"], got["n_done"], got["scoring"]) == \
        ("m1", "subj", 1, "done", 24, "projection")
    assert [(c["rank"], c["text_index"], c["window"], c["token_start"], c["token_end"]) for c in got["contexts"]] == \
        [(c.rank, c.text_index, c.window, c.token_start, c.token_end) for c in expected]
    assert len(expected) == 8 and all(c["window"][c["token_start"]:c["token_end"]] == c["token"] != ""
                                      for c in got["contexts"])
    assert [c["activation"] for c in got["contexts"]] == pytest.approx([c.activation for c in expected])
    assert len(client.get("/api/concepts/fdn/2/contexts", params={"limit": 2}).json()[0]["contexts"]) == 2
    assert client.get("/api/concepts/other/1/contexts").json() == []  # no run into that atlas
    assert "has no concept 99" in one_line_error(client.get("/api/concepts/fdn/99/contexts"), 404)
    one_line_error(client.get("/api/concepts/nope/1/contexts"), 404)
    assert "limit" in one_line_error(client.get("/api/concepts/fdn/2/contexts", params={"limit": 0}), 422)


def test_run_rows_sorted_and_paginated(client, serve_store):
    for order in ("feature", "score", "margin"):
        page = client.get("/api/runs/r1/rows", params={"order": order, "desc": "true", "offset": 100, "limit": 50}).json()
        expected = label_page(serve_store, "r1", order, descending=True, offset=100, limit=50)
        assert page["total"] == 300 and len(page["rows"]) == 50
        assert [r["feature"] for r in page["rows"]] == [fl.feature for fl in expected]
        assert [r["margin"] for r in page["rows"]] == pytest.approx([fl.margin for fl in expected])
    margins = [r["margin"] for r in client.get("/api/runs/r1/rows", params={"order": "margin", "limit": 1000}).json()["rows"]]
    assert len(margins) == 300 and margins == sorted(margins)
    assert client.get("/api/runs/r1/rows", params={"offset": 300}).json()["rows"] == []
    one_line_error(client.get("/api/runs/r1/rows", params={"limit": 100_000}), 422)  # no loading a whole run
    one_line_error(client.get("/api/runs/r1/rows", params={"order": "label"}), 422)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "neuronpedia"])
def test_export_is_what_the_cli_writes(client, serve_store, fmt):
    r = client.get("/api/runs/r1/export", params={"format": fmt})
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    buf = io.StringIO(newline="")
    export_run(serve_store, "r1", buf, fmt)
    assert r.text == buf.getvalue()


def test_explain_colours_tokens_and_summarises(client, app):
    r = client.post("/api/explain", json={"map": "m1", "text": "the red lion and the blue bear", "k": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [t["token"] for t in out["tokens"]] == ["the", "red", "lion", "and", "the", "blue", "bear"]
    assert all(len(t["hits"]) == 3 and t["hits"][0]["score"] >= t["hits"][1]["score"] for t in out["tokens"])
    top = max((h for t in out["tokens"] for h in t["hits"]), key=lambda h: h["score"])
    assert out["summary"]["max"][0]["ref"] == top["ref"] and out["summary"]["max"][0]["max_score"] == top["score"]
    assert {c["ref"] for c in out["summary"]["mean"]} == {c["ref"] for c in out["summary"]["max"]}
    client.post("/api/explain", json={"map": "m2", "text": "the lion"})
    assert list(app.state.models._models) == [("subj", "causal")]  # loaded once, shared by both maps


def test_explain_takes_a_criterion_and_whitening(client, serve_store):
    body = {"map": "m1", "text": "the red lion", "k": 3}
    for extra in ({"criterion": "bogus"}, {"whiten": "maybe"}):
        r = client.post("/api/explain", json=body | extra)
        assert r.status_code == 422 and "\n" not in r.json()["detail"]
    r = client.post("/api/explain", json=body | {"criterion": "csls"})  # no token statistic cached yet
    assert r.status_code == 400 and "--stat-corpus" in r.json()["detail"] and "\n" not in r.json()["detail"]
    from engine.align.map import load_map
    from engine.search import Scoring, token_stat
    from engine.search import explain as run_explain

    amap = load_map(serve_store, "m1")
    token_stat(serve_store, amap, ["the red lion and the blue bear", "the rain and the sun", "a lion, a bear"])
    plain = run_explain(serve_store, amap, "the red lion", 3, scoring=Scoring("csls"))
    out = client.post("/api/explain", json=body | {"criterion": "csls"}).json()
    assert out["criterion"] == "csls" and out["whiten"] is False
    assert [[h["ref"] for h in t["hits"]] for t in out["tokens"]] == [[h.ref for h in t.hits] for t in plain]
    out = client.post("/api/explain", json=body | {"whiten": True, "criterion": "isf"}).json()
    assert out["whiten"] is True and len(out["tokens"]) == 3 and out["summary"]["max"]


def test_steer_side_by_side_with_the_plan(client):
    body = {"map": "m1", "concepts": ["weather"], "prompts": ["the", "it was the"], "strength": 3,
            "max_new_tokens": 5}
    out = client.post("/api/steer", json=body).json()
    assert [o["prompt"] for o in out["outputs"]] == ["the", "it was the"]
    assert all(o["unsteered"] and o["steered"] for o in out["outputs"])
    assert out["concepts"][0]["ref"] == "fdn/0" and out["plan"]["concepts"][0]["ref"] == "fdn/0"
    assert out["plan"]["provenance"]["maps"]["1"]["name"] == "m1" and out["perplexity_steered"] > 0
    assert isinstance(out["fluency_ok"], bool)
    zero = client.post("/api/steer", json=body | {"strength": 0}).json()
    assert all(o["steered"] == o["unsteered"] for o in zero["outputs"])  # same seed: only the edit differs
    assert [o["unsteered"] for o in zero["outputs"]] == [o["unsteered"] for o in out["outputs"]]


def test_explain_and_steer_at_once_share_the_model(client):
    results: dict[str, int] = {}

    def call(name, path, body):
        results[name] = client.post(path, json=body).status_code

    threads = [threading.Thread(target=call, args=("explain", "/api/explain", {"map": "m1", "text": "the rain"})),
               threading.Thread(target=call, args=("steer", "/api/steer", {"map": "m1", "concepts": ["music"],
                                                                          "prompts": ["the"], "max_new_tokens": 4}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {"explain": 200, "steer": 200}


def test_bad_input_is_a_one_line_4xx(client):
    assert one_line_error(client.get("/api/concepts/nope/1"), 404).startswith("no atlas named 'nope'")
    assert "has no concept 99" in one_line_error(client.get("/api/concepts/fdn/99"), 404)
    one_line_error(client.get("/api/concepts/fdn/-1"), 422)
    one_line_error(client.get("/api/concepts/fdn/99999999999999999999999"), 422)
    assert "k:" in one_line_error(client.get("/api/concepts/fdn/1/neighbors", params={"k": -3}), 422)
    one_line_error(client.get("/api/lookup", params={"q": "rain", "k": 0}), 422)
    one_line_error(client.get("/api/runs/nope/rows"), 404)
    one_line_error(client.get("/api/runs/nope/export"), 404)
    one_line_error(client.get("/api/runs/r1/export", params={"format": "xml"}), 422)
    assert "no map named 'nope'" in one_line_error(client.post("/api/explain", json={"map": "nope", "text": "x"}), 404)
    one_line_error(client.post("/api/explain", json={"map": "m1", "text": "a" * (MAX_TEXT + 1)}), 422)
    one_line_error(client.post("/api/explain", content=b"{not json", headers={"content-type": "application/json"}), 422)
    lone_surrogate = b'{"map": "m1", "text": "\\ud800"}'  # valid JSON, not valid Unicode
    one_line_error(client.post("/api/explain", content=lone_surrogate, headers={"content-type": "application/json"}), 422)
    steer = {"map": "m1", "concepts": ["weather"], "prompts": ["the"]}
    assert "strength" in one_line_error(client.post("/api/steer", json=steer | {"strength": 50}), 422)
    one_line_error(client.post("/api/steer", json=steer | {"concepts": []}), 422)
    assert "mode must be one of" in one_line_error(client.post("/api/steer", json=steer | {"mode": "multiply"}), 400)
    assert "no map of 'subj' at layer 0" in one_line_error(client.post("/api/steer", json=steer | {"layers": [0]}), 400)
    assert "matches 'quantum" in one_line_error(
        client.post("/api/steer", json=steer | {"concepts": ["quantum chromodynamics"]}), 404)
    one_line_error(client.post("/api/steer", json=steer | {"concepts": ["99999999999999999999999"]}), 404)  # no such concept
    one_line_error(client.get("/api/no-such-route"), 404)


def test_a_1mb_text_is_refused_before_it_is_read(client):
    r = client.post("/api/explain", json={"map": "m1", "text": "rain " * 210_000})
    assert "over 256 KiB" in one_line_error(r, 413)


def test_a_chunked_body_is_counted_as_it_streams(client, serve_store):
    """No Content-Length (Transfer-Encoding: chunked): the limit counts the bytes as they arrive, and
    the request is refused once they pass it, never read whole."""
    import socket
    from urllib.parse import urlsplit

    def chunks(total: int, size: int = 64 * 1024):
        piece = (b'{"map": "m1", "text": "' + b"r" * size)[:size]
        sent = 0
        while sent < total:
            yield piece
            sent += len(piece)

    r = client.post("/api/explain", content=chunks(1 << 20), headers={"content-type": "application/json"})
    assert "transfer-encoding" not in r.request.headers or r.request.headers["transfer-encoding"] == "chunked"
    assert "over 256 KiB" in one_line_error(r, 413)
    # by hand on a socket: 200 MiB in chunks; the server (this process) answers 413 and keeps none of it
    import resource

    host, port = urlsplit(str(client.base_url)).hostname, urlsplit(str(client.base_url)).port
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(b"POST /api/explain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (64 * 1024) + b"r" * (64 * 1024) + b"\r\n"
        for _ in range(200 * 16):
            sock.sendall(chunk)
        sock.sendall(b"0\r\n\r\n")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown < 64 * 1024, f"the server's peak memory grew by {grown // 1024} MiB"  # the whole body: > 200
    assert client.get("/api/atlases").status_code == 200  # the server is fine


def test_the_token_in_a_query_string_never_reaches_the_access_log(serve_store):
    import logging

    from engine.serve.server import redact_access_log

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    app = create_app(serve_store, token="s3cret-token", loopback_only=False)
    seen = Lines()
    access = logging.getLogger("uvicorn.access")
    redact_access_log()  # as `atlas serve` does, before uvicorn sets up its logging
    with running(app, log_level="info") as url:
        access.addHandler(seen)
        try:
            assert httpx.get(url + "/api/atlases", params={"token": "s3cret-token", "x": "1"}).status_code == 200
            assert httpx.get(url + "/api/atlases?token=wrong-secret&x=1").status_code == 401
        finally:
            access.removeHandler(seen)
    lines = seen.lines
    assert len(lines) == 2, lines
    assert all("s3cret-token" not in x and "wrong-secret" not in x for x in lines), lines
    assert all("token=***" in x and "x=1" in x for x in lines), lines


def test_pages_static_files_and_openapi(client):
    for path in ("/", "/c/fdn/0", "/runs/r1", "/explain", "/steer", "/a/fdn", "/m/m1", "/models/subj"):
        r = client.get(path)
        assert r.status_code == 200 and "/static/app.js" in r.text and r.headers["content-type"].startswith("text/html")
    assert "function route" in client.get("/static/app.js").text
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) >= {
        "/api/lookup", "/api/atlases", "/api/maps", "/api/concepts/{atlas}/{ordinal}",
        "/api/concepts/{atlas}/{ordinal}/neighbors", "/api/concepts/{atlas}/{ordinal}/features",
        "/api/concepts/{atlas}/{ordinal}/contexts", "/api/runs",
        "/api/runs/{name}", "/api/runs/{name}/rows", "/api/runs/{name}/export", "/api/explain", "/api/steer",
        "/api/atlases/{atlas}", "/api/atlases/{atlas}/concepts", "/api/maps/{name}", "/api/models/{name}",
        "/api/concepts/{atlas}/{ordinal}/logits", "/api/concepts/{atlas}/{ordinal}/scores"}
    assert "/" not in schema["paths"]


def test_a_request_from_another_host_name_is_refused(client):
    r = client.get("/api/atlases", headers={"host": "attacker.example:8765"})
    assert "only requests addressed to 127.0.0.1" in one_line_error(r, 403)


def test_a_token_is_checked_on_every_request(serve_store):
    app = create_app(serve_store, token="s3cret-token", loopback_only=False)
    with running(app) as url:
        for path in ("/api/atlases", "/", "/static/app.js", "/openapi.json"):
            assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + "/api/atlases", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
        assert httpx.get(url + "/api/atlases", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert httpx.get(url + "/api/atlases", headers={"X-Atlas-Token": "s3cret-token"}).status_code == 200
        with httpx.Client(base_url=url) as browser:  # ?token= once, then the cookie
            assert browser.get("/", params={"token": "s3cret-token"}).status_code == 200
            assert browser.get("/static/app.js").status_code == 200
            assert json.loads(browser.get("/api/maps").text)[1]["name"] == "m1"


def test_api_docs_pages_name_no_outside_address(client):
    """The API docs' pages and scripts come from the server, ReDoc's bundle with its footer logo's CDN
    address replaced (the browser test checks the rendered pages make no outside request)."""
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "cdn." not in html and "googleapis" not in html
    bundle = client.get("/static/docs/redoc.standalone.js")
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("text/javascript")
    assert "https://cdn.redoc.ly" not in bundle.text and "data:image/gif;base64," in bundle.text
    assert client.get("/static/docs/swagger-ui-bundle.js").status_code == 200
