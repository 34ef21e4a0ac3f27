"""Greedy batch-1 generation with a lean forward for Llama-family models (Llama, Qwen2, Mistral, SmolLM2).

At batch 1 a small model's token costs a few dozen small ops per layer, and the Hugging Face forward wraps
each layer in masks, cache objects and keyword plumbing that cost more than the weights' bytes (in a model
as small as SmolLM2-135M most of a token's time goes outside the matmuls). This loop runs each block with
nothing around it:

    x = embed(token)
    per block:  q = attn_in(x): norm1, q/k/v, RoPE; k and v written into the cache rows of the position
                a = attention of q to the cache (one query: bmm, softmax, bmm)
                x = rest(x, a): x + o(a), then norm2, gate/up, act(g) * u, down and its residual add
    logits = head(x): final norm, lm_head

On an fp32 model whose layers are all on ggml (GGUF types, or lighten's ints dispatched there) attn_in and
rest are each one ggml graph (GGMLFunction): 2 calls a block, torch only for the attention. Otherwise they
call the model's own modules, q/k/v and gate/up joined into one kernel call each (join_linears), Hugging
Face's RMSNorm as torch's one fused op. RoPE is one matrix product per position either way, with the tables
the model's own rotary module computes once.
"""

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from lighten.errors import ModelError
from lighten.models.arch import Block, model_view
from lighten.models.limits import sliding_window
from lighten.runtime.ggml import GGMLFunction, ggml_owns_cores
from lighten.runtime.linear import GGMLLinear, PackedLinear

ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # the ones whose tables do not depend on the length
CHECK_TOKENS = 8  # the probe checking the decoder against transformers' forward once, when it is built


