"""The `lighten` command: parse, call one library function, print. No logic the library lacks."""

import contextlib
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lighten.errors import LightenError
from lighten.memory import map_large_allocations

# Everything lighten reads is local; say so to huggingface_hub, and keep its bars out of ours.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make existing transformer models light: formats, quantization, evaluation.",
)
out = Console()
if not out.is_terminal:  # piped or logged: do not squeeze tables into 80 columns
    out = Console(width=160)
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, however long


class Interrupted(BaseException):
    """Ctrl-C. Not KeyboardInterrupt, which typer turns into a silent exit before main() could say so."""


def _interrupt(signum, frame):
    raise Interrupted


def main() -> None:
    """Console-script entry: a user mistake prints one `error:` line and exits 2, never a traceback."""
    map_large_allocations()
    signal.signal(signal.SIGINT, _interrupt)
    try:
        # Not standalone: typer would print usage errors as a boxed panel and swallow Ctrl-C.
        app(args=sys.argv[1:] or ["--help"], standalone_mode=False)
    except typer.TyperException as e:  # bad usage: a missing argument, an unknown option, a non-number
        ctx = getattr(e, "ctx", None)
        _fail(f"{e.format_message()} (see `{ctx.command_path if ctx else 'lighten'} --help`)")
    except LightenError as e:
        _fail(str(e))
    except Interrupted:
        # Outputs are built in temp files and renamed into place only when complete: nothing half-written.
        err.print("interrupted: no output was written or changed")
        sys.exit(130)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    sys.exit(2)


def _print_json(obj) -> None:
    out.print_json(json.dumps(obj))


def _print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*r)
    out.print(table)


@app.command()
def formats(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False):
    """List the number-format zoo: bits per element (incl. scales), levels, max value."""
    from lighten.formats import list_formats

    rows = [
        {"name": f.name, "bits_per_element": f.bits_per_element, "levels": f.levels, "max_value": f.max_value}
        for f in list_formats()
    ]
    if as_json:
        return _print_json(rows)
    _print_table(
        "lighten formats",
        ["name", "bits/element", "levels", "max value"],
        [[r["name"], f"{r['bits_per_element']:.4g}", str(r["levels"]), f"{r['max_value']:g}"] for r in rows],
    )


@app.command()
def inspect(
    model: Annotated[
        str, typer.Argument(help="Built-in name, Hugging Face model dir or lighten checkpoint.")
    ],
    text: Annotated[
        Path | None, typer.Option(help="UTF-8 calibration text (default: Wikipedia calibration split).")
    ] = None,
    tokens: Annotated[int, typer.Option(help="Calibration tokens to run through the model.")] = 2048,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG of per-layer outlier magnitude here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
    force: Annotated[bool, typer.Option(help="Replace the --plot PNG if lighten wrote it.")] = False,
):
    """Where the model's outliers are and why: per layer activation/weight outliers, norm gains, RTN error."""
    from lighten.atomic import check_output
    from lighten.checkpoint import load
    from lighten.eval import read_text_file
    from lighten.inspect import inspect_model, inspect_table, is_lighten_png, plot_outliers

    if plot is not None:
        check_output(plot, force, is_ours=is_lighten_png)
    texts = [read_text_file(text)] if text is not None else None
    loaded, tokenizer = load(model)
    report = inspect_model(loaded, tokenizer, texts, n_tokens=tokens)
    if plot is not None:
        plot_outliers(report, plot, force)
    if as_json:
        return _print_json(report)
    _print_table(
        f"{model}: outliers per site ({report.get('n_tokens', tokens)} tokens)", *inspect_table(report)
    )
    if plot is not None:
        out.print(f"plot written to {plot}")


