"""Export a lighten checkpoint as compressed-tensors, the quantized format vLLM and transformers load.

Integer codes map onto compressed-tensors' `pack-quantized` format without requantizing, so every
code is carried over exactly; only int4 and int8 (the widths vLLM's W4A16/W8A16 kernels run) on
Linear weights, per channel or in groups that divide the row. Per quantized weight `M.weight`:

    M.weight_packed      int32 (rows, ceil(K*b/32)): the values q + 2^(b-1), 32/b per word, LSB first
    M.weight_scale       fp16 (rows, groups), lighten's stored scales as they are (channel: groups = 1)
    M.weight_shape       int64 [rows, K]
    M.weight_zero_point  asym only: int32 (ceil(rows*b/32), groups), zp + 2^(b-1) packed down the rows

compressed-tensors decodes x = (q - zp) * scale with signed q, zp in [-2^(b-1), 2^(b-1)). lighten's
sym codes are b-bit two's complement (q itself); its asym codes c and zero-points z are unsigned with
x = (c - z) * scale, so q = c - 2^(b-1) and zp = z - 2^(b-1): the packed nibbles/bytes are c and z.
"""

import importlib.util
import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lighten import formats
from lighten.atomic import atomic_dir, check_output
from lighten.checkpoint import (
    MANIFEST,
    WEIGHTS,
    is_checkpoint,
    quantized_parts,
    read_manifest,
    require_no_online_rotation,
)
from lighten.errors import LightenError
from lighten.formats import QuantizedTensor
from lighten.models import build_model
from lighten.models.load import open_safetensors

BITS = {"int4": 4, "int8": 8}
CONFIG = "config.json"


