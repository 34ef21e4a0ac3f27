"""Batch-1 greedy decode speed: llama.cpp on lighten's GGUF exports vs transformers vs lighten's packed
runtime, side by side.

    python benchmarks/decode.py                       # smollm2-135m, 128 tokens, 5 runs each
    python benchmarks/decode.py --tokens 8 --runs 1   # a smoke run

Needs llama-cpp-python (see docs). Runs alternate between the engines, so host noise hits all of them
alike; per engine: tokens/s of the fastest run and of the median run. Decode only: the clock starts at the
first generated token, after the prompt is processed. Timings mean something only on an idle machine.
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lighten.export.checkpoint import load
from lighten.export.gguf import export_gguf
from lighten.quantize import make_plan, quantize_weights
from lighten.runtime import pack_model

PROMPT = "The capital of France is"


def disable_weight_repacking() -> None:
    """use_extra_bufts=False (no weight repacking) for every model llama.cpp loads: on AMX CPUs a native
    build crashes with repacked weights. Llama() silently ignores unknown keyword arguments, so the switch
    is set in its default model params."""
    import llama_cpp.llama

    low_level = llama_cpp.llama.llama_cpp
    defaults = low_level.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    low_level.llama_model_default_params = params


def llama_cpp_decoder(path: Path, threads: int):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=512, n_threads=threads, verbose=False)

    def decode(prompt_ids: list[int], n: int) -> float:
        llm.reset()
        stamps = []
        for _ in llm.generate(prompt_ids, temp=0.0, top_k=1):
            stamps.append(time.perf_counter())
            if len(stamps) == n + 1:
                break
        return stamps[-1] - stamps[0]

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, HF dir or lighten checkpoint")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per engine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-extra-bufts", action="store_true", help="llama.cpp without weight repacking (AMX CPUs)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.no_extra_bufts:
        disable_weight_repacking()

    model, tokenizer = load(args.model)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("Q8_0", "Q4_0"):
            path = export_gguf(model, tokenizer, Path(tmp) / f"{qtype}.gguf", qtype)
            engines[f"llama.cpp {qtype}"] = llama_cpp_decoder(path, args.threads)
        engines["transformers fp32"] = transformers_decoder(model)
        engines["transformers bf16"] = transformers_decoder(load(args.model, dtype=torch.bfloat16)[0])
        # lighten's packed runtime: same RTN weights a checkpoint would hold, lm_head/embeddings in bf16.
        for spec in ("int8:channel", "int4:g32"):
            quantized = quantize_weights(model, make_plan(model, spec))
            engines[f"lighten {spec}"] = transformers_decoder(pack_model(copy.deepcopy(model), quantized))

        for decode in engines.values():  # warm-up: first-call allocations and lazy init
            decode(prompt_ids, 2)
        times = {name: [] for name in engines}
        for _ in range(args.runs):
            for name, decode in engines.items():
                times[name].append(decode(prompt_ids, args.tokens))

    print(f"{args.model}, batch 1, {args.tokens} greedy tokens, {args.threads} threads, {args.runs} runs")
    print(f"{'engine':<20} {'best tok/s':>11} {'median tok/s':>13}")
    for name, t in times.items():
        print(f"{name:<20} {args.tokens / min(t):>11.1f} {args.tokens / statistics.median(t):>13.1f}")


if __name__ == "__main__":
    main()
