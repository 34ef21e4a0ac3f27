"""GGUF quality, all of it measured in llama.cpp: llama.cpp's own quantizer (llama-quantize, without and with
an importance matrix from llama-imatrix) against lighten's (imatrix-weighted search, GPTQ, GPTQ after a fused
rotation, budget mixes) on smollm2-135m, each file run by llama-cpp-python on the held-out Wikipedia windows
`lighten eval` uses, against the F32 GGUF of the same fp32 model.

    python benchmarks/gguf_quality.py                    # every row: run it alone on the machine
    python benchmarks/gguf_quality.py --tokens 1024 --rows llama.cpp:q4_0,llama.cpp+imatrix:q4_0,lighten:q4_0
    python benchmarks/gguf_quality.py --rows q4_0,lighten-budget --json out.json

--rows takes row names (group:key), groups (llama.cpp, llama.cpp+imatrix, lighten, lighten-gptq,
lighten-gptq-rotated, lighten-budget, lighten-budget-gptq) or keys (q4_0, iq4_nl, q5_0, q8_0, 4.5bits,
...). llama.cpp's tools are built once on first use (benchmarks/llama_tools.py). Every quantization runs
alone, as a subprocess, one after another, in a temp folder; "quantize s" is the wall time of its
commands: llama-imatrix (collected once, its time counted in every row that uses it) + llama-quantize, or
`lighten quantize` (calibration included; the untimed `lighten export` only packs the codes into the file,
like the untimed F32 conversion on llama.cpp's side). bpw counts the bytes of the blk.* matrices (scales
included) per weight; token_embd (SmolLM2 ties it to the output) is left out of it and named in "types".

Both quantizers start from the same fp32 weights: llama-quantize reads an F32 GGUF that lighten exports from
the model it quantizes itself (F16 would round the weights before llama.cpp's quantizer saw them), and that
F32 file's llama.cpp logits are the reference for perplexity ratio, KL and top-1 agreement.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from llama_tools import llama_tools
from transformers import AutoTokenizer

from lighten.algorithms.registry import DEFAULT_CALIBRATION
from lighten.cpu import has_amx
from lighten.errors import LightenError
from lighten.eval import llamacpp_fidelity, llamacpp_log_probs, token_windows, wiki_texts
from lighten.eval.table import markdown
from lighten.models import resolve

MODEL = "smollm2-135m"
CONTEXT = 512
THREADS = 2
TYPES = ("q4_0", "iq4_nl", "q5_0", "q8_0")
BUDGETS = ("4.5bits", "5.0bits", "6.0bits")
# `lighten quantize` options per group (single types; budgets below). A command that fails becomes a row
# that says so.
LIGHTEN_OPTIONS = {
    "lighten": [],
    "lighten-gptq": ["--algorithm", "gptq"],
    "lighten-gptq-rotated": ["--algorithm", "gptq", "--surgery", "fold,rotate_fused"],
}
# `lighten quantize --bits B` with these: no --format, so the budget chooses among lighten's GGUF candidates.
BUDGET_OPTIONS = {"lighten-budget": [], "lighten-budget-gptq": ["--algorithm", "gptq"]}
# llama-imatrix reads as much calibration text as lighten's GPTQ does (lighten's own imatrix default reads
# 2,048 tokens of the same text): llama.cpp's importance matrix is not starved.
IMATRIX_TOKENS = DEFAULT_CALIBRATION["gptq"]["tokens"]
HEADERS = ["row", "by", "types", "bpw (blk)", "file MB", "ppl", "ppl / fp32", "KLD", "top-1", "quantize s"]


@dataclass(frozen=True)
class Row:
    group: str
    key: str  # the GGUF type, or the budget

    @property
    def name(self) -> str:
        return f"{self.group}:{self.key}"

    @property
    def by(self) -> str:
        return "llama.cpp" if self.group.startswith("llama.cpp") else "lighten"


ROWS = [Row(group, t) for group in ("llama.cpp", "llama.cpp+imatrix", *LIGHTEN_OPTIONS) for t in TYPES]
ROWS += [Row(group, b) for group in BUDGET_OPTIONS for b in BUDGETS]


class CommandFailed(Exception):
    """A quantize or export command exited with an error; the message is its last error line."""


def run(command: list, log: Path) -> float:
    """Wall seconds of `command`, its output kept in `log`; CommandFailed if it fails."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")] or lines or ["(no output)"]
        raise CommandFailed(f"{errors[-1].removeprefix('error: ')} (exit {done.returncode})")
    return seconds


