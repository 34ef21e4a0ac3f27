"""Packed linear layers: the weight stays in its quantized bytes and the matmul runs on a low-bit kernel.

torch's CPU low-bit kernels are fast only with bf16 activations, so the layers on torch's kernels compute in
bf16: they cast their input to bf16 and their output back to the input's dtype. ggml's (GGMLLinear) take
fp32 activations, cast likewise.

    spec                              module         kernel
    int8:channel:sym                  Int8Linear     torch._weight_int8pack_mm, bf16 x int8
    int8:channel:sym, mode="w8a8"     W8A8Linear     torch._int_mm on int8 activations, one scale per token
      + outlier_threshold             W8A8Linear     the same, outlier columns in fp32 (LLM.int8())
    int4:g32/g64/g128/g256, sym/asym  Int4Linear     torch._weight_int4pack_mm_for_cpu (tinygemm layout)
    GGUF block types (q4_0, q4_k, ..) GGMLLinear     ggml's CPU matmul (llama.cpp's kernels), fp32 x blocks
    anything else                     DequantLinear  decode a block of rows via a table, matmul, next block

Every buffer is stored in an integer dtype (floating scales are reinterpreted, not converted): model.to(dtype)
casts every floating tensor of a model, and that must not round the stored scales.

A QuantizedTensor is read only through its format (codes, scale_zero, row slices: lighten.formats), never by
parsing its buffers here. Int8Linear and Int4Linear keep the kernel's own layout, whose rows stack into one
layer computing several (PackedLinear.stacked: the lean decoder's joined q/k/v and gate/up); GGMLLinear's
weights are ggml's (no torch buffers), and its layers join as one ggml graph over them.
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
from lighten.formats.ggml import GGMLFormat, as_gguf
from lighten.runtime.ggml import GGMLMatrix, GGMLProduct

INT4_GROUPS = ("g32", "g64", "g128", "g256")  # the group sizes torch's int4 CPU kernel takes
BLOCK_ELEMENTS = 2**18  # DequantLinear decodes ~this many weights at a time: 1 MB of fp32 temporaries


class PackedLinear(nn.Module):
    """y = x W^T + b with W kept packed. A subclass packs W into buffers and multiplies in `mm`, which gets a
    contiguous bf16 [M, k_padded] input: the input zero-padded to the K the packed weight was padded to.

    A subclass whose packed rows can be stacked (Int8Linear, Int4Linear) takes its buffers in its constructor
    and packs a QuantizedTensor in `pack`; ROW_BUFFERS names the buffers with one slice per output row and
    the dim the rows run along, and ROW_BLOCK the row count its parts must be a multiple of (see stacked)."""

    ROW_BUFFERS: dict[str, int] = {}
    ROW_BLOCK = 1
    KERNEL = ""  # what computes the product, for reports (lighten run --json)

    def __init__(self, spec: str, shape: tuple[int, int], k_padded: int, bias: torch.Tensor | None):
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = shape
        self.k_padded = k_padded
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        )

    @classmethod
    def can_stack(cls, layers: list["PackedLinear"]) -> bool:
        return bool(cls.ROW_BUFFERS) and all(
            type(m) is cls and m.spec == layers[0].spec and m.out_features % cls.ROW_BLOCK == 0
            for m in layers
        )

    @classmethod
    def stacked(cls, layers: list["PackedLinear"]) -> "PackedLinear":
        """One layer computing `layers` (of this class and one spec, reading the same input) in one call,
        their outputs concatenated: a layer built from their row buffers stacked (see can_stack)."""
        if not cls.can_stack(layers):
            raise LightenError(f"these {cls.__name__} layers cannot be stacked: see {cls.__name__}.ROW_BLOCK")
        first = layers[0]
        rows = cls.ROW_BUFFERS.items()
        buffers = {name: torch.cat([getattr(m, name) for m in layers], dim) for name, dim in rows}
        bias = None if first.bias is None else torch.cat([m.bias for m in layers])
        return cls(first.spec, first.in_features, **buffers, bias=bias, **first.settings())

    def settings(self) -> dict:
        """Constructor arguments besides spec, in_features, the buffers and the bias."""
        return {}

    def kernel(self) -> str:
        """The spec and the kernel computing it, e.g. "int8:channel:sym: torch _weight_int8pack_mm"."""
        return f"{self.spec}: {self.KERNEL}"

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
    """int8:channel:sym: the codes are int8 bytes already, so the kernel reads the stored codes themselves.
    weight: int8 [N, K padded to a multiple of 8]; scales: bf16 [N] (stored as int16)."""

    ROW_BUFFERS = {"weight": 0, "scales": 0}
    KERNEL = "torch _weight_int8pack_mm"

    def __init__(self, spec, in_features, weight, scales, bias=None):
        super().__init__(spec, (weight.shape[0], in_features), weight.shape[1], bias)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @classmethod
    def pack(cls, q: QuantizedTensor, bias: torch.Tensor | None = None, **settings) -> "Int8Linear":
        fmt = formats.get(q.spec)
        n, k = q.shape
        w = fmt.codes(q).view(torch.int8)
        # _weight_int8pack_mm reads K in steps of 8 (and crashes otherwise): pad it.
        w = F.pad(w, (0, -k % 8)) if k % 8 else w
        scales = _frozen(fmt.scale_zero(q)[0].view(n).to(torch.bfloat16))
        return cls(q.spec, k, w, scales, bias, **settings)

    def mm(self, x):
        return torch._weight_int8pack_mm(x, self.weight, self.scales.view(torch.bfloat16))


class W8A8Linear(Int8Linear):
    """int8 weights times int8 activations: each token (row of x) is quantized on the fly with its own absmax
    scale, the products accumulate exactly in int32, and one fp32 multiply applies both scales.

    With an `outlier_threshold`, LLM.int8()'s decomposition: the input columns where any |x| >= threshold
    leave the int8 product (zeroed before the per-token scales are taken) and are multiplied in fp32 with the
    same columns of the dequantized int8 weight, as bitsandbytes does in fp16."""

    KERNEL = "torch _int_mm"

    def __init__(self, spec, in_features, weight, scales, bias=None, outlier_threshold: float | None = None):
        super().__init__(spec, in_features, weight, scales, bias)
        self.outlier_threshold = outlier_threshold

    def settings(self) -> dict:
        return {"outlier_threshold": self.outlier_threshold}

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
    g128). weight: the kernel's layout, uint8 [N, K padded / 2]."""

    ROW_BUFFERS = {"weight": 0, "scales_and_zeros": 1}
    KERNEL = "torch _weight_int4pack_mm_for_cpu"
    ROW_BLOCK = 64  # the kernel's layout interleaves rows within blocks of 64: stacked parts join there

    def __init__(self, spec, in_features, weight, scales_and_zeros, bias=None):
        super().__init__(spec, (weight.shape[0], in_features), weight.shape[1] * 2, bias)
        self.group_size = int(formats.get(spec).granularity[1:])
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @classmethod
    def pack(cls, q: QuantizedTensor, bias: torch.Tensor | None = None) -> "Int4Linear":
        fmt = formats.get(q.spec)
        n, k, _, groups = fmt.geometry(q.shape)
        k_padded = groups * int(fmt.granularity[1:])
        # tinygemm's codes are unsigned: a sym code c in [-7, 7] becomes u = c + 8, with zero-point 8.
        shift = 0 if fmt.asym else 8
        scale, zero = fmt.scale_zero(q)
        zero = zero + shift
        # Pieces of 256 rows convert independently (the kernel's layout interleaves rows within blocks of 32
        # or 64), which keeps the int32 copy of the codes that the converter wants small.
        pieces = []
        for a in range(0, n, 256):
            b = min(a + 256, n)
            u = fmt.element.decode(fmt.codes(q.rows(a, b))) + shift
            # Padding columns get the row's last zero-point, the code of 0 (the padded activations are 0 too).
            u = torch.cat([u, zero[a:b, -1:].expand(b - a, k_padded - k)], 1)
            pieces.append(torch._convert_weight_to_int4pack_for_cpu(u.int(), 2))
        sz = torch.stack([scale, (8 - zero) * scale], -1).transpose(0, 1).contiguous()
        return cls(q.spec, k, torch.cat(pieces), _frozen(sz.to(torch.bfloat16)), bias)

    def mm(self, x):
        sz = self.scales_and_zeros.view(torch.bfloat16)
        return torch._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, sz)


