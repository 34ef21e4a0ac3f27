"""Peak RSS of loading smollm2-135m (fp32, and packed int8 / int4:g128 checkpoints) and of quantizing it,
each job alone in a fresh python process.

    python benchmarks/memory.py            # ~14 minutes on 2 idle cores, ~10 of them GPTQ q4_0
    python benchmarks/memory.py --no-gptq

Peak is the whole process's VmHWM, which an exit hook prints. Every process imports torch, transformers and
lighten first; "imports" is one that does only that, and "empty model" one that also builds the model on
the meta device and loads its tokenizer, which every job does: the code and tokenizer a job needs whatever
its weights. "stored" is the bytes of tensors a job reads (the fp32 model for quantization, the checkpoint
for a load) and "per stored" = (peak - empty model) / stored. The checkpoints are made with RTN by the
script itself, in a temp dir, and those runs are measured too.
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lighten.eval.size import size_report
from lighten.models import resolve

MODEL = "smollm2-135m"
# Run first in every job: the imports of the baseline, and the exit hook that reports the peak (atexit,
# because the CLI ends in sys.exit).
PREAMBLE = """
import atexit, re, sys
import torch, transformers
import lighten.cli, lighten.models, lighten.runtime
from lighten.checkpoint import load


@atexit.register
def print_peak():
    print("VmHWM", re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read())[1])
"""


def run(code: str) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of a fresh python process running PREAMBLE + code."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PREAMBLE + code], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = re.search(r"^VmHWM (\d+)$", done.stdout, re.M)
    if done.returncode != 0 or peak is None:
        sys.exit(f"job failed:\n{code}\n{done.stderr[-3000:]}")
    return int(peak[1]) * 1024, seconds


def load_and_run(path: str, packed: bool = False) -> str:
    """Load, then one forward pass: it touches every weight, also those of a model whose file is mapped."""
    return (
        f"model, tokenizer = load({path!r}, packed={packed})\n"
        "with torch.inference_mode():\n"
        "    model(**tokenizer('The capital of France is', return_tensors='pt'))"
    )


def quantize(spec: str, algorithm: str, out: Path) -> str:
    argv = ["lighten", "quantize", MODEL, "-f", spec, "--algorithm", algorithm, "-o", str(out)]
    return f"sys.argv = {argv!r}\nlighten.cli.main()"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-gptq", action="store_true", help="skip the ~10 minute GPTQ run")
    args = parser.parse_args()
    fp32_bytes = size_report(resolve(MODEL))["weight_bytes"]  # also converts the built-in model once
    imports, _ = run("")
    empty, _ = run(f"with lighten.runtime.meta_parameters():\n    lighten.models.build_model({MODEL!r})")
    rows = []  # (job, stored bytes, peak bytes, seconds)
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("load fp32 + forward", fp32_bytes, *run(load_and_run(MODEL))))
        for spec in ("int8:channel", "int4:g128"):
            out = Path(tmp) / spec.replace(":", "-")
            rows.append((f"quantize rtn {spec}", fp32_bytes, *run(quantize(spec, "rtn", out))))
            stored = size_report(out)["weight_bytes"]
            rows.append((f"load packed {spec} + fwd", stored, *run(load_and_run(str(out), packed=True))))
        if not args.no_gptq:  # at its default calibration, 65,536 tokens: the block inputs alone are 151 MB
            out = Path(tmp) / "gptq"
            rows.append(("quantize gptq q4_0", fp32_bytes, *run(quantize("q4_0", "gptq", out))))

    print(f"{MODEL}, peak RSS of each job in its own process (MB = 10^6 bytes)")
    print(f"imports: {imports / 1e6:.0f} MB; empty model + tokenizer: {empty / 1e6:.0f} MB")
    print(f"{'job':<28} {'stored MB':>10} {'peak MB':>8} {'- empty':>8} {'per stored':>11} {'s':>6}")
    for job, stored, peak, seconds in rows:
        extra = peak - empty
        print(
            f"{job:<28} {stored / 1e6:>10.1f} {peak / 1e6:>8.0f} {extra / 1e6:>8.0f} {extra / stored:>11.2f}"
            f" {seconds:>6.1f}"
        )
    print(f"aim for calibrated quantization (issue 13): per stored <= 1.3 ({1.3 * fp32_bytes / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
