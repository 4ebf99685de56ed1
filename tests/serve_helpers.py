"""A real store for the server's tests, and the server itself on a free loopback port (uvicorn in a thread)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine.align.map import save_map
from engine.store.store import AtlasSource, Store

OTHER_LABELS = ["weather forecast", "stringed instruments", "mammals"]


def build_serve_store(root: Path, subject_folder: Path) -> Store:
    """Atlas ``fdn`` (five concepts), ``other`` and ``sae`` (six unlabelled latents); the tiny subject ``subj``
    with maps ``m1`` (layer 1) and ``m2`` (layer 2) into ``fdn`` and ``eval-sae.subj`` (layer 1, a better
    held-out R²) into ``sae``; a finished labelling run ``r1`` of 300 subject features through ``m1``; the
    top 8 contexts of every ``fdn`` concept through ``m1`` over 24 texts (more than the atlas has concepts);
    label-embedding indexes of ``fdn`` and ``other`` where the semantic extra is installed."""
    from engine.atlas.lookup import build_label_index, semantic_available
    from engine.labelling import run as labelling
    from engine.labelling.contexts import ContextSettings, top_contexts
    from tests.steering.test_steering import D
    from tests.steering.test_steering_plan import D_ATLAS, DESCRIPTIONS, LABELS, _map

    store = Store.init(root / "store")
    rng = np.random.default_rng(0)
    store.add_atlas(
        "fdn", rng.normal(size=(len(LABELS), D_ATLAS)).astype(np.float32), LABELS, DESCRIPTIONS,
        source=AtlasSource(model="foundation", layer=1, kind="matrix", ref="fdn-directions.npy", revision="rev-1"),
    )
    store.add_atlas(
        "other", rng.normal(size=(3, 16)).astype(np.float32), OTHER_LABELS,
        source=AtlasSource(model="foundation", layer=2),
    )
    store.add_atlas("sae", rng.normal(size=(6, D_ATLAS)).astype(np.float32), [None] * 6,
                    source=AtlasSource(model="foundation", layer=1, kind="saelens", ref="sae-folder"))
    store.add_model("subj", source=str(subject_folder), d_model=D, n_layers=3)
    save_map(store, _map(1, 1), "m1")
    save_map(store, _map(2, 2), "m2")
    sae_map = _map(3, 1)
    sae_map.atlas, sae_map.metrics = "sae", sae_map.metrics | {"heldout_r2": 0.9}
    save_map(store, sae_map, "eval-sae.subj")
    feats = root / "feats.npy"
    np.save(feats, np.random.default_rng(5).normal(size=(300, D)).astype(np.float32))
    labelling.label_features(store, "m1", str(feats), k=3, name="r1", batch_size=100, quiet=True)
    top_contexts(store, "m1", write_context_corpus(root / "corpus.txt"), ContextSettings(top=8, chunk=8, batch_size=4),
                 quiet=True)
    if semantic_available():
        for atlas in ("fdn", "other"):
            build_label_index(store, atlas, quiet=True)
    return store


def write_context_corpus(path: Path, n: int = 24) -> Path:
    """``n`` short texts of the tiny subject's words, one per line (the corpus of ``m1``'s top contexts)."""
    from tests.steering.test_steering import WORDS

    rng = np.random.default_rng(7)
    words = [w for w in WORDS if w not in (".", ",")]
    path.write_text("\n".join(" ".join(rng.choice(words, size=int(rng.integers(4, 12)))) for _ in range(n)) + "\n")
    return path


@contextlib.contextmanager
def running(app, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
