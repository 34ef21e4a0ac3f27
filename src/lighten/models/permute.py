"""A seeded channel permutation of a Llama state dict that leaves the model's function exactly unchanged.

Why: SmolLM2 ships as Q4_1 GGUF, so its dequantized weights already sit on an asymmetric 4-bit grid with
blocks of 32 along the input dim; any 4-bit g32 quantizer would rebuild them with zero error and every
quantization result would look perfect. Reordering channels mixes different blocks' values into each block
of 32, which takes the weights off the grid, while the network computes the same function:

- residual stream: one permutation p of the hidden dim, applied to everything that reads or writes it
  (RMSNorm is elementwise after a permutation-invariant rms, so its gain is permuted too);
- MLP: per layer, a permutation of the intermediate channels (gate/up rows, down columns);
- values: per layer and KV head, a permutation within head_dim (v rows, and the o_proj columns of every q
  head that reads that KV head). q/k rows stay: RoPE rotates fixed pairs of their channels."""

import torch
from torch import Tensor


def permute_llama(state_dict: dict[str, Tensor], config, seed: int = 0) -> dict[str, Tensor]:
    """A new state dict for a LlamaForCausalLM (`config`) with permuted channels; the input is not changed."""
    g = torch.Generator().manual_seed(seed)
    hidden, n_heads, n_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    sd = dict(state_dict)

    def rows(name: str, idx: Tensor) -> None:  # also 1-D norm gains and biases, which follow the rows
        for key in (f"{name}.weight", f"{name}.bias"):
            if key in sd:
                sd[key] = sd[key][idx].contiguous()

    def cols(name: str, idx: Tensor) -> None:
        sd[f"{name}.weight"] = sd[f"{name}.weight"][:, idx].contiguous()

    p = torch.randperm(hidden, generator=g)
    cols("model.embed_tokens", p)
    rows("model.norm", p)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        mlp = torch.randperm(config.intermediate_size, generator=g)
        v = torch.stack([torch.randperm(head_dim, generator=g) for _ in range(n_kv)])  # (n_kv, head_dim)
        v_rows = (v + torch.arange(n_kv)[:, None] * head_dim).flatten()
        # q head h reads KV head h // (n_heads // n_kv), the grouping of transformers' repeat_kv.
        kv_of_head = torch.arange(n_heads) // (n_heads // n_kv)
        o_cols = (v[kv_of_head] + torch.arange(n_heads)[:, None] * head_dim).flatten()

        rows(f"{layer}.input_layernorm", p)
        rows(f"{layer}.post_attention_layernorm", p)
        for proj in ("q_proj", "k_proj", "v_proj"):
            cols(f"{layer}.self_attn.{proj}", p)
        rows(f"{layer}.self_attn.v_proj", v_rows)
        cols(f"{layer}.self_attn.o_proj", o_cols)
        rows(f"{layer}.self_attn.o_proj", p)
        for proj in ("gate_proj", "up_proj"):
            cols(f"{layer}.mlp.{proj}", p)
            rows(f"{layer}.mlp.{proj}", mlp)
        cols(f"{layer}.mlp.down_proj", mlp)
        rows(f"{layer}.mlp.down_proj", p)

    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # same tensor, so it stays tied
    else:
        cols("lm_head", p)
    return sd
