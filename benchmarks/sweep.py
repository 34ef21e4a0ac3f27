"""The README's sweep: 24 jobs over smollm2-135m and minilm (ten formats, and GGUF budgets of 5 and 6 bits
chosen among llama.cpp's types), run by `lighten sweep` locally or as Ray tasks; then `lighten report`, a
screenshot of it in headless Chromium, and each model's Pareto front (bits per weight against quality) as a
markdown table. `--compare OTHER` checks that another results folder of the same grid (say, the Ray run's)
holds the same rows: the same jobs with the same quality numbers.

    .venv/bin/python benchmarks/sweep.py [--out out/sweep-readme] [--ray auto] [--compare DIR]
        [--screenshot docs/sweep-report.png]
"""

import argparse
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from lighten.sweep.report import QUALITY, pareto_front
from lighten.sweep.run import STORE
from lighten.sweep.store import rows, speed_of

MEASURED = ("bits_per_weight", "disk_bytes", "perplexity", "kl", "cosine", "spearman")
MODELS = ["smollm2-135m", "minilm"]
GRID = [  # one `lighten sweep` each, into the same results
    ["--formats", "int8,int4:g128,int4:g32,nf4:g64,mxfp4,fp8_e4m3,q8_0,q5_0,q4_0,iq4_nl"],
    ["--formats", "q4_0", "--budgets", "5bits,6bits"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/sweep-readme"))
    parser.add_argument("--ray", help="run on this Ray cluster (auto, or its address)")
    parser.add_argument("--compare", type=Path, help="another results folder of the same grid")
    parser.add_argument("--screenshot", type=Path, help="write the report's screenshot here (PNG)")
    args = parser.parse_args()

    lighten = [sys.executable, "-m", "lighten"]
    for options in GRID:
        ray = ["--ray", args.ray] if args.ray else []
        subprocess.run([*lighten, "sweep", *MODELS, "-o", str(args.out), *options, *ray], check=True)
    page = args.out.with_suffix(".html")
    subprocess.run([*lighten, "report", str(args.out), "-o", str(page), "--force"], check=True)
    if args.screenshot:
        screenshot(page, args.screenshot)
    table = rows(sqlite3.connect(args.out / STORE))
    if args.compare:
        print(same_rows(table, rows(sqlite3.connect(args.compare / STORE))))
    print(pareto_markdown(table))


def screenshot(page: Path, png: Path) -> None:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1700"]
    browser = shutil.which("chromium") or sys.exit("needs Debian's chromium (make setup installs it)")
    subprocess.run([browser, *flags, f"--screenshot={png.resolve()}", page.resolve().as_uri()], check=True)


def same_rows(table: list[dict], other: list[dict]) -> str:
    """Whether both stores hold the same jobs, with the same status and the same measured quality within
    1e-6 (speeds differ from run to run; worker thread counts may change float summation order)."""
    ours, theirs = ({r["id"]: r for r in rs} for rs in (table, other))
    if ours.keys() != theirs.keys():
        return f"different jobs: {sorted(ours.keys() ^ theirs.keys())}"
    worst = 0.0
    for i, r in ours.items():
        if r["status"] != theirs[i]["status"]:
            return f"job {i}: {r['status']} here, {theirs[i]['status']} there"
        for key in MEASURED if r["result"] else ():
            a, b = r["result"].get(key), theirs[i]["result"].get(key)
            if (a is None) != (b is None):
                return f"job {i}: {key} measured in one store only"
            if a is not None:
                worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    verdict = "same rows" if worst <= 1e-6 else "rows differ"
    return f"{verdict}: {len(ours)} jobs, largest relative difference {worst:.1e}"


def pareto_markdown(table: list[dict]) -> str:
    """Per model, the jobs on the front of bits per weight against quality, with their speed."""
    lines = []
    for model in dict.fromkeys(r["job"]["model"] for r in table):
        done = [r for r in table if r["job"]["model"] == model and r["status"] == "done"]
        kind = done[0]["result"]["kind"]
        _, quality = QUALITY[kind]
        front = pareto_front([(r["result"]["bits_per_weight"], quality(r["result"])) for r in done])
        if kind == "causal":
            head = "| format | budget | bits/weight | perplexity | KL | decode tokens/s |"
        else:
            head = "| format | budget | bits/weight | cosine | 1 − cosine | sentences/s |"
        title = f"**{model}**: {len(front)} of {len(done)} jobs on the front"
        lines += ["", title, "", head, "|---" * 6 + "|"]
        for r in (done[i] for i in front):
            res, speed = r["result"], speed_of(r)
            if kind == "causal":
                cells = [f"{res['perplexity']:.2f}", f"{res['kl']:.4f}"]
            else:
                cells = [f"{res['cosine']:.4f}", f"{1 - res['cosine']:.4f}"]
            rate = f"{speed:.1f}" if speed is not None else "-"
            job = r["job"]
            fmt = "mixed (ILP)" if job["budget"] else job["format"]
            lines.append(
                f"| {fmt} | {job['budget'] or '-'} | {res['bits_per_weight']:.3f} | "
                f"{cells[0]} | {cells[1]} | {rate} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
