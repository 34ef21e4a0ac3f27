"""compressed-tensors export: lighten's codes carried over exactly, decoded by compressed-tensors itself."""

import json

import pytest
import torch
from broken_files import CORRUPTIONS, corrupt
from safetensors.torch import load_file
from tiny_models import save_tiny

from lighten import formats
from lighten.atomic import MARKER
from lighten.checkpoint import MANIFEST, WEIGHTS, load_checkpoint, save_checkpoint
from lighten.errors import LightenError, ModelError
from lighten.export.compressed_tensors import export_compressed_tensors
from lighten.formats import QuantizedTensor, packing
from lighten.models import load_model, resolve
from lighten.plan import make_plan
from lighten.quantize import quantize_weights

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import unpack_from_int32  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (  # noqa: E402
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

# compressed-tensors dequantizes in the scale's dtype: (q - zp) * scale is rounded to fp16 (our scales
# are lighten's fp16 ones), i.e. off by at most half an fp16 ulp from lighten's exact fp32 product.
FP16_RTOL, FP16_ATOL = 2.0**-11, 2.0**-25


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    src = save_tiny("llama", tmp_path_factory.mktemp("src") / "llama")
    return src, load_model(src)[0]


def _checkpoint(src, model, plan, out):
    save_checkpoint(model, quantize_weights(model, plan), src, str(src), out)
    return out


def _lighten_tensors(checkpoint):
    """name -> QuantizedTensor of every quantized weight, and the kept tensors, as lighten stores them."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    state = load_file(checkpoint / WEIGHTS)
    quantized = {
        name: QuantizedTensor.from_tensors(
            info["spec"], info["shape"], {k: state.pop(f"{name}.{k}") for k in info["keys"]}
        )
        for name, info in manifest["tensors"].items()
    }
    return quantized, state


def _assert_round_trip(checkpoint, out):
    """compressed-tensors' own decompression of `out` gives lighten's dequantized weights; codes and
    zero-points are bit-identical; kept tensors are untouched."""
    quantized, kept = _lighten_tensors(checkpoint)
    stored = load_file(out / WEIGHTS)
    decoded = CompressedTensorsDequantizer(out, dtype=torch.float32).validate(dict(stored))
    assert decoded.keys() == quantized.keys() | kept.keys()
    assert all(torch.equal(decoded[name], t) for name, t in kept.items())
    worst = 0.0
    for name, q in quantized.items():
        want = q.dequantize()
        err = (decoded[name] - want).abs()
        assert (err <= FP16_RTOL * want.abs() + FP16_ATOL).all(), name
        worst = max(worst, (err / want.abs().clamp(min=1e-30)).max().item())

        fmt, module = formats.get(q.spec), name.removesuffix(".weight")
        rows, k, _, groups = fmt.geometry(q.shape)
        bits, half = fmt.element.bits, 2 ** (fmt.element.bits - 1)
        # compressed-tensors' signed values: asym c - 2^(b-1), sym the two's complement code itself
        codes = packing.unpack_bits(q.tensors["codes"], bits, rows * k).view(rows, k).short()
        signed = codes - half if fmt.asym else (codes + half) % 2**bits - half
        unpacked = unpack_from_int32(stored[f"{module}.weight_packed"], bits, (rows, k))
        assert torch.equal(unpacked.short(), signed), name
        if fmt.asym:
            zeros = packing.unpack_bits(q.tensors["zeros"], bits, rows * groups).view(rows, groups).short()
            zp = unpack_from_int32(stored[f"{module}.weight_zero_point"], bits, (rows, groups), packed_dim=0)
            assert torch.equal(zp.short(), zeros - half), name
    return worst


@pytest.mark.parametrize(
    "spec", ["int4:g32:sym", "int4:g32:asym", "int8:channel:sym", "int4:channel:sym", "int8:g32:asym"]
)
def test_decompresses_to_lighten_weights(tmp_path, llama, spec):
    src, model = llama
    checkpoint = _checkpoint(src, model, make_plan(model, spec), tmp_path / "q")
    out = export_compressed_tensors(checkpoint, tmp_path / "ct")
    assert _assert_round_trip(checkpoint, out) <= FP16_RTOL


def test_config_and_files(tmp_path, llama):
    src, model = llama
    out = export_compressed_tensors(
        _checkpoint(src, model, make_plan(model, "int4:g32:asym"), tmp_path / "q"), tmp_path / "ct"
    )
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert (parsed.quant_method, parsed.format, parsed.quantization_status) == (
        "compressed-tensors",
        "pack-quantized",
        "compressed",
    )
    assert parsed.ignore == ["lm_head"]  # tied to the embeddings, kept in full precision
    (scheme,) = parsed.config_groups.values()
    assert scheme.targets == ["Linear"] and scheme.input_activations is None
    w = scheme.weights
    assert (w.num_bits, w.type, w.symmetric, w.strategy, w.group_size) == (4, "int", False, "group", 32)
    # config, weights, tokenizer, and the marker by which --force knows lighten wrote it
    assert {p.name for p in out.iterdir()} == {p.name for p in src.iterdir()} | {MARKER}
    assert not (out / MANIFEST).exists()


def test_mixed_formats_get_one_scheme_each(tmp_path, llama):
    src, model = llama
    plan = make_plan(model, "int4:g32")
    down = [name for name in plan if "down_proj" in name]
    plan.update(dict.fromkeys(down, "int8:channel:sym"))
    checkpoint = _checkpoint(src, model, plan, tmp_path / "q")
    out = export_compressed_tensors(checkpoint, tmp_path / "ct")
    groups = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]
    ).config_groups
    targets = {scheme.weights.num_bits: set(scheme.targets) for scheme in groups.values()}
    assert targets == {
        4: {n.removesuffix(".weight") for n in plan} - {n.removesuffix(".weight") for n in down},
        8: {n.removesuffix(".weight") for n in down},
    }
    _assert_round_trip(checkpoint, out)


def test_transformers_loads_the_export(tmp_path, llama):
    """transformers' compressed-tensors loader gives the same logits as lighten's own loader. Sym only:
    transformers cannot load asym pack-quantized (vllm-project/llm-compressor#1618); vLLM can."""
    from transformers import AutoModelForCausalLM

    src, model = llama
    checkpoint = _checkpoint(src, model, make_plan(model, "int4:g32:sym"), tmp_path / "q")
    out = export_compressed_tensors(checkpoint, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, load_checkpoint(checkpoint)[0](ids).logits)


@pytest.mark.parametrize(
    "arch,spec,message",
    [
        ("llama", "nf4", "GGUF"),
        ("llama", "q4_0", "GGUF"),
        ("llama", "int3:g32", "int4 and int8"),
        ("llama", "int8:tensor", "per channel or in groups"),
        ("llama", "int4:g48", "model.layers.0.self_attn.q_proj.weight"),
        ("gpt2", "int8:channel", "Conv1D"),
    ],
)
def test_refuses_what_it_cannot_carry_exactly(tmp_path, llama, arch, spec, message):
    src, model = llama if arch == "llama" else (save_tiny(arch, tmp_path / "src"), None)
    model = model or load_model(src)[0]
    checkpoint = _checkpoint(src, model, make_plan(model, spec), tmp_path / "q")
    with pytest.raises(LightenError, match=message):
        export_compressed_tensors(checkpoint, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, llama):
    with pytest.raises(LightenError, match="not a lighten checkpoint"):
        export_compressed_tensors(llama[0], tmp_path / "ct")


def test_refuses_a_rotated_checkpoint_whose_online_transforms_it_would_drop(tmp_path, llama):
    from lighten.pipeline import quantize_to_dir
    from lighten.recipes import recipe_from_options

    recipe = recipe_from_options("int4:g32", surgery=("fold", "rotate"))
    checkpoint = quantize_to_dir(str(llama[0]), recipe, tmp_path / "q")
    with pytest.raises(LightenError, match="compressed-tensors .and vLLM. cannot run.*fold,rotate_fused"):
        export_compressed_tensors(checkpoint, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    # The rotation fused into the weights leaves nothing to run at run time: it exports.
    recipe = recipe_from_options("int4:g32", surgery=("fold", "rotate_fused"))
    fused = quantize_to_dir(str(llama[0]), recipe, tmp_path / "fused")
    _assert_round_trip(fused, export_compressed_tensors(fused, tmp_path / "ct"))


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_refuses_corrupt_weights_naming_the_file(tmp_path, llama, corruption):
    src, model = llama
    checkpoint = _checkpoint(src, model, make_plan(model, "int8:channel"), tmp_path / "q")
    weights = corrupt(checkpoint / WEIGHTS, corruption)
    with pytest.raises(ModelError, match=f"{weights} is not a readable safetensors file"):
        export_compressed_tensors(checkpoint, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_refuses_a_broken_manifest(tmp_path, llama):
    src, model = llama
    checkpoint = _checkpoint(src, model, make_plan(model, "int8:channel"), tmp_path / "q")
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    next(iter(manifest["tensors"].values())).pop("shape")
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match='is broken: .*"shape"'):
        export_compressed_tensors(checkpoint, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_refuses_to_overwrite_without_force(tmp_path, llama):
    src, model = llama
    checkpoint = _checkpoint(src, model, make_plan(model, "int8:channel"), tmp_path / "q")
    export_compressed_tensors(checkpoint, tmp_path / "ct")
    with pytest.raises(LightenError, match="already exists"):
        export_compressed_tensors(checkpoint, tmp_path / "ct")
    export_compressed_tensors(checkpoint, tmp_path / "ct", force=True)


@pytest.mark.real
def test_minilm_int8_round_trip(tmp_path, minilm):
    model = minilm[0]
    checkpoint = _checkpoint(resolve("minilm"), model, make_plan(model, "int8:channel"), tmp_path / "q")
    out = export_compressed_tensors(checkpoint, tmp_path / "ct")
    assert _assert_round_trip(checkpoint, out) <= FP16_RTOL
