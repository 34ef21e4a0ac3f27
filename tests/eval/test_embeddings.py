import copy
import math

import pytest
import scipy.stats
import torch

from lighten.errors import DataError
from lighten.eval import embed, embedding_fidelity, eval_sentences
from lighten.eval.embeddings import similarity_spearman


def unit(*degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_similarity_spearman_by_hand_and_against_scipy():
    # Pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3) of unit vectors at these angles; similarity falls with the
    # angle between them, so ranking pair angles ranks similarities (in reverse, for both sets alike).
    ref = unit(0, 10, 30, 70)  # pair angles 10 30 70 20 60 40 -> ranks 1 3 6 2 5 4
    cand = unit(0, 40, 55, 60)  # pair angles 40 55 60 15 20 5 -> ranks 4 5 6 2 3 1
    by_hand = 1 - 6 * (9 + 4 + 0 + 0 + 4 + 9) / (6 * (6**2 - 1))  # 1 - 6 sum d^2 / (n (n^2 - 1)) = 9/35
    cos = [math.cos(math.radians(a)) for a in (10, 30, 70, 20, 60, 40, 40, 55, 60, 15, 20, 5)]
    assert scipy.stats.spearmanr(cos[:6], cos[6:]).statistic == pytest.approx(by_hand)
    assert similarity_spearman(ref, cand) == pytest.approx(by_hand)
    assert similarity_spearman(ref, unit(0, 5, 15, 35)) == pytest.approx(1.0)  # same order, other angles


def test_needs_three_sentences():
    with pytest.raises(DataError, match="at least 3 sentences"):
        embedding_fidelity(None, [], None, ["One.", "Two."])


@pytest.mark.real
def test_minilm_sanity_values(minilm_model, minilm_tokenizer):
    e = embed(
        minilm_model,
        minilm_tokenizer,
        ["A man is eating food.", "Someone is having a meal.", "The stock market crashed."],
    )
    assert e.norm(dim=1) == pytest.approx([1, 1, 1])
    assert (e[0] @ e[1]).item() == pytest.approx(0.689, abs=0.01)
    assert (e[0] @ e[2]).item() == pytest.approx(0.0, abs=0.02)


@pytest.mark.real
def test_padding_does_not_change_an_embedding(minilm_model, minilm_tokenizer):
    sentences = eval_sentences()
    alone = embed(minilm_model, minilm_tokenizer, sentences[:1])
    padded = embed(minilm_model, minilm_tokenizer, sentences, batch_size=7)  # sentence 0 next to longer ones
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)


@pytest.mark.real
def test_embedding_fidelity(minilm_model, minilm_tokenizer):
    noisy = copy.deepcopy(minilm_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.1 * p.std())
    got = embedding_fidelity(minilm_model, [minilm_model, noisy], minilm_tokenizer, eval_sentences())
    same, moved = got["candidates"]
    assert got["n_sentences"] == len(eval_sentences())
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6) and same["spearman"] == 1.0
    assert 0.5 < moved["cosine"] < 0.9999 and 0.5 < moved["spearman"] < 0.9999
