"""GGUF block types (lighten.formats.ggml) against the gguf package, the field's reference: its block sizes,
its dequantizer (bit for bit) and, where it has one, its quantizer (byte for byte). The k-quant and iq4
searches, which gguf cannot run, are checked against plain round-to-nearest on the same grids."""

import gguf
import numpy as np
import pytest
import torch

from lighten.errors import SpecError
from lighten.formats import QuantizedTensor, get
from lighten.formats.ggml import IQ4NL, NO_GRID, TYPES, as_gguf, twin_type
from lighten.formats.spec import GGML, canonical

GGUF_QUANTIZES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "tq1_0", "tq2_0"]  # gguf.quants has an encoder
SEARCHED = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"]
WEIGHTED = ["q4_0", "q4_1", "q5_0", "q5_1", *SEARCHED]  # those whose search takes importance


def weights(rows=64, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * 0.02
    w[0, :40] = 0  # an all-zero block
    w[1, 3] = 0.5  # an outlier
    return w


def importance(k=512, seed=1):
    return torch.exp(torch.randn(k, generator=torch.Generator().manual_seed(seed)) * 1.5)


def rel_error(w, w_hat, imp=None):
    imp = 1 if imp is None else imp
    return (((w_hat - w) ** 2) * imp).sum().item() / ((w**2) * imp).sum().item()


def plain_rtn(name, w):
    """Round to nearest on a type's grid with fp32 sub-block scales (absmax / min-max; iq4: -max / -127 and
    the nearest grid value): better than any RTN that must also store its scales in 4..8 bits."""
    sub, kind, nmax = {
        "q2_k": (16, "asym", 3), "q3_k": (16, "sym", 4), "q4_k": (32, "asym", 15), "q5_k": (32, "asym", 31),
        "q6_k": (16, "sym", 32), "iq4_nl": (32, "nl", 127), "iq4_xs": (32, "nl", 127),
    }[name]  # fmt: skip
    b = w.double().numpy().reshape(-1, sub)
    if kind == "asym":
        lo, hi = np.minimum(b.min(-1, keepdims=True), 0), b.max(-1, keepdims=True)
        s = np.where(hi > lo, (hi - lo) / nmax, 1)
        out = np.clip(np.rint((b - lo) / s), 0, nmax) * s + lo
    else:
        top = np.take_along_axis(b, np.abs(b).argmax(-1)[:, None], -1)
        s = np.where(top != 0, top / -nmax, 1)
        if kind == "sym":
            out = np.clip(np.rint(b / s), -nmax, nmax - 1) * s
        else:
            grid = IQ4NL.astype(np.float64)
            out = grid[np.abs(b[..., None] / s[..., None] - grid).argmin(-1)] * s
    return torch.from_numpy(out.reshape(w.shape)).float()


def test_table_matches_gguf_and_the_spec_parser():
    assert tuple(TYPES) == GGML
    for name, (ggml_type, block, nbytes, *_) in TYPES.items():
        fmt = get(name.upper())
        assert fmt.name == canonical(f" {name.upper()} ") == name
        assert (block, nbytes) == gguf.GGML_QUANT_SIZES[ggml_type] == (fmt.block_size, fmt.block_bytes)
        assert fmt.bits_per_element == nbytes * 8 / block
    with pytest.raises(SpecError, match="fixed blocks"):
        get("q4_k:g128")


@pytest.mark.parametrize("name", GGML)
def test_blocks_decode_as_gguf_decodes_them(name):
    w = weights()
    for imp in (None, importance()):
        q = get(name).quantize(w, imp)
        blocks = q.tensors["blocks"]
        assert {"blocks": (blocks.dtype, tuple(blocks.shape))} == get(name).layout(w.shape)
        reference = gguf.quants.dequantize(blocks.numpy(), TYPES[name][0])
        assert torch.equal(q.dequantize(), torch.from_numpy(reference))
        assert q.nbytes * 8 == get(name).bits_per_element * w.numel()


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_without_importance_the_bytes_are_gguf_s(name):
    w = weights()
    expected = gguf.quants.quantize(w.numpy(), TYPES[name][0])
    assert np.array_equal(get(name).quantize(w).tensors["blocks"].numpy(), expected)


@pytest.mark.parametrize("name", SEARCHED)
def test_search_beats_plain_rtn(name):
    w = weights(seed=2)
    assert rel_error(w, get(name).fake_quantize(w)) < rel_error(w, plain_rtn(name, w))


@pytest.mark.parametrize("name", WEIGHTED)
def test_importance_lowers_the_weighted_error(name):
    w, imp = weights(seed=3), importance()
    fmt = get(name)
    assert rel_error(w, fmt.fake_quantize(w, imp), imp) < 0.9 * rel_error(w, fmt.fake_quantize(w), imp)


GRIDDED = [name for name in GGML if name not in NO_GRID]


@pytest.mark.parametrize("name", GRIDDED)
def test_grid_holds_the_searched_bytes_and_rounds_to_its_nearest_value(name):
    w, imp = weights(seed=4), importance()
    fmt = get(name)
    grid = fmt.grid(w, imp)
    searched = fmt.quantize(w, imp) if name != "q8_0" else fmt.quantize(w)  # q8_0 ignores importance
    assert np.array_equal(grid.packed(), searched.tensors["blocks"].numpy())
    # GPTQ's rounding: any values in place of w, here w perturbed, get codes whose grid values gguf decodes
    # from the packed bytes, and no other code of the book is nearer.
    x = (w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))).numpy()
    codes = grid.encode(x)
    decoded = gguf.quants.dequantize(grid.packed(codes), TYPES[name][0]).reshape(x.shape)
    np.testing.assert_allclose(grid.values(codes), decoded, rtol=1e-6, atol=1e-12)
    candidates = np.stack([grid.values(np.full(x.shape, c, np.uint8)) for c in range(len(grid.levels))])
    nearest = np.abs(candidates - x).min(0)
    assert (np.abs(grid.values(codes) - x) <= nearest * (1 + 1e-6) + 1e-12).all()
    # Columns are addressed by position: a slice of the columns rounds as the whole does.
    assert np.array_equal(grid.encode(x[:, 40:300], first=40), codes[:, 40:300])


