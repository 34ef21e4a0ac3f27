"""calibrate_model end to end on tiny models: plumbing against RTN, and GPTQ closer to fp32 than RTN."""

import copy

import pytest
import torch
from tiny_models import sample_text, save_tiny, tiny_model, tiny_tokenizer

from lighten.algorithms.calibrate import calibrate_model
from lighten.errors import LightenError
from lighten.models import load_model, open_weights
from lighten.plan import make_plan, plan_from_recipe
from lighten.quantize import dequantize_weight, quantize_weights
from lighten.recipes import parse_recipe

TEXTS = [sample_text(2000, seed=1)]
CALIB = dict(n_tokens=512, context=128)


def _logits(model, seed=7):
    ids = torch.tensor([tiny_tokenizer()(sample_text(200, seed=seed))["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state  # BertModel has no head


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rtn_through_calibrate_model_is_quantize_weights(arch):
    model = tiny_model(arch)
    plan = make_plan(model, "int4:g32")
    rtn = quantize_weights(model, plan)
    calibrated = copy.deepcopy(model)
    q = calibrate_model(calibrated, tiny_tokenizer(), TEXTS, plan, "rtn", **CALIB)
    assert list(q) == list(plan)
    for name, r in rtn.items():
        assert all(torch.equal(q[name].tensors[b], t) for b, t in r.tensors.items()), name
        # The model is left holding the dequantized weights.
        assert torch.equal(calibrated.get_parameter(name), dequantize_weight(model, name, r))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_logits_closer_to_fp32_than_rtn(arch):
    model, tok = tiny_model(arch, seed=3), tiny_tokenizer()
    plan = make_plan(model, "int3:g32")
    ref, errors = _logits(model), {}
    for algorithm in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        calibrate_model(m, tok, TEXTS, plan, algorithm, **CALIB)
        errors[algorithm] = (_logits(m) - ref).square().mean().item()
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


@pytest.mark.parametrize(
    "algorithm,arch",
    [("mse", "llama"), ("awq", "llama"), ("awq", "gpt2"), ("gptq", "qwen2"), ("gptq", "bert")],
)
def test_other_algorithms_run(algorithm, arch):
    model = tiny_model(arch)
    lm_head_too = {"format": "int4:g32", "rules": [{"pattern": "^lm_head", "format": "int4:g32"}]}
    plan = plan_from_recipe(model, parse_recipe(lm_head_too))  # outside the blocks, lm_head gets RTN
    q = calibrate_model(model, tiny_tokenizer(), TEXTS, plan, algorithm, **CALIB)
    assert list(q) == list(plan)
    assert _logits(model).isfinite().all()


@pytest.mark.parametrize(
    "arch,algorithm", [("llama", "gptq"), ("gpt2", "gptq"), ("bert", "gptq"), ("llama", "awq")]
)
def test_blocks_streamed_from_the_files_quantize_the_same(tmp_path, arch, algorithm):
    src = save_tiny(arch, tmp_path / "src")
    in_memory, tok = load_model(src)
    plan = make_plan(in_memory, "int4:g32")
    want = calibrate_model(in_memory, tok, TEXTS, plan, algorithm, **CALIB)
    streamed, _ = load_model(src)
    with open_weights(src) as weights:
        got = calibrate_model(streamed, tok, TEXTS, plan, algorithm, weights=weights, **CALIB)
    for name, q in want.items():
        assert all(torch.equal(got[name].tensors[k], t) for k, t in q.tensors.items()), name
    # The blocks' planned weights are dropped (the returned tensors are their only copy); everything else
    # (norms, AWQ's folded scales, weights outside the blocks) is what the in-memory run left.
    state, want_state = streamed.state_dict(), in_memory.state_dict()
    dropped = {k for k, t in state.items() if t.is_meta}
    assert dropped and dropped <= plan.keys()
    assert all(torch.equal(t, want_state[k]) for k, t in state.items() if k not in dropped)


def test_unknown_algorithm():
    model = tiny_model("llama")
    with pytest.raises(LightenError, match="gptq"):
        calibrate_model(model, tiny_tokenizer(), TEXTS, make_plan(model, "int4"), "smoothquant")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_windows_of_one_length_share_their_block_inputs_besides_the_hidden_states(arch):
    # 128 windows of 512 would otherwise hold 128 copies of the same rotary tables.
    from lighten.algorithms.calibrate import _block_inputs, _layer
    from lighten.models.arch import model_view

    model = tiny_model(arch)
    first = _layer(model, model_view(model).blocks[0])[1]
    windows = [torch.arange(40) % 30, torch.arange(40) % 20, torch.arange(25) % 20]
    (x0, args0, kw0), (x1, args1, kw1), (x2, _, kw2) = _block_inputs(model, first, windows)
    assert args1 is args0 and kw1 is kw0 and not torch.equal(x0, x1)
    assert kw2 is not kw0  # another length: its own positions
    # Running a block on the shared inputs gives what the model itself computes there.
    with torch.no_grad():
        hidden = model(input_ids=windows[1][None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(x1, hidden[0], rtol=0, atol=0)
