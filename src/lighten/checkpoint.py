"""lighten's own checkpoint: packed codes and scales in safetensors, plus a JSON manifest.

Layout of a checkpoint directory:
    model.safetensors   kept tensors under their own names; each quantized weight W as W.codes, W.scales, ...
    lighten.json        manifest: plan (format per weight), shapes, source model, lighten version
    config.json, tokenizer files, ...   copied from the source model so the directory loads on its own
"""

import dataclasses
import datetime
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lighten
from lighten.atomic import atomic_dir
from lighten.errors import LightenError, ModelError
from lighten.formats import QuantizedTensor
from lighten.models import build_model, load_model, model_kind
from lighten.quantize import dequantize_weight
from lighten.runtime import meta_parameters, pack_layer
from lighten.surgery import restore_input_rotations

MANIFEST = "lighten.json"
ONLINE_ROTATION = ".input_hadamard."
WEIGHTS = "model.safetensors"
# Small files a model directory needs besides its weights (config, tokenizer, sentence-transformers glue).
SIDECAR_SUFFIXES = {".json", ".txt", ".model"}


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load(name_or_path: str | Path, dtype: torch.dtype | None = None, packed: bool = False):
    """Any model lighten can read: a lighten checkpoint, a built-in name or a Hugging Face directory.

    packed=True (checkpoints only) keeps the quantized weights packed, see load_checkpoint.
    Returns (model, tokenizer)."""
    if is_checkpoint(name_or_path):
        return load_checkpoint(name_or_path, dtype, packed)
    if packed:
        raise ModelError(f"{name_or_path} is not a lighten checkpoint, so it has no packed weights to run")
    return load_model(name_or_path, dtype=dtype or torch.float32)


def save_checkpoint(
    model: nn.Module,
    quantized: dict[str, QuantizedTensor],
    source_dir: Path,
    source_name: str,
    out_dir: str | Path,
    force: bool = False,
    recipe=None,
    allocation: list[dict] | None = None,
) -> Path:
    """Write a quantized model atomically; returns the output directory.

    The manifest records the `recipe` that made it (surgery steps, algorithm, rules, budget) and the
    `allocation` table of a budgeted plan. The model's own config is saved, since surgery may change it
    (folding unties lm_head)."""
    require_reloadable(model)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    manifest_tensors = {}
    for name, q in quantized.items():
        manifest_tensors[name] = {"spec": q.spec, "shape": list(q.shape), "keys": sorted(q.tensors)}
        tensors.update({f"{name}.{key}": t.contiguous() for key, t in q.tensors.items()})
    # Tied weights (lm_head = embeddings) are stored once; the model re-ties them when it is built.
    stored = {state[name].data_ptr() for name in quantized}
    for name, t in state.items():
        if name not in quantized and t.data_ptr() not in stored:
            stored.add(t.data_ptr())
            tensors[name] = t.contiguous()
    manifest = {
        "lighten_version": lighten.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"model": source_name, "path": str(source_dir)},
        "kind": model_kind(model),
        "recipe": dataclasses.asdict(recipe) if recipe is not None else None,
        "allocation": allocation,
        "tensors": manifest_tensors,
    }
    with atomic_dir(out_dir, force=force, inputs=[source_dir]) as tmp:
        for f in Path(source_dir).iterdir():
            if f.is_file() and f.suffix in SIDECAR_SUFFIXES and f.name != MANIFEST and "index" not in f.name:
                shutil.copy2(f, tmp / f.name)
        model.config.save_pretrained(tmp)
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt", "producer": "lighten"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)


def read_manifest(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not a readable lighten checkpoint ({e})") from e


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, packed: bool = False):
    """Rebuild a runnable Hugging Face model from a checkpoint.

    packed=False dequantizes every weight; dtype (default float32) is that of the whole model.
    packed=True swaps each quantized layer for a packed one (lighten.runtime): its weight stays in the stored
    bytes and is never materialised in full precision; dtype (default bfloat16, what the packed kernels
    compute in) is that of the layers left unquantized.
    Returns (model, tokenizer)."""
    path = Path(path)
    manifest = read_manifest(path)
    dtype = dtype or (torch.bfloat16 if packed else torch.float32)
    # The shell comes from the copied config with its parameters on the meta device: no memory, no random
    # init. Each parameter is then replaced by a tensor read from the file, one tensor at a time (cast to
    # dtype as it is read; a packed layer built as soon as its codes and scales are in), so that the peak is
    # the loaded model plus one tensor, not the model plus the whole file.
    with meta_parameters():
        model, tokenizer = build_model(path)
    quantized = manifest["tensors"]
    parts = {f"{name}.{key}" for name, info in quantized.items() for key in info["keys"]}
    try:
        # pread, not mmap: the pages of a mapped file count in RSS until it is closed, a whole file's worth.
        weights = safe_open(path / WEIGHTS, framework="pt", backend="pread")
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise ModelError(f"cannot read {path / WEIGHTS}: {e}") from e
    dequantized = {}
    with weights as f:
        if absent := parts - set(f.keys()):
            raise ModelError(f"{path / WEIGHTS} lacks tensor {min(absent)!r} named in {MANIFEST}")
        state, rotations = {}, {}
        for k in sorted(set(f.keys()) - parts):
            t = f.get_tensor(k)
            # Online rotations (surgery "rotate") are not part of the HF architecture: re-attached below.
            if ONLINE_ROTATION in k:
                rotations[k] = t
            else:
                state[k] = t.to(dtype) if t.is_floating_point() else t
        # assign=True puts the loaded tensors in place of the meta parameters instead of copying into them.
        # Biases are in place before their layers are packed below.
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        for name, info in quantized.items():
            tensors = {key: f.get_tensor(f"{name}.{key}") for key in info["keys"]}
            q = QuantizedTensor.from_tensors(info["spec"], tuple(info["shape"]), tensors)
            if packed:
                pack_layer(model, name, q)
            else:
                dequantized[name] = dequantize_weight(model, name, q).to(dtype)
    model.load_state_dict(dequantized, strict=False, assign=True)
    restore_input_rotations(model, rotations)
    model.tie_weights()
    loaded = state.keys() | quantized.keys()
    untied = [k for k in missing if k not in quantized and not _is_tied(model, k, loaded)]
    if untied or unexpected:
        raise ModelError(
            f"{path} does not match its config: missing {untied[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(dtype).eval(), tokenizer


def require_reloadable(model: nn.Module) -> None:
    """Refuse to save a model that its own config cannot rebuild: surgery that changes the architecture
    (GPT-2's LayerNorm -> RMSNorm, a bias on lm_head from folding ln_f) would not load back."""
    with meta_parameters():
        shell = type(model)(model.config)
    saved = {k for k in model.state_dict() if ONLINE_ROTATION not in k}
    expected = set(shell.state_dict())
    if saved != expected:
        diff = sorted(saved ^ expected)
        raise LightenError(
            f"this {type(model).__name__} was changed beyond what its config describes ({', '.join(diff[:3])}"
            f"{', ...' if len(diff) > 3 else ''}), so a checkpoint of it would not load back; apply that "
            "surgery in memory (lighten.surgery) instead"
        )


def _is_tied(model: nn.Module, name: str, loaded: set[str]) -> bool:
    """A key absent from the file is fine only if it shares storage with one that was loaded."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return name in params and any(
        params[name].data_ptr() == params[k].data_ptr() for k in loaded if k in params and k != name
    )
