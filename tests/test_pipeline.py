"""quantize_to_dir: with surgery the checkpoint reloads to exactly the rewritten, quantized model; without it
the weights are read from the model's files (a block at a time when calibrating), to the same checkpoint."""

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny

from lighten import formats
from lighten.algorithms.calibrate import calibrate_model
from lighten.algorithms.registry import ALGORITHMS, get_algorithm
from lighten.checkpoint import WEIGHTS, load, read_manifest, save_checkpoint
from lighten.errors import LightenError
from lighten.eval.corpora import wiki_texts
from lighten.models import load_model
from lighten.pipeline import quantize_to_dir
from lighten.plan import make_plan
from lighten.quantize import quantize_weights
from lighten.recipes import recipe_from_options
from lighten.surgery import apply_surgery

IDS = torch.tensor([[4, 9, 17, 30, 5, 22, 8]])


def _randomize_norms(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


def test_fold_rotate_checkpoint_reloads_exactly(tmp_path):
    src = tmp_path / "src"
    save_tiny("llama", src)
    model, tokenizer = load_model(src)
    _randomize_norms(model).save_pretrained(src)
    out = quantize_to_dir(
        str(src), recipe_from_options("int8:channel", surgery=("fold", "rotate")), tmp_path / "q"
    )
    assert read_manifest(out)["recipe"]["surgery"] == ["fold", "rotate"]

    # Independent path: the same rewrites in memory, then each planned weight fake-quantized in place.
    expected, _ = load_model(src)
    apply_surgery(expected, ["fold", "rotate"])
    fmt = formats.get("int8:channel")
    with torch.no_grad():
        for name in make_plan(expected, "int8:channel"):
            w = expected.get_parameter(name)
            w.copy_(fmt.fake_quantize(w))
        want = expected(IDS).logits
        got = load(out)[0](IDS).logits
        packed = load(out, packed=True)[0](IDS).logits.float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (packed - want).abs().max() <= 0.05 * want.abs().max()  # bf16 runtime


def test_surgery_that_changes_the_architecture_is_refused_before_writing(tmp_path):
    src = save_tiny("gpt2", tmp_path / "src")
    with pytest.raises(LightenError, match="would not load back"):
        quantize_to_dir(str(src), recipe_from_options("int8", surgery=("fold", "rmsnorm")), tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_weights_read_from_the_files_make_the_in_memory_checkpoint(tmp_path, algorithm):
    src = save_tiny("llama", tmp_path / "src")
    recipe = recipe_from_options("int4:g32", algorithm, calibration_tokens=64)
    out = quantize_to_dir(str(src), recipe, tmp_path / "q")
    model, tokenizer = load_model(src)
    plan, texts = make_plan(model, "int4:g32"), wiki_texts("calibration")
    if algorithm == "rtn":
        quantized = quantize_weights(model, plan)
    else:
        quantized = calibrate_model(model, tokenizer, texts, plan, "gptq", 64, recipe.calibration.context)
    save_checkpoint(model, quantized, src, str(src), tmp_path / "want")
    got, want = load_file(out / WEIGHTS), load_file(tmp_path / "want" / WEIGHTS)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_any_registered_algorithm_runs_and_data_free_ones_read_no_text(tmp_path, monkeypatch):
    # A name the pipeline cannot know: it must go by what the Algorithm declares (here: collects nothing).
    monkeypatch.setitem(ALGORITHMS, "clip", ALGORITHMS["mse"])

    def no_text(split):
        raise AssertionError("calibration text read")

    monkeypatch.setattr("lighten.pipeline.wiki_texts", no_text)
    src = save_tiny("llama", tmp_path / "src")
    out = quantize_to_dir(str(src), recipe_from_options("int4:g32", "clip"), tmp_path / "q")
    model, _ = load_model(src)
    plan = make_plan(model, "int4:g32")
    want = quantize_weights(model, plan, quantize_weight=get_algorithm("mse").quantize_weight)
    save_checkpoint(model, want, src, str(src), tmp_path / "want")
    got, want = load_file(out / WEIGHTS), load_file(tmp_path / "want" / WEIGHTS)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
