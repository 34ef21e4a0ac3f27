"""Does exact surgery make W8A8 / W4A8 / int4 weight-only quantization better? Quality, not speed.

For each rewrite chain, on the real smollm2-135m: perplexity and KL to the fp32 original on the held-out
Wikipedia text, under three schemes (weights RTN, activations dynamic per-token, simulated), plus the
activation outlier ratio (max / median of the per-channel absmax) at the inputs of each block's linears.
minilm (post-LN BERT) gets the one rewrite that is exact there, value→output smoothing.

    .venv/bin/python benchmarks/surgery.py [--tokens 4096] [--calibration-tokens 2048]
"""

import argparse
import copy
import statistics

import torch

from lighten import formats
from lighten.algorithms.act_quant import quantize_inputs
from lighten.algorithms.activations import collect_input_stats
from lighten.eval import causal_fidelity, embedding_fidelity, eval_sentences, wiki_texts
from lighten.models import load_model
from lighten.quantize import make_plan
from lighten.surgery import apply_surgery, smooth_values

SCHEMES = {  # name -> (weight spec, activation spec or None)
    "W8A8": ("int8:channel", "int8:channel"),
    "W4A8": ("int4:g128", "int8:channel"),
    "W4A16": ("int4:g128", None),
}
CHAINS = {
    "none": [],
    "smooth": ["smooth"],
    "osplus": ["osplus"],
    "fold+rotate": ["fold", "rotate"],
    "fold+rotate+smooth": ["fold", "rotate", "smooth"],
}


def quantized_copy(model, weight_spec, act_spec):
    """A copy with RTN fake-quantized weights and (optionally) fake-quantized linear inputs."""
    model = copy.deepcopy(model)
    plan = make_plan(model, weight_spec)
    fmt = formats.get(weight_spec)
    with torch.no_grad():
        for name in plan:
            w = model.get_parameter(name)
            w.copy_(fmt.fake_quantize(w))
    if act_spec:
        quantize_inputs(model, [n.rsplit(".", 1)[0] for n in plan], act_spec)
    return model


def outlier_ratios(stats, suffixes):
    """Mean and max over blocks of max/median per-channel input absmax, for linears ending in `suffixes`."""
    ratios = [(s.absmax.max() / s.absmax.median()).item() for n, s in stats.items() if n.endswith(suffixes)]
    return statistics.mean(ratios), max(ratios)


def smollm2(args):
    ref, tok = load_model("smollm2-135m")
    calib, held_out = wiki_texts("calibration"), wiki_texts("evaluation")
    print(
        f"smollm2-135m (real), {args.tokens} held-out tokens, context 512; RTN weights, dynamic per-token "
        f"activations; smoothing calibrated on {args.calibration_tokens} calibration tokens\n"
    )
    print(f"{'chain':20s} {'scheme':6s} {'ppl':>9s} {'Δppl %':>8s} {'KL':>8s}")
    base = None
    ratio_rows, per_layer = [], {}
    for chain, steps in CHAINS.items():
        model = copy.deepcopy(ref)
        apply_surgery(
            model, steps, stats=lambda m: collect_input_stats(m, tok, calib, args.calibration_tokens)
        )
        stats = collect_input_stats(model, tok, calib, n_tokens=512)
        ratio_rows.append(
            (
                chain,
                outlier_ratios(stats, ("q_proj",)),
                outlier_ratios(stats, ("gate_proj",)),
                outlier_ratios(stats, ("down_proj",)),
            )
        )
        cands = [quantized_copy(model, *SCHEMES[s]) for s in SCHEMES]
        fid = causal_fidelity(ref, cands, tok, held_out, n_tokens=args.tokens, context=512)
        base = fid["reference"]["perplexity"]
        for scheme, c in zip(SCHEMES, fid["candidates"], strict=True):
            rel = 100 * (c["perplexity"] / base - 1)
            print(f"{chain:20s} {scheme:6s} {c['perplexity']:9.3f} {rel:8.2f} {c['kl']:8.4f}", flush=True)
    print(f"\nfp32 original: ppl {base:.3f}\n")
    print("input outlier ratio max/median of per-channel absmax (mean over blocks / max over blocks):")
    print(f"{'chain':20s} {'q_proj in':>16s} {'gate_proj in':>16s} {'down_proj in':>16s}")
    for chain, *cols in ratio_rows:
        print(f"{chain:20s} " + " ".join(f"{m:7.1f} / {x:6.1f}" for m, x in cols))
    print("\nper block, max/median input ratio at q_proj | down_proj, for each chain:")
    print("block " + " ".join(f"{c:>19s}" for c in CHAINS))
    for i in range(ref.config.num_hidden_layers):
        q, down = f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.mlp.down_proj"
        print(f"{i:5d} " + " ".join(f"{per_layer[c][q]:8.1f} | {per_layer[c][down]:8.1f}" for c in CHAINS))


def minilm():
    ref, tok = load_model("minilm")
    sentences = eval_sentences()
    print("\nminilm (real): embedding cosine / Spearman vs fp32 on the 64 shipped sentences")
    smoothed = copy.deepcopy(ref)
    stats = collect_input_stats(smoothed, tok, wiki_texts("calibration"), n_tokens=2048)
    smooth_values(smoothed, {n: s.absmax for n, s in stats.items()})
    for chain, model in (("none", ref), ("smooth_values", smoothed)):
        cands = [quantized_copy(model, *SCHEMES[s]) for s in SCHEMES]
        fid = embedding_fidelity(ref, cands, tok, sentences)
        for scheme, c in zip(SCHEMES, fid["candidates"], strict=True):
            print(
                f"{chain:20s} {scheme:6s} cosine {c['cosine']:.4f}  spearman {c['spearman']:.4f}", flush=True
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    args = parser.parse_args()
    smollm2(args)
    minilm()
