"""Kernel dispatch by measurement: torch's kernel or ggml's, for the weights both compute exactly.

lighten's symmetric int8 / int5 / int4 whose groups are whole blocks of 32 (int8 per channel, int4:g32,
int4:g128, ...) store exactly the numbers of a GGUF type (q8_0, q5_0, q4_0: lighten.formats.ggml.as_gguf).
So torch's kernel (int8 / int4 with bf16 activations) or ggml's (fp32 activations, rounded to 8 bits per
block as in llama.cpp) can compute them. Which is faster depends on the CPU: on this project's AVX2 hosts
ggml's, by 1.5-2x; where torch's int8 kernel has AMX tiles or AVX-512 it may be torch's. So it is measured:
one GEMV of the format's main matrix shape on each kernel, best of REPS, once per CPU, library versions and
thread count, and remembered in $LIGHTEN_CACHE/kernels.json, so that a host always picks the same kernel
(and computes the same numbers).

    choose_kernels([("int8:channel:sym", (1536, 576)), ...])   # {"int8:channel:sym": "q8_0"}: ggml's won
    choose_kernels(weights, "torch")                           # {} : every format on its own kernel
"""

import json
import os
import tempfile
import time
from collections import Counter
from importlib.metadata import version

import torch

from lighten import cpu, formats
from lighten.errors import LightenError
from lighten.formats.ggml import as_gguf, twin_type

KERNELS = ("auto", "torch", "ggml")
REPS = 20  # GEMVs timed per kernel: the best of them counts


def choose_kernels(weights: list[tuple[str, tuple[int, ...]]], kernels: str = "auto") -> dict[str, str]:
    """{spec: the GGUF type computing it on ggml} for the specs of `weights` ((spec, shape) of each matrix)
    that go to ggml's kernel: all that can with "ggml", none with "torch", the faster on this CPU with
    "auto". A spec goes one way for all its matrices (the model then computes in one dtype throughout);
    "auto" measures it on the shape holding most of its bytes."""
    if kernels not in KERNELS:
        raise LightenError(f"kernels is one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "torch":
        return {}
    weights = [(formats.get(spec).name, tuple(shape)) for spec, shape in weights if len(shape) == 2]
    exact = {spec for spec, _ in weights} - {
        spec for spec, shape in weights if twin_type(spec, shape) is None
    }
    bytes_by_shape = Counter()
    for spec, shape in weights:
        if spec in exact:
            bytes_by_shape[spec, shape] += shape[0] * shape[1]
    chosen = {}
    for (spec, shape), _ in bytes_by_shape.most_common():  # each spec's largest share of bytes first
        if spec not in chosen:
            chosen[spec] = (
                twin_type(spec, shape) if kernels == "ggml" or _ggml_is_faster(spec, shape) else None
            )
    return {spec: twin for spec, twin in chosen.items() if twin}


def _ggml_is_faster(spec: str, shape: tuple[int, int]) -> bool:
    """Whether ggml's GEMV of a `spec` matrix of `shape` beats torch's here: measured once per host, then read
    from the cache."""
    from lighten.models.builtin import cache_dir

    path = cache_dir() / "kernels.json"
    key = " | ".join(
        [cpu.describe(), f"torch {torch.__version__}", f"llama-cpp-python {version('llama_cpp_python')}"]
        + [f"{torch.get_num_threads()} threads", spec, "x".join(map(str, shape))]
    )
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = _measure(spec, shape)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump(known, f, indent=1)
        os.replace(f.name, path)
    return known[key]["ggml_ms"] < known[key]["torch_ms"]


def _measure(spec: str, shape: tuple[int, int]) -> dict[str, float]:
    """Best GEMV time (ms) of a random `spec` matrix of `shape` on torch's kernel and on ggml's."""
    from lighten.runtime.ggml import ggml_owns_cores
    from lighten.runtime.linear import packed_linear

    q = formats.get(spec).quantize(torch.randn(shape) * 0.02)
    x = torch.randn(1, shape[1])
    on_torch, on_ggml = packed_linear(q), packed_linear(as_gguf(q))
    torch_ms = _best(on_torch, x.bfloat16())
    with ggml_owns_cores():  # after torch's run: ggml's workers poll a while after their last matmul
        ggml_ms = _best(on_ggml, x)
    return {"torch_ms": torch_ms, "ggml_ms": ggml_ms}


@torch.no_grad()
def _best(layer, x: torch.Tensor) -> float:
    layer(x)
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3
