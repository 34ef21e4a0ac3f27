"""Does exact surgery make W8A8 / W4A8 / int4 weight-only quantization better? Quality, not speed.

For each rewrite chain, on the real smollm2-135m: perplexity and KL to the fp32 original on the held-out
Wikipedia text, under each scheme (weights RTN; activations simulated: dynamic per-token int8, static
per-tensor int8 calibrated on the surgically rewritten fp32 model, or LLM.int8() with threshold 6), plus
the activation outlier ratio (max / median of the per-channel absmax) at the inputs of each block's linears
and the share of input columns LLM.int8() would keep in full precision. minilm (post-LN BERT) gets the one
rewrite that is exact there, value→output smoothing.

    .venv/bin/python benchmarks/surgery.py [--tokens 4096] [--calibration-tokens 2048]
        [--chains none smooth] [--schemes W8A8 W8A8-static W8A8-LLM.int8]
"""

import argparse
import copy
import statistics

import torch

from lighten import formats
from lighten.algorithms.act_quant import calibrate_input_scales, quantize_inputs
from lighten.algorithms.activations import OUTLIER_THRESHOLD, collect_input_stats
from lighten.eval import causal_fidelity, embedding_fidelity, eval_sentences, wiki_texts
from lighten.models import load_model
from lighten.plan import make_plan
from lighten.surgery import apply_surgery, smooth_values

SCHEMES = {  # name -> (weight spec, activations: "per-token", "static", "llm.int8" or None to keep them)
    "W8A8": ("int8:channel", "per-token"),
    "W8A8-static": ("int8:channel", "static"),
    "W8A8-LLM.int8": ("int8:channel", "llm.int8"),
    "W4A8": ("int4:g128", "per-token"),
    "W4A16": ("int4:g128", None),
}
SITES = ("q_proj", "o_proj", "gate_proj", "down_proj")  # the four distinct linear inputs of a block
CHAINS = {
    "none": [],
    "smooth": ["smooth"],
    "osplus": ["osplus"],
    "fold+rotate": ["fold", "rotate"],
    "fold+rotate+smooth": ["fold", "rotate", "smooth"],
}


def quantized_copies(model, schemes, calibrate):
    """One quantized copy of `model` per scheme; calibrate(model) gives the input statistics static scales
    are taken from (collected once, only if a static scheme is asked for)."""
    stats = calibrate(model) if any(SCHEMES[s][1] == "static" for s in schemes) else None
    return [quantized_copy(model, *SCHEMES[s], stats) for s in schemes]


def quantized_copy(model, weight_spec, activations, stats):
    """A copy with RTN fake-quantized weights and (optionally) fake-quantized linear inputs."""
    model = copy.deepcopy(model)
    plan = make_plan(model, weight_spec)
    fmt = formats.get(weight_spec)
    with torch.no_grad():
        for name in plan:
            w = model.get_parameter(name)
            w.copy_(fmt.fake_quantize(w))
    names = [n.rsplit(".", 1)[0] for n in plan]
    if activations == "per-token":
        quantize_inputs(model, names, "int8:channel")
    elif activations == "static":
        quantize_inputs(model, names, "int8:tensor", scales=calibrate_input_scales(stats, names))
    elif activations == "llm.int8":
        quantize_inputs(model, names, "int8:channel", outlier_threshold=OUTLIER_THRESHOLD)
    return model


def outlier_ratio(s):
    return (s.absmax.max() / s.absmax.median()).item()


def llm_int8_columns(s):
    """Share of the input columns in which some token reaches the LLM.int8() threshold."""
    return (s.absmax >= OUTLIER_THRESHOLD).float().mean().item()


def over_blocks(stats, suffix, measure):
    """Mean and max over blocks of measure(input stats) for the linears whose names end in `suffix`."""
    values = [measure(s) for n, s in stats.items() if n.endswith(suffix)]
    return statistics.mean(values), max(values)


