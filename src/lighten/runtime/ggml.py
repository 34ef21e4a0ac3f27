"""ggml's CPU matmul on GGUF block bytes: the kernels llama.cpp runs, called on one layer at a time.

llama-cpp-python installs ggml as shared libraries (libggml-base, libggml-cpu); this binds the few functions
a matmul needs through ctypes, no GGUF file and no model load:

    w = GGMLMatrix(blocks, "q4_0", (n, k))     # blocks: uint8 [n, bytes per row], the GGUF block bytes
    y = GGMLProduct([w]).matmul(x)             # x: fp32 [m, k] -> fp32 [m, n], y = x Wᵀ
    GGMLProduct([wq, wk, wv]).matmul(x)        # several weights of one input in one call, side by side

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
from collections import OrderedDict

import torch

from lighten.cpu import has_amx
from lighten.errors import LightenError
from lighten.formats.ggml import GGMLFormat

GRAPHS_PER_PRODUCT = 4  # graphs kept per product, one per batch size m (decode's m = 1, prefill's lengths)
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
    "ggml_new_tensor_2d": ("base", _P, [_P, ctypes.c_int, _I64, _I64]),
    "ggml_mul_mat": ("base", _P, [_P, _P, _P]),
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
            probe = _Product([self], 1)
            has_layout = lib.backend_dev_supports_op(lib.device, probe.ys[0])
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


class GGMLProduct:
    """y = x [W₁; W₂; ...]ᵀ for matrices of one input width k: their products side by side, one ggml graph
    (per batch size m, the GRAPHS_PER_PRODUCT most recent kept) computing them all in one call. Copies
    (deepcopy) share the matrices and build graphs of their own."""

    def __init__(self, matrices: list[GGMLMatrix]):
        ks = {w.k for w in matrices}
        if len(ks) != 1:
            raise LightenError(f"a product's matrices take one input width, got {sorted(ks)}")
        self.matrices, self.k = list(matrices), ks.pop()
        self.n = sum(w.n for w in matrices)
        self._graphs = OrderedDict()
        self.handle = next(_handles)  # how the torch op ggml_matmul names this product
        _products[self.handle] = self

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [m, k] (fp32) -> [m, n₁ + n₂ + ...] (fp32), on ggml's kernels with set_threads' threads."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.k:
            raise LightenError(f"ggml's matmul takes fp32 [m, {self.k}], got {x.dtype} {tuple(x.shape)}")
        lib, x, m = _ggml(), x.contiguous(), x.shape[0]
        g = self._graph(m)
        lib.backend_tensor_set(g.x, x.data_ptr(), 0, x.numel() * 4)
        if lib.backend_graph_compute(lib.backend, g.graph) != 0:
            raise LightenError(f"ggml's matmul failed ({self.n} x {self.k}, batch {m})")
        if len(g.ys) == 1 or m == 1:  # the outputs' rows are y's: read them straight in
            y, offset = torch.empty(m, self.n), 0
            for out, w in zip(g.ys, self.matrices, strict=True):
                lib.backend_tensor_get(out, y.data_ptr() + offset, 0, m * w.n * 4)
                offset += m * w.n * 4
            return y
        parts = [torch.empty(m, w.n) for w in self.matrices]
        for out, part in zip(g.ys, parts, strict=True):
            lib.backend_tensor_get(out, part.data_ptr(), 0, part.numel() * 4)
        return torch.cat(parts, 1)

    def _graph(self, m: int) -> "_Product":
        if m in self._graphs:
            self._graphs.move_to_end(m)
            return self._graphs[m]
        self._graphs[m] = _Product(self.matrices, m)
        if len(self._graphs) > GRAPHS_PER_PRODUCT:
            self._graphs.popitem(last=False)[1].free()
        return self._graphs[m]

    def __deepcopy__(self, memo):
        return GGMLProduct(self.matrices)

    def __getstate__(self):
        raise TypeError("a GGMLProduct holds ggml's memory and cannot be pickled: make another")

    def __del__(self):
        for g in getattr(self, "_graphs", {}).values():
            g.free()


_products = weakref.WeakValueDictionary()  # handle -> GGMLProduct
_handles = itertools.count()


@torch.library.custom_op("lighten::ggml_matmul", mutates_args=())
def ggml_matmul(x: torch.Tensor, product: int) -> torch.Tensor:
    """GGMLProduct.matmul as a torch op, the product named by its handle: torch.compile traces through it
    in one graph (a ctypes call would break the graph) and takes its output shape from the fake below."""
    return _products[product].matmul(x)


@ggml_matmul.register_fake
def _(x: torch.Tensor, product: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], _products[product].n)


class _Product:
    """The graph of ys = [x Wᵢᵀ] for batch size m: its context, the buffer of x and the ys, those tensors."""

    def __init__(self, matrices: list[GGMLMatrix], m: int):
        lib, size = _ggml(), 2 * len(matrices) + 2
        tensors = (1 + len(matrices)) * lib.tensor_overhead()
        self.ctx = lib.init(_InitParams(tensors + lib.graph_overhead_custom(size, False), None, True))
        self.x = lib.new_tensor_2d(self.ctx, 0, matrices[0].k, m)  # 0: GGML_TYPE_F32
        self.ys = [lib.mul_mat(self.ctx, w.weight, self.x) for w in matrices]
        self.graph = lib.new_graph_custom(self.ctx, size, False)
        for y in self.ys:
            lib.build_forward_expand(self.graph, y)
        self.buffer = lib.backend_alloc_ctx_tensors_from_buft(self.ctx, lib.plain)

    def free(self) -> None:
        if self.ctx:
            lib = _ggml()
            lib.backend_buffer_free(self.buffer)
            lib.free(self.ctx)
            self.ctx = None
