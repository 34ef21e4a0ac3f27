"""Fidelity of causal LMs: perplexity on held-out text, and the KL divergence of each candidate's
next-token distribution from the reference's.

Perplexity says how well a model predicts real text. KL says how far a quantized model moved from its
original, token by token over the whole vocabulary: it needs no ground truth and sees changes that
perplexity averages away (a candidate can match the reference's perplexity while predicting differently).
Windows do not overlap, as in llama.cpp's `perplexity`, so each token costs one forward position."""

import math

import torch
import torch.nn.functional as F

from lighten.errors import DataError
from lighten.progress import track


@torch.inference_mode()
def causal_fidelity(
    reference, candidates: list, tokenizer, texts: list[str], n_tokens: int = 4096, context: int = 512
) -> dict:
    """Perplexity of `reference` and of each candidate, and each candidate's mean KL(p_ref || p_cand).

    The texts are joined with blank lines and tokenized once, without special tokens; the first `n_tokens`
    tokens are cut into non-overlapping windows of `context` tokens (the last one may be shorter). Every
    token of a window but the first is predicted from the tokens before it in the same window; both
    measures are means over all these predicted tokens."""
    if context < 2 or n_tokens < 2:
        raise DataError(f"context ({context}) and n_tokens ({n_tokens}) must both be at least 2")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < n_tokens:
        raise DataError(
            f"the text has only {len(ids)} tokens, fewer than n_tokens={n_tokens}: "
            "pass a longer text or ask for fewer tokens"
        )
    # A last window of a single token has nothing to predict.
    windows = [w for w in torch.tensor(ids[:n_tokens]).split(context) if len(w) > 1]
    for model in [reference, *candidates]:
        model.eval()
    ref_nll, nll, kl = 0.0, [0.0] * len(candidates), [0.0] * len(candidates)
    for window in track(windows, "perplexity"):
        targets = window[1:]
        # The reference runs once per window; its distribution is kept while every candidate runs.
        ref_logp = _next_token_log_probs(reference, window)
        ref_p = ref_logp.exp()
        ref_nll += F.nll_loss(ref_logp, targets, reduction="sum").item()
        for i, candidate in enumerate(candidates):
            logq = _next_token_log_probs(candidate, window)
            nll[i] += F.nll_loss(logq, targets, reduction="sum").item()
            kl[i] += (ref_p * (ref_logp - logq)).sum().item()
    n = sum(len(w) - 1 for w in windows)
    return {
        "reference": {"perplexity": math.exp(ref_nll / n)},
        "candidates": [{"perplexity": math.exp(s / n), "kl": k / n} for s, k in zip(nll, kl, strict=True)],
        "n_tokens": n_tokens,
        "context": context,
    }


def _next_token_log_probs(model, window: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities over the vocabulary of the token after each position but the last."""
    logits = model(input_ids=window[None], use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)
