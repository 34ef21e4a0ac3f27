"""Packed linear layers: the weight stays in its quantized bytes and the matmul runs on a low-bit kernel.

torch's CPU low-bit kernels are fast only with bf16 activations, so every packed layer computes in bf16: it
casts its input to bf16 and its output back to the input's dtype.

    spec                              module         kernel
    int8:channel:sym                  Int8Linear     torch._weight_int8pack_mm, bf16 x int8
    int8:channel:sym, mode="w8a8"     W8A8Linear     torch._int_mm on int8 activations, one scale per token
      + outlier_threshold             W8A8Linear     the same, outlier columns in fp32 (LLM.int8())
    int4:g32/g64/g128/g256, sym/asym  Int4Linear     torch._weight_int4pack_mm_for_cpu (tinygemm layout)
    anything else                     DequantLinear  decode a block of rows via a table, matmul, next block

Every buffer is stored in an integer dtype (floating scales are reinterpreted, not converted): model.to(dtype)
casts every floating tensor of a model, and that must not round the stored scales.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from lighten import formats
from lighten.errors import LightenError
from lighten.formats import Format, QuantizedTensor, packing
from lighten.formats.elements import TERNARY
from lighten.formats.format import DQ_BLOCK

INT4_GROUPS = ("g32", "g64", "g128", "g256")  # the group sizes torch's int4 CPU kernel takes
BLOCK_ELEMENTS = 2**18  # DequantLinear decodes ~this many weights at a time: 1 MB of fp32 temporaries


class PackedLinear(nn.Module):
    """y = x W^T + b with W kept packed. A subclass packs W in __init__ and multiplies in `mm`, which gets a
    contiguous bf16 [M, k_padded] input: the input zero-padded to the K the packed weight was padded to."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None, k_padded: int):
        super().__init__()
        if len(q.shape) != 2:
            raise LightenError(f"a packed linear layer needs a 2-D [out, in] weight, got shape {q.shape}")
        self.spec = q.spec
        self.out_features, self.in_features = q.shape
        self.k_padded = k_padded
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.k_padded > self.in_features:
            y = F.pad(y, (0, self.k_padded - self.in_features))
        y = self.mm(y.contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec}"