def lighten_cli(*args) -> list:
    return [sys.executable, "-m", "lighten", *args]


class Bench:
    """The shared inputs, made once and on demand: the F32 GGUF, llama.cpp's tools and imatrix."""

    def __init__(self, work: Path, tokenizer):
        self.work, self.tokenizer = work, tokenizer
        self.f32 = work / "f32.gguf"
        run(lighten_cli("export", MODEL, "--to", "gguf", "--type", "F32", "-o", self.f32), work / "f32.log")
        self._tools = None
        self.imatrix_file, self.imatrix_seconds = work / "imatrix.gguf", None

    def tools(self) -> dict[str, Path]:
        self._tools = self._tools or llama_tools()
        return self._tools

    def collect_imatrix(self) -> None:
        """Run llama-imatrix once: the F32 model on lighten's calibration text (file and seconds kept)."""
        if self.imatrix_seconds is None:
            text, out = self.work / "calibration.txt", self.imatrix_file
            text.write_text(calibration_text(self.tokenizer, IMATRIX_TOKENS))
            command = [self.tools()["llama-imatrix"], "-m", self.f32, "-f", text, "-o", out, "-c", CONTEXT]
            command += ["--chunks", IMATRIX_TOKENS // CONTEXT, "--no-ppl", "-t", THREADS]
            # Weight repacking crashes on AMX CPUs (see lighten.export.llamacpp): -nr turns it off.
            command += ["-nr"] if has_amx() else []
            self.imatrix_seconds = run(command, self.work / "imatrix.log")

    def quantize(self, row: Row) -> tuple[Path, float]:
        """The row's GGUF file and the seconds its quantization took."""
        out, log = self.work / f"{row.name}.gguf", self.work / f"{row.name}.log"
        if row.by == "llama.cpp":
            seconds, imatrix = 0.0, []
            if row.group == "llama.cpp+imatrix":
                self.collect_imatrix()
                seconds, imatrix = self.imatrix_seconds, ["--imatrix", self.imatrix_file]
            command = [self.tools()["llama-quantize"], *imatrix, self.f32, out, row.key.upper(), THREADS]
            return out, seconds + run(command, log)
        checkpoint = self.work / row.name
        if row.group in BUDGET_OPTIONS:
            bits = row.key.removesuffix("bits")
            options = ["--bits", bits, *BUDGET_OPTIONS[row.group]]
        else:
            options = ["-f", row.key, *LIGHTEN_OPTIONS[row.group]]
        seconds = run(lighten_cli("quantize", MODEL, *options, "-o", checkpoint), log)
        run(
            lighten_cli("export", checkpoint, "--to", "gguf", "-o", out), self.work / f"{row.name}.export.log"
        )
        return out, seconds


def calibration_text(tokenizer, n_tokens: int) -> str:
    """The start of lighten's calibration split, joined as token_windows joins it, long enough to hold
    `n_tokens`: llama-imatrix's first n_tokens tokens then cover the text lighten calibrates on. Not token
    for token: llama.cpp makes one token of a blank line before a digit where the tokenizer lighten loads
    makes two, so at 2,048 tokens llama.cpp's chunks end 9 characters further in (3 such places)."""
    texts, chars = [], 0
    for text in wiki_texts("calibration"):
        texts.append(text)
        chars += len(text)
        if chars > 8 * n_tokens:  # ~4 characters a token: twice what is needed
            break
    joined = "\n\n".join(texts)
    token_windows(tokenizer, [joined], n_tokens, CONTEXT)  # raises if it holds too few tokens
    return joined


def file_facts(path: Path) -> dict:
    """Bits per weight of the blk.* matrices, file MB and the tensor types of a GGUF file."""
    tensors = [t for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1]  # matrices: no norms
    blk = [t for t in tensors if t.name.startswith("blk.")]
    counts = Counter(t.tensor_type.name for t in blk)
    types = ", ".join(f"{n} ×{c}" if len(counts) > 1 else n for n, c in counts.most_common())
    others = [
        f"{t.name.removesuffix('.weight')} {t.tensor_type.name}" for t in tensors if t.name[:4] != "blk."
    ]
    return {
        "bpw": 8 * sum(int(t.n_bytes) for t in blk) / sum(int(t.n_elements) for t in blk),
        "mb": path.stat().st_size / 1e6,
        "types": "; ".join([f"blk {types}", *others]),
    }


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def select(spec: str | None) -> list[Row]:
    if not spec:
        return ROWS
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in wanted if not any(s in (r.name, r.group, r.key) for r in ROWS)]
    if unknown:
        sys.exit(f"error: unknown rows {', '.join(unknown)}; rows: {', '.join(r.name for r in ROWS)}")
    return [r for r in ROWS if any(s in (r.name, r.group, r.key) for s in wanted)]


