"""The index-spec policy: which index structure an atlas of a given size gets (``--index-spec auto``)."""

from __future__ import annotations

from indexes.base import IndexSpecError

# Below this many concepts exact search is fast enough (d=768: ~1,000 queries/s at 100k on two
# cores) and needs no recall figure. Above it, HNSW built with efConstruction=200: with FAISS's
# default (40) the graph of 1M SAE-like directions stayed below recall@10 0.96 even at
# efSearch=2048. efSearch=448 is the smallest that reached recall@10 >= 0.99 on validation
# queries (1M x 768); on held-out queries it gave 0.998 at 5.8x exact search's throughput
# (benchmarks/bench_ann_scale.py). The build costs ~5x the default's: ~40 min for 1M on the
# busy two-core machine.
FLAT_MAX_CONCEPTS = 200_000
ANN_SPEC = "HNSW32|efConstruction=200,efSearch=448"


def choose_index_spec(n_concepts: int, dim: int) -> str:
    """The index spec the engine uses for an atlas of ``n_concepts`` directions of width ``dim``.

    Exact ``Flat`` up to `FLAT_MAX_CONCEPTS`, HNSW (`ANN_SPEC`) above. ``"auto"`` as an index
    spec (import, ``atlas index rebuild --spec auto``) resolves through this function.
    """
    if n_concepts < 0 or dim <= 0:
        raise IndexSpecError(f"an atlas needs n_concepts >= 0 and dim > 0, got {n_concepts} and {dim}")
    return "Flat" if n_concepts <= FLAT_MAX_CONCEPTS else ANN_SPEC


def resolve_index_spec(spec: str, n_concepts: int, dim: int) -> str:
    """``"auto"`` → the spec `choose_index_spec` gives an atlas of this size; any other spec as is."""
    return choose_index_spec(n_concepts, dim) if spec == "auto" else spec
