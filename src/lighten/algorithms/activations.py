"""What calibration text puts into each layer: per-channel input statistics, streamed over token windows.

Hooks read the input of every Linear / Conv1D (or of any named module, e.g. a norm, whose input is the
residual stream) and fold each window into running statistics, so memory does not grow with n_tokens:

    stats = collect_input_stats(model, tokenizer, wiki_texts("calibration"))
    stats["model.layers.0.self_attn.q_proj"].absmax     # [in_features]: SmoothQuant's activation scale
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten.errors import DataError
from lighten.progress import track

# LLM.int8(): a feature with |x| >= 6 in any token is an outlier; its columns go through the fp16 matmul.
OUTLIER_THRESHOLD = 6.0


@dataclass
class InputStats:
    """Running statistics of one module's input, per input channel unless noted. Start from `empty`, feed
    [tokens, channels] batches to `update`."""

    absmax: torch.Tensor  # max |x|: SmoothQuant's activation scale
    min: torch.Tensor  # min and max: OS+ shifts each channel by -(min + max) / 2
    max: torch.Tensor
    abs_sum: torch.Tensor  # float64, for mean_abs (AWQ's channel saliency)
    sq_sum: torch.Tensor  # float64, for mean_sq (the diagonal of X^T X / n)
    outlier_tokens: torch.Tensor  # how many tokens have |x| > threshold in this channel
    token_absmax: torch.Tensor  # [n_tokens]: max |x| over the channels of each token
    sample: torch.Tensor  # [<= samples, channels]: every `sample_every`-th token, for error estimates
    threshold: float
    sample_every: int  # 0: keep no sample
    n_tokens: int = 0
    # Central moments of all values (tokens x channels), merged batch by batch (Chan et al. / Pebay):
    # raw power sums would cancel catastrophically once massive activations (|x| ~ 1e3) reach the 4th power.
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    @classmethod
    def empty(
        cls, channels: int, threshold: float = OUTLIER_THRESHOLD, sample_every: int = 0
    ) -> "InputStats":
        inf = torch.full((channels,), math.inf)
        zeros64 = torch.zeros(channels, dtype=torch.float64)
        return cls(
            torch.zeros(channels),
            inf,
            -inf,
            zeros64,
            zeros64.clone(),
            torch.zeros(channels, dtype=torch.int64),
            torch.empty(0),
            torch.empty(0, channels),
            threshold,
            sample_every,
        )

    def update(self, x: torch.Tensor) -> None:
        """Fold in a [tokens, channels] float32 batch."""
        a = x.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(0))
        self.min = torch.minimum(self.min, x.amin(0))
        self.max = torch.maximum(self.max, x.amax(0))
        self.abs_sum += a.sum(0, dtype=torch.float64)
        xd = x.double()
        self.sq_sum += xd.square().sum(0)
        self.outlier_tokens += (a > self.threshold).sum(0)
        self.token_absmax = torch.cat([self.token_absmax, a.amax(1)])
        if self.sample_every:
            rows = torch.arange(self.n_tokens, self.n_tokens + len(x)) % self.sample_every == 0
            self.sample = torch.cat([self.sample, x[rows]])
        self._merge_moments(xd.flatten(), self.n_tokens * x.shape[1])
        self.n_tokens += len(x)

    def _merge_moments(self, v: torch.Tensor, na: int) -> None:
        nb, mb = v.numel(), v.mean().item()
        d = v - mb
        d2 = d * d
        m2b, m3b, m4b = d2.sum().item(), (d2 * d).sum().item(), (d2 * d2).sum().item()
        n, delta = na + nb, mb - self.mean
        # Each line uses the moments of lower order from *before* this batch, hence the order m4, m3, m2.
        self.m4 += (
            m4b
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * m2b + nb * nb * self.m2) / n**2
            + 4 * delta * (na * m3b - nb * self.m3) / n
        )
        self.m3 += m3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * m2b - nb * self.m2) / n
        self.m2 += m2b + delta**2 * na * nb / n
        self.mean += delta * nb / n

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / self.n_tokens).float()

    @property
    def mean_sq(self) -> torch.Tensor:
        return (self.sq_sum / self.n_tokens).float()

    @property
    def kurtosis(self) -> float:
        """Excess kurtosis of all values: 0 for a Gaussian, large when a few channels or tokens dominate."""
        n = self.n_tokens * len(self.absmax)
        return n * self.m4 / self.m2**2 - 3 if self.m2 > 0 else 0.0


def token_windows(tokenizer, texts: list[str], n_tokens: int, context: int) -> list[torch.Tensor]:
    """The first `n_tokens` tokens of the joined texts, cut into windows of at most `context` tokens, each
    framed with the special tokens the tokenizer puts around any text (BERT's [CLS] ... [SEP]): an encoder
    always sees them in real use, and its outliers famously sit on them."""
    prefix, suffix = _framing(tokenizer)
    body = context - len(prefix) - len(suffix)
    if n_tokens < 1:
        raise DataError(f"n_tokens must be at least 1, got {n_tokens}")
    if body < 1:
        raise DataError(f"context ({context}) must exceed the {len(prefix) + len(suffix)} special tokens")
    # Tokenize only as many texts as needed (doubling): the calibration corpus is ~9,000 articles.
    k = 1
    while True:
        ids = tokenizer("\n\n".join(texts[:k]), add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > n_tokens or k >= len(texts):
            break
        k *= 2
    if len(ids) < n_tokens:
        raise DataError(
            f"the text has only {len(ids)} tokens, fewer than n_tokens={n_tokens}: "
            "pass a longer text or ask for fewer tokens"
        )
    ids = ids[:n_tokens]
    return [torch.tensor(prefix + ids[i : i + body] + suffix) for i in range(0, n_tokens, body)]


def _framing(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special tokens the tokenizer adds before and after a text."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a")["input_ids"]
    start = next(i for i in range(len(framed)) if framed[i : i + len(bare)] == bare)
    return framed[:start], framed[start + len(bare) :]


@torch.inference_mode()
def collect_input_stats(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    n_tokens: int = 2048,
    context: int = 512,
    names: list[str] | None = None,
    threshold: float = OUTLIER_THRESHOLD,
    samples: int = 0,
) -> dict[str, InputStats]:
    """Input statistics of every Linear / Conv1D (or of the modules `names`), keyed by module name, over the
    first `n_tokens` tokens of `texts` (see token_windows). `samples` > 0 also keeps about that many evenly
    spaced token rows of each input. A module called twice per forward counts both calls."""
    windows = token_windows(tokenizer, texts, n_tokens, context)
    return window_input_stats(model, windows, names, threshold, samples)


def window_input_stats(
    model: nn.Module,
    windows: list[torch.Tensor],
    names: list[str] | None = None,
    threshold: float = OUTLIER_THRESHOLD,
    samples: int = 0,
) -> dict[str, InputStats]:
    """collect_input_stats over token windows given as [tokens] id tensors."""
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    names = list(dict.fromkeys(names))  # a second hook on the same module would count every token twice
    every = math.ceil(sum(map(len, windows)) / samples) if samples else 0
    stats: dict[str, InputStats] = {}

    def hook(name: str):
        def record(module, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            if name not in stats:
                stats[name] = InputStats.empty(x.shape[1], threshold, every)
            stats[name].update(x)

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    model.eval()
    try:
        for window in track(windows, "activation statistics"):
            model(input_ids=window[None])
    finally:
        for h in handles:
            h.remove()
    return stats