@app.command()
def quantize(
    model: Annotated[
        str, typer.Argument(help="Built-in name (minilm, smollm2-135m) or a Hugging Face model dir.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output checkpoint directory.")],
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="Format spec: int4:g128, nf4, ... or a GGUF type (q4_0, q4_k, ...), which makes a budget a "
            "GGUF budget. Default with a budget: q4_0 (a GGUF budget).",
        ),
    ] = None,
    algorithm: Annotated[
        str | None,
        typer.Option(
            help="rtn, mse (clip search), gptq, awq or imatrix (llama.cpp's importance-weighted search). "
            "Default: imatrix for GGUF types that use it (q4_0, iq4_nl, q4_k, ...), rtn for the rest."
        ),
    ] = None,
    surgery: Annotated[
        str,
        typer.Option(help="Exact rewrites first, in order: fold,rmsnorm,rotate|rotate_fused,smooth|osplus"),
    ] = "",
    budget: Annotated[
        str | None,
        typer.Option(
            help="Mixed precision under a budget: 4.5bits, 60MB, ... With a GGUF --format it counts the "
            "matrices inside the blocks (llama.cpp's blk.*, as its bits per weight do); the token embedding "
            "and output matrix stay outside it (full precision here, Q8_0 in `lighten export --to gguf`)."
        ),
    ] = None,
    bits: Annotated[
        float | None, typer.Option(help="Budget as average bits per quantized weight (= --budget 4.5bits).")
    ] = None,
    candidates: Annotated[
        str,
        typer.Option(
            help="Comma-separated specs the budget chooses from. Default with a GGUF --format: q4_0, "
            "iq4_nl, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, iq4_xs (+ q3_k under 4.5 bits, q2_k under 3.5) "
            "and the format, each weight keeping those that fit its rows."
        ),
    ] = "",
    sensitivity: Annotated[
        str | None,
        typer.Option(
            help="How the budget rates each weight's candidates: kl (quantize it alone, KL of the output on "
            "the calibration text: a forward pass per weight and candidate) or imatrix (its error weighted "
            "by the mean x² of each input, llama.cpp's estimate: one pass). Default: imatrix for a GGUF "
            "--format, kl otherwise."
        ),
    ] = None,
    fallback: Annotated[
        bool,
        typer.Option(
            help="GGUF types: store a weight whose rows are not whole blocks (q4_k on rows of 576) in "
            "llama-quantize's fallback type (q5_0), or keep it if none fits, instead of failing."
        ),
    ] = False,
    skip: Annotated[list[str] | None, typer.Option(help="Regex of weights to keep (repeatable).")] = None,
    embeddings: Annotated[bool, typer.Option(help="Also quantize embedding tables.")] = False,
    calibration_tokens: Annotated[
        int | None,
        typer.Option(
            help="Calibration tokens (default 512; imatrix 2,048; gptq, awq 65,536 in windows of 512)."
        ),
    ] = None,
    recipe: Annotated[str | None, typer.Option(help="A recipe YAML file or shipped recipe name.")] = None,
    imatrix: Annotated[
        Path | None,
        typer.Option(help="A llama.cpp imatrix file (GGUF or .dat) for algorithm imatrix: no calibration."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace OUTPUT if lighten wrote it.")] = False,
):
    """Quantize and save packed codes + scales: a recipe, or a format (+ algorithm, surgery, budget)."""
    from lighten.pipeline import quantize_to_dir
    from lighten.recipes import BUDGET_FORMAT, load_recipe, recipe_from_options

    if bits is not None:
        if budget is not None:
            raise LightenError("give the budget once: --budget SIZE or --bits N, not both")
        budget = f"{bits}bits"
    if recipe is not None:
        if (
            format
            or surgery
            or budget
            or candidates
            or skip
            or embeddings
            or algorithm
            or sensitivity
            or fallback
        ):
            raise LightenError(
                "--recipe describes the whole job: drop --format/--algorithm/--surgery/--budget/..."
            )
        plan = load_recipe(recipe)
    elif format is None and budget is None:
        raise LightenError("give --format SPEC (see `lighten formats`), a budget (--bits N) or --recipe")
    else:
        plan = recipe_from_options(
            format or BUDGET_FORMAT,
            algorithm,
            _csv(surgery),
            tuple(skip or ()),
            embeddings,
            budget,
            _csv(candidates),
            calibration_tokens,
            fallback,
            sensitivity,
        )
    from lighten.checkpoint import read_manifest

    path = quantize_to_dir(model, plan, output, force=force, imatrix=imatrix)
    manifest = read_manifest(path)
    if table := manifest["allocation"]:
        _print_table(
            "allocation",
            ["weight", "format", "bytes", "sensitivity"],
            [[r["name"], r["format"], str(r["bytes"]), f"{r['sensitivity']:.3g}"] for r in table],
        )
    if summary := manifest["budget"]:
        out.print(_budget_line(summary))
    out.print(f"wrote {path}")


def _budget_line(summary: dict) -> str:
    """What a budget counted and achieved, in one line."""
    bytes_used = f"{summary['bytes']:,} of {summary['bytes_allowed']:,} bytes"
    line = (
        f"budget {summary['size']} over the {summary['counts']} ({summary['weights']:,} weights): "
        f"{summary['bits_per_weight']:.4f} bits per weight, {bytes_used}; "
        f"sensitivity {summary['sensitivity']}"
    )
    if outside := summary["not_counted"]:
        line += "; not counted: " + ", ".join(f"{name} {spec}" for name, spec in outside.items())
    return line


@app.command()
def finetune(
    model: Annotated[str, typer.Argument(help="smollm2-135m or a causal LM's Hugging Face directory.")],
    qat: Annotated[
        str, typer.Option(help="The weight format to train through and write (ternary, int2:g32...).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output checkpoint directory.")],
    steps: Annotated[int, typer.Option(help="Training steps.", min=1)] = 100,
    batch: Annotated[int, typer.Option(help="Sequences per step.", min=1)] = 4,
    context: Annotated[int, typer.Option(help="Tokens per sequence.", min=2)] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warmup 10 %, cosine to a tenth).")] = 3e-4,
    seed: Annotated[int, typer.Option(help="Seed of the batches.")] = 0,
    checkpoint_every: Annotated[
        int, typer.Option(help="Steps between checkpoints of the training.", min=1)
    ] = 10,
    force: Annotated[bool, typer.Option(help="Replace OUTPUT if lighten wrote it.")] = False,
):
    """Quantization-aware fine-tuning, distilled from the model itself, saved as a quantized checkpoint.

    The weights train through the format's rounding towards the model's own next-token distribution (KL) on
    the Wikipedia calibration split. A stopped run resumes from OUTPUT.training when the same command runs
    again."""
    from lighten.lab.finetune import finetune_settings, finetune_to_dir, training_dir

    options = dict(batch=batch, context=context, lr=lr, seed=seed, checkpoint_every=checkpoint_every)
    settings = finetune_settings(qat, steps, **options)
    try:
        saved = finetune_to_dir(model, settings, output, force)
    except Interrupted:
        err.print(
            f"interrupted: run the same command again to resume from the last checkpoint in "
            f"{training_dir(output)}"
        )
        sys.exit(130)
    out.print(f"wrote {saved}")


