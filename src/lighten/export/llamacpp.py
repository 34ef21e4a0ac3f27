"""Opening a GGUF file in llama.cpp (llama-cpp-python), the one way lighten does it, and llama.cpp as the
engine of `lighten run`.

    llm = open_llama("model.gguf", n_ctx=512, logits_all=True)   # keyword arguments as llama_cpp.Llama's
    generate_llama(open_exact(cached_gguf(checkpoint), 512, 2), prompt_ids, 32)   # a checkpoint, exactly

On CPUs with AMX (Intel Xeon Sapphire Rapids and later) a GGML_NATIVE build repacks quantized weights into
ggml's AMX "extra buffer" and crashes on the first decode of Q8_0 / Q4_0 / k-quant models, so there the
extra buffers are switched off. Elsewhere (AVX2, AVX-512 without AMX) they stay on: repacked weights decode
faster.
"""

import hashlib
import json
import time
from pathlib import Path

from lighten.cpu import has_amx
from lighten.errors import LightenError

F32 = 0  # GGML_TYPE_F32


def open_llama(path: str | Path, **kwargs):
    """llama_cpp.Llama(path, **kwargs), quiet unless `verbose=True`, without weight repacking on AMX CPUs."""
    try:
        import llama_cpp.llama
    except ImportError as e:
        raise LightenError(
            "running GGUF files needs llama-cpp-python: run `make setup`, or see the README's Development "
            "section for the pip command"
        ) from e
    kwargs.setdefault("verbose", False)
    if not has_amx():
        return llama_cpp.Llama(str(path), **kwargs)
    # Llama() takes no use_extra_bufts argument (it ignores unknown ones): it starts from the library's
    # default model params, so those are replaced while this one model loads.
    low_level = llama_cpp.llama.llama_cpp
    defaults = low_level.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        low_level.llama_model_default_params = defaults


def llama_cpp_unfit(checkpoint: Path) -> str | None:
    """Why llama.cpp cannot run this lighten checkpoint exactly, or None if it can: it computes what
    lighten's torch engine computes only where every quantized weight is in a GGUF block type (carried into
    the GGUF file as it is; the rest is written as F32) of an architecture the GGUF export writes."""
    from transformers import AutoConfig

    from lighten import formats
    from lighten.checkpoint import read_manifest
    from lighten.export.gguf import ARCHS, unapplied_window
    from lighten.formats.ggml import GGMLFormat

    specs = {t["spec"] for t in read_manifest(checkpoint)["tensors"].values()}
    others = sorted(s for s in specs if not isinstance(formats.get(s), GGMLFormat))
    if others:
        return f"its weights are not all GGUF block types ({', '.join(others)} are not)"
    arch = (json.loads((checkpoint / "config.json").read_text()).get("architectures") or ["?"])[0]
    if arch not in ARCHS:
        return f"lighten's GGUF export does not write {arch} (it writes {', '.join(ARCHS)})"
    window = unapplied_window(AutoConfig.from_pretrained(checkpoint))
    if window:
        return f"llama.cpp attends to every token where this model slides a window of {window}"
    return None


def cached_gguf(checkpoint: Path) -> Path:
    """The checkpoint's exact GGUF export (GGUF-typed weights as they are, every other matrix F32), written
    once into lighten's cache (atomically) and found there again while the checkpoint is unchanged."""
    from lighten.checkpoint import MANIFEST, WEIGHTS
    from lighten.export.gguf import export_gguf_from
    from lighten.models.builtin import cache_dir

    key = hashlib.sha256((checkpoint / MANIFEST).read_bytes())
    key.update(str((checkpoint / WEIGHTS).stat().st_size).encode())
    path = cache_dir() / "gguf" / f"{key.hexdigest()[:24]}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # lighten feeds llama.cpp token ids and decodes them itself: llama.cpp's tokenizer is never used,
        # so its pre-tokenizer needs no detecting.
        export_gguf_from(checkpoint, path, "F32", pre_tokenizer="default")
    return path


def open_exact(path: Path, n_ctx: int, threads: int):
    """The GGUF file as `lighten run`'s llama.cpp engine opens it: with an fp32 KV cache (llama.cpp's
    default is f16), as lighten's torch engine keeps, so that the two agree to fp32 rounding."""
    return open_llama(path, n_ctx=n_ctx, n_threads=threads, type_k=F32, type_v=F32)


def generate_llama(llm, prompt_ids: list[int], max_new_tokens: int, stop: int | None = None):
    """Greedy continuation in llama.cpp, timed as lighten's lean decoder times it (Decoder.generate)."""
    from lighten.runtime.decode import Generation

    llm.reset()
    start = time.perf_counter()
    tokens, stamps = [], []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        tokens.append(int(token))
        stamps.append(time.perf_counter())
        if len(tokens) == max_new_tokens or token == stop:
            break
    return Generation(tokens, stamps[0] - start, stamps[-1] - stamps[0])
