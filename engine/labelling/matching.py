"""Activation matching as a labelling run: the co-activation pass a run ranks with (issue 25, part 3).

``atlas label MAP --features SAE --match activations --corpus FILE`` labels the subject SAE's
latents by how they fire on the same text as the atlas's features (`engine.labelling.coactivation`):
the map supplies the two sites, the two models and the pairing (``--pairing`` overrides it:
``token`` for one tokenizer, ``span`` across tokenizers); the subject side is the SAE's encoder,
the atlas side the atlas's own encoder or, for an atlas without one, the projections on its
directions minus the map's atlas-side centre (`ProjectionEncoder`). New runs correlate whether
each SAE latent fires (`DEFAULT_BINARY`, the phi coefficient) rather than how strongly; span
pairing pairs words and punctuation marks, each model reading up to its own length.

The pass runs once, in the run's driver, before its first batch commits: its `CoactivationStats`
and the atlas-side statistic of the correlation table are saved as the run's files (``coact``,
``stat``; sha256 in ``params["files"]``). Batches then read their latents' best correlations
(`CoactivationStats.top_matches`) and go through the run's `Ranking` and `LabelPass` as a map run's
cosines do, so the rows are resumable, Ray-able and confident the same way.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, cast

from engine.errors import BadValueError
from engine.labelling.coactivation import CoactivationStats, ProjectionEncoder, accumulate_coactivation
from engine.labelling.criteria import DEFAULT_ISF_BETA, STAT_FILE
from engine.labelling.sources import FeatureSource
from engine.store.store import Store

MATCHES: tuple[str, ...] = ("map", "activations")
PAIRINGS: tuple[str, ...] = ("token", "span")
COACT_FILE = "coact"
# new activation runs correlate firing, not values: phi over Pearson of the codes on development
# worlds small 7, tiny 7, tiny 8 (docs/label-quality.md), top-1 A +0.032 to +0.071, B 0 to +0.025
DEFAULT_BINARY = True


@dataclasses.dataclass(frozen=True)
class MatchSpec:
    """What an activation run records to compute its pass: the corpus and its fingerprint, the pairing."""

    corpus: str
    corpus_sha256: str
    pairing: str
    max_pairs: int | None = None
    batch_size: int = 16
    # whether the correlation reads firing (code > 0, the phi coefficient) or code values; False
    # for runs recorded before it existed, DEFAULT_BINARY for new ones (`match_spec`)
    binary: bool = False
    pool: str | None = None  # span pairing: how a word's codes pool over its pieces (None: SPAN_CODE_POOL)

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_match(match: str) -> str:
    if match not in MATCHES:
        raise BadValueError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
    return match


def subject_encoder(source: FeatureSource) -> Any:
    """The subject SAE's encoder (a `engine.atlas.encoder.AtlasEncoder`), or a one-line error."""
    from engine.atlas.encoder import AtlasEncoder
    from engine.atlas.importers import read_directions

    if source.kind in ("matrix", "native"):
        raise BadValueError(f"--match activations needs an SAE with its encoder; {source.spec} is a {source.kind} "
                            "of directions (use --match map)")
    enc = AtlasEncoder.from_tensors(read_directions(source.spec.partition("#")[0]).encoder())
    if enc is None:
        raise BadValueError(f"--match activations needs the SAE's encoder; {source.spec} has none (use --match map)")
    return enc


def match_spec(amap: Any, source: FeatureSource, corpus: str | Path | None, pairing: str | None,
               max_pairs: int | None) -> MatchSpec:
    """Checked inputs of an activation run: an SAE with an encoder, a corpus, a token / span pairing
    (default: the map's own where it is one of those, else token)."""
    from engine.align.corpus import read_corpus
    from engine.util import corpus_fingerprint

    subject_encoder(source)
    if corpus is None:
        raise BadValueError("--match activations needs --corpus FILE (the text both models read)")
    pairing = pairing or (amap.pairing if amap.pairing in PAIRINGS else "token")
    if pairing not in PAIRINGS:
        raise BadValueError(f"--pairing must be one of {', '.join(PAIRINGS)} for activation matching, got {pairing!r}")
    if max_pairs is not None and max_pairs < 1:
        raise BadValueError(f"--max-pairs must be >= 1, got {max_pairs}")
    path = Path(corpus).expanduser().resolve()
    return MatchSpec(str(path), corpus_fingerprint(read_corpus(path)), pairing, max_pairs, binary=DEFAULT_BINARY)


