"""Evaluate candidate models (quantized checkpoints or plain models) against one reference.

This is what `lighten eval` and `lighten demo` report: size on disk, bytes of weights, bits per quantized
weight, and fidelity — perplexity and token KL for causal LMs, embedding cosine and Spearman for encoders."""

from pathlib import Path

from lighten.checkpoint import is_checkpoint, load, read_manifest
from lighten.errors import LightenError
from lighten.eval.corpora import eval_sentences, wiki_texts
from lighten.eval.embeddings import embedding_fidelity
from lighten.eval.perplexity import causal_fidelity
from lighten.eval.size import size_report
from lighten.models import BUILTIN, model_kind, resolve
from lighten.models.limits import max_positions
from lighten.progress import note


def evaluate(
    candidates: list[str | Path],
    reference: str | Path | None = None,
    text: str | None = None,
    n_tokens: int = 4096,
    context: int = 512,
    loaded: dict | None = None,
) -> dict:
    """Compare `candidates` to `reference` (default: the source model named in the first checkpoint).

    `text` replaces the default corpus (Wikipedia evaluation split / the shipped sentences). A `context`
    beyond the positions a model reads is clamped to them (and said).
    `loaded` maps a name to an already loaded (model, tokenizer), to avoid loading the reference twice."""
    loaded = dict(loaded or {})
    if reference is None:
        reference = next((source_model(c) for c in candidates if is_checkpoint(c)), None)
    if reference is None and not candidates:
        raise LightenError("nothing to evaluate")
    names = ([reference] if reference is not None else []) + list(candidates)
    models = {}
    for name in names:
        if name not in loaded:
            note(f"loading {name}")
            loaded[name] = load(name)
        models[name] = loaded[name]
    ref_name = reference if reference is not None else candidates[0]
    ref_model, tokenizer = models[ref_name]
    kind = model_kind(ref_model)
    rows = [size_report(_model_dir(c)) for c in candidates]
    cand_models = [models[c][0] for c in candidates]
    report = {"kind": kind, "reference": size_report(_model_dir(ref_name)) | {"name": str(ref_name)}}
    if kind == "causal":
        texts = [text] if text is not None else wiki_texts("evaluation")
        limit = min(filter(None, (max_positions(m.config) for m, _ in models.values())), default=None)
        if limit is not None and context > limit:  # a longer window would index past the position table
            note(f"context {context} is beyond the {limit} positions the model reads: clamped to {limit}")
            context = limit
        fid = causal_fidelity(
            ref_model,
            cand_models if reference is not None else [],
            tokenizer,
            texts,
            n_tokens=n_tokens,
            context=context,
        )
        report["reference"]["perplexity"] = fid["reference"]["perplexity"]
        report["data"] = {
            "corpus": "--text" if text else "wikipedia-summaries:evaluation",
            "n_tokens": fid["n_tokens"],
            "context": fid["context"],
        }
        scores = fid["candidates"]
    else:
        sentences = _sentences(text) if text is not None else eval_sentences()
        fid = embedding_fidelity(
            ref_model, cand_models if reference is not None else [], tokenizer, sentences
        )
        report["data"] = {
            "corpus": "--text" if text else "lighten sentences",
            "n_sentences": fid["n_sentences"],
        }
        scores = fid["candidates"]
    if reference is None:  # no reference: report the model on its own
        report["candidates"] = []
        return report
    report["candidates"] = [row | score for row, score in zip(rows, scores, strict=True)]
    return report


def source_model(checkpoint: str | Path) -> str:
    """The model a checkpoint was quantized from: a built-in name or an absolute directory. Older lightens
    recorded a directory as given; relative, it would name whatever sits there in the current folder."""
    source = read_manifest(checkpoint)["source"]["model"]
    if source not in BUILTIN and not Path(source).is_absolute():
        raise LightenError(
            f"{checkpoint} records its source model as the relative path {source!r}, which depends on the "
            "folder lighten runs in: pass the source model with --reference"
        )
    return source


def _model_dir(name_or_path: str | Path) -> Path:
    return Path(name_or_path) if is_checkpoint(name_or_path) else resolve(str(name_or_path))


def _sentences(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
