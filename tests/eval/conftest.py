import pytest


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm):
    return minilm[1]


@pytest.fixture(scope="session")
def minilm_model(minilm):
    """The real all-MiniLM-L6-v2 BertModel of the shared session fixture; tests must not modify it."""
    return minilm[0]
