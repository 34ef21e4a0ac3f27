"""ggml's CPU matmul on GGUF block bytes: the kernels llama.cpp runs, called on one layer at a time.

llama-cpp-python installs ggml as shared libraries (libggml-base, libggml-cpu); this binds the few functions
a matmul needs through ctypes, no GGUF file and no model load:

    w = GGMLMatrix(blocks, "q4_0", (n, k))     # blocks: uint8 [n, bytes per row], the GGUF block bytes
    y = GGMLProduct([w]).matmul(x)             # x: fp32 [m, k] -> fp32 [m, n], y = x Wᵀ
    GGMLProduct([wq, wk, wv]).matmul(x)        # several weights of one input in one call, side by side
    mlp = lambda g, x: [g.matmul(w_down, g.swiglu(g.matmul(w_gate, x), g.matmul(w_up, x)))]
    y = GGMLFunction([k], n, mlp)(x)           # a small graph of fixed weights in one call (decode's blocks)

A weight goes into ggml's "repack" buffer where ggml has an interleaved layout for its type and shape
(q4_0, iq4_nl, q4_k, ... on AVX2 / AVX-512 / NEON: what llama.cpp does when it loads a model), otherwise
ggml reads lighten's bytes in place, no copy. Like llama.cpp, ggml rounds each block of activations to 8 bits
(q8_0 or q8_K) before the integer dot products: results differ from dequantize + matmul by that rounding.

Threads: ggml computes on a thread pool of its own (set_threads), whose workers poll for the next matmul
for a while after each one, as in llama.cpp. They must not share the cores with torch's OpenMP threads:
run torch single-threaded while ggml computes (`ggml_owns_cores`, what the lean decoder does).

Only the C API is used (functions on opaque pointers, and the two structs ggml_init_params and
ggml_threadpool_params of ggml.h), so that a ggml update breaks this loudly, with a missing function named.
Tested with the ggml of llama-cpp-python 0.3.36 (ggml 0.25.3).
"""

import contextlib
import ctypes
import functools
import itertools
import pathlib
import sys
import weakref

import torch

from lighten.cpu import has_amx
from lighten.errors import LightenError
from lighten.formats.ggml import GGMLFormat

