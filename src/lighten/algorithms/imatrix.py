"""llama.cpp's importance matrix (imatrix) and the algorithm that quantizes GGUF types with it.

The importance of a linear's input column is the mean x² of that input over calibration tokens: where a
layer's inputs are large, an error in the weights that multiply them costs more output error. IMATRIX gives
it to llama.cpp's importance-weighted scale searches (GGMLFormat.quantize(w, importance=...), what
`llama-quantize --imatrix` runs); calibrate_model collects it block by block, each block on the outputs of
the blocks already quantized, as for GPTQ. Formats without such a search get plain round to nearest.

Files, in llama.cpp's tensor names (blk.0.attn_q.weight, mapped to the model's weights as the GGUF export
maps them; rope permutes the rows of q and k, never their input columns, so importance needs no permuting):

- GGUF, what llama-imatrix writes now: general.type "imatrix", imatrix.datasets / chunk_count / chunk_size,
  and per weight `<name>.in_sum2` (the sum of x² per input column, one row per expert) and `<name>.counts`
  (the tokens summed). read_imatrix reads it, write_imatrix writes it.
- the legacy binary .dat: int32 entries, then per entry int32 name length, name, int32 ncall (chunks),
  int32 n, n float32 = mean x² * ncall; then int32 chunks and the dataset's name. read_imatrix reads it.
"""

import struct
from pathlib import Path

import numpy as np
import torch

from lighten.algorithms.registry import IMPORTANCE, Algorithm
from lighten.errors import LightenError
from lighten.formats import Format, QuantizedTensor
from lighten.formats.ggml import GGMLFormat
from lighten.models.arch import weight_out_in

GGUF_MAGIC = b"GGUF"
SUMS, COUNTS = ".in_sum2", ".counts"
MAKE_ONE = "make one for this model with `lighten imatrix MODEL -o FILE`"


def imatrix_quantize(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None) -> QuantizedTensor:
    """llama.cpp's quantizer weighted by `importance` for GGUF types; plain round to nearest otherwise."""
    if isinstance(fmt, GGMLFormat):
        return fmt.quantize(w, importance=importance)
    return fmt.quantize(w)


