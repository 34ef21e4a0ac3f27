import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from lighten.errors import DataError
from lighten.eval import causal_fidelity, eval_sentences

N_TOKENS, CONTEXT = 200, 64  # 3 full windows and a short last one


@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer):
    return minilm_tokenizer  # any real tokenizer will do; this one is installed and small


@pytest.fixture(scope="module")
def llama(tokenizer):
    """A tiny random-weight Llama over the MiniLM vocabulary."""
    return tiny_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def noisy(llama):
    model = copy.deepcopy(llama)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5 * p.std())
    return model


class LogitsOf(torch.nn.Module):
    """A causal LM whose logits are `f` of another model's logits."""

    def __init__(self, model, f):
        super().__init__()
        self.model, self.f = model, f

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.f(self.model(input_ids=input_ids, **kwargs).logits))


def token_ids(tokenizer):
    text = "\n\n".join(eval_sentences())
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:N_TOKENS])


@torch.no_grad()
def test_perplexity_matches_cross_entropy_by_hand(llama, noisy, tokenizer):
    ids = token_ids(tokenizer)
    expected = []
    for model in (llama, noisy):
        nll, count = 0.0, 0
        for start in range(0, N_TOKENS, CONTEXT):
            window = ids[start : start + CONTEXT]
            logits = model(input_ids=window[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
            count += len(window) - 1
        expected.append(math.exp(nll / count))
    got = causal_fidelity(llama, [noisy], tokenizer, eval_sentences(), n_tokens=N_TOKENS, context=CONTEXT)
    assert got["reference"]["perplexity"] == pytest.approx(expected[0], rel=1e-5)
    assert got["candidates"][0]["perplexity"] == pytest.approx(expected[1], rel=1e-5)
    assert (got["n_tokens"], got["context"]) == (N_TOKENS, CONTEXT)


def test_kl_is_zero_for_the_same_distribution(llama, tokenizer):
    torch.manual_seed(2)
    shifted = LogitsOf(llama, lambda logits: logits + 5 * torch.randn(*logits.shape[:-1], 1))
    got = causal_fidelity(
        llama, [llama, shifted], tokenizer, eval_sentences(), n_tokens=N_TOKENS, context=CONTEXT
    )
    same, shift = got["candidates"]
    assert same["kl"] == 0.0
    assert same["perplexity"] == got["reference"]["perplexity"]
    assert shift["kl"] == pytest.approx(0.0, abs=1e-6)
    assert shift["perplexity"] == pytest.approx(got["reference"]["perplexity"], rel=1e-5)


def test_uniform_model_has_perplexity_of_the_vocabulary_size(llama, tokenizer):
    uniform = LogitsOf(llama, torch.zeros_like)
    got = causal_fidelity(uniform, [], tokenizer, eval_sentences(), n_tokens=N_TOKENS, context=CONTEXT)
    assert got["reference"]["perplexity"] == pytest.approx(llama.config.vocab_size, rel=1e-5)
    assert got["candidates"] == []


@torch.no_grad()
def test_kl_matches_the_definition_by_hand(llama, noisy, tokenizer):
    window = token_ids(tokenizer)[:CONTEXT]
    p = torch.softmax(llama(input_ids=window[None]).logits[0, :-1].double(), dim=-1)
    q = torch.softmax(noisy(input_ids=window[None]).logits[0, :-1].double(), dim=-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean().item()
    got = causal_fidelity(llama, [noisy], tokenizer, eval_sentences(), n_tokens=CONTEXT, context=CONTEXT)
    assert expected > 1e-3
    assert got["candidates"][0]["kl"] == pytest.approx(expected, rel=1e-4)


def test_too_little_text(llama, tokenizer):
    with pytest.raises(DataError, match="only 5 tokens, fewer than n_tokens=4096"):
        causal_fidelity(llama, [], tokenizer, ["Not much text here."])
