"""A sweep as one self-contained HTML page: Pareto fronts of size against quality and speed against quality,
the per-layer format plan of each budgeted run as a heat map, the models' per-layer outlier profile, and a
sortable table of every row with its command line. Plots are inline SVG (matplotlib), the sorting a few
lines of inline script: the file opens with no network."""

import html
import io
import math
import re
from pathlib import Path

from lighten import formats
from lighten.atomic import atomic_file
from lighten.errors import LightenError
from lighten.sweep.run import STORE
from lighten.sweep.store import model_profiles, open_store, rows, speed_of

COLUMNS = [  # the table's: (name, kind)
    *((c, "text") for c in ("model", "format", "algorithm", "surgery", "budget")),
    *((c, "number") for c in ("bits_per_weight", "perplexity", "KL", "cosine", "speed")),
    ("status", "text"),
    ("command", "text"),
]
# (label, how to read it from a row's result, lower is better)
QUALITY = {
    "causal": ("KL(original ‖ quantized), nats/token", lambda r: r["kl"]),
    "encoder": ("1 − cosine to the original's embeddings", lambda r: 1 - r["cosine"]),
}
STYLE = """
:root { color-scheme: light dark; --fg: #1b1b1b; --bg: #fdfdfd; --line: #ccc; --accent: #0b62c4; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e8e8e8; --bg: #161616; --line: #444; --accent: #6cb2ff; }
}
body { font: 14px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); margin: 2em auto;
       max-width: 1200px; padding: 0 1em; }
figure { display: inline-block; margin: 0.5em; background: #fff; border-radius: 6px; padding: 4px; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 6px; text-align: right; }
th { cursor: pointer; user-select: none; } th:hover { color: var(--accent); }
td.text, th.text { text-align: left; } code { font-size: 12px; }
"""
# Click a header to sort by it (again: the other way); #sort=COLUMN in the URL sorts on load.
SCRIPT = """
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0], i = [...th.parentNode.children].indexOf(th);
  const up = th.dataset.dir !== 'up'; th.dataset.dir = up ? 'up' : 'down';
  const key = tr => { const v = tr.children[i].dataset.value ?? tr.children[i].textContent;
                      if (v === '') return Infinity;  // not measured: last
                      const n = parseFloat(v); return isNaN(n) ? v : n; };
  const rows = [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
  rows.forEach(r => body.appendChild(r));
}
document.querySelectorAll('th').forEach(th => th.addEventListener('click', () => sortBy(th)));
const wanted = new URLSearchParams(location.hash.slice(1)).get('sort');
if (wanted) { const th = document.querySelector(`th[data-key="${wanted}"]`); if (th) sortBy(th); }
document.body.dataset.ready = 'yes';
"""


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better on each), by x."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def write_report(results: str | Path, out: str | Path, force: bool = False) -> Path:
    """The report of the sweep in RESULTS (see the module docstring) written to `out`, atomically."""
    store = Path(results) / STORE
    if not store.is_file():
        raise LightenError(f"{results} holds no sweep results ({STORE}): run `lighten sweep -o {results}`")
    db = open_store(store)
    table, profiles = rows(db), model_profiles(db)
    with atomic_file(out, force=force, is_ours=_is_report) as tmp:
        tmp.write_text(render(table, profiles))
    return Path(out)


def render(table: list[dict], profiles: dict[str, dict]) -> str:
    done = [r for r in table if r["status"] == "done"]
    failed = len(table) - len(done)
    parts = [
        "<!doctype html><html lang=en><meta charset=utf-8><meta name=generator content=lighten>",
        f"<title>lighten sweep</title><style>{STYLE}</style><body><h1>lighten sweep</h1>",
        f"<p>{len(done)} jobs done, {failed} failed.</p><h2>Size and speed against quality</h2>",
    ]
    for gid, model in enumerate(dict.fromkeys(r["job"]["model"] for r in done)):
        parts += _fronts(model, [r for r in done if r["job"]["model"] == model], gid)
    plans = [r for r in done if (r["manifest"] or {}).get("allocation")]
    if plans:
        parts.append("<h2>Per-layer format plans</h2>")
        for model in dict.fromkeys(r["job"]["model"] for r in plans):
            model_plans = [r for r in plans if r["job"]["model"] == model]
            parts.append(_figure(_plan_heatmap(model, model_plans), "plans"))
    if profiles:
        parts.append("<h2>Outlier profile (lighten inspect)</h2>")
        parts += [_figure(_profile_plot(model, report), "profile") for model, report in profiles.items()]
    parts += ["<h2>All jobs</h2>", _table(table), f"<script>{SCRIPT}</script></body></html>"]
    return "\n".join(parts)


