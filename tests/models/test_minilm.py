import pytest
import torch

pytestmark = pytest.mark.real


def embed(minilm, sentences: list[str]) -> torch.Tensor:
    """Sentence-transformers' recipe for this model: mean over real tokens, then L2 norm."""
    model, tokenizer = minilm
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch.attention_mask[..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_similarities(minilm):
    assert type(minilm[0]).__name__ == "BertModel"
    food, meal, stocks = embed(
        minilm, ["A man is eating food.", "Someone is having a meal.", "The stock market crashed."]
    )
    assert abs(food @ meal - 0.689) < 0.01
    assert abs(food @ stocks) < 0.05