class DequantLinear(PackedLinear):
    """Any format, by decoding: only the QuantizedTensor's own buffers stay resident. Each forward decodes
    `block` rows at a time (codes -> element values through a table, then the group scales) and multiplies
    them, so the extra memory is one block of weights, never the whole full-precision matrix.

    The blocks are multiplied in fp32: decoding yields fp32 anyway, and fp32 GEMM is fast on any x86 CPU
    while bf16 GEMM is fast only with AVX512-BF16 / AMX (on AVX2 it is much slower)."""

    KERNEL = "lighten decode + torch fp32 matmul"

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__(q.spec, q.shape, q.shape[1], bias)
        self.fmt = formats.get(q.spec)
        self.dtypes = {name: t.dtype for name, t in q.tensors.items()}
        for name, t in q.tensors.items():
            self.register_buffer(name, _frozen(t))
        align = self.fmt.row_align(q.shape)
        self.block = max(align, BLOCK_ELEMENTS // self.in_features // align * align)

    def mm(self, x):
        n = self.out_features
        x = x.float()
        blocks = (self.decode_rows(a, min(a + self.block, n)) for a in range(0, n, self.block))
        return torch.cat([F.linear(x, w) for w in blocks], -1)

    def quantized(self) -> QuantizedTensor:
        """The QuantizedTensor this layer holds (its buffers, seen in their stored dtypes again)."""
        tensors = {name: getattr(self, name).view(dtype) for name, dtype in self.dtypes.items()}
        return QuantizedTensor(self.spec, (self.out_features, self.in_features), tensors)

    def decode_rows(self, a: int, b: int) -> torch.Tensor:
        """Rows a:b of W in fp32, exactly as q.dequantize()[a:b]; a is a multiple of self.block."""
        part = self.quantized().rows(a, b)
        return self.fmt.dequantize_values(part, _decode(self.fmt, part))


class GGMLLinear(PackedLinear):
    """GGUF block types on ggml's CPU matmul (lighten.runtime.ggml), the kernels llama.cpp runs. ggml takes
    fp32 activations (and rounds each block of them to 8 bits itself, as in llama.cpp); the output comes
    back in the input's dtype. The weight is ggml's (GGMLMatrix): repacked into its interleaved layout where
    it has one, else the GGUF bytes as stored, read in place. So the layer has no torch buffers (model.to()
    and state_dict() pass it by); `nbytes` is what it holds.

    Layers of one input stack whatever their types: ggml computes their weights in one call, side by side
    (a joined q/k/v may mix q4_k and q6_k), with no bytes copied. The product runs as the torch op
    lighten::ggml_matmul, so that torch.compile traces these layers in one graph."""

    def __init__(self, spec, in_features, matrices: list[GGMLMatrix], bias=None):
        super().__init__(spec, (sum(w.n for w in matrices), in_features), in_features, bias)
        self.product = GGMLProduct(matrices)

    @classmethod
    def pack(
        cls, q: QuantizedTensor, bias: torch.Tensor | None = None, spec: str | None = None
    ) -> "GGMLLinear":
        """The layer of GGUF blocks q; `spec` names what they stand in for (lighten's int8 as q8_0, say)."""
        return cls(spec or q.spec, q.shape[1], [GGMLMatrix(q.tensors["blocks"], q.spec, q.shape)], bias)

    @classmethod
    def can_stack(cls, layers: list["PackedLinear"]) -> bool:
        return all(type(m) is cls and m.in_features == layers[0].in_features for m in layers)

    @classmethod
    def stacked(cls, layers: list["GGMLLinear"]) -> "GGMLLinear":
        if not cls.can_stack(layers):
            raise LightenError("GGMLLinear layers stack only with GGMLLinear layers of the same input width")
        spec = "+".join(dict.fromkeys(m.spec for m in layers))
        matrices = [w for m in layers for w in m.product.matrices]
        biases = [m.bias for m in layers]
        bias = None if biases[0] is None else torch.cat(biases)
        return cls(spec, layers[0].in_features, matrices, bias)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.product.matrices)

    def kernel(self) -> str:
        """Each type on ggml and its layout, e.g. "q4_0: ggml (repacked) + q6_k: ggml (in place)", after what
        they stand in for where that is another format ("int8:channel:sym as q8_0: ggml (repacked)")."""
        layouts = (
            f"{w.spec}: ggml ({'repacked' if w.repacked else 'in place'})" for w in self.product.matrices
        )
        kernel = " + ".join(dict.fromkeys(layouts))
        types = "+".join(dict.fromkeys(w.spec for w in self.product.matrices))
        return kernel if self.spec == types else f"{self.spec} as {kernel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A 2-D fp32 input (the fp32 decoder's) goes in as it is: each reshape, view or cast costs µs here.
        plain = x.dim() == 2 and x.dtype == torch.float32
        flat = x if plain else x.reshape(-1, self.in_features).float()
        if torch.compiler.is_compiling():  # the op costs ~20 µs a call in eager: only where it is needed
            y = torch.ops.lighten.ggml_matmul(flat, self.product.handle)
        else:
            y = self.product.matmul(flat)
        if self.bias is not None:
            y = y + self.bias
        return y if plain else y.view(*x.shape[:-1], self.out_features).to(x.dtype)


