"""Build the library's C++ kernels on first use (``torch.utils.cpp_extension.load``), once per process.

    ext = load_extension("sparse_kernels", ("bindings.cpp", "portable.cpp"), kernel_dir=KERNEL_DIR,
                         headers=("sparse_kernels.h",), what="the sparse kernels")

One loader for the three families (SparAMX sparse kernels, BitMoD CPU GEMV, PQ LUT kernels), so they share
the flags, the cache layout and the error. A build lands in ``paths.cache_dir() / name / <key>``, where the key
hashes each source and header (name and bytes), the flags, this CPU's feature flags, torch's version and the
Python version: an edited source, another machine (the cache may be shared) or another torch gets its own build,
and a stale one is never loaded. Every translation unit gets the same portable flags; files with AVX-512, AVX2
or AMX code switch their target on with ``#pragma GCC target`` around those functions only, and pick them at
run time from a cpuid probe, so a build never contains an instruction the CPU lacks on its load path.

A failed build raises RuntimeError naming what was built, where, and what it needs (g++ and ninja), and is
remembered: ``available(name)`` then answers False without trying again.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import sys
import threading
from pathlib import Path
from typing import Sequence

from .paths import cache_dir

# -fopenmp is what makes at::parallel_for parallel: ATen's header runs the range on OpenMP threads only where
# _OPENMP is defined, and silently runs it on the calling thread otherwise (the first device run measured
# single-threaded kernels because of that). The .so then needs libgomp.so.1, which resolves to the copy torch
# has already loaded, so torch.set_num_threads sets our thread count too.
CFLAGS = ("-O3", "-std=c++17", "-fno-math-errno", "-fopenmp")
LDFLAGS = ("-fopenmp",)
X86 = ("x86_64", "AMD64")

_lock = threading.Lock()
_modules: dict[str, object] = {}
_errors: dict[str, str] = {}


def cpu_flags() -> str:
    """This CPU's feature flags (sorted, from /proc/cpuinfo), or the processor name where that is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def build_key(kernel_dir: Path, sources: Sequence[str], headers: Sequence[str] = (),
              cflags: Sequence[str] = CFLAGS, ldflags: Sequence[str] = LDFLAGS) -> str:
    """Hash of everything the compiled extension depends on (see the module docstring)."""
    import torch

    h = hashlib.sha256()
    for name in tuple(sources) + tuple(headers):
        h.update(name.encode())
        h.update((Path(kernel_dir) / name).read_bytes())
    h.update(" ".join(tuple(cflags) + tuple(ldflags)).encode())
    h.update(cpu_flags().encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def _no_toolchain() -> str | None:
    missing = [tool for tool, names in (("a C++ compiler (g++)", ("c++", "g++")), ("ninja", ("ninja",)))
               if not any(shutil.which(n) for n in names)]
    if "ninja" in " ".join(missing):
        try:  # the ninja wheel puts its binary next to the interpreter, not always on PATH
            import ninja  # noqa: F401

            missing = [m for m in missing if m != "ninja"]
        except ImportError:
            pass
    return " and ".join(missing) if missing else None


def load_extension(name: str, sources: Sequence[str], *, kernel_dir: Path, headers: Sequence[str] = (),
                   module_prefix: str | None = None, what: str | None = None, arch: Sequence[str] | None = X86,
                   include_kernel_dir: bool = True, cflags: Sequence[str] = CFLAGS, ldflags: Sequence[str] = LDFLAGS,
                   verbose: bool = False):
    """The compiled module of ``sources`` (files in ``kernel_dir``), built the first time, then loaded from
    ``cache_dir() / name / <build key>``; RuntimeError if it cannot be built. ``module_prefix`` names the
    Python module (``<prefix>_<key>``); ``what`` names it in errors; ``arch``: machines it can be built on."""
    what = what or name
    module = _modules.get(name)
    if module is not None:
        return module
    with _lock:
        if name in _modules:
            return _modules[name]
        if name in _errors:
            raise RuntimeError(_errors[name])
        if arch is not None and platform.machine() not in arch:
            _errors[name] = f"{what} are x86-64 code; this machine is {platform.machine()}"
            raise RuntimeError(_errors[name])
        key = build_key(kernel_dir, sources, headers, cflags, ldflags)
        build_dir = cache_dir() / name / key
        missing = _no_toolchain()
        if missing and not any(build_dir.glob("*.so")):
            _errors[name] = f"could not build {what} in {build_dir}: {missing} not found (needs g++ and ninja)"
            raise RuntimeError(_errors[name])
        build_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load

        try:
            module = load(name=f"{module_prefix or 'effllm_' + name}_{key}",
                          sources=[str(Path(kernel_dir) / s) for s in sources], extra_cflags=list(cflags),
                          extra_ldflags=list(ldflags),
                          extra_include_paths=[str(kernel_dir)] if include_kernel_dir else None,
                          build_directory=str(build_dir), verbose=verbose)
        except (RuntimeError, OSError, ImportError) as exc:
            _errors[name] = f"could not build {what} in {build_dir} (needs g++ and ninja): {exc}"
            raise RuntimeError(_errors[name]) from exc
        _modules[name] = module
        return module


def available(name: str) -> bool | None:
    """True once ``name`` is loaded, False after its build failed, None if not tried yet."""
    if name in _modules:
        return True
    return False if name in _errors else None
