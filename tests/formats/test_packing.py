import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lighten.formats.packing import pack_bits, pack_trits, unpack_bits, unpack_trits


def reference_pack(codes, bits):
    """Oracle: the little-endian bitstream as one Python integer, cut into bytes."""
    stream = sum(c << (bits * i) for i, c in enumerate(codes))
    return list(stream.to_bytes((len(codes) * bits + 7) // 8, "little"))


@st.composite
def bits_and_codes(draw):
    bits = draw(st.integers(1, 8))
    return bits, draw(st.lists(st.integers(0, 2**bits - 1), max_size=300))


@settings(max_examples=100, deadline=None)
@given(bits_and_codes())
def test_pack_matches_reference_and_round_trips(bits_codes):
    bits, codes = bits_codes
    c = torch.tensor(codes, dtype=torch.uint8)
    buf = pack_bits(c, bits)
    assert buf.dtype == torch.uint8 and buf.tolist() == reference_pack(codes, bits)
    assert torch.equal(unpack_bits(buf, bits, len(codes)), c)


def test_bit_order_by_hand():
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]  # low nibble first
    # 3 bits: 001 | 010 << 3 | 111 << 6 = 0b1_1101_0001 -> bytes 0xD1, 0x01
    assert pack_bits(torch.tensor([1, 2, 7], dtype=torch.uint8), 3).tolist() == [0xD1, 0x01]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0x0D, 0x01]


def test_every_width_every_length():
    for bits in range(1, 9):
        for n in range(20):
            c = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
            buf = pack_bits(c, bits)
            assert buf.numel() == (n * bits + 7) // 8
            assert torch.equal(unpack_bits(buf, bits, n), c)


def test_trits_by_hand():
    assert pack_trits(torch.tensor([2, 0, 1, 0, 0], dtype=torch.uint8)).tolist() == [2 + 9]
    assert pack_trits(torch.tensor([2] * 5 + [1], dtype=torch.uint8)).tolist() == [242, 1]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2), max_size=300))
def test_trits_round_trip(trits):
    t = torch.tensor(trits, dtype=torch.uint8)
    buf = pack_trits(t)
    assert buf.numel() == (len(trits) + 4) // 5
    assert buf.tolist() == [
        sum(d * 3**i for i, d in enumerate(trits[j : j + 5])) for j in range(0, len(trits), 5)
    ]
    assert torch.equal(unpack_trits(buf, len(trits)), t)
