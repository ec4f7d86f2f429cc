"""The BitMoD LUT GEMV on CPU: build (on first use) and dispatch of the C++ kernels in ``kernels/``.

    out = bitmod_linear_cpu(x, packed, bias, kernel="auto")   # x [..., in_features], any float dtype

Kernels: "avx512" (the group's scaled value set in one zmm, vpermps look-ups), "avx2" (two ymm halves and a
blend), "portable" (plain C++, any group size that pads to a multiple of 8). "auto" takes the widest one this
CPU and OS support (the SIMD ones need the padded group size to be a multiple of 64); asking for one they
don't support is a clear RuntimeError, never an illegal instruction. Tokens are processed 8 at a time (the
kernels keep one accumulator register per token); everything accumulates in FP32 and the result is cast to
the input's dtype. Threads: torch's (``torch.set_num_threads``).

Built by the library's shared loader (``effllm_lib._cpp``, the same flags as the other kernels): cached under
``paths.cache_dir() / "bitmod_kernels" / <hash of sources, flags, CPU flags, torch, Python>``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import _cpp
from .packed import PackedBitMoD, code_values, padded_group

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = ("bindings.cpp", "portable.cpp", "avx2.cpp", "avx512.cpp")
HEADERS = ("bitmod_kernels.h",)
CPU_KERNELS = ("portable", "avx2", "avx512")
MAX_TOKENS_PER_CALL = 8
_ROUND_MODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

NAME = "bitmod_kernels"


def build_key() -> str:
    return _cpp.build_key(KERNEL_DIR, SOURCES, HEADERS)


def load_extension(verbose: bool = False):
    """The compiled module (built the first time, then loaded from the cache); RuntimeError if it can't be."""
    return _cpp.load_extension(NAME, SOURCES, kernel_dir=KERNEL_DIR, headers=HEADERS, module_prefix="effllm_bitmod",
                               what="the BitMoD CPU kernels", verbose=verbose)


def extension_available() -> bool:
    """True if the extension is (or can be) built here; a failed build is not retried."""
    if _cpp.available(NAME) is None:
        try:
            load_extension()
        except RuntimeError:
            return False
    return bool(_cpp.available(NAME))


@lru_cache(maxsize=1)
def cpu_probe() -> dict:
    return dict(load_extension().cpu_probe())


def available_kernels() -> list[str]:
    """The kernels this CPU and OS can run, slowest first."""
    probe = cpu_probe()
    return ["portable"] + [k for k in ("avx2", "avx512") if probe[k]]


@lru_cache(maxsize=64)
def resolve_kernel(kernel: str, group_size: int) -> str:
    if kernel != "auto" and kernel not in CPU_KERNELS:
        raise ValueError(f"unknown CPU kernel {kernel!r}; expected 'auto' or one of {CPU_KERNELS}")
    here = available_kernels()
    simd_ok = padded_group(group_size) % 64 == 0
    if kernel == "auto":
        return here[-1] if simd_ok else "portable"
    if kernel not in here:
        raise RuntimeError(f"kernel {kernel!r} cannot run on this CPU (it needs "
                           f"{'AVX512F' if kernel == 'avx512' else 'AVX2+FMA+F16C'} enabled by the OS); "
                           f"available here: {here}")
    if kernel != "portable" and not simd_ok:
        raise ValueError(f"the {kernel} kernel needs a group size that pads to a multiple of 64, got {group_size}")
    return kernel


@lru_cache(maxsize=2)
def _lut_table(bits: int) -> torch.Tensor:  # shared and read-only: built once, not on every call
    t = code_values(bits)
    return F.pad(t, (0, 16 - t.shape[1])).contiguous()


def grouped_input(x2: torch.Tensor, in_features: int, group_size: int, n_groups: int) -> torch.Tensor:
    """fp32 [m, n_groups * gp]: each group's inputs, zero-padded like the packed codes."""
    gp = padded_group(group_size)
    if gp == group_size and in_features == n_groups * group_size:  # nothing to pad (e.g. 4096 / 128)
        return x2.to(torch.float32).contiguous()
    xf = F.pad(x2.float(), (0, n_groups * group_size - in_features)).view(x2.shape[0], n_groups, group_size)
    return F.pad(xf, (0, gp - group_size)).reshape(x2.shape[0], n_groups * gp).contiguous()


def bitmod_linear_cpu(x: torch.Tensor, p: PackedBitMoD, bias: torch.Tensor | None = None,
                      kernel: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(p).T + bias`` with the LUT kernels; FP32 accumulation, returned in ``x.dtype``.

    ``out`` (float32 [tokens, out_features]) is written in place when given (the tests poison it first)."""
    if not x.is_cpu:
        raise ValueError(f"bitmod_linear_cpu needs a CPU tensor, got {x.device}")
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.shape[-1] != p.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {p.in_features}")
    name = resolve_kernel(kernel, p.group_size)
    ext = load_extension()
    x2 = x.reshape(-1, p.in_features)
    m = x2.shape[0]
    xg = grouped_input(x2, p.in_features, p.group_size, p.n_groups)
    if out is None:
        out = torch.empty(m, p.out_features, dtype=torch.float32)
    elif out.dtype != torch.float32 or tuple(out.shape) != (m, p.out_features):
        raise ValueError(f"out must be float32 [{m}, {p.out_features}]")
    table = _lut_table(p.bits)
    b = None if bias is None else bias.detach().float().contiguous()
    gp, mode = padded_group(p.group_size), _ROUND_MODE[p.dtype]
    if m <= MAX_TOKENS_PER_CALL:   # decode: no slicing (a Python tensor slice costs as much as a small GEMV)
        err = ext.gemv(xg, p.codes, p.scales, p.type_ids, table, p.bits, gp, mode, b, out, name)
    else:
        for t0 in range(0, m, MAX_TOKENS_PER_CALL):
            t1 = min(m, t0 + MAX_TOKENS_PER_CALL)
            err = ext.gemv(xg[t0:t1], p.codes, p.scales, p.type_ids, table, p.bits, gp, mode, b, out[t0:t1], name)
            if err:
                break
    if err:
        raise RuntimeError(f"BitMoD {name} kernel: {err}")
    if x.dtype == torch.float32 and x.dim() == 2:
        return out
    return out.to(x.dtype).view(*x.shape[:-1], p.out_features)
