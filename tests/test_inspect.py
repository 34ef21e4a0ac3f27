"""inspect on tiny models with a planted outlier channel (the oracle: we know where it is), and smoke tests
on the real built-in models."""

import json

import matplotlib.image
import pytest
import torch
from tiny_models import sample_text, tiny_model, tiny_tokenizer

from lighten import formats
from lighten.inspect import _rtn_error, inspect_model, inspect_table, plot_outliers
from lighten.models.arch import model_view

CHANNEL = 17


def _inspect(model, **kw):
    return inspect_model(
        model, tiny_tokenizer(), [sample_text(800)], n_tokens=400, context=100, samples=64, **kw
    )


def _site(report, block, kind):
    return next(s for s in report["sites"] if (s["block"], s["kind"]) == (block, kind))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_planted_gain_is_flagged_and_attributed_to_gamma(arch):
    model = tiny_model(arch)
    with torch.no_grad():
        model_view(model).blocks[1].mlp.norm.weight[CHANNEL] *= 50
    report = _inspect(model)
    planted, clean = _site(report, 1, "mlp"), _site(report, 0, "attn")
    x = planted["input"]
    assert x["top_channels"][0]["channel"] == CHANNEL and x["ratio"] > 20
    assert x["channels_over"] >= 1 and x["top_channels"][0]["tokens"] > 0.5 * x["n_tokens"]
    assert x["tokens_over"] >= x["top_channels"][0]["tokens"]
    assert planted["norm"]["top_channels"][0] == CHANNEL and planted["norm"]["percentile_at_outliers"][0] > 99
    assert planted["norm"]["max"] > 40 * planted["norm"]["median"]
    # The random model has no outlier of its own, and the planted one makes per-token activations harder.
    assert clean["input"]["channels_over"] == 0 and clean["input"]["ratio"] < 3
    assert x["rtn_error"]["int8:token"] > 2 * clean["input"]["rtn_error"]["int8:token"]
    assert report["summary"]["input_top_channels"][0]["channel"] == CHANNEL


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_planted_embedding_column_is_a_massive_residual_channel(arch):
    model = tiny_model(arch)
    with torch.no_grad():
        next(iter(model_view(model).embeddings.values())).weight[:, CHANNEL] *= 50
    report = _inspect(model)
    # Pre-norm: the column rides the residual stream through every block, into every norm's input.
    norm_sites = [s for s in report["sites"] if "norm" in s]
    top = report["summary"]["residual_top_channels"][0]
    assert top["channel"] == CHANNEL and top["sites"] == len(norm_sites)
    for s in norm_sites:
        assert s["residual"]["top_channels"][0]["channel"] == CHANNEL and s["residual"]["ratio"] > 10
    # RMS/LayerNorm scale it down to about sqrt(hidden) = 8: still an LLM.int8 outlier, with gains of 1.
    first = _site(report, 0, "attn")["input"]
    assert first["top_channels"][0]["channel"] == CHANNEL and first["channels_over"] == 1


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "bert"])
def test_report_table_and_plot(arch, tmp_path):
    report = _inspect(tiny_model(arch))
    json.dumps(report, allow_nan=False)
    n_blocks = len(model_view(tiny_model(arch)).blocks)
    assert len(report["sites"]) == 4 * n_blocks + (arch != "bert")  # + the final norm -> lm_head
    headers, rows = inspect_table(report)
    assert len(rows) == len(report["sites"]) and all(len(r) == len(headers) for r in rows)
    png = tmp_path / "outliers.png"
    plot_outliers(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).ndim == 3
    assert [p.name for p in tmp_path.iterdir()] == ["outliers.png"]  # no temp file left behind


@pytest.mark.parametrize("spec,bits,group", [("int8:channel", 8, None), ("int4:g128", 4, 128)])
def test_rtn_error_matches_the_lighten_format(spec, bits, group):
    # 300 columns: the last group of each row is short, as in SmolLM2's 576.
    w = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    w[3, 7] = 40.0
    exact = ((w - formats.get(spec).fake_quantize(w)).norm() / w.norm()).item()
    assert _rtn_error(w, bits, group) == pytest.approx(exact, rel=0.02)  # formats rounds scales up to fp16


def _smoke(model, tokenizer, texts, n_sites):
    report = inspect_model(model, tokenizer, texts, n_tokens=128, context=128, samples=16)
    json.dumps(report, allow_nan=False)
    assert len(report["sites"]) == n_sites
    assert {"input", "weight", "linears", "name"} <= report["sites"][0].keys()
    assert all(not m._forward_pre_hooks for m in model.modules())  # the shared model is left as it was
    return report


@pytest.mark.real
def test_smollm2_smoke(smollm2):
    model, tok = smollm2
    report = _smoke(model, tok, None, 4 * 30 + 1)  # None: the calibration split
    assert report["family"] == "llama" and report["sites"][-1]["linears"] == ["lm_head"]


@pytest.mark.real
def test_minilm_smoke(minilm):
    model, tok = minilm
    report = _smoke(model, tok, ["The light model was small and fast. " * 60], 4 * 6)
    assert report["family"] == "bert" and report["sites"][0]["name"] == "embeddings.LayerNorm"
