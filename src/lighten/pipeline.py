"""End-to-end jobs the CLI runs: model → plan → quantized checkpoint → evaluation."""

import contextlib
import copy
import time
from pathlib import Path

import torch

from lighten.algorithms.activations import collect_input_stats
from lighten.algorithms.calibrate import calibrate_model
from lighten.algorithms.imatrix import collect_imatrix, importance_for, read_imatrix, write_imatrix
from lighten.algorithms.registry import DEFAULT_CALIBRATION, get_algorithm
from lighten.atomic import check_output, make_output_dir
from lighten.checkpoint import is_checkpoint, load, require_reloadable, save_checkpoint
from lighten.errors import LightenError, ModelError
from lighten.eval.compare import evaluate
from lighten.eval.corpora import wiki_texts
from lighten.eval.embeddings import embed
from lighten.export.compressed_tensors import export_compressed_tensors
from lighten.export.gguf import export_gguf_from, is_lighten_gguf
from lighten.export.llamacpp import cached_gguf, generate_llama, llama_cpp_unfit, open_exact
from lighten.models import build_model, load_model, model_kind, open_weights, resolve
from lighten.models.limits import max_positions
from lighten.plan import budget_plan, plan_from_recipe
from lighten.recipes import Recipe, recipe_from_options
from lighten.runtime import PackedLinear, meta_parameters
from lighten.runtime.decode import Decoder, Generation
from lighten.runtime.dispatch import KERNELS
from lighten.surgery import apply_surgery

DEMO_MODELS = ("minilm", "smollm2-135m")
DEMO_FORMATS = ("int8:channel", "int4:g128", "fp8_e4m3", "mxfp4", "nf4", "ternary")


def quantize_to_dir(
    model_name: str,
    recipe: Recipe | str,
    out_dir: str | Path,
    force: bool = False,
    loaded=None,
    imatrix: str | Path | None = None,
) -> Path:
    """Run a recipe (or, given a format spec string, that format with its default algorithm: imatrix for
    GGUF types, else RTN) on a model and save the checkpoint: exact surgery, then the plan (rules, or
    sensitivity + ILP under a budget), then the algorithm. Calibration text is the calibration split of the
    Wikipedia summaries; algorithm imatrix takes its importance from a llama.cpp `imatrix` file instead
    when given one. A `loaded` (model, tokenizer) is left unmodified. Returns the checkpoint directory; a
    budget's allocation table and what it achieved are in its manifest (read_manifest(path)["allocation"],
    ["budget"])."""
    check_output(out_dir, force, inputs=[resolve(model_name)])  # fail now, not after the calibration
    if isinstance(recipe, str):
        recipe = recipe_from_options(recipe)
    algorithm = get_algorithm(recipe.algorithm)
    entries = _read_imatrix_for(recipe, imatrix) if imatrix is not None else None
    model, tokenizer = loaded or load_model(model_name)
    calibrates = recipe.surgery or recipe.budget or (algorithm.needs_data and entries is None)
    if loaded and calibrates:
        model = copy.deepcopy(model)
    texts = wiki_texts("calibration") if calibrates else []
    tokens, context = recipe.calibration.tokens, recipe.calibration.context
    apply_surgery(
        model, list(recipe.surgery), stats=lambda m: collect_input_stats(m, tokenizer, texts, tokens, context)
    )
    # Fail before calibration, not after it, if the rewritten model could not be saved and loaded back.
    require_reloadable(model)
    plan, table, summary = (
        budget_plan(model, tokenizer, recipe, texts)
        if recipe.budget
        else (plan_from_recipe(model, recipe), None, None)
    )
    # Without surgery the model still equals its files, and its weights are read from them (a block at a
    # time when calibrating) rather than from its mapped file, whose pages would all stay in RSS.
    importance = importance_for(model, plan, entries, imatrix) if entries is not None else None
    with contextlib.nullcontext() if recipe.surgery else open_weights(model_name) as weights:
        quantized = calibrate_model(
            model, tokenizer, texts, plan, algorithm, tokens, context, weights, importance
        )
    return save_checkpoint(
        model, quantized, resolve(model_name), model_name, out_dir, force, recipe, table, summary
    )


def _read_imatrix_for(recipe: Recipe, path: str | Path) -> dict:
    """The entries of an imatrix file, if `recipe` can use them; LightenError saying why not otherwise."""
    if recipe.algorithm != "imatrix":
        raise LightenError(
            f"--imatrix is read by algorithm imatrix, not {recipe.algorithm}: quantize to a GGUF type "
            "(q4_0, iq4_nl, q4_k, ...) without --algorithm, or with --algorithm imatrix"
        )
    if recipe.surgery:
        raise LightenError(
            "--imatrix describes the inputs of the model as it is, which --surgery changes: drop one of them"
        )
    return read_imatrix(path)