class Int8Linear(PackedLinear):
    """int8:channel:sym: the codes are int8 bytes already, so the kernel reads the stored buffer itself."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None):
        n, k = q.shape
        # _weight_int8pack_mm reads K in steps of 8 (and crashes otherwise): pad it.
        super().__init__(q, bias, -(-k // 8) * 8)
        w = q.tensors["codes"].view(torch.int8).view(n, k)
        self.register_buffer("weight", F.pad(w, (0, self.k_padded - k)) if self.k_padded > k else w)
        self.register_buffer("scales", _frozen(q.tensors["scales"].view(n).to(torch.bfloat16)))

    def mm(self, x):
        return torch._weight_int8pack_mm(x, self.weight, self.scales.view(torch.bfloat16))


class W8A8Linear(Int8Linear):
    """int8 weights times int8 activations: each token (row of x) is quantized on the fly with its own absmax
    scale, the products accumulate exactly in int32, and one fp32 multiply applies both scales.

    With an `outlier_threshold`, LLM.int8()'s decomposition: the input columns where any |x| >= threshold
    leave the int8 product (zeroed before the per-token scales are taken) and are multiplied in fp32 with the
    same columns of the dequantized int8 weight, as bitsandbytes does in fp16."""

    def __init__(
        self, q: QuantizedTensor, bias: torch.Tensor | None = None, outlier_threshold: float | None = None
    ):
        super().__init__(q, bias)
        self.outlier_threshold = outlier_threshold

    def mm(self, x):
        x = x.float()
        w_scales = self.scales.view(torch.bfloat16).float()
        if self.outlier_threshold is None:
            return self.int8_mm(x, w_scales).to(torch.bfloat16)
        cols = (x.abs() >= self.outlier_threshold).any(0).nonzero()[:, 0]
        y = self.int8_mm(x.index_fill(1, cols, 0), w_scales)
        w = self.weight[:, cols].float() * w_scales[:, None]  # those columns of the dequantized weight
        return y.addmm_(x[:, cols], w.t()).to(torch.bfloat16)

    def int8_mm(self, x, w_scales):
        s = x.abs().amax(-1, keepdim=True) / 127
        s = torch.where(s > 0, s, 1)
        acc = torch._int_mm(torch.round(x / s).to(torch.int8), self.weight.t())
        return acc * s * w_scales

    def extra_repr(self) -> str:
        return super().extra_repr() + f", outlier_threshold={self.outlier_threshold}"


class Int4Linear(PackedLinear):
    """int4 with groups of 32..256 on torch's tinygemm CPU kernel, which decodes an unsigned code u of a group
    as (u - 8) * scale + offset, taking `scales_and_zeros` [groups, N, 2] = (scale, offset) in bf16.

    lighten's codes decode as (u - zero) * scale (sym: c * scale, i.e. u = c + 8 with zero-point 8), so
    offset = (8 - zero) * scale, which is 0 for sym. K is zero-padded to whole groups (SmolLM2's 576 at
    g128)."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None):
        fmt = formats.get(q.spec)
        n, k, _, groups = fmt.geometry(q.shape)
        self.group_size = int(fmt.granularity[1:])
        super().__init__(q, bias, groups * self.group_size)
        # tinygemm's codes are unsigned: a sym code c in [-7, 7] becomes u = c + 8, with zero-point 8.
        shift = 0 if fmt.asym else 8
        scale, zero = fmt.scale_zero(q.tensors, n, groups)
        zero = zero + shift
        # Pieces of 256 rows convert independently (the kernel's layout interleaves rows within blocks of 32
        # or 64), which keeps the int32 copy of the codes that the converter wants small.
        pieces = []
        for a in range(0, n, 256):
            b = min(a + 256, n)
            codes = packing.unpack_bits(q.tensors["codes"][a * k // 2 : (b * k + 1) // 2], 4, (b - a) * k)
            u = fmt.element.decode(codes).view(b - a, k) + shift
            # Padding columns get the row's last zero-point, the code of 0 (the padded activations are 0 too).
            u = torch.cat([u, zero[a:b, -1:].expand(b - a, self.k_padded - k)], 1)
            pieces.append(torch._convert_weight_to_int4pack_for_cpu(u.int(), 2))
        self.register_buffer("weight", torch.cat(pieces))
        sz = torch.stack([scale, (8 - zero) * scale], -1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", _frozen(sz.to(torch.bfloat16)))

    def mm(self, x):
        sz = self.scales_and_zeros.view(torch.bfloat16)
        return torch._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, sz)


class DequantLinear(PackedLinear):
    """Any format, by decoding: only the QuantizedTensor's own buffers stay resident. Each forward decodes
    `block` rows at a time (codes -> element values through a table, then the group scales) and multiplies
    them, so the extra memory is one block of weights, never the whole full-precision matrix.

    The blocks are multiplied in fp32: decoding yields fp32 anyway, and fp32 GEMM is fast on any x86 CPU
    while bf16 GEMM is fast only with AVX512-BF16 / AMX (on AVX2 it was ~15x slower at batch 32)."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__(q, bias, q.shape[1])
        self.fmt = formats.get(q.spec)
        _, _, self.g, self.groups = self.fmt.geometry(q.shape)
        if self.fmt.granularity == "tensor":  # one scale: view each row as one group of it
            self.g, self.groups = self.in_features, 1
        for name, t in q.tensors.items():
            self.register_buffer(name, _frozen(t))
        align = _row_align(self.fmt, self.in_features, self.groups)
        self.block = max(align, BLOCK_ELEMENTS // self.in_features // align * align)

    def mm(self, x):
        n = self.out_features
        x = x.float()
        blocks = (self.decode_rows(a, min(a + self.block, n)) for a in range(0, n, self.block))
        return torch.cat([F.linear(x, w) for w in blocks], -1)

    def decode_rows(self, a: int, b: int) -> torch.Tensor:
        """Rows a:b of W in fp32, exactly as q.dequantize()[a:b]; a is a multiple of self.block."""
        fmt, k, rows, groups = self.fmt, self.in_features, b - a, self.groups
        per_tensor = fmt.granularity == "tensor"
        layout = fmt.layout((self.out_features, k))
        t = {name: getattr(self, name).view(dtype) for name, (dtype, _) in layout.items()}
        bits = fmt.element.bits
        v = _decode(fmt, t["codes"][_nbytes(fmt, a * k) : _nbytes(fmt, b * k)], rows * k).view(rows, k)
        if not per_tensor:  # else the one scale (and zero-point) serves every block
            t["scales"] = t["scales"][a:b]
            if fmt.asym:
                start, end = (packing.packed_nbytes(r * groups, bits) for r in (a, b))
                t["zeros"] = t["zeros"][start:end]
            if fmt.dq:
                t["scales_scale"] = t["scales_scale"][a * groups // DQ_BLOCK : -(-b * groups // DQ_BLOCK)]
        scale, zero = fmt.scale_zero(t, 1 if per_tensor else rows, groups)
        if groups * self.g > k:  # the short last group of each row
            v = F.pad(v, (0, groups * self.g - k))
        v = v.view(rows, groups, self.g)
        if fmt.asym:
            v = v - zero[..., None]
        return (v * scale[..., None]).view(rows, -1)[:, :k]


def packed_linear(
    q: QuantizedTensor,
    bias: torch.Tensor | None = None,
    mode: str = "weight-only",
    outlier_threshold: float | None = None,
) -> PackedLinear:
    """The packed layer for a quantized [out, in] weight: the fastest kernel its spec allows (table above).
    `outlier_threshold` (w8a8 only, e.g. 6.0) turns on LLM.int8()'s fp32 outlier columns."""
    fmt = formats.get(q.spec)
    int8 = fmt.name == "int8:channel:sym"
    if mode == "w8a8":
        if not int8:
            raise LightenError(f"w8a8 needs int8:channel:sym weights, got {q.spec}; quantize with spec int8")
        return W8A8Linear(q, bias, outlier_threshold)
    if mode != "weight-only":
        raise LightenError(f"mode is 'weight-only' or 'w8a8', got {mode!r}")
    if outlier_threshold is not None:
        raise LightenError("an outlier threshold (LLM.int8()) splits int8 activations: it needs mode 'w8a8'")
    if int8:
        return Int8Linear(q, bias)
    if fmt.family == "int4" and fmt.granularity in INT4_GROUPS and q.shape[0] % 16 == 0:  # N in tiles of 16
        return Int4Linear(q, bias)
    return DequantLinear(q, bias)


# ---- helpers ------------------------------------------------------------------------------------------

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _frozen(t: torch.Tensor) -> torch.Tensor:
    """The same bytes in an integer dtype, which model.to(dtype) leaves alone."""
    return t.view(_INT[t.element_size()]) if t.is_floating_point() else t


def _nbytes(fmt: Format, n: int) -> int:
    """Bytes of the first n codes (trits go 5 to a byte)."""
    return (n + 4) // 5 if fmt.element is TERNARY else packing.packed_nbytes(n, fmt.element.bits)


def _decode(fmt: Format, packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n element values (fp32) of a packed code stream, looked up in a table."""
    el = fmt.element
    if el.bits in (4, 8):
        units = packed  # one lookup per byte unpacks and decodes it
    elif el is TERNARY:
        units = packing.unpack_trits(packed, n)
    else:
        units = packing.unpack_bits(packed, el.bits, n)
    return _decode_table(fmt).index_select(0, units.int()).view(torch.float32)[:n]


@functools.cache
def _decode_table(fmt: Format) -> torch.Tensor:
    """Element value of every code; for 4- and 8-bit codes, of every byte: a 4-bit byte's two fp32 values
    are read as one int64, because a 1-D lookup of 4- or 8-byte entries runs ~30x faster than one of rows."""
    el = fmt.element
    if el.bits not in (4, 8):
        return el.decode(torch.arange(3 if el is TERNARY else 2**el.bits, dtype=torch.uint8))
    values = el.decode(packing.unpack_bits(torch.arange(256, dtype=torch.uint8), el.bits, 256 * 8 // el.bits))
    return values.view(torch.int64 if el.bits == 4 else torch.float32)


def _row_align(fmt: Format, k: int, groups: int) -> int:
    """Fewest rows after which the codes, the packed zero-points and the nf4:dq scale blocks all start afresh
    (on a byte or block boundary), so that any multiple of it cuts every buffer by plain slicing."""
    bits = fmt.element.bits
    align = 5 // math.gcd(5, k) if fmt.element is TERNARY else 8 // math.gcd(8, k * bits)
    if fmt.granularity != "tensor" and fmt.asym:
        align = math.lcm(align, 8 // math.gcd(8, groups * bits))
    if fmt.dq:
        align = math.lcm(align, DQ_BLOCK // math.gcd(DQ_BLOCK, groups))
    return align
