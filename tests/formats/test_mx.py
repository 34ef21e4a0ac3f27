"""OCP Microscaling v1.0 worked by hand from the spec's rules:
shared exponent X = floor(log2(block absmax)) - emax(element), scale byte = X + 127,
element = RNE cast of v / 2^X saturating at the element max."""

import pytest
import torch

from lighten.errors import SpecError
from lighten.formats import get
from lighten.formats.packing import unpack_bits


def block(*values, n=32):
    x = torch.zeros(n)
    x[: len(values)] = torch.tensor(values)
    return x


def test_mxfp4_absmax_5():
    # floor(log2 5) - 2 = 0 -> byte 127, scale 1. 5 ties 4|6 -> 4 (even mantissa);
    # -1.25 ties 1|1.5 -> -1; 0.3 -> 0.5; 0.25 ties 0|0.5 -> 0.
    q = get("mxfp4").quantize(block(5.0, -1.25, 0.3, 0.25))
    assert q.tensors["scales"].tolist() == [[127]]
    codes = unpack_bits(q.tensors["codes"], 4, 32)[:5].tolist()
    assert codes == [0b0110, 0b1010, 0b0001, 0b0000, 0b0000]  # 4, -1, 0.5, 0, 0
    assert q.dequantize()[:5].tolist() == [4.0, -1.0, 0.5, 0.0, 0.0]


def test_mxfp4_absmax_1000_saturates():
    # floor(log2 1000) = 9, X = 9 - 2 = 7 -> byte 134; 1000 / 128 = 7.8 saturates to 6 -> 768.
    # 100 / 128 = 0.78 -> 1 -> 128.
    q = get("mxfp4").quantize(block(1000.0, -100.0))
    assert q.tensors["scales"].tolist() == [[134]]
    assert q.dequantize()[:2].tolist() == [768.0, -128.0]


def test_mxfp8_e4m3_and_e5m2():
    # e4m3: emax 8. absmax 1000 -> X = 1, byte 128; 500 saturates to 448 -> 896.
    q = get("mxfp8").quantize(block(1000.0, 3.0))
    assert q.spec == "mxfp8_e4m3:g32" and q.tensors["scales"].tolist() == [[128]]
    assert q.dequantize()[:2].tolist() == [896.0, 3.0]
    # e5m2: emax 15. absmax 1000 -> X = -6, byte 121; 1000 * 64 = 64000 saturates to 57344 -> 896.
    q = get("mxfp8_e5m2").quantize(block(1000.0))
    assert q.tensors["scales"].tolist() == [[121]]
    assert q.dequantize()[0].item() == 896.0


def test_mxfp6():
    # e3m2: emax 4. absmax 3.0 -> X = 1 - 4 = -3, byte 124; 3 * 8 = 24 exact; 0.1 * 8 = 0.8 -> 0.75.
    q = get("mxfp6_e3m2").quantize(block(3.0, 0.1))
    assert q.tensors["scales"].tolist() == [[124]]
    assert q.dequantize()[:2].tolist() == [3.0, 0.75 / 8]
    # e2m3: emax 2. absmax 3.0 -> X = -1, byte 126; 3 * 2 = 6 exact; 0.1 * 2 = 0.2 -> 0.25.
    q = get("mxfp6_e2m3").quantize(block(3.0, 0.1))
    assert q.tensors["scales"].tolist() == [[126]]
    assert q.dequantize()[:2].tolist() == [3.0, 0.125]


def test_mxint8():
    # emax 0, elements are int8 * 2^-6. absmax 1.0 -> X = 0, byte 127: 0.3 * 64 = 19.2 -> 19.
    # 1.99 * 64 = 127.36 -> 127 (never -128: the element range is symmetric).
    q = get("mxint8").quantize(block(1.0, 0.3, 1.99, -1.99))
    assert q.tensors["scales"].tolist() == [[127]]
    codes = q.tensors["codes"][:4].view(torch.int8).tolist()  # 8-bit codes are the stream
    assert codes == [64, 19, 127, -127]
    assert q.dequantize()[:4].tolist() == [1.0, 19 / 64, 127 / 64, -127 / 64]
    # absmax 3.0 -> X = 1, byte 128: -2.5 / 2 = -1.25 -> -80 -> -2.5
    q = get("mxint8").quantize(block(3.0, -2.5))
    assert q.tensors["scales"].tolist() == [[128]]
    assert q.dequantize()[:2].tolist() == [3.0, -2.5]


def test_e8m0_edges():
    # zero block -> smallest scale (byte 0, 2^-127); tiny absmax clamps to byte 0 too.
    x = torch.cat([block(), block(2.0**-140), block(2.0**127 * 1.5)])
    q = get("mxint8").quantize(x)
    assert q.tensors["scales"].tolist() == [[0, 0, 254]]  # 127 - 0 + 127 = 254 = 2^127
    assert q.dequantize()[:64].abs().max().item() == 0.0
    assert q.dequantize()[64].item() == 2.0**127 * 1.5
    q = get("mxfp8_e4m3").quantize(block(2.0**127 * 1.5))
    assert q.tensors["scales"].tolist() == [[127 - 8 + 127]]


def test_short_last_block():
    x = torch.arange(70, dtype=torch.float32)  # blocks 0..31, 32..63, 64..69
    q = get("mxint8").quantize(x)
    # absmax 31, 63, 69 -> X = 4, 5, 6; every k / 2^X is a multiple of 2^-6 below 2: exact
    assert q.tensors["scales"].tolist() == [[131, 132, 133]]
    assert torch.equal(q.dequantize(), x)


def test_fixed_block_size():
    assert get("mxfp4:g32") == get("mxfp4")
    with pytest.raises(SpecError, match="fixed blocks of 32"):
        get("mxfp4:g64")
