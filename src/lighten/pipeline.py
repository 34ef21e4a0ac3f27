"""End-to-end jobs the CLI runs: model → plan → quantized checkpoint → evaluation."""

import copy
import time
from pathlib import Path

import torch

from lighten.algorithms.activations import collect_input_stats
from lighten.errors import LightenError
from lighten.eval.compare import evaluate
from lighten.eval.corpora import wiki_texts
from lighten.eval.embeddings import embed
from lighten.export.checkpoint import is_checkpoint, load, save_checkpoint
from lighten.models import load_model, model_kind, resolve
from lighten.quantize import DEFAULT_SKIP, make_plan, quantize_weights
from lighten.surgery import apply_surgery

DEMO_MODELS = ("minilm", "smollm2-135m")
DEMO_FORMATS = ("int8:channel", "int4:g128", "fp8_e4m3", "mxfp4", "nf4", "ternary")


def quantize_to_dir(
    model_name: str,
    spec: str,
    out_dir: str | Path,
    skip: tuple[str, ...] = DEFAULT_SKIP,
    embeddings: bool = False,
    force: bool = False,
    loaded=None,
    surgery: tuple[str, ...] = (),
    calibration_tokens: int = 2048,
) -> Path:
    """Apply the exact `surgery` steps (if any), round-to-nearest quantize every planned weight of
    `model_name` to `spec` and save a checkpoint. Smoothing statistics come from the calibration split.
    A `loaded` (model, tokenizer) is not modified."""
    model, tokenizer = loaded or load_model(model_name)
    if surgery:
        model = copy.deepcopy(model) if loaded else model
        texts = wiki_texts("calibration")
        apply_surgery(
            model, list(surgery), stats=lambda m: collect_input_stats(m, tokenizer, texts, calibration_tokens)
        )
    quantized = quantize_weights(model, make_plan(model, spec, skip=skip, embeddings=embeddings))
    return save_checkpoint(model, quantized, resolve(model_name), model_name, out_dir, force, surgery)


def run_demo(
    out_dir: str | Path = "out/demo",
    models: tuple[str, ...] = DEMO_MODELS,
    specs: tuple[str, ...] = DEMO_FORMATS,
    n_tokens: int = 4096,
    context: int = 512,
) -> list[dict]:
    """Quantize each built-in model to each format, then evaluate all of them against the original."""
    reports = []
    for name in models:
        loaded = load_model(name)
        paths = [
            quantize_to_dir(
                name, spec, Path(out_dir) / f"{name}-{spec.replace(':', '-')}", force=True, loaded=loaded
            )
            for spec in specs
        ]
        reports.append(
            evaluate(paths, reference=name, n_tokens=n_tokens, context=context, loaded={name: loaded})
        )
    return reports


@torch.inference_mode()
def run_model(name_or_path: str | Path, prompts: list[str], max_new_tokens: int = 32) -> dict:
    """Generate from each prompt (causal LMs, greedy) or embed the prompts (encoders), timing it.

    A lighten checkpoint runs on the packed runtime (weights stay packed, bf16 activations); anything else
    runs as loaded. Decode speed excludes the prompt: (new tokens - 1) / (time - time to first token)."""
    if not prompts:
        raise LightenError("give at least one --prompt")
    model, tokenizer = load(name_or_path, packed=is_checkpoint(name_or_path))
    if model_kind(model) == "encoder":
        start = time.perf_counter()
        emb = embed(model, tokenizer, prompts)
        seconds = time.perf_counter() - start
        return {
            "kind": "encoder",
            "dim": emb.shape[1],
            "cosine": (emb @ emb.T).tolist(),
            "sentences_per_s": len(prompts) / seconds,
        }
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        start = time.perf_counter()
        model.generate(**ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        total = time.perf_counter() - start
        new = out.shape[1] - ids["input_ids"].shape[1]
        results.append(
            {
                "prompt": prompt,
                "completion": tokenizer.decode(out[0, ids["input_ids"].shape[1] :]),
                "new_tokens": new,
                "decode_tokens_per_s": (new - 1) / max(total - first, 1e-9),
            }
        )
    return {"kind": "causal", "generations": results}
