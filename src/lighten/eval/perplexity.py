"""Fidelity of causal LMs: perplexity on held-out text, and the KL divergence of each candidate's
next-token distribution from the reference's.

Perplexity says how well a model predicts real text. KL says how far a quantized model moved from its
original, token by token over the whole vocabulary: it needs no ground truth and sees changes that
perplexity averages away (a candidate can match the reference's perplexity while predicting differently).
Windows do not overlap, as in llama.cpp's `perplexity`, so each token costs one forward position."""

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lighten.errors import DataError
from lighten.progress import track


@torch.inference_mode()
def causal_fidelity(
    reference, candidates: list, tokenizer, texts: list[str], n_tokens: int = 4096, context: int = 512
) -> dict:
    """Perplexity of `reference` and of each candidate, and each candidate's mean KL(p_ref || p_cand).

    The text is cut into windows by token_windows. Every token of a window but the first is predicted from
    the tokens before it in the same window; both measures are means over all these predicted tokens."""
    windows = token_windows(tokenizer, texts, n_tokens, context)
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


def token_windows(
    tokenizer, texts: list[str], n_tokens: int = 4096, context: int = 512
) -> list[torch.Tensor]:
    """The windows causal_fidelity scores: the texts joined with blank lines, tokenized once without special
    tokens, the first `n_tokens` cut into non-overlapping windows of `context` (the last may be shorter)."""
    if context < 2 or n_tokens < 2:
        raise DataError(f"context ({context}) and n_tokens ({n_tokens}) must both be at least 2")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < n_tokens:
        raise DataError(
            f"the text has only {len(ids)} tokens, fewer than n_tokens={n_tokens}: "
            "pass a longer text or ask for fewer tokens"
        )
    # A last window of a single token has nothing to predict.
    return [w for w in torch.tensor(ids[:n_tokens]).split(context) if len(w) > 1]


def llamacpp_perplexity(gguf_path: str | Path, windows: list[torch.Tensor], threads: int = 2) -> float:
    """Perplexity of a GGUF file run by llama.cpp on `windows` (token_windows), scored exactly as
    causal_fidelity scores a model: each window evaluated from an empty cache, fp32 log-softmax of the
    logits of every position but the last against the next token."""
    from lighten.export.llamacpp import open_llama

    context = max(len(w) for w in windows)
    llm = open_llama(gguf_path, n_ctx=context, n_batch=context, n_threads=threads, logits_all=True)
    nll, n = 0.0, 0
    for window in track(windows, "llama.cpp perplexity"):
        llm.reset()  # the next eval starts at position 0 and drops the cached keys and values
        llm.eval(window.tolist())
        logits = torch.from_numpy(llm.scores[: len(window) - 1])
        nll += F.nll_loss(F.log_softmax(logits.float(), dim=-1), window[1:], reduction="sum").item()
        n += len(window) - 1
    return math.exp(nll / n)


def _next_token_log_probs(model, window: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities over the vocabulary of the token after each position but the last."""
    logits = model(input_ids=window[None], use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)