@app.command("imatrix")
def imatrix_(
    model: Annotated[str, typer.Argument(help="Built-in name or Hugging Face model dir (a causal LM).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The imatrix file to write (GGUF).")],
    calibration_tokens: Annotated[
        int | None, typer.Option(help="Calibration tokens, in windows of 512 (default 2048).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace OUTPUT if lighten wrote it.")] = False,
):
    """Collect llama.cpp's importance matrix (mean x² of every linear's inputs).

    For llama-quantize --imatrix or lighten quantize --imatrix."""
    from lighten.pipeline import imatrix_to_file

    out.print(f"wrote {imatrix_to_file(model, output, calibration_tokens, force)}")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@app.command("eval")
def eval_(
    model: Annotated[
        str, typer.Argument(help="A lighten checkpoint, built-in name or Hugging Face model dir.")
    ],
    reference: Annotated[
        str | None, typer.Option(help="Model to compare against (default: the checkpoint's source model).")
    ] = None,
    text: Annotated[
        Path | None,
        typer.Option(help="UTF-8 text file: the corpus for causal LMs, one sentence per line for encoders."),
    ] = None,
    tokens: Annotated[int, typer.Option(help="Tokens of text for perplexity / KL.")] = 4096,
    context: Annotated[int, typer.Option(help="Context length of each perplexity window.")] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Size, and fidelity to the reference: perplexity + KL (causal LMs) or cosine + Spearman (encoders)."""
    from lighten.eval import read_text_file
    from lighten.eval.compare import evaluate
    from lighten.eval.table import report_table

    body = read_text_file(text) if text is not None else None
    report = evaluate([model], reference=reference, text=body, n_tokens=tokens, context=context)
    if as_json:
        return _print_json(report)
    _print_table(f"{model} ({report['kind']}, {_describe_data(report['data'])})", *report_table(report))


@app.command()
def run(
    model: Annotated[
        str, typer.Argument(help="A lighten checkpoint (runs packed), built-in name or HF dir.")
    ],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt or sentence (repeatable).")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt (causal LMs).")] = 32,
    engine: Annotated[
        str,
        typer.Option(
            help="torch (lighten's packed runtime), llama.cpp (a checkpoint whose weights are all GGUF "
            "types, on its exact GGUF export) or auto (llama.cpp where it runs the checkpoint exactly)."
        ),
    ] = "auto",
    kernels: Annotated[
        str,
        typer.Option(
            help="The torch engine's kernels for lighten's int8/int5/int4 that ggml computes exactly "
            "(symmetric, groups of whole 32-blocks): torch, ggml, or auto (the faster here, measured once)."
        ),
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (with the kernels that ran).")] = False,
):
    """Generate text (causal LMs, greedy) or embed sentences (encoders), with tokens/s."""
    from lighten.pipeline import run_model

    result = run_model(model, prompt, max_new_tokens, engine, kernels)
    if as_json:
        return _print_json(result)
    if result["kind"] == "encoder":
        speed = f"{result['sentences_per_s']:.1f} sentences/s"
        out.print(f"{len(prompt)} sentences embedded, dim {result['dim']}, {speed}")
        rows = [[p[:40]] + [f"{c:.3f}" for c in row] for p, row in zip(prompt, result["cosine"], strict=True)]
        return _print_table("cosine similarity", ["sentence"] + [str(i) for i in range(len(prompt))], rows)
    for g in result["generations"]:
        out.print(f"[bold]{g['prompt']}[/bold]{g['completion']}", highlight=False)
        speed = f"decode {g['decode_tokens_per_s']:.1f} tokens/s"
        engine = ", ".join(filter(None, (result["engine"], result.get("generator"))))
        out.print(f"[dim]{g['new_tokens']} tokens, {speed} ({engine})[/dim]")


@app.command()
def export(
    source: Annotated[
        str, typer.Argument(help="A lighten checkpoint (or, for GGUF, any model lighten loads).")
    ],
    to: Annotated[str, typer.Option(help="gguf or compressed-tensors.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="GGUF file or compressed-tensors directory.")
    ],
    type: Annotated[
        str | None,
        typer.Option(
            "--type",
            help="GGUF type of the matrices not already in a GGUF block type: F32, F16, Q8_0 (default), "
            "Q4_0, Q6_K, Q4_K.",
        ),
    ] = None,
    pre_tokenizer: Annotated[
        str | None,
        typer.Option(help="GGUF: llama.cpp's pre-tokenizer name, for a tokenizer it does not recognise."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace OUTPUT if lighten wrote it.")] = False,
):
    """Export for llama.cpp (GGUF) or vLLM (compressed-tensors).

    GGUF is for causal LMs: the README's family table says which."""
    from lighten.pipeline import export_model

    out.print(f"wrote {export_model(source, to, output, type, force, pre_tokenizer)}")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where checkpoints and results go.")] = Path(
        "out/demo"
    ),
    tokens: Annotated[int, typer.Option(help="Tokens of Wikipedia text for perplexity / KL.")] = 4096,
):
    """Quantize both built-in models to six formats and compare each with its original.

    A rerun replaces what an earlier demo wrote into OUTPUT."""
    from lighten.atomic import atomic_file, check_output, in_lighten_dir
    from lighten.eval.table import markdown, report_table
    from lighten.pipeline import run_demo

    results = output / "results.md", output / "results.json"
    for path in results:
        check_output(path, force=True, is_ours=in_lighten_dir)
    reports = run_demo(output, n_tokens=tokens)
    md = []
    for report in reports:
        title = f"{report['reference']['name']} ({report['kind']}, {_describe_data(report['data'])})"
        _print_table(title, *report_table(report))
        md.append(f"**{title}**\n\n" + markdown(*report_table(report)))
    for path, text in zip(results, ["\n".join(md), json.dumps(reports, indent=2)], strict=True):
        with atomic_file(path, force=True, is_ours=in_lighten_dir) as tmp:
            tmp.write_text(text)
    out.print(f"results in {results[0]} and {results[1]}")


