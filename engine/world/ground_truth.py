"""Ground-truth labels of SAE latents in ConceptWorld, from the world's known structure.

Every document of a world has one topic (its concept) and every token lies in a known word, so
a latent's activation mass over a set of tokens (the SAE stage's labelling slice of the
training documents, disjoint from the tokens the SAE was trained on) splits by topic and by
word. The rules, in order, each with the statistic that decided it:

- **dead**: it fired on fewer than ``MIN_FIRES`` tokens → no label;
- **dense**: it fired on more than ``MAX_FREQ`` of all tokens → no label (no topic or word
  of the world covers that many);
- **word**: at least ``MIN_SHARE`` of its activation mass lies on one word (a member word, a
  template word or a punctuation mark) → "the word 'storm'";
- **topic**: at least ``MIN_SHARE`` of its mass lies in documents of one concept (and no single
  word holds it) → "Weather (topic)";
- **mixed**: neither → no label (polysemantic, or a position / syntax feature).

``MIN_SHARE`` = 0.5: the label says where at least half of what the latent does goes (the rule
order settles a latent at exactly half of each). ``MAX_FREQ`` = 0.3 lies above the token share
of any topic of the smallest world (10 topics, ~0.1 each) and of its most frequent words ("the"
0.14 and "." 0.12 of tiny's training words). These were fixed from the training documents'
composition, not from any evaluation's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.world.concepts import Concept

MIN_FIRES = 10
MAX_FREQ = 0.3
MIN_SHARE = 0.5
KINDS = ("topic", "word", "none")


def classify(fires: np.ndarray, freq: np.ndarray, topic_share: np.ndarray, word_share: np.ndarray
             ) -> tuple[list[str], list[str]]:
    """Kind (topic / word / none) and reason (topic, word, dead, dense, mixed) of each latent."""
    kinds, reasons = [], []
    for n, f, ts, ws in zip(fires, freq, topic_share, word_share, strict=True):
        if n < MIN_FIRES:
            k, r = "none", "dead"
        elif f > MAX_FREQ:
            k, r = "none", "dense"
        elif ws >= MIN_SHARE:
            k, r = "word", "word"
        elif ts >= MIN_SHARE:
            k, r = "topic", "topic"
        else:
            k, r = "none", "mixed"
        kinds.append(k)
        reasons.append(r)
    return kinds, reasons


def topic_label(concept: Concept) -> str:
    return f"{concept.label} (topic)"


def word_label(word: str) -> str:
    return f"the word '{word}'"


def latent_ground_truth(top_acts: np.ndarray, top_idx: np.ndarray, n_latents: int, token_concepts: np.ndarray,
                        token_words: np.ndarray, concepts: Sequence[Concept]) -> dict:
    """Ground truth of each of ``n_latents`` latents from TopK codes ``(n_tokens, k)`` of labelled tokens.

    ``token_concepts[t]`` is the concept of token t's document, ``token_words[t]`` the word it lies
    in. Returns ``{"rules", "latents": [{latent, kind, key, label, reason, fires, freq,
    topic_share, top_concept, word_share, top_word, word_topics}], "summary"}``; ``key`` is
    ``topic:<concept name>``, ``word:<word>`` or None and is what two latents are compared by.
    """
    n_tokens = len(token_concepts)
    vocab, word_ids = np.unique(np.asarray(token_words), return_inverse=True)
    K = len(concepts)
    acts = np.clip(top_acts, 0, None).astype(np.float64)
    rows = np.repeat(np.arange(n_tokens), top_idx.shape[1])
    lat, a = top_idx.reshape(-1), acts.reshape(-1)
    on = a > 0
    lat, a, rows = lat[on], a[on], rows[on]
    fires = np.bincount(lat, minlength=n_latents)
    by_topic = np.zeros((n_latents, K))
    np.add.at(by_topic, (lat, token_concepts[rows]), a)
    by_word = np.zeros((n_latents, len(vocab)))
    np.add.at(by_word, (lat, word_ids[rows]), a)
    total = by_topic.sum(1)
    safe = np.where(total > 0, total, 1.0)
    topic_share, top_concept = by_topic.max(1) / safe, by_topic.argmax(1)
    word_share, top_word = by_word.max(1) / safe, by_word.argmax(1)
    # across how many topics' documents the latent fires on its top word (a template word: many)
    fired_on = np.zeros((n_latents, K), dtype=bool)
    sel = word_ids[rows] == top_word[lat]
    fired_on[lat[sel], token_concepts[rows][sel]] = True
    freq = fires / max(n_tokens, 1)
    kinds, reasons = classify(fires, freq, topic_share, word_share)
    latents = []
    for i in range(n_latents):
        kind = kinds[i]
        c, w = concepts[int(top_concept[i])], str(vocab[int(top_word[i])]) if len(vocab) else ""
        key = f"topic:{c.name}" if kind == "topic" else f"word:{w}" if kind == "word" else None
        label = topic_label(c) if kind == "topic" else word_label(w) if kind == "word" else None
        latents.append({
            "latent": i, "kind": kind, "key": key, "label": label, "reason": reasons[i], "fires": int(fires[i]),
            "freq": round(float(freq[i]), 6), "topic_share": round(float(topic_share[i]), 4),
            "top_concept": c.name, "word_share": round(float(word_share[i]), 4), "top_word": w,
            "word_topics": int(fired_on[i].sum()),
        })
    summary = {r: reasons.count(r) for r in ("topic", "word", "dead", "dense", "mixed")}
    summary["topics_covered"] = len({x["key"] for x in latents if x["kind"] == "topic"})
    summary["words_covered"] = len({x["key"] for x in latents if x["kind"] == "word"})
    return {"rules": {"min_fires": MIN_FIRES, "max_freq": MAX_FREQ, "min_share": MIN_SHARE,
                      "n_tokens": int(n_tokens)},
            "statistic": "share of the latent's activation mass on the labelling tokens by document topic and by word",
            "latents": latents, "summary": summary}


def description(entry: dict) -> str | None:
    """A one-line description of a labelled latent, with the statistic that decided its label."""
    if entry["kind"] == "topic":
        return (f"fires across documents about {entry['top_concept']} ({entry['topic_share']:.0%} of its activation; "
                f"top word '{entry['top_word']}' {entry['word_share']:.0%})")
    if entry["kind"] == "word":
        return (f"fires on the word '{entry['top_word']}' ({entry['word_share']:.0%} of its activation, "
                f"in documents of {entry['word_topics']} topics)")
    return None


def relaxed_matches(subject: Sequence[dict], atlas: Sequence[dict], first: np.ndarray) -> np.ndarray:
    """The *relaxed* score of first hits (an alternative beside the strict key, never instead of
    it): subject latent i (labelled ones only, in order) matches atlas latent ``first[i]`` when
    their strict keys are equal, or when both put at least ``MIN_SHARE`` of their mass in
    documents of the same concept. It forgives the one artifact of the strict key seen on the
    worlds: a latent firing on a function word ("the") inside one topic's documents is
    ``word:the`` on one side and ``topic:X`` on the other."""
    out = []
    for i, e in enumerate(subject):
        if e["key"] is None:
            continue
        a = atlas[int(first[i])] if first[i] >= 0 else None
        out.append(a is not None and (a["key"] == e["key"] or (
            e["topic_share"] >= MIN_SHARE and a["topic_share"] >= MIN_SHARE and a["top_concept"] == e["top_concept"])))
    return np.asarray(out, dtype=bool)
