"""Batch-statistic norms against values worked by hand: their forward statistics, the approximate backward
and its running statistic, the schedule of PRepBN, and what evaluation computes."""

import pytest
import torch

from lighten.errors import LightenError
from lighten.norms import NORMS, PowerNorm, PRepBN, RepBN, UnifiedNorm, make_norm
from lighten.norms.batch import _ApproxScale


def test_approximate_backward_subtracts_nu_z_and_divides_by_the_scale():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)  # two tokens, two channels
    seen = {}

    def smoothed(gz, z):
        seen.update(gz=gz, z=z)
        return torch.tensor([0.5, 0.25])

    z = _ApproxScale.apply(x, torch.tensor([1.0, 2.0]), smoothed)
    torch.testing.assert_close(z, torch.tensor([[1.0, 1.0], [3.0, 2.0]]))
    z.backward(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # row 0: ([1, 0] - [0.5, 0.25]) / [1, 2]; row 1: ([0, 1] - [1.5, 0.5]) / [1, 2]
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, -0.125], [-1.5, 0.25]]))
    torch.testing.assert_close(seen["z"], z.detach())


def test_powernorm_statistics_by_hand():
    norm = PowerNorm(2, eps=0.0)
    x = torch.tensor([[1.0, 1.0], [1.4, 0.2]], requires_grad=True)  # mean square 1 per token: kept as is
    y = norm(x)
    torch.testing.assert_close(y, x.detach())  # divided by the running ψ² = 1 of the steps before
    # ψ² ← 0.9·1 + 0.1·mean(x²) per channel, mean(x²) = [(1 + 1.96) / 2, (1 + 0.04) / 2] = [1.48, 0.52]
    torch.testing.assert_close(norm.running_phi, torch.tensor([1.048, 0.952]))
    y.backward(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    # ν ← 0·(...) + 0.1·mean(dL/dz·z) = 0.1·[(1 + 3·1.4) / 2, (2 + 4·0.2) / 2]
    torch.testing.assert_close(norm.nu, torch.tensor([0.26, 0.14]))
    second = norm(torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(second, torch.tensor([[1.048**-0.5, 0.952**-0.5]]))


def test_powernorm_warmup_uses_the_batch_and_eval_the_running_statistic():
    norm = PowerNorm(2, eps=0.0, warmup=1)
    x = torch.tensor([[1.0, 1.0], [1.4, 0.2]])
    torch.testing.assert_close(norm(x), x / torch.tensor([1.48, 0.52]).sqrt())
    norm.eval()
    with torch.no_grad():
        norm.running_phi.copy_(torch.tensor([4.0, 1.0]))
        norm.weight.copy_(torch.tensor([2.0, 3.0]))
        norm.bias.copy_(torch.tensor([1.0, -1.0]))
    # [2, 2] has rms 2 -> [1, 1] -> / sqrt([4, 1]) = [0.5, 1] -> * [2, 3] + [1, -1]
    torch.testing.assert_close(norm(torch.tensor([2.0, 2.0])), torch.tensor([2.0, 2.0]))


def test_unified_norm_geometric_mean_of_the_window_by_hand():
    norm = UnifiedNorm(1, eps=0.0, window=2)
    steps = [torch.tensor([[2.0], [2.0]]), torch.tensor([[3.0], [-3.0]]), torch.tensor([[1.0], [1.0]])]
    # mean(x²) = 4, 9, 1: the first two steps divide by their own; the third by the window's geometric
    # mean sqrt(9 · 1) = 3
    want = [
        torch.tensor([[1.0], [1.0]]),
        torch.tensor([[1.0], [-1.0]]),
        torch.tensor([[1.0], [1.0]]) / 3**0.5,
    ]
    for x, expected in zip(steps, want, strict=True):
        y = norm(x.requires_grad_())
        torch.testing.assert_close(y, expected)
        y.backward(torch.ones_like(y))
    # running: 0.9·1 + 0.1·4 = 1.3; 0.9·1.3 + 0.1·9 = 2.07; 0.9·2.07 + 0.1·3 = 2.163
    torch.testing.assert_close(norm.running_var, torch.tensor([2.163]))
    # ν: mean(dL/dz·z) = 1, 0, 1/sqrt(3); ν = 0.1; 0.09; 0.081 + 0.1·(0 + 1/sqrt(3)) / 2
    torch.testing.assert_close(norm.nu, torch.tensor([0.081 + 0.1 * 3**-0.5 / 2]))
    norm.eval()
    torch.testing.assert_close(norm(torch.tensor([[3.0]])), torch.tensor([[3.0 / 2.163**0.5]]))


def test_repbn_adds_eta_x_to_batchnorm():
    norm = RepBN(1, eps=0.0).eval()
    with torch.no_grad():
        norm.bn.running_mean.fill_(1.0)
        norm.bn.running_var.fill_(4.0)
        norm.eta.fill_(0.5)
    # (3 - 1) / 2 + 0.5 · 3
    torch.testing.assert_close(norm(torch.tensor([[3.0]])), torch.tensor([[2.5]]))


def test_prepbn_schedule_and_mixture():
    norm = PRepBN(4, warmup=2, decay=4)
    lams = []
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(7):
        norm(x)
        lams.append(norm.lam())
    assert lams == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    norm.steps.fill_(3)
    norm.eval()
    expected = 0.75 * norm.layernorm(x) + 0.25 * norm.repbn(x)
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("kind", list(NORMS))
def test_every_kind_trains_and_evaluates(kind):
    norm = make_norm(kind, 8, steps=10)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for _ in range(3):
        norm(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()
    norm.eval()
    y = norm(x)
    assert y.shape == x.shape and y.isfinite().all()


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(LightenError, match="unknown norm 'batchnorm'; known: layernorm"):
        make_norm("batchnorm", 8)
