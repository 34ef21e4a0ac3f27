"""What a lab model's normalization did to quantization: its held-out perplexity in fp32 and after W8A8,
4-bit round-to-nearest, 4-bit GPTQ and ternary rounding (BitNet b1.58's weights: what a model trained
with --bitnet computes with), and the outliers of what each layer's linears read.

Per block: the excess kurtosis and max/median of the per-channel absmax (inspect's two outlier measures)
of the inputs of q/k/v (the attention's norm output), o, gate/up (the MLP's norm output) and down, and the
largest |x| of the residual stream entering the block (the "massive activations")."""

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lighten import formats
from lighten.algorithms.act_quant import quantize_inputs
from lighten.algorithms.activations import window_input_stats
from lighten.algorithms.gptq import gptq_quantize_layer
from lighten.atomic import atomic_file
from lighten.inspect import SOFTWARE, is_lighten_png
from lighten.lab.data import lab_tokenizer, token_stream
from lighten.lab.train import SETTINGS, load_lab_model
from lighten.progress import track

W8A8 = "int8:channel"  # weights per output channel; activations per token (dynamic)
W4 = "int4:g128"
SITES = {  # what each of a block's four distinct linear inputs is, and the linear that reads it
    "attn_in": "self_attn.q_proj",
    "attn_out": "self_attn.o_proj",
    "mlp_in": "mlp.gate_proj",
    "mlp_out": "mlp.down_proj",
}


def lab_report(run: str | Path, eval_tokens: int = 16384, calibration_tokens: int = 4096) -> dict:
    """The report of one finished run directory (see the module docstring), as a JSON-ready dict."""
    run = Path(run)
    model = load_lab_model(run)
    described = json.loads((run / SETTINGS).read_text())
    context = described["settings"]["context"]
    tokenizer = lab_tokenizer(model.config.vocab_size)
    held_out = windows_of(token_stream("evaluation", tokenizer)[:eval_tokens], context)
    calibration = windows_of(token_stream("calibration", tokenizer)[:calibration_tokens], context)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")]

    blocks = [f"layers.{i}" for i in range(len(model.layers))]
    stats = window_input_stats(model, calibration, linears + blocks)
    layers = []
    for i, block in enumerate(blocks):
        layer = {"residual_absmax": stats[block].absmax.max().item()}
        for site, linear in SITES.items():
            s = stats[f"{block}.{linear}"]
            layer[f"{site}_kurtosis"] = s.kurtosis
            layer[f"{site}_max_median"] = (s.absmax.max() / s.absmax.median().clamp_min(1e-12)).item()
        layers.append(layer | {"block": i})

    ppl = {"fp32": perplexity(model, held_out)}
    w8a8 = _rtn(model, linears, W8A8)
    handles = quantize_inputs(w8a8, linears, W8A8)
    ppl["W8A8"] = perplexity(w8a8, held_out)
    for h in handles:
        h.remove()
    ppl["W4 RTN"] = perplexity(_rtn(model, linears, W4), held_out)
    ppl["W4 GPTQ"] = perplexity(_gptq(model, calibration, W4), held_out)
    ppl["ternary RTN"] = perplexity(_rtn(model, linears, "ternary"), held_out)
    return {
        "run": str(run),
        "config": described["config"],
        "settings": described["settings"],
        "final_loss": (described.get("loss") or [math.nan])[-1],
        "perplexity": ppl,
        "summary": {
            "max_kurtosis": max(v for layer in layers for k, v in layer.items() if k.endswith("_kurtosis")),
            "max_max_median": max(
                v for layer in layers for k, v in layer.items() if k.endswith("_max_median")
            ),
            "residual_absmax": max(layer["residual_absmax"] for layer in layers),
        },
        "layers": layers,
    }


def windows_of(stream: torch.Tensor, context: int) -> list[torch.Tensor]:
    return [w for w in stream.split(context) if len(w) == context]


@torch.no_grad()
def perplexity(model: nn.Module, windows: list[torch.Tensor]) -> float:
    """exp of the mean next-token negative log-likelihood over all windows (each scored on its own)."""
    nll, count = 0.0, 0
    for w in windows:
        logits = model(w[None])[0, :-1]
        nll += F.cross_entropy(logits.float(), w[1:], reduction="sum").item()
        count += len(w) - 1
    return math.exp(nll / count)


