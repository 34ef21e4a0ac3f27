"""ggml's CPU matmul on lighten's GGUF block bytes (lighten.runtime.ggml) against dequantize + matmul: the
same product up to ggml's rounding of each block of activations to 8 bits, which is bounded per output."""

import copy
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F

from lighten import formats
from lighten.errors import LightenError
from lighten.runtime.ggml import (
    GGMLFunction,
    GGMLMatrix,
    GGMLProduct,
    _ggml,
    ggml_owns_cores,
    set_threads,
    threads,
)

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
    y = matmul(GGMLMatrix(q.tensors["blocks"], spec, q.shape), x)
    exact, bound = exact_and_bound(q.dequantize(), x, fmt.block_size)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - exact).abs() <= bound).all(), ((y.double() - exact).abs() / bound).max()
    # The bound is tight enough to tell a wrong layout: the rows of another weight miss it everywhere.
    other = fmt.quantize(weights_and_inputs(n, k, m, seed=1)[0])
    assert ((matmul(GGMLMatrix(other.tensors["blocks"], spec, q.shape), x) - exact).abs() > bound).any()


def matmul(w: GGMLMatrix, x: torch.Tensor) -> torch.Tensor:
    return GGMLProduct([w]).matmul(x)


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
    for y in (matmul(repacked, x), matmul(plain, x)):
        assert ((y.double() - exact).abs() <= bound).all()


def test_products_side_by_side_are_the_products_of_each():
    """Weights of different types and widths in one product: each one's output in its own columns, the
    same numbers as alone (ggml rounds the activations once per product, as it would for each)."""
    x = weights_and_inputs(8, 256, 3)[1]
    parts = []
    for seed, (spec, n) in enumerate([("q4_0", 40), ("q6_k", 24), ("q8_0", 8)]):
        w = weights_and_inputs(n, 256, 1, seed=seed)[0]
        parts.append(GGMLMatrix(formats.get(spec).quantize(w).tensors["blocks"], spec, (n, 256)))
    for m in (1, 3):
        y = GGMLProduct(parts).matmul(x[:m])
        assert torch.equal(y, torch.cat([matmul(w, x[:m]) for w in parts], 1))
    with pytest.raises(LightenError, match="one input width"):
        narrow = formats.get("q4_0").quantize(torch.randn(40, 32))
        GGMLProduct([parts[0], GGMLMatrix(narrow.tensors["blocks"], "q4_0", (40, 32))])


def test_batch_sizes_and_thread_counts():
    w, x = weights_and_inputs(48, 64, 1)
    q = formats.get("q8_0").quantize(w)
    product = GGMLProduct([GGMLMatrix(q.tensors["blocks"], "q8_0", q.shape)])
    first = product.matmul(x)
    kept = product._decode_graph
    for m in range(2, 6):  # graphs built for the call and freed; decode's stays
        xs = x.expand(m, -1)
        assert torch.equal(product.matmul(xs), first.expand(m, -1))
    assert product._decode_graph is kept and torch.equal(product.matmul(x), first)
    before = threads()
    try:
        for n in (1, 3, 2):  # a new pool each time; the old one is freed, not in use
            set_threads(n)
            assert threads() == n and torch.equal(product.matmul(x), first)
    finally:
        set_threads(before)
    with pytest.raises(LightenError, match="at least 1 thread"):
        set_threads(0)


def test_one_owner_of_the_cores_and_no_deadlock():
    """Inside ggml_owns_cores torch runs single-threaded beside ggml's pool, and its thread count comes back
    afterwards, also after an error. Many short products from two Python threads one after another (ggml's
    backend is not reentrant: lighten calls it from one thread at a time) finish: nothing waits forever."""
    w, x = weights_and_inputs(64, 256, 1)
    product = GGMLProduct([GGMLMatrix(formats.get("q4_0").quantize(w).tensors["blocks"], "q4_0", (64, 256))])
    expected = product.matmul(x)
    torch.set_num_threads(2)
    with pytest.raises(ValueError), ggml_owns_cores():
        assert torch.get_num_threads() == 1
        raise ValueError
    assert torch.get_num_threads() == 2
    results, lock = [], threading.Lock()

    def run():
        for _ in range(200):
            with lock, ggml_owns_cores():
                results.append(torch.equal(product.matmul(x), expected))

    workers = [threading.Thread(target=run) for _ in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in workers) and len(results) == 400 and all(results)