class Concat(nn.Module):
    """Layers that read one input, run one by one, outputs concatenated (when they cannot be joined)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers], -1)


def join_linears(layers: list[nn.Module]) -> nn.Module:
    """One layer computing several layers of the same input, outputs concatenated on the last dim.

    nn.Linear layers of one dtype, and packed layers that stack (PackedLinear.stacked), join into one call.
    Where the joined layer stacks the weights' rows, that is the only copy afterwards: each original layer's
    weight becomes a view of its rows, so the model's own forward keeps working and no memory is added
    (GGMLLinear shares ggml's weights and copies nothing). Anything else (the LUT fallback, mixed specs, a
    layer with hooks such as an online rotation) runs as a Concat."""
    kind = type(layers[0])
    plain = all(
        type(m) is kind
        and not m._forward_pre_hooks
        and not m._forward_hooks
        and (m.bias is None) == (layers[0].bias is None)
        for m in layers
    )
    if plain and kind is nn.Linear and len({m.weight.dtype for m in layers}) == 1:
        joined, rows = _stacked_linear(layers), "weight"
    elif plain and issubclass(kind, PackedLinear) and kind.can_stack(layers):
        joined, rows = kind.stacked(layers), next(iter(kind.ROW_BUFFERS), None)  # the rows' values
    else:
        return Concat(layers)
    start = 0
    for m in layers if rows else []:
        n = m.out_features
        view = getattr(joined, rows)[start : start + n]  # contiguous: whole rows
        setattr(m, rows, nn.Parameter(view, requires_grad=False) if kind is nn.Linear else view)
        start += n
    return joined


def _stacked_linear(layers: list[nn.Linear]) -> nn.Linear:
    first = layers[0]
    rows = sum(m.out_features for m in layers)
    joined = nn.Linear(first.in_features, rows, first.bias is not None, device="meta")
    joined.weight = nn.Parameter(torch.cat([m.weight for m in layers]), requires_grad=False)
    if first.bias is not None:
        joined.bias = nn.Parameter(torch.cat([m.bias for m in layers]), requires_grad=False)
    return joined


@dataclass
class LeanBlock:
    # residual stream x [T, hidden], RoPE's matrices transposed [T, hd, hd], the key and value cache rows of
    # the T positions [T, kv_heads · hd] -> q [T, heads · hd] of norm1(x) with RoPE; k (with RoPE) and v
    # written into the cache rows
    attn_in: Callable
    rest: Callable  # x, the attention heads [T, heads · hd] -> x + o(a), then the MLP with its residual


@dataclass
class Generation:
    tokens: list[int]  # the new tokens
    prefill_s: float  # prompt in, first new token out
    decode_s: float  # the remaining new tokens

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s > 0 else 0.0


class Decoder:
    """A Llama-family causal LM's lean forward with a preallocated KV cache of `max_len` positions.

    Runs in the dtype of the embeddings (a packed model: bf16 on torch's kernels, fp32 on ggml's). Build it
    once per model; it joins the q/k/v and gate/up layers of the model in place (see join_linears), which
    the model's own forward does not notice."""

    def __init__(self, model: nn.Module, max_len: int = 2048):
        view = model_view(model)
        if view.family != "llama":  # Gemma's norms on sub-layer outputs, (1 + w) gains, scaled embeddings
            raise ModelError(f"the lean decoder runs Llama-family models, not {view.family}")
        base = model.model
        attn = base.layers[0].self_attn
        extra = {n for n, _ in attn.named_children()} - {"q_proj", "k_proj", "v_proj", "o_proj"}
        if extra:
            raise ModelError(
                f"{type(model).__name__} has attention parts the lean decoder does not know: "
                + ", ".join(sorted(extra))
            )
        rope_type = getattr(base.rotary_emb, "rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ModelError(f"RoPE type {rope_type!r} depends on the sequence length; use model.generate")
        window = sliding_window(model.config)
        if window and window < max_len:
            # within the window sliding attention is full attention, which is all this decoder computes
            raise ModelError(
                f"this {model.config.model_type} model attends to a sliding window of {window} tokens, fewer "
                f"than the {max_len} asked for; the lean decoder attends to every token"
            )
        self.max_len = max_len
        self.dtype = base.embed_tokens.weight.dtype
        # A block all on ggml in an fp32 model is two ggml graphs: 2 calls in place of 4 matmuls and a dozen
        # torch ops.
        fp32 = self.dtype == torch.float32
        self.heads, self.kv_heads, self.head_dim = shape = view.num_heads, view.num_kv_heads, view.head_dim
        self.blocks = [
            (fp32 and _ggml_block(b, layer, *shape)) or _torch_block(b, layer, *shape)
            for b, layer in zip(view.blocks, base.layers, strict=True)
        ]
        self.head = (fp32 and _ggml_head(base.norm, model.lm_head)) or _torch_head(base.norm, model.lm_head)
        self.embed = base.embed_tokens
        x = torch.zeros(1, 1, dtype=self.dtype)
        cos, sin = base.rotary_emb(x, torch.arange(max_len)[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        if self.cos.shape[-1] != self.head_dim:
            raise ModelError(
                f"{type(model).__name__} rotates {self.cos.shape[-1]} of each head's {self.head_dim} "
                "dimensions (partial RoPE); the lean decoder rotates whole heads"
            )
        self.rotate_half_t = _rotate_half_matrix(self.head_dim, self.dtype).T.contiguous()
        # ggml computes on a thread pool of its own: torch single-threaded beside it (lighten.runtime.ggml).
        on_ggml = any(isinstance(m, GGMLLinear) for m in model.modules())
        self.cores = ggml_owns_cores if on_ggml else contextlib.nullcontext
        # A row per position (kv_heads · head_dim wide): a token's keys and values are one contiguous write.
        shape = (len(self.blocks), max_len, self.kv_heads * self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, dtype=self.dtype)
        self.caches = list(zip(self.k_cache, self.v_cache, strict=True))
        self._check_against(model)

    @torch.no_grad()
    def _check_against(self, model: nn.Module) -> None:
        """ModelError unless this forward gives the model's own logits on a short seeded probe: a variant
        that the structure above does not show (embedding or residual multipliers, logit scaling, ...)
        is refused, never computed wrongly; callers fall back to transformers' generate."""
        vocab = self.embed.num_embeddings
        ids = torch.randint(
            vocab, (min(CHECK_TOKENS, self.max_len),), generator=torch.Generator().manual_seed(0)
        )
        want = model(ids[None]).logits[0, -1].float()
        try:
            with self.cores():
                got = self.forward(ids, 0).float()
        except RuntimeError as e:  # shapes the structure above did not show
            raise ModelError(f"the lean decoder cannot run this {model.config.model_type} model: {e}") from e
        off = ((got - want).norm() / want.norm()).item()
        # bf16 rounds, and ggml rounds activations to 8 bits, in other places than transformers' forward: a
        # few 1e-3 (measured up to 9e-3 on SmolLM2); a part the decoder misses moves the logits by ~1.
        packed = any(isinstance(m, PackedLinear) for m in model.modules())
        tolerance = 1e-3 if self.dtype == torch.float32 and not packed else 2**-4
        if not off <= tolerance:
            raise ModelError(
                f"the lean decoder does not compute this {model.config.model_type} model as transformers "
                f"does ({off:.1e} off its logits, tolerance {tolerance:.0e}): it has parts the decoder "
                "does not know"
            )

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [vocab] of the last of `tokens` ([T] ids at positions pos..pos+T-1), caching their keys
        and values. Several tokens at once only from position 0 (the prompt)."""
        t = tokens.shape[0]
        if t > 1 and pos != 0:
            raise ValueError("several tokens at once only from position 0")
        if pos + t > self.max_len:
            raise ModelError(f"the sequence would exceed the decoder's {self.max_len} positions")
        # RoPE of each position as one [head_dim, head_dim] matrix, built once for all blocks: x·cos +
        # (x R)·sin = x (diag(cos) + R diag(sin)), each output one sum of two products as before. Transposed,
        # as ggml takes it: the rows of (diag(cos) + R diag(sin))ᵀ = diag(cos) + diag(sin) Rᵀ.
        cos, sin = self.cos[pos : pos + t], self.sin[pos : pos + t]
        rope_t = torch.diag_embed(cos) + sin[:, :, None] * self.rotate_half_t  # [T, hd, hd]
        end = pos + t
        x = self.embed(tokens)  # [T, hidden]: no batch dim, fewer ops per layer
        for b, (k_cache, v_cache) in zip(self.blocks, self.caches, strict=True):
            q = b.attn_in(x, rope_t, k_cache[pos:end], v_cache[pos:end])
            x = b.rest(x, self._attend(q, k_cache[:end], v_cache[:end]))
        return self.head(x[-1:])[0]  # 2-D: packed layers take it as it is

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the T queries q [T, heads · hd] (the last T positions) to the keys and values
        k, v [end, kv_heads · hd]; heads side by side [T, heads · hd]. A query's heads share a key head in
        groups (GQA), as in Hugging Face's repeat_kv."""
        t, end, heads, kv_heads, hd = q.shape[0], k.shape[0], self.heads, self.kv_heads, self.head_dim
        if t > 1:
            a = F.scaled_dot_product_attention(
                *(z.view(z.shape[0], -1, hd).transpose(0, 1) for z in (q, k, v)),
                is_causal=True,
                enable_gqa=True,
            )
            return a.transpose(0, 1).reshape(t, heads * hd)
        # One query: 3 small ops in place of SDPA's ~30 µs. Softmax in fp32, as transformers' eager attention.
        scores = torch.bmm(
            q.view(kv_heads, heads // kv_heads, hd), k.view(end, kv_heads, hd).permute(1, 2, 0)
        )
        p = torch.softmax(scores.float() * hd**-0.5, -1).to(v.dtype)
        return torch.bmm(p, v.view(end, kv_heads, hd).transpose(0, 1)).view(1, heads * hd)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop: int | None = None) -> Generation:
        """Greedy continuation of `prompt_ids`; stops early after the `stop` token."""
        if not prompt_ids:
            raise ModelError("the prompt is empty: give at least one token to continue")
        with self.cores():
            start = time.perf_counter()
            token = int(self.forward(torch.tensor(prompt_ids), 0).argmax())
            first = time.perf_counter()
            tokens, pos = [token], len(prompt_ids)
            while len(tokens) < max_new_tokens and token != stop:
                token = int(self.forward(torch.tensor([token]), pos).argmax())
                tokens.append(token)
                pos += 1
            return Generation(tokens, first - start, time.perf_counter() - first)


def _rotate_half_matrix(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """R with x R = rotate_half(x) = (-x₂, x₁) for halves x₁, x₂: Hugging Face's RoPE,
    x·cos + rotate_half(x)·sin, becomes x·cos + (x R)·sin, each entry of x R one of x's times ±1, exactly."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim, dtype=dtype)
    r[torch.arange(half) + half, torch.arange(half)] = -1
    r[torch.arange(half), torch.arange(half) + half] = 1
    return r


def _torch_block(b: Block, layer: nn.Module, heads: int, kv_heads: int, hd: int) -> LeanBlock:
    """The block on its own modules, q/k/v and gate/up joined (join_linears), RMSNorm as one fused op."""
    norm1, qkv = _fused_norm(b.attn.norm), join_linears(list(b.attn.linears.values()))
    o, norm2, down = b.attn_out[1], _fused_norm(b.mlp.norm), b.mlp_out[1]
    gate_up = join_linears(list(b.mlp.linears.values()))
    act = F.silu if _is_silu(layer.mlp.act_fn) else layer.mlp.act_fn

    def attn_in(x, rope_t, k_rows, v_rows):
        t, q_width = x.shape[0], heads * hd
        y = qkv(norm1(x))
        qk = y[:, : q_width + kv_heads * hd].view(t, heads + kv_heads, hd) @ rope_t.mT  # q and k: 1 op
        k_rows.view(t, kv_heads, hd).copy_(qk[:, heads:])
        v_rows.copy_(y[:, q_width + kv_heads * hd :])
        return qk[:, :heads].reshape(t, q_width)

    def rest(x, a):
        x = x + o(a)
        g, u = gate_up(norm2(x)).chunk(2, -1)
        return x + down(act(g) * u)

    return LeanBlock(attn_in, rest)


def _torch_head(norm: nn.Module, lm_head: nn.Module) -> Callable:
    final_norm = _fused_norm(norm)
    return lambda x: lm_head(final_norm(x))


def _ggml_block(b: Block, layer: nn.Module, heads: int, kv_heads: int, hd: int) -> LeanBlock | None:
    """The block as two ggml graphs, or None if it has a part they do not compute (a layer not on ggml,
    hooks, a norm other than RMSNorm, an activation other than SiLU)."""
    (q, k, v), (gate, up) = b.attn.linears.values(), b.mlp.linears.values()
    o, down = b.attn_out[1], b.mlp_out[1]
    norm1, norm2 = _rms_norm_gain(b.attn.norm), _rms_norm_gain(b.mlp.norm)
    layers = (q, k, v, o, gate, up, down)
    if not (all(map(_on_ggml, layers)) and norm1 and norm2 and _is_silu(layer.mlp.act_fn)):
        return None

    def attn_in(g, x, rope_t):
        h, rope = g.rms_norm(x, *norm1), g.rows_of(rope_t, hd, hd)  # rope: [T, hd, hd] per position
        q_rope = g.matmul(rope, g.rows_of(_linear(g, q, h), heads, hd))  # each head @ ropeᵀᵀ = @ rope
        k_rope = g.matmul(rope, g.rows_of(_linear(g, k, h), kv_heads, hd))
        return [q_rope, k_rope, _linear(g, v, h)]

    def rest(g, x, a):
        x = g.add(x, _linear(g, o, a))
        h = g.rms_norm(x, *norm2)
        return [g.add(x, _linear(g, down, g.swiglu(_linear(g, gate, h), _linear(g, up, h))))]

    hidden = q.in_features
    qkv = GGMLFunction([hidden, hd * hd], q.out_features + k.out_features + v.out_features, attn_in)

    def attn_in_call(x, rope_t, k_rows, v_rows):
        q_rope = torch.empty(x.shape[0], heads * hd)
        qkv(x, rope_t.view(-1, hd * hd), out=[q_rope, k_rows, v_rows])
        return q_rope

    return LeanBlock(attn_in_call, GGMLFunction([hidden, o.in_features], hidden, rest))


def _ggml_head(norm: nn.Module, lm_head: nn.Module) -> Callable | None:
    gain = _rms_norm_gain(norm)
    if not (gain and _on_ggml(lm_head)):
        return None
    return GGMLFunction(
        [lm_head.in_features], lm_head.out_features, lambda g, x: [_linear(g, lm_head, g.rms_norm(x, *gain))]
    )


def _on_ggml(layer: nn.Module) -> bool:
    """A GGMLLinear of one weight, without hooks: what the graphs compute in its place."""
    return (
        isinstance(layer, GGMLLinear)
        and len(layer.product.matrices) == 1
        and not (layer._forward_hooks or layer._forward_pre_hooks)
    )


def _is_silu(act: nn.Module) -> bool:
    """torch's SiLU or transformers' (its module for hidden_act "silu"), hooks on neither."""
    kinds = (nn.SiLU, SiLUActivation)
    return isinstance(act, kinds) and not (act._forward_hooks or act._forward_pre_hooks)


def _linear(g, layer: GGMLLinear, x):
    return g.matmul(layer.product.matrices[0], x, layer.bias)


def _rms_norm_gain(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(gain, eps) of Hugging Face's Llama-style RMSNorm, x / sqrt(mean(x²) + eps) · gain, without hooks;
    None for any other norm."""
    if (
        type(norm).__name__.endswith("RMSNorm")
        and hasattr(norm, "variance_epsilon")
        and not norm._forward_hooks
    ):
        return norm.weight, norm.variance_epsilon
    return None


def _fused_norm(norm: nn.Module):
    """Hugging Face's RMSNorm as one fused op (it runs seven small ones); any other norm as it is."""
    gain = _rms_norm_gain(norm)
    if gain is None:
        return norm
    return functools.partial(F.rms_norm, normalized_shape=gain[0].shape, weight=gain[0], eps=gain[1])
