"""Tiny real `transformers` models and tokenizers for the alignment tests (built in well under a
second, saved with ``save_pretrained`` and loaded back, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

CORPUS = [
    "the red fox jumps over the lazy dog.",
    "rain and thunder fill the dark sky tonight.",
    "a violin and a piano play a quiet song.",
    "the green parrot sings in the morning sun.",
    "snow falls on the cold mountain village.",
    "drums and guitars make a loud happy noise!",
    "the cat sleeps beside the warm fire.",
    "wind blows the clouds across the grey sea.",
]

VOCAB_SIZE = 120
D = 32


def word_tokenizer(texts=CORPUS, bert: bool = False) -> T.PreTrainedTokenizerFast:
    """Word-level tokenizer; GPT-style adds ``<bos>`` in front, BERT-style ``[CLS] … [SEP]``."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert else ["<pad>", "<unk>", "<bos>", "<eos>"]
    tok = Tokenizer(models.WordLevel(unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    if bert:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                         cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                     bos_token="<bos>", eos_token="<eos>", model_max_length=64)


def bpe_tokenizer(texts=CORPUS, vocab_size: int = 60) -> T.PreTrainedTokenizerFast:
    """A small byte-level-free BPE that splits most words into several pieces."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"]))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                     bos_token="<bos>", eos_token="<eos>", model_max_length=64)


def _common(d: int, n_layers: int) -> dict:
    return dict(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=2, intermediate_size=2 * d,
                vocab_size=VOCAB_SIZE, max_position_embeddings=64)


def arch_config(arch: str, d: int = D, n_layers: int = 2) -> T.PretrainedConfig:
    """A tiny config of each architecture family the resolver knows."""
    c = _common(d, n_layers)
    gqa = dict(c, num_key_value_heads=1)
    if arch == "gpt2":
        return T.GPT2Config(n_layer=n_layers, n_embd=d, n_head=2, vocab_size=VOCAB_SIZE, n_positions=64,
                            bos_token_id=2, eos_token_id=3)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(**c)
    if arch == "llama":
        return T.LlamaConfig(**gqa)
    if arch == "mistral":
        return T.MistralConfig(**gqa)
    if arch == "qwen2":
        return T.Qwen2Config(**gqa)
    if arch == "gemma":
        return T.GemmaConfig(**gqa, head_dim=d // 2)
    if arch == "gemma2":
        return T.Gemma2Config(**gqa, head_dim=d // 2)
    if arch == "phi":
        return T.PhiConfig(**c)
    if arch == "bert":
        return T.BertConfig(**c)
    raise ValueError(arch)


CAUSAL_ARCHS = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "phi")
ALL_ARCHS = (*CAUSAL_ARCHS, "bert")


def save_tiny(folder: Path, arch: str, tokenizer=None, d: int = D, n_layers: int = 2, seed: int = 0) -> Path:
    """Build a randomly initialised tiny model of ``arch``, save it with its tokenizer, return the folder."""
    torch.manual_seed(seed)
    cfg = arch_config(arch, d, n_layers)
    auto = T.AutoModel if arch == "bert" else T.AutoModelForCausalLM
    model = auto.from_config(cfg)
    folder = Path(folder)
    model.save_pretrained(folder)
    (tokenizer or word_tokenizer(bert=arch == "bert")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one torch thread, and many times faster on a busy shared machine.
    (Import it into a test module to apply it there.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
