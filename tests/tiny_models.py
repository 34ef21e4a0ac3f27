"""Tiny random-weight models of every supported family, with a tiny word-level tokenizer, saved as real
Hugging Face directories. Fast stand-ins for the real models; anything measured on them is "random"."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "it",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "model",
    "light",
    "weight",
    "small",
    "large",
    "number",
    "format",
    "bit",
    "byte",
    "scale",
    "group",
    "channel",
    "row",
    "column",
    "norm",
    "layer",
]
VOCAB = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[CLS]", "[SEP]", *WORDS])}

ARCHS = {
    "bert": lambda: BertModel(
        BertConfig(
            vocab_size=len(VOCAB),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            pad_token_id=1,
        )
    ),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=len(VOCAB), n_embd=64, n_layer=2, n_head=4, bos_token_id=2, eos_token_id=3)
    ),
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=160,
            tie_word_embeddings=True,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        )
    ),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(VOCAB),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=160,
            tie_word_embeddings=False,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        )
    ),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="[CLS]",
        eos_token="[SEP]",
    )


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return ARCHS[arch]().eval()


def save_tiny(arch: str, path: Path, seed: int = 0) -> Path:
    """Write a tiny random `arch` model and tokenizer as a Hugging Face directory (safetensors)."""
    tiny_model(arch, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def sample_text(n_words: int = 600, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n_words,), generator=g).tolist())