def test_copies_share_the_weights_and_pickling_is_refused():
    w, x = weights_and_inputs(16, 64, 2)
    matrix = GGMLMatrix(formats.get("q4_0").quantize(w).tensors["blocks"], "q4_0", (16, 64))
    product = GGMLProduct([matrix])
    twin = copy.deepcopy(product)
    assert twin is not product and twin.matrices[0] is matrix
    assert torch.equal(twin.matmul(x), product.matmul(x))
    for thing in (matrix, product):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(thing)


def test_mistakes_are_refused():
    q = formats.get("q4_0").quantize(torch.randn(8, 64))
    blocks = q.tensors["blocks"]
    with pytest.raises(LightenError, match="not a q4_0 matrix of shape"):
        GGMLMatrix(blocks[:4], "q4_0", q.shape)
    with pytest.raises(LightenError, match="not a GGUF block type"):
        GGMLMatrix(blocks, "int4:g32", q.shape)
    product = GGMLProduct([GGMLMatrix(blocks, "q4_0", q.shape)])
    with pytest.raises(LightenError, match=r"fp32 \[m, 64\]"):
        product.matmul(torch.randn(2, 64, dtype=torch.bfloat16))
    with pytest.raises(LightenError, match=r"fp32 \[m, 64\]"):
        product.matmul(torch.randn(2, 32))


@pytest.mark.parametrize("m", [1, 3])  # decode's kept graph, and one built for the call
def test_graph_ops_match_torch(m):
    """GGMLFunction's other ops in fp32 (no 8-bit activations where no GGUF weight is involved): RMSNorm with
    a gain, SwiGLU, the residual add, and the batched product of graph tensors (RoPE's per-position
    matrices), against torch's own ops."""
    g = torch.Generator().manual_seed(0)
    x, y, gain = (torch.randn(m, 64, generator=g) for _ in range(3))
    ops = GGMLFunction(
        [64, 64], 192, lambda g, x, y: [g.rms_norm(x, gain[0], 1e-6), g.swiglu(x, y), g.add(x, y)]
    )
    want = torch.cat([F.rms_norm(x, (64,), gain[0], 1e-6), F.silu(x) * y, x + y], 1)
    torch.testing.assert_close(ops(x, y), want, rtol=1e-5, atol=1e-6)
    rows, rope = torch.randn(m, 2, 8, generator=g), torch.randn(m, 8, 8, generator=g)
    batched = GGMLFunction([16, 64], 16, lambda g, x, r: [g.matmul(g.rows_of(r, 8, 8), g.rows_of(x, 2, 8))])
    got = batched(rows.view(m, 16), rope.view(m, 64)).view(m, 2, 8)
    torch.testing.assert_close(got, rows @ rope.mT, rtol=1e-5, atol=1e-6)


def test_outputs_go_where_they_are_asked_to():
    x = torch.randn(1, 64)
    w = GGMLMatrix(formats.get("q8_0").quantize(torch.randn(32, 64)).tensors["blocks"], "q8_0", (32, 64))
    f = GGMLFunction([64], 96, lambda g, x: [g.matmul(w, x), g.add(x, x)])
    cache = torch.zeros(4, 64)
    first = torch.empty(1, 32)
    assert f(x, out=[first, cache[2:3]]) is None
    torch.testing.assert_close(torch.cat([first, cache[2:3]], 1), f(x))
    assert cache[[0, 1, 3]].eq(0).all() and torch.equal(cache[2], 2 * x[0])
    with pytest.raises(LightenError, match="2 contiguous fp32 outputs of 1 rows"):
        f(x, out=[first, cache[:, :8]])  # a strided view would be written as if it were contiguous
    with pytest.raises(LightenError, match=r"takes fp32 \[m, 64\]"):
        f(x, x)
