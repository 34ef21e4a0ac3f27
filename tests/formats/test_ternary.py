"""BitNet b1.58 ternary and sign binary, worked by hand."""

import torch

from lighten.formats import get
from lighten.formats.packing import unpack_trits

G = 0.89990234375  # fp16(0.9), the nearest fp16 (absmean scales round to nearest)


def test_ternary_by_hand():
    # gamma = mean |W| = (0.5 + 1 + 0.1 + 2) / 4 = 0.9; W / gamma = 0.56, -1.11, 0.11, 2.22
    # -> round, clip: 1, -1, 0, 1 -> trits (code + 1) 2, 0, 1, 2 -> byte 2 + 0 + 9 + 54
    w = torch.tensor([[0.5, -1.0], [0.1, 2.0]])
    q = get("ternary").quantize(w)
    assert q.spec == "ternary:tensor"
    assert q.tensors["scales"].tolist() == [[G]]
    assert q.tensors["codes"].tolist() == [65]
    assert q.dequantize().tolist() == [[G, -G], [0.0, G]]


def test_ternary_per_channel_and_packing():
    w = torch.tensor([[0.5, -1.0, 0.1, 2.0, 0.0, 0.0], [3.0, -3.0, 3.0, 1.0, 1.0, 1.0]])
    q = get("ternary:channel").quantize(w)
    # row 0: mean 0.6 -> 0.5/0.6 = 0.83 -> 1, 0.1/0.6 -> 0, 2/0.6 -> 1
    # row 1: mean 2 -> 1.5 ties to 2 -> 1, 0.5 ties to 0
    assert unpack_trits(q.tensors["codes"], 12).tolist() == [2, 0, 1, 2, 1, 1, 2, 0, 2, 1, 1, 1]
    assert q.tensors["codes"].numel() == 3  # 12 trits, 5 per byte
    assert get("ternary").bits_per_element == 1.6


def test_binary_by_hand():
    # mean |W| = (0.5 + 1 + 0 + 2) / 4 = 0.875 (exact in fp16); sign(0) = +1; bit 1 = negative
    q = get("binary").quantize(torch.tensor([[0.5, -1.0, 0.0, 2.0]]))
    assert q.spec == "binary:channel" and q.tensors["codes"].tolist() == [0b0010]
    assert q.dequantize().tolist() == [[0.875, -0.875, 0.875, 0.875]]