def smollm2(args):
    ref, tok = load_model("smollm2-135m")
    calib, held_out = wiki_texts("calibration"), wiki_texts("evaluation")
    print(
        f"smollm2-135m (real), {args.tokens} held-out tokens, context 512; RTN weights, simulated "
        f"activations; smoothing and static scales from {args.calibration_tokens} calibration tokens\n"
    )
    print(f"{'chain':20s} {'scheme':13s} {'ppl':>9s} {'Δppl %':>8s} {'KL':>8s}")
    base = None
    ratio_rows, column_rows, per_layer = [], [], {}

    def calibrate(m):
        return collect_input_stats(m, tok, calib, args.calibration_tokens)

    for chain in args.chains:
        model = copy.deepcopy(ref)
        apply_surgery(model, CHAINS[chain], stats=calibrate)
        # One window of 512 tokens: the columns LLM.int8() would pick in one forward at context 512.
        stats = collect_input_stats(model, tok, calib, n_tokens=512)
        ratio_rows.append(
            (chain, *(over_blocks(stats, s, outlier_ratio) for s in ("q_proj", "gate_proj", "down_proj")))
        )
        column_rows.append((chain, *(over_blocks(stats, s, llm_int8_columns) for s in SITES)))
        per_layer[chain] = {n: outlier_ratio(s) for n, s in stats.items()}
        cands = quantized_copies(model, args.schemes, calibrate)
        fid = causal_fidelity(ref, cands, tok, held_out, n_tokens=args.tokens, context=512)
        base = fid["reference"]["perplexity"]
        for scheme, c in zip(args.schemes, fid["candidates"], strict=True):
            rel = 100 * (c["perplexity"] / base - 1)
            print(f"{chain:20s} {scheme:13s} {c['perplexity']:9.3f} {rel:8.2f} {c['kl']:8.4f}", flush=True)
    print(f"\nfp32 original: ppl {base:.3f}\n")
    print("input outlier ratio max/median of per-channel absmax (mean over blocks / max over blocks):")
    print(f"{'chain':20s} {'q_proj in':>16s} {'gate_proj in':>16s} {'down_proj in':>16s}")
    for chain, *cols in ratio_rows:
        print(f"{chain:20s} " + " ".join(f"{m:7.1f} / {x:6.1f}" for m, x in cols))
    print(f"\n% of input columns with some |x| >= {OUTLIER_THRESHOLD} in a 512-token window, LLM.int8()'s")
    print("full-precision columns (mean over blocks / max over blocks; k/v read q's input, up reads gate's):")
    print(f"{'chain':20s} " + " ".join(f"{s + ' in':>16s}" for s in SITES))
    for chain, *cols in column_rows:
        print(f"{chain:20s} " + " ".join(f"{100 * m:7.2f} / {100 * x:6.2f}" for m, x in cols))
    print("\nper block, max/median input ratio at q_proj | down_proj, for each chain:")
    print("block " + " ".join(f"{c:>19s}" for c in args.chains))
    for i in range(ref.config.num_hidden_layers):
        q, down = f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.mlp.down_proj"
        print(
            f"{i:5d} " + " ".join(f"{per_layer[c][q]:8.1f} | {per_layer[c][down]:8.1f}" for c in args.chains)
        )


def minilm(args):
    ref, tok = load_model("minilm")
    calib = wiki_texts("calibration")
    sentences = eval_sentences()
    print("\nminilm (real): embedding cosine / Spearman vs fp32 on the 64 shipped sentences")
    smoothed = copy.deepcopy(ref)
    stats = collect_input_stats(smoothed, tok, calib, n_tokens=2048)
    smooth_values(smoothed, {n: s.absmax for n, s in stats.items()})
    for chain, model in (("none", ref), ("smooth_values", smoothed)):
        cands = quantized_copies(
            model, args.schemes, lambda m: collect_input_stats(m, tok, calib, n_tokens=2048)
        )
        fid = embedding_fidelity(ref, cands, tok, sentences)
        for scheme, c in zip(args.schemes, fid["candidates"], strict=True):
            print(
                f"{chain:20s} {scheme:13s} cosine {c['cosine']:.4f}  spearman {c['spearman']:.4f}", flush=True
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--chains", nargs="+", choices=list(CHAINS), default=list(CHAINS))
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    args = parser.parse_args()
    smollm2(args)
    minilm(args)
