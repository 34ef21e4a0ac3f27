"""Format (a parsed spec) and QuantizedTensor (the buffers one quantized tensor is stored in).

Every format is element codes times a per-group scale. A tensor of shape (..., K) is viewed as
rows of K; a group is `G` consecutive elements of one row (the last group of a row may be
shorter), a `channel` is a whole row and `tensor` is everything. How a group's scale is chosen
depends on the format's scale rule:

  absmax   scale = absmax / element max: the largest |x| maps to ±max       int sym, fp*, nf4
  minmax   scale = (max - min) / (2^b - 1), zero-point = round(-min/scale)   int asym
  e8m0     scale = 2^(floor(log2 absmax) - emax), stored as a biased byte   mx*
  absmean  scale = mean |x|, and |x| beyond the grid is clipped            ternary, binary
"""

import math
from dataclasses import dataclass

import torch

from lighten.errors import SpecError
from lighten.formats import packing
from lighten.formats.elements import BINARY, MINIFLOATS, NF4, TERNARY, Element, integer, unsigned
from lighten.formats.spec import DEFAULTS, GGML, Spec, parse_spec

INTS = {f"int{b}": integer(b) for b in range(2, 9)}
UNSIGNED = {f"int{b}": unsigned(b) for b in range(2, 9)}
MX = {  # OCP Microscaling v1.0 element types
    "mxfp8_e4m3": MINIFLOATS["fp8_e4m3"],
    "mxfp8_e5m2": MINIFLOATS["fp8_e5m2"],
    "mxfp6_e3m2": MINIFLOATS["fp6_e3m2"],
    "mxfp6_e2m3": MINIFLOATS["fp6_e2m3"],
    "mxfp4": MINIFLOATS["fp4_e2m1"],
    "mxint8": integer(8, step=2**-6),
}
ELEMENTS = {**INTS, **MINIFLOATS, **MX, "nf4": NF4, "ternary": TERNARY, "binary": BINARY}

