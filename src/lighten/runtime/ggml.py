"""ggml's CPU matmul on GGUF block bytes: the kernels llama.cpp runs, called on one weight at a time.

llama-cpp-python installs ggml as shared libraries (libggml-base, libggml-cpu); this binds the few functions
a matmul needs through ctypes, no GGUF file and no model load:

    w = GGMLMatrix(blocks, "q4_0", (n, k))     # blocks: uint8 [n, bytes per row], the GGUF block bytes
    y = w.matmul(x)                            # x: fp32 [m, k] -> fp32 [m, n], y = x Wᵀ

The weight goes into ggml's "repack" buffer where ggml has an interleaved layout for its type and shape
(q4_0, iq4_nl, q4_k, ... on AVX2 / AVX-512 / NEON: what llama.cpp does when it loads a model), otherwise
ggml reads lighten's bytes in place, no copy. Like llama.cpp, ggml rounds each block of activations to 8 bits
(q8_0 or q8_K) before the integer dot products: results differ from dequantize + matmul by that rounding.

Only the C API is used: functions on opaque pointers, and one struct (ggml_init_params, unchanged for years)
so that a ggml update breaks this loudly, with a missing function named, rather than silently by a struct
layout. Tested with the ggml of llama-cpp-python 0.3.36 (ggml 0.25.3).
"""

import ctypes
import functools
import pathlib
from collections import OrderedDict
from typing import NamedTuple

import torch

from lighten.errors import LightenError
from lighten.export.llamacpp import has_amx
from lighten.formats.ggml import GGMLFormat

GRAPHS_PER_MATRIX = 4  # graphs kept per weight, one per batch size m (decode's m = 1, prefill's lengths)
_threads = [torch.get_num_threads()]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_P, _SIZE, _I64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
_SIGNATURES = {  # name: (library, result, argument types)
    "ggml_init": ("base", _P, [_InitParams]),
    "ggml_free": ("base", None, [_P]),
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
    "ggml_backend_cpu_init": ("cpu", _P, []),
    "ggml_backend_cpu_reg": ("cpu", _P, []),
    "ggml_backend_cpu_set_n_threads": ("cpu", None, [_P, ctypes.c_int]),
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
    return lib


def aligned(data: torch.Tensor) -> torch.Tensor:
    """`data` itself if ggml can read it in place (contiguous, aligned to 32 bytes as its CPU kernels want),
    else a copy that it can (torch allocates to 64; numpy's arrays may sit at 16)."""
    return data if data.is_contiguous() and data.data_ptr() % 32 == 0 else data.clone()


def set_threads(n: int) -> None:
    """Threads of every ggml matmul from now on (default: torch's count when lighten was imported)."""
    if n < 1:
        raise LightenError(f"ggml needs at least 1 thread, got {n}")
    _threads[0] = n


class _Graph(NamedTuple):
    """y = W x for one batch size: its context, the buffer holding x and y, the tensors and the graph."""

    ctx: int
    buffer: int
    x: int
    y: int
    graph: int


class GGMLMatrix:
    """A weight W [n, k] of one GGUF block type and y = x Wᵀ by ggml's CPU matmul. Where ggml has an
    interleaved layout for the type and shape (`repacked`), ggml holds W in it, a copy; elsewhere ggml
    reads the given bytes in place, and they must then stay unchanged while this matrix is used."""

    def __init__(self, blocks: torch.Tensor, spec: str, shape: tuple[int, int], repack: bool = True):
        from lighten import formats

        fmt = formats.get(spec)
        if not isinstance(fmt, GGMLFormat):
            raise LightenError(f"{spec} is not a GGUF block type: ggml's kernels compute only those")
        lib, (self.n, self.k) = _ggml(), shape
        self.spec, self.type, self._graphs = spec, int(fmt.ggml_type), OrderedDict()
        data = blocks.view(torch.uint8)
        rows, _, _, blocks_per_row = fmt.geometry(tuple(shape))
        if data.numel() != rows * blocks_per_row * fmt.block_bytes:
            raise LightenError(f"{data.numel()} bytes are not a {spec} matrix of shape {tuple(shape)}")
        self._new_weight()
        self.buffer = None
        if repack and lib.repack is not None:
            self.buffer = lib.backend_alloc_ctx_tensors_from_buft(self.ctx, lib.repack)
            if not lib.backend_dev_supports_op(lib.device, self._graph(1).y):  # no layout for this one
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

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [m, k] (fp32) -> x Wᵀ [m, n] (fp32), on ggml's kernels with set_threads' thread count."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.k:
            raise LightenError(f"ggml's matmul takes fp32 [m, {self.k}], got {x.dtype} {tuple(x.shape)}")
        lib, x = _ggml(), x.contiguous()
        g = self._graph(x.shape[0])
        y = torch.empty(x.shape[0], self.n)
        lib.backend_tensor_set(g.x, x.data_ptr(), 0, x.numel() * 4)
        lib.backend_cpu_set_n_threads(lib.backend, _threads[0])
        if lib.backend_graph_compute(lib.backend, g.graph) != 0:
            raise LightenError(f"ggml's matmul failed ({self.spec}, {self.n} x {self.k}, batch {x.shape[0]})")
        lib.backend_tensor_get(g.y, y.data_ptr(), 0, y.numel() * 4)
        return y

    def _graph(self, m: int) -> _Graph:
        """The graph for batch size m, built on first use; the GRAPHS_PER_MATRIX most recent are kept."""
        if m in self._graphs:
            self._graphs.move_to_end(m)
            return self._graphs[m]
        lib = _ggml()
        ctx = lib.init(
            _InitParams(3 * lib.tensor_overhead() + lib.graph_overhead_custom(4, False), None, True)
        )
        x = lib.new_tensor_2d(ctx, 0, self.k, m)  # 0: GGML_TYPE_F32
        y = lib.mul_mat(ctx, self.weight, x)
        graph = lib.new_graph_custom(ctx, 4, False)
        lib.build_forward_expand(graph, y)
        self._graphs[m] = _Graph(ctx, lib.backend_alloc_ctx_tensors_from_buft(ctx, lib.plain), x, y, graph)
        if len(self._graphs) > GRAPHS_PER_MATRIX:
            _free_graph(self._graphs.popitem(last=False)[1])
        return self._graphs[m]

    def close(self) -> None:
        """Free ggml's memory for this matrix (also done when it is garbage collected)."""
        lib = _ggml()
        while self._graphs:
            _free_graph(self._graphs.popitem()[1])
        if self.ctx:
            if self.buffer:
                lib.backend_buffer_free(self.buffer)
            lib.free(self.ctx)
            self.ctx = self.buffer = self.weight = None

    def __getstate__(self):
        # Copied (deepcopy, pickle), its pointers would be freed twice.
        raise TypeError("a GGMLMatrix holds ggml's memory and cannot be copied: make another from the bytes")

    def __del__(self):
        if getattr(self, "ctx", None):
            self.close()


def _free_graph(g: _Graph) -> None:
    lib = _ggml()
    lib.backend_buffer_free(g.buffer)
    lib.free(g.ctx)
