"""An evaluation report as table rows, shared by the terminal table and the Markdown file."""


def report_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): the reference first, then each candidate."""
    causal = report["kind"] == "causal"
    headers = ["model", "format", "bits/weight", "weights", "on disk"]
    headers += ["perplexity", "KL"] if causal else ["cosine", "spearman"]
    ref = report["reference"]
    rows = [
        [
            ref["name"],
            ref["format"],
            f"{ref['bits_per_weight']:.3f}",
            _mb(ref["weight_bytes"]),
            _mb(ref["disk_bytes"]),
        ]
        + ([_ppl(ref["perplexity"]), "0"] if causal else ["1", "1"])
    ]
    for c in report["candidates"]:
        row = [
            _short(c["model"]),
            c["format"],
            f"{c['bits_per_weight']:.3f}",
            _mb(c["weight_bytes"]),
            _mb(c["disk_bytes"]),
        ]
        row += (
            [_ppl(c["perplexity"]), f"{c['kl']:.4f}"]
            if causal
            else [f"{c['cosine']:.4f}", f"{c['spearman']:.4f}"]
        )
        rows.append(row)
    return headers, rows


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ppl(x: float) -> str:
    return f"{x:.3f}" if x < 1e4 else f"{x:.3e}"  # a broken model's perplexity runs to millions


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _short(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