@torch.no_grad()
def _rtn(model: nn.Module, linears: list[str], spec: str) -> nn.Module:
    """A copy with the linears' weights rounded to nearest in `spec`."""
    fmt, quantized = formats.get(spec), copy.deepcopy(model)
    for name in linears:
        w = quantized.get_submodule(name).weight
        w.copy_(fmt.fake_quantize(w))
    return quantized


@torch.no_grad()
def _gptq(model: nn.Module, windows: list[torch.Tensor], spec: str) -> nn.Module:
    """A copy quantized by GPTQ block after block, each block's Hessians H = 2 XᵀX / n taken on the inputs
    that the blocks before it, already quantized, pass on."""
    fmt, quantized = formats.get(spec), copy.deepcopy(model)
    for i, block in enumerate(track(quantized.layers, "GPTQ", total=len(quantized.layers))):
        linears = {f"layers.{i}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        hessians = _hessians(quantized, linears, windows)
        for name, linear in linears.items():
            linear.weight.copy_(gptq_quantize_layer(linear.weight, hessians[name], fmt).dequantize())
    return quantized


def _hessians(model: nn.Module, modules: dict[str, nn.Module], windows: list[torch.Tensor]) -> dict:
    """{name: 2 XᵀX / n} of the inputs X of each module over the windows, in one pass."""
    sums, counts = {}, dict.fromkeys(modules, 0)

    def hook(name):
        def add(_, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = x.T @ x + sums.get(name, 0)
            counts[name] += len(x)

        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for w in windows:
            model(w[None])
    finally:
        for h in handles:
            h.remove()
    return {name: (2 * sums[name] / counts[name]).float() for name in modules}


def plot_lab_reports(reports: list[dict], png_path, force: bool = False) -> None:
    """Three panels as a PNG: each run's largest input kurtosis per block; the perplexity increase over
    fp32 after W8A8 and 4-bit RTN / GPTQ, in %; and ternary rounding's perplexity ratio, on a log scale (it
    reaches 100x where 4 bits cost under 1 %)."""
    from matplotlib.figure import Figure  # a bare Figure: pyplot's global state stays alone

    def name(r: dict) -> str:
        return f"{r.get('kind') or Path(r['run']).name} (seed {r['settings']['seed']})"

    fig = Figure(figsize=(16, 4.8))
    left, middle, right = fig.subplots(1, 3)
    for i, r in enumerate(reports):
        worst = [max(v for k, v in layer.items() if k.endswith("_kurtosis")) for layer in r["layers"]]
        style = "-" if i < 10 else "--"  # matplotlib's 10 colours come round again
        left.plot(range(1, len(worst) + 1), worst, style, marker="o", label=name(r))
    left.set(yscale="log", xlabel="block", ylabel="largest excess kurtosis of a linear's input")
    left.legend(fontsize=7)
    for axes, schemes, log in (
        (middle, ["W8A8", "W4 RTN", "W4 GPTQ"], False),
        (right, ["ternary RTN"], True),
    ):
        width = 0.8 / len(schemes)
        for i, scheme in enumerate(schemes):
            ratio = [r["perplexity"][scheme] / r["perplexity"]["fp32"] for r in reports]
            heights = ratio if log else [100 * (x - 1) for x in ratio]
            axes.bar([j + i * width for j in range(len(reports))], heights, width, label=scheme)
        ticks = [j + width * (len(schemes) - 1) / 2 for j in range(len(reports))]
        axes.set_xticks(ticks, [name(r) for r in reports], rotation=60, ha="right", fontsize=8)
        if log:
            axes.set(ylabel="perplexity / fp32 perplexity (log)", yscale="log")
        else:
            axes.set(ylabel="perplexity increase over fp32 (%)")
        axes.axhline(1 if log else 0, color="black", linewidth=0.5)
        axes.legend(fontsize=8)
    c, steps = reports[0]["config"], reports[0]["settings"]["steps"]
    size = f"{c['num_hidden_layers']} blocks of {c['hidden_size']}"
    fig.suptitle(f"lab models ({size}, {steps} steps on Wikipedia, trained here); held-out perplexity")
    fig.tight_layout()
    with atomic_file(png_path, force, is_ours=is_lighten_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": SOFTWARE})