def test_nearest_iq4_value_as_ggml_picks_it():
    """ggml's best_index_int8 on kvalues_iq4nl: the nearest value, a tie (x halfway) to the upper one; by
    hand at the ties and the ends, and against a brute-force nearest for many values."""
    from lighten.formats.ggml import _best_index

    ties = (IQ4NL[:-1] + IQ4NL[1:]) / 2  # -115.5, -93.5, ...: each goes to the upper neighbour
    assert _best_index(IQ4NL, ties).tolist() == list(range(1, 16))
    ends = np.array([-np.inf, -1e9, -127, -115.6, 113, 1e9, np.inf], np.float32)
    assert _best_index(IQ4NL, ends).tolist() == [0, 0, 0, 0, 15, 15, 15]
    x = np.random.default_rng(0).normal(0, 80, 100_000).astype(np.float32)
    distance = np.abs(x[:, None] - IQ4NL[None])
    brute = len(IQ4NL) - 1 - np.argmin(distance[:, ::-1], axis=1)  # the last (upper) of equally near
    assert np.array_equal(_best_index(IQ4NL, x), brute)


def test_ternary_types_have_no_grid():
    with pytest.raises(SpecError, match="no scale search"):
        get("tq2_0").grid(weights())


def test_importance_is_one_weight_per_input_column():
    with pytest.raises(ValueError, match="512 finite weights"):
        get("q4_k").quantize(weights(), torch.ones(256))
    with pytest.raises(ValueError, match="512 finite weights"):
        get("q4_k").quantize(weights(), -importance())


def test_rows_that_are_not_whole_blocks_name_llama_quantize_s_fallback():
    fallbacks = {name: get(name).fallback_for((8, 576)) for name in GGML}
    assert {name: f and f.name for name, f in fallbacks.items()} == {
        "q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0",
        "iq4_nl": "iq4_nl", "iq4_xs": "iq4_nl", "q2_k": "iq4_nl", "q3_k": "iq4_nl", "q4_k": "q5_0",
        "q5_k": "q5_1", "q6_k": "q8_0", "tq1_0": "q4_0", "tq2_0": "q4_0",
    }  # fmt: skip
    assert get("q4_k").fallback_for((8, 1536)).name == "q4_k"
    assert get("q4_k").fallback_for((8, 48)) is None and get("q4_0").fallback_for((8, 48)) is None
    with pytest.raises(SpecError, match="blocks of 256; rows of 576.*falls back to q5_0"):
        get("q4_k").quantize(torch.randn(4, 576))
    with pytest.raises(SpecError, match="blocks of 32; rows of 48.*keep it unquantized"):
        get("q4_0").quantize(torch.randn(4, 48))


