"""Calibrated quantization of a whole model, one transformer block at a time.

Capture what block 0 receives for each calibration window (hidden states plus the keyword arguments the
model passes its blocks: attention mask, rotary cos/sin, ...), then for each block in turn: run it to
gather what its linears need (GPTQ: input Hessians; AWQ: input samples; imatrix: mean x² of each input),
quantize its planned linears, write the dequantized weights back, and run it again to make the next
block's inputs. Each block thus
calibrates on the outputs of the already-quantized blocks before it, as GPTQ does, and memory holds one
block's activations for all windows rather than the whole model's.
"""

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten import formats
from lighten.algorithms.activations import token_windows
from lighten.algorithms.awq import norms_to_fold
from lighten.algorithms.registry import HESSIAN, IMPORTANCE, Algorithm, get_algorithm
from lighten.formats import QuantizedTensor
from lighten.memory import release_free_pages
from lighten.models import WeightReader
from lighten.models.arch import Block, NormGroup, model_view, weight_out_in
from lighten.progress import track
from lighten.quantize import dequantize_weight, quantize_weights

AWQ_SAMPLES = 4096  # input rows per norm group for AWQ's scale search


class _Captured(Exception):
    """Raised by the hook on block 0 to stop the forward once the block's inputs are known."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs


@torch.no_grad()
def calibrate_model(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    plan: dict[str, str],
    algorithm: str | Algorithm = "gptq",
    n_tokens: int = 8192,
    context: int = 512,
    weights: WeightReader | None = None,
    importance: dict[str, torch.Tensor] | None = None,
) -> dict[str, QuantizedTensor]:
    """Quantize every planned weight ([out, in], like quantize_weights) with `algorithm` (a name in
    lighten.algorithms.registry.ALGORITHMS, or an Algorithm), calibrated on the first `n_tokens` tokens of
    `texts` in windows of `context` (see token_windows). Planned weights outside the blocks (lm_head,
    embeddings) get RTN. An algorithm that collects nothing (rtn, mse) reads no text and runs no forward
    pass: it quantizes each weight on its own.

    The model is modified in place: every planned weight ends up holding its dequantized value, and AWQ
    also folds its scales into the norms (the returned tensors quantize the folded weights). Deep-copy
    the model first to keep the original.

    `weights` (a reader from lighten.models.open_weights, for a model that still equals its files) reads
    the weights from the files instead, and the returned tensors are then the only result. Calibration
    streams the blocks: each block's tensors are read when its turn comes and its planned weights dropped
    (to the meta device) once it has made the next block's inputs, so that one block's weights are in
    memory at a time instead of the whole model's. An algorithm that collects nothing reads one weight at
    a time and leaves the model as it was.

    `importance` ({weight name: mean x² per input column}, e.g. from a llama.cpp imatrix file, see
    lighten.algorithms.imatrix) gives an algorithm that collects IMPORTANCE its statistic up front: then it
    reads no text either, and a planned weight without an entry gets importance None."""
    if isinstance(algorithm, str):
        algorithm = get_algorithm(algorithm)
    if importance is not None and algorithm.collects != IMPORTANCE:
        raise ValueError(f"{algorithm.name} does not read importance; it collects {algorithm.collects}")
    view = model_view(model)
    if algorithm.rescale_group and not norms_to_fold(view, algorithm.name):
        algorithm = get_algorithm("rtn")
    in_blocks = tuple(f"{_layer(model, block)[0]}." for block in view.blocks)
    rest = {name: spec for name, spec in plan.items() if not name.startswith(in_blocks)}
    if not algorithm.needs_data or importance is not None:
        blocks = {name: spec for name, spec in plan.items() if name not in rest}
        quantized = quantize_weights(model, blocks, weights, algorithm.quantize_weight, importance)
        quantized |= quantize_weights(model, rest, weights)
        if weights is None:
            _write_back(model, quantized)
        return {name: quantized[name] for name in plan}
    model.eval()
    windows = token_windows(tokenizer, texts, n_tokens, context)
    inputs = _block_inputs(model, _layer(model, view.blocks[0])[1], windows)
    quantized = {}
    for block in track(view.blocks, f"{algorithm.name} calibration", total=len(view.blocks)):
        prefix, layer = _layer(model, block)
        streamed = weights is not None and _read_block(layer, prefix, weights)
        linears = {
            f"{prefix}.{n}": m
            for n, m in layer.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and f"{prefix}.{n}.weight" in plan
        }
        groups = (block.attn, block.mlp)
        if algorithm.collects == HESSIAN:
            stats = _hessians(layer, inputs, linears, groups)
        elif algorithm.collects == IMPORTANCE:
            stats = _importance(layer, inputs, linears, groups)
        else:
            stats = _input_samples(layer, inputs, groups)
        if algorithm.rescale_group:  # AWQ: each reader then gets the importance of its rescaled inputs
            samples, stats = stats, {}
            for group in groups:
                stats |= algorithm.rescale_group(group, samples[group.name], plan)
        for name, linear in linears.items():
            w = weight_out_in(linear)
            fmt = formats.get(plan[f"{name}.weight"])
            q = algorithm.quantize_weight(w.detach().float(), fmt, stats.get(name))
            quantized[f"{name}.weight"] = q
            w.copy_(q.dequantize())
        for x, args, kwargs in inputs:
            x.copy_(_run(layer, x, args, kwargs))
        if streamed:
            for linear in linears.values():
                linear.weight = nn.Parameter(linear.weight.to("meta"), requires_grad=False)
        release_free_pages()
    quantized |= quantize_weights(model, rest)
    _write_back(model, {name: quantized[name] for name in rest})
    return {name: quantized[name] for name in plan}


def _write_back(model: nn.Module, quantized: dict[str, QuantizedTensor]) -> None:
    """Put each weight's dequantized value in the model."""
    for name, q in quantized.items():
        model.get_parameter(name).copy_(dequantize_weight(model, name, q))