def _fronts(model: str, done: list[dict], gid: int) -> list[str]:
    """The two plots of one model; their points are SVG groups points-GID-size and points-GID-speed."""
    from matplotlib.figure import Figure

    kind = done[0]["result"]["kind"]
    label, quality = QUALITY[kind]
    rate = "decode tokens/s" if kind == "causal" else "sentences/s"
    fig = Figure(figsize=(11, 4))
    size_axes, speed_axes = fig.subplots(1, 2)
    for axes, axes_name, x_of, x_label in (
        (size_axes, "size", lambda r: r["result"]["bits_per_weight"], "bits per quantized weight"),
        (speed_axes, "speed", speed_of, f"{rate} on lighten's runtime (higher is better)"),
    ):
        measured = [r for r in done if x_of(r) is not None]
        # speed is better higher: negate it for the front
        points = [
            (x_of(r) if axes is size_axes else -x_of(r), max(quality(r["result"]), 1e-9)) for r in measured
        ]
        xs, ys = [x_of(r) for r in measured], [p[1] for p in points]
        axes.scatter(xs, ys, s=18, color="#888", label="job", gid=f"points-{gid}-{axes_name}")
        front = pareto_front(points)
        axes.plot([xs[i] for i in front], [ys[i] for i in front], "o-", color="#0b62c4", label="Pareto front")
        for i in front:
            axes.annotate(
                _short(measured[i]), (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        axes.set(xlabel=x_label, ylabel=label, yscale="log")
        axes.legend(fontsize=8)
    fig.suptitle(model)
    fig.tight_layout()
    return [_figure(fig, "fronts")]


def _plan_heatmap(model: str, plans: list[dict]):
    """The bits per weight each budgeted job of `model` gave each of its weights, a row per job."""
    from matplotlib.figure import Figure

    weights = list(dict.fromkeys(a["name"] for r in plans for a in r["manifest"]["allocation"]))
    bits = [[math.nan] * len(weights) for _ in plans]
    for row, r in zip(bits, plans, strict=True):
        for a in r["manifest"]["allocation"]:
            row[weights.index(a["name"])] = formats.get(a["format"]).bits_per_element
    fig = Figure(figsize=(11, 1.3 + 0.35 * len(plans)))
    axes = fig.subplots()
    axes.set_title(model)
    image = axes.imshow(bits, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_yticks(range(len(plans)), [_short(r) for r in plans], fontsize=7)
    axes.set_xlabel(f"weight, in model order ({len(weights)})")
    fig.colorbar(image, ax=axes, label="bits per weight")
    fig.tight_layout()
    return fig


def _profile_plot(model: str, report: dict):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.5))
    kurtosis, ratio = fig.subplots(1, 2)
    for kind in dict.fromkeys(s["kind"] for s in report["sites"]):
        sites = [s for s in report["sites"] if s["kind"] == kind]
        blocks = [s["block"] for s in sites]
        kurtosis.plot(blocks, [max(s["input"]["kurtosis"], 1e-3) for s in sites], marker=".", label=kind)
        ratio.plot(blocks, [s["input"]["ratio"] for s in sites], marker=".", label=kind)
    kurtosis.set(xlabel="block", ylabel="input excess kurtosis", yscale="log")
    ratio.set(xlabel="block", ylabel="input max / median channel absmax", yscale="log")
    kurtosis.legend(fontsize=7)
    fig.suptitle(model)
    fig.tight_layout()
    return fig


def _table(table: list[dict]) -> str:
    """Every row; each cell names its column (data-col) and numbers carry their value (data-value)."""
    head = "".join(f'<th data-key="{key}" class="{kind}">{key}</th>' for key, kind in COLUMNS)
    body = []
    for r in table:
        job, result = r["job"], r["result"] or {}
        status = "done" if r["status"] == "done" else f"failed: {(r['error'] or '').strip().splitlines()[-1]}"
        values = [job["model"], job["format"], job["algorithm"] or "default", ",".join(job["surgery"]) or "-"]
        values += [job["budget"] or "-", *(result.get(k) for k in ("bits_per_weight", "perplexity", "kl"))]
        values += [result.get("cosine"), speed_of(r), status, r["command"]]
        cells = "".join(_cell(key, kind, v) for (key, kind), v in zip(COLUMNS, values, strict=True))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cell(key: str, kind: str, value) -> str:
    if kind == "number":
        shown, sort = ("-", "") if value is None else (f"{value:.4g}", repr(value))
        return f'<td data-col="{key}" data-value="{sort}">{shown}</td>'
    text = html.escape(str(value))
    return f'<td data-col="{key}" class="text">{f"<code>{text}</code>" if key == "command" else text}</td>'


def _short(row: dict) -> str:
    """A job's label: its format, or for a budgeted job the budget its mix of formats meets."""
    job = row["job"]
    parts = [f"{job['budget']} mix" if job["budget"] else job["format"], job["algorithm"]]
    return " ".join(p for p in [*parts, ",".join(job["surgery"])] if p)


def _figure(fig, kind: str) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    svg = re.sub(r"<metadata>.*?</metadata>", "", buffer.getvalue(), flags=re.S)  # a date, RDF names
    return f'<figure class="{kind}">{svg[svg.index("<svg") :]}</figure>'


def _is_report(path: Path) -> bool:
    try:
        return "<meta name=generator content=lighten>" in path.read_text(errors="replace")[:300]
    except OSError:
        return False
