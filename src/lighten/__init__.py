"""lighten: make existing transformer models light.

import lighten
model, tokenizer = lighten.load("out/smollm2-int4")   # a checkpoint, a built-in name or an HF dir
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import lighten` (and `lighten --help`) does not pay for importing transformers.
    if name == "load":
        from lighten.export.checkpoint import load

        return load
    raise AttributeError(f"module 'lighten' has no attribute {name!r}")
