import pytest
import torch
from safetensors.torch import load_file, save_file

from lighten.errors import SpecError
from lighten.formats import QuantizedTensor, get, list_formats

# default spec -> (bits_per_element, levels, max_value), worked out from the docs by hand
DEFAULTS = {
    "int2:g128:sym": (2 + 16 / 128, 3, 1),
    "int3:g128:sym": (3 + 16 / 128, 7, 3),
    "int4:g128:sym": (4 + 16 / 128, 15, 7),
    "int5:g128:sym": (5 + 16 / 128, 31, 15),
    "int6:g128:sym": (6 + 16 / 128, 63, 31),
    "int7:g128:sym": (7 + 16 / 128, 127, 63),
    "int8:channel:sym": (8, 255, 127),
    "fp8_e4m3:channel": (8, 253, 448),  # 256 - 2 NaN - (-0)
    "fp8_e5m2:channel": (8, 247, 57344),  # 256 - 2 inf - 6 NaN - (-0)
    "fp6_e3m2:g32": (6.5, 63, 28),
    "fp6_e2m3:g32": (6.5, 63, 7.5),
    "fp4_e2m1:g32": (4.5, 15, 6),
    "mxfp8_e4m3:g32": (8.25, 253, 448),
    "mxfp8_e5m2:g32": (8.25, 247, 57344),
    "mxfp6_e3m2:g32": (6.25, 63, 28),
    "mxfp6_e2m3:g32": (6.25, 63, 7.5),
    "mxfp4:g32": (4.25, 15, 6),
    "mxint8:g32": (8.25, 255, 127 / 64),
    "nf4:g64": (4.5, 16, 1),
    "ternary:tensor": (1.6, 3, 1),
    "binary:channel": (1, 2, 1),
    # GGUF block types: bytes per block * 8 / weights per block (ggml-common.h)
    "q4_0": (18 * 8 / 32, 16, 8),
    "q4_1": (20 * 8 / 32, 16, 15),
    "q5_0": (22 * 8 / 32, 32, 16),
    "q5_1": (24 * 8 / 32, 32, 31),
    "q8_0": (34 * 8 / 32, 255, 127),
    "iq4_nl": (18 * 8 / 32, 16, 127),
    "iq4_xs": (136 * 8 / 256, 16, 127),
    "q2_k": (84 * 8 / 256, 4, 3),
    "q3_k": (110 * 8 / 256, 8, 4),
    "q4_k": (144 * 8 / 256, 16, 15),
    "q5_k": (176 * 8 / 256, 32, 31),
    "q6_k": (210 * 8 / 256, 64, 32),
    "tq1_0": (54 * 8 / 256, 3, 1),
    "tq2_0": (66 * 8 / 256, 3, 1),
}


def test_list_formats_defaults():
    assert [f.name for f in list_formats()] == list(DEFAULTS)
    for f in list_formats():
        assert (f.bits_per_element, f.levels, f.max_value) == pytest.approx(DEFAULTS[f.name], abs=1e-12)
        assert get(f.name) == f


@pytest.mark.parametrize(
    "spec, name",
    [
        ("int4", "int4:g128:sym"),
        ("int4:g128", "int4:g128:sym"),
        ("INT4:asym:g32", "int4:g32:asym"),
        ("int8:asym", "int8:channel:asym"),
        ("int3:tensor", "int3:tensor:sym"),
        ("mxfp8", "mxfp8_e4m3:g32"),
        ("mxfp4:g32", "mxfp4:g32"),
        ("nf4:dq", "nf4:g64:dq"),
        ("nf4:g128:dq", "nf4:g128:dq"),
        ("ternary:g64", "ternary:g64"),
        ("fp4_e2m1:channel", "fp4_e2m1:channel"),
    ],
)
def test_canonical_names(spec, name):
    assert get(spec).name == name and get(name) == get(spec)


def test_asym_and_dq_bits():
    assert get("int4:g32:asym").bits_per_element == 4 + (16 + 4) / 32
    assert get("nf4:dq").bits_per_element == pytest.approx(4.127, abs=5e-4)
    assert (get("int4:asym").levels, get("int4:asym").max_value) == (16, 15)


@pytest.mark.parametrize(
    "spec, hint",
    [
        ("int9", "int8"),
        ("foo", "Valid names"),
        ("int4:g0", "positive integer"),
        ("int4:g-3", "positive integer"),
        ("int4:gx", "positive integer"),
        ("fp8_e4m3:asym", "only to int2..int8"),
        ("mxfp4:g64", "fixed blocks of 32"),
        ("mxfp4:channel", "fixed blocks of 32"),
        ("int4:g128:sym:asym", "once"),
        ("int4:g128:g64", "once"),
        ("int4:dq", "only to nf4"),
        ("int4:fast", "unknown option"),
        ("", "Valid names"),
    ],
)
def test_bad_specs(spec, hint):
    with pytest.raises(SpecError, match=hint):
        get(spec)


def test_from_tensors_validates():
    q = get("int4:g32:asym").quantize(torch.randn(3, 100))
    t = q.tensors
    assert QuantizedTensor.from_tensors(q.spec, q.shape, t).nbytes == q.nbytes
    bad = [
        {k: v for k, v in t.items() if k != "zeros"},  # missing
        {**t, "extra": torch.zeros(1)},
        {**t, "scales": t["scales"].float()},  # dtype
        {**t, "codes": t["codes"][:-1]},  # size
    ]
    for tensors in bad:
        with pytest.raises(SpecError):
            QuantizedTensor.from_tensors(q.spec, q.shape, tensors)
    with pytest.raises(SpecError):
        QuantizedTensor.from_tensors(q.spec, (3, 99), t)
    with pytest.raises(SpecError):
        QuantizedTensor.from_tensors("int9", q.shape, t)


@pytest.mark.parametrize("spec", ["int3:g128:asym", "nf4:dq", "ternary", "mxfp6_e2m3"])
def test_safetensors_round_trip(tmp_path, spec):
    x = torch.randn(4, 576)
    q = get(spec).quantize(x)
    save_file(q.tensors, tmp_path / "q.safetensors")
    back = QuantizedTensor.from_tensors(q.spec, q.shape, load_file(tmp_path / "q.safetensors"))
    assert torch.equal(back.dequantize(), q.dequantize())
