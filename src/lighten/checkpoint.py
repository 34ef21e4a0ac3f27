"""lighten's own checkpoint: packed codes and scales in safetensors, plus a JSON manifest.

Layout of a checkpoint directory:
    model.safetensors   kept tensors under their own names; each quantized weight W as W.codes, W.scales, ...
    lighten.json        manifest: plan (format per weight), shapes, source model, lighten version
    config.json, tokenizer files, ...   copied from the source model so the directory loads on its own
"""

import contextlib
import dataclasses
import datetime
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

import lighten
from lighten import formats
from lighten.atomic import atomic_dir
from lighten.errors import LightenError, ModelError, SpecError
from lighten.formats import QuantizedTensor
from lighten.models import BUILTIN, build_model, load_model, model_kind
from lighten.models.load import open_safetensors
from lighten.quantize import dequantize_weight, is_transposed
from lighten.runtime import meta_parameters, pack_layer
from lighten.runtime.dispatch import choose_kernels
from lighten.runtime.model import compute_dtype
from lighten.surgery import restore_input_rotations

MANIFEST = "lighten.json"
ONLINE_ROTATION = ".input_hadamard."
WEIGHTS = "model.safetensors"
# Small files a model directory needs besides its weights (config, tokenizer, sentence-transformers glue).
SIDECAR_SUFFIXES = {".json", ".txt", ".model"}
# Weight names in a manifest are module paths: never anything a file path could be made of ("../", "/").
DOTTED_NAME = re.compile(r"\w+(\.\w+)*", re.ASCII)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load(
    name_or_path: str | Path, dtype: torch.dtype | None = None, packed: bool = False, kernels: str = "auto"
):
    """Any model lighten can read: a lighten checkpoint, a built-in name or a Hugging Face directory.

    packed=True (checkpoints only) keeps the quantized weights packed, see load_checkpoint.
    Returns (model, tokenizer)."""
    if is_checkpoint(name_or_path):
        return load_checkpoint(name_or_path, dtype, packed, kernels)
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
    budget: dict | None = None,
    finetune: dict | None = None,
) -> Path:
    """Write a quantized model atomically; returns the output directory.

    The manifest records the `recipe` that made it (surgery steps, algorithm, rules, budget), and the
    `allocation` table of a budgeted plan with the `budget` summary of what it counted and achieved
    (lighten.plan.budget_plan), and the `finetune` run that trained its weights, if one did
    (lighten.lab.finetune). The model's own config is saved, since surgery may change it
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
        # A directory is recorded absolute: eval compares against it by default, from any folder.
        "source": {
            "model": source_name if source_name in BUILTIN else str(Path(source_dir).resolve()),
            "path": str(Path(source_dir).resolve()),
        },
        "kind": model_kind(model),
        "recipe": dataclasses.asdict(recipe) if recipe is not None else None,
        "allocation": allocation,
        "budget": budget,
        "finetune": finetune,
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
    """The checkpoint's manifest, checked here once so that every reader can rely on its keys and types.
    "recipe", "allocation" and "budget" are None when absent."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not a readable lighten checkpoint ({e})") from e
    if problem := _manifest_problem(manifest):
        raise ModelError(f"{file} is broken: {problem}; quantize the source model again to re-create it")
    manifest.setdefault("recipe", None)
    manifest.setdefault("allocation", None)
    manifest.setdefault("budget", None)
    return manifest


def _manifest_problem(manifest) -> str | None:
    """What is wrong with a manifest's structure, or None."""
    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    source = manifest.get("source")
    if not (isinstance(source, dict) and all(isinstance(source.get(k), str) for k in ("model", "path"))):
        return '"source" must be {"model": str, "path": str}'
    if manifest.get("kind") not in ("causal", "encoder"):
        return '"kind" must be "causal" or "encoder"'
    for key, kind in (("recipe", dict), ("allocation", list), ("budget", dict), ("finetune", dict)):
        if not isinstance(manifest.get(key), kind | None):
            return f'"{key}" must be a {kind.__name__} or null'
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        return '"tensors" must map weight names to {"spec": str, "shape": [int, ...], "keys": [str, ...]}'
    for name, info in tensors.items():
        if problem := _tensor_problem(name, info):
            return f"tensor {name!r}: {problem}"
    return None


def _tensor_problem(name: str, info) -> str | None:
    if not DOTTED_NAME.fullmatch(name):
        return "a weight name is a dotted module path such as model.layers.0.mlp.up_proj.weight"
    if not isinstance(info, dict) or not isinstance(info.get("spec"), str):
        return 'needs "spec": a format spec string'
    try:
        formats.get(info["spec"])
    except SpecError as e:
        return str(e)
    shape, keys = info.get("shape"), info.get("keys")
    if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
        return '"shape" must be a list of positive integers'
    if not (isinstance(keys, list) and keys and all(isinstance(k, str) and k.isidentifier() for k in keys)):
        return '"keys" must be a list of stored buffer names such as "codes", "scales"'
    return None


