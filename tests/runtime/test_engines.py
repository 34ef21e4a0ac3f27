"""`lighten run --engine`: llama.cpp on a checkpoint's exact GGUF export computes what lighten's torch engine
(the lean decoder on ggml's kernels) computes, and auto picks it only where that holds."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import assert_refused, lighten
from tiny_models import tiny_bpe_tokenizer, tiny_model

from lighten.checkpoint import load
from lighten.export.llamacpp import cached_gguf, open_llama
from lighten.pipeline import quantize_to_dir, run_model
from lighten.runtime.decode import Decoder

PROMPT = "the model is light and the weight is small"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama quantized to q4_0 (all GGUF types: llama.cpp runs it exactly) and to int8 (torch's
    kernels only). Its random weights are 0.05 large: much larger ones make activations so large that
    fp32 rounding moves some of them across the 8-bit rounding ggml applies to activations (by ~0.003 in
    the mean at 0.2), which drowns the comparison."""
    tmp = tmp_path_factory.mktemp("engines")
    src = tmp / "src"
    tiny_model("llama", vocab_size=300, initializer_range=0.05).save_pretrained(src)
    tiny_bpe_tokenizer().save_pretrained(src)
    return {spec: quantize_to_dir(str(src), spec, tmp / spec) for spec in ("q4_0", "int8")}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))


def test_both_engines_give_the_same_tokens_and_logits(checkpoints):
    ckpt = checkpoints["q4_0"]
    torch_run = run_model(ckpt, [PROMPT], 12, engine="torch")
    llama_run = run_model(ckpt, [PROMPT], 12, engine="llama.cpp")
    assert torch_run["engine"] == "torch" and llama_run["engine"] == "llama.cpp"
    kernels = torch_run["kernels"]
    assert kernels.pop("torch float32") == 1  # lm_head: tied to the fp32 embeddings
    assert (
        list(kernels) in (["q4_0: ggml (repacked)"], ["q4_0: ggml (in place)"])
        and sum(kernels.values()) == 14
    )
    completions = [r["generations"][0]["completion"] for r in (torch_run, llama_run)]
    assert completions[0] == completions[1] and completions[0]
    # Logits of every prompt position: the same q4_0 blocks and ggml kernels (activations rounded to 8
    # bits alike); attention, norms and RoPE are each engine's own fp32 code, which round differently:
    # measured 3e-8 in the mean, against 0.06 between this model at q4_0 and in fp32.
    model, tokenizer = load(ckpt, packed=True)
    ids = tokenizer(PROMPT)["input_ids"]
    decoder = Decoder(model, 64)
    ours = np.stack([decoder.forward(torch.tensor(ids[: i + 1]), 0).numpy() for i in range(len(ids))])
    llm = open_llama(cached_gguf(ckpt), n_ctx=64, logits_all=True, type_k=0, type_v=0)  # fp32 KV cache
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    assert np.abs(theirs - ours).max() < 1e-5 * np.abs(ours).max(), np.abs(theirs - ours).max()


def test_auto_takes_llama_cpp_only_where_it_is_exact(checkpoints):
    assert run_model(checkpoints["q4_0"], [PROMPT], 2)["engine"] == "llama.cpp"
    int8 = run_model(checkpoints["int8"], [PROMPT], 2, kernels="torch")
    assert int8["engine"] == "torch" and any("_weight_int8pack_mm" in k for k in int8["kernels"])
    result = lighten(
        "run", checkpoints["int8"], "-p", PROMPT, "--max-new-tokens", 2, "--kernels", "ggml", "--json"
    )
    assert result.returncode == 0, result.stderr
    ran = json.loads(result.stdout)
    assert ran["engine"] == "torch" and all(
        k.startswith("int8:channel:sym as q8_0: ggml") for k in ran["kernels"] if "float32" not in k
    )
    assert_refused(
        lighten("run", checkpoints["int8"], "-p", PROMPT, "--kernels", "fast"), "--kernels is one of"
    )
    result = lighten("run", checkpoints["int8"], "-p", PROMPT, "--engine", "llama.cpp")
    assert_refused(result, "cannot run", "not all GGUF block types", "int8:channel:sym")
    assert_refused(
        lighten("run", checkpoints["q4_0"], "-p", PROMPT, "--engine", "fast"), "--engine is one of"
    )


def test_the_export_is_written_once_and_kept_while_the_checkpoint_is(checkpoints):
    path = cached_gguf(checkpoints["q4_0"])
    stamp = path.stat().st_mtime_ns
    assert cached_gguf(checkpoints["q4_0"]) == path and path.stat().st_mtime_ns == stamp
    assert cached_gguf(checkpoints["int8"].parent / "q4_0") == path
    result = lighten("run", checkpoints["q4_0"], "-p", PROMPT, "--max-new-tokens", 3, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["engine"] == "llama.cpp"


def test_a_window_llama_cpp_would_not_slide_keeps_the_run_on_torch(tmp_path):
    """llama.cpp runs Mistral as Llama, attending to every token: with a sliding window (8 tokens here)
    a q4_0 checkpoint runs on torch (transformers' generate, which slides it), and --engine llama.cpp is
    refused saying why."""
    src = tmp_path / "src"
    tiny_model("mistral", vocab_size=300).save_pretrained(src)
    tiny_bpe_tokenizer().save_pretrained(src)
    ckpt = quantize_to_dir(str(src), "q4_0", tmp_path / "q4_0")
    ran = run_model(ckpt, [PROMPT], 4)
    assert ran["engine"] == "torch" and ran["generator"] == "transformers generate"
    result = lighten("run", ckpt, "-p", PROMPT, "--engine", "llama.cpp")
    assert_refused(result, "cannot run", "slides a window of 8")
