"""Per-token norms against values worked by hand."""

import pytest
import torch
from torch import nn

from lighten.norms import CRMSNorm, DepthScaled, SingleScaleRMSNorm


def test_crmsnorm_is_rmsnorm_of_the_zero_mean_vector_it_stands_for():
    # [1, -1, 2] stands for [1, -1, 2, -2]: mean square (1 + 1 + 4 + 4) / 4 = 2.5
    out = CRMSNorm(4, eps=0.0)(torch.tensor([1.0, -1.0, 2.0]))
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, 2.0]) / 2.5**0.5)
    full = nn.RMSNorm(4, eps=0.0)(torch.tensor([1.0, -1.0, 2.0, -2.0]))
    torch.testing.assert_close(out, full[:3])


def test_single_scale_rmsnorm_has_one_gain():
    norm = SingleScaleRMSNorm(2, eps=0.0)
    assert norm.weight.shape == (1,)
    with torch.no_grad():
        norm.weight.fill_(2.0)
    # rms([3, 4]) = sqrt(12.5) = 3.5355...
    torch.testing.assert_close(norm(torch.tensor([3.0, 4.0])), torch.tensor([1.6970563, 2.2627417]))


def test_depth_scaled_divides_by_the_root_of_the_layer_number():
    # LayerNorm([1, 2, 3]) = [-1.2247, 0, 1.2247]; layer 4 divides by 2
    out = DepthScaled(nn.LayerNorm(3, eps=0.0), depth=4)(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(out, torch.tensor([-0.6123724, 0.0, 0.6123724]))
    with pytest.raises(ValueError, match="counted from 1"):
        DepthScaled(nn.LayerNorm(3), depth=0)
