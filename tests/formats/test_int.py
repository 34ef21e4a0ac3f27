import torch

from lighten.formats import get
from lighten.formats.packing import unpack_bits

# fp16 neighbours used below: fp16(0.1) = 0.0999755859375 < 0.1, next up 0.10003662109375;
# fp16(0.2) = 0.199951171875 < 0.2, next up 0.2000732421875. Scales round UP.
S01, S02 = 0.10003662109375, 0.2000732421875


def test_int4_sym_by_hand():
    # absmax 0.7 -> scale 0.7/7 = 0.1 -> fp16 up S01; 0.7/S01 = 6.997 -> 7, -0.35/S01 = -3.499 -> -3
    q = get("int4:g4").quantize(torch.tensor([0.7, -0.35, 0.1, 0.0]))
    assert q.tensors["scales"].tolist() == [[S01]]
    assert q.tensors["codes"].tolist() == [0xD7, 0x01]  # 7, -3 = 0b1101 (two's complement), 1, 0
    assert q.dequantize().tolist() == [7 * S01, -3 * S01, S01, 0.0]


def test_int8_channel_by_hand():
    # row 0: absmax 127 -> scale 1 exactly; 0.5 ties to even -> 0; -50 as a byte is 206.
    # row 1: absmax 2.54 -> scale 0.02 -> fp16 up 0.0200042724609375; 1.27 / it = 63.49 -> 63
    q = get("int8").quantize(torch.tensor([[127.0, -50.0, 0.5], [2.54, -1.27, 0.0]]))
    assert q.spec == "int8:channel:sym"
    assert q.tensors["scales"].tolist() == [[1.0], [0.0200042724609375]]
    assert q.tensors["codes"].tolist() == [127, 206, 0, 127, 256 - 63, 0]


def test_int4_asym_by_hand():
    # min -1, max 2 -> scale 3/15 = 0.2 -> S02; zero = round(1/S02) = round(4.998) = 5
    # codes: -1 -> 0, 0 -> 5, 2 -> 14.996 -> 15, 0.5 -> 7.499 -> 7
    q = get("int4:g4:asym").quantize(torch.tensor([-1.0, 0.0, 2.0, 0.5]))
    assert q.tensors["scales"].tolist() == [[S02]]
    assert q.tensors["zeros"].tolist() == [5]
    assert unpack_bits(q.tensors["codes"], 4, 4).tolist() == [0, 5, 15, 7]
    assert q.dequantize().tolist() == [-5 * S02, 0.0, 10 * S02, 2 * S02]


def test_asym_keeps_zero_exact_for_one_signed_groups():
    x = torch.tensor([[0.5, 1.0, 3.0, 0.0], [-4.0, -1.0, 0.0, -2.0]])
    y = get("int3:g4:asym").fake_quantize(x)
    assert y[0, 3] == 0 and y[1, 2] == 0


def test_rows_of_576_at_g128_have_a_short_last_group():
    x = torch.randn(3, 576) * 0.01
    x[1, 520] = 5.0  # inside the last group (512..575) of row 1 only
    fmt = get("int4:g128")
    q = fmt.quantize(x)
    scales = q.tensors["scales"].float()
    assert scales.shape == (3, 5)  # ceil(576 / 128): four of 128, one of 64
    assert abs(scales[1, 4].item() - 5.0 / 7) < 1e-3
    assert scales[1, :4].max() < 0.01 and scales[[0, 2], 4].max() < 0.01
    assert q.nbytes == 3 * 576 // 2 + 3 * 5 * 2
    err = (q.dequantize() - x).abs()
    assert (err <= scales.repeat_interleave(128, 1)[:, :576] / 2 * (1 + 1e-5)).all()
