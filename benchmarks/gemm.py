"""Packed CPU kernels side by side: GEMV (batch 1) and GEMM (batch 32) per weight format.

    python benchmarks/gemm.py            # 4096x4096 and 11008x4096 (N x K), as in Llama-7B
    python benchmarks/gemm.py --smollm2  # SmolLM2-135M's shapes: 1536x576 and 576x1536
    python benchmarks/gemm.py --quick    # small shapes, a smoke run

Per call: min and median time over repeated runs, the effective bandwidth of the weight bytes read (what
bounds a batch-1 matmul), and that as a fraction of the memory bandwidth measured here by a large sum.

GGUF types run on ggml's kernels twice: `ggml TYPE` is lighten's layer (GGMLLinear: the input cast, ggml's
graph, the output read back), `ggml TYPE graph` only ggml's compute of the same prebuilt graph, i.e.
ggml's own speed on that matrix; their ratio is what lighten's binding costs. ggml runs on its thread pool
with torch single-threaded beside it (lighten.runtime.ggml), with --threads threads (torch's rows too).
Timings are only meaningful on an otherwise idle machine.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lighten import formats
from lighten.cpu import describe as cpu_name
from lighten.runtime import ggml, packed_linear

GGUF_TYPES = ("q4_0", "iq4_nl", "q4_k", "q8_0")


def timed(fn, reps: int) -> tuple[float, float]:
    """(min, median) seconds per call, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def memory_bandwidth(n_bytes: int, reps: int) -> float:
    """Bytes per second of a sum over an array far larger than the caches: the read bandwidth to beat."""
    x = torch.ones(n_bytes // 4)
    return n_bytes / timed(x.sum, reps)[0]


def candidates(w: torch.Tensor) -> dict:
    """name -> (a function of x, bytes of weight it reads)."""
    w_bf16 = w.bfloat16()
    out = {
        "fp32": (lambda x: F.linear(x, w), w.nbytes),
        "bf16": (lambda x: F.linear(x, w_bf16), w_bf16.nbytes),
    }
    for name, spec, mode in [
        ("int8", "int8", "weight-only"),
        ("int4 g128", "int4:g128", "weight-only"),
        ("w8a8", "int8", "w8a8"),
        ("nf4 (fallback)", "nf4", "weight-only"),
    ]:
        layer = packed_linear(formats.get(spec).quantize(w), mode=mode)
        out[name] = (layer, sum(t.nbytes for t in layer.buffers()))
    for spec in GGUF_TYPES:
        if w.shape[1] % formats.get(spec).block_size:
            continue
        layer = packed_linear(formats.get(spec).quantize(w))
        out[f"ggml {spec}"] = (layer, layer.nbytes)
        out[f"ggml {spec} graph"] = (graph_only(layer.product), layer.nbytes)
    return out


def graph_only(product: ggml.GGMLProduct):
    """ggml's compute of the product's graph for x's batch size, x already in place: ggml's own speed."""
    lib, graphs = ggml._ggml(), {}

    def compute(x):
        m = x.shape[0]
        graph = graphs.get(m) or graphs.setdefault(m, ggml._Graph(product.widths, m, product.build))
        lib.backend_graph_compute(lib.backend, graph.graph)

    return compute


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few runs: a smoke test")
    parser.add_argument("--reps", type=int, help="timed calls per cell (default 20, quick 3)")
    parser.add_argument("--threads", type=int, help="torch's and ggml's threads (default: torch's choice)")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M's matrix shapes")
    args = parser.parse_args()
    shapes = [(4096, 4096), (11008, 4096)]
    if args.quick or args.smollm2:
        shapes = [(256, 576), (512, 1024)] if args.quick else [(1536, 576), (576, 1536)]
    reps = args.reps or (3 if args.quick else 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    ggml.set_threads(threads)
    bandwidth_bytes = 2**26 if args.quick else 2**30
    bandwidth = memory_bandwidth(bandwidth_bytes, reps)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"{cpu_name()}; torch {torch.__version__} ({cpu}), {threads} threads")
    print(f"memory bandwidth (sum of {bandwidth_bytes >> 20} MB): {bandwidth / 1e9:.1f} GB/s\n")
    header = ["N x K", "M", "kernel", "min ms", "median ms", "MB", "GB/s", "of bw"]
    print("{:>12} {:>3} {:<17} {:>9} {:>10} {:>7} {:>7} {:>6}".format(*header))
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        kernels = candidates(w)
        for m in (1, 32):
            x = torch.randn(m, k).bfloat16()
            for name, (fn, n_bytes) in kernels.items():
                on_ggml = name.startswith("ggml")
                x_in = x.float() if name == "fp32" or on_ggml else x
                torch.set_num_threads(1 if on_ggml else threads)  # one owner of the cores
                best, median = timed(lambda fn=fn, x_in=x_in: fn(x_in), reps)
                gbs = n_bytes / best / 1e9
                print(
                    f"{f'{n}x{k}':>12} {m:>3} {name:<17} {best * 1e3:>9.3f} {median * 1e3:>10.3f} "
                    f"{n_bytes / 1e6:>7.2f} {gbs:>7.1f} {gbs * 1e9 / bandwidth:>6.0%}"
                )


if __name__ == "__main__":
    main()
