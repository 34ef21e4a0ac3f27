"""llama.cpp's perplexity, KL and top-1 agreement of GGUF files (tiny random Llamas exported as F32): the
log-probabilities are transformers' for the same weights, and the scores are their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_bpe_tokenizer, tiny_model

from lighten.eval import llamacpp_fidelity, llamacpp_log_probs, llamacpp_perplexity
from lighten.export.gguf import export_gguf

VOCAB = 320  # the tiny BPE's 300 tokens and 20 padding rows


@pytest.fixture(scope="module")
def models():
    return [tiny_model("llama", seed=seed, vocab_size=VOCAB) for seed in (0, 1)]


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fidelity")
    return [
        export_gguf(m, tiny_bpe_tokenizer(), folder / f"{i}.gguf", "F32", pre_tokenizer="gpt-2")
        for i, m in enumerate(models)
    ]


@pytest.fixture(scope="module")
def windows():
    torch.manual_seed(0)
    return list(torch.randint(VOCAB - 20, (200,)).split(64))  # three windows of 64 and a short last one


@torch.no_grad()
def test_log_probs_are_those_of_the_same_weights_in_transformers(models, files, windows):
    got = list(llamacpp_log_probs(files[0], windows))
    assert [g.shape for g in got] == [(len(w) - 1, VOCAB) for w in windows]
    for window, logp in zip(windows, got, strict=True):
        expected = F.log_softmax(models[0](input_ids=window[None]).logits[0, :-1], dim=-1)
        torch.testing.assert_close(logp, expected, atol=1e-3, rtol=0)


def test_scores_follow_their_definitions(files, windows):
    ref, cand = (list(llamacpp_log_probs(f, windows)) for f in files)
    n = sum(len(w) - 1 for w in windows)
    nll = sum(F.nll_loss(q, w[1:], reduction="sum").item() for q, w in zip(cand, windows, strict=True))
    kl = sum((p.exp() * (p - q)).sum().item() for p, q in zip(ref, cand, strict=True))
    agree = sum((p.argmax(-1) == q.argmax(-1)).sum().item() for p, q in zip(ref, cand, strict=True))
    got = llamacpp_fidelity(files[1], windows, reference=ref)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert got["kl"] == pytest.approx(kl / n, rel=1e-6) and got["kl"] > 0.01
    assert got["top1"] == pytest.approx(agree / n) and 0 < got["top1"] < 1
    assert llamacpp_perplexity(files[1], windows) == pytest.approx(got["perplexity"], rel=1e-6)


def test_a_file_against_its_own_log_probs(files, windows):
    """The reference row of a benchmark: no divergence, full agreement; numpy arrays work as reference."""
    ref = [p.numpy() for p in llamacpp_log_probs(files[0], windows)]
    got = llamacpp_fidelity(files[0], windows, reference=ref)
    assert got["kl"] == pytest.approx(0, abs=1e-6)
    assert got["top1"] == 1
    assert set(llamacpp_fidelity(files[0], windows)) == {"perplexity"}
