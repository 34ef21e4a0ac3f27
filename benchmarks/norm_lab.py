"""The experiment the normalization seeds claim: with the same data, steps, seed and size, do Peri-LN,
LayerNorm Scaling, OSP, Mix-LN, clipped softmax or gated attention give lower kurtosis and a smaller
quantization loss than Pre-LN at equal fp32 quality? And does ternary QAT beat ternary PTQ?

Each kind is a `lighten lab train` run (resumable: a rerun skips finished runs and resumes stopped ones)
followed by `lighten lab report`; prints one markdown table (and writes it with the reports' JSON).

    .venv/bin/python benchmarks/norm_lab.py [--steps 300] [--seeds 0 1] [--kinds pre-rmsnorm peri ...]
        [--out out/norm-lab]
"""

import argparse
import json
from pathlib import Path

from lighten.errors import LightenError
from lighten.lab.qat import BITNET
from lighten.lab.report import lab_report
from lighten.lab.train import TrainSettings, train_on_wikipedia

# kind -> (LabConfig options, QAT (weights, activations) or None)
KINDS = {
    "pre-rmsnorm": (dict(norm="rmsnorm", placement="pre"), None),
    "pre-layernorm": (dict(norm="layernorm", placement="pre"), None),
    "post-layernorm": (dict(norm="layernorm", placement="post"), None),
    "mix-ln": (dict(norm="layernorm", placement="mix"), None),
    "peri-ln": (dict(norm="rmsnorm", placement="peri"), None),
    "ln-scaling": (dict(norm="rmsnorm", placement="pre", layernorm_scaling=True), None),
    "osp": (dict(norm="single_scale_rmsnorm", placement="pre", embedding_projection=True), None),
    "powernorm": (dict(norm="powernorm", placement="pre"), None),
    "unified": (dict(norm="unified", placement="pre"), None),
    "prepbn": (dict(norm="prepbn", placement="pre"), None),
    "clipped-softmax": (dict(norm="rmsnorm", placement="pre", clipped_softmax_alpha=4.0), None),
    "gated-attention": (dict(norm="rmsnorm", placement="pre", gated_attention=True), None),
    "bitnet-qat": (dict(norm="rmsnorm", placement="pre"), BITNET),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--out", type=Path, default=Path("out/norm-lab"))
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--from-json", action="store_true", help="table and figure of OUT/results.json")
    args = parser.parse_args()
    if args.from_json:
        return _write_results(json.loads((args.out / "results.json").read_text()), args.out)

    reports = []
    for kind in args.kinds:
        options, qat = KINDS[kind]
        for seed in args.seeds:
            settings = TrainSettings(
                args.steps, seed=seed, qat=qat and qat[0], qat_activations=qat and qat[1]
            )
            try:
                run = train_on_wikipedia(args.out / f"{kind}-seed{seed}", settings, **options)
            except LightenError as e:  # a diverged run is a result too
                reports.append({"kind": kind, "settings": {"seed": seed}, "failed": str(e).split(";")[0]})
                print(_row(reports[-1]), flush=True)
                continue
            saved = run / "report.json"  # a rerun reports only the runs not reported yet
            if saved.is_file() and json.loads(saved.read_text())["eval_tokens"] == args.eval_tokens:
                report = json.loads(saved.read_text())
            else:
                report = lab_report(run, args.eval_tokens) | {"kind": kind, "eval_tokens": args.eval_tokens}
                saved.write_text(json.dumps(report))
            reports.append(report)
            print(_row(report), flush=True)
    _write_results(reports, args.out)


def _write_results(reports: list[dict], out: Path) -> None:
    """results.md (the table), results.json and results.png: per-block kurtosis, quantized / fp32 ppl."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    table = "\n".join([HEADER, "|---" * (HEADER.count("|") - 1) + "|", *map(_row, reports)])
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(reports, indent=1))
    trained = [r for r in reports if "failed" not in r]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.8))
    for i, r in enumerate(trained):
        worst = [max(v for k, v in layer.items() if k.endswith("_kurtosis")) for layer in r["layers"]]
        style = "-" if i < 10 else "--"  # matplotlib's 10 colours come round again
        label = f"{r['kind']} (seed {r['settings']['seed']})"
        left.plot(range(1, len(worst) + 1), worst, style, marker="o", label=label)
    left.set(yscale="log", xlabel="block", ylabel="largest excess kurtosis of a linear's input")
    left.legend(fontsize=7)
    # 8 and 4 bits: the increase over fp32 in %; ternary (up to 135x) as a ratio on a log scale
    for axes, schemes, log in (
        (middle, ["W8A8", "W4 RTN", "W4 GPTQ"], False),
        (right, ["ternary RTN"], True),
    ):
        width = 0.8 / len(schemes)
        for i, scheme in enumerate(schemes):
            ratio = [r["perplexity"][scheme] / r["perplexity"]["fp32"] for r in trained]
            heights = ratio if log else [100 * (x - 1) for x in ratio]
            axes.bar([j + i * width for j in range(len(trained))], heights, width, label=scheme)
        ticks = [j + width * (len(schemes) - 1) / 2 for j in range(len(trained))]
        axes.set_xticks(ticks, [r["kind"] for r in trained], rotation=60, ha="right", fontsize=8)
        if log:
            axes.set(ylabel="perplexity / fp32 perplexity (log)", yscale="log")
            axes.axhline(1, color="black", linewidth=0.5)
        else:
            axes.set(ylabel="perplexity increase over fp32 (%)")
            axes.axhline(0, color="black", linewidth=0.5)
        axes.legend(fontsize=8)
    c, steps = trained[0]["config"], trained[0]["settings"]["steps"]
    size = f"{c['num_hidden_layers']} blocks of {c['hidden_size']}"
    fig.suptitle(f"lab models ({size}, {steps} steps on Wikipedia, trained here); held-out perplexity")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    print(table)


HEADER = (
    "| kind | seed | fp32 ppl | W8A8 | W4 RTN | W4 GPTQ | ternary RTN | max kurtosis | max max/median "
    "| residual absmax |"
)


def _row(r: dict) -> str:
    if "failed" in r:
        return f"| {r['kind']} | {r['settings']['seed']} | {r['failed']} |" + " |" * (HEADER.count("|") - 4)
    p, s = r["perplexity"], r["summary"]
    cells = [r["kind"], r["settings"]["seed"], *(f"{v:.2f}" if v < 1e4 else f"{v:.3g}" for v in p.values())]
    cells += [f"{s['max_kurtosis']:.1f}", f"{s['max_max_median']:.1f}", f"{s['residual_absmax']:.1f}"]
    return "| " + " | ".join(map(str, cells)) + " |"


if __name__ == "__main__":
    main()