def quantized_parts(path: Path, manifest: dict, stored: set[str]) -> set[str]:
    """Names of the stored tensors that hold the quantized weights (W.codes, W.scales, ...); refuses a
    weights file that lacks one of those the manifest names."""
    parts = {f"{name}.{key}" for name, info in manifest["tensors"].items() for key in info["keys"]}
    if absent := parts - stored:
        raise ModelError(f"{path / WEIGHTS} lacks tensor {min(absent)!r} named in {MANIFEST}")
    return parts


def load_checkpoint(
    path: str | Path, dtype: torch.dtype | None = None, packed: bool = False, kernels: str = "auto"
):
    """Rebuild a runnable Hugging Face model from a checkpoint.

    packed=False dequantizes every weight; dtype (default float32) is that of the whole model.
    packed=True swaps each quantized layer for a packed one (lighten.runtime): its weight stays in the stored
    bytes and is never materialised in full precision; dtype (default: what the packed kernels compute in,
    fp32 for GGUF block types, else bf16: lighten.runtime.model.compute_dtype) is that of the layers left
    unquantized; `kernels` says where lighten's ints that ggml computes exactly go (choose_kernels).
    Returns (model, tokenizer)."""
    path = Path(path)
    manifest = read_manifest(path)
    quantized = manifest["tensors"]
    weights = [(i["spec"], tuple(i["shape"])) for i in quantized.values()]
    on_ggml = choose_kernels(weights, kernels) if packed else {}
    specs = [on_ggml.get(spec, spec) for spec, _ in weights]
    dtype = dtype or (compute_dtype(specs) if packed else torch.float32)
    # The shell comes from the copied config with its parameters on the meta device: no memory, no random
    # init. Each parameter is then replaced by a tensor read from the file, one tensor at a time (cast to
    # dtype as it is read; a packed layer built as soon as its codes and scales are in), so that the peak is
    # the loaded model plus one tensor, not the model plus the whole file.
    with meta_parameters():
        model, tokenizer = build_model(path)
    _require_model_weights(path, model, quantized)
    dequantized = {}
    # pread, not mmap: the pages of a mapped file count in RSS until it is closed, a whole file's worth.
    with open_safetensors(path / WEIGHTS) as f, _reading(path / WEIGHTS):
        parts = quantized_parts(path, manifest, set(f.keys()))
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
        try:
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:  # a tensor in another shape than the config says
            raise ModelError(f"{path} does not match its config.json: {e}") from e
        for name, info in quantized.items():
            tensors = {key: f.get_tensor(f"{name}.{key}") for key in info["keys"]}
            q = QuantizedTensor.from_tensors(info["spec"], tuple(info["shape"]), tensors)
            if packed:
                pack_layer(model, name, q, dtype=dtype, on_ggml=q.spec in on_ggml)
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


def require_no_online_rotation(names, runtime: str) -> None:
    """LightenError if any of the tensor `names` is an online rotation (surgery rotate), which `runtime`, the
    target of an export, cannot run: the exported model would silently compute something else."""
    if any(ONLINE_ROTATION in name for name in names):
        raise LightenError(
            "this model was rotated by surgery rotate: it needs an online Hadamard transform before each "
            f"down_proj, which {runtime} cannot run, so the export would compute something else; quantize "
            "with --surgery fold,rotate_fused (the rotation all in the weights) or without rotate instead"
        )


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


def _require_model_weights(path: Path, model: nn.Module, quantized: dict) -> None:
    """Each quantized weight the manifest names must be one of the model's, in its shape (as quantized:
    Conv1D's transposed); otherwise it would be unpacked into the wrong place or fail deep inside."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, info in quantized.items():
        shape = list(params[name].shape) if name in params else None
        if shape and is_transposed(model, name):
            shape.reverse()
        if shape != info["shape"]:
            has = "no such weight" if shape is None else f"it in shape {shape}"
            raise ModelError(
                f"{path / MANIFEST} names {name} of shape {info['shape']}, but the model its config.json "
                f"builds has {has}: the checkpoint's files do not belong together; re-create it"
            )


@contextlib.contextmanager
def _reading(file: Path):
    """A tensor that cannot be read (the file changed or was cut after it was opened) names the file."""
    try:
        yield
    except SafetensorError as e:
        raise ModelError(f"cannot read {file} ({e}): re-create the checkpoint") from e


def _is_tied(model: nn.Module, name: str, loaded: set[str]) -> bool:
    """A key absent from the file is fine only if it shares storage with one that was loaded."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return name in params and any(
        params[name].data_ptr() == params[k].data_ptr() for k in loaded if k in params and k != name
    )
