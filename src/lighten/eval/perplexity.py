"""Fidelity of causal LMs: perplexity on held-out text, and the KL divergence of each candidate's
next-token distribution from the reference's.

Perplexity says how well a model predicts real text. KL says how far a quantized model moved from its
original, token by token over the whole vocabulary: it needs no ground truth and sees changes that
perplexity averages away (a candidate can match the reference's perplexity while predicting differently).
Windows do not overlap, as in llama.cpp's `perplexity`, so each token costs one forward position."""

import math
from collections.abc import Iterator, Sequence
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
        ref_nll += F.nll_loss(ref_logp, targets, reduction="sum").item()
        for i, candidate in enumerate(candidates):
            logq = _next_token_log_probs(candidate, window)
            nll[i] += F.nll_loss(logq, targets, reduction="sum").item()
            kl[i] += _kl_sum(ref_logp, logq)
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
    causal_fidelity scores a model."""
    return llamacpp_fidelity(gguf_path, windows, threads=threads)["perplexity"]


def llamacpp_fidelity(
    gguf_path: str | Path, windows: list[torch.Tensor], reference: Sequence | None = None, threads: int = 2
) -> dict:
    """{"perplexity"} of a GGUF file run by llama.cpp on `windows`; given `reference`, the reference model's
    log-probabilities of the same windows (one (len(window) - 1, vocab) array per window, e.g. what
    llamacpp_log_probs yields for its F32 GGUF), also "kl", the mean KL(p_ref || p), and "top1", the share of
    positions where both models' most likely next token is the same. Means over all predicted tokens."""
    nll = kl = agree = 0.0
    for i, (window, logq) in enumerate(
        zip(windows, llamacpp_log_probs(gguf_path, windows, threads), strict=True)
    ):
        nll += F.nll_loss(logq, window[1:], reduction="sum").item()
        if reference is not None:
            ref_logp = torch.as_tensor(reference[i])
            kl += _kl_sum(ref_logp, logq)
            agree += (ref_logp.argmax(-1) == logq.argmax(-1)).sum().item()
    n = sum(len(w) - 1 for w in windows)
    scores = {"perplexity": math.exp(nll / n)}
    return scores if reference is None else scores | {"kl": kl / n, "top1": agree / n}


def llamacpp_log_probs(
    gguf_path: str | Path, windows: list[torch.Tensor], threads: int = 2
) -> Iterator[torch.Tensor]:
    """For each window, llama.cpp's fp32 log-probabilities of the token after every position but the last:
    the window evaluated from an empty cache, as causal_fidelity runs a model."""
    from lighten.export.llamacpp import open_llama

    context = max(len(w) for w in windows)
    llm = open_llama(gguf_path, n_ctx=context, n_batch=context, n_threads=threads, logits_all=True)
    for window in track(windows, f"llama.cpp {Path(gguf_path).name}"):
        llm.reset()  # the next eval starts at position 0 and drops the cached keys and values
        llm.eval(window.tolist())
        yield F.log_softmax(torch.from_numpy(llm.scores[: len(window) - 1]).float(), dim=-1)


def _kl_sum(ref_logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p_ref || q) summed over positions, from log-probabilities."""
    return (ref_logp.exp() * (ref_logp - logq)).sum().item()


def _next_token_log_probs(model, window: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities over the vocabulary of the token after each position but the last."""
    logits = model(input_ids=window[None], use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)
