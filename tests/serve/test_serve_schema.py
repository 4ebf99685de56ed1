"""Schemathesis against `/openapi.json` of a real server: generated requests, valid and not, to every
API operation; none may get a 5xx. Examples are bounded (explain and steer run a tiny model)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the server's tests need the serve extra: pip install 'concept-atlas[serve]'")
schemathesis = pytest.importorskip("schemathesis", reason="schema-driven tests need schemathesis (serve-test extra)")

import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from engine.serve.app import create_app  # noqa: E402
from tests.serve_helpers import build_serve_store, running  # noqa: E402
from tests.steering.test_steering import save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve-schema")
    store = build_serve_store(root, save_tiny_model("llama", root / "subject"))
    with running(create_app(store)) as url:
        _URL.append(url)
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")
        _URL.remove(url)
    store.close()
    torch.set_num_threads(n)


schema = schemathesis.pytest.from_fixture("api_schema")
_URL: list[str] = []  # the running server's address, for the model-path tests below


@pytest.mark.slow  # 25 generated cases per operation against a live server
@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_no_server_error_on_generated_input(case):
    if case.path == "/api/steer" and isinstance(case.body, dict):  # keep generations short: the tiny model is slow-ish
        case.body["max_new_tokens"] = min(int(case.body.get("max_new_tokens") or 1), 4) \
            if isinstance(case.body.get("max_new_tokens"), int) else case.body.get("max_new_tokens")
    response = case.call(timeout=120)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        detail = response.json().get("detail")
        assert isinstance(detail, str) and "\n" not in detail, response.text[:500]


# Generated names rarely hit a real map, so the model paths get their own generated inputs: a real
# map with any text, k, concepts, prompts and strength.
_TEXT = st.text(st.characters(codec="utf-8"), max_size=60)


@pytest.fixture
def server_url(api_schema):
    return _URL[0]


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(text=_TEXT, k=st.integers(-5, 30), raw=st.booleans())
def test_explain_any_text_is_never_a_5xx(server_url, text, k, raw):
    r = httpx.post(f"{server_url}/api/explain", json={"map": "m1", "text": text, "k": k, "raw": raw}, timeout=120)
    assert r.status_code < 500, r.text[:500]
    assert r.status_code == 200 or (len(text) == 0 or not 1 <= k <= 20), r.text[:500]


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(concepts=st.lists(_TEXT, min_size=0, max_size=3), prompt=_TEXT,
       strength=st.floats(-20, 20, allow_nan=False), layers=st.none() | st.lists(st.integers(-4, 4), max_size=2),
       mode=st.sampled_from(["add", "clamp", "nope"]), combine=st.integers(0, 6))
def test_steer_any_plan_is_never_a_5xx(server_url, concepts, prompt, strength, layers, mode, combine):
    body = {"map": "m1", "concepts": concepts, "prompts": [prompt], "strength": strength, "layers": layers,
            "mode": mode, "combine": combine, "max_new_tokens": 3}
    r = httpx.post(f"{server_url}/api/steer", json=body, timeout=120)
    assert r.status_code < 500, r.text[:500]
