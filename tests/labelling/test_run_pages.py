"""Reading a labelling run page by page (sorted by feature, top score or margin), which features
carry a concept, and the text-level summary of `explain`: what the web explorer shows."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import BadValueError, NotFoundError
from engine.labelling import run as labelling
from engine.labelling.export import iter_labels, label_page
from engine.search import TokenHits, explain_summary
from engine.store.store import Hit
from tests.search.test_search import D_SUBJECT, make_mapped_store


@pytest.fixture
def labelled(store, tmp_path):
    make_mapped_store(store)
    path = tmp_path / "feats.npy"
    np.save(path, np.random.default_rng(3).normal(size=(120, D_SUBJECT)).astype(np.float32))
    run = labelling.label_features(store, "m", str(path), k=3, batch_size=50, quiet=True)
    return store, run.name, list(iter_labels(store, run.name))


@pytest.mark.parametrize("order", ["feature", "score", "margin"])
@pytest.mark.parametrize("descending", [False, True])
def test_pages_follow_the_order_and_cover_the_run(labelled, order, descending):
    store, name, everything = labelled
    key = {"feature": lambda fl: fl.feature, "score": lambda fl: fl.hits[0].score, "margin": lambda fl: fl.margin}[order]
    expected = sorted(everything, key=lambda fl: (-key(fl) if descending else key(fl), fl.feature))
    pages = [label_page(store, name, order, descending=descending, offset=o, limit=25) for o in range(0, 125, 25)]
    got = [fl for page in pages for fl in page]
    assert [len(p) for p in pages] == [25, 25, 25, 25, 20]
    assert [fl.feature for fl in got] == [fl.feature for fl in expected]
    assert got == expected  # every hit of every feature, ranks in order
    assert label_page(store, name, order, offset=500) == []


def test_page_arguments_are_checked(labelled):
    store, name, _ = labelled
    with pytest.raises(BadValueError, match="order must be one of"):
        label_page(store, name, "label")
    with pytest.raises(BadValueError, match="offset must be >= 0"):
        label_page(store, name, offset=-1)
    with pytest.raises(BadValueError, match="limit >= 1"):
        label_page(store, name, limit=0)
    with pytest.raises(NotFoundError, match="no labelling run named 'nope'"):
        label_page(store, "nope")


def test_features_carrying_a_concept(labelled):
    store, name, everything = labelled
    top = everything[0].hits[0]
    rows = store.concept_labels("at", top.ordinal, limit=1000)
    expected = sorted(((fl.feature, h.rank, h.score) for fl in everything for h in fl.hits if h.ordinal == top.ordinal),
                      key=lambda r: (-r[2], r[0]))
    assert [(f, rank, pytest.approx(sc)) for _, _, f, rank, sc in rows] == expected
    assert {(r[0], r[1]) for r in rows} == {(name, "m")}
    assert len(store.concept_labels("at", top.ordinal, limit=1)) == 1
    with pytest.raises(NotFoundError, match="no concept at/99999"):
        store.concept_labels("at", 99999)


def test_explain_summary_ranks_by_max_and_mean():
    def hit(o, s):
        return Hit(f"a/{o}", "a", o, f"c{o}", s, 1)

    tokens = [TokenHits(0, "x", 0, 1, [hit(1, 0.9), hit(2, 0.5)]), TokenHits(1, "y", 2, 3, [hit(2, 0.7), hit(1, 0.1)]),
              TokenHits(2, "z", 4, 5, [hit(2, 0.6)])]
    by_max = explain_summary(tokens)
    assert [(c.ref, c.max_score, c.n_tokens, c.best_token) for c in by_max] == [("a/1", 0.9, 2, "x"), ("a/2", 0.7, 3, "y")]
    assert [c.ref for c in explain_summary(tokens, "mean")] == ["a/2", "a/1"]
    assert explain_summary([]) == []
    with pytest.raises(BadValueError):
        explain_summary(tokens, "median")  # type: ignore[arg-type]
