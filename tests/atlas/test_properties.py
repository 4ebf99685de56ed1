"""Property-based tests (Hypothesis) for every importer and label reader.

Whatever the bytes, shapes, dtypes, encodings or names, a reader either succeeds with exactly the
content written or raises an `AtlasError` (a one-line message at the CLI); nothing else escapes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.atlas.importers import read_directions, read_gemmascope, read_matrix, read_saelens
from engine.atlas.labels import read_labels
from engine.errors import AtlasError
from engine.store import layout
from engine.store.store import AtlasSource
from engine.util import check_name

EXAMPLES = int(os.environ.get("ATLAS_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# labels as people write them: any Unicode (no lone surrogates, no NUL), no surrounding blanks
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40).map(
    str.strip).filter(bool)
DTYPES = st.sampled_from(["float32", "float64", "float16", "int32", "int64", "uint8", "bool", "complex64", "<U3",
                          "object"])


def _tmp(suffix: str, data: bytes) -> Path:
    d = Path(tempfile.mkdtemp())
    p = d / f"input{suffix}"
    p.write_bytes(data)
    return p


def _outcome(fn, *args):
    """The reader's result, or None when it raised an AtlasError; anything else fails the test."""
    try:
        return fn(*args)
    except AtlasError:
        return None


# ---------------------------------------------------------------------- label readers


@SETTINGS
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".csv", ".jsonl", ".json", ".csv.gz", ".jsonl.gz",
                                                               ".txt"]))
def test_label_readers_take_any_bytes(data, suffix):
    _outcome(read_labels, _tmp(suffix, data))


@SETTINGS
@given(rows=st.dictionaries(st.integers(0, 10**6), st.tuples(TEXT, st.one_of(st.none(), TEXT)), max_size=20),
       fmt=st.sampled_from(["csv", "jsonl", "csv.gz", "jsonl.gz"]), long_label=st.booleans())
def test_labels_written_are_the_labels_read(rows, fmt, long_label):
    if long_label and rows:  # a label of a megabyte: CSV takes it as JSONL does
        first = next(iter(rows))
        rows[first] = ("x" * 1_000_000, rows[first][1])
    buf = io.StringIO(newline="")
    if fmt.startswith("csv"):
        w = csv.writer(buf)
        w.writerow(["index", "label", "description"])
        for i, (label, desc) in rows.items():
            w.writerow([i, label, desc or ""])
    else:
        for i, (label, desc) in rows.items():
            buf.write(json.dumps({"index": i, "label": label, "description": desc}) + "\n")
    data = buf.getvalue().encode("utf-8")
    table = read_labels(_tmp(f".{fmt}", gzip.compress(data) if fmt.endswith(".gz") else data))
    assert table.labels == {i: label for i, (label, _) in rows.items()}
    assert table.descriptions == {i: desc for i, (_, desc) in rows.items() if desc}


# ---------------------------------------------------------------------- matrices


@SETTINGS
@given(data=st.binary(max_size=3000), suffix=st.sampled_from([".npy", ".safetensors", ".npz"]))
def test_matrix_readers_take_any_bytes(data, suffix):
    _outcome(read_directions, _tmp(suffix, data))


def _array(dtype: str, shape: tuple[int, ...], draw_data) -> np.ndarray:
    if dtype == "object":
        return np.empty(shape, dtype=object)
    return draw_data.draw(hnp.arrays(np.dtype(dtype), shape))


@SETTINGS
@given(dtype=DTYPES, shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5), data=st.data())
def test_a_npy_matrix_is_read_exactly_or_refused(dtype, shape, data):
    x = _array(dtype, shape, data)
    p = _tmp(".npy", b"")
    np.save(p, x, allow_pickle=True)
    got = _outcome(read_matrix, p)
    real = np.dtype(dtype).kind in "fiu"
    if got is None:
        assert not real or x.ndim != 2 or 0 in x.shape
    else:
        assert real and x.ndim == 2 and 0 not in x.shape
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(got.W_dec, x.astype(np.float32))


