"""A small Llama-shaped causal LM whose normalization is the experiment: which norm (lighten.norms), where
it sits, and the attention-side changes that claim to keep outliers away.

    pre    x + f(norm(x))                         Pre-LN: Llama, GPT-2
    post   norm(x + f(x))                         Post-LN: the original Transformer, BERT
    peri   x + norm_out(f(norm_in(x)))            Peri-LN (Kim et al. 2025): a norm around each sub-layer
    mix    post in the first ⌊0.25·L⌋ layers,     Mix-LN (Li et al. 2025)
           pre in the rest

and, on top, LayerNorm Scaling (each pre-norm's output × 1/sqrt(layer), "The Curse of Depth"), OSP's
learnable embedding projection (a d×d matrix after the embedding, identity at first), and from
"Quantizable Transformers" (Bondarenko et al. 2023) the clipped softmax clip((ζ - γ)·softmax + γ, 0, 1) with
ζ = 1, γ = -α/T (T keys), which lets a head give exact zeros without pushing its logits to extremes, and
gated attention, each head's output × sigmoid of a linear map of the token (a head can switch itself off).
Module names follow Llama's (self_attn.q_proj, mlp.down_proj, ...) so that lighten's tools find them.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lighten.errors import LightenError
from lighten.norms import NORMS, DepthScaled, make_norm

PLACEMENTS = ("pre", "post", "peri", "mix")
MIX_POST_FRACTION = 0.25  # Mix-LN's α: the share of layers (the first ones) that are Post-LN


@dataclass
class LabConfig:
    vocab_size: int
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int | None = None  # Llama's 8/3 · hidden (a 4x GELU MLP's parameters), to 16s
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"
    placement: str = "pre"
    norm_eps: float = 1e-5
    layernorm_scaling: bool = False
    embedding_projection: bool = False
    clipped_softmax_alpha: float | None = None  # γ = -α / T; None: plain softmax
    gated_attention: bool = False
    train_steps: int = 0  # the training length, for norms with a schedule (PRepBN)

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = -(-8 * self.hidden_size // 3 // 16) * 16
        if self.norm not in NORMS:
            raise LightenError(f"unknown norm {self.norm!r}; known: {', '.join(NORMS)}")
        if self.placement not in PLACEMENTS:
            raise LightenError(f"unknown placement {self.placement!r}; known: {', '.join(PLACEMENTS)}")
        if self.hidden_size % self.num_attention_heads:
            raise LightenError("hidden_size must be a multiple of num_attention_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def post_ln(self, layer: int) -> bool:
        """Whether `layer` (0-based) normalizes after its residual adds."""
        mixed = self.placement == "mix" and layer < math.floor(MIX_POST_FRACTION * self.num_hidden_layers)
        return self.placement == "post" or mixed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def clipped_softmax(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """clip((1 - γ)·softmax(scores) + γ, 0, 1) over the last dimension, γ = -α / (number of keys)."""
    gamma = -alpha / scores.shape[-1]
    return ((1 - gamma) * scores.softmax(-1) + gamma).clamp(0, 1)


class LabAttention(nn.Module):
    def __init__(self, config: LabConfig):
        super().__init__()
        d, self.heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        # gated attention: a gate per head and token, sigmoid(0) = 1/2 at first (zero-initialised bias)
        self.head_gate = nn.Linear(d, self.heads) if config.gated_attention else None
        self.alpha = config.clipped_softmax_alpha

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.alpha is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            # a masked key's softmax 0 becomes γ <= 0, clipped to exactly 0: still masked
            out = clipped_softmax(scores.masked_fill(~causal, -math.inf), self.alpha) @ v
        if self.head_gate is not None:
            out = out * torch.sigmoid(self.head_gate(x)).transpose(1, 2)[..., None]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LabMLP(nn.Module):
    def __init__(self, config: LabConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LabBlock(nn.Module):
    def __init__(self, config: LabConfig, layer: int):
        super().__init__()
        self.post_ln = config.post_ln(layer)
        self.peri = config.placement == "peri"

        def norm(scaled: bool) -> nn.Module:
            made = make_norm(config.norm, config.hidden_size, config.norm_eps, config.train_steps)
            return DepthScaled(made, layer + 1) if scaled and config.layernorm_scaling else made

        # A pre-norm's output feeds the sub-layer, where LayerNorm Scaling applies; a post-LN norm's output
        # is the residual stream itself.
        self.input_layernorm = norm(scaled=not self.post_ln)
        self.self_attn = LabAttention(config)
        self.post_attention_layernorm = norm(scaled=not self.post_ln)
        self.mlp = LabMLP(config)
        if self.peri:  # the output norms of Peri-LN
            self.attn_output_layernorm, self.mlp_output_layernorm = norm(False), norm(False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.post_ln:
            x = self.input_layernorm(x + self.self_attn(x, cos, sin))
            return self.post_attention_layernorm(x + self.mlp(x))
        attn = self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + (self.attn_output_layernorm(attn) if self.peri else attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (self.mlp_output_layernorm(mlp) if self.peri else mlp)


class LabModel(nn.Module):
    """The lab's causal LM: LabModel(config)(input_ids) -> logits [batch, tokens, vocab]; with `labels`, also
    the mean next-token cross-entropy, as (loss, logits)."""

    def __init__(self, config: LabConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_projection = nn.Linear(d, d, bias=False) if config.embedding_projection else None
        self.layers = nn.ModuleList(LabBlock(config, i) for i in range(config.num_hidden_layers))
        # A Post-LN stack ends on a norm already; the others normalize before the head.
        self.norm = (
            None
            if config.placement == "post"
            else make_norm(config.norm, d, config.norm_eps, config.train_steps)
        )
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.apply(_init)
        if self.embed_projection is not None:
            nn.init.eye_(self.embed_projection.weight)
        hd = config.head_dim
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
        angles = torch.outer(torch.arange(config.max_position_embeddings).float(), inv_freq)
        self.register_buffer("cos", angles.cos().repeat(1, 2), persistent=False)
        self.register_buffer("sin", angles.sin().repeat(1, 2), persistent=False)

    def get_output_embeddings(self) -> nn.Linear:
        """The output head, as transformers names it: QAT (lighten.lab.qat) leaves it in full precision, as
        BitNet b1.58 does, and so does the report's quantization."""
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise LightenError(
                f"{t} tokens exceed the model's {self.config.max_position_embeddings} positions"
            )
        x = self.embed_tokens(input_ids)
        if self.embed_projection is not None:
            x = self.embed_projection(x)
        cos, sin = self.cos[:t], self.sin[:t]
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(x if self.norm is None else self.norm(x))
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return loss, logits


def _init(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) for every matrix and embedding, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build_lab_model(vocab_size: int, **options) -> LabModel:
    """A LabModel of LabConfig(vocab_size, **options)."""
    return LabModel(LabConfig(vocab_size, **options))