def imatrix_to_file(model_name: str, out_file: str | Path, n_tokens: int | None = None, force: bool = False):
    """Collect llama.cpp's importance matrix of a model (Llama / Qwen2) on the calibration split and write it
    as llama-imatrix's GGUF file, for `llama-quantize --imatrix` or `lighten quantize --imatrix`."""
    check_output(out_file, force, inputs=[resolve(model_name)], is_ours=is_lighten_gguf)
    calibration = DEFAULT_CALIBRATION["imatrix"]
    n_tokens = n_tokens or calibration["tokens"]
    model, tokenizer = load_model(model_name)
    sums, counts = collect_imatrix(
        model, tokenizer, wiki_texts("calibration"), n_tokens, calibration["context"]
    )
    dataset = f"lighten: Wikipedia calibration split, {n_tokens} tokens"
    return write_imatrix(out_file, sums, counts, calibration["context"], dataset, force)


def export_model(
    source: str | Path,
    to: str,
    out: str | Path,
    qtype: str | None = None,
    force: bool = False,
    pre_tokenizer: str | None = None,
) -> Path:
    """Export a model to `to` = "gguf" (a file; from any model lighten loads: a checkpoint's weights in GGUF
    block types carried over exactly, every other matrix encoded as the GGUF type `qtype`, default Q8_0) or
    "compressed-tensors" (a directory; int4/int8 lighten checkpoints, codes carried over exactly, so no type
    to choose)."""
    if to == "gguf":
        return export_gguf_from(source, out, qtype, pre_tokenizer, force=force)
    if to == "compressed-tensors":
        if qtype is not None or pre_tokenizer is not None:
            raise LightenError(
                "--type and --pre-tokenizer are for GGUF: compressed-tensors keeps the checkpoint's own codes"
            )
        return export_compressed_tensors(source, out, force=force)
    raise LightenError(f"unknown export target {to!r}: use gguf or compressed-tensors")


def run_demo(
    out_dir: str | Path = "out/demo",
    models: tuple[str, ...] = DEMO_MODELS,
    specs: tuple[str, ...] = DEMO_FORMATS,
    n_tokens: int = 4096,
    context: int = 512,
) -> list[dict]:
    """Quantize each built-in model to each format, then evaluate all of them against the original.

    A rerun replaces what an earlier demo wrote into `out_dir`, and nothing else."""
    out = Path(out_dir)
    targets = {name: [out / f"{name}-{spec.replace(':', '-')}" for spec in specs] for name in models}
    for path in (path for paths in targets.values() for path in paths):
        check_output(path, force=True)
    make_output_dir(out, inputs=[resolve(name) for name in models])
    reports = []
    for name in models:
        loaded = load_model(name)
        paths = [
            quantize_to_dir(name, spec, path, force=True, loaded=loaded)
            for spec, path in zip(specs, targets[name], strict=True)
        ]
        reports.append(
            evaluate(paths, reference=name, n_tokens=n_tokens, context=context, loaded={name: loaded})
        )
    return reports


ENGINES = ("auto", "torch", "llama.cpp")


