"""Process-level settings that make CPU registration fast.

PyTorch's CPU allocator takes every tensor from the C library's ``malloc``. glibc serves blocks above 32 MiB with a
fresh ``mmap`` and gives them back with ``munmap`` on free, so each full-resolution temporary (a 16-channel
160x192x160 map is 315 MB) is paid again in page faults and zeroing: measured on the 2-core development CPU, iPEAR
with 3 updates per level took 23.4 s with glibc's defaults and 12.6 s with freed memory kept for reuse (same
outputs). :func:`keep_freed_cpu_memory` switches glibc to its heap for every block and stops it trimming the heap,
as Intel's PyTorch tuning guide does with jemalloc/tcmalloc, without a preloaded library. PyTorch itself exposes no
CPU caching allocator, hence the ``mallopt`` call.

The cost: memory freed by the process stays with it (the resident size is the high-water mark of the heap, which
fragmentation can raise above the largest live set) until it exits: a 160x192x160 training step of iPEAR, whose
live peak is about 10 GB, grew one benchmark process to 13.7 GB. The command-line tools (``register``, ``warp``,
``jacobian``) and the benchmark command turn it on when run as programs; calls from Python (tests, notebooks)
leave the allocator alone, and library users call the function themselves. Set the environment variable
``MONAI_IPEAR_KEEP_FREED_MEMORY=0`` to keep glibc's defaults.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import warnings

__all__ = [
    "keep_freed_cpu_memory",
    "keeps_freed_cpu_memory",
    "release_freed_cpu_memory",
    "program_arguments",
    "autocast_dtype",
    "reduced_precision",
]

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4
_STATE = {"done": False}


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory for reuse (no ``mmap`` per large block, no heap trimming); once per process.

    Returns True when the setting is in effect (glibc on Linux, not disabled by ``MONAI_IPEAR_KEEP_FREED_MEMORY=0``),
    False where it does not apply (another C library or OS), which changes nothing else.
    """
    if _STATE["done"]:
        return True
    from .booleans import as_bool  # the package's one boolean parser

    if not as_bool(os.environ.get("MONAI_IPEAR_KEEP_FREED_MEMORY", "1"), "MONAI_IPEAR_KEEP_FREED_MEMORY"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1: never trim (mallopt(3)); a finite threshold (2**31 - 1 was used before) still gave 2 GB back whenever the
    # heap's free top grew past it, as in a 160x192x160 training step, and the next step paid it in page faults
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    _STATE["done"] = ok
    return ok


def keeps_freed_cpu_memory() -> bool:
    """Whether :func:`keep_freed_cpu_memory` is in effect in this process."""
    return _STATE["done"]


def release_freed_cpu_memory() -> bool:
    """Give the memory kept by :func:`keep_freed_cpu_memory` back to the system now (glibc ``malloc_trim(0)``).

    For a moment where the process waits on another one that needs the memory (the benchmark's peak-memory child:
    a parent holding a training step's 14 GB beside a child measuring one got both killed for memory on a 24 GiB
    machine). The next large allocations are paid in page faults again. Returns False where nothing applies.
    """
    if not _STATE["done"]:
        return False
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False


def program_arguments(argv: list[str] | None) -> list[str]:
    """The arguments of a command-line entry point, and the process settings of a program.

    ``argv=None`` means the entry point runs as a program of its own (``python -m ...``): the arguments are
    ``sys.argv[1:]`` and :func:`keep_freed_cpu_memory` is switched on. A list means a call from Python (tests,
    notebooks): it is returned as it is and the allocator is left alone. Every entry point (``monai_ipear``'s CLI,
    the benchmark) decides this here, before it rebinds ``argv``.
    """
    if argv is None:
        keep_freed_cpu_memory()
        return list(sys.argv[1:])
    return list(argv)


def autocast_dtype(device_type: str):
    """The reduced precision of this package's ``torch.autocast`` option (``register --autocast``, the bundle's
    ``autocast``, the benchmark's and the studies' ``--autocast``): float16 on CUDA, bfloat16 elsewhere (CPUs with
    AVX512-BF16 or AMX run it natively)."""
    import torch

    return torch.float16 if device_type == "cuda" else torch.bfloat16


def reduced_precision(device, enabled: bool = True):
    """The package's ``torch.autocast``: :func:`autocast_dtype` on ``device`` (a ``torch.device`` or its type) when
    ``enabled``, else a no-op context; for inference and the benchmark's training step alike. Networks return their
    field in the reduced precision inside it: callers take ``.float()``.

    On a CPU without native bfloat16 (no AVX512-BF16, no AMX) the reduced precision is emulated and slower than
    float32: a ``UserWarning`` says so. Agreement with float32 is measured, not bounded here (docs/pretrained.md,
    docs/benchmarks.md).
    """
    import torch

    if not enabled:
        return contextlib.nullcontext()
    device_type = getattr(device, "type", str(device).split(":")[0])
    if device_type == "cpu" and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        warnings.warn("autocast on this CPU: bfloat16 has no native support here (no AVX512-BF16 or AMX), so it is "
                      "emulated and slower than float32.", UserWarning, stacklevel=2)
    return torch.autocast(device_type, dtype=autocast_dtype(device_type))