@app.command()
def sweep(
    models: Annotated[list[str], typer.Argument(help="Built-in names or Hugging Face model directories.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The results folder (resumed if there).")],
    formats: Annotated[str, typer.Option(help="Comma-separated format specs.")],
    algorithms: Annotated[str, typer.Option(help="Comma-separated; default: each format's own.")] = "",
    surgery: Annotated[
        list[str] | None,
        typer.Option(help="A surgery chain (fold,rotate); repeat for several; none for no surgery."),
    ] = None,
    budgets: Annotated[
        str, typer.Option(help="Comma-separated budgets (4.5bits, 60MB) choosing among...")
    ] = "",
    candidates: Annotated[str, typer.Option(help="...these comma-separated specs.")] = "",
    tokens: Annotated[int, typer.Option(help="Held-out tokens for perplexity / KL.", min=16)] = 4096,
    workers: Annotated[
        int | None, typer.Option(help="Local worker processes (default: cores, memory).")
    ] = None,
    ray: Annotated[str | None, typer.Option(help="Run on a Ray cluster: auto or its address.")] = None,
    speed: Annotated[bool, typer.Option(help="Measure decode speed (alone, after the quality jobs).")] = True,
    retry_failed: Annotated[bool, typer.Option(help="Run the jobs that failed before again.")] = False,
):
    """Quantize and evaluate a grid of models x formats x algorithms x surgery x budgets, resumably.

    One row per job in RESULTS/results.sqlite; a rerun skips what is done."""
    from lighten.sweep.grid import grid
    from lighten.sweep.run import run_sweep

    chains = [() if chain in ("", "none") else _csv(chain) for chain in (surgery or ["none"])]
    jobs = grid(
        models,
        list(_csv(formats)),
        list(_csv(algorithms)) or [None],
        chains,
        list(_csv(budgets)) or [None],
        _csv(candidates),
    )
    with _sweep_display(len(jobs)) as on_row:
        table = run_sweep(jobs, output, workers, ray, tokens, speed, retry_failed, on_row)
    headers = [
        "model",
        "format",
        "algorithm",
        "surgery",
        "budget",
        "bits/weight",
        "quality",
        "speed",
        "status",
    ]
    _print_table(f"sweep ({output / 'results.sqlite'})", headers, [_sweep_cells(r) for r in table])


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="The results folder of `lighten sweep`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")],
    force: Annotated[bool, typer.Option(help="Replace OUTPUT if lighten wrote it.")] = False,
):
    """One self-contained HTML page of a sweep: Pareto fronts, per-layer plans and outliers, all rows."""
    from lighten.sweep.report import write_report

    out.print(f"wrote {write_report(results, output, force)}")


