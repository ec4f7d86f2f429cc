"""The SparAMX kernels (``kernels/*.cpp``), built on first use by the shared loader (``effllm_lib._cpp``).

The build lands in ``paths.cache_dir() / "sparse_kernels" / <key>`` where the key hashes the kernel sources, the
CPU's feature flags, torch's version and the Python version. All translation units get the same portable flags;
the AVX-512, AVX2 and AMX files switch their own target on with ``#pragma GCC target`` around their kernels only
(see kernels/sparse_kernels.h).
"""

from __future__ import annotations

from pathlib import Path

from .. import _cpp
from .._cpp import CFLAGS, LDFLAGS  # noqa: F401  (re-exported: part 1's names)

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = ("bindings.cpp", "cpu_probe.cpp", "portable.cpp", "avx512_bf16.cpp", "amx.cpp", "kv_attention.cpp",
           "kv_portable_avx2.cpp", "kv_avx512.cpp")
HEADERS = ("sparse_kernels.h", "eff_msg.h")
NAME = "sparse_kernels"


def build_key() -> str:
    """Hash of what the compiled extension depends on (its build folder's name)."""
    return _cpp.build_key(KERNEL_DIR, SOURCES, HEADERS)


def load_extension(verbose: bool = False):
    """The compiled kernel module (built the first time, then loaded from the cache)."""
    return _cpp.load_extension(NAME, SOURCES, kernel_dir=KERNEL_DIR, headers=HEADERS, module_prefix="effllm_sparse",
                               what="the sparse kernels", verbose=verbose)