def packed_linear(
    q: QuantizedTensor,
    bias: torch.Tensor | None = None,
    mode: str = "weight-only",
    outlier_threshold: float | None = None,
    on_ggml: bool = False,
) -> PackedLinear:
    """The packed layer for a quantized [out, in] weight: the fastest kernel its spec allows (table above).
    `outlier_threshold` (w8a8 only, e.g. 6.0) turns on LLM.int8()'s fp32 outlier columns. `on_ggml` computes
    lighten's int8 / int5 / int4 on ggml as the GGUF type with the same numbers (lighten.runtime.dispatch
    decides when)."""
    if len(q.shape) != 2:
        raise LightenError(f"a packed linear layer needs a 2-D [out, in] weight, got shape {q.shape}")
    fmt = formats.get(q.spec)
    int8 = fmt.name == "int8:channel:sym"
    if mode == "w8a8":
        if not int8:
            raise LightenError(f"w8a8 needs int8:channel:sym weights, got {q.spec}; quantize with spec int8")
        return W8A8Linear.pack(q, bias, outlier_threshold=outlier_threshold)
    if mode != "weight-only":
        raise LightenError(f"mode is 'weight-only' or 'w8a8', got {mode!r}")
    if outlier_threshold is not None:
        raise LightenError("an outlier threshold (LLM.int8()) splits int8 activations: it needs mode 'w8a8'")
    if on_ggml:
        return GGMLLinear.pack(as_gguf(q), bias, spec=q.spec)
    if int8:
        return Int8Linear.pack(q, bias)
    if fmt.family == "int4" and fmt.granularity in INT4_GROUPS and q.shape[0] % 16 == 0:  # N in tiles of 16
        return Int4Linear.pack(q, bias)
    if isinstance(fmt, GGMLFormat):
        return GGMLLinear.pack(q, bias)
    return DequantLinear(q, bias)


