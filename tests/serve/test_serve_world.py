"""`atlas serve` on the tiny ConceptWorld (slow): a real map from a trained subject onto the world's
atlas; explain finds the topic of a topical text, steer moves the text, over a real server."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi", reason="the server's tests need the serve extra: pip install 'concept-atlas[serve]'")
httpx = pytest.importorskip("httpx", reason="the server's tests need httpx (the serve-test extra)")

from engine.serve.app import create_app  # noqa: E402
from engine.store import layout  # noqa: E402
from engine.store.store import Store  # noqa: E402
from tests.serve_helpers import running  # noqa: E402
from tests.steering.test_steering import one_thread  # noqa: E402,F401  (autouse fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world_url(tiny_world, tmp_path_factory):
    from engine.align.fit import align_subject
    from engine.align.request import AlignRequest
    from engine.models.hooks import Site
    from engine.world.locate import ensure_registered, world_texts

    store = Store.init(tmp_path_factory.mktemp("serve-world") / "store")
    os.symlink(tiny_world.path, store.path / layout.MODELS_DIR / tiny_world.path.name)  # nothing trained twice
    world = ensure_registered(store, "tiny", 0)
    train, held = world_texts(world)
    sub = world.subject_a
    align_subject(store, AlignRequest(sub.name, world.atlas_name, train[:400], held[:100], Site(sub.default_layer),
                                      name="a-map"), quiet=True)
    with running(create_app(store)) as url:
        yield url, world
    store.close()


def test_explain_and_steer_on_the_tiny_world(world_url):
    url, world = world_url
    concept = world.concepts[0]
    text = " ".join(concept.members[:8])
    r = httpx.post(f"{url}/api/explain", json={"map": "a-map", "text": text, "k": 3}, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["tokens"]) >= 4
    assert concept.label in [c["label"] for c in out["summary"]["mean"][:3]], out["summary"]["mean"][:3]
    s = httpx.post(f"{url}/api/steer", json={"map": "a-map", "concepts": [concept.label], "prompts": ["the"],
                                             "strength": 0.5, "max_new_tokens": 8}, timeout=300)
    assert s.status_code == 200, s.text
    pair = s.json()["outputs"][0]
    assert pair["steered"] != pair["unsteered"] and s.json()["plan"]["concepts"][0]["ref"].startswith(world.atlas_name)
