"""The architecture view: which norm feeds which linear layers, and what writes the residual stream.

Rewrites (lighten.surgery) and diagnostics (inspect) need the same few facts about a transformer, whatever
its Hugging Face class calls them:

    residual stream ──► norm ──► q, k, v ──► attention ──► o ──► (+ residual)
                    └─► norm ──► gate, up ──► act ──► down ──► (+ residual)

In a pre-norm model (GPT-2, Llama) each norm reads the residual stream and only the linears after it see
its output, so the norm's affine can move into them. In a post-norm model (BERT) the norm sits *on* the
residual stream after each add: its output is both the next block's input and the residual itself. Gemma 2
and 3 are pre-norm with a second norm on each sub-layer's output, before its residual add ("sandwich"):

    residual stream ──► norm ──► q, k, v ──► attention ──► o ──► out norm ──► (+ residual)

and their RMSNorm scales by (1 + w), not w: norm_gain reads a norm's gain whatever its parametrization.
OLMo-2 keeps only the output norms: its q, k, v and gate, up read the residual stream itself (their
NormGroup has no norm). GPT-NeoX adds attention and MLP to the stream in parallel, each behind its own
LayerNorm of the same stream: as far as the rewrites go, that is pre-norm like GPT-2.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten.errors import ModelError


@dataclass
class NormGroup:
    """A norm and the linear layers that read its output (and nothing else does, in pre-norm models).
    Without a norm (OLMo-2), the linears read the residual stream and `name` is their sub-layer's."""

    name: str
    norm: nn.Module | None
    linears: dict[str, nn.Module]  # module name -> Linear / Conv1D


@dataclass
class Block:
    attn: NormGroup  # norm -> q, k, v (GPT-2: the fused c_attn)
    attn_out: tuple[str, nn.Module]  # o_proj: writes the residual stream
    mlp: NormGroup  # norm -> gate, up (GPT-2 / BERT: the one fc)
    mlp_out: tuple[str, nn.Module]  # down_proj: writes the residual stream
    out_norms: tuple[nn.Module, ...] = ()  # norms on o's and down's outputs before the adds (Gemma)


@dataclass
class ModelView:
    # "bert" | "gpt2" | "llama" (Llama, Qwen2, Mistral, SmolLM2 ...) | "phi3" (fused qkv and gate/up) |
    # "gemma" (sandwich norms) | "olmo2" (output norms only) | "neox" (parallel attention and MLP)
    family: str
    pre_norm: bool
    embeddings: dict[str, nn.Embedding]  # write the residual stream before block 0
    blocks: list[Block]
    final: NormGroup | None  # final norm -> lm_head (pre-norm LMs); BERT has none
    num_heads: int
    num_kv_heads: int
    head_dim: int


def model_view(model: nn.Module) -> ModelView:
    """The view of a supported model; ModelError naming what is missing otherwise."""
    base = model.base_model
    layers = (
        getattr(base, "layers", None)
        or getattr(base, "h", None)
        or getattr(getattr(base, "encoder", None), "layer", None)
    )
    if layers is None or len(layers) == 0:
        raise _unsupported(
            model, "no list of transformer blocks (model.layers, transformer.h or encoder.layer)"
        )
    names = {id(m): n for n, m in model.named_modules()}
    for family_view in FAMILY_VIEWS:
        view = family_view(model, base, layers, names)
        if view is not None:
            return view
    raise _unsupported(
        model,
        "its blocks match none of the Llama (input_layernorm/self_attn/mlp.gate_proj), OLMo-2 "
        "(self_attn/mlp/post_feedforward_layernorm), GPT-2 (ln_1/attn.c_attn), GPT-NeoX "
        "(attention.query_key_value/mlp.dense_h_to_4h) or BERT (attention/intermediate/output) layouts",
    )


# Each builder below recognises its family by the structure of the first block (None if it is not its
# family) and builds the view; `names` maps id(module) -> the module's qualified name in the model.


