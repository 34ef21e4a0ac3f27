"""Minifloat element codecs against torch's fp8 and hand-derived OCP tables."""

import itertools
import math

import pytest
import torch

from lighten.formats.elements import MINIFLOATS

TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

# Positive values of codes 0, 1, 2, ... derived by hand from the OCP MX v1.0 definitions:
# value = 2^(E - bias) * 1.M for E > 0, 2^(1 - bias) * 0.M for E == 0; no inf/NaN encodings.
FP4_E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]  # bias 1
FP6_E2M3 = [  # bias 1: subnormal step 1/8
    0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875,
    1, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,
    2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75,
    4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5,
]  # fmt: skip
FP6_E3M2 = [  # bias 3: subnormal step 1/16
    0, 0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375,
    0.5, 0.625, 0.75, 0.875, 1, 1.25, 1.5, 1.75,
    2, 2.5, 3, 3.5, 4, 5, 6, 7,
    8, 10, 12, 14, 16, 20, 24, 28,
]  # fmt: skip
TABLES = {"fp4_e2m1": FP4_E2M1, "fp6_e2m3": FP6_E2M3, "fp6_e3m2": FP6_E3M2}


@pytest.mark.parametrize("name", TORCH_FP8)
def test_fp8_decode_all_256_codes_matches_torch(name):
    codes = torch.arange(256, dtype=torch.uint8)
    ours = MINIFLOATS[name].decode(codes)
    theirs = codes.view(TORCH_FP8[name]).float()
    assert torch.equal(ours.isnan(), theirs.isnan())
    ok = ~theirs.isnan()
    assert torch.equal(ours[ok], theirs[ok])
    assert torch.equal(ours[ok].signbit(), theirs[ok].signbit())


def fp8_probe_values(name):
    """Random values over the whole range plus every tie, tie +- 1 ulp, subnormals, > max."""
    fmt = MINIFLOATS[name]
    grid = fmt.decode(torch.arange(128, dtype=torch.uint8))
    grid = grid[grid.isfinite()].sort().values
    mids = (grid[1:] + grid[:-1]) / 2  # exact in fp32: the ties
    inf = torch.tensor(math.inf)
    near = torch.cat([mids, mids.nextafter(inf), mids.nextafter(-inf), grid])
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-24, 18, (20000,), generator=g).float())
    beyond = torch.tensor([fmt.max_value * 1.01, fmt.max_value * 1.2, 1e30, math.inf, 0.0])
    pos = torch.cat([near, rand.abs(), beyond])
    return torch.cat([pos, -pos])


@pytest.mark.parametrize("name", TORCH_FP8)
def test_fp8_encode_matches_torch_rne(name):
    fmt = MINIFLOATS[name]
    x = fp8_probe_values(name)
    ours = fmt.encode(x)
    # torch overflows e5m2 to inf (and e4m3fn out-of-range casts are not saturating by
    # contract), so saturate first; the rounding inside the range is what is compared.
    theirs = x.clamp(-fmt.max_value, fmt.max_value).to(TORCH_FP8[name]).view(torch.uint8)
    bad = (ours != theirs).nonzero().flatten()
    examples = zip(x[bad][:5].tolist(), ours[bad][:5].tolist(), theirs[bad][:5].tolist(), strict=True)
    assert bad.numel() == 0, list(examples)


@pytest.mark.parametrize("name", TABLES)
def test_small_minifloat_decode_table(name):
    table = torch.tensor(TABLES[name])
    half = len(table)
    fmt = MINIFLOATS[name]
    assert torch.equal(fmt.decode(torch.arange(half, dtype=torch.uint8)), table)
    assert torch.equal(fmt.decode(torch.arange(half, 2 * half, dtype=torch.uint8)), -table)
    assert fmt.max_value == TABLES[name][-1] and fmt.levels == 2 * half - 1


@pytest.mark.parametrize("name", TABLES)
def test_small_minifloat_encode_is_nearest_ties_to_even_code(name):
    table = TABLES[name]
    fmt = MINIFLOATS[name]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(table)]
    # a tie between codes i and i+1 goes to the even code (even mantissa); codes are monotone
    expect_mid = [i if i % 2 == 0 else i + 1 for i in range(len(mids))]
    x = torch.tensor(table + mids + [table[-1] * 1.5, 1e9])
    expect = list(range(len(table))) + expect_mid + [len(table) - 1] * 2
    assert fmt.encode(x).tolist() == expect
    sign = len(table)  # the sign bit
    assert fmt.encode(-x).tolist() == [c + sign for c in expect]


def test_fp4_tie_cases_by_hand():
    fp4 = MINIFLOATS["fp4_e2m1"]
    x = torch.tensor([2.5, 3.5, 5.0, 0.25, 0.75, 1.25, 1.75, 7.0, 100.0, -5.0, -0.25])
    assert fp4.decode(fp4.encode(x)).tolist() == [2, 4, 4, 0, 1, 1, 2, 6, 6, -4, -0.0]
