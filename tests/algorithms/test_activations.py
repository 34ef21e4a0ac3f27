"""Streaming input statistics against a brute-force computation that keeps every activation."""

import pytest
import scipy.stats
import torch
from tiny_models import sample_text, tiny_model, tiny_tokenizer
from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten.algorithms.activations import InputStats, collect_input_stats, token_windows
from lighten.errors import DataError


def _all_inputs(model, windows) -> dict[str, torch.Tensor]:
    """[total tokens, in] input of every Linear / Conv1D, kept whole."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D))
    ]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None])
    for h in handles:
        h.remove()
    return {n: torch.cat(xs).float() for n, xs in seen.items()}


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_stats_match_brute_force(arch):
    model, tok, texts = tiny_model(arch), tiny_tokenizer(), [sample_text(400)]
    # A threshold the random model's inputs cross often, so the counts are not all zero.
    stats = collect_input_stats(model, tok, texts, n_tokens=300, context=64, threshold=1.0, samples=40)
    full = _all_inputs(model, token_windows(tok, texts, 300, 64))
    assert stats.keys() == full.keys()
    for name, x in full.items():
        s = stats[name]
        assert s.n_tokens == len(x)  # 300, but BERT's pooler reads one token per window
        torch.testing.assert_close(s.absmax, x.abs().amax(0))
        torch.testing.assert_close(s.min, x.amin(0))
        torch.testing.assert_close(s.max, x.amax(0))
        torch.testing.assert_close(s.mean_abs, x.abs().mean(0))
        torch.testing.assert_close(s.mean_sq, x.square().mean(0))
        torch.testing.assert_close(s.token_absmax, x.abs().amax(1))
        assert torch.equal(s.outlier_tokens, (x.abs() > 1.0).sum(0))
        assert torch.equal(s.sample, x[:: s.sample_every]) and len(s.sample) <= 40
        assert s.kurtosis == pytest.approx(scipy.stats.kurtosis(x.flatten().double().numpy()), rel=1e-6)
    assert sum(s.outlier_tokens.sum() for s in stats.values()) > 0


def test_kurtosis_merge_is_exact_with_massive_values():
    # Uneven batches, a large offset and a few huge values: the case where power sums lose all digits.
    g = torch.Generator().manual_seed(0)
    x = 1000 + torch.randn(500, 8, generator=g, dtype=torch.float64)
    x[7, 3] = 5e4
    x[300, 1] = -2e4
    s = InputStats.empty(8)
    for batch in x.split([1, 200, 37, 262]):
        s.update(batch.float())
    exact = scipy.stats.kurtosis(x.float().double().flatten().numpy())
    assert s.kurtosis == pytest.approx(exact, rel=1e-9)


def test_gaussian_has_zero_excess_kurtosis():
    s = InputStats.empty(64)
    s.update(torch.randn(4096, 64, generator=torch.Generator().manual_seed(1)))
    assert abs(s.kurtosis) < 0.05


def test_named_modules_only_and_norm_inputs():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    names = ["model.layers.0.input_layernorm", "model.layers.1.mlp.down_proj"]
    stats = collect_input_stats(model, tok, [sample_text(300)], n_tokens=100, context=50, names=names)
    assert list(stats) == names
    assert stats[names[0]].absmax.shape == (64,) and stats[names[1]].absmax.shape == (160,)
    assert stats[names[0]].sample.shape == (0, 64)  # no samples asked for


def test_windows_cover_exactly_n_tokens():
    windows = token_windows(tiny_tokenizer(), [sample_text(300)], n_tokens=130, context=50)
    assert [len(w) for w in windows] == [50, 50, 30]
    with pytest.raises(DataError, match="fewer than n_tokens"):
        token_windows(tiny_tokenizer(), ["the model"], n_tokens=10, context=50)


@pytest.mark.real
def test_encoder_windows_are_framed_like_real_inputs(minilm):
    _, tok = minilm
    windows = token_windows(tok, ["The light model was small. " * 200], n_tokens=1000, context=128)
    assert all(w[0] == tok.cls_token_id and w[-1] == tok.sep_token_id and len(w) <= 128 for w in windows)
    assert sum(len(w) - 2 for w in windows) == 1000


def test_windows_tokenize_only_the_texts_needed_yet_match_the_whole_join():
    tok, texts = tiny_tokenizer(), [sample_text(30, seed=i) for i in range(40)]
    whole = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"][:300]
    assert torch.cat(token_windows(tok, texts, n_tokens=300, context=64)).tolist() == whole
