"""The static query encoder (`engine.atlas.static_encoder`): distilled from the real all-MiniLM-L6-v2,
kept in the store (and the machine's cache), recorded with the label index that lookups then use.

The first test session on a machine distils the table (25-45 s on two cores); later ones copy it
from the machine's cache (`machine_cache_dir`)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from engine.atlas.lookup import (
    STATIC_MIN_COSINE,
    STOPWORDS,
    build_label_index,
    embed_texts,
    lookup,
    semantic_available,
)
from engine.errors import IndexIntegrityError
from engine.store.store import AtlasSource, Store
from engine.util import sha256_file

pytestmark = pytest.mark.skipif(not semantic_available(), reason="the `semantic` extra is not installed")

LABELS = [
    ("weather and rain", "rain, storms, clouds and the forecast"),
    ("cats", "house cats and kittens"),
    ("music", "songs, instruments and concerts"),
    ("programming", "source code and compilers"),
    ("cooking", "recipes, kitchens and baking bread"),
]


@pytest.fixture(scope="session")
def table(tmp_path_factory):
    """The table as a store keeps it: (file, sha256), distilled once per machine."""
    from engine.atlas.static_encoder import ensure_static_table

    return ensure_static_table(tmp_path_factory.mktemp("models"))


def _labelled(root, encoder):
    store = Store.init(root)
    x = np.random.default_rng(0).normal(size=(len(LABELS), 8))
    store.add_atlas("t", x, [a for a, _ in LABELS], [b for _, b in LABELS], source=AtlasSource(model="m", layer=1))
    build_label_index(store, "t", quiet=True, encoder=encoder)
    return store


def test_each_row_is_the_models_output_for_its_token_and_distilling_is_deterministic():
    from tokenizers import Tokenizer

    from engine.atlas.static_encoder import model_path, token_outputs

    words = ["rain", "cat", "music", "doctor"]
    tok = Tokenizer.from_file(str(model_path() / "tokenizer.json"))
    ids = np.array([tok.token_to_id(w) for w in words] + list(range(5000, 5040)))
    first, again = token_outputs(ids), token_outputs(ids)
    assert first.tobytes() == again.tobytes()
    # the sentence model on each word alone ([CLS] word [SEP], mean-pooled, normalised)
    rows = first[:4] / np.linalg.norm(first[:4], axis=1, keepdims=True)
    assert np.allclose(np.sum(rows * embed_texts(words, quiet=True), axis=1), 1.0, atol=1e-4)


def test_the_table_is_copied_from_the_machines_cache_kept_and_replaced_when_corrupt(table, tmp_path):
    from engine.atlas.static_encoder import ensure_static_table, machine_cache_dir, static_table_key

    path, sha = table
    assert sha256_file(path) == sha and (machine_cache_dir() / path.name).read_bytes() == path.read_bytes()
    assert static_table_key()[:16] in path.name
    mine, mine_sha = ensure_static_table(tmp_path / "models")  # a new store: a copy, byte for byte
    assert mine_sha == sha and mine.read_bytes() == path.read_bytes()
    stamp = mine.stat().st_mtime_ns
    assert ensure_static_table(tmp_path / "models") == (mine, sha) and mine.stat().st_mtime_ns == stamp  # kept
    mine.write_bytes(mine.read_bytes()[:1000])  # truncated: replaced
    assert ensure_static_table(tmp_path / "models") == (mine, sha) and sha256_file(mine) == sha


def test_a_table_of_another_model_or_recipe_is_refused_and_replaced(table, tmp_path):
    from safetensors.numpy import save

    from engine.atlas.static_encoder import TABLE_KEY, _parse_table, ensure_static_table, static_table_key

    path, sha = table
    models = tmp_path / "models"
    models.mkdir()
    foreign = models / path.name
    foreign.write_bytes(save({TABLE_KEY: np.ones((10, 4), np.float16)}, metadata={"key": "another"}))
    with pytest.raises(IndexIntegrityError, match="another model"):
        _parse_table(foreign.read_bytes(), foreign, static_table_key())
    assert ensure_static_table(models) == (foreign, sha)


def test_a_query_embedded_by_the_table_finds_a_paraphrased_label(tmp_path):
    with _labelled(tmp_path / "s", "static") as store:
        meta = store.atlas_record("t").extra["label_index"]
        assert meta["encoder"] == "static" and (store.path / meta["encoder_file"]).is_file()
        assert sha256_file(store.path / meta["encoder_file"]) == meta["encoder_sha256"]
        cat = lookup(store, "a feline pet", k=3)
        assert cat[0].label == "cats" and cat[0].text_rank is None and cat[0].similarity >= STATIC_MIN_COSINE
        assert lookup(store, "baking a cake", k=3)[0].label == "cooking"
        assert lookup(store, "software development", k=3)[0].label == "programming"
        assert lookup(store, "zzzqqq") == [] and lookup(store, "the", semantic=True)[0].text_rank is not None


def test_lookup_embeds_the_query_with_the_encoder_the_labels_were_embedded_with(tmp_path):
    """The similarity a hit reports is the cosine of the recorded encoder's vectors, each way."""
    from engine.atlas.static_encoder import load_static_encoder
    from engine.cli import cli

    store = _labelled(tmp_path / "s", "static")
    store.close()
    runner = CliRunner()
    text = "cats. house cats and kittens"
    for encoder in ("sentence", "static"):
        r = runner.invoke(cli, ["index", "embed", "t", "--encoder", encoder, "--store", str(tmp_path / "s")])
        assert r.exit_code == 0 and f"({encoder} encoder)" in r.output, r.output
        with Store.open(tmp_path / "s") as store:
            meta = store.atlas_record("t").extra["label_index"]
            assert meta["encoder"] == encoder and meta["spec"] == "Flat"
            if encoder == "sentence":
                assert "encoder_file" not in meta
                vec = embed_texts(["a kitten", text], quiet=True)
            else:
                enc = load_static_encoder(store.path / meta["encoder_file"], meta["encoder_sha256"], STOPWORDS)
                vec = enc.encode(["a kitten", text])
            hit = lookup(store, "a kitten", k=1)[0]
            assert hit.label == "cats" and hit.similarity == pytest.approx(float(vec[0] @ vec[1]), abs=1e-5)
    r = runner.invoke(cli, ["index", "embed", "t", "--encoder", "bert", "--store", str(tmp_path / "s")])
    assert r.exit_code == 2 and "'bert' is not one of 'static', 'sentence'" in r.output


def test_a_changed_table_is_a_clear_error_at_lookup(tmp_path):
    with _labelled(tmp_path / "s", "static") as store:
        meta = store.atlas_record("t").extra["label_index"]
        path = store.path / meta["encoder_file"]
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(IndexIntegrityError, match=r"atlas 't'.*changed.*`atlas index embed t`"):
            lookup(store, "a query never embedded before")
        build_label_index(store, "t", quiet=True)  # embedding again replaces the table
        assert lookup(store, "another query never embedded", k=1) is not None
        assert sha256_file(path) == store.atlas_record("t").extra["label_index"]["encoder_sha256"]