def test_rows_slice_the_blocks_and_rebuild_from_stored_buffers():
    w = weights().view(2, 32, 512)
    q = get("q5_k").quantize(w)
    assert q.shape == (2, 32, 512) and get("q5_k").row_align(q.shape) == 1
    torch.testing.assert_close(q.rows(5, 40).dequantize(), q.dequantize().view(64, 512)[5:40], rtol=0, atol=0)
    again = QuantizedTensor.from_tensors("Q5_K", [2, 32, 512], dict(q.tensors))
    assert again.spec == "q5_k" and torch.equal(again.dequantize(), q.dequantize())
    with pytest.raises(SpecError):
        QuantizedTensor.from_tensors("q4_k", (2, 32, 512), dict(q.tensors))


@pytest.mark.real
@pytest.mark.parametrize("name", GGML)
def test_real_smollm2_rows(smollm2, name):
    """down_proj's 1536-wide rows are whole blocks of every type. Decoding is gguf's, bit for bit; the
    searches beat plain RTN and, given an importance, lower the error it weights."""
    w = smollm2[0].model.layers[5].mlp.down_proj.weight.detach()[:128]
    imp = importance(w.shape[1])
    fmt = get(name)
    q = fmt.quantize(w)
    reference = gguf.quants.dequantize(q.tensors["blocks"].numpy(), TYPES[name][0])
    assert torch.equal(q.dequantize(), torch.from_numpy(reference))
    if name in GGUF_QUANTIZES:
        assert np.array_equal(q.tensors["blocks"].numpy(), gguf.quants.quantize(w.numpy(), TYPES[name][0]))
    if name in SEARCHED:
        assert rel_error(w, q.dequantize()) < rel_error(w, plain_rtn(name, w))
    if name in WEIGHTED:
        assert rel_error(w, fmt.fake_quantize(w, imp), imp) < 0.9 * rel_error(w, q.dequantize(), imp)


@pytest.mark.parametrize(
    "spec,k,twin",
    [
        ("int8", 96, "q8_0"),  # per channel: the row's scale in each of its 3 blocks
        ("int8:g64", 96, "q8_0"),  # the last group 32 long: still whole blocks
        ("int5:g32", 64, "q5_0"),
        ("int4:g32", 64, "q4_0"),
        ("int4:g128", 256, "q4_0"),
        ("int4:channel", 160, "q4_0"),
    ],
)
def test_twins_hold_the_same_numbers(spec, k, twin):
    """lighten's decoder and gguf's, each on its own bytes, give the same fp32 values: both are c * d with
    the same code and fp16 scale."""
    q = get(spec).quantize(weights(rows=8, k=k))
    assert twin_type(q.spec, q.shape) == twin
    gguf_q = as_gguf(q)
    assert gguf_q.spec == twin and gguf_q.tensors["blocks"].shape == (8, k // 32 * TYPES[twin][2])
    assert torch.equal(gguf_q.dequantize(), q.dequantize())


def test_twin_bytes_by_hand():
    """int4:g32 codes -7..7 with scale 0.5 (fp16 0x3800): q4_0 stores d, then byte j = (c_j + 8) | (c_{j+16}
    + 8) << 4."""
    codes = torch.tensor([-7, 7] + [0] * 14 + [1, -1] + [0] * 14, dtype=torch.float32)
    q = get("int4:g32").quantize((codes * 0.5)[None])
    blocks = as_gguf(q).tensors["blocks"][0].tolist()
    assert blocks[:2] == [0x00, 0x38]  # fp16 0.5, little-endian
    assert blocks[2:4] == [(-7 + 8) | (1 + 8) << 4, (7 + 8) | (-1 + 8) << 4]
    assert blocks[4:] == [8 | 8 << 4] * 14


@pytest.mark.parametrize(
    "spec,k",
    [
        ("int4:g32:asym", 64),
        ("int4:g16", 64),
        ("int4:g64", 80),
        ("int8:tensor", 64),
        ("nf4", 64),
        ("q4_0", 64),
    ],
)
def test_no_twin_where_the_numbers_differ(spec, k):
    q = get(spec).quantize(weights(rows=4, k=k))
    assert twin_type(q.spec, q.shape) is None
    with pytest.raises(SpecError, match="no GGUF type"):
        as_gguf(q)