def _llama_view(model, base, layers, names) -> ModelView | None:
    """Llama's blocks; Phi-3's, with q/k/v in one qkv_proj and gate/up in one gate_up_proj; Gemma 2/3's,
    with a norm on each sub-layer's output, where the MLP's pre-norm is pre_feedforward_layernorm and
    post_attention_layernorm normalizes the attention output; and OLMo-2's, with the output norms only."""
    first = layers[0]
    if not (hasattr(first, "self_attn") and hasattr(first, "mlp")):
        return None
    fused = hasattr(first.mlp, "gate_up_proj") and hasattr(first.self_attn, "qkv_proj")
    if not (hasattr(first.mlp, "gate_proj") or fused):
        return None
    sandwich = hasattr(first, "pre_feedforward_layernorm")
    output_norms_only = not hasattr(first, "input_layernorm")
    if output_norms_only and not hasattr(first, "post_feedforward_layernorm"):
        return None

    has_out_norms = sandwich or output_norms_only

    def block(b) -> Block:
        if fused:
            attn, mlp = [b.self_attn.qkv_proj], [b.mlp.gate_up_proj]
        else:
            attn = [b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj]
            mlp = [b.mlp.gate_proj, b.mlp.up_proj]
        if output_norms_only:
            attn_group = _group(names, None, *attn, reads=b.self_attn)
            mlp_group = _group(names, None, *mlp, reads=b.mlp)
        else:
            attn_group = _group(names, b.input_layernorm, *attn)
            mlp_norm = b.pre_feedforward_layernorm if sandwich else b.post_attention_layernorm
            mlp_group = _group(names, mlp_norm, *mlp)
        out_norms = (b.post_attention_layernorm, b.post_feedforward_layernorm) if has_out_norms else ()
        o, down = _named(names, b.self_attn.o_proj), _named(names, b.mlp.down_proj)
        return Block(attn_group, o, mlp_group, down, out_norms)

    blocks = [block(b) for b in layers]
    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    emb = dict([_named(names, base.embed_tokens)])
    final = _group(names, base.norm, *_lm_head(model))
    family = "olmo2" if output_norms_only else "gemma" if sandwich else "phi3" if fused else "llama"
    return ModelView(family, not output_norms_only, emb, blocks, final, n_heads, n_kv, head_dim)


