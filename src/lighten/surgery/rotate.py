"""QuaRot-style rotation of the residual stream by a random Hadamard matrix (Ashkboos et al., 2024).

For an orthogonal Q, RMSNorm(x·Q) = RMSNorm(x)·Q when the norm has no gain (‖x·Q‖ = ‖x‖), so a model whose
residual stream is x·Q instead of x computes the same outputs once every weight that touches the stream is
rewritten: writers (embeddings, o/down projections incl. biases) produce x·Q, readers (q/k/v, gate/up,
lm_head) undo it on their input side. A Hadamard Q spreads each outlier channel over all channels, which is
what makes the weights and the activations easier to quantize.

Two more rotations do not touch the residual:
- online, before each down projection: W_down ← W_down·H and the activation is multiplied by H at runtime
  (a Rotation module run by a forward pre-hook: n·(a + b + ...) extra multiply-adds per token for
  H = H_a ⊗ H_b ⊗ ..., e.g. 1536·140 for SmolLM2; it is a buffer in the state dict, but a plain Hugging Face
  class loading that checkpoint would neither run it nor complain loudly);
- per attention head: value rows ← Hᵀ·W_v and o_proj columns ← W_o·H (attention mixes tokens, never the
  channels of a head, so the head's output is rotated just like its values; free at runtime).

Without the online one (online=False, surgery step rotate_fused) every rotation lives in the weights: the
model is a plain Hugging Face model again, which any runtime (llama.cpp via GGUF, vLLM) runs unchanged. The
down projections' inputs then keep their outliers (SiLU(gate)·up is not rotated).
"""

import torch
from torch import nn

from lighten.errors import ModelError
from lighten.models.arch import norm_groups, value_proj, weight_out_in
from lighten.surgery.fold import pre_norm_view, require_folded
from lighten.surgery.hadamard import Rotation, random_rotation


def rotate_residual_hadamard(model: nn.Module, seed: int = 0, online: bool = True, heads: bool = True):
    """Rotate the residual stream by Q = H·diag(±1)/√d (seeded); with `online`, also rotate each down
    projection's input by an online Hadamard (module.input_hadamard, run by a forward pre-hook), with
    `heads`, each attention head's values. Needs an RMSNorm model (Llama family, or GPT-2 after
    layernorm_to_rmsnorm) with folded norms (fold_norm_affine first). Exact up to float rounding."""
    view = pre_norm_view(model, "rotate")
    if any(b.out_norms for b in view.blocks):
        raise ModelError(
            f"cannot rotate {type(model).__name__}: it normalizes each sub-layer's output before adding it "
            "to the residual stream (post_attention_layernorm, post_feedforward_layernorm), and that norm's "
            "per-channel gain does not commute with a rotation of the stream, so no rotation of it is exact"
        )
    if any(isinstance(g.norm, nn.LayerNorm) for g in norm_groups(view)):
        raise ModelError(
            "rotation needs RMSNorm: LayerNorm subtracts the mean of the channels, which a rotation does "
            "not preserve; run layernorm_to_rmsnorm first (--surgery fold,rmsnorm,rotate or rotate_fused)"
        )
    require_folded(view, "rotate_residual_hadamard")
    embedding = next(iter(view.embeddings.values()))
    device = embedding.weight.device
    q = random_rotation(embedding.embedding_dim, seed).to(device)
    done = set()  # storage of rotated weights: a tied lm_head *is* the embedding, which takes ·Q only once

    def rotate_input(weight: torch.Tensor, rotation: Rotation) -> None:  # [out, in] or [vocab, hidden] ← ·R
        if weight.data_ptr() not in done:
            weight.copy_(rotation(weight))
            done.add(weight.data_ptr())

    with torch.no_grad():
        for table in view.embeddings.values():
            rotate_input(table.weight, q)
        for group in norm_groups(view):
            for linear in group.linears.values():
                rotate_input(weight_out_in(linear), q)
        for block in view.blocks:
            for _, writer in (block.attn_out, block.mlp_out):
                w = weight_out_in(writer)
                w.copy_(q(w.T).T)  # Qᵀ·W = (Wᵀ·Q)ᵀ
                if writer.bias is not None:
                    writer.bias.copy_(q(writer.bias))
        if online:
            for block in view.blocks:
                _, down = block.mlp_out
                h = random_rotation(weight_out_in(down).shape[1], seed + 1).to(device)
                rotate_input(weight_out_in(down), h)
                attach_input_rotation(down, h)
        if heads:
            h = random_rotation(view.head_dim, seed + 2).to(device)
            for block in view.blocks:
                _rotate_heads(view, block, h)
    return model


def attach_input_rotation(module: nn.Module, rotation: Rotation) -> None:
    """Rotate the module's input at every forward (the online Hadamard): module.input_hadamard, whose
    buffers are saved in the state dict under "<module>.input_hadamard.*"."""
    module.input_hadamard = rotation
    module.register_forward_pre_hook(_input_hadamard)


def restore_input_rotations(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Re-attach online rotations from saved "<module>.input_hadamard.factor<i>" / ".signs" buffers, e.g. to
    a model rebuilt from its config, which knows nothing of them. A Hadamard rotation's factors are ±1 and
    its scale 1/√n; the random orthogonal fallback is one dense factor with scale 1."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in buffers.items():
        module, _, buffer = key.partition(".input_hadamard.")
        by_module.setdefault(module, {})[buffer] = t
    for module, bufs in by_module.items():
        factors = [bufs[f"factor{i}"] for i in range(len(bufs) - 1)]
        hadamard = all(bool(((f == 1) | (f == -1)).all()) for f in factors)
        n = len(bufs["signs"])
        rotation = Rotation(factors, bufs["signs"], n**-0.5 if hadamard else 1.0)
        attach_input_rotation(model.get_submodule(module), rotation)


def _input_hadamard(module: nn.Module, args: tuple) -> tuple:
    return (module.input_hadamard(args[0]), *args[1:])


def _rotate_heads(view, block, h: Rotation) -> None:
    """Values v ← v·H per head (rows of v_proj: Hᵀ·W_v, bias likewise); o_proj reads them back with W_o·H."""
    hd = view.head_dim
    v, rows = value_proj(view, block)
    w_v = weight_out_in(v)
    w_v[rows] = h(w_v[rows].unflatten(0, (-1, hd)).transpose(1, 2)).transpose(1, 2).flatten(0, 1)
    if v.bias is not None:
        v.bias[rows] = h(v.bias[rows].unflatten(0, (-1, hd))).flatten()
    w_o = weight_out_in(block.attn_out[1])
    w_o.copy_(h(w_o.unflatten(1, (-1, hd))).flatten(1, 2))