def check_corpus(spec: MatchSpec) -> list[str]:
    """The run's corpus, read; a `SourceChangedError` when it is not the text the run was created with."""
    from engine.align.corpus import read_corpus
    from engine.errors import SourceChangedError
    from engine.util import corpus_fingerprint

    if not Path(spec.corpus).is_file():
        raise SourceChangedError(f"the corpus {spec.corpus} of this activation run is gone; restore it or start "
                                 "the run again with --overwrite")
    texts = read_corpus(spec.corpus)
    if corpus_fingerprint(texts) != spec.corpus_sha256:
        raise SourceChangedError(f"the corpus {spec.corpus} changed since the run was created; restore it or "
                                 "start the run again with --overwrite")
    return texts


def coactivation_pass(store: Store, run_params: dict[str, Any], amap: Any, source: FeatureSource,
                      quiet: bool = False) -> CoactivationStats:
    """Both models over the run's corpus: the co-activation statistics of the SAE's latents with
    the atlas's features (checks the corpus is the one the run was created with)."""
    from engine.align.pairing import PairingConfig
    from engine.atlas.encoder import AtlasEncoder
    from engine.models.hooks import Site
    from engine.models.loading import load_registered
    from engine.search import atlas_centre

    spec = MatchSpec(**run_params["match"])
    texts = check_corpus(spec)
    info = store.atlas(amap.atlas)
    atlas_enc: Any = AtlasEncoder.from_tensors(store.atlas_tensors(info.name)) if info.has_encoder else None
    if atlas_enc is None:
        atlas_enc = ProjectionEncoder(store.atlas_vectors(info.name), centre=atlas_centre(amap))
    subject = load_registered(store, amap.subject_model)
    foundation = load_registered(store, amap.atlas_model)
    sites = (Site((amap.subject_layer,), amap.subject_hook), Site((amap.atlas_layer,), amap.atlas_hook))
    config = PairingConfig((spec.pairing,), pools={spec.pairing: spec.pool} if spec.pool else {},
                           max_pairs=spec.max_pairs, batch_size=spec.batch_size)
    got = accumulate_coactivation(subject, foundation, texts, sites, (subject_encoder(source), atlas_enc), config,
                                  sparse=False, weighted_means=False, binary=spec.binary, quiet=quiet)
    return got.stats


def save_pass(store: Store, name: str, stats: CoactivationStats, csls_k: int) -> dict[str, dict[str, str]]:
    """Save the statistics and their atlas-side statistic as run ``name``'s files; their records."""

    buf = io.BytesIO()
    stats.save(cast(Any, buf))  # np.savez writes to a file object too
    coact = store.save_run_file(name, COACT_FILE, buf.getvalue())
    buf = io.BytesIO()
    stats.atlas_side(k=csls_k, beta=DEFAULT_ISF_BETA).save(buf)
    stat = store.save_run_file(name, STAT_FILE, buf.getvalue())
    return {COACT_FILE: coact, STAT_FILE: stat}


def load_pass(store: Store, name: str) -> CoactivationStats | None:
    """The recorded statistics of run ``name`` (None until saved). Its corpus must still be the
    text it was computed from (`check_corpus`), as a run's map, features and atlas must: a resume
    refuses rather than carry labels of one corpus under another's name."""
    data = store.read_run_file(name, COACT_FILE)
    if data is None:
        return None
    check_corpus(MatchSpec(**store.run(name).params["match"]))
    return CoactivationStats.load(cast(Any, io.BytesIO(data)))


__all__ = ["COACT_FILE", "MATCHES", "MatchSpec", "check_corpus", "check_match", "coactivation_pass", "load_pass",
           "match_spec", "save_pass", "subject_encoder"]
