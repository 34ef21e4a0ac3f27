"""GGUF's block types (ggml's quantization types) as formats of the zoo: the bytes llama.cpp runs.

    fmt = get("q4_k")                     # GGMLFormat; no options, case ignored
    q = fmt.quantize(w, importance=None)  # q.tensors == {"blocks": uint8 (rows, bytes per row)}
    w_hat = q.dequantize()                # gguf.quants.dequantize of those bytes, bit for bit
    fmt.fallback_for(w.shape)             # what llama-quantize stores a tensor of that shape as

`blocks` holds each row's GGUF blocks exactly as a GGUF file stores them (ggml-common.h), row-major, so an
export writes them unchanged. Decoding is the `gguf` package's own dequantizer, the field's reference.

Encoding follows ggml-quants.c type by type, vectorized over blocks in numpy fp32:

  q4_0 q4_1 q5_0 q5_1   no importance: quantize_row_*_ref, i.e. gguf.quants.quantize (called directly);
                        importance: quantize_row_*_impl (make_qx_quants / make_qkx3_quants search)
  q8_0 tq1_0 tq2_0      gguf.quants.quantize; llama.cpp ignores importance for these, and so does lighten
  q2_k q3_k q4_k q5_k   no importance: quantize_row_*_K_ref (make_qkx2_quants / make_q3_quants);
  q6_k                  importance: quantize_row_*_K_impl (make_qkx3_quants / make_qx_quants, make_qp_quants)
  iq4_nl iq4_xs         quantize_row_iq4_nl_impl with ntry = 7 (what llama-quantize runs, with or without an
                        importance matrix): scale search on the non-uniform kvalues_iq4nl grid

`importance` is a weight per input column, shape [K] (llama.cpp's imatrix entry of the tensor: the mean x^2 of
that input over calibration tokens); the search then minimises the error weighted by it, as llama.cpp does.

Where it differs from ggml: sums are numpy's (pairwise, not sequential) and C compilers may fuse
multiply-adds, so a scale search can tip the other way on a near-tie; the k-quant and iq4 bytes are therefore
the same algorithm, not guaranteed the same bits as llama.cpp's. The searches that loop per element in C
(make_q3_quants, make_qp_quants) run each pass over all blocks at once; a block whose pass changes nothing
stays unchanged, as in C where it stops.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from lighten.errors import SpecError
from lighten.formats.format import QuantizedTensor
from lighten.formats.spec import IMPORTANCE_WEIGHTED

QK_K = 256
EPS = 1e-15  # ggml's GROUP_MAX_EPS: a block whose absmax is below it is all zeros
IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)

# name: (ggml type, weights per block, bytes per block, element levels, largest element magnitude, fallback).
# The fallback is what llama-quantize stores a tensor as when its rows are not whole blocks of this type
# (llama_tensor_get_type in src/llama-quant.cpp); None where it has none (it refuses, or for 32-blocks types
# there is no smaller block).
TYPES = {
    "q4_0": (T.Q4_0, 32, 18, 16, 8, None),
    "q4_1": (T.Q4_1, 32, 20, 16, 15, None),
    "q5_0": (T.Q5_0, 32, 22, 32, 16, None),
    "q5_1": (T.Q5_1, 32, 24, 32, 31, None),
    "q8_0": (T.Q8_0, 32, 34, 255, 127, None),
    "iq4_nl": (T.IQ4_NL, 32, 18, 16, 127, None),
    "iq4_xs": (T.IQ4_XS, QK_K, 136, 16, 127, "iq4_nl"),
    "q2_k": (T.Q2_K, QK_K, 84, 4, 3, "iq4_nl"),
    "q3_k": (T.Q3_K, QK_K, 110, 8, 4, "iq4_nl"),
    "q4_k": (T.Q4_K, QK_K, 144, 16, 15, "q5_0"),
    "q5_k": (T.Q5_K, QK_K, 176, 32, 31, "q5_1"),
    "q6_k": (T.Q6_K, QK_K, 210, 64, 32, "q8_0"),
    "tq1_0": (T.TQ1_0, QK_K, 54, 3, 1, "q4_0"),
    "tq2_0": (T.TQ2_0, QK_K, 66, 3, 1, "q4_0"),
}
# Why the algorithms that hand a format their own scales (quantize(x, scales=...)) cannot target these types.
GGML_SCALES = (
    "a GGUF block type picks its own scales and mins with llama.cpp's search (optionally "
    "importance-weighted); use algorithm imatrix, gptq, rtn or awq"
)
# Types whose llama.cpp encoder without importance (or ignoring it: q8_0, tq*) is its *_ref rounding, which
# gguf implements: quantize calls gguf for them. The ternary ones have no search whose grid GPTQ could use.
REFERENCE = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "tq1_0", "tq2_0")
NO_GRID = ("tq1_0", "tq2_0")


@dataclass(frozen=True)
class BlockGrid:
    """What a type's search stored for rows of whole blocks, and the values it makes representable: element j
    of sub-block s can be step[..., s] * levels[code] + offset[..., s] for a code indexing `levels`.

    GPTQ rounds each column into this grid after its own error updates (encode), then packs the codes with
    the stored scales (pack). `codes` are the search's own codes for the values it searched, which are
    llama.cpp's (they may differ from encode's on a tie or where ggml keeps a search's codes)."""

    step: np.ndarray  # (rows, blocks, sub-blocks) fp32: the stored scales, as decoded
    offset: np.ndarray  # (rows, blocks, sub-blocks) fp32: minus the stored min (0 for symmetric types)
    levels: np.ndarray  # ascending code book (consecutive integers, or IQ4NL)
    codes: np.ndarray  # (rows, blocks, sub-blocks, sub) uint8
    pack: Callable[[np.ndarray], np.ndarray]  # codes shaped like `codes` -> blocks (rows, bytes) uint8

    def encode(self, x: np.ndarray, first: int = 0) -> np.ndarray:
        """Codes of the nearest grid values to x (rows, n), which sits at columns first..first + n."""
        step, offset, inverse = (a[:, first : first + x.shape[-1]] for a in self._columns)
        t = (x - offset) * inverse
        if self._uniform:
            return (np.clip(np.rint(t), self.levels[0], self.levels[-1]) - self.levels[0]).astype(np.uint8)
        return _best_index(self.levels, t).astype(np.uint8)  # IQ4NL's non-uniform grid

    def values(self, codes: np.ndarray, first: int = 0) -> np.ndarray:
        """The grid values of codes (rows, n) at columns first..first + n: what gguf decodes them to, up to
        the rounding of step * level + offset in fp32."""
        step, offset, _ = (a[:, first : first + codes.shape[-1]] for a in self._columns)
        return step * self.levels[codes] + offset

    @cached_property
    def _columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(step, offset, 1 / step or 0) of every column, (rows, K): GPTQ asks for one column at a time."""
        sub = self.codes.shape[-1]
        step, offset = (np.repeat(a.reshape(a.shape[0], -1), sub, axis=1) for a in (self.step, self.offset))
        return step, offset, _inverse(step)

    @cached_property
    def _uniform(self) -> bool:
        return bool((np.diff(self.levels) == 1).all())

    def packed(self, codes: np.ndarray | None = None) -> np.ndarray:
        """Blocks (rows, bytes) of `codes` (rows, K), or of the search's own codes."""
        return self.pack(self.codes if codes is None else codes.reshape(self.codes.shape))