IMATRIX = Algorithm("imatrix", IMPORTANCE, imatrix_quantize)


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """{llama.cpp tensor name: mean x² per input column (float32)} from a GGUF or legacy .dat imatrix file;
    LightenError if it is neither or is cut short."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LightenError(f"cannot read the imatrix file {path}: {e.strerror}") from e
    try:
        entries = _read_gguf(path) if data[:4] == GGUF_MAGIC else _read_legacy(data)
    except (ValueError, struct.error, UnicodeDecodeError, KeyError, IndexError) as e:
        raise LightenError(f"{path} is not a llama.cpp imatrix file (GGUF or legacy .dat): {e}") from e
    if not entries:
        raise LightenError(f"{path} holds no imatrix entries; {MAKE_ONE}")
    return entries


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    import gguf

    tensors = {t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(path).tensors}
    names = [n.removesuffix(SUMS) for n in tensors if n.endswith(SUMS)]
    entries = {}
    for name in names:
        sums, counts = tensors[name + SUMS], tensors.get(name + COUNTS)
        if counts is None:
            raise ValueError(f"{name}{SUMS} has no {name}{COUNTS}")
        sums = sums.reshape(counts.size, -1)  # a row per expert (one for a dense weight)
        counts = counts.reshape(-1, 1)
        # A matrix that never saw a token weighs all columns alike, as llama-quantize does.
        entries[name] = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), 1).reshape(-1)
    return entries


def _read_legacy(data: bytes) -> dict[str, np.ndarray]:
    offset = 0

    def read(fmt: str):
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values

    (n_entries,) = read("<i")
    if n_entries < 1:
        raise ValueError(f"{n_entries} entries")
    entries = {}
    for _ in range(n_entries):
        (length,) = read("<i")
        name = bytes(read(f"<{length}s")[0]).decode()
        ncall, n = read("<ii")
        values = np.array(read(f"<{n}f"), np.float32)
        # Stored as mean x² times the chunks it was collected over (ncall); llama-quantize divides back.
        entries[name] = values / ncall if ncall > 0 else values
    return entries


def write_imatrix(
    path: str | Path,
    sums: dict[str, np.ndarray],
    counts: dict[str, int],
    chunk_size: int,
    dataset: str,
    force: bool = False,
) -> Path:
    """Write {llama.cpp tensor name: sum of x² per input column} with {name: tokens summed} as the GGUF
    imatrix llama-imatrix writes (names in sorted order, as llama.cpp stores them), atomically."""
    import gguf

    from lighten.atomic import atomic_file
    from lighten.export.gguf import QUANTIZED_BY, is_lighten_gguf

    with atomic_file(path, force, is_ours=is_lighten_gguf) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="")  # llama.cpp's own imatrix converter names no architecture
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_quantized_by(QUANTIZED_BY)  # how `--force` recognises a file lighten wrote
        writer.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, max(counts.values()) // chunk_size)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
        for name in sorted(sums):
            # numpy's (1, n) is GGUF's ne = [n, 1]: llama.cpp's (columns, experts) with one expert.
            writer.add_tensor(name + SUMS, np.asarray(sums[name], np.float32).reshape(1, -1))
            writer.add_tensor(name + COUNTS, np.array([[counts[name]]], np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def importance_for(
    model: torch.nn.Module, plan: dict[str, str], entries: dict[str, np.ndarray], source: str | Path
) -> dict[str, torch.Tensor]:
    """{planned weight name: its entry of `entries` (read from `source`)}. Every planned weight inside the
    blocks must have one, as long as the weight's rows; weights outside them (lm_head, embeddings) take
    theirs where the file has one (llama-imatrix collects output.weight only when asked)."""
    importance, missing = {}, []
    for name in plan:
        gguf_name = llama_cpp_name(name, model)
        if gguf_name not in entries:
            if gguf_name.startswith("blk."):
                missing.append(f"{gguf_name} ({name})")
            continue
        columns = weight_out_in(model.get_submodule(name.removesuffix(".weight"))).shape[-1]
        if entries[gguf_name].shape != (columns,):
            raise LightenError(
                f"{source}: {gguf_name} has {entries[gguf_name].size} values but {name} has {columns} input "
                f"columns: the imatrix was made for another model; {MAKE_ONE}"
            )
        if not (np.isfinite(entries[gguf_name]).all() and (entries[gguf_name] >= 0).all()):
            raise LightenError(f"{source}: {gguf_name} has negative or non-finite values; {MAKE_ONE}")
        importance[name] = torch.from_numpy(np.ascontiguousarray(entries[gguf_name]))
    if missing:
        others = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LightenError(
            f"{source} has no entry for {missing[0]}{others}: the imatrix was made for another model; "
            f"{MAKE_ONE}"
        )
    return importance


def collect_imatrix(
    model: torch.nn.Module, tokenizer, texts: list[str], n_tokens: int, context: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """What llama-imatrix collects, on the model as it is: ({llama.cpp name: sum of x² per input column},
    {name: tokens}) of every linear weight in the blocks, over the first `n_tokens` tokens of `texts` in
    windows of `context`."""
    from lighten.algorithms.activations import collect_input_stats
    from lighten.plan import matmul_weights

    names = {}
    for weight in matmul_weights(model, embeddings=False):
        gguf_name = llama_cpp_name(weight, model)
        if gguf_name.startswith("blk."):  # llama-imatrix skips output.weight unless asked
            names[weight.removesuffix(".weight")] = gguf_name
    stats = collect_input_stats(model, tokenizer, texts, n_tokens, context, names=list(names))
    return (
        {names[m]: s.sq_sum.numpy() for m, s in stats.items()},
        {names[m]: s.n_tokens for m, s in stats.items()},
    )


def llama_cpp_name(weight: str, model: torch.nn.Module | None = None) -> str:
    """The GGUF tensor name of a weight of `model` (blk.0.attn_q.weight), as the GGUF export names it (a
    Llama's without a model)."""
    from lighten.export.gguf import ARCHS, gguf_tensor_name

    arch, _ = ARCHS.get(type(model).__name__, ("llama", False))
    try:
        return gguf_tensor_name(weight, arch)
    except LightenError as e:
        raise LightenError(
            f"imatrix files name llama.cpp's tensors, and lighten names them for the models it exports to "
            f"GGUF only ({e})"
        ) from e
