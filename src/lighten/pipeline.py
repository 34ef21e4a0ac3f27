"""End-to-end jobs the CLI runs: model → plan → quantized checkpoint → evaluation."""

from pathlib import Path

from lighten.eval.compare import evaluate
from lighten.export.checkpoint import save_checkpoint
from lighten.models import load_model, resolve
from lighten.quantize import DEFAULT_SKIP, make_plan, quantize_weights

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
) -> Path:
    """Round-to-nearest quantize every planned weight of `model_name` to `spec` and save a checkpoint."""
    model, _ = loaded or load_model(model_name)
    plan = make_plan(model, spec, skip=skip, embeddings=embeddings)
    return save_checkpoint(
        model, quantize_weights(model, plan), resolve(model_name), model_name, out_dir, force
    )


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