@dataclass(frozen=True)
class GGMLFormat:
    name: str  # a key of TYPES, e.g. "q4_k"

    @property
    def family(self) -> str:
        return self.name

    @property
    def ggml_type(self) -> T:
        return TYPES[self.name][0]

    @property
    def block_size(self) -> int:
        return TYPES[self.name][1]

    @property
    def block_bytes(self) -> int:
        return TYPES[self.name][2]

    @property
    def levels(self) -> int:
        """Distinct element codes of one (sub-)block, before its scale and min."""
        return TYPES[self.name][3]

    @property
    def max_value(self) -> float:
        """Largest element magnitude before scaling (the code range's far end, e.g. q4_0's -8)."""
        return TYPES[self.name][4]

    @property
    def bits_per_element(self) -> float:
        """Exact: every scale, min and super-scale lives inside the block."""
        return self.block_bytes * 8 / self.block_size

    def fallback_for(self, shape) -> "GGMLFormat | None":
        """The format llama-quantize stores a tensor of `shape` in when asked for this one: this format where
        its rows are whole blocks, else the type's fallback where that fits; None where neither does
        (llama-quantize then writes F16, or refuses: keep the weight unquantized)."""
        for name in (self.name, TYPES[self.name][5]):
            if name is not None and shape[-1] % TYPES[name][1] == 0:
                return GGMLFormat(name)
        return None

    def geometry(self, shape) -> tuple[int, int, int, int]:
        """(rows, row length K, block size, blocks per row); SpecError where rows are not whole blocks."""
        if len(shape) == 0 or math.prod(shape) == 0:
            raise ValueError(f"can only quantize a non-empty tensor with ndim >= 1, got shape {shape}")
        k, block = shape[-1], self.block_size
        if k % block:
            fallback = self.fallback_for(shape)
            instead = (
                f"llama-quantize falls back to {fallback.name} for such tensors: quantize this one as "
                f"{fallback.name} (formats.get({self.name!r}).fallback_for(shape) says so)"
                if fallback
                else "no GGUF type of this family fits: llama-quantize keeps such tensors in F16, so keep it "
                "unquantized"
            )
            whole = f"{self.name} stores rows in blocks of {block}; rows of {k} are not whole blocks"
            raise SpecError(f"{whole}. {instead}")
        return math.prod(shape) // k, k, block, k // block

    def layout(self, shape) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """blocks: uint8 (rows, blocks per row * bytes per block), each row's GGUF blocks in file order."""
        rows, _, _, blocks = self.geometry(shape)
        return {"blocks": (torch.uint8, (rows, blocks * self.block_bytes))}

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedTensor:
        """Encode x as llama.cpp does (module docstring), optionally weighting each input column's error by
        `importance` (shape [K], >= 0)."""
        v, importance = self._rows(x, importance)
        if self.name in REFERENCE and (importance is None or self.name not in IMPORTANCE_WEIGHTED):
            blocks = quants.quantize(v, self.ggml_type)  # llama.cpp's *_ref rounding, which gguf implements
        else:
            blocks = self._search(v, importance).packed()
        return QuantizedTensor(self.name, tuple(x.shape), {"blocks": torch.from_numpy(blocks)})

    def grid(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> BlockGrid:
        """The importance-weighted search's grid for x (rows of whole blocks; all columns weigh alike when
        importance is None), for an algorithm that rounds into it itself (GPTQ). q8_0 ignores importance,
        as llama.cpp does; the ternary types have no search (SpecError)."""
        if self.name in NO_GRID:
            raise SpecError(f"{self.name} has no scale search to round into: gguf's encoder is its only one")
        v, importance = self._rows(x, importance)
        return self._search(v, np.ones(v.shape[1], np.float32) if importance is None else importance)

    def _rows(self, x: torch.Tensor, importance: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
        """x as (rows, K) fp32 numpy, importance as (K,) fp32 numpy (ValueError unless finite and >= 0)."""
        rows, k, _, _ = self.geometry(tuple(x.shape))
        if importance is not None:
            importance = importance.detach().float().cpu()
            valid = bool(torch.isfinite(importance).all() & (importance >= 0).all())
            if tuple(importance.shape) != (k,) or not valid:
                raise ValueError(f"importance must be {k} finite weights >= 0, one per input column")
            importance = importance.numpy()
        return x.detach().float().cpu().reshape(rows, k).numpy(), importance

    def _search(self, v: np.ndarray, importance: np.ndarray | None) -> BlockGrid:
        with np.errstate(divide="ignore", invalid="ignore"):  # searches divide by 0 in blocks they then skip
            return _SEARCHES[self.name](v, importance)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = quants.dequantize(self._own(q).tensors["blocks"].numpy(), self.ggml_type)
        return torch.from_numpy(values).reshape(q.shape).to(dtype)

    def fake_quantize(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        return self.dequantize(self.quantize(x, importance), x.dtype)

    def row_align(self, shape) -> int:
        return 1  # every row is whole blocks

    def row_slice(self, q: QuantizedTensor, a: int, b: int) -> QuantizedTensor:
        """Rows a:b (of K = q.shape[-1]) as a QuantizedTensor of shape (b - a, K): a slice of q's blocks."""
        blocks = self._own(q).tensors["blocks"]
        if not 0 <= a < b <= blocks.shape[0]:
            raise ValueError(f"rows {a}:{b} of a {self.name} tensor of {blocks.shape[0]} rows")
        return QuantizedTensor(q.spec, (b - a, q.shape[-1]), {"blocks": blocks[a:b]})

    def _own(self, q: QuantizedTensor) -> QuantizedTensor:
        if q.spec != self.name:
            raise SpecError(f"{q.spec} tensor passed to {self.name}; use its own format, get(q.spec)")
        return q


# ---- ggml's searches, over the last axis and vectorized over all others ---------------------------------


# lighten's symmetric ints (code c times an fp16 scale) and the GGUF type storing the same numbers in blocks
# of 32: q8_0 holds c as int8, q5_0 / q4_0 as c + 16 / c + 8, each block with its fp16 scale d.
TWINS = {"int8": "q8_0", "int5": "q5_0", "int4": "q4_0"}


def twin_type(spec: str, shape) -> str | None:
    """The GGUF type that stores exactly the numbers of a tensor of `spec` and `shape` (as_gguf), or None."""
    from lighten.formats import get

    fmt = get(spec)
    if fmt.family not in TWINS:
        return None
    k = shape[-1]
    group = {"channel": k}.get(fmt.granularity) or fmt.granularity[:1] == "g" and int(fmt.granularity[1:])
    whole_blocks = bool(group) and k % 32 == 0 and group % 32 == 0  # every group whole blocks, the last too
    exact = not (fmt.asym or fmt.dq) and whole_blocks
    return TWINS[fmt.family] if exact else None


def as_gguf(q: QuantizedTensor) -> QuantizedTensor:
    """q (symmetric int8 / int5 / int4 whose groups are whole blocks of 32: twin_type) as the GGUF blocks of
    its twin type, holding the same numbers: the same codes, each group's fp16 scale in each of its blocks."""
    from lighten.formats import get

    kind = twin_type(q.spec, q.shape)
    if kind is None:
        raise SpecError(f"{q.spec} of shape {tuple(q.shape)} has no GGUF type with the same numbers")
    fmt = get(q.spec)
    bits = fmt.element.bits
    rows, k, g, groups = fmt.geometry(tuple(q.shape))
    scale, _ = fmt.scale_zero(q)  # fp32 of the stored fp16: exact both ways
    blocks_per_group = (k - g * torch.arange(groups)).clamp(max=g) // 32  # the last group may be shorter
    d = scale.repeat_interleave(blocks_per_group, 1).numpy()[..., None]  # (rows, blocks, 1)
    codes = fmt.codes(q).numpy().astype(np.int16)
    codes = (codes - ((codes >> (bits - 1)) << bits)).reshape(rows, k // 32, 1, 32)  # two's complement
    if kind == "q8_0":
        blocks = _rows([_f16(d), codes.astype(np.int8)])
    else:
        nmax = 2**bits - 1
        blocks = _legacy_blocks([_f16(d)], codes + (nmax + 1) // 2, nmax)
    return QuantizedTensor(kind, tuple(q.shape), {"blocks": torch.from_numpy(blocks)})


def make_qx_quants(x, nmax: int, w):
    """make_qx_quants, rmse_type 1: symmetric scale d and codes L in [0, 2 nmax) with x ~ d (L - nmax); 19
    scales around -nmax / (signed absmax) are tried, keeping the least w-weighted squared error."""
    mx = _signed_absmax(x)
    zero = np.abs(mx) < EPS
    mx = np.where(zero, 1, mx)[..., None]

    def fit(iscale):
        q = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        return q, (w * x * q).sum(-1), (w * q * q).sum(-1)

    q, sumlx, suml2 = fit(-nmax / mx)
    scale = np.where(suml2 > 0, sumlx / suml2, 0)
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        cand, slx, sl2 = fit(-(nmax + np.float32(0.1) * step) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        q = np.where(better[..., None], cand, q)
        scale = np.where(better, slx / sl2, scale)
        best = np.where(better, scale * slx, best)
    return np.where(zero, 0, scale).astype(np.float32), np.where(zero[..., None], 0, q + nmax)


def make_q3_quants(x, nmax: int):
    """make_q3_quants with do_rmse: symmetric codes refined one at a time under x^2 weights; L in
    [0, 2 nmax)."""
    mx = _signed_absmax(x)
    zero = np.abs(mx) < EPS
    q = np.clip(np.rint(-nmax / np.where(zero, 1, mx)[..., None] * x), -nmax, nmax - 1)
    scale, q = _refine(x, x * x, q, -nmax, nmax - 1)
    return np.where(zero, 0, scale), np.where(zero[..., None], 0, q + nmax)


def make_qp_quants(x, nmax: int, w):
    """make_qp_quants: the codes L in [0, nmax] of non-negative x (sub-block scales or mins) and their scale,
    from 9 trial scales and then one-at-a-time refinement, under weights w."""
    mx = np.maximum(x.max(-1), 0)
    zero = mx < EPS
    mx = np.where(zero, 1, mx)[..., None]
    iscale = nmax / mx
    best = (w * np.square(x - np.rint(iscale * x) / iscale)).sum(-1)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = (np.float32(0.1) * step + nmax) / mx
        mse = (w * np.square(x - np.minimum(nmax, np.rint(trial * x)) / trial)).sum(-1)
        iscale = np.where((mse < best)[..., None], trial, iscale)
        best = np.minimum(mse, best)
    scale, q = _refine(x, w, np.minimum(nmax, np.rint(iscale * x)), 0, nmax)
    return np.where(zero, 0, scale), np.where(zero[..., None], 0, q).astype(np.uint8)


def _refine(x, w, q, lo: int, hi: int):
    """The coordinate search of make_q3_quants and make_qp_quants: each code in turn moves to the value that
    best fits the others' least-squares scale, if that raises sum(wxq)^2 / sum(wq^2); five passes."""
    q = q.copy()
    sumlx, suml2 = (w * x * q).sum(-1), (w * q * q).sum(-1)
    for _ in range(5):
        changed = False
        for i in range(x.shape[-1]):
            wi, xi, qi = w[..., i], x[..., i], q[..., i]
            slx, sl2 = sumlx - wi * xi * qi, suml2 - wi * qi * qi
            new = np.clip(np.rint(xi * sl2 / slx), lo, hi)
            slx_new, sl2_new = slx + wi * xi * new, sl2 + wi * new * new
            ok = (slx > 0) & (sl2 > 0) & (new != qi) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            q[..., i] = np.where(ok, new, qi)
            sumlx, suml2 = np.where(ok, slx_new, sumlx), np.where(ok, sl2_new, suml2)
            changed = changed or bool(ok.any())
        if not changed:
            break
    return np.where(suml2 > 0, sumlx / suml2, 0).astype(np.float32), q


def make_qkx_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """make_qkx2_quants / make_qkx3_quants (the same search; only their guards against degenerate blocks
    differ, and this takes qkx3's): x ~ scale * L - the_min with L in [0, nmax] and min <= 0, from min-max
    rounding and nstep + 1 least-squares refits of (scale, min) for wider or narrower grids.
    Returns (scale, the_min, L)."""
    rmin, rdelta = np.float32(rmin), np.float32(rdelta)
    mn, mx = np.minimum(x.min(-1), 0), x.max(-1)
    flat = mx <= mn
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)

    def error(scale, q, m):
        diff = scale[..., None] * q + m[..., None] - x
        return (w * (np.abs(diff) if use_mad else diff * diff)).sum(-1)

    iscale = nmax / np.where(flat, 1, mx - mn)
    q = np.clip(np.rint(iscale[..., None] * (x - mn[..., None])), 0, nmax)
    scale = 1 / iscale
    best = error(scale, q, mn)
    for step in range(nstep + 1):
        v = ((rmin + rdelta * step + nmax) / (mx - mn))[..., None] * (x - mn[..., None])  # mn: best so far
        cand = np.where(v > 0, np.rint(np.minimum(v, nmax)), 0)
        sum_l, sum_l2, sum_xl = (w * cand).sum(-1), (w * cand * cand).sum(-1), (w * cand * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        this_scale = np.where(this_min > 0, sum_xl / sum_l2, this_scale)  # the min must stay <= 0
        this_min = np.minimum(this_min, 0)
        err = error(this_scale, cand, this_min)
        better = (det > 0) & (err < best) & ~flat
        q = np.where(better[..., None], cand, q)
        best, scale = np.where(better, err, best), np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale, q = np.where(flat, 0, scale).astype(np.float32), np.where(flat[..., None], 0, q)
    return scale, (-mn).astype(np.float32), q


def _signed_absmax(x):
    """The element of largest magnitude (the first of equals, as ggml's strict > keeps), with its sign."""
    return np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]


def _best_index(values, x):
    """ggml's best_index_int8: the nearest grid value's index, ties to the upper one, i.e. how many
    midpoints between neighbours are <= x. Twice the midpoints are integers (the grid is int8), so that
    count depends on floor(2x) alone: read from a table (6x faster than searchsorted on every element)."""
    twice = values[:-1] + values[1:]
    lo, hi = int(twice[0]) - 1, int(twice[-1])
    table = np.searchsorted(twice, np.arange(lo, hi + 1), side="right")
    k = np.clip(np.floor(x + x), lo, hi).astype(np.intp)
    k -= lo
    return table[k]


# ---- the types: rows (R, K) fp32 and importance (K,) or None -> BlockGrid ---------------------------------


def _weights(x, importance, sigma2):
    """ggml's importance weights: imatrix entry * sqrt(sigma2 + x^2), sigma2 a mean square of the row or
    super-block. importance is (K,), x is a row's blocks: the column of each element comes from x's shape."""
    return importance.reshape(x.shape[1:]) * np.sqrt(sigma2 + x * x)


def _q_legacy(nmax: int, asym: bool):
    """q4_0, q5_0 (symmetric) and q4_1, q5_1 (scale and min) in blocks of 32, importance-weighted
    (quantize_row_*_impl; without importance llama.cpp runs the *_ref rounding: GGMLFormat.quantize)."""

    def search(x, importance):
        xb = x.reshape(x.shape[0], -1, 1, 32)
        w = _weights(xb, importance, (x * x).mean(-1)[:, None, None, None])
        if asym:
            d, the_min, q = make_qkx_quants(xb, w, nmax, -0.9, 0.05, 36, False)
            head, step, offset = [_f16(d), _f16(-the_min)], _f16(d), _f16(-the_min)
            levels = np.arange(nmax + 1)
        else:
            half = (nmax + 1) // 2
            d, q = make_qx_quants(xb, half, w)
            head, step, offset = [_f16(d)], _f16(d), np.zeros_like(d)
            levels = np.arange(-half, half)

        return _grid(step, offset, levels, q, lambda q: _legacy_blocks(head, q, nmax))

    return search


def _legacy_blocks(head: list, q, nmax: int):
    """q4_x / q5_x blocks: the fp16 head (d, or d and m), q5's fifth bits (weight j at bit j), the nibbles."""
    fifth = [np.packbits(q >> 4, -1, bitorder="little")] if nmax == 31 else []
    return _rows(head + fifth + [_nibbles(q, 16)])


def _q8_0(x, importance):
    """quantize_row_q8_0_ref's scale (llama.cpp ignores importance): absmax / 127, codes round(x / scale)."""
    xb = x.reshape(x.shape[0], -1, 1, 32)
    d = np.abs(xb).max(-1) / np.float32(127)
    q = quants.np_roundf(xb * _inverse(d)[..., None]) + 127
    pack = lambda q: _rows([_f16(d), (q.astype(np.int16) - 127).astype(np.int8)])  # noqa: E731
    return _grid(_f16(d), np.zeros_like(d), np.arange(-127, 128), q, pack)


def _q2_k(x, importance):
    xs = _super_blocks(x, 16)
    if importance is None:
        scales, mins, q = make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        ls, d = _scale_codes(scales, 15)
        lm, dmin = _scale_codes(mins, 15)
    else:
        w = _weights(xs, importance, (xs * xs).mean((-2, -1), keepdims=True))
        scales, mins, q = make_qkx_quants(xs, w, 3, -0.9, 0.05, 36, False)
        d, ls = make_qp_quants(scales, 15, w.sum(-1))
        dmin, lm = make_qp_quants(mins, 15, w.sum(-1))
    step, offset = _steps(d, ls, dmin, lm)
    q = _requantize(xs, q, step, offset, 0, 3)
    pack = lambda q: _rows([ls | (lm << 4), _crumbs(q), _f16(d), _f16(dmin)])  # noqa: E731
    return _grid(step, offset, np.arange(4), q, pack)


def _q3_k(x, importance):
    xs = _super_blocks(x, 16)
    if importance is None:
        scales, q = make_q3_quants(xs, 4)
        top = _signed_absmax(scales)
        iscale = np.where(top != 0, -32 / np.where(top != 0, top, 1), 0)
        ls = (np.clip(np.rint(iscale[..., None] * scales), -32, 31) + 32).astype(np.uint8)
        d = np.where(top != 0, 1 / iscale, 0)
    else:
        w = _weights(xs, importance, 2 * (xs * xs).mean((-2, -1), keepdims=True))
        scales, q = make_qx_quants(xs, 4, w)
        d, ls = make_qx_quants(scales, 32, w.sum(-1))
        ls = ls.astype(np.uint8)
    step, offset = _steps(d, ls.astype(np.float32) - 32)
    q = _requantize(xs, q, step, offset, -4, 3)

    def pack(q):
        high = q > 3
        hmask = _bitplanes(
            high.reshape(*high.shape[:2], 8, 32), 1
        )  # bit 3 of weight 32 i + l: hmask[l] bit i
        scales_low = (ls[..., :8] & 0xF) | ((ls[..., 8:] & 0xF) << 4)
        scales_high = _bitplanes(ls.reshape(*ls.shape[:2], 4, 4) >> 4, 2)  # byte k: top bits of k, k+4, ..
        return _rows([hmask, _crumbs(q - 4 * high), scales_low, scales_high, _f16(d)])

    return _grid(step, offset, np.arange(-4, 4), q, pack)


def _q45_k(nmax: int, rmin: float, nstep: int):
    """q4_k (nmax 15) and q5_k (31): 8 sub-blocks of 32 with 6-bit scales and mins."""

    def search(x, importance):
        xs = _super_blocks(x, 32)
        if importance is None:
            w = np.sqrt((xs * xs).mean(-1, keepdims=True)) + np.abs(xs)
            scales, mins, q = make_qkx_quants(xs, w, nmax, rmin, 0.1, nstep, False)
            ls, d = _scale_codes(scales, 63)
            lm, dmin = _scale_codes(mins, 63)
        else:
            w = _weights(xs, importance, 2 * (xs * xs).mean((-2, -1), keepdims=True))
            scales, mins, q = make_qkx_quants(xs, w, nmax, -0.9, 0.05, 36, False)
            d, ls = make_qp_quants(scales, 63, w.sum(-1))
            dmin, lm = make_qp_quants(mins, 63, w.sum(-1))
        step, offset = _steps(d, ls, dmin, lm)
        q = _requantize(xs, q, step, offset, 0, nmax)

        def pack(q):
            k4 = [ls[..., :4] | ((ls[..., 4:] >> 4) << 6), lm[..., :4] | ((lm[..., 4:] >> 4) << 6)]
            k4.append((ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4))
            high = [_bitplanes((q >> 4).reshape(*q.shape[:2], 8, 32), 1)] if nmax == 31 else []
            return _rows([_f16(d), _f16(dmin), *k4, *high, _nibbles(q, 32)])

        return _grid(step, offset, np.arange(nmax + 1), q, pack)

    return search


def _q6_k(x, importance):
    xs = _super_blocks(x, 16)
    w = xs * xs if importance is None else np.broadcast_to(importance.reshape(xs.shape[1:]), xs.shape)
    scales, q = make_qx_quants(xs, 32, w)  # ggml passes the imatrix entries themselves here
    top = _signed_absmax(scales)
    zero = np.abs(top) < EPS
    iscale = -128 / np.where(zero, 1, top)
    sc = np.minimum(127, np.rint(iscale[..., None] * scales))
    d = _f16(1 / iscale)
    step, offset = _steps(d, sc)
    q = _requantize(xs, q, step, offset, -32, 31)

    def pack(q):
        blocks = _rows([_nibbles(q, 64), _crumbs(q >> 4), sc.astype(np.int8), d]).reshape(*zero.shape, -1)
        return np.where(zero[..., None], 0, blocks).reshape(x.shape[0], -1)  # ggml zeroes an all-zero block

    return _grid(np.where(zero[..., None], 0, step), offset, np.arange(-32, 32), q, pack)


def _iq4(super_size: int):
    """iq4_nl (one block of 32 with an fp16 scale) and iq4_xs (super-blocks of 256: 6-bit block scales)."""

    def search(x, importance):
        xs = _super_blocks(x, 32, super_size)
        sigma2 = 2 * (xs * xs).mean((-2, -1), keepdims=True)
        w = xs * xs if importance is None else _weights(xs, importance, sigma2)
        scales = _iq4_block_scales(xs, w)
        if super_size == 32:
            d = _f16(scales)
            q = _best_index(IQ4NL, _inverse(scales)[..., None] * xs)
            return _grid(d, np.zeros_like(scales), IQ4NL, q, lambda q: _rows([d, _nibbles(q, 16)]))
        d = -_signed_absmax(scales) / 32
        ls = np.clip(np.rint(_inverse(d)[..., None] * scales), -32, 31)
        q = _best_index(IQ4NL, _inverse(d[..., None] * ls)[..., None] * xs)
        codes = (ls + 32).astype(np.uint16)
        scales_h = ((codes >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(-1, dtype=np.uint16)
        scales_l = (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)
        step, offset = _steps(_f16(d), ls)
        pack = lambda q: _rows([_f16(d), scales_h, scales_l.astype(np.uint8), _nibbles(q, 16)])  # noqa: E731
        return _grid(step, offset, IQ4NL, q, pack)

    return search


def _iq4_block_scales(xs, w):
    """Each 32-block's scale on the kvalues_iq4nl grid: least squares for the grid indices of 15 trial scales
    around -max / -127, keeping the best (the indices themselves are chosen again from the final scale)."""
    mx = _signed_absmax(xs)
    zero = np.abs(mx) < EPS
    mx = np.where(zero, 1, mx)[..., None]

    def fit(inverse_scale):
        v = IQ4NL[_best_index(IQ4NL, inverse_scale * xs)]
        return (w * v * xs).sum(-1), (w * v * v).sum(-1)

    sumqx, sumq2 = fit(1 / (-mx / IQ4NL[0]))
    d = np.where(sumq2 > 0, sumqx / sumq2, 0)
    best = d * sumqx
    for step in range(-7, 8):
        sqx, sq2 = fit((step + IQ4NL[0]) / mx)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = np.where(better, sqx / sq2, d)
        best = np.where(better, d * sqx, best)
    return np.where(zero, 0, d).astype(np.float32)


# ---- packing helpers -------------------------------------------------------------------------------


def _super_blocks(x, sub: int, size: int = QK_K):
    """(R, K) -> (R, blocks per row, sub-blocks, sub) fp32."""
    return x.reshape(x.shape[0], -1, size // sub, sub)


def _scale_codes(s, nmax: int):
    """The k-quants' reference scale coding: codes round(nmax / max(s) * s), super-scale max(s) / nmax."""
    top = np.maximum(s.max(-1), 0)
    inverse = np.where(top > 0, nmax / np.where(top > 0, top, 1), 0)
    return np.minimum(nmax, np.rint(inverse[..., None] * s)).astype(np.uint8), top / np.float32(nmax)


def _steps(d, ls, dmin=None, lm=None):
    """(step, offset) of each sub-block from its super-block's fp16 scale and min and its own integer scale
    and min codes: x ~ d ls L - dmin lm."""
    step = _f16(d).astype(np.float32)[..., None] * ls
    offset = np.zeros_like(step) if dmin is None else -(_f16(dmin).astype(np.float32)[..., None] * lm)
    return step, offset


def _requantize(xs, q, step, offset, lo: int, hi: int):
    """Codes from the stored scales: round((x - offset) / step) into [lo, hi], stored minus lo (ggml divides,
    as here); a sub-block whose step is zero keeps the search's codes q (ggml skips it)."""
    step, offset = step[..., None], offset[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        new = np.clip(np.rint((xs - offset) / step), lo, hi) - lo
    return np.where(step != 0, new, q)


def _grid(step, offset, levels, q, pack) -> BlockGrid:
    f32 = np.float32
    return BlockGrid(step.astype(f32), offset.astype(f32), np.asarray(levels, f32), q.astype(np.uint8), pack)


def _inverse(a):
    return np.where(a != 0, 1 / np.where(a != 0, a, 1), 0).astype(np.float32)


def _f16(a):
    """fp16 values, stored as their bytes by _rows (GGML_FP32_TO_FP16 rounds to nearest even, as numpy)."""
    return np.asarray(a, np.float32).astype(np.float16)


def _nibbles(q, half: int):
    """Codes (R, blocks, n) in chunks of 2 * half: byte l of a chunk holds the low 4 bits of code l (low
    nibble) and of code l + half (high)."""
    q = (q.astype(np.uint8) & 0xF).reshape(*q.shape[:2], -1, 2, half)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*q.shape[:2], -1)


def _crumbs(q):
    """2-bit codes (R, blocks, n) in chunks of 128: byte l holds codes l, l + 32, l + 64, l + 96 at bits 0, 2,
    4, 6."""
    return _bitplanes(q.reshape(*q.shape[:2], -1, 4, 32), 2).reshape(*q.shape[:2], -1)


def _bitplanes(values, width: int):
    """values (..., n, m) of `width` bits (n * width <= 8) -> (..., m) bytes, value i of a column at bit
    width * i."""
    shifts = (width * np.arange(values.shape[-2], dtype=np.uint8))[:, None]
    return (values.astype(np.uint8) << shifts).sum(-2, dtype=np.uint8)


def _rows(parts):
    """Per-block parts (R, blocks, ...) of uint8, int8, uint16 or fp16, side by side as little-endian bytes:
    (R, bytes per row)."""
    flat = [np.ascontiguousarray(p).reshape(*p.shape[:2], -1).view(np.uint8) for p in parts]
    return np.concatenate(flat, -1).reshape(flat[0].shape[0], -1)


_SEARCHES = {
    "q4_0": _q_legacy(15, False),
    "q4_1": _q_legacy(15, True),
    "q5_0": _q_legacy(31, False),
    "q5_1": _q_legacy(31, True),
    "q8_0": _q8_0,
    "iq4_nl": _iq4(32),
    "iq4_xs": _iq4(QK_K),
    "q2_k": _q2_k,
    "q3_k": _q3_k,
    "q4_k": _q45_k(15, -1.0, 20),
    "q5_k": _q45_k(31, -0.5, 15),
    "q6_k": _q6_k,
}
