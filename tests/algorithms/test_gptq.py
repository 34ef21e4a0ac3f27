"""GPTQ against round-to-nearest on layers with known answers."""

import numpy as np
import pytest
import torch

from lighten import formats
from lighten.algorithms.gptq import _block_starts, gptq_quantize_layer
from lighten.errors import LightenError
from lighten.formats import QuantizedTensor


def _layer(seed=0, out=32, k=128, tokens=600):
    """A random weight and correlated inputs X [tokens, k] (GPTQ gains most when inputs correlate)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g)
    x = torch.randn(tokens, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    return w, x, 2 * x.t() @ x / tokens


def _output_error(w, q, x):
    return (x @ (q.dequantize() - w).t()).square().sum().item()


def _same(q, r):
    return q.tensors.keys() == r.tensors.keys() and all(
        torch.equal(q.tensors[n], r.tensors[n]) for n in r.tensors
    )


SPECS = [
    "int4:g32",
    "int3:g32:asym",
    "int8",
    "int4:g48",
    "int4:tensor",
    "nf4",
    "mxfp4",
    "fp4_e2m1",
    "ternary",
]


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("spec", SPECS)
def test_identity_hessian_is_rtn(spec, act_order):
    # With uncorrelated inputs no error is worth compensating: GPTQ must reduce to plain rounding.
    fmt, (w, _, _) = formats.get(spec), _layer()
    q = gptq_quantize_layer(w, torch.eye(128), fmt, block_size=64, act_order=act_order)
    assert _same(q, fmt.quantize(w))


@pytest.mark.parametrize("spec", ["int4:g32", "int3:channel:asym", "int4:g48"])
def test_diagonal_hessian_with_act_order_is_rtn(spec):
    # The permutation must not mix up which scale a column belongs to.
    fmt, (w, _, _) = formats.get(spec), _layer()
    H = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(5)) + 0.1)
    assert _same(gptq_quantize_layer(w, H, fmt, block_size=64, act_order=True), fmt.quantize(w))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", ["int4:g32", "int3:g64:asym", "int4:channel", "nf4"])
def test_output_error_below_rtn(spec, act_order):
    fmt, (w, x, H) = formats.get(spec), _layer(1)
    q = gptq_quantize_layer(w, H, fmt, block_size=64, act_order=act_order)
    QuantizedTensor.from_tensors(q.spec, q.shape, q.tensors)
    assert _output_error(w, q, x) < 0.75 * _output_error(w, fmt.quantize(w), x)
    # The codes and scales decode to weights near the original ones (errors are spread, not wild).
    assert (q.dequantize() - w).norm() < 0.5 * w.norm()


def test_lazy_blocks_do_not_change_the_result():
    fmt, (w, x, H) = formats.get("int4:g32"), _layer(2)
    errors = [_output_error(w, gptq_quantize_layer(w, H, fmt, block_size=b), x) for b in (1, 32, 96)]
    assert max(errors) / min(errors) < 1.001


def test_dead_inputs():
    fmt, (w, x, _) = formats.get("int4:g32"), _layer(3)
    x[:, [3, 50, 51]] = 0  # inputs that never fire
    q = gptq_quantize_layer(w, 2 * x.t() @ x / len(x), fmt)
    w_hat = q.dequantize()
    assert w_hat.isfinite().all() and (w_hat[:, [3, 50, 51]] == 0).all()
    assert _output_error(w, q, x) < _output_error(w, fmt.quantize(w), x)


def test_double_quantized_scales_are_refused():
    w, _, H = _layer()
    with pytest.raises(LightenError, match="nf4"):
        gptq_quantize_layer(w, H, formats.get("nf4:dq"))
    with pytest.raises(LightenError, match="tq1_0: it has no scale search"):
        gptq_quantize_layer(torch.randn(8, 256), torch.eye(256), formats.get("tq1_0"))


GGUF = ["q4_0", "q4_1", "q5_1", "q8_0", "iq4_nl", "iq4_xs", "q3_k", "q4_k", "q6_k"]


def _gguf_layer(seed=0, out=16, k=512, tokens=1500):
    """Correlated inputs whose columns differ in scale, so that importance and compensation both matter."""
    w, x, _ = _layer(seed, out, k, tokens)
    x = x / k**0.5 * torch.exp(torch.randn(k, generator=torch.Generator().manual_seed(seed + 7)))
    return w, x, 2 * x.t() @ x / tokens


@pytest.mark.parametrize("name", GGUF)
def test_identity_hessian_rounds_each_block_into_its_own_grid(name):
    # No error worth compensating: every block is llama.cpp's search (all columns alike) on the original
    # weights, each weight rounded to the nearest value of that grid.
    fmt, w = formats.get(name), _gguf_layer()[0]
    q = gptq_quantize_layer(w, torch.eye(512), fmt, block_size=64)
    block = fmt.block_size
    blocks = [w[:, c : c + block] for c in range(0, 512, block)]
    expected = [fmt.grid(b).packed(fmt.grid(b).encode(b.numpy())) for b in blocks]
    assert np.array_equal(q.tensors["blocks"].numpy(), np.concatenate(expected, 1))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", GGUF)
def test_gguf_output_error_below_the_importance_weighted_search(name, act_order):
    fmt, (w, x, H) = formats.get(name), _gguf_layer(1)
    q = gptq_quantize_layer(w, H, fmt, act_order=act_order)
    again = QuantizedTensor.from_tensors(q.spec, q.shape, q.tensors)  # valid GGUF blocks of the right size
    assert torch.equal(again.dequantize(), q.dequantize())
    imatrix = fmt.quantize(w, importance=H.diagonal()) if name != "q8_0" else fmt.quantize(w)
    assert _output_error(w, q, x) < 0.9 * _output_error(w, imatrix, x)


@pytest.mark.parametrize(
    "k,g,block", [(200, 32, 128), (200, 48, 128), (576, 128, 128), (300, 256, 64), (90, 90, 40)]
)
def test_blocks_never_split_a_group(k, g, block):
    starts = _block_starts(k, g, block)
    ends = starts[1:] + [k]
    for c in range(0, k, g):  # each group lies in one block or starts one
        inside = any(s <= c and min(c + g, k) <= e for s, e in zip(starts, ends, strict=True))
        assert inside or c in starts
    assert max(e - s for s, e in zip(starts, ends, strict=True)) <= max(block, 1)


def test_a_failed_cholesky_retries_with_more_damping(monkeypatch):
    notes = []
    monkeypatch.setattr("lighten.algorithms.gptq.note", notes.append)
    fmt, (w, _, _) = formats.get("int4:g32"), _layer()
    H = torch.eye(128)
    H[5, 5] = -0.5  # indefinite until the damping (x mean diag ~ 0.99) exceeds 0.5: damp 1, the third retry
    q = gptq_quantize_layer(w, H, fmt)
    assert q.dequantize().isfinite().all()
    assert notes == ["GPTQ: the input Hessian was not positive definite with damp 0.01; used damp 1.0"]
    H[5, 5] = -1e4  # beyond any retry
    with pytest.raises(LightenError, match="not positive definite even with damp 10.0"):
        gptq_quantize_layer(w, H, fmt)
