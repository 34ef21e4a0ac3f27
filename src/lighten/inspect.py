"""`lighten inspect`: where a model's outliers live and how hard they make quantization, before quantizing.

The report is organised by *site*: one activation and the linear layers that read it.

    attn      norm -> q, k, v (GPT-2: c_attn)     attn_out  attention -> o
    mlp       norm -> gate, up (fc)               mlp_out   MLP hidden -> down
    final     final norm -> lm_head (pre-norm LMs)

For each site: the input activation (absmax, the max/median ratio of channel absmaxes, kurtosis, the
LLM.int8() outlier channels with |x| > 6 and how many tokens reach them), the weight of its linears
stacked as one [out, in] matrix (absmax, worst row's max/median |w|, kurtosis), the relative round-to-
nearest error of each, and at norm sites the norm's gains γ and its input (the residual stream), to tell
whether an outlier channel is made by a large γ or carried in by the residual stream.
"""

import struct
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from lighten import __version__
from lighten.algorithms.activations import OUTLIER_THRESHOLD, InputStats, collect_input_stats
from lighten.atomic import atomic_file
from lighten.eval import wiki_texts
from lighten.models.arch import model_view, norm_gain, weight_out_in
from lighten.progress import track

# Symmetric absmax round-to-nearest, as (bits, group size along a row; None: the whole row), named by the
# lighten format it matches. Activations get one scale per token, as dynamic W8A8 kernels do.
WEIGHT_FORMATS = {"int8:channel": (8, None), "int4:g128": (4, 128)}
ACTIVATION_FORMATS = {"int8:token": (8, None), "int4:token": (4, None)}
KINDS = ("attn", "attn_out", "mlp", "mlp_out", "final")  # the sites of a block, in forward order


def inspect_model(
    model,
    tokenizer,
    texts: list[str] | None = None,
    n_tokens: int = 2048,
    context: int = 512,
    top: int = 5,
    samples: int = 256,
    threshold: float = OUTLIER_THRESHOLD,
) -> dict:
    """A JSON-able report of every site (see the module doc) and a model-level summary, from the first
    `n_tokens` tokens of `texts` (default: the calibration split of the Wikipedia corpus). `samples` token
    rows per site feed the activation quantization errors; `top` is how many channels each list keeps."""
    texts = texts or wiki_texts("calibration")
    view = model_view(model)
    sites = _sites(view)
    # The linears of a site read one tensor, so hooking the first is enough; a norm's input is the residual.
    names = [next(iter(linears)) for *_, linears in sites] + [name for _, _, name, norm, _ in sites if norm]
    stats = collect_input_stats(model, tokenizer, texts, n_tokens, context, names, threshold, samples)
    report = [_site(*site, stats, top) for site in track(sites, "inspecting")]
    return {
        "family": view.family,
        "n_tokens": n_tokens,
        "context": context,
        "threshold": threshold,
        "sites": report,
        "summary": _summary(report, top),
    }


def _sites(view) -> list[tuple]:
    """(block, kind, name, norm or None, {linear name: module}) in forward order."""
    sites = []
    for i, b in enumerate(view.blocks):
        sites += [
            (i, "attn", b.attn.name, b.attn.norm, b.attn.linears),
            (i, "attn_out", b.attn_out[0], None, dict([b.attn_out])),
            (i, "mlp", b.mlp.name, b.mlp.norm, b.mlp.linears),
            (i, "mlp_out", b.mlp_out[0], None, dict([b.mlp_out])),
        ]
    if view.final is not None and view.final.linears:
        sites.append((len(view.blocks), "final", view.final.name, view.final.norm, view.final.linears))
    return sites


def _site(
    block: int, kind: str, name: str, norm, linears: dict, stats: dict[str, InputStats], top: int
) -> dict:
    x = stats[next(iter(linears))]
    w = torch.cat([weight_out_in(m).detach().float() for m in linears.values()])
    site = {
        "block": block,
        "kind": kind,
        "name": name,
        "linears": list(linears),
        "input": _activation(x, top),
        "weight": _weight(w),
    }
    if len(x.sample):
        site["input"]["rtn_error"] = {f: _rtn_error(x.sample, *bg) for f, bg in ACTIVATION_FORMATS.items()}
    if norm is not None:
        site["residual"] = _activation(stats[name], top)
        site["norm"] = _gains(norm_gain(norm).abs(), x.absmax, top)
    return site


