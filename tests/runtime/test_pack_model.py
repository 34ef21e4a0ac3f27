"""pack_model and load_checkpoint(packed=True): packed models match the dequantized ones and hold only packed
bytes for their quantized layers."""

import pytest
import torch
from tiny_models import save_tiny, tiny_model, tiny_tokenizer

from lighten.checkpoint import load, save_checkpoint
from lighten.errors import ModelError
from lighten.models import load_model
from lighten.plan import make_plan
from lighten.quantize import dequantize_weight, quantize_weights
from lighten.runtime import PackedLinear, meta_parameters, pack_model

# bf16 through two decoder layers: every matmul, norm and softmax rounds to bf16 (2^-9 relative) on
# both sides, at different places (the packed kernels round their scales, the reference its weights),
# and the differences compound through the residual stream; ~1e-2 of the logits' norm is that, while a
# wrong layer (a transposed Conv1D, a lost bias) moves the logits by their own size.
LOGITS_TOL = 2**-5
IDS = torch.tensor([tiny_tokenizer()("the model is light and small and the weight is a number")["input_ids"]])


def dequantized(model, quantized):
    with torch.no_grad():
        for name, q in quantized.items():
            model.get_parameter(name).copy_(dequantize_weight(model, name, q))
    return model.to(torch.bfloat16)


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(
    "spec,w8a8,outlier_threshold",
    [
        ("int4:g32", False, None),
        ("int8", False, None),
        ("int8", True, None),
        ("int8", True, 2.5),
        ("nf4", False, None),
    ],
)  # LLM.int8() at 2.5 takes ~12 % of the tiny model's input columns (~N(0, 1)) to fp32
def test_pack_model_matches_dequantized_model(spec, w8a8, outlier_threshold):
    model = tiny_model("llama")
    quantized = quantize_weights(model, make_plan(model, spec))
    reference = dequantized(tiny_model("llama"), quantized)
    # torch's kernels whatever ggml's speed here (the ints ggml could take: test_dispatch)
    packed = pack_model(model, quantized, w8a8=w8a8, outlier_threshold=outlier_threshold, kernels="torch")
    with torch.no_grad():
        got, want = packed(IDS).logits, reference(IDS).logits
    # W8A8 adds per-token activation rounding (up to 1/254 of each token's absmax per element) at every layer.
    assert rel_error(got, want) < (2 * LOGITS_TOL if w8a8 else LOGITS_TOL)
    for name, q in quantized.items():
        layer = packed.get_submodule(name.removesuffix(".weight"))
        assert isinstance(layer, PackedLinear)
        stored = list(layer.buffers())
        assert all(not t.is_floating_point() for t in stored)  # codes, scales: no float weight anywhere
        packed_bytes = sum(t.nbytes for t in stored)
        # int4 packs (scale, offset) pairs in bf16 where the file has one fp16 scale: +4/32 vs +2/32 bits
        assert q.nbytes <= packed_bytes <= 1.12 * q.nbytes, name
    assert {p.dtype for p in packed.parameters()} == {torch.bfloat16}


def test_planned_embeddings_are_dequantized_and_stay_tied():
    model = tiny_model("llama")
    quantized = quantize_weights(model, make_plan(model, "int4:g32", embeddings=True))
    reference = dequantized(tiny_model("llama"), quantized)
    packed = pack_model(model, quantized, kernels="torch")  # bf16 throughout
    embedding = packed.model.embed_tokens.weight
    assert packed.lm_head.weight is embedding
    assert torch.equal(embedding, quantized["model.embed_tokens.weight"].dequantize(torch.bfloat16))
    with torch.no_grad():
        assert rel_error(packed(IDS).logits, reference(IDS).logits) < LOGITS_TOL


@pytest.mark.parametrize(
    "arch,spec", [("llama", "int4:g32"), ("gpt2", "int8"), ("qwen2", "nf4"), ("bert", "mxfp4")]
)
def test_load_checkpoint_packed_matches_dequantized(tmp_path, arch, spec):
    src = save_tiny(arch, tmp_path / "src")
    model, _ = load_model(src)
    quantized = quantize_weights(model, make_plan(model, spec))
    save_checkpoint(model, quantized, src, str(src), tmp_path / "q")
    packed, _ = load(tmp_path / "q", packed=True)
    reference, _ = load(tmp_path / "q", dtype=torch.bfloat16)
    assert all(isinstance(packed.get_submodule(n.removesuffix(".weight")), PackedLinear) for n in quantized)
    assert not any(t.is_meta for t in [*packed.parameters(), *packed.buffers()])
    with torch.no_grad():
        got, want = packed(IDS)[0], reference(IDS)[0]
    assert rel_error(got, want) < LOGITS_TOL
    # Loading streams the file one tensor at a time; it must build, bit for bit, what packing in memory does.
    in_memory = pack_model(model, quantized)
    got_state, want_state = packed.state_dict(), in_memory.state_dict()
    assert got_state.keys() == want_state.keys()
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    with torch.no_grad():
        assert torch.equal(got, in_memory(IDS)[0])
    if arch == "llama":  # tied embeddings stay tied
        assert packed.lm_head.weight is packed.model.embed_tokens.weight


def test_load_packed_needs_a_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="not a lighten checkpoint"):
        load(save_tiny("llama", tmp_path / "src"), packed=True)


def test_meta_parameters_allocates_no_parameter_but_real_buffers():
    with meta_parameters():
        model = tiny_model("llama")
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # RoPE inv_freq is computed, not loaded
    assert not next(torch.nn.Linear(2, 2).parameters()).is_meta  # and the patch is gone
