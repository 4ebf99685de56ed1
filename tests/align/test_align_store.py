"""Storing alignment maps: atomic file + checksummed row, load, list, overwrite, remove."""

from __future__ import annotations

import re

import numpy as np
import pytest

from engine.align.fit import fit_map
from engine.align.map import MapSites, load_map, save_map
from engine.align.stats import SufficientStats
from engine.errors import DuplicateError, FormatError, NotFoundError, SiteMismatchError
from engine.store.store import AtlasSource


def _fit(dx=12, dy=8, seed=0, method="procrustes"):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(600, dx)) + 3
    Y = X @ rng.normal(size=(dx, dy)) + 0.1 * rng.normal(size=(600, dy))
    train, held = SufficientStats(dx, dy), SufficientStats(dx, dy, sample_size=50)
    train.update(X[:500], Y[:500])
    held.update(X[500:], Y[500:])
    return fit_map(train, method, heldout=held, sites=MapSites("subj", 1, "atl", "found", 2), pairing="span",
                   corpus_fingerprint="f" * 64)


@pytest.fixture
def populated(store):
    store.add_model("subj", source="/models/subj", d_model=12, n_layers=3)
    store.add_atlas(
        "atl", np.random.default_rng(1).normal(size=(5, 8)), [f"c{i}" for i in range(5)],
        source=AtlasSource(model="found", layer=2),
    )
    return store


def test_save_load_list(populated):
    amap = _fit()
    info = save_map(populated, amap, "m1")
    # a file name this save owns: maps/<name>@<pid>-<token>.safetensors (docs/design.md §3)
    assert (populated.path / info.file).is_file() and re.fullmatch(r"maps/m1@\d+-[0-9a-f]{12}\.safetensors", info.file)
    assert (info.subject_model, info.subject_layer, info.atlas, info.atlas_layer) == ("subj", 1, "atl", 2)
    assert info.n_pairs == 500 and info.pairing == "span" and info.corpus_fingerprint == "f" * 64
    assert info.heldout_r2 == pytest.approx(amap.metrics["heldout_r2"])
    back = load_map(populated, "m1")
    np.testing.assert_allclose(back.weight, amap.weight, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back.inverse_weight, amap.inverse_weight, rtol=1e-6, atol=1e-6)
    assert (back.name, back.atlas_model, back.atlas_hook, back.method) == ("m1", "found", "resid_post", "procrustes")
    assert back.subject_resid_norm == pytest.approx(amap.subject_resid_norm)
    back.check_site("subj", 1, 12)
    assert [m.name for m in populated.maps()] == ["m1"]


def test_names_and_overwrite(populated):
    first = save_map(populated, _fit(), "m1")
    with pytest.raises(DuplicateError, match="--overwrite"):
        save_map(populated, _fit(seed=1), "m1")
    old_file = populated.path / first.file
    info = save_map(populated, _fit(seed=1, method="ridge"), "m1", overwrite=True)
    assert info.method == "ridge" and not old_file.exists() and (populated.path / info.file).is_file()
    assert len(list((populated.path / "maps").iterdir())) == 1
    with pytest.raises(Exception, match="bad map name"):
        save_map(populated, _fit(), "../evil")


def test_missing_model_or_atlas_and_wrong_width(populated):
    amap = _fit()
    amap.subject_model = "nobody"
    with pytest.raises(NotFoundError, match="nobody"):
        save_map(populated, amap, "x")
    with pytest.raises(SiteMismatchError, match="d=8"):
        save_map(populated, _fit(dy=6), "x")
    with pytest.raises(NotFoundError, match="atlas maps"):
        load_map(populated, "x")
    assert not list((populated.path / "maps").glob("x*"))


def test_a_damaged_file_is_detected(populated):
    info = save_map(populated, _fit(), "m1")
    path = populated.path / info.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum"):
        load_map(populated, "m1")
    path.unlink()
    with pytest.raises(NotFoundError, match="missing"):
        load_map(populated, "m1")


def test_remove(populated):
    info = save_map(populated, _fit(), "m1")
    populated.remove_map("m1")
    assert populated.maps() == [] and not (populated.path / info.file).exists()
    with pytest.raises(NotFoundError):
        populated.remove_map("m1")