def _sweep_cells(row: dict) -> list[str]:
    from lighten.sweep.store import speed_of

    job, result, rate = row["job"], row["result"] or {}, speed_of(row)
    cells = [job["model"], job["format"], job["algorithm"] or "default", ",".join(job["surgery"]) or "-"]
    cells += [job["budget"] or "-", f"{result['bits_per_weight']:.3f}" if result else "-"]
    return cells + [_quality(result, row["error"]), f"{rate:.1f}/s" if rate else "-", row["status"]]


def _quality(result: dict | None, error: str | None) -> str:
    if result and "kl" in result:
        return f"ppl {result['perplexity']:.4g}, KL {result['kl']:.4f}"
    if result:
        return f"cosine {result['cosine']:.4f}"
    return (error or "").strip().splitlines()[-1][:60]


@contextlib.contextmanager
def _sweep_display(total: int):
    """A bar of finished jobs with done / running / failed and each model's best row so far (least KL, or
    highest cosine); without a terminal (a log), one line per finished job. Yields run_sweep's on_row."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lighten.progress import note, stderr

    best = {}  # model -> (score, text)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, disable=not stderr.is_terminal) as progress:
        task = progress.add_task("sweep", total=total)

        def on_row(job, outcome, counts):
            result = outcome.get("result")
            if job is None:  # the start: the jobs done before
                return progress.update(task, completed=counts["done"])
            score = result.get("kl", -result.get("cosine", 0.0)) if result else math.inf
            if score < best.get(job.model, (math.inf,))[0]:
                best[job.model] = score, f"{job.model} {job.format}: {_quality(result, None)}"
            text = f"{counts['done']} done, {counts['running']} running, {counts['failed']} failed"
            leaders = "; ".join(t for _, t in best.values())
            progress.update(
                task, completed=counts["done"] + counts["failed"], description=f"{text}; best {leaders}"
            )
            if not stderr.is_terminal:
                status = "failed" if outcome.get("error") else "done"
                note(
                    f"{counts['done'] + counts['failed']}/{total} {status}: {job.model} {job.format} "
                    f"{_quality(result, outcome.get('error'))}"
                )

        yield on_row


lab = typer.Typer(
    no_args_is_help=True, help="The normalization lab: small LMs trained with the seeds' norms."
)
app.add_typer(lab, name="lab")


@lab.command("train")
def lab_train(
    output: Annotated[Path, typer.Option("--output", "-o", help="The run directory (resumed if stopped).")],
    norm: Annotated[str, typer.Option(help="layernorm, rmsnorm, single_scale_rmsnorm, powernorm, ...")] = (
        "rmsnorm"
    ),
    placement: Annotated[str, typer.Option(help="pre, post, peri or mix (Mix-LN).")] = "pre",
    steps: Annotated[int, typer.Option(help="Training steps.", min=1)] = 300,
    layernorm_scaling: Annotated[bool, typer.Option(help="Scale pre-norm outputs by 1/sqrt(layer).")] = False,
    embedding_projection: Annotated[bool, typer.Option(help="OSP's learnable embedding projection.")] = False,
    clipped_softmax: Annotated[float | None, typer.Option(help="Clipped softmax with this alpha.")] = None,
    gated_attention: Annotated[bool, typer.Option(help="A sigmoid gate on each head's output.")] = False,
    qat: Annotated[str | None, typer.Option(help="Train against this weight format (QAT).")] = None,
    qat_activations: Annotated[str | None, typer.Option(help="...and this activation format.")] = None,
    bitnet: Annotated[
        bool, typer.Option(help="BitNet b1.58 QAT: ternary weights, int8 activations.")
    ] = False,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 256,
    layers: Annotated[int, typer.Option(help="Transformer blocks.")] = 6,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    batch: Annotated[int, typer.Option(help="Sequences per step.", min=1)] = 16,
    context: Annotated[int, typer.Option(help="Tokens per sequence.", min=2)] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the weights and the batches.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.", min=1)] = 50,
):
    """Train a small Llama-shaped LM on the Wikipedia calibration split.

    A stopped run resumes where its last checkpoint left it when the same command runs again."""
    from lighten.lab.qat import BITNET
    from lighten.lab.train import TrainSettings, train_on_wikipedia

    if bitnet:
        qat, qat_activations = BITNET
    settings = TrainSettings(steps, batch, context, lr, seed, checkpoint_every, qat, qat_activations)
    options = dict(norm=norm, placement=placement, layernorm_scaling=layernorm_scaling)
    options |= dict(embedding_projection=embedding_projection, clipped_softmax_alpha=clipped_softmax)
    options |= dict(gated_attention=gated_attention, hidden_size=hidden, num_hidden_layers=layers)
    options |= dict(num_attention_heads=heads)
    try:
        run = train_on_wikipedia(output, settings, **options)
    except Interrupted:
        err.print(f"interrupted: run the same command again to resume from the last checkpoint in {output}")
        sys.exit(130)
    out.print(f"trained {run}")


@lab.command("report")
def lab_report_(
    runs: Annotated[list[Path], typer.Argument(help="Finished run directories of `lighten lab train`.")],
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for perplexity.")] = 16384,
    calibration_tokens: Annotated[int, typer.Option(help="Tokens for statistics and GPTQ.")] = 4096,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Also write a PNG: kurtosis per block, the cost of each scheme.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace the --plot PNG if lighten wrote it.")] = False,
):
    """Each run's held-out perplexity in fp32, W8A8, 4-bit RTN, 4-bit GPTQ and ternary, and its outliers."""
    from lighten.atomic import check_output
    from lighten.inspect import is_lighten_png
    from lighten.lab.report import lab_report, plot_lab_reports

    if plot is not None:
        check_output(plot, force, is_ours=is_lighten_png)  # fail now, not after the measurements
    reports = [lab_report(run, eval_tokens, calibration_tokens) for run in runs]
    if plot is not None:
        plot_lab_reports(reports, plot, force)
    if as_json:
        return _print_json(reports)
    headers = ["run", "norm", "placement", *reports[0]["perplexity"], "max kurtosis", "max max/median"]
    headers.append("residual absmax")
    rows = [
        [r["run"], r["config"]["norm"], r["config"]["placement"]]
        + [f"{p:.2f}" for p in r["perplexity"].values()]
        + [f"{v:.1f}" for v in r["summary"].values()]
        for r in reports
    ]
    _print_table(
        "lab runs (held-out Wikipedia perplexity; outliers of the block linears' inputs)", headers, rows
    )


def _describe_data(data: dict) -> str:
    if "n_tokens" in data:
        return f"{data['corpus']}, {data['n_tokens']} tokens, context {data['context']}"
    return f"{data['corpus']}, {data['n_sentences']} sentences"
