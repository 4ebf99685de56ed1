"""The index-spec policy: which index structure an atlas of a given size gets (``--index-spec auto``),
and whether a spec someone names fits the atlas it is for (`resolve_index_spec`).

A named spec is normalised (`indexes.faiss_backend.normalize_spec`: ``" Flat"`` and ``"Flat|"`` are
``"Flat"``) and refused, with the number that would fit, when

- its training needs more vectors than the atlas has. FAISS's k-means wants
  ``min_points_per_centroid`` (39) points per centroid and otherwise prints a warning per
  clustering (408 lines for ``OPQ8,IVF64,PQ8`` on 2,000 vectors) and builds a poor quantizer:
  ``IVF<n>`` clusters into n lists, ``PQ<M>[x<b>]`` / ``OPQ<M>`` into 2^b (default 256) codes per
  sub-quantizer, ``RQ`` / ``LSQ`` / ``IMI`` likewise; so ``PQ8`` needs 9,984 vectors;
- its memory estimate exceeds `MEMORY_FRACTION` of this machine's memory (``HNSW99999`` keeps
  2 × 99,999 neighbours per vector: 800 KB each).

``auto`` picks Flat or HNSW (`choose_index_spec`), which need no training.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable

import numpy as np

from indexes.base import IndexSpecError, VectorIndex

# Below this many concepts exact search is fast enough (d=768: ~1,000 queries/s at 100k on two
# cores) and needs no recall figure. Above it, HNSW built with efConstruction=200: with FAISS's
# default (40) the graph of 1M SAE-like directions stayed below recall@10 0.96 even at
# efSearch=2048. efSearch=448 is the smallest that reached recall@10 >= 0.99 on validation
# queries (1M x 768); on held-out queries it gave 0.998 at 5.8x exact search's throughput
# (benchmarks/bench_ann_scale.py). The build costs ~5x the default's: ~40 min for 1M on the
# busy two-core machine.
FLAT_MAX_CONCEPTS = 200_000
ANN_SPEC = "HNSW32|efConstruction=200,efSearch=448"
# A spec whose index would take more than this share of the machine's memory is refused.
MEMORY_FRACTION = 0.8

_CLUSTERINGS = (  # (pattern, number of centroids from its groups)
    (re.compile(r"IVF(\d+)"), lambda m: int(m.group(1))),
    (re.compile(r"(?:PQ|RQ|LSQ|IMI)\d+(?:x(\d+))?"), lambda m: 2 ** int(m.group(1) or 8)),
)
_GRAPH = re.compile(r"(HNSW|NSG)(\d+)")


def choose_index_spec(n_concepts: int, dim: int) -> str:
    """The index spec the engine uses for an atlas of ``n_concepts`` directions of width ``dim``.

    Exact ``Flat`` up to `FLAT_MAX_CONCEPTS`, HNSW (`ANN_SPEC`) above. ``"auto"`` as an index
    spec (import, ``atlas index rebuild --spec auto``) resolves through this function.
    """
    if n_concepts < 0 or dim <= 0:
        raise IndexSpecError(f"an atlas needs n_concepts >= 0 and dim > 0, got {n_concepts} and {dim}")
    return "Flat" if n_concepts <= FLAT_MAX_CONCEPTS else ANN_SPEC


# Label-embedding indexes (semantic lookup, `engine.atlas.lookup`) are searched one query at a time
# inside a lookup's 5 ms. A Flat scan reads every vector per query (~4 GB/s here: 50,000 labels of
# d=384 took ~20 ms); HNSW's build took an hour at 1M. IVF trains in minutes, and a query reads
# ~nprobe/nlist of the vectors, with nprobe chosen at build for LABEL_RECALL (`choose_nprobe`). The
# lists hold float16 (SQfp16): at 1M labels (d=256, IVF4096, nprobe 256, one thread) a query took
# CPU p50 2.5 / p95 3.3 ms against IVF-Flat's 4.9 / 6.3 ms, at the same recall@10 (0.944 / 0.945
# on 200 text queries); SQ8 was no faster than fp16 and lost recall (0.932).
LABEL_FLAT_MAX = 20_000
LABEL_NPROBES = (4, 8, 16, 32, 64, 128, 256)
LABEL_RECALL = 0.95  # recall@10 against exact search, on held-out queries
LABEL_TRAIN_PER_LIST = 64  # k-means sample: this many vectors per list (FAISS warns below 39)


def choose_label_index_spec(n_labels: int) -> str:
    """The label-embedding index for ``n_labels`` labels: ``Flat`` up to `LABEL_FLAT_MAX`, else
    ``IVF<nlist>,SQfp16`` with nlist the power of two nearest 4·√n (4,096 at 1M, 512 at 20,000), at most
    n/39 (FAISS's k-means wants 39 vectors per list): a query scans nlist centroids and nprobe lists
    of n/nlist vectors, balanced at nlist ~ √n."""
    if n_labels < 0:
        raise IndexSpecError(f"a label index needs n_labels >= 0, got {n_labels}")
    if n_labels <= LABEL_FLAT_MAX:
        return "Flat"
    nlist = min(2 ** round(math.log2(4 * math.sqrt(n_labels))), 2 ** math.floor(math.log2(n_labels // 39)))
    return f"IVF{nlist},SQfp16"


def choose_nprobe(index_with: Callable[[int], VectorIndex], queries: np.ndarray, exact_ids: np.ndarray,
                  target: float = LABEL_RECALL, candidates: tuple[int, ...] = LABEL_NPROBES) -> tuple[int, float]:
    """The smallest of ``candidates`` whose index (``index_with(nprobe)``) finds ``target`` of the exact
    top-k ``exact_ids`` (nq, k) of ``queries``: (nprobe, its recall@k); the largest if none does."""
    k = exact_ids.shape[1]
    recall = 0.0
    for nprobe in candidates:
        _, found = index_with(nprobe).search(queries, k)
        recall = float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found.tolist(), exact_ids.tolist())]))
        if recall >= target:
            return nprobe, recall
    return candidates[-1], recall


def training_vectors_needed(factory: str) -> int:
    """How many vectors the training of FAISS factory string ``factory`` needs without FAISS warning
    that it has too few: ``min_points_per_centroid`` × its largest clustering; 0 for none."""
    import faiss

    largest = _largest_clustering(factory)
    return 0 if largest == 0 else int(faiss.ClusteringParameters().min_points_per_centroid) * largest


def index_memory_bytes(factory: str, n_vectors: int, dim: int) -> int:
    """An upper estimate of the memory an index of ``factory`` over ``n_vectors`` × ``dim`` takes while
    built: the vectors as float32 and their ids, an HNSW / NSG graph (HNSW level 0 keeps 2M neighbours,
    4 bytes each) and IVF centroids."""
    per_vector = 4 * dim + 8
    for kind, degree in _GRAPH.findall(factory):
        per_vector += 4 * int(degree) * (2 if kind == "HNSW" else 1)
    centroids = sum(int(m.group(1)) for m in _CLUSTERINGS[0][0].finditer(factory))
    return n_vectors * per_vector + centroids * 4 * dim


def machine_memory_bytes() -> int | None:
    """This machine's physical memory, where the OS says (None where it does not)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_index_spec(spec: str, n_concepts: int, dim: int) -> None:
    """Refuse (`IndexSpecError`, saying what would fit) a spec whose training needs more vectors than
    ``n_concepts``, or whose index would not fit in this machine's memory."""
    from indexes.faiss_backend import parse_spec

    factory, _ = parse_spec(spec)
    need = training_vectors_needed(factory)
    if n_concepts < need:
        raise IndexSpecError(f"index spec {spec!r} needs at least {need:,} vectors to train (FAISS's "
                             f"{need // _largest_clustering(factory):,} per centroid); the atlas has "
                             f"{n_concepts:,}: use Flat or HNSW32, or fewer centroids")
    memory, have = index_memory_bytes(factory, n_concepts, dim), machine_memory_bytes()
    if have is not None and memory > MEMORY_FRACTION * have:
        raise IndexSpecError(f"index spec {spec!r} on {n_concepts:,} vectors of d={dim} needs about "
                             f"{memory / 2**30:.1f} GiB of memory, more than {MEMORY_FRACTION:.0%} of this "
                             f"machine's {have / 2**30:.1f} GiB: use a smaller degree (e.g. HNSW32) or Flat")


def _largest_clustering(factory: str) -> int:
    """The most centroids any clustering of ``factory`` trains (0: it trains none)."""
    return max((f(m) for pattern, f in _CLUSTERINGS for m in pattern.finditer(factory)), default=0)


def resolve_index_spec(spec: str, n_concepts: int, dim: int) -> str:
    """``"auto"`` → the spec `choose_index_spec` gives an atlas of this size; any other spec normalised
    (`normalize_spec`) and checked against the atlas (`check_index_spec`)."""
    from indexes.faiss_backend import normalize_spec

    spec = normalize_spec(spec)
    if spec == "auto":
        return choose_index_spec(n_concepts, dim)
    check_index_spec(spec, n_concepts, dim)
    return spec

