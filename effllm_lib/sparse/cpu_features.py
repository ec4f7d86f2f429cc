"""What this CPU and OS let the sparse kernels use, and which kernel ``kernel="auto"`` picks.

The answer comes from the extension's probe (cpuid for the instruction sets, xgetbv for the register state
the OS saves, ``arch_prctl(ARCH_REQ_XCOMP_PERM)`` for AMX tile data on Linux >= 5.16), not from the CPU
model: a kernel runs only where every instruction it contains is known to work. The original compiles
everything for Sapphire Rapids and dies with SIGILL elsewhere; here a missing feature is a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

from ._build import load_extension

KERNELS = {"bf16": ("portable", "avx512", "amx"), "int8": ("portable", "amx")}


@dataclass(frozen=True)
class CpuFeatures:
    avx512f: bool
    avx512bw: bool
    avx512vl: bool
    avx512_bf16: bool
    avx512_vbmi2: bool
    avx512_vpopcntdq: bool
    avx512_vnni: bool
    amx_tile: bool
    amx_bf16: bool
    amx_int8: bool
    os_avx512: bool
    os_amx: bool
    amx_permission: bool
    kernel_avx512: bool
    kernel_amx_bf16: bool
    kernel_amx_int8: bool


@lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """The probe's answer (builds the extension on first use)."""
    probe = load_extension().cpu_probe()
    return CpuFeatures(**{f.name: bool(probe[f.name]) for f in fields(CpuFeatures)})


def available_kernels(dtype: str = "bf16") -> list[str]:
    """The kernels that can run here for ``dtype`` ("bf16" or "int8"), slowest first."""
    if dtype not in KERNELS:
        raise ValueError(f"dtype must be one of {sorted(KERNELS)}, got {dtype!r}")
    f = cpu_features()
    ok = {"portable": True, "avx512": f.kernel_avx512,
          "amx": f.kernel_amx_bf16 if dtype == "bf16" else f.kernel_amx_int8}
    return [k for k in KERNELS[dtype] if ok[k]]


def resolve_kernel(kernel: str, dtype: str = "bf16", tokens: int = 1) -> str:
    """``kernel`` itself if it can run here (else a clear error); for "auto" the fastest sparse kernel for
    ``tokens`` on this machine, measured once and cached (``autotune``; int8: AMX where it runs)."""
    if dtype not in KERNELS:
        raise ValueError(f"dtype must be one of {sorted(KERNELS)}, got {dtype!r}")
    if kernel not in ("auto", "auto_rule") and kernel not in KERNELS[dtype]:
        raise ValueError(f"unknown {dtype} kernel {kernel!r}; expected 'auto' or one of {KERNELS[dtype]}")
    here = available_kernels(dtype)
    if kernel == "auto" and dtype == "bf16":
        from .autotune import auto_kernel

        return auto_kernel(tokens, allow_dense=False)
    if kernel in ("auto", "auto_rule"):  # int8, or a fallback without measuring: the widest kernel here
        return here[-1]
    if kernel not in here:
        f = cpu_features()
        need = {"avx512": "AVX512F/BW/VL + AVX512_BF16 + AVX512_VBMI2 with ZMM state enabled by the OS",
                "amx": f"AMX-TILE + AMX-{dtype.upper()} with tile state enabled (XCR0) and the arch_prctl "
                       "permission"}[kernel]
        raise RuntimeError(f"kernel {kernel!r} cannot run on this CPU: it needs {need}; found {f}. "
                           f"Available here: {here}")
    return kernel