def _gpt2_view(model, base, layers, names) -> ModelView | None:
    if not (hasattr(layers[0], "ln_1") and hasattr(layers[0].attn, "c_attn")):
        return None
    blocks = _fused_blocks(
        layers, names, "ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"
    )
    emb = dict([_named(names, base.wte), _named(names, base.wpe)])
    final = _group(names, base.ln_f, *_lm_head(model))
    n = model.config.n_head
    return ModelView("gpt2", True, emb, blocks, final, n, n, model.config.n_embd // n)


def _neox_view(model, base, layers, names) -> ModelView | None:
    first = layers[0]
    if not (hasattr(first, "attention") and hasattr(first.attention, "query_key_value")):
        return None
    paths = ("input_layernorm", "attention.query_key_value", "attention.dense")
    paths += ("post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    blocks = _fused_blocks(layers, names, *paths)
    emb = dict([_named(names, base.embed_in)])
    final = _group(names, base.final_layer_norm, *_lm_head(model))
    n = model.config.num_attention_heads
    return ModelView("neox", True, emb, blocks, final, n, n, model.config.hidden_size // n)


def _fused_blocks(layers, names, attn_norm, qkv, o, mlp_norm, up, down) -> list[Block]:
    """Blocks of one fused qkv matrix and one MLP input matrix, given the modules' paths in a block."""
    return [
        Block(
            _group(names, b.get_submodule(attn_norm), b.get_submodule(qkv)),
            _named(names, b.get_submodule(o)),
            _group(names, b.get_submodule(mlp_norm), b.get_submodule(up)),
            _named(names, b.get_submodule(down)),
        )
        for b in layers
    ]


def _bert_view(model, base, layers, names) -> ModelView | None:
    if not all(hasattr(layers[0], part) for part in ("attention", "intermediate", "output")):
        return None
    # Post-LN: block i's q/k/v read the LayerNorm that closed block i-1 (the embeddings' for block 0).
    norms = [base.embeddings.LayerNorm] + [b.output.LayerNorm for b in layers]
    blocks = [
        Block(
            _group(names, norm, b.attention.self.query, b.attention.self.key, b.attention.self.value),
            _named(names, b.attention.output.dense),
            _group(names, b.attention.output.LayerNorm, b.intermediate.dense),
            _named(names, b.output.dense),
        )
        for norm, b in zip(norms, layers, strict=False)  # the last norm closes the last block: no reader here
    ]
    e = base.embeddings
    embeddings = (e.word_embeddings, e.position_embeddings, getattr(e, "token_type_embeddings", None))
    emb = dict(_named(names, m) for m in embeddings if m is not None)
    n = model.config.num_attention_heads
    return ModelView("bert", False, emb, blocks, None, n, n, model.config.hidden_size // n)


FAMILY_VIEWS = [_llama_view, _gpt2_view, _neox_view, _bert_view]


def _named(names: dict, m: nn.Module) -> tuple[str, nn.Module]:
    return names[id(m)], m


def _group(names: dict, norm: nn.Module | None, *linears: nn.Module, reads: nn.Module = None) -> NormGroup:
    """The group of `norm` (or, without one, of the sub-layer `reads` whose linears read the stream)."""
    return NormGroup(
        names[id(norm if norm is not None else reads)], norm, dict(_named(names, m) for m in linears)
    )


def _lm_head(model: nn.Module) -> list[nn.Module]:
    """The LM head as a reader of the final norm, if the model has one."""
    head = model.get_output_embeddings()
    return [head] if head is not None else []


def _unsupported(model: nn.Module, why: str) -> ModelError:
    return ModelError(
        f"{type(model).__name__} is not supported by lighten's model view: {why}. Supported: "
        "BERT-family encoders, GPT-2, GPT-NeoX, and Llama-shaped causal LMs (Llama, Qwen2/3, Mistral, "
        "Granite, Phi-3, StableLM, Gemma 2/3, OLMo-2)."
    )


def weight_out_in(linear: nn.Module) -> torch.Tensor:
    """The weight as an [out, in] view (GPT-2's Conv1D stores [in, out]); writes go through to the module."""
    return linear.weight.t() if isinstance(linear, Conv1D) else linear.weight


@torch.no_grad()
def gain_offset(norm: nn.Module) -> float:
    """a in gain = a + weight: 0 for torch's norms and Llama's RMSNorm, 1 for Gemma's, which scales by
    (1 + w). Measured, not looked up by class: with its weight zeroed, the norm outputs 0 (plus its bias),
    or the normalized input itself."""
    weight = norm.weight
    saved = weight.detach().clone()
    x = torch.linspace(-1, 2, weight.numel(), dtype=weight.dtype, device=weight.device)[None]
    weight.zero_()
    try:
        out = norm(x).float()
    finally:
        weight.copy_(saved)
    bias = getattr(norm, "bias", None)
    out = out - (bias.float() if bias is not None else 0)
    return 0.0 if not out.any() else 1.0


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """The per-channel gain (fp32) the norm applies to its normalized input."""
    return norm.weight.detach().float() + gain_offset(norm)


@torch.no_grad()
def set_norm_gain(norm: nn.Module, gain: torch.Tensor) -> None:
    """Make the norm's gain `gain` (its weight gain - a: gain_offset)."""
    norm.weight.copy_((gain.float() - gain_offset(norm)).to(norm.weight.dtype))


def norm_groups(view: ModelView) -> list[NormGroup]:
    """Every norm with its readers, in forward order: each block's two, then the final norm (if any)."""
    groups = [g for b in view.blocks for g in (b.attn, b.mlp)]
    return groups + ([view.final] if view.final is not None else [])


def value_proj(view: ModelView, block: Block) -> tuple[nn.Module, torch.Tensor | slice]:
    """The linear that computes a block's attention values and which of its output rows they are (GPT-2's
    c_attn and Phi-3's qkv_proj compute q, k and v in one matmul, all q rows first; GPT-NeoX's
    query_key_value too, but head by head: q, k, v of head 0, then of head 1...; the others have a separate
    v / value). Write them back by indexing (w[rows] = ...): rows may be an index tensor."""
    if len(block.attn.linears) == 1:
        (qkv,) = block.attn.linears.values()
        hd = view.head_dim
        if view.family == "neox":
            heads = torch.arange(view.num_heads)[:, None] * 3 * hd
            return qkv, (heads + 2 * hd + torch.arange(hd)).flatten()
        q_rows, kv_rows = view.num_heads * hd, view.num_kv_heads * hd
        return qkv, slice(q_rows + kv_rows, q_rows + 2 * kv_rows)
    _, _, v = block.attn.linears.values()  # q, k, v in that order
    return v, slice(None)
