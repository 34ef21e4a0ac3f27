"""Give freed memory back to the system, so that a long calibration's peak RSS is what it holds, not what it
once held. glibc only: elsewhere these do nothing."""

import ctypes
import os

try:
    _libc = ctypes.CDLL(None)
    _mallopt, _malloc_trim = _libc.mallopt, _libc.malloc_trim
except AttributeError:  # not glibc
    _mallopt = _malloc_trim = None


def map_large_allocations() -> None:
    """Have glibc serve each allocation of 4 MB or more with a mapping of its own, which free() unmaps. By
    default it raises that threshold to the largest block freed so far (up to 32 MB), and then a calibration's
    big temporaries (Hessians, a block's weights) come from the heap, where the small tensors that outlive
    them (the quantized layers) keep the freed space from going back: a higher peak RSS. Below 4 MB are the
    activations of one calibration window (512 tokens x 1,536 x 4 bytes = 3 MB on SmolLM2): unmapped at
    each free, they were mapped and zero-filled again by every forward (53 M page faults, 214 s of system
    time in a GPTQ run), and a wider model's larger ones cost less than its matmuls per byte."""
    if _mallopt is not None:
        _mallopt(-3, 4 * 2**20)  # -3: M_MMAP_THRESHOLD


def release_free_pages() -> None:
    """Return the free pages inside the heap, not only at its top: the temporaries of one calibrated block
    freed around the quantized layers it keeps. Once per block, on smollm2-135m this took the RSS between
    blocks from 786 to 651 MB (GPTQ, 16,384 tokens) for a few milliseconds."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def available_bytes() -> int:
    """The memory the system can give without swapping (Linux's MemAvailable); the physical memory where
    /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
