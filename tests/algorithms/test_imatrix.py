"""llama.cpp's importance matrix: collected per block as mean x², llama.cpp's files read and written, and
the imatrix algorithm beating plain RTN on the error it weighs."""

import copy
import dataclasses
import struct

import numpy as np
import pytest
import torch
from tiny_models import sample_text, tiny_model, tiny_tokenizer

from lighten import formats
from lighten.algorithms.activations import collect_input_stats
from lighten.algorithms.calibrate import calibrate_model
from lighten.algorithms.imatrix import (
    IMATRIX,
    collect_imatrix,
    importance_for,
    llama_cpp_name,
    read_imatrix,
    write_imatrix,
)
from lighten.errors import LightenError
from lighten.eval.corpora import wiki_texts
from lighten.eval.perplexity import causal_fidelity
from lighten.plan import make_plan

TEXTS = [sample_text(2000, seed=1)]
CALIB = dict(n_tokens=512, context=128)


def _recording_imatrix(records: list):
    """IMATRIX that also keeps the importance each weight was quantized with, in call order."""

    def quantize(w, fmt, importance):
        records.append(importance)
        return IMATRIX.quantize_weight(w, fmt, importance)

    return dataclasses.replace(IMATRIX, quantize_weight=quantize)


def test_collected_importance_is_the_mean_square_of_each_blocks_inputs():
    model, tok = tiny_model("llama", seed=2), tiny_tokenizer()
    plan = make_plan(model, "iq4_nl")
    calibrated, records = copy.deepcopy(model), []
    calibrate_model(calibrated, tok, TEXTS, plan, _recording_imatrix(records), **CALIB)
    collected = dict(zip(plan, records, strict=True))  # the loop quantizes in plan order
    # Block i calibrates on the outputs of blocks 0..i-1 already quantized, its own weights still fp32.
    for i in range(model.config.num_hidden_layers):
        mixed = copy.deepcopy(model)
        for j in range(i):
            mixed.model.layers[j].load_state_dict(calibrated.model.layers[j].state_dict())
        block = [name.removesuffix(".weight") for name in plan if f".layers.{i}." in name]
        stats = collect_input_stats(mixed, tok, TEXTS, names=block, **CALIB)
        for name in block:
            torch.testing.assert_close(collected[f"{name}.weight"], stats[name].mean_sq, rtol=1e-5, atol=0)


def test_given_importance_is_used_without_reading_text():
    model = tiny_model("llama")
    plan = make_plan(model, "q4_0")
    importance = {name: torch.rand(model.get_parameter(name).shape[1]) for name in plan}
    original = copy.deepcopy(model)
    got = calibrate_model(model, None, None, plan, "imatrix", importance=importance)
    for name, imp in importance.items():
        want = formats.get("q4_0").quantize(original.get_parameter(name).detach(), importance=imp)
        assert torch.equal(got[name].tensors["blocks"], want.tensors["blocks"]), name


def test_importance_goes_only_to_an_algorithm_that_reads_it():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="gptq does not read importance"):
        calibrate_model(model, None, None, make_plan(model, "int4"), "gptq", importance={})


def test_imatrix_weighted_error_is_lower_than_rtn():
    model, tok = tiny_model("llama", seed=4), tiny_tokenizer()
    # Real layer inputs have channels of very different size; a random tiny model's barely do.
    gains = torch.logspace(-1, 1, model.config.hidden_size)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(gains[torch.randperm(len(gains))])
            layer.post_attention_layernorm.weight.mul_(gains[torch.randperm(len(gains))])
    # The error the search weighs: sum over inputs j of mean x_j² (w_ij - ŵ_ij)², x the fp32 model's inputs.
    sums, counts = collect_imatrix(model, tok, TEXTS, **CALIB)
    plan = make_plan(model, "iq4_nl")
    errors = {}
    for algorithm in ("rtn", "imatrix"):
        quantized = calibrate_model(copy.deepcopy(model), tok, TEXTS, plan, algorithm, **CALIB)
        errors[algorithm] = 0.0
        for name, q in quantized.items():
            gguf_name = llama_cpp_name(name)
            mean_square = torch.from_numpy(sums[gguf_name] / counts[gguf_name]).float()
            diff = q.dequantize() - model.get_parameter(name).detach()
            errors[algorithm] += (diff.square() * mean_square).sum().item()
    assert errors["imatrix"] < 0.9 * errors["rtn"], errors