def export_compressed_tensors(checkpoint_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write a compressed-tensors model directory (config.json with quantization_config, weights,
    tokenizer) from a lighten checkpoint, atomically; returns the output directory."""
    checkpoint_dir = Path(checkpoint_dir)
    if not is_checkpoint(checkpoint_dir):
        raise LightenError(
            f"{checkpoint_dir} is not a lighten checkpoint (no {MANIFEST}); quantize a model into one first"
        )
    if importlib.util.find_spec("compressed_tensors") is None:
        raise LightenError("exporting to compressed-tensors needs it: run `pip install compressed-tensors`")
    check_output(out_dir, force, inputs=[checkpoint_dir])
    manifest = read_manifest(checkpoint_dir)
    for name, info in manifest["tensors"].items():
        _check_exportable(name, info["spec"], info["shape"])
    linears = _linear_modules(checkpoint_dir, manifest["tensors"])
    with open_safetensors(checkpoint_dir / WEIGHTS) as f:
        require_no_online_rotation(f.keys(), "compressed-tensors (and vLLM)")
        quantized_parts(checkpoint_dir, manifest, set(f.keys()))
        state = {key: f.get_tensor(key) for key in f.keys()}
    tensors, weight_args = {}, {}
    for name, info in manifest["tensors"].items():
        parts = {key: state.pop(f"{name}.{key}") for key in info["keys"]}
        q = QuantizedTensor.from_tensors(info["spec"], tuple(info["shape"]), parts)
        module = name.removesuffix(".weight")
        tensors.update({f"{module}.{key}": t for key, t in _convert(q).items()})
        weight_args[module] = _weight_args(q)
    tensors.update(state)  # norms, biases, embeddings and skipped weights stay as they were

    config = json.loads((checkpoint_dir / CONFIG).read_text())
    config["quantization_config"] = _quantization_config(weight_args, sorted(linears - weight_args.keys()))
    with atomic_dir(out_dir, force=force, inputs=[checkpoint_dir]) as tmp:
        for f in checkpoint_dir.iterdir():
            if f.is_file() and f.name not in (MANIFEST, WEIGHTS, CONFIG):
                shutil.copy2(f, tmp / f.name)
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def _check_exportable(name: str, spec: str, shape: list[int]) -> None:
    fmt = formats.get(spec)
    if fmt.family not in BITS or fmt.granularity == "tensor":
        raise LightenError(
            f"{name} is {spec}, which compressed-tensors cannot hold without requantizing: it takes int4 "
            "and int8 (sym or asym) per channel or in groups (:channel, :gN); export other formats "
            "(nf4, fp*, mx*, ternary, binary, other int widths) to GGUF instead"
        )
    _, k, g, _ = fmt.geometry(tuple(shape))
    if k % g:
        raise LightenError(
            f"{name} ({spec}) has rows of {k}, which groups of {g} do not divide; compressed-tensors "
            f"needs equal groups: quantize with a group size that divides {k}, or :channel"
        )


def _linear_modules(checkpoint_dir: Path, quantized: dict) -> set[str]:
    """Names of the model's Linear modules; refuses quantized weights of any other kind of module."""
    with torch.device("meta"):  # the module tree only: no memory, no random init
        model, _ = build_model(checkpoint_dir)
    modules = dict(model.named_modules())
    for name in quantized:
        module = modules.get(name.removesuffix(".weight"))
        if not isinstance(module, nn.Linear):
            raise LightenError(
                f"{name} belongs to a {type(module).__name__}, not a Linear layer: compressed-tensors "
                "export covers Linear weights only (not GPT-2's Conv1D or embeddings); quantize "
                "without it (--skip, no --embeddings)"
            )
    return {name for name, m in modules.items() if isinstance(m, nn.Linear)}


def _convert(q: QuantizedTensor) -> dict[str, torch.Tensor]:
    fmt = formats.get(q.spec)
    bits = BITS[fmt.family]
    half = 2 ** (bits - 1)
    codes = fmt.codes(q).long()
    # The packed value is q + 2^(b-1): for asym that is lighten's unsigned code itself; for sym,
    # adding 2^(b-1) modulo 2^b to the two's complement code gives the same.
    stored = codes if fmt.asym else (codes + half) % 2**bits
    out = {
        "weight_packed": _pack_int32(stored, bits),
        "weight_scale": q.tensors["scales"],
        "weight_shape": torch.tensor(codes.shape),
    }
    if fmt.asym:
        zeros = fmt.zero_points(q).long()
        out["weight_zero_point"] = _pack_int32(zeros.t(), bits).t().contiguous()
    return out


def _pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) ints in [0, 2^bits) -> (rows, ceil(n*bits/32)) int32, element j of a word at bit j*bits."""
    per_word = 32 // bits
    v = nn.functional.pad(values, (0, -values.shape[1] % per_word)).view(values.shape[0], -1, per_word)
    words = (v << (bits * torch.arange(per_word))).sum(-1)
    return (words - (words >> 31 << 32)).to(torch.int32)  # the same 32 bits, read as signed


def _weight_args(q: QuantizedTensor) -> dict:
    fmt = formats.get(q.spec)
    _, _, g, groups = fmt.geometry(q.shape)
    # A single group per row (also gN with N >= the row) is one scale per output channel.
    grouping = {"strategy": "channel"} if groups == 1 else {"strategy": "group", "group_size": g}
    return {"num_bits": BITS[fmt.family], "type": "int", "symmetric": not fmt.asym, **grouping}


def _quantization_config(weight_args: dict[str, dict], ignore: list[str]) -> dict:
    """config.json's quantization_config, built and checked by compressed-tensors itself. One scheme
    targets every Linear not ignored; weights quantized differently get one scheme per kind, by name."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_args = defaultdict(list)
    for module, args in weight_args.items():
        by_args[tuple(sorted(args.items()))].append(module)
    config = QuantizationConfig(
        config_groups={
            f"group_{i}": QuantizationScheme(
                targets=["Linear"] if len(by_args) == 1 else modules,
                weights=QuantizationArgs(**dict(args)),
            )
            for i, (args, modules) in enumerate(by_args.items())
        },
        format="pack-quantized",
        quantization_status="compressed",
        ignore=ignore,
    )
    # The same keys ModelCompressor.update_config writes.
    return {
        "version": compressed_tensors.__version__,
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(exclude_none=True),
    }