DQ_BLOCK = 256  # nf4:dq quantizes the absmaxes in blocks of 256, as QLoRA does
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Format(Spec):  # the spec's fields and canonical name, parsed by lighten.formats.spec
    @property
    def element(self) -> Element:
        return (UNSIGNED if self.asym else ELEMENTS)[self.family]

    @property
    def rule(self) -> str:
        if self.family in MX:
            return "e8m0"
        if self.family in ("ternary", "binary"):
            return "absmean"
        return "minmax" if self.asym else "absmax"

    @property
    def levels(self) -> int:
        """Distinct element values the encoder produces (int4 sym: 15, -8 is unused)."""
        return self.element.levels

    @property
    def max_value(self) -> float:
        """Largest element magnitude before scaling (asym ints: the top code, 2^b - 1)."""
        return self.element.max_value

    @property
    def scale_dtype(self) -> torch.dtype:
        if self.rule == "e8m0" or self.dq:
            return torch.uint8  # E8M0 byte / 8-bit absmax code
        return torch.float32 if self.family == "nf4" else torch.float16

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element including scales and zero-points, for rows that are a whole
        number of groups. Per-channel and per-tensor scales are spread over a row (or the whole
        tensor) and not counted: they add 16 / row_length bits (0.03 at 576)."""
        if not self.granularity.startswith("g"):
            return self.element.bits
        group_bits = self.scale_dtype.itemsize * 8
        group_bits += self.element.bits if self.asym else 0  # packed zero-point
        group_bits += 32 / DQ_BLOCK if self.dq else 0  # share of the fp32 scale of the absmaxes
        return self.element.bits + group_bits / int(self.granularity[1:])

    def geometry(self, shape) -> tuple[int, int, int, int]:
        """(rows, row length K, group length G, groups per row) for a tensor of `shape`."""
        if len(shape) == 0 or math.prod(shape) == 0:
            raise ValueError(f"can only quantize a non-empty tensor with ndim >= 1, got shape {shape}")
        n, k = math.prod(shape), shape[-1]
        if self.granularity == "tensor":
            return 1, n, n, 1
        g = k if self.granularity == "channel" else min(int(self.granularity[1:]), k)
        return n // k, k, g, -(-k // g)

    def layout(self, shape) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of every buffer QuantizedTensor.tensors holds for `shape`.

        codes: the element codes of all rows in one stream (packing.py), row-major.
        scales: one per group, (rows, groups per row): fp16 (rounded UP, see fp16_ceil),
            fp32 absmax for nf4, E8M0 byte (2^(b - 127)) for mx*, int8 code for nf4:dq.
        zeros: asym only, the integer zero-points packed at b bits, row-major.
        scales_scale, scales_mean: nf4:dq only, fp32 scale per 256 absmax codes and their mean.
        """
        rows, k, _, groups = self.geometry(shape)
        out = {"codes": (torch.uint8, (self._codes_nbytes(rows * k),))}
        out["scales"] = (self.scale_dtype, (rows, groups))
        if self.asym:
            out["zeros"] = (torch.uint8, (packing.packed_nbytes(rows * groups, self.element.bits),))
        if self.dq:
            out["scales_scale"] = (torch.float32, (-(-rows * groups // DQ_BLOCK),))
            out["scales_mean"] = (torch.float32, (1,))
        return out

    def quantize(self, x: torch.Tensor, scales: dict[str, torch.Tensor] | None = None) -> "QuantizedTensor":
        """Encode x. `scales` overrides the scale rule: the stored scale buffers to encode with (every
        layout buffer but codes, e.g. another quantize call's), so values beyond the grid saturate.
        Calibration uses it for scales chosen elsewhere: clipped (MSE search) or frozen (GPTQ)."""
        tensors, codes = self._encode(x, scales)
        if self.element is TERNARY:
            packed = packing.pack_trits(codes)
        else:
            packed = packing.pack_bits(codes, self.element.bits)
        return QuantizedTensor(self.name, tuple(x.shape), {"codes": packed, **tensors})

    def _encode(
        self, x: torch.Tensor, scales: dict[str, torch.Tensor] | None = None
    ) -> tuple[dict, torch.Tensor]:
        """(the scale buffers, the element codes (rows, K) unpacked) of x: quantize before packing."""
        rows, k, g, groups = self.geometry(tuple(x.shape))
        v = grouped(x.reshape(rows, k).float(), g, groups)
        if scales is None:
            tensors = _SCALE_RULES[self.rule](self, v, (k - g * torch.arange(groups)).clamp(max=g))
        else:
            want = {name: layout for name, layout in self.layout(tuple(x.shape)).items() if name != "codes"}
            if {name: (t.dtype, tuple(t.shape)) for name, t in scales.items()} != want:
                raise SpecError(f"scales for a {self.name} tensor of shape {tuple(x.shape)} must be {want}")
            tensors = dict(scales)
        # Encode with the scale exactly as stored (fp16-rounded, E8M0, double-quantized), so the
        # decoder sees the grid the encoder rounded to.
        scale, zero = self._scale_zero(tensors, rows, groups)
        codes = self.element.encode(v / torch.where(scale == 0, 1, scale)[..., None] + zero[..., None])
        return tensors, codes.view(rows, groups * g)[:, :k]

    def dequantize(self, q: "QuantizedTensor", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_values(q, self.element.decode(self.codes(q))).to(dtype)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(x)) without packing the codes in between: the same numbers, faster (QAT
        runs it on every weight at every step)."""
        tensors, codes = self._encode(x)
        return self._weights(tuple(x.shape), tensors, self.element.decode(codes)).to(x.dtype)

    def dequantize_values(self, q: "QuantizedTensor", values: torch.Tensor) -> torch.Tensor:
        """q's fp32 weights from its element values (rows, K), e.g. decoded through a lookup table rather
        than element.decode: applies the zero-points and scales. dequantize is this after the decode."""
        return self._weights(self._own(q).shape, q.tensors, values)

    def _weights(self, shape: tuple, tensors: dict, values: torch.Tensor) -> torch.Tensor:
        rows, k, g, groups = self.geometry(shape)
        v = grouped(values.reshape(rows, k), g, groups)
        scale, zero = self._scale_zero(tensors, rows, groups)
        if self.asym:  # the other formats' zero-points are all 0
            v = v - zero[..., None]
        return (v * scale[..., None]).view(rows, groups * g)[:, :k].reshape(shape)

    # ---- reading the stored buffers: nothing outside formats/ parses them ---------------------------

    def codes(self, q: "QuantizedTensor") -> torch.Tensor:
        """The element codes as stored, unpacked: uint8 (rows, K) with K = q.shape[-1], what element.decode
        reads (two's complement for signed ints and mxint8, the unsigned code for asym, sign|exp|mantissa
        for minifloats, the code-book index for nf4, code + 1 for ternary, 1 for negative for binary)."""
        n = math.prod(self._own(q).shape)
        if self.element is TERNARY:
            codes = packing.unpack_trits(q.tensors["codes"], n)
        elif self.element.bits == 8:  # the stream is the codes: a view, no copy
            codes = q.tensors["codes"][:n]
        else:
            codes = packing.unpack_bits(q.tensors["codes"], self.element.bits, n)
        return codes.view(-1, q.shape[-1])

    def zero_points(self, q: "QuantizedTensor") -> torch.Tensor:
        """The integer zero-points of an asym tensor, uint8 (rows, groups per row) like its scales."""
        if not self.asym:
            raise SpecError(f"{self.name} has no zero-points: only :asym ints store them")
        rows, _, _, groups = self.geometry(self._own(q).shape)
        return self._zeros(q.tensors, rows, groups)

    def scale_zero(self, q: "QuantizedTensor") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group fp32 (scale, zero-point), (rows, groups per row): x = (element - zero) * scale."""
        rows, _, _, groups = self.geometry(self._own(q).shape)
        return self._scale_zero(q.tensors, rows, groups)

    def _scale_zero(self, t, rows, groups) -> tuple[torch.Tensor, torch.Tensor]:
        """scale_zero from the buffers themselves: quantize needs it before there is a QuantizedTensor."""
        zero = torch.zeros(rows, groups)
        if self.rule == "e8m0":  # 2^(byte - 127); byte 255 is NaN (the encoder never writes it)
            byte = t["scales"]
            return torch.where(byte == 255, math.nan, torch.exp2(byte.float() - 127)), zero
        if self.dq:
            codes = packing.pad_to_multiple(t["scales"].view(torch.int8).reshape(-1).float(), DQ_BLOCK)
            absmax = codes.view(-1, DQ_BLOCK) * t["scales_scale"][:, None] + t["scales_mean"]
            return absmax.view(-1)[: rows * groups].view(rows, groups), zero
        if self.asym:
            zero = self._zeros(t, rows, groups)
        return t["scales"].float(), zero.float()

    def _zeros(self, t, rows, groups) -> torch.Tensor:
        return packing.unpack_bits(t["zeros"], self.element.bits, rows * groups).view(rows, groups)

    # ---- rows of a stored tensor ---------------------------------------------------------------------

    def row_align(self, shape) -> int:
        """Fewest rows (of K = shape[-1]) after which the codes, the packed zero-points and the nf4:dq scale
        blocks all start afresh on a byte or block boundary: row_slice cuts at multiples of it."""
        k, (_, _, _, groups) = shape[-1], self.geometry(shape)
        bits = self.element.bits
        align = 5 // math.gcd(5, k) if self.element is TERNARY else 8 // math.gcd(8, k * bits)
        if self.granularity != "tensor" and self.asym:
            align = math.lcm(align, 8 // math.gcd(8, groups * bits))
        if self.dq:
            align = math.lcm(align, DQ_BLOCK // math.gcd(DQ_BLOCK, groups))
        return align

    def row_slice(self, q: "QuantizedTensor", a: int, b: int) -> "QuantizedTensor":
        """Rows a:b (of K = q.shape[-1]) as a QuantizedTensor of shape (b - a, K), made of slices of q's
        buffers (no copy). a must be a multiple of row_align, and b as well unless it is the last row.
        A per-tensor scale (and zero-point) is every part's."""
        k = self._own(q).shape[-1]
        rows, align = math.prod(q.shape) // k, self.row_align(q.shape)
        if not 0 <= a < b <= rows or a % align or (b % align and b != rows):
            raise ValueError(
                f"rows {a}:{b} of a {self.name} tensor of {rows} rows of {k}: the bounds must be multiples "
                f"of {align} (or the end), where every buffer starts on a byte / block boundary"
            )
        t = dict(q.tensors)
        t["codes"] = t["codes"][self._codes_nbytes(a * k) : self._codes_nbytes(b * k)]
        if self.granularity != "tensor":
            groups = self.geometry(q.shape)[3]
            t["scales"] = t["scales"][a:b]
            if self.asym:
                start, end = (packing.packed_nbytes(r * groups, self.element.bits) for r in (a, b))
                t["zeros"] = t["zeros"][start:end]
            if self.dq:
                t["scales_scale"] = t["scales_scale"][a * groups // DQ_BLOCK : -(-b * groups // DQ_BLOCK)]
        return QuantizedTensor(q.spec, (b - a, k), t)

    def _own(self, q: "QuantizedTensor") -> "QuantizedTensor":
        if q.spec != self.name:
            raise SpecError(f"{q.spec} tensor passed to {self.name}; use its own format, get(q.spec)")
        return q

    def _codes_nbytes(self, n: int) -> int:
        """Bytes of a stream of n element codes (trits go five to a byte)."""
        return (n + 4) // 5 if self.element is TERNARY else packing.packed_nbytes(n, self.element.bits)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    spec: str  # canonical spec
    shape: tuple[int, ...]  # shape of the original tensor
    tensors: dict[str, torch.Tensor]  # everything that is stored, see Format.layout

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return get(self.spec).dequantize(self, dtype)

    def rows(self, a: int, b: int) -> "QuantizedTensor":
        """Rows a:b by slicing the buffers: Format.row_slice."""
        return get(self.spec).row_slice(self, a, b)

    def scale_buffers(self) -> dict[str, torch.Tensor]:
        """Every stored buffer but the codes: what Format.quantize(x, scales=...) encodes with."""
        return {name: t for name, t in self.tensors.items() if name != "codes"}

    @classmethod
    def from_tensors(cls, spec: str, shape: tuple, tensors: dict) -> "QuantizedTensor":
        """Rebuild from stored buffers (e.g. a safetensors load), checking names, dtypes, shapes."""
        fmt, shape = get(spec), tuple(int(d) for d in shape)
        if len(shape) == 0 or min(shape) < 1:
            raise SpecError(f"shape {shape} of a {fmt.name} tensor must be non-empty with ndim >= 1")
        want = fmt.layout(shape)
        got = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
        if got != want:
            raise SpecError(f"a {fmt.name} tensor of shape {shape} is stored as {want}, got {got}")
        return cls(fmt.name, shape, {name: tensors[name].contiguous() for name in want})


# ---- scale rules: grouped fp32 values (rows, groups, G) -> stored scale buffers -----------------


def _absmax(fmt, v, counts):
    scale = v.abs().amax(-1) / fmt.max_value
    if fmt.family != "nf4":
        return {"scales": fp16_ceil(scale)}
    return _double_quantize(scale) if fmt.dq else {"scales": scale}


def _minmax(fmt, v, counts):
    lo, hi = v.amin(-1).clamp(max=0), v.amax(-1).clamp(min=0)  # keep 0 on the grid
    scale = fp16_ceil((hi - lo) / fmt.max_value)
    zero = torch.round(-lo / torch.where(scale == 0, 1, scale)).clamp(0, fmt.max_value)
    return {"scales": scale, "zeros": packing.pack_bits(zero.to(torch.uint8), fmt.element.bits)}


def _e8m0(fmt, v, counts):
    absmax = v.abs().amax(-1)
    emax = math.floor(math.log2(fmt.max_value))
    shared = torch.frexp(absmax).exponent - 1 - emax  # floor(log2 absmax) - emax, exactly
    shared = torch.where(absmax == 0, -127, shared).clamp(-127, 127)  # zero block: smallest scale
    return {"scales": (shared + 127).to(torch.uint8)}


def _absmean(fmt, v, counts):
    mean = v.abs().sum(-1) / counts  # padding is zeros: divide by the true group length
    return {"scales": mean.clamp(max=FP16_MAX).half()}


_SCALE_RULES = {"absmax": _absmax, "minmax": _minmax, "e8m0": _e8m0, "absmean": _absmean}


def fp16_ceil(s: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 >= s (s >= 0, capped at the fp16 max). Rounding the scale up rather than to
    nearest keeps absmax / scale <= max, so nothing clips and |x - x_hat| <= scale / 2 holds
    with the stored scale; it costs at most 2^-10 relative resolution."""
    s = s.clamp(max=FP16_MAX)
    h = s.half()
    return torch.where(h.float() < s, (h.view(torch.int16) + 1).view(torch.float16), h)


def _double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """QLoRA double quantization: absmax - mean, symmetric int8 per block of 256, fp32 scales."""
    mean = absmax.mean()
    d = packing.pad_to_multiple((absmax - mean).reshape(-1), DQ_BLOCK).view(-1, DQ_BLOCK)
    scale = d.abs().amax(-1) / 127
    # ceil, not round: the decoded absmax is never below the true one, so no element clips.
    codes = torch.ceil(d / torch.where(scale == 0, 1, scale)[:, None]).clamp(-127, 127)
    codes = codes.to(torch.int8).view(torch.uint8).view(-1)[: absmax.numel()].view(absmax.shape)
    return {"scales": codes, "scales_scale": scale, "scales_mean": mean.view(1)}


def grouped(v: torch.Tensor, g: int, groups: int) -> torch.Tensor:
    """(rows, K) -> (rows, groups, G), zero-padding the short last group of each row."""
    if groups * g == v.shape[1]:
        return v.reshape(-1, groups, g)  # no short group: no copy
    return torch.cat([v, v.new_zeros(v.shape[0], groups * g - v.shape[1])], 1).view(-1, groups, g)


def get(spec: str):
    """Parse a spec string (grammar in lighten.formats) into a Format, or a lighten.formats.ggml.GGMLFormat
    for a GGUF block type; SpecError if invalid."""
    parsed = parse_spec(spec)
    if parsed.family in GGML:
        from lighten.formats.ggml import GGMLFormat  # ggml.py builds on QuantizedTensor, defined here

        return GGMLFormat(parsed.family)
    return Format(**vars(parsed))


def list_formats() -> list:
    """Every format in the zoo at its default spec, then the GGUF block types."""
    return [get(name) for name in (*DEFAULTS, *GGML)]