MAX_NODES = 64  # tensors in a graph: a Llama block's MLP half has 12
F32 = 0  # GGML_TYPE_F32
MAX_THREADS = 512  # GGML_MAX_N_THREADS
WARN, CONT = 3, 5  # ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT (continues the previous message)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _ThreadpoolParams(ctypes.Structure):
    _fields_ = [
        ("cpumask", ctypes.c_bool * MAX_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


_P, _SIZE, _I64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
_LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_SIGNATURES = {  # name: (library, result, argument types)
    "ggml_init": ("base", _P, [_InitParams]),
    "ggml_free": ("base", None, [_P]),
    "ggml_log_set": ("base", None, [_LOG, _P]),
    "ggml_tensor_overhead": ("base", _SIZE, []),
    "ggml_graph_overhead_custom": ("base", _SIZE, [_SIZE, ctypes.c_bool]),
    "ggml_new_tensor_1d": ("base", _P, [_P, ctypes.c_int, _I64]),
    "ggml_new_tensor_2d": ("base", _P, [_P, ctypes.c_int, _I64, _I64]),
    "ggml_nelements": ("base", _I64, [_P]),
    "ggml_reshape_3d": ("base", _P, [_P, _P, _I64, _I64, _I64]),
    "ggml_mul_mat": ("base", _P, [_P, _P, _P]),
    "ggml_rms_norm": ("base", _P, [_P, _P, ctypes.c_float]),
    "ggml_mul": ("base", _P, [_P, _P, _P]),
    "ggml_add": ("base", _P, [_P, _P, _P]),
    "ggml_swiglu_split": ("base", _P, [_P, _P, _P]),
    "ggml_new_graph_custom": ("base", _P, [_P, _SIZE, ctypes.c_bool]),
    "ggml_build_forward_expand": ("base", None, [_P, _P]),
    "ggml_backend_alloc_ctx_tensors_from_buft": ("base", _P, [_P, _P]),
    "ggml_backend_buffer_free": ("base", None, [_P]),
    "ggml_backend_tensor_set": ("base", None, [_P, _P, _SIZE, _SIZE]),
    "ggml_backend_tensor_get": ("base", None, [_P, _P, _SIZE, _SIZE]),
    "ggml_backend_graph_compute": ("base", ctypes.c_int, [_P, _P]),
    "ggml_backend_reg_get_proc_address": ("base", _P, [_P, ctypes.c_char_p]),
    "ggml_backend_reg_dev_get": ("base", _P, [_P, _SIZE]),
    "ggml_backend_dev_buffer_type": ("base", _P, [_P]),
    "ggml_backend_dev_buffer_from_host_ptr": ("base", _P, [_P, _P, _SIZE, _SIZE]),
    "ggml_backend_tensor_alloc": ("base", ctypes.c_int, [_P, _P, _P]),
    "ggml_backend_dev_supports_op": ("base", ctypes.c_bool, [_P, _P]),
    "ggml_backend_buft_name": ("base", ctypes.c_char_p, [_P]),
    "ggml_threadpool_params_init": ("base", None, [ctypes.POINTER(_ThreadpoolParams), ctypes.c_int]),
    "ggml_threadpool_new": ("cpu", _P, [ctypes.POINTER(_ThreadpoolParams)]),
    "ggml_threadpool_free": ("cpu", None, [_P]),
    "ggml_backend_cpu_init": ("cpu", _P, []),
    "ggml_backend_cpu_reg": ("cpu", _P, []),
    "ggml_backend_cpu_set_n_threads": ("cpu", None, [_P, ctypes.c_int]),
    "ggml_backend_cpu_set_threadpool": ("cpu", None, [_P, _P]),
}


@functools.cache
def _ggml():
    """The bound functions (as attributes without the ggml_ prefix), the CPU backend and its buffer types."""
    try:
        import llama_cpp
    except ImportError as e:
        raise LightenError("ggml's kernels come with llama-cpp-python: pip install llama-cpp-python") from e
    folder = pathlib.Path(llama_cpp.__file__).parent / "lib"
    libs = {
        kind: ctypes.CDLL(str(folder / f"libggml-{kind}.so"), mode=ctypes.RTLD_GLOBAL)
        for kind in ("base", "cpu")
    }
    lib = type("ggml", (), {})()
    for name, (kind, result, args) in _SIGNATURES.items():
        if not hasattr(libs[kind], name):
            raise LightenError(f"the ggml in {folder} lacks {name}: install llama-cpp-python 0.3.36 or later")
        fn = getattr(libs[kind], name)
        fn.restype, fn.argtypes = result, args
        setattr(lib, name.removeprefix("ggml_"), fn)
    lib.log_set(_log, None)
    lib.backend = lib.backend_cpu_init()
    reg = lib.backend_cpu_reg()
    lib.device = lib.backend_reg_dev_get(reg, 0)
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(_P), _P)(
        lib.backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    )
    extra, bufts = get_extra(lib.device), []
    while extra and extra[len(bufts)]:
        bufts.append(extra[len(bufts)])
    # Only ggml's own repacked layouts: AMX's buffer crashes this build (lighten.export.llamacpp), and
    # there the repacking is left off altogether, as open_llama leaves it off.
    repack = [b for b in bufts if lib.backend_buft_name(b) == b"CPU_REPACK"]
    lib.repack = repack[0] if repack and not has_amx() else None
    lib.plain = lib.backend_dev_buffer_type(lib.device)
    lib.pool = None
    _new_pool(lib, torch.get_num_threads())
    return lib


_last_shown = [False]


@_LOG
def _log(level, text, _):
    """ggml's warnings and errors to stderr; its notes (one per repacked weight) are left out."""
    shown = _last_shown[0] if level == CONT else level >= WARN
    if shown:
        sys.stderr.write(text.decode(errors="replace"))
    _last_shown[0] = shown


def set_threads(n: int) -> None:
    """ggml computes every matmul from now on with n threads: a new thread pool of n (the calling thread is
    one of them). Default: torch's thread count when ggml was first used."""
    if n < 1:
        raise LightenError(f"ggml needs at least 1 thread, got {n}")
    if n != threads():
        _new_pool(_ggml(), n)


def _new_pool(lib, n: int) -> None:
    params = _ThreadpoolParams()
    lib.threadpool_params_init(params, n)
    pool = lib.threadpool_new(params)
    lib.backend_cpu_set_threadpool(lib.backend, pool)
    lib.backend_cpu_set_n_threads(lib.backend, n)
    if lib.pool:
        lib.threadpool_free(lib.pool)
    lib.pool, lib.threads = pool, n


def threads() -> int:
    """The thread count of ggml's matmuls."""
    return _ggml().threads


@contextlib.contextmanager
def ggml_owns_cores():
    """torch single-threaded inside, so that its OpenMP threads and ggml's polling workers never compete
    for the cores; torch's thread count is restored on the way out."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def aligned(data: torch.Tensor) -> torch.Tensor:
    """`data` itself if ggml can read it in place (contiguous, aligned to 32 bytes as its CPU kernels want),
    else a copy that it can (torch allocates to 64; numpy's arrays may sit at 16)."""
    return data if data.is_contiguous() and data.data_ptr() % 32 == 0 else data.clone()


class GGMLMatrix:
    """A weight W [n, k] of one GGUF block type, held for ggml's matmul (GGMLProduct). Where ggml has an
    interleaved layout for the type and shape (`repacked`), ggml holds W in it, a copy; elsewhere ggml
    reads the given bytes in place, and they must then stay unchanged while this matrix is used. Immutable:
    copies (deepcopy) are the same matrix."""

    def __init__(self, blocks: torch.Tensor, spec: str, shape: tuple[int, int], repack: bool = True):
        from lighten import formats

        fmt = formats.get(spec)
        if not isinstance(fmt, GGMLFormat):
            raise LightenError(f"{spec} is not a GGUF block type: ggml's kernels compute only those")
        lib, (self.n, self.k) = _ggml(), shape
        self.spec, self.type = spec, int(fmt.ggml_type)
        data = blocks.view(torch.uint8)
        rows, _, _, blocks_per_row = fmt.geometry(tuple(shape))
        self.nbytes = rows * blocks_per_row * fmt.block_bytes
        if data.numel() != self.nbytes:
            raise LightenError(f"{data.numel()} bytes are not a {spec} matrix of shape {tuple(shape)}")
        self._new_weight()
        self.buffer = None
        if repack and lib.repack is not None:
            self.buffer = lib.backend_alloc_ctx_tensors_from_buft(self.ctx, lib.repack)
            probe = _Graph([self.k], 1, lambda g, x: [g.matmul(self, x)])
            has_layout = lib.backend_dev_supports_op(lib.device, probe.outputs[0])
            probe.free()
            if not has_layout:
                self.close()
                self._new_weight()
        self.repacked = self.buffer is not None
        if self.repacked:
            lib.backend_tensor_set(self.weight, data.contiguous().data_ptr(), 0, data.numel())
        else:
            self.data = aligned(data)
            ptr, size = self.data.data_ptr(), self.data.numel()
            self.buffer = lib.backend_dev_buffer_from_host_ptr(lib.device, ptr, size, size)
            lib.backend_tensor_alloc(self.buffer, self.weight, ptr)

    def _new_weight(self) -> None:
        lib = _ggml()
        self.ctx = lib.init(_InitParams(lib.tensor_overhead(), None, True))
        self.weight = lib.new_tensor_2d(self.ctx, self.type, self.k, self.n)

    def close(self) -> None:
        """Free ggml's memory for this matrix (also done when it is garbage collected)."""
        if self.ctx:
            lib = _ggml()
            if self.buffer:
                lib.backend_buffer_free(self.buffer)
            lib.free(self.ctx)
            self.ctx = self.buffer = self.weight = None

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        # Pickled, its pointers would point nowhere.
        raise TypeError("a GGMLMatrix holds ggml's memory and cannot be pickled: make another from the bytes")

    def __del__(self):
        if getattr(self, "ctx", None):
            self.close()


class GGMLFunction:
    """y = f(x₁, x₂, ...) for a function of fixed weights, computed by ggml as one graph: `build(g, *xs)`
    returns f's outputs (ggml tensors of the graph g, made with its ops from the inputs xs), which y holds
    side by side. `widths` are the inputs' widths, `n` the outputs' total. Copies (deepcopy) share the
    weights and build graphs of their own."""

    def __init__(self, widths: list[int], n: int, build):
        self.widths, self.n, self.build = list(widths), n, build
        self._decode_graph = None
        self.handle = next(_handles)  # how the torch op ggml_matmul names this function
        _functions[self.handle] = self

    def __call__(self, *xs: torch.Tensor, out: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        """xs: fp32 [m, widths[i]] -> fp32 [m, n], the outputs side by side, on ggml's kernels with
        set_threads' threads. Given `out`, one contiguous fp32 tensor of m rows per output (a cache's rows,
        say), the outputs are written there instead and nothing is returned."""
        m = xs[0].shape[0] if xs and xs[0].dim() == 2 else None
        if [(x.dtype, tuple(x.shape)) for x in xs] != [(torch.float32, (m, k)) for k in self.widths]:
            want = ", ".join(f"[m, {k}]" for k in self.widths)
            got = ", ".join(f"{x.dtype} {tuple(x.shape)}" for x in xs)
            raise LightenError(f"ggml's graph takes fp32 {want}, got {got}")
        # Decode's graph (m = 1) is kept; a longer batch's buffers grow with m: built per call, then freed.
        g = self._decode_graph if m == 1 else None
        if g is None:
            g = _Graph(self.widths, m, self.build)
            if sum(g.widths) != self.n:
                g.free()
                raise LightenError(f"the graph's outputs are {g.widths} wide, not {self.n} in all")
            if m == 1:
                self._decode_graph = g
        try:
            return self._compute(g, xs, m, out)
        finally:
            if m != 1:
                g.free()

    def _compute(self, g: "_Graph", xs, m: int, out: list[torch.Tensor] | None) -> torch.Tensor | None:
        lib, y, parts = _ggml(), None, None
        if out is not None:
            if [(o.dtype, o.numel(), o.is_contiguous()) for o in out] != [
                (torch.float32, m * n, True) for n in g.widths
            ]:
                raise LightenError(f"ggml's graph writes {len(g.widths)} contiguous fp32 outputs of {m} rows")
            dests = [(o.data_ptr(), o.numel() * 4) for o in out]
        elif len(g.outputs) == 1 or m == 1:  # the outputs' rows are y's: read them straight in
            y = torch.empty(m, self.n)
            dests = [(y.data_ptr() + 4 * m * a, 4 * m * n) for a, n in zip(g.starts, g.widths, strict=True)]
        else:
            parts = [torch.empty(m, n) for n in g.widths]
            dests = [(p.data_ptr(), p.numel() * 4) for p in parts]
        for tensor, x in zip(g.inputs, xs, strict=True):
            x = x.contiguous()
            lib.backend_tensor_set(tensor, x.data_ptr(), 0, x.numel() * 4)
        if lib.backend_graph_compute(lib.backend, g.graph) != 0:
            raise LightenError(f"ggml's graph failed (widths {self.widths} -> {self.n}, batch {m})")
        for tensor, (ptr, size) in zip(g.outputs, dests, strict=True):
            lib.backend_tensor_get(tensor, ptr, 0, size)
        return torch.cat(parts, 1) if parts else y

    def __deepcopy__(self, memo):
        return GGMLFunction(self.widths, self.n, self.build)

    def __getstate__(self):
        raise TypeError("a ggml graph holds ggml's memory and cannot be pickled: make another")

    def __del__(self):
        if getattr(self, "_decode_graph", None):
            self._decode_graph.free()


class GGMLProduct(GGMLFunction):
    """y = x [W₁; W₂; ...]ᵀ for matrices of one input width k: their products side by side in one graph."""

    def __init__(self, matrices: list[GGMLMatrix]):
        ks = {w.k for w in matrices}
        if len(ks) != 1:
            raise LightenError(f"a product's matrices take one input width, got {sorted(ks)}")
        self.matrices, self.k = list(matrices), ks.pop()
        super().__init__(
            [self.k], sum(w.n for w in matrices), lambda g, x: [g.matmul(w, x) for w in matrices]
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [m, k] (fp32) -> [m, n₁ + n₂ + ...] (fp32)."""
        return self(x)

    def __deepcopy__(self, memo):
        return GGMLProduct(self.matrices)


_functions = weakref.WeakValueDictionary()  # handle -> GGMLFunction
_handles = itertools.count()


@torch.library.custom_op("lighten::ggml_matmul", mutates_args=())
def ggml_matmul(x: torch.Tensor, product: int) -> torch.Tensor:
    """GGMLProduct.matmul as a torch op, the product named by its handle: torch.compile traces through it
    in one graph (a ctypes call would break the graph) and takes its output shape from the fake below."""
    return _functions[product](x)


@ggml_matmul.register_fake
def _(x: torch.Tensor, product: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], _functions[product].n)


class _Graph:
    """ggml's graph of `build` for batch size m: its context, inputs and outputs, and the ops to build it
    with (on ggml tensors of shape [width, m] in ggml's order, i.e. torch's [m, width])."""

    def __init__(self, widths: list[int], m: int, build):
        lib, self._constants = _ggml(), []
        self.ctx = lib.init(
            _InitParams(
                MAX_NODES * lib.tensor_overhead() + lib.graph_overhead_custom(MAX_NODES, False), None, True
            )
        )
        self.m = m
        self.inputs = [lib.new_tensor_2d(self.ctx, F32, k, m) for k in widths]
        self.outputs = build(self, *self.inputs)
        self.widths = [lib.nelements(y) // m for y in self.outputs]  # each output m rows
        self.starts = list(itertools.accumulate(self.widths, initial=0))[:-1]
        self.graph = lib.new_graph_custom(self.ctx, MAX_NODES, False)
        for y in self.outputs:
            lib.build_forward_expand(self.graph, y)
        self.buffer = lib.backend_alloc_ctx_tensors_from_buft(self.ctx, lib.plain)
        for tensor, data in self._constants:
            lib.backend_tensor_set(tensor, data.data_ptr(), 0, data.numel() * 4)

    def matmul(self, w, x, bias: torch.Tensor | None = None):
        """x Wᵀ (+ bias), W a GGMLMatrix or a tensor of the graph ([m, n, k] with x [m, r, k]: one product
        per row of the batch)."""
        y = _ggml().mul_mat(self.ctx, w.weight if isinstance(w, GGMLMatrix) else w, x)
        return y if bias is None else self.add(y, self.constant(bias))

    def rms_norm(self, x, gain: torch.Tensor, eps: float):
        """x / sqrt(mean(x²) + eps) · gain, per row."""
        lib = _ggml()
        return lib.mul(self.ctx, lib.rms_norm(self.ctx, x, eps), self.constant(gain))

    def constant(self, values: torch.Tensor):
        """A 1-D tensor of the graph holding a copy of `values` (in fp32), broadcast over rows where used."""
        values = values.detach().to(torch.float32).contiguous()
        tensor = _ggml().new_tensor_1d(self.ctx, F32, values.numel())
        self._constants.append((tensor, values))
        return tensor

    def rows_of(self, x, rows: int, width: int):
        """x [m, rows · width] seen as [m, rows, width] (ggml's [width, rows, m]): a view."""
        return _ggml().reshape_3d(self.ctx, x, width, rows, self.m)

    def add(self, a, b):
        return _ggml().add(self.ctx, a, b)

    def swiglu(self, gate, up):
        """silu(gate) · up"""
        return _ggml().swiglu_split(self.ctx, gate, up)

    def free(self) -> None:
        if self.ctx:
            lib = _ggml()
            lib.backend_buffer_free(self.buffer)
            lib.free(self.ctx)
            self.ctx = None