@SETTINGS
@given(tensors=st.dictionaries(
    st.sampled_from(["W_dec", "W_enc", "b_enc", "b_dec", "threshold", "other"]),
    st.tuples(st.sampled_from(["float32", "float16", "int32", "uint8", "float64"]),
              hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4)),
    min_size=1, max_size=5), cfg=st.dictionaries(
    st.sampled_from(["d_in", "d_sae", "hook_layer", "hook_name", "model_name", "metadata"]),
    st.one_of(st.none(), st.integers(-3, 10), st.text(max_size=8), st.booleans(), st.lists(st.integers(), max_size=2),
              st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)), max_size=6),
    data=st.data())
def test_a_saelens_folder_is_read_exactly_or_refused(tensors, cfg, data):
    from safetensors.numpy import save_file

    folder = Path(tempfile.mkdtemp())
    arrays = {k: data.draw(hnp.arrays(np.dtype(dt), shape)) for k, (dt, shape) in tensors.items()}
    save_file(arrays, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    got = _outcome(read_saelens, folder)
    if got is not None:
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(got.W_dec, arrays["W_dec"].astype(np.float32))
        d_sae, d_in = got.W_dec.shape
        for key, shape in (("W_enc", (d_in, d_sae)), ("b_enc", (d_sae,)), ("b_dec", (d_in,)), ("threshold", (d_sae,))):
            value = getattr(got, key)
            assert (value is None) == (key not in arrays)
            if value is not None:
                assert value.shape == shape
        assert got.layer is None or isinstance(got.layer, int)
        assert got.model is None or isinstance(got.model, str)


@SETTINGS
@given(arrays=st.dictionaries(st.sampled_from(["w_dec", "w_enc", "b_enc", "b_dec", "threshold"]),
                              st.tuples(DTYPES, hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4)),
                              max_size=5), data=st.data())
def test_a_gemmascope_npz_is_read_exactly_or_refused(arrays, data):
    z = {k: _array(dt, shape, data) for k, (dt, shape) in arrays.items()}
    p = _tmp(".npz", b"")
    np.savez(p, **z)
    got = _outcome(read_gemmascope, p)
    if got is not None:
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(got.W_dec, z["w_dec"].astype(np.float32))


# ---------------------------------------------------------------------- into the store


@pytest.fixture(scope="module")
def prop_store(tmp_path_factory):
    from engine.store.store import Store

    s = Store.init(tmp_path_factory.mktemp("prop") / "st")
    yield s
    s.close()


@settings(max_examples=max(EXAMPLES // 2, 10), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(x=hnp.arrays(st.sampled_from([np.float32, np.float64, np.float16, np.int32]),
                    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6)))
def test_add_atlas_stores_exactly_or_refuses(prop_store, x):
    name = f"p{abs(hash(x.tobytes())) % 10**12}-{x.dtype}-{'x'.join(map(str, x.shape))}"
    if name in {a.name for a in prop_store.atlases()}:
        return
    info = _outcome(lambda: prop_store.add_atlas(name, x, source=AtlasSource(model="m", layer=0)))
    if info is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            np.testing.assert_array_equal(prop_store.atlas_vectors(name), x.astype(np.float32))
            norms = np.linalg.norm(x.astype(np.float32), axis=1)
        assert np.isfinite(norms).all() and (norms > 0).all()
        assert prop_store.verify_index(name).ok
    assert not [x for x in prop_store.leftovers() if x.state != "in progress" or "p" not in x.file]


@SETTINGS
@given(name=st.text(max_size=120))
def test_every_name_is_refused_or_owns_its_files(name):
    try:
        check_name(name, "atlas")
    except AtlasError:
        return
    for rel in (layout.vector_file(name, layout.new_token()), layout.label_index_file(name, layout.new_token())):
        filename = rel.split("/", 1)[1]
        assert len(filename.encode("utf-8")) < 255
        assert layout.file_owner(filename).name == name
