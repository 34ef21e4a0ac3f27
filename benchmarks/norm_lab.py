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
from lighten.lab.report import lab_report, plot_lab_reports
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
    table = "\n".join([HEADER, "|---" * (HEADER.count("|") - 1) + "|", *map(_row, reports)])
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(reports, indent=1))
    plot_lab_reports([r for r in reports if "failed" not in r], out / "results.png", force=True)
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