@torch.inference_mode()
def run_model(
    name_or_path: str | Path,
    prompts: list[str],
    max_new_tokens: int = 32,
    engine: str = "auto",
    kernels: str = "auto",
) -> dict:
    """Generate from each prompt (causal LMs, greedy) or embed the prompts (encoders), timing it.

    Engines: "torch" runs a lighten checkpoint on the packed runtime (weights stay packed; activations bf16,
    fp32 for GGUF types) and anything else as loaded; Llama-family models generate with the lean decoder
    (lighten.runtime.decode), others with transformers' generate. "llama.cpp" runs a checkpoint whose
    weights are all GGUF block types in llama.cpp, on its exact GGUF export (cached: cached_gguf). "auto"
    takes llama.cpp where it can run the checkpoint exactly, else torch. `kernels` picks the torch engine's
    kernel for the ints ggml computes exactly (lighten.runtime.dispatch). Decode speed excludes the prompt:
    (new tokens - 1) / (time after the first new token)."""
    if not prompts:
        raise LightenError("give at least one --prompt")
    if max_new_tokens < 1:
        raise LightenError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if engine not in ENGINES:
        raise LightenError(f"--engine is one of {', '.join(ENGINES)}, got {engine!r}")
    if kernels not in KERNELS:
        raise LightenError(f"--kernels is one of {', '.join(KERNELS)}, got {kernels!r}")
    checkpoint = is_checkpoint(name_or_path)
    unfit = llama_cpp_unfit(Path(name_or_path)) if checkpoint else "it is not a lighten checkpoint"
    if engine != "torch" and not unfit:
        with meta_parameters():  # the config and tokenizer only: llama.cpp holds the weights
            shell, tokenizer = build_model(Path(name_or_path))
        encoded = _encode_prompts(shell.config, tokenizer, prompts, max_new_tokens)  # before the export
        try:
            gguf = cached_gguf(Path(name_or_path))
        except LightenError as e:  # what the export refuses: the tokenizer, an online rotation
            unfit = str(e)
        else:
            return _run_llama_cpp(gguf, tokenizer, prompts, encoded, max_new_tokens)
    if engine == "llama.cpp" and unfit:
        raise LightenError(
            f"--engine llama.cpp cannot run {name_or_path} exactly: {unfit}; use --engine torch"
        )
    model, tokenizer = load(name_or_path, packed=checkpoint, kernels=kernels)
    encoder = model_kind(model) == "encoder"
    encoded = _encode_prompts(model.config, tokenizer, prompts, 0 if encoder else max_new_tokens)
    if encoder:
        start = time.perf_counter()
        emb = embed(model, tokenizer, prompts)
        seconds = time.perf_counter() - start
        return {
            "kind": "encoder",
            "engine": "torch",
            "kernels": kernel_counts(model),
            "dim": emb.shape[1],
            "cosine": (emb @ emb.T).tolist(),
            "sentences_per_s": len(prompts) / seconds,
        }
    longest = max(len(ids) for ids in encoded) + max_new_tokens
    try:
        decoder = Decoder(model, longest)
    except ModelError:  # a layout the lean decoder does not run (GPT-2, unknown attention parts)
        decoder = None
    generations = [
        decoder.generate(ids, max_new_tokens, stop=tokenizer.eos_token_id)
        if decoder is not None
        else _hf_generate(model, ids, max_new_tokens)
        for ids in encoded
    ]
    result = _generations(tokenizer, prompts, generations)
    generator = "lean decoder" if decoder is not None else "transformers generate"
    return {**result, "engine": "torch", "generator": generator, "kernels": kernel_counts(model)}


def _run_llama_cpp(gguf: Path, tokenizer, prompts: list[str], encoded: list[list[int]], new: int) -> dict:
    llm = open_exact(gguf, max(len(ids) for ids in encoded) + new, torch.get_num_threads())
    generations = [generate_llama(llm, ids, new, stop=tokenizer.eos_token_id) for ids in encoded]
    return {**_generations(tokenizer, prompts, generations), "engine": "llama.cpp"}


def _generations(tokenizer, prompts: list[str], generations: list[Generation]) -> dict:
    results = [
        {
            "prompt": prompt,
            "completion": tokenizer.decode(gen.tokens),
            "new_tokens": len(gen.tokens),
            "decode_tokens_per_s": gen.decode_tokens_per_s,
        }
        for prompt, gen in zip(prompts, generations, strict=True)
    ]
    return {"kind": "causal", "generations": results}


def kernel_counts(model) -> dict[str, int]:
    """How many layers run on each kernel, e.g. {"ggml q4_0 (repacked)": 90, "torch fp32": 1}."""
    counts = {}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            kernel = m.kernel()
        elif isinstance(m, torch.nn.Linear):
            kernel = f"torch {str(m.weight.dtype).removeprefix('torch.')}"
        else:
            continue
        counts[kernel] = counts.get(kernel, 0) + 1
    return counts


def _encode_prompts(config, tokenizer, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Token ids of each prompt; a LightenError for an empty prompt or one the model cannot read whole."""
    limit = max_positions(config)
    encoded = []
    for i, prompt in enumerate(prompts, 1):
        ids = tokenizer(prompt)["input_ids"] if prompt.strip() else []
        if not ids:
            verb = "continue" if new_tokens else "embed"
            raise LightenError(f"prompt {i} is empty: give some text to {verb}")
        if limit is not None and len(ids) + new_tokens > limit:
            plus = f" + {new_tokens} new tokens" if new_tokens else ""
            raise LightenError(
                f"prompt {i} is {len(ids)} tokens{plus}, beyond the {limit} positions the model reads: "
                f"shorten it{' or lower --max-new-tokens' if new_tokens else ''}"
            )
        encoded.append(ids)
    return encoded


def _hf_generate(model, ids: list[int], max_new_tokens: int) -> Generation:
    """transformers' generate, timed like the lean decoder: the first new token, then the rest."""
    ids = torch.tensor([ids])
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    total = time.perf_counter() - start
    return Generation(out[0, ids.shape[1] :].tolist(), first, max(total - first, 1e-9))
