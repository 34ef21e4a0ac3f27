"""Bit and trit packing: the byte layout of every `codes` buffer.

Bits: a little-endian bitstream. Code i occupies stream bits [i*b, (i+1)*b), its least
significant bit first, and stream bit j is bit (j % 8) of byte j // 8. So at 4 bits the
first code is the low nibble of byte 0; at 8 bits the stream is the codes themselves.
The last byte is zero-padded; a stream of n codes is ceil(n*b/8) bytes.

Trits: five ternary digits t0..t4 in {0, 1, 2} per byte, byte = t0 + 3*t1 + 9*t2 + 27*t3 + 81*t4
(3^5 = 243 <= 256, so 1.6 bits per trit instead of 2). n trits take ceil(n/5) bytes.
"""

import torch


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits, any shape, read flat) into a uint8 bitstream."""
    _check_bits(bits)
    codes = codes.reshape(-1)
    n = codes.numel()
    if 8 % bits == 0:
        # 1, 2, 4, 8 bits: whole codes per byte, so stay in uint8.
        per_byte = 8 // bits
        c = pad_to_multiple(codes, per_byte).view(-1, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        out = (c << shifts).sum(dim=1, dtype=torch.uint8)  # disjoint bits: sum == or
    else:
        # 3, 5, 6, 7 bits: 8 codes fill exactly `bits` bytes; assemble them in an int64
        # (at most 56 bits, so no sign trouble) and cut it into bytes.
        c = pad_to_multiple(codes, 8).view(-1, 8).long()
        word = (c << torch.arange(0, 8 * bits, bits)).sum(dim=1)
        out = ((word[:, None] >> torch.arange(0, 8 * bits, 8)) & 0xFF).to(torch.uint8).view(-1)
    return out[: packed_nbytes(n, bits)].contiguous()


def unpack_bits(buf: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: the first n codes of the stream, as a flat uint8 tensor."""
    _check_bits(bits)
    if buf.numel() < packed_nbytes(n, bits):
        raise ValueError(f"{buf.numel()} bytes cannot hold {n} codes of {bits} bits")
    buf = buf.reshape(-1)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        out = (buf[:, None] >> shifts) & mask
    else:
        b = pad_to_multiple(buf, bits).view(-1, bits).long()
        word = (b << torch.arange(0, 8 * bits, 8)).sum(dim=1)
        out = ((word[:, None] >> torch.arange(0, 8 * bits, bits)) & mask).to(torch.uint8)
    return out.reshape(-1)[:n].contiguous()


_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Pack uint8 trits in {0, 1, 2} (any shape, read flat), five per byte."""
    t = pad_to_multiple(trits.reshape(-1), 5).view(-1, 5)
    return (t * _POW3).sum(dim=1, dtype=torch.uint8)  # max 242: never wraps


def unpack_trits(buf: torch.Tensor, n: int) -> torch.Tensor:
    if buf.numel() < (n + 4) // 5:
        raise ValueError(f"{buf.numel()} bytes cannot hold {n} trits")
    return ((buf.reshape(-1, 1) // _POW3) % 3).reshape(-1)[:n].contiguous()


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """A flat tensor zero-padded to a multiple of `multiple` elements."""
    return torch.cat([x, x.new_zeros(-x.numel() % multiple)])


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
