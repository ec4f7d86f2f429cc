"""Build the C++ kernels on first use with ``torch.utils.cpp_extension.load``.

The build lands in ``paths.cache_dir() / "sparse_kernels" / <key>`` where the key hashes the kernel
sources, the CPU's feature flags, torch's version and the Python version, so an edited source, another
machine (the cache directory may be shared) or another torch gets its own build and a stale one is never
loaded. All translation units get the same portable flags; the AVX-512 and AMX files switch their own
target on with ``#pragma GCC target`` around their kernels only (see kernels/sparse_kernels.h).
"""

from __future__ import annotations

import hashlib
import platform
import sys
import threading
from pathlib import Path

from ..paths import cache_dir

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = ("bindings.cpp", "cpu_probe.cpp", "portable.cpp", "avx512_bf16.cpp", "amx.cpp", "kv_attention.cpp",
           "kv_portable_avx2.cpp", "kv_avx512.cpp")
HEADERS = ("sparse_kernels.h", "eff_msg.h")
# -fopenmp is what makes at::parallel_for parallel: ATen's header runs the range on OpenMP threads only where
# _OPENMP is defined, and silently runs it on the calling thread otherwise (the first device run measured
# single-threaded kernels because of that). The .so then needs libgomp.so.1, which resolves to the copy torch
# has already loaded, so torch.set_num_threads sets our thread count too.
CFLAGS = ("-O3", "-std=c++17", "-fno-math-errno", "-fopenmp")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_module = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def build_key() -> str:
    """Hash of what the compiled extension depends on."""
    import torch

    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((KERNEL_DIR / name).read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(_cpu_flags().encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def load_extension(verbose: bool = False):
    """The compiled kernel module (built the first time, then loaded from the cache)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if platform.machine() not in ("x86_64", "AMD64"):
            raise RuntimeError(f"the sparse kernels are x86-64 code; this machine is {platform.machine()}")
        from torch.utils.cpp_extension import load

        key = build_key()
        build_dir = cache_dir() / "sparse_kernels" / key
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            _module = load(
                name=f"effllm_sparse_{key}",
                sources=[str(KERNEL_DIR / s) for s in SOURCES],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                extra_include_paths=[str(KERNEL_DIR)],
                build_directory=str(build_dir),
                verbose=verbose,
            )
        except (RuntimeError, OSError, ImportError) as exc:
            raise RuntimeError(
                f"could not build the sparse kernels in {build_dir} (needs g++ >= 11 and ninja): {exc}"
            ) from exc
        return _module
