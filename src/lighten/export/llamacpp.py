"""Opening a GGUF file in llama.cpp (llama-cpp-python), the one way lighten's tests and benchmarks do it.

    llm = open_llama("model.gguf", n_ctx=512, logits_all=True)   # keyword arguments as llama_cpp.Llama's

On CPUs with AMX (Intel Xeon Sapphire Rapids and later) a GGML_NATIVE build repacks quantized weights into
ggml's AMX "extra buffer" and crashes on the first decode of Q8_0 / Q4_0 / k-quant models, so there the
extra buffers are switched off. Elsewhere (AVX2, AVX-512 without AMX) they stay on: repacked weights decode
faster.
"""

from pathlib import Path

from lighten.cpu import has_amx
from lighten.errors import LightenError


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
