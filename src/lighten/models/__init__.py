"""Which model to work on: built-in names ("minilm", "smollm2-135m") or any local Hugging Face directory.

model, tokenizer = load_model("smollm2-135m")   # converted once into cache_dir() on first use
"""

from lighten.models.builtin import BUILTIN, cache_dir
from lighten.models.load import WeightReader, build_model, load_model, model_kind, open_weights, resolve

__all__ = [
    "BUILTIN",
    "WeightReader",
    "build_model",
    "cache_dir",
    "load_model",
    "model_kind",
    "open_weights",
    "resolve",
]
