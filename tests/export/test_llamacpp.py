"""open_llama: weight repacking off exactly on AMX CPUs, and the library's defaults left as they were."""

import llama_cpp.llama
import pytest
from tiny_models import tiny_bpe_tokenizer, tiny_model

from lighten.cpu import has_amx
from lighten.export import llamacpp
from lighten.export.gguf import export_gguf
from lighten.export.llamacpp import open_llama

SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8\n"
EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


@pytest.mark.parametrize("cpuinfo,amx", [(SAPPHIRE_RAPIDS, True), (EPYC, False), (None, False)])
def test_amx_is_read_from_the_cpu_flags(tmp_path, cpuinfo, amx):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert has_amx(path) is amx


@pytest.mark.parametrize("amx", [True, False])
def test_weight_repacking_is_off_only_on_amx(tiny_gguf, monkeypatch, amx):
    monkeypatch.setattr(llamacpp, "has_amx", lambda: amx)
    defaults = llama_cpp.llama.llama_cpp.llama_model_default_params
    llm = open_llama(tiny_gguf, n_ctx=32)
    assert llm.model_params.use_extra_bufts is not amx
    assert llama_cpp.llama.llama_cpp.llama_model_default_params is defaults
    llm.eval([5, 6, 7])  # and it decodes


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny Q8_0 Llama: the quantized type whose repacked decode crashes on AMX."""
    model = tiny_model("llama", vocab_size=300)
    path = tmp_path_factory.mktemp("llamacpp") / "tiny.gguf"
    return export_gguf(model, tiny_bpe_tokenizer(), path, "Q8_0", pre_tokenizer="gpt-2")
