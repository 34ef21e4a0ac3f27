"""Batch-1 greedy decode speed on the same GGUF weights: llama.cpp vs lighten's lean decoder on ggml's
kernels, beside lighten's own int8 / int4 on torch's kernels and on the kernels dispatch picks here
(kernels=auto: lighten.runtime.dispatch) and transformers, with each engine's fraction of the
memory-bandwidth limit (bandwidth measured here ÷ weight bytes read per token).

    python benchmarks/decode.py                          # real smollm2-135m, 64 tokens, 3 runs each
    python benchmarks/decode.py --model llama-1b         # Llama-shaped 1.1 B, RANDOM weights
    python benchmarks/decode.py --tokens 8 --runs 1      # a smoke run

Same weights: for each GGUF type (--types) the model's matrices are quantized by lighten (RTN) and lm_head
to Q8_0 (untied from the embeddings: what llama-quantize gives the output matrix); `lighten TYPE` runs
them packed on ggml's kernels (lighten.runtime.ggml), `llama.cpp TYPE` runs the GGUF file lighten exports
from the very same blocks (its token_embd, of which a token reads one row, is Q8_0 too), and `lighten run
TYPE (auto)` is `lighten run`'s llama.cpp engine on the exact export a checkpoint of them gets (the same
blocks, token_embd F32, an fp32 KV cache).

llama-1b is TinyLlama-1.1B's shape (22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads) with SmolLM2's
vocabulary and tokenizer and random weights: its speed is real, its text is noise. llama.cpp opens the files
with lighten.export.llamacpp.open_llama (weight repacking off on AMX CPUs, where it crashes). Runs alternate
between engines so host noise hits them alike; per engine: tokens/s of the fastest and of the median run,
decode only (the clock starts at the first generated token). Timings mean something only on an idle machine.
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from gemm import cpu_name, memory_bandwidth
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lighten.checkpoint import load
from lighten.export.gguf import export_gguf
from lighten.export.llamacpp import generate_llama, open_exact, open_llama
from lighten.formats import get
from lighten.plan import make_plan
from lighten.quantize import quantize_weights
from lighten.runtime import pack_model
from lighten.runtime.decode import Decoder
from lighten.runtime.linear import GGMLLinear

PROMPT = "The capital of France is"
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    tie_word_embeddings=True,
)


def llama_cpp_decoder(llm):
    """Greedy decode in llama.cpp with lighten run's loop (generate_llama): `llm` as llama.cpp opens a file
    by default (open_llama), or as `lighten run`'s llama.cpp engine, what auto picks for an all-GGUF
    checkpoint, opens its exact export (open_exact: the other matrices F32, an fp32 KV cache)."""

    def decode(prompt_ids: list[int], n: int) -> float:
        return generate_llama(llm, prompt_ids, n + 1).decode_s  # n tokens after the first

    return decode


def transformers_decoder(model):
    @torch.inference_mode()
    def decode(prompt_ids: list[int], n: int) -> float:
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        past = out.past_key_values
        for _ in range(n):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start

    return decode


def lean_decoder(model, max_len: int):
    decoder = Decoder(model, max_len)

    def decode(prompt_ids: list[int], n: int) -> float:
        return decoder.generate(prompt_ids, n + 1).decode_s  # n tokens after the first

    return decode


def packed(model, spec: str, head: str = "int8:channel", kernels: str = "auto"):
    """The model with every linear layer packed to `spec` and lm_head to `head` (embeddings stay as they
    are): 8 bits for the output matrix, as llama.cpp's Q8_0 / Q4_0 have. `kernels` as pack_model's."""
    quantized = quantize_weights(model, make_plan(model, spec))
    quantized["lm_head.weight"] = get(head).quantize(model.lm_head.weight.detach().float())
    return quantized, pack_model(copy.deepcopy(model), quantized, kernels=kernels)


def untied(model):
    """`model` with lm_head a weight of its own (the same values), so that it can be quantized alone."""
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    return model


def bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every matmul's weights (lm_head included), not the embedding
    table (one row of it). Packed layers count their buffers, ggml's the bytes ggml holds."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings()
    total = 0
    for m in model.modules():
        if isinstance(m, GGMLLinear):
            total += m.nbytes
        if m is head or not isinstance(m, nn.Embedding):
            own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
            total += sum(t.nbytes for t in own if id(t) not in embeddings or m is head)
    return total


def gguf_bytes(path: Path) -> int:
    """Tensor bytes a token reads from a GGUF file: every matrix but token_embd (one row of it) unless the
    model is tied, when token_embd is the output matrix too."""
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if tied or t.name != "token_embd.weight")


def random_llama_1b(tokenizer):
    """transformers' own init: matrices normal with std 0.02, norms 1."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **LLAMA_1B)).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, HF dir, or llama-1b (random)")
    parser.add_argument("--types", default="q4_0,iq4_nl,q8_0", help="GGUF types, both engines")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per engine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-fp32", action="store_true", help="leave out the slow fp32 engines")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.model == "llama-1b":
        _, tokenizer = load("smollm2-135m")
        model = random_llama_1b(tokenizer)
    else:
        model, tokenizer = load(args.model)
    model = untied(model)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    max_len = len(prompt_ids) + args.tokens + 2
    engines, weight_bytes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.types.split(","):
            quantized, m = packed(model, spec, head="q8_0")
            path = export_gguf(model, tokenizer, Path(tmp) / f"{spec}.gguf", "Q8_0", blocks=quantized)
            engines[f"llama.cpp {spec}"] = llama_cpp_decoder(
                open_llama(path, n_ctx=512, n_threads=args.threads)
            )
            weight_bytes[f"llama.cpp {spec}"] = gguf_bytes(path)
            engines[f"lighten {spec} (ggml)"] = lean_decoder(m, max_len)
            weight_bytes[f"lighten {spec} (ggml)"] = bytes_per_token(m)
            exact = export_gguf(model, tokenizer, Path(tmp) / f"{spec}-exact.gguf", "F32", blocks=quantized)
            engines[f"lighten run {spec} (auto)"] = llama_cpp_decoder(open_exact(exact, 512, args.threads))
            weight_bytes[f"lighten run {spec} (auto)"] = gguf_bytes(exact)
        variants = {} if args.skip_fp32 else {"fp32": model}
        for spec in ("int8:channel", "int4:g32"):  # on torch's kernels, and on the faster here (dispatch)
            variants[f"{spec} (torch)"] = packed(model, spec, kernels="torch")[1]
            variants[f"{spec} (kernels=auto)"] = packed(model, spec)[1]
        for name, m in variants.items():
            engines[f"lighten {name}"] = lean_decoder(m, max_len)
            weight_bytes[f"lighten {name}"] = bytes_per_token(m)
        if not args.skip_fp32:
            engines["transformers fp32"] = transformers_decoder(model)
            weight_bytes["transformers fp32"] = bytes_per_token(model)

        bandwidth = memory_bandwidth(2**30, 10)
        for decode in engines.values():  # warm-up: first-call allocations and lazy init
            decode(prompt_ids, 2)
        times = {name: [] for name in engines}
        for _ in range(args.runs):
            for name, decode in engines.items():
                times[name].append(decode(prompt_ids, args.tokens))

    cpu = cpu_name()
    print(
        f"{args.model}, batch 1, {args.tokens} greedy tokens, {args.threads} threads, {args.runs} runs, {cpu}"
    )
    print(f"memory bandwidth (sum of 1 GB): {bandwidth / 1e9:.1f} GB/s; limit = bandwidth / MB per token\n")
    print(f"{'engine':<34} {'best tok/s':>10} {'median':>8} {'MB/token':>9} {'limit':>7} {'of limit':>9}")
    for name, t in times.items():
        best, limit = args.tokens / min(t), bandwidth / weight_bytes[name]
        print(
            f"{name:<34} {best:>10.1f} {args.tokens / statistics.median(t):>8.1f} "
            f"{weight_bytes[name] / 1e6:>9.1f} {limit:>7.0f} {best / limit:>9.0%}"
        )
    for spec in args.types.split(","):
        theirs = times[f"llama.cpp {spec}"]
        for engine in (f"lighten {spec} (ggml)", f"lighten run {spec} (auto)"):
            ours = times[engine]
            print(
                f"{engine} / llama.cpp: best {min(theirs) / min(ours):.2f}x, "
                f"median {statistics.median(theirs) / statistics.median(ours):.2f}x"
            )


if __name__ == "__main__":
    main()
