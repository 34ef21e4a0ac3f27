"""Tiny random-weight models of every supported family, with a tiny word-level tokenizer, saved as real
Hugging Face directories. Fast stand-ins for the real models; anything measured on them is "random"."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
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

# Llama and Qwen2 differ here only in tying: Llama ties lm_head to the embeddings (as SmolLM2 does).
DECODER = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=160,
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=1,
)
ARCHS = {  # arch -> (model class, config class, config)
    "bert": (
        BertModel,
        BertConfig,
        dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, pad_token_id=1
        ),
    ),
    "gpt2": (
        GPT2LMHeadModel,
        GPT2Config,
        dict(n_embd=64, n_layer=2, n_head=4, bos_token_id=2, eos_token_id=3),
    ),
    "llama": (LlamaForCausalLM, LlamaConfig, DECODER | dict(tie_word_embeddings=True)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, DECODER | dict(tie_word_embeddings=False)),
    "mistral": (MistralForCausalLM, MistralConfig, DECODER | dict(sliding_window=8)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, DECODER | dict(head_dim=16)),  # RMSNorms on q and k per head
    "phi3": (Phi3ForCausalLM, Phi3Config, DECODER),  # q/k/v in one qkv_proj, gate/up in one gate_up_proj
    # LayerNorm with bias as pre-norms, RoPE on a quarter of each head (partial_rotary_factor 0.25)
    "stablelm": (StableLmForCausalLM, StableLmConfig, DECODER),
    # Norms on each sub-layer's output too, RMSNorm scaled by (1 + w), embeddings by sqrt(hidden)
    # (attention scaled by 1/sqrt(head_dim), as in the 2B/9B models and as llama.cpp computes it)
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, DECODER | dict(head_dim=16, query_pre_attn_scalar=16)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, DECODER | dict(head_dim=16, query_pre_attn_scalar=16)),
    # Norms on each sub-layer's output and none before it; RMSNorms on all of q and of k
    "olmo2": (Olmo2ForCausalLM, Olmo2Config, DECODER),
    # Attention and MLP in parallel on LayerNorms of the same stream; q, k, v interleaved head by head
    "gpt_neox": (
        GPTNeoXForCausalLM,
        GPTNeoXConfig,
        {k: v for k, v in DECODER.items() if k != "num_key_value_heads"},
    ),
    # Llama's blocks with multipliers on the embeddings, the residual adds, attention and the logits
    "granite": (
        GraniteForCausalLM,
        GraniteConfig,
        DECODER
        | dict(
            embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0
        ),
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


def tiny_model(arch: str, seed: int = 0, **config):
    """A seeded random `arch` model; `config` overrides the tiny defaults (vocab_size, attention_bias...)."""
    model_class, config_class, defaults = ARCHS[arch]
    torch.manual_seed(seed)
    return model_class(config_class(**(dict(vocab_size=len(VOCAB)) | defaults | config))).eval()


def save_tiny(arch: str, path: Path, seed: int = 0, tokenizer=None, **config) -> Path:
    """Write a tiny random `arch` model (`config` as for tiny_model) and a tokenizer (default
    tiny_tokenizer()) as a Hugging Face directory (safetensors)."""
    tiny_model(arch, seed, **config).save_pretrained(path)
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return path


def sample_text(n_words: int = 600, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n_words,), generator=g).tolist())


def tiny_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A 300-token byte-level BPE trained on sample_text, for GGUF exports of the tiny decoders (GGUF wants
    byte-level BPE; give the model vocab_size >= 300): their files stay small and quick to read back."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    special = "<|endoftext|>"
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=alphabet, special_tokens=[special], show_progress=False
    )
    tok.train_from_iterator([sample_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special)