def _layer(model: nn.Module, block: Block) -> tuple[str, nn.Module]:
    """The decoder layer holding a block: the deepest module that contains all its linears."""
    names = [*block.attn.linears, block.attn_out[0], *block.mlp.linears, block.mlp_out[0]]
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    prefix = ".".join(common)
    return prefix, model.get_submodule(prefix)


def _read_block(layer: nn.Module, prefix: str, read: WeightReader) -> bool:
    """Put the block's tensors, read from the files, in place of its own (which may be pages of a mapped
    file, resident for good once touched); False, leaving the block alone, if the files lack any of them."""
    state = layer.state_dict()
    stored = {name: read(f"{prefix}.{name}") for name in state}
    if any(t is None or t.shape != state[name].shape for name, t in stored.items()):
        return False
    layer.load_state_dict({name: t.to(state[name].dtype) for name, t in stored.items()}, assign=True)
    return True


def _block_inputs(model: nn.Module, first: nn.Module, windows: list[torch.Tensor]) -> list:
    """(hidden states, other args, kwargs) that `first` receives for each window. The forward stops at
    `first`: the layers after it would only waste time. Windows of one length get the same rotary tables
    and positions: they share the first such window's objects (128 windows of 512 on SmolLM2: 33 MB).

    The hidden states of all windows are views into one buffer, which each block overwrites with its
    outputs: held as one tensor per window, the block's temporaries would fill the holes between them
    and the allocator could return neither to the system."""

    def trap(module, args, kwargs):
        raise _Captured(args, kwargs)

    inputs, shared, buffer, used = [], [], None, 0
    handle = first.register_forward_pre_hook(trap, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(input_ids=window[None], use_cache=False)
            except _Captured as c:
                args, kwargs = c.args, dict(c.kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if buffer is None:
                    width = hidden.shape[-1]
                    buffer = hidden.new_empty(sum(len(w) for w in windows) * width)
                x = buffer[used : used + hidden.numel()].view(hidden.shape).copy_(hidden)
                used += hidden.numel()
                rest = (args[1:], kwargs)
                rest = next((r for r in shared if _same(r, rest)), rest)
                if not any(r is rest for r in shared):
                    shared.append(rest)
                inputs.append((x, *rest))
    finally:
        handle.remove()
    return inputs


def _same(a, b) -> bool:
    """Equal nested tuples / dicts of tensors and plain values (tensors: same shape, dtype and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _run(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns (hidden, ...)


def _hessians(layer: nn.Module, inputs: list, linears: dict, groups: tuple) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n of each linear's inputs X [n tokens, in] over all windows (GPTQ's Hessian)."""
    sums, n = _input_sums(
        layer, inputs, linears, groups, lambda k: torch.zeros(k, k), lambda s, x: s.addmm_(x.t(), x)
    )
    return {name: 2 * sums[name] / n[name] for name in linears}


def _importance(layer: nn.Module, inputs: list, linears: dict, groups: tuple) -> dict[str, torch.Tensor]:
    """mean x² of each input column of each linear over all windows' tokens: llama.cpp's imatrix entry, and
    half the Hessian's diagonal, without its in² cost."""
    sums, n = _input_sums(layer, inputs, linears, groups, torch.zeros, lambda s, x: s.add_(x.square().sum(0)))
    return {name: sums[name] / n[name] for name in linears}


def _input_sums(layer: nn.Module, inputs: list, linears: dict, groups: tuple, zeros, add) -> tuple:
    """({linear: zeros(in) + add(it, X) for its inputs X [tokens, in] per window}, {linear: tokens}). The
    readers of one norm group (q, k, v; gate, up) read the same X: it is added up once, for the first."""
    first_reader = {name: name for name in linears}
    for group in groups:
        readers = [name for name in group.linears if name in linears]
        if readers:
            first_reader |= dict.fromkeys(readers, readers[0])
    own = {name: m for name, m in linears.items() if first_reader[name] == name}
    sums = {name: zeros(weight_out_in(m).shape[1]) for name, m in own.items()}
    counts = dict.fromkeys(own, 0)

    def hook(name):
        def accumulate(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            add(sums[name], x)
            counts[name] += len(x)

        return accumulate

    _forward_with_hooks(layer, inputs, {m: hook(name) for name, m in own.items()})
    return {name: sums[first_reader[name]] for name in linears}, {n: counts[first_reader[n]] for n in linears}


def _input_samples(layer: nn.Module, inputs: list, groups: tuple[NormGroup, ...]) -> dict[str, torch.Tensor]:
    """About AWQ_SAMPLES evenly spaced rows of each norm group's output (its first reader's input) over all
    windows, by group name."""
    every = math.ceil(sum(x.shape[:-1].numel() for x, _, _ in inputs) / AWQ_SAMPLES)
    readers = {group.name: next(iter(group.linears.values())) for group in groups}
    rows = {m: [] for m in readers.values()}

    def hook(module, args):
        rows[module].append(args[0].reshape(-1, args[0].shape[-1])[::every].float())

    _forward_with_hooks(layer, inputs, dict.fromkeys(rows, hook))
    return {name: torch.cat(rows[m]) for name, m in readers.items()}


class _AllSeen(Exception):
    """Raised by the last hook a window fires: the rest of the block would compute nothing the hooks read."""


def _forward_with_hooks(layer: nn.Module, inputs: list, hooks: dict) -> None:
    """Run the layer on each window with hooks {module: forward pre-hook}, stopping a window's forward once
    every hooked module has seen its input (the MLP's output product, a quarter of the flops, is skipped)."""
    pending = set()

    def last_stops(hook):
        def run(module, args):
            hook(module, args)
            pending.discard(module)
            if not pending:
                raise _AllSeen

        return run

    handles = [m.register_forward_pre_hook(last_stops(h)) for m, h in hooks.items()]
    try:
        for x, args, kwargs in inputs:
            pending.update(hooks)
            try:
                _run(layer, x, args, kwargs)
            except _AllSeen:
                pass
    finally:
        for h in handles:
            h.remove()
