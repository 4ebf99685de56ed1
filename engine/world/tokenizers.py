"""The two tokenizers of ConceptWorld, built locally with the `tokenizers` library.

- The shared tokenizer (foundation and subject A) is word-level: one token per word or
  punctuation run. Same tokenizer means `token` pairing works between those two models.
- The second tokenizer (subject B) is a BPE with ``##`` continuation pieces and a vocabulary
  smaller than the number of words, so many member words split into several pieces and the
  tokens of the two tokenizers do not line up: aligning B needs `span` pairing (docs/design.md §5).

Both are `tokenizers` pipelines (lower-casing, `Whitespace` pre-tokenizer, WordLevel / BPE
model, ``##`` decoder) wrapped as `PreTrainedTokenizerFast` (offset mappings included); they add
``<bos>`` in front of every text and have ``<eos>`` (end of document) and ``<pad>`` tokens.

The vocabularies and merges are computed here rather than by the library's trainers: the
`BpeTrainer` breaks ties between equally frequent pairs in hash-map order, so two runs on the
same corpus gave different merges (and differently trained models). Here every tie is broken
by the pieces' spelling, so a corpus always gives the same tokenizer.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]  # ids 0, 1, 2, 3 in both tokenizers


def _wrap(tok: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def word_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each pre-token (lower-cased word or punctuation run) occurs in ``texts``."""
    pre = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    return counts


def _pipeline(model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Decoding joins words with spaces, glues ## pieces and punctuation back ("the fox ran.").
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def train_word_tokenizer(texts: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word and punctuation run of ``texts`` (most frequent first)."""
    counts = word_counts(texts)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + words)}
    return _wrap(_pipeline(models.WordLevel(vocab=vocab, unk_token=UNK)), max_length)


def learn_bpe(counts: Counter[str], vocab_size: int, min_frequency: int = 2,
              prefix: str = "##") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-pair merges over words with their ``counts``: ``(vocab, merges)`` for `models.BPE`.

    A word is spelt as its first character then ``##``-prefixed characters; the most frequent
    adjacent pair is merged until the vocabulary has ``vocab_size`` tokens or no pair occurs
    ``min_frequency`` times. Ties go to the alphabetically first pair.
    """
    spelt = {w: [w[0]] + [prefix + ch for ch in w[1:]] for w in counts}
    alphabet = sorted({p for pieces in spelt.values() for p in pieces})
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + alphabet)}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, pieces in spelt.items():
            for a, b in zip(pieces, pieces[1:]):
                pairs[(a, b)] += counts[w]
        if not pairs:
            break
        (a, b), n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < min_frequency:
            break
        merged = a + b.removeprefix(prefix)
        merges.append((a, b))
        vocab.setdefault(merged, len(vocab))
        for w, pieces in spelt.items():
            i, out = 0, []
            while i < len(pieces):
                if i + 1 < len(pieces) and pieces[i] == a and pieces[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            spelt[w] = out
    return vocab, merges


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer with ``##`` continuation pieces and (at most) ``vocab_size`` tokens."""
    vocab, merges = learn_bpe(word_counts(texts), vocab_size)
    model = models.BPE(vocab=vocab, merges=merges, unk_token=UNK, continuing_subword_prefix="##")
    return _wrap(_pipeline(model), max_length)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """SHA-256 (first 16 hex digits) of the tokenizer's serialised definition: equal iff same tokenizer."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
