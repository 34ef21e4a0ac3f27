"""The lean decoder (lighten.runtime.decode) against the Hugging Face forward and generate of one model."""

import copy

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lighten.errors import ModelError
from lighten.plan import make_plan
from lighten.quantize import quantize_weights
from lighten.runtime import pack_model
from lighten.runtime.decode import Concat, Decoder, join_linears
from lighten.runtime.ggml import GGMLFunction
from lighten.runtime.linear import DequantLinear, Int4Linear, Int8Linear
from lighten.surgery import apply_surgery

# head_dim 32 with 2 KV heads: k and v have 64 rows, one block of torch's int4 layout, so q/k/v can join.
WIDE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
PROMPT = tiny_tokenizer()("the model is light and small and the weight is a number")["input_ids"]


def model_for(arch: str, spec: str | None):
    model = tiny_model(arch, **WIDE)
    if spec is None:
        return model  # fp32, unquantized
    # torch's kernels for lighten's ints (the bf16 path), whichever ggml's speed here (test_dispatch)
    return pack_model(model, quantize_weights(model, make_plan(model, spec)), kernels="torch")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", [None, "int4:g32", "int8", "nf4", "q4_0"])
def test_decoder_matches_hugging_face(arch, spec):
    model = model_for(arch, spec)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want_logits = model(ids).logits[0, -1].float()
        want_tokens = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    decoder = Decoder(model, max_len=64)
    # A GGUF type runs each block as ggml graphs (norms, matmuls, SiLU, residual adds); others on the modules.
    assert isinstance(decoder.blocks[0].rest, GGMLFunction) == (spec == "q4_0")
    got_logits = decoder.forward(ids[0], 0).float()
    # Same modules, same order of operations: fp32 agrees to rounding, bf16 to bf16's (attention's softmax
    # and RoPE may round at other places than transformers' own code).
    tol = 1e-5 if spec is None else 2**-6
    assert ((got_logits - want_logits).norm() / want_logits.norm()).item() < tol
    assert decoder.generate(PROMPT, 12).tokens == want_tokens[0, len(PROMPT) :].tolist()
    assert decoder.generate(PROMPT, 12).tokens == want_tokens[0, len(PROMPT) :].tolist()  # cache reused


@pytest.mark.parametrize(
    "spec,kind", [(None, torch.nn.Linear), ("int4:g32", Int4Linear), ("int8", Int8Linear)]
)
def test_join_linears_shares_the_weights_and_leaves_the_model_unchanged(spec, kind):
    model = model_for("llama", spec)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        before = model(ids).logits
    attn = model.model.layers[0].self_attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    weight_bytes = sum(p.weight.nbytes for p in parts)
    joined = join_linears(parts)
    assert type(joined) is kind
    x = torch.randn(3, 128, dtype=next(model.model.norm.parameters()).dtype)
    with torch.no_grad():
        assert torch.equal(joined(x), torch.cat([p(x) for p in parts], -1))
        assert torch.equal(model(ids).logits, before)
    # Each original weight is now a view into the joined one: no extra copy of the weights.
    storage = joined.weight.untyped_storage().data_ptr()
    assert all(p.weight.untyped_storage().data_ptr() == storage for p in parts)
    assert joined.weight.nbytes == weight_bytes


def test_layers_that_cannot_join_run_one_by_one():
    nf4 = model_for("llama", "nf4").model.layers[0].self_attn
    assert isinstance(nf4.q_proj, DequantLinear)
    assert isinstance(join_linears([nf4.q_proj, nf4.k_proj, nf4.v_proj]), Concat)
    narrow = tiny_model("llama")  # k/v have 32 rows: half a block of the int4 layout
    plan = make_plan(narrow, "int4:g32")
    narrow = pack_model(narrow, quantize_weights(narrow, plan), kernels="torch").model.layers[0]
    assert isinstance(join_linears([narrow.self_attn.k_proj, narrow.self_attn.v_proj]), Concat)
    hooked = model_for("llama", "int8").model.layers[0].self_attn
    hooked.q_proj.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    assert isinstance(join_linears([hooked.q_proj, hooked.k_proj, hooked.v_proj]), Concat)
    mixed = model_for("llama", "int8").model.layers[0].mlp
    mixed.up_proj = torch.nn.Linear(128, 256, bias=False, dtype=torch.bfloat16)
    assert isinstance(join_linears([mixed.gate_proj, mixed.up_proj]), Concat)


def test_online_rotation_keeps_its_layer_separate_and_output_exact():
    model = tiny_model("llama", **WIDE)
    apply_surgery(model, ["rotate"])  # attaches an online Hadamard to every down_proj
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = model(ids).logits[0, -1]
    decoder = Decoder(copy.deepcopy(model), max_len=64)
    got = decoder.forward(ids[0], 0)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_decoder_refuses_other_families_and_long_sequences():
    with pytest.raises(ModelError, match="Llama-family"):
        Decoder(tiny_model("gpt2"))
    with pytest.raises(ModelError, match="not gemma"):  # norms on sub-layer outputs: `run` uses generate
        Decoder(tiny_model("gemma2"))
    # Llama's structure, other numbers: seen by comparing with transformers' forward when built
    with pytest.raises(ModelError, match="does not compute this granite model as transformers does"):
        Decoder(tiny_model("granite"))
    with pytest.raises(ModelError, match="partial RoPE"):  # StableLM rotates a quarter of each head
        Decoder(tiny_model("stablelm"))
    decoder = Decoder(tiny_model("llama"), max_len=8)
    with pytest.raises(ModelError, match="8 positions"):
        decoder.generate(PROMPT, 4)
    with pytest.raises(ModelError, match="empty"):
        decoder.generate([], 4)


def test_generation_stops_at_the_stop_token():
    decoder = Decoder(tiny_model("llama"), max_len=64)
    tokens = decoder.generate(PROMPT, 12).tokens
    assert decoder.generate(PROMPT, 12, stop=tokens[2]).tokens == tokens[: tokens.index(tokens[2]) + 1]