def test_imatrix_file_round_trip(tmp_path):
    sums = {"blk.0.attn_q.weight": np.arange(64, dtype=np.float32), "blk.1.ffn_down.weight": np.ones(160)}
    counts = {"blk.0.attn_q.weight": 1024, "blk.1.ffn_down.weight": 1024}
    path = write_imatrix(tmp_path / "imatrix.gguf", sums, counts, chunk_size=512, dataset="test")
    entries = read_imatrix(path)
    assert entries.keys() == sums.keys()
    for name, s in sums.items():
        np.testing.assert_array_equal(entries[name], np.float32(s) / np.float32(1024))
    # What llama-quantize reads besides the tensors.
    import gguf

    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.chunk_count").contents() == 2
    assert reader.get_field("imatrix.chunk_size").contents() == 512
    assert reader.get_field("imatrix.datasets").contents() == ["test"]
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.in_sum2"] == [64, 1] and shapes["blk.0.attn_q.weight.counts"] == [1, 1]


def test_reads_the_legacy_dat_format(tmp_path):
    mean = {"blk.0.attn_k.weight": np.float32([0.5, 2.0, 8.0]), "blk.0.ffn_up.weight": np.float32([1.0, 3.0])}
    ncall = 4
    data = struct.pack("<i", len(mean))
    for name, values in mean.items():
        data += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        data += (values * ncall).astype("<f4").tobytes()  # llama-imatrix stores mean x² times its chunks
    data += struct.pack("<i", ncall) + struct.pack("<i", 8) + b"wiki.txt"
    path = tmp_path / "imatrix.dat"
    path.write_bytes(data)
    entries = read_imatrix(path)
    assert entries.keys() == mean.keys()
    for name, values in mean.items():
        np.testing.assert_array_equal(entries[name], values)


@pytest.mark.parametrize("content", [b"", b"GGUF not really", b"\x02\x00\x00\x00\x05\x00\x00\x00blk"])
def test_a_file_that_is_no_imatrix_is_refused(tmp_path, content):
    path = tmp_path / "imatrix.dat"
    path.write_bytes(content)
    with pytest.raises(LightenError, match="imatrix"):
        read_imatrix(path)


def _entries(model, plan, drop=(), resize=()):
    entries = {}
    for name in plan:
        columns = model.get_parameter(name).shape[1] + (1 if name in resize else 0)
        if name not in drop:
            entries[llama_cpp_name(name)] = np.ones(columns, np.float32)
    return entries


def test_importance_for_maps_llama_cpp_names_to_the_models_weights():
    model = tiny_model("llama")
    plan = make_plan(model, "q4_0")
    importance = importance_for(model, plan, _entries(model, plan), "f.gguf")
    assert importance.keys() == plan.keys()


def test_a_file_for_another_model_is_refused():
    model = tiny_model("llama")
    plan = make_plan(model, "q4_0")
    q = "model.layers.1.self_attn.q_proj.weight"
    with pytest.raises(LightenError, match=r"f.gguf has no entry for blk.1.attn_q.weight \(model.layers.1"):
        importance_for(model, plan, _entries(model, plan, drop=[q]), "f.gguf")
    with pytest.raises(LightenError, match="blk.1.attn_q.weight has 65 values but .* has 64 input columns"):
        importance_for(model, plan, _entries(model, plan, resize=[q]), "f.gguf")
    gpt2 = tiny_model("gpt2")  # named as the GGUF export names GPT-2's tensors
    with pytest.raises(
        LightenError, match=r"no entry for blk.0.attn_qkv.weight \(transformer.h.0.attn.c_attn"
    ):
        importance_for(gpt2, make_plan(gpt2, "q4_0"), {}, "f.gguf")
    bert = tiny_model("bert")
    with pytest.raises(LightenError, match="models it exports to GGUF only"):
        importance_for(bert, make_plan(bert, "q4_0"), {}, "f.gguf")


@pytest.mark.real
def test_imatrix_beats_rtn_on_smollm2(smollm2, one_thread):
    """q4_0 on SmolLM2 cut to its first three blocks (the real weights and activations, a tenth of the
    forward passes): llama.cpp's importance-weighted search moves the model less than plain RTN."""
    model, tok = smollm2
    short = copy.deepcopy(model)
    del short.model.layers[3:]
    short.config.num_hidden_layers = 3
    plan = make_plan(short, "q4_0")
    candidates = []
    for algorithm in ("rtn", "imatrix"):
        m = copy.deepcopy(short)
        calibrate_model(m, tok, wiki_texts("calibration"), plan, algorithm, n_tokens=1024, context=512)
        candidates.append(m)
    result = causal_fidelity(short, candidates, tok, wiki_texts("evaluation"), n_tokens=1024, context=512)
    rtn, imatrix = result["candidates"]
    assert imatrix["kl"] < 0.85 * rtn["kl"], result
