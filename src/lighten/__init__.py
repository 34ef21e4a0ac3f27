"""lighten: make existing transformer models light.

import lighten
model, tokenizer = lighten.load("out/smollm2-int4")   # a checkpoint, a built-in name or an HF dir
fmt = lighten.formats.get("nf4")                      # submodules load on first use
"""

import importlib
import pkgutil

__version__ = "0.1.0"

_SUBMODULES = {m.name for m in pkgutil.iter_modules(__path__)}


def __getattr__(name: str):
    # Lazy so that `import lighten` (and `lighten --help`) does not pay for importing torch and transformers.
    if name == "load":
        from lighten.checkpoint import load

        return load
    if name in _SUBMODULES:
        return importlib.import_module(f"lighten.{name}")
    raise AttributeError(f"module 'lighten' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "load", *_SUBMODULES])