def _activation(s: InputStats, top: int) -> dict:
    channels = s.absmax.argsort(descending=True)[:top].tolist()
    return {
        "absmax": s.absmax.max().item(),
        "ratio": _ratio(s.absmax),
        "kurtosis": s.kurtosis,
        "channels_over": int((s.absmax > s.threshold).sum()),
        "tokens_over": int((s.token_absmax > s.threshold).sum()),
        "n_tokens": s.n_tokens,
        # Massive activations sit on a few tokens (often the first): their absmax dwarfs the median token's.
        "token_ratio": _ratio(s.token_absmax),
        "top_channels": [
            {"channel": c, "absmax": s.absmax[c].item(), "tokens": int(s.outlier_tokens[c])} for c in channels
        ],
    }


def _weight(w: torch.Tensor) -> dict:
    a = w.abs()
    return {
        "absmax": a.max().item(),
        # Per-channel formats give each output row one scale: its max/median says how coarse the grid gets.
        "row_ratio": (a.amax(1) / a.median(1).values.clamp_min(1e-12)).max().item(),
        "kurtosis": _kurtosis(w),
        "rtn_error": {f: _rtn_error(w, *bg) for f, bg in WEIGHT_FORMATS.items()},
    }


def _gains(gamma: torch.Tensor, absmax: torch.Tensor, top: int) -> dict:
    """|γ| statistics, and where the norm's output outliers fall among the gains (percentile of |γ|)."""
    outliers = absmax.argsort(descending=True)[:top]
    largest = gamma.argsort(descending=True)[:top]
    return {
        "min": gamma.min().item(),
        "median": gamma.median().item(),
        "max": gamma.max().item(),
        "top_channels": largest.tolist(),
        "percentile_at_outliers": [_percentile(gamma, gamma[c]) for c in outliers],
        "coincide": len(set(outliers.tolist()) & set(largest.tolist())) / len(outliers),
    }


def _percentile(t: torch.Tensor, v: torch.Tensor) -> float:
    """Mid-rank percentile of v in t: ties count half, so equal gains (a fresh LayerNorm) all sit at 50."""
    return round(50 * ((t < v).float().mean() + (t <= v).float().mean()).item(), 1)


def _ratio(t: torch.Tensor) -> float:
    return (t.max() / t.median().clamp_min(1e-12)).item()


def _kurtosis(t: torch.Tensor) -> float:
    d = t.double().flatten()
    d = d - d.mean()
    return (d.pow(4).mean() / d.square().mean() ** 2 - 3).item()


def _rtn_error(t: torch.Tensor, bits: int, group: int | None) -> float:
    """‖t − RTN(t)‖ / ‖t‖, one absmax scale per `group` elements of a row. Plain torch rather than
    lighten.formats, which also encodes and packs the storage: ~10x the time for the same error up to the
    fp16 rounding of scales, and inspect rounds every weight of the model twice."""
    g = group or t.shape[1]
    v = F.pad(t, (0, -t.shape[1] % g)).reshape(-1, g)  # zero padding: a short last group, exactly stored
    scale = v.abs().amax(1, keepdim=True).clamp_min(1e-12) / (2 ** (bits - 1) - 1)
    return ((v - (v / scale).round() * scale).norm() / v.norm().clamp_min(1e-12)).item()


def _summary(sites: list[dict], top: int) -> dict:
    def hardest(part: str, fmt: str) -> dict:
        s = max(sites, key=lambda s: s[part].get("rtn_error", {}).get(fmt, 0.0))
        return {"block": s["block"], "kind": s["kind"], "error": s[part]["rtn_error"][fmt]}

    norm_sites = [s for s in sites if "norm" in s]
    return {
        "residual_top_channels": _persistent(norm_sites, "residual", top),
        "input_top_channels": _persistent(sites, "input", top),
        "sites_with_outliers": sum(s["input"]["channels_over"] > 0 for s in sites),
        "n_sites": len(sites),
        "gamma_coincide": sum(s["norm"]["coincide"] for s in norm_sites) / max(len(norm_sites), 1),
        "hardest": {f"weight {f}": hardest("weight", f) for f in WEIGHT_FORMATS}
        | {f"input {f}": hardest("input", f) for f in ACTIVATION_FORMATS},
    }


