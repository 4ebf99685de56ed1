"""The two tokenizers of ConceptWorld, trained locally with the `tokenizers` library.

- The shared tokenizer (foundation and subject A) is word-level: one token per word or
  punctuation run. Same tokenizer means `token` pairing works between those two models.
- The second tokenizer (subject B) is a BPE over SentencePiece-style ``▁word`` pieces with a
  vocabulary smaller than the number of words, so many member words split into several pieces
  and tokens of the two tokenizers do not line up: aligning B needs `span` pairing (DESIGN §5).

Both are wrapped as `PreTrainedTokenizerFast` (offset mappings included), add ``<bos>`` in front
of every text, and have ``<eos>`` (end of document) and ``<pad>`` tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
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


def train_word_tokenizer(texts: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word and punctuation run of ``texts``."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    # Decoding joins words with spaces and glues punctuation back ("the fox ran.").
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return _wrap(tok, max_length)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer on ``▁``-prefixed words (SentencePiece style) with ``vocab_size`` tokens."""
    tok = Tokenizer(models.BPE(unk_token=UNK, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, max_length)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """SHA-256 (first 16 hex digits) of the tokenizer's serialised definition: equal iff same tokenizer."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