def table_row(result: dict, reference_ppl: float) -> list[str]:
    head = [result["name"], result["by"]]
    if "error" in result:
        return head + [f"not available: {result['error']}"] + [""] * (len(HEADERS) - 3)
    return head + [
        result["types"],
        f"{result['bpw']:.3f}",
        f"{result['mb']:.1f}",
        f"{result['perplexity']:.3f}",
        f"{result['perplexity'] / reference_ppl:.4f}",
        f"{result['kl']:.4f}",
        f"{100 * result['top1']:.1f} %",
        f"{result['seconds']:.0f}" if "seconds" in result else "–",
    ]


def measure(rows: list[Row], windows, work: Path, tokenizer) -> tuple[list[dict], float | None]:
    """The reference's row and one per row in `rows`, and llama-imatrix's seconds if it ran."""
    bench = Bench(work, tokenizer)
    # The reference's log-probabilities go to disk (4,096 tokens × 49,152 × 4 bytes = 805 MB) and are read
    # back a window at a time, copy-on-write because torch wants writable arrays.
    paths = []
    for i, logp in enumerate(llamacpp_log_probs(bench.f32, windows, THREADS)):
        paths.append(work / f"reference-{i}.npy")
        np.save(paths[-1], logp.numpy())
    reference = [np.load(p, mmap_mode="c") for p in paths]
    results = [{"name": "F32 (reference)", "by": "lighten export"} | file_facts(bench.f32)]
    results[0] |= llamacpp_fidelity(bench.f32, windows, reference, THREADS)
    for i, row in enumerate(rows, 1):
        print(f"[{i}/{len(rows)}] {row.name}", file=sys.stderr, flush=True)
        result = {"name": row.name, "by": row.by}
        try:
            path, seconds = bench.quantize(row)
        except CommandFailed as e:
            results.append(result | {"error": str(e)})
            continue
        result |= {"seconds": seconds} | file_facts(path)
        results.append(result | llamacpp_fidelity(path, windows, reference, THREADS))
    return results, bench.imatrix_seconds


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", help="comma-separated row names, groups or keys (default: all)")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens, in windows of 512")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rows = select(args.rows)
    tokenizer = AutoTokenizer.from_pretrained(resolve(MODEL))
    windows = token_windows(tokenizer, wiki_texts("evaluation"), args.tokens, CONTEXT)
    with tempfile.TemporaryDirectory(prefix="gguf_quality.") as tmp:
        try:
            results, imatrix_seconds = measure(rows, windows, Path(tmp), tokenizer)
        except (CommandFailed, LightenError) as e:  # the F32 export, or building llama.cpp's tools
            sys.exit(f"error: {e}")
    n_predicted = sum(len(w) - 1 for w in windows)
    imatrix = (
        f"llama-imatrix {imatrix_seconds:.0f} s, counted in each +imatrix row" if imatrix_seconds else ""
    )
    print(
        f"{MODEL} in llama.cpp (llama-cpp-python), {cpu_name()}, {THREADS} threads; {args.tokens} held-out "
        f"Wikipedia tokens in {len(windows)} windows of {CONTEXT} ({n_predicted} predicted); KLD and top-1 "
        f"against the F32 GGUF; calibration tokens: llama-imatrix {IMATRIX_TOKENS}, lighten "
        + ", ".join(f"{name} {c['tokens']}" for name, c in DEFAULT_CALIBRATION.items())
        + (f" ({imatrix})" if imatrix else "")
        + "\n"
    )
    print(markdown(HEADERS, [table_row(r, results[0]["perplexity"]) for r in results]), end="")
    if args.json:
        report = {"model": MODEL, "cpu": cpu_name(), "threads": THREADS, "tokens": args.tokens}
        report |= {"context": CONTEXT, "predicted_tokens": n_predicted, "imatrix_tokens": IMATRIX_TOKENS}
        report |= {"imatrix_seconds": imatrix_seconds, "rows": results}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
