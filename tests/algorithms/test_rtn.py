"""Format.quantize's `scales` override and the MSE clipping search built on it."""

import pytest
import torch

from lighten import formats
from lighten.algorithms.rtn import clipped_quantize, group_sq_error, mse_clip_quantize
from lighten.errors import LightenError, SpecError
from lighten.formats import QuantizedTensor
from lighten.formats.spec import GGML

SPECS = ["int4:g32", "int3:g32:asym", "int8", "int4:g48", "fp4_e2m1", "mxfp4", "nf4", "fp8_e4m3", "ternary"]


def _weights(seed=0, shape=(16, 100)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


GRAMMAR_FORMATS = [f for f in formats.list_formats() if f.family not in GGML]  # GGUF types take no scales=


@pytest.mark.parametrize("fmt", GRAMMAR_FORMATS + [formats.get("int3:g32:asym")], ids=lambda f: f.name)
def test_own_scales_reproduce_quantize(fmt):
    w = _weights()
    q = fmt.quantize(w)
    again = fmt.quantize(w, scales=q.scale_buffers())
    assert all(torch.equal(again.tensors[n], t) for n, t in q.tensors.items())


def test_scales_override_saturates_and_checks_layout():
    fmt, w = formats.get("int4:channel"), _weights()
    half = w.abs().amax(1, keepdim=True) / 2
    q = fmt.quantize(w, scales=fmt.quantize(w / 2).scale_buffers())  # half the scale: the top half clips
    assert (q.dequantize() - w.clamp(-half, half)).abs().max() <= half.max() / 7 / 2 * 1.002
    with pytest.raises(SpecError, match="scales"):
        fmt.quantize(w, scales=fmt.quantize(w[:8]).scale_buffers())


@pytest.mark.parametrize("spec", SPECS)
def test_mse_clip_never_worse_than_rtn_per_group(spec):
    fmt, w = formats.get(spec), _weights(1)
    q = mse_clip_quantize(w, fmt)
    rtn = fmt.quantize(w)
    QuantizedTensor.from_tensors(q.spec, q.shape, q.tensors)  # a valid tensor of the format
    assert (group_sq_error(w, q.dequantize(), fmt) <= group_sq_error(w, rtn.dequantize(), fmt)).all()


def test_mse_clip_refuses_gguf_block_types():
    with pytest.raises(LightenError, match="use algorithm imatrix, gptq, rtn or awq"):
        mse_clip_quantize(torch.randn(4, 64), formats.get("q8_0"))


def test_mse_clip_shrinks_an_outlier_group():
    fmt = formats.get("int4:g32")
    w = _weights(2, (4, 64))
    w[1, 5] = 4.0  # an outlier in group (1, 0): absmax scaling would spend most of the grid on it
    q, rtn = mse_clip_quantize(w, fmt), fmt.quantize(w)
    assert q.tensors["scales"][1, 0] < rtn.tensors["scales"][1, 0]
    err, rtn_err = group_sq_error(w, q.dequantize(), fmt), group_sq_error(w, rtn.dequantize(), fmt)
    assert err[1, 0] < rtn_err[1, 0]


def test_clip_ratio_one_is_rtn():
    fmt, w = formats.get("int3:g32:asym"), _weights(3)
    q, rtn = clipped_quantize(w, fmt, torch.ones(16, 4)), fmt.quantize(w)
    assert all(torch.equal(q.tensors[n], t) for n, t in rtn.tensors.items())
