"""Size of a model: bytes on disk (what a user downloads and stores, tokenizer included), bytes of stored
tensors, and for a lighten checkpoint the true bits per quantized weight (codes + scales + zero-points)."""

import json
import math
import struct
from pathlib import Path

from lighten.checkpoint import is_checkpoint, quantized_parts, read_manifest
from lighten.errors import ModelError
from lighten.models.load import open_safetensors


def disk_bytes(path: str | Path) -> int:
    """Total size of the files under the model directory `path`, subfolders included."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path} is not a directory: pass the directory that holds the model's files")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tensor_sizes(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """(elements, bytes) of every tensor in a directory's safetensors files, read from the headers only."""
    sizes = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        # open_safetensors checks the whole file first: a corrupt or cut one is an error that names it.
        with open_safetensors(f), open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, t in header.items():
            if key != "__metadata__":
                sizes[key] = (math.prod(t["shape"]), t["data_offsets"][1] - t["data_offsets"][0])
    return sizes


def size_report(model_dir: str | Path) -> dict:
    """Size facts of one model directory; for a lighten checkpoint also its format and bits per weight."""
    sizes = tensor_sizes(model_dir)
    row = {
        "model": str(model_dir),
        "disk_bytes": disk_bytes(model_dir),
        "weight_bytes": sum(b for _, b in sizes.values()),
    }
    if is_checkpoint(model_dir):
        manifest = read_manifest(model_dir)
        tensors = manifest["tensors"]
        specs = sorted({t["spec"] for t in tensors.values()})
        packed = sum(sizes[part][1] for part in quantized_parts(Path(model_dir), manifest, set(sizes)))
        numel = sum(math.prod(t["shape"]) for t in tensors.values())
        return row | {
            "format": specs[0] if len(specs) == 1 else "mixed",
            "bits_per_weight": 8 * packed / numel,
        }
    # A plain model: the average over all its stored tensors (32 for an fp32 checkpoint).
    numel = sum(n for n, _ in sizes.values())
    return row | {"format": "original", "bits_per_weight": 8 * row["weight_bytes"] / max(numel, 1)}
