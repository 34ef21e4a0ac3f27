"""ggml's CPU matmul on lighten's GGUF block bytes (lighten.runtime.ggml) against dequantize + matmul: the
same product up to ggml's rounding of each block of activations to 8 bits, which is bounded per output."""

import pytest
import torch

from lighten import formats
from lighten.errors import LightenError
from lighten.runtime.ggml import GRAPHS_PER_MATRIX, GGMLMatrix, _ggml, set_threads

TYPES = "q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl iq4_xs q2_k q3_k q4_k q5_k q6_k tq1_0 tq2_0".split()


def weights_and_inputs(n: int, k: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 30  # an outlier channel: its blocks get a coarse activation step
    return w, x


def exact_and_bound(w_hat: torch.Tensor, x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x Ŵᵀ in fp64, how far ggml's may be from it) [m, n]: ggml rounds x in blocks of 32 (q8_0 / q8_1,
    for the 32-weight types) or 256 (q8_K, for the others) to int8 with step d = amax / 127, stored in
    fp16 for q8_0 / q8_1 (then |x - x̂| <= d/2 + 127 d 2^-11 < 0.6 d), then sums exact integer products in
    fp32."""
    m, k = x.shape
    step = x.abs().view(m, k // block, block).amax(-1) / 127
    per_element = 0.6 * step.repeat_interleave(block, 1)
    exact = w_hat.double() @ x.double().t()
    fp32 = 1e-5 * (w_hat.abs().double() @ x.abs().double().t())
    return exact.t(), (w_hat.abs().double() @ per_element.double().t() + fp32).t()


@pytest.mark.parametrize("spec", TYPES)
@pytest.mark.parametrize("n, blocks, m", [(40, 3, 1), (13, 2, 5), (64, 1, 17)])
def test_matches_dequantize_and_matmul_up_to_the_activation_rounding(spec, n, blocks, m):
    fmt = formats.get(spec)
    k = blocks * fmt.block_size
    w, x = weights_and_inputs(n, k, m)
    q = fmt.quantize(w)
    y = GGMLMatrix(q.tensors["blocks"], spec, q.shape).matmul(x)
    exact, bound = exact_and_bound(q.dequantize(), x, fmt.block_size)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - exact).abs() <= bound).all(), ((y.double() - exact).abs() / bound).max()
    # The bound is tight enough to tell a wrong layout: the rows of another weight miss it everywhere.
    other = fmt.quantize(weights_and_inputs(n, k, m, seed=1)[0])
    assert ((GGMLMatrix(other.tensors["blocks"], spec, q.shape).matmul(x) - exact).abs() > bound).any()


def test_the_repacked_layout_computes_what_the_plain_one_does():
    lib = _ggml()
    w, x = weights_and_inputs(64, 576, 3)
    q = formats.get("q4_0").quantize(w)
    blocks = q.tensors["blocks"].clone()  # torch's allocation: aligned as ggml wants (numpy's may not be)
    repacked = GGMLMatrix(blocks, "q4_0", q.shape)
    plain = GGMLMatrix(blocks, "q4_0", q.shape, repack=False)
    # ggml interleaves q4_0 rows by 4 or 8 on AVX2, AVX-512 and NEON; lighten turns it off on AMX CPUs.
    assert repacked.repacked == (lib.repack is not None) and not plain.repacked
    assert plain.data.data_ptr() == blocks.data_ptr()  # read in place, not copied
    exact, bound = exact_and_bound(q.dequantize(), x, 32)
    for y in (repacked.matmul(x), plain.matmul(x)):
        assert ((y.double() - exact).abs() <= bound).all()


def test_batch_sizes_beyond_the_kept_graphs_and_threads():
    w, x = weights_and_inputs(48, 64, 1)
    q = formats.get("q8_0").quantize(w)
    matrix = GGMLMatrix(q.tensors["blocks"], "q8_0", q.shape)
    first = matrix.matmul(x)
    for m in range(2, GRAPHS_PER_MATRIX + 3):  # evicts the graph of m = 1
        xs = x.expand(m, -1)
        assert torch.equal(matrix.matmul(xs), first.expand(m, -1))
    assert len(matrix._graphs) == GRAPHS_PER_MATRIX
    try:
        set_threads(1)
        assert torch.equal(matrix.matmul(x), first)
    finally:
        set_threads(torch.get_num_threads())
    with pytest.raises(LightenError, match="at least 1 thread"):
        set_threads(0)


def test_mistakes_are_refused():
    q = formats.get("q4_0").quantize(torch.randn(8, 64))
    blocks = q.tensors["blocks"]
    with pytest.raises(LightenError, match="not a q4_0 matrix of shape"):
        GGMLMatrix(blocks[:4], "q4_0", q.shape)
    with pytest.raises(LightenError, match="not a GGUF block type"):
        GGMLMatrix(blocks, "int4:g32", q.shape)
    matrix = GGMLMatrix(blocks, "q4_0", q.shape)
    with pytest.raises(LightenError, match=r"fp32 \[m, 64\]"):
        matrix.matmul(torch.randn(2, 64, dtype=torch.bfloat16))
    with pytest.raises(LightenError, match=r"fp32 \[m, 64\]"):
        matrix.matmul(torch.randn(2, 32))