# ---- helpers ------------------------------------------------------------------------------------------

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _frozen(t: torch.Tensor) -> torch.Tensor:
    """The same bytes in an integer dtype, which model.to(dtype) leaves alone."""
    return t.view(_INT[t.element_size()]) if t.is_floating_point() else t


def _decode(fmt: Format, q: QuantizedTensor) -> torch.Tensor:
    """q's element values (fp32, rows x K), looked up in a table."""
    if fmt.element.bits in (4, 8):
        units = q.tensors["codes"]  # one lookup per byte unpacks and decodes it
    else:
        units = fmt.codes(q).view(-1)
    n = math.prod(q.shape)
    return _decode_table(fmt).index_select(0, units.int()).view(torch.float32)[:n].view(q.shape)


@functools.cache
def _decode_table(fmt: Format) -> torch.Tensor:
    """Element value of every code; for 4- and 8-bit codes, of every byte: a 4-bit byte's two fp32 values
    are read as one int64, because a 1-D lookup of 4- or 8-byte entries is much faster than one of rows."""
    el = fmt.element
    if el.bits not in (4, 8):
        return el.decode(torch.arange(3 if el is TERNARY else 2**el.bits, dtype=torch.uint8))
    values = el.decode(packing.unpack_bits(torch.arange(256, dtype=torch.uint8), el.bits, 256 * 8 // el.bits))
    return values.view(torch.int64 if el.bits == 4 else torch.float32)
