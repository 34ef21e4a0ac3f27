"""Pre-RMSNorm: a pre-LN transformer whose residual stream is always zero-mean computes the same function
with RMSNorm in place of LayerNorm (Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers", 2023), and
with the compressed CRMSNorm on d-1 channels (Pre-CRMSNorm).

LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) and var(x) = mean(x²) - mean(x)², so for mean(x) = 0 it is
exactly x / sqrt(mean(x²) + eps), RMSNorm with the same eps. The residual stream is a sum of the embeddings
and every block's output projection; centering each of those along the hidden dim makes every sum zero-mean.
Only the norms ever read the residual, and they discard its mean anyway, so centering changes nothing else.
"""

import torch
from torch import nn

from lighten.errors import ModelError
from lighten.models.arch import model_view, norm_groups, weight_out_in
from lighten.norms.token import CRMSNorm
from lighten.surgery.fold import pre_norm_view, require_folded


def layernorm_to_rmsnorm(model: nn.Module) -> nn.Module:
    """Center every writer of the residual stream (embeddings, attention and MLP output projections, incl.
    biases) and replace each LayerNorm by torch.nn.RMSNorm (same eps, weight 1). Needs folded norms
    (fold_norm_affine first): RMSNorm has no β to keep LayerNorm's."""
    view = pre_norm_view(model, "replace by RMSNorm the LayerNorms of")
    norms = [g.norm for g in norm_groups(view)]
    if not all(isinstance(n, nn.LayerNorm) for n in norms):
        raise ModelError(f"{type(model).__name__} already uses RMSNorm; there is no LayerNorm to replace")
    require_folded(view, "layernorm_to_rmsnorm")
    with torch.no_grad():
        for embedding in view.embeddings.values():
            embedding.weight -= embedding.weight.mean(dim=1, keepdim=True)
        for block in view.blocks:
            for _, writer in (block.attn_out, block.mlp_out):
                w = weight_out_in(writer)
                w -= w.mean(dim=0, keepdim=True)
                if writer.bias is not None:
                    writer.bias -= writer.bias.mean()
    for group in norm_groups(view):
        ln = group.norm
        rms = nn.RMSNorm(ln.normalized_shape, eps=ln.eps, device=ln.weight.device, dtype=ln.weight.dtype)
        parent, _, child = group.name.rpartition(".")
        setattr(model.get_submodule(parent), child, rms)
    return model


def compress_rmsnorm(model: nn.Module) -> nn.Module:
    """Pre-CRMSNorm: a zero-mean residual stream carries d-1 numbers of information, so store only its first
    d-1 channels. Writers (embeddings, c_proj) drop their last output channel; readers (c_attn, c_fc, lm_head)
    fold the dropped input in, W' = W[:, :d-1] - W[:, d-1], since x_d = -Σx; norms become CRMSNorm.

    GPT-2 after layernorm_to_rmsnorm only. The result lives in memory: config.n_embd still says d, so
    save_pretrained/from_pretrained cannot rebuild it. CRMSNorm has no gain, so the norms must be folded
    (no smoothing before) and stay so (none after); nor can a rotation follow (it keeps d-vector norms)."""
    view = model_view(model)
    norms = [g.norm for g in norm_groups(view)]
    writers = [t.weight for t in view.embeddings.values()]
    writers += [weight_out_in(w).T for b in view.blocks for _, w in (b.attn_out, b.mlp_out)]
    zero_mean = all(w.mean(1).abs().max() <= 1e-5 * w.abs().max() for w in writers)  # a rotation undoes it
    if view.family != "gpt2" or not all(type(n) is nn.RMSNorm for n in norms) or not zero_mean:
        raise ModelError(
            "compress_rmsnorm needs a zero-mean residual: GPT-2 after layernorm_to_rmsnorm, not rotated"
        )
    require_folded(view, "compress_rmsnorm")
    with torch.no_grad():
        for table in view.embeddings.values():
            table.weight = nn.Parameter(table.weight[:, :-1].contiguous())
            table.embedding_dim -= 1
        for block in view.blocks:
            for _, writer in (block.attn_out, block.mlp_out):  # Conv1D: weight [in, out]
                writer.weight = nn.Parameter(writer.weight[:, :-1].contiguous())
                writer.bias = nn.Parameter(writer.bias[:-1].contiguous())
                writer.nf -= 1
        for group in norm_groups(view):
            for linear in group.linears.values():
                w = weight_out_in(linear)
                folded = w[:, :-1] - w[:, -1:]
                if isinstance(linear, nn.Linear):  # lm_head
                    linear.weight, linear.in_features = nn.Parameter(folded.contiguous()), w.shape[1] - 1
                else:  # Conv1D stores [in, out]
                    linear.weight = nn.Parameter(folded.T.contiguous())
    for group in norm_groups(view):
        parent, _, child = group.name.rpartition(".")
        setattr(model.get_submodule(parent), child, CRMSNorm(group.norm.normalized_shape[0], group.norm.eps))
    return model
