"""The architecture view: which norm feeds which linear layers, and what writes the residual stream.

Rewrites (lighten.surgery) and diagnostics (inspect) need the same few facts about a transformer, whatever
its Hugging Face class calls them:

    residual stream ──► norm ──► q, k, v ──► attention ──► o ──► (+ residual)
                    └─► norm ──► gate, up ──► act ──► down ──► (+ residual)

In a pre-norm model (GPT-2, Llama) each norm reads the residual stream and only the linears after it see
its output, so the norm's affine can move into them. In a post-norm model (BERT) the norm sits *on* the
residual stream after each add: its output is both the next block's input and the residual itself.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten.errors import ModelError


@dataclass
class NormGroup:
    """A norm and the linear layers that read its output (and nothing else does, in pre-norm models)."""

    name: str
    norm: nn.Module
    linears: dict[str, nn.Module]  # module name -> Linear / Conv1D


@dataclass
class Block:
    attn: NormGroup  # norm -> q, k, v (GPT-2: the fused c_attn)
    attn_out: tuple[str, nn.Module]  # o_proj: writes the residual stream
    mlp: NormGroup  # norm -> gate, up (GPT-2 / BERT: the one fc)
    mlp_out: tuple[str, nn.Module]  # down_proj: writes the residual stream


@dataclass
class ModelView:
    family: str  # "bert" | "gpt2" | "llama" (Llama, Qwen2, Mistral, SmolLM2 ...)
    pre_norm: bool
    embeddings: dict[str, nn.Embedding]  # write the residual stream before block 0
    blocks: list[Block]
    final: NormGroup | None  # final norm -> lm_head (pre-norm LMs); BERT has none
    num_heads: int
    num_kv_heads: int
    head_dim: int


def model_view(model: nn.Module) -> ModelView:
    """The view of a supported model; ModelError naming what is missing otherwise."""
    names = {id(m): n for n, m in model.named_modules()}

    def group(label: str, norm: nn.Module, *linears: nn.Module) -> NormGroup:
        return NormGroup(label, norm, {names[id(m)]: m for m in linears})

    def named(m: nn.Module) -> tuple[str, nn.Module]:
        return names[id(m)], m

    cfg = model.config
    base = (
        getattr(model, "model", None) or getattr(model, "transformer", None) or getattr(model, "bert", model)
    )
    layers = (
        getattr(base, "layers", None)
        or getattr(base, "h", None)
        or getattr(getattr(base, "encoder", None), "layer", None)
    )
    if layers is None or len(layers) == 0:
        raise _unsupported(
            model, "no list of transformer blocks (model.layers, transformer.h or encoder.layer)"
        )
    first = layers[0]
    if hasattr(first, "input_layernorm") and hasattr(first, "self_attn") and hasattr(first.mlp, "gate_proj"):
        blocks = [
            Block(
                group(
                    names[id(b.input_layernorm)],
                    b.input_layernorm,
                    b.self_attn.q_proj,
                    b.self_attn.k_proj,
                    b.self_attn.v_proj,
                ),
                named(b.self_attn.o_proj),
                group(
                    names[id(b.post_attention_layernorm)],
                    b.post_attention_layernorm,
                    b.mlp.gate_proj,
                    b.mlp.up_proj,
                ),
                named(b.mlp.down_proj),
            )
            for b in layers
        ]
        head = getattr(model, "lm_head", None)
        final = group(names[id(base.norm)], base.norm, *([head] if head is not None else []))
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        return ModelView(
            "llama",
            True,
            {names[id(base.embed_tokens)]: base.embed_tokens},
            blocks,
            final,
            n_heads,
            n_kv,
            head_dim,
        )
    if hasattr(first, "ln_1") and hasattr(first.attn, "c_attn"):
        blocks = [
            Block(
                group(names[id(b.ln_1)], b.ln_1, b.attn.c_attn),
                named(b.attn.c_proj),
                group(names[id(b.ln_2)], b.ln_2, b.mlp.c_fc),
                named(b.mlp.c_proj),
            )
            for b in layers
        ]
        head = getattr(model, "lm_head", None)
        final = group(names[id(base.ln_f)], base.ln_f, *([head] if head is not None else []))
        emb = {names[id(base.wte)]: base.wte, names[id(base.wpe)]: base.wpe}
        n = cfg.n_head
        return ModelView("gpt2", True, emb, blocks, final, n, n, cfg.n_embd // n)
    if hasattr(first, "attention") and hasattr(first, "intermediate") and hasattr(first, "output"):
        # Post-LN: block i's q/k/v read the LayerNorm that closed block i-1 (the embeddings' for block 0).
        norms = [base.embeddings.LayerNorm] + [b.output.LayerNorm for b in layers]
        blocks = []
        for i, b in enumerate(layers):
            sa = b.attention.self
            blocks.append(
                Block(
                    group(names[id(norms[i])], norms[i], sa.query, sa.key, sa.value),
                    named(b.attention.output.dense),
                    group(
                        names[id(b.attention.output.LayerNorm)],
                        b.attention.output.LayerNorm,
                        b.intermediate.dense,
                    ),
                    named(b.output.dense),
                )
            )
        e = base.embeddings
        emb = {
            names[id(m)]: m
            for m in (e.word_embeddings, e.position_embeddings, getattr(e, "token_type_embeddings", None))
            if m is not None
        }
        n = cfg.num_attention_heads
        return ModelView("bert", False, emb, blocks, None, n, n, cfg.hidden_size // n)
    raise _unsupported(
        model,
        "its blocks match none of the Llama (input_layernorm/self_attn/mlp.gate_proj), "
        "GPT-2 (ln_1/attn.c_attn) or BERT (attention/intermediate/output) layouts",
    )


def _unsupported(model: nn.Module, why: str) -> ModelError:
    return ModelError(
        f"{type(model).__name__} is not supported by lighten's model view: {why}. Supported: "
        "BERT-family encoders, GPT-2, and Llama/Qwen2/Mistral-shaped causal LMs."
    )


def weight_out_in(linear: nn.Module) -> torch.Tensor:
    """The weight as an [out, in] view (GPT-2's Conv1D stores [in, out]); writes go through to the module."""
    return linear.weight.t() if isinstance(linear, Conv1D) else linear.weight


def norm_groups(view: ModelView) -> list[NormGroup]:
    """Every norm with its readers, in forward order: each block's two, then the final norm (if any)."""
    groups = [g for b in view.blocks for g in (b.attn, b.mlp)]
    return groups + ([view.final] if view.final is not None else [])


def value_proj(view: ModelView, block: Block) -> tuple[nn.Module, slice]:
    """The linear that computes a block's attention values and which of its output rows they are
    (GPT-2's c_attn computes q, k and v in one matmul; the others have a separate v / value linear)."""
    if view.family == "gpt2":
        (c_attn,) = block.attn.linears.values()
        width = view.num_heads * view.head_dim
        return c_attn, slice(2 * width, 3 * width)
    _, _, v = block.attn.linears.values()  # q, k, v in that order
    return v, slice(None)