def _persistent(sites: list[dict], key: str, top: int) -> list[dict]:
    """The `top` channels by absmax over all `sites`, with where each peaks and in how many sites' top
    lists it appears: a channel that recurs layer after layer is a systematic (emergent) feature."""
    count, peak = Counter(), {}
    for s in sites:
        for c in s[key]["top_channels"]:
            count[c["channel"]] += 1
            if c["absmax"] > peak.get(c["channel"], (0.0, ""))[0]:
                peak[c["channel"]] = (c["absmax"], s["name"])
    channels = sorted(peak, key=lambda c: -peak[c][0])[:top]
    return [{"channel": c, "absmax": peak[c][0], "where": peak[c][1], "sites": count[c]} for c in channels]


def inspect_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): one row per site. "γ pct" is the percentile of |γ| at the top input channel; "resid"
    the absmax of the norm's input, the residual stream."""
    over = f">{report['threshold']:g}"
    headers = ["block", "site", "x max", "max/med", "kurt", f"ch{over}", f"tok{over}", "top ch", "γ pct"]
    headers += ["resid", "w max", "w int8", "w int4", "x int8", "x int4"]
    rows = []
    for s in report["sites"]:
        x, w = s["input"], s["weight"]
        norm = s.get("norm")
        rows.append(
            [
                str(s["block"]),
                s["kind"],
                _g(x["absmax"]),
                _g(x["ratio"]),
                _g(x["kurtosis"]),
                str(x["channels_over"]),
                f"{100 * x['tokens_over'] / x['n_tokens']:.0f}%",
                str(x["top_channels"][0]["channel"]),
                f"{norm['percentile_at_outliers'][0]:.0f}" if norm else "",
                _g(s["residual"]["absmax"]) if norm else "",
                _g(w["absmax"]),
            ]
            + [f"{100 * w['rtn_error'][f]:.2f}%" for f in WEIGHT_FORMATS]
            + [f"{100 * x['rtn_error'][f]:.1f}%" if "rtn_error" in x else "" for f in ACTIVATION_FORMATS]
        )
    return headers, rows


def _g(v: float) -> str:
    return f"{v:.3g}"


def plot_outliers(report: dict, png_path, force: bool = False) -> None:
    """Per-block input absmax and max/median channel ratio of each site kind (log scale), as a PNG."""
    # A bare Figure renders with Agg and leaves pyplot's global state (and any user backend) alone.
    # Imported here: matplotlib costs a second of import time that only this function needs.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7))
    absmax, ratio = fig.subplots(2, 1, sharex=True)
    for kind in KINDS:
        sites = [s for s in report["sites"] if s["kind"] == kind]
        if not sites:  # BERT has no final site
            continue
        blocks = [s["block"] for s in sites]
        absmax.plot(blocks, [s["input"]["absmax"] for s in sites], marker=".", label=kind)
        ratio.plot(blocks, [s["input"]["ratio"] for s in sites], marker=".", label=kind)
    attn = [s for s in report["sites"] if s["kind"] == "attn"]
    residual = [s["residual"]["absmax"] for s in attn]
    absmax.plot([s["block"] for s in attn], residual, "k--", label="residual stream (attn norm input)")
    absmax.axhline(
        report["threshold"], color="grey", ls=":", label=f"LLM.int8() threshold {report['threshold']:g}"
    )
    title = f"{report['family']}: input activations per block ({report['n_tokens']} tokens)"
    absmax.set(yscale="log", ylabel="absmax", title=title)
    ratio.set(yscale="log", ylabel="max / median channel absmax", xlabel="block")
    absmax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines stay visible
    with atomic_file(png_path, force, is_ours=is_lighten_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": SOFTWARE})


SOFTWARE = f"lighten {__version__}"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_lighten_png(path: Path) -> bool:
    """Whether `path` is a PNG that plot_outliers wrote (its Software text chunk), the only kind `--force`
    replaces."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return False
            # Chunks: 4-byte length, 4-byte type, data, 4-byte CRC; tEXt data is keyword NUL text.
            while header := f.read(8):
                length, kind = struct.unpack(">I4s", header)
                if kind == b"tEXt":
                    keyword, _, text = f.read(length).partition(b"\0")
                    if keyword == b"Software" and text.startswith(b"lighten "):
                        return True
                    f.seek(4, 1)
                else:
                    f.seek(length + 4, 1)
    except (OSError, struct.error):
        return False
    return False
