"""The AVX-512 BitMoD kernel run on a CPU without AVX-512: its source compiled against SIMDe (portable C
implementations of the x86 intrinsics, the ``simde-py`` package) with the ``#pragma GCC target`` lines removed,
called through ctypes, and fuzzed against the fake-quantized float reference like the native kernels
(tests/test_bitmod_kernels.py). Where AVX-512 runs natively, that file tests the real build; this one checks the
kernel's logic (row blocks, accumulator split, 3-bit planes, tails) everywhere. Three intrinsics SIMDe lacks are
given here by plain loops (zero-extension of 16 bytes, the 16-lane sum, FP32 -> FP16 -> FP32 of 16 lanes)."""

import ctypes
import random

import pytest
import torch

from effllm_lib.bitmod import cpu_gemv
from effllm_lib.bitmod.packed import pack_weight, padded_group
from effllm_lib.bitmod.quantize import quantize_tensor
from simde_build import build_emulated

pytest.importorskip("simde_py", reason="simde-py (SIMDe headers) not installed")

SHIMS = r"""
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <cstring>
#include "simde/x86/avx512.h"
#include "simde/x86/f16c.h"
#include "simde/x86/fma.h"
static inline simde__m512i shim_cvtepu8_epi32(simde__m128i a) {
  uint8_t b[16]; int32_t r[16]; std::memcpy(b, &a, 16);
  for (int i = 0; i < 16; ++i) r[i] = b[i];
  return simde_mm512_loadu_si512(r);
}
static inline float shim_reduce_add_ps(simde__m512 v) {
  float f[16]; simde_mm512_storeu_ps(f, v); float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += f[i];
  return s;
}
static inline simde__m256i shim_cvtps_ph(simde__m512 v, int) {
  const simde__m128i lo = simde_mm256_cvtps_ph(simde_mm512_castps512_ps256(v), SIMDE_MM_FROUND_TO_NEAREST_INT);
  const simde__m128i hi = simde_mm256_cvtps_ph(simde_mm512_extractf32x8_ps(v, 1), SIMDE_MM_FROUND_TO_NEAREST_INT);
  return simde_mm256_set_m128i(hi, lo);
}
#define _mm512_cvtepu8_epi32 shim_cvtepu8_epi32
#define _mm512_reduce_add_ps shim_reduce_add_ps
#define _mm512_cvtps_ph shim_cvtps_ph
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
#ifndef _MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_TO_NEAREST_INT SIMDE_MM_FROUND_TO_NEAREST_INT
#endif
"""

RUNNER = r"""
extern "C" void run_avx512(const GemvProblem* p, int64_t b, int64_t e) { bitmod_gemv_avx512(*p, b, e); }
"""


class GemvProblem(ctypes.Structure):   # bitmod_kernels.h, field for field
    _fields_ = [("x", ctypes.c_void_p), ("m", ctypes.c_int64), ("ldx", ctypes.c_int64), ("codes", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("scale_fp32", ctypes.c_int), ("types", ctypes.c_void_p),
                ("type_stride", ctypes.c_int64), ("n_groups", ctypes.c_int64), ("gp", ctypes.c_int64),
                ("bits", ctypes.c_int), ("table", ctypes.c_void_p), ("round_mode", ctypes.c_int),
                ("bias", ctypes.c_void_p), ("out", ctypes.c_void_p), ("ldo", ctypes.c_int64)]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    lib = build_emulated(cpu_gemv.KERNEL_DIR / "avx512.cpp", SHIMS, cpu_gemv.KERNEL_DIR,
                         tmp_path_factory.mktemp("avx512_simde"), must_contain="bitmod_gemv_avx512", tail=RUNNER)
    return ctypes.CDLL(str(lib)).run_avx512


def run(fn, x, p, bias, out):
    xg = cpu_gemv.grouped_input(x, p.in_features, p.group_size, p.n_groups)
    table = cpu_gemv._lut_table(p.bits)
    b = None if bias is None else bias.float().contiguous()
    prob = GemvProblem(xg.data_ptr(), xg.shape[0], xg.stride(0), p.codes.data_ptr(), p.scales.data_ptr(),
                       int(p.scales.dtype == torch.float32), p.type_ids.data_ptr(), p.type_ids.shape[1], p.n_groups,
                       padded_group(p.group_size), p.bits, table.data_ptr(), cpu_gemv._ROUND_MODE[p.dtype],
                       None if b is None else b.data_ptr(), out.data_ptr(), out.stride(0))
    # two row ranges, as two threads would get them (the split lands on an odd row: R=2 blocks plus a tail)
    n = out.shape[1]
    mid = n // 2 | 1 if n > 2 else n
    fn(ctypes.byref(prob), 0, min(mid, n))
    if mid < n:
        fn(ctypes.byref(prob), mid, n)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_emulated_avx512_against_fake_quantized_reference(emulated, seed):
    rnd = random.Random(1000 + seed)
    bits = rnd.choice([3, 4])
    dtype = rnd.choice([torch.bfloat16, torch.float16, torch.float32])
    group_size = rnd.choice([64, 128, 256])
    cols = rnd.choice([group_size * rnd.randint(1, 4), rnd.randint(group_size // 2, 4 * group_size)])
    rows = rnd.randint(1, 41)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-1, 0.5, rows).unsqueeze(1) * 0.02
    w[:, torch.randint(0, cols, (3,), generator=g)] *= 8
    fq = quantize_tensor(w.to(dtype), bits, "bitmod", group_size).weight
    p = pack_weight(fq, bits, group_size)
    bias = torch.randn(rows, generator=g) if seed % 2 else None
    for tokens in sorted({1, 2, rnd.randint(3, 5), 8}):
        x = torch.randn(tokens, cols, generator=g)
        out = run(emulated, x, p, bias, torch.full((tokens, rows), float("nan")))
        ref = x.double() @ fq.double().T + (0 if bias is None else bias.double())
        bound = 4 * cols * 2.0 ** -24 * (x.double().abs() @ fq.double().abs().T) + 1e-30
        assert torch.isfinite(out).all(), (seed, tokens)
        assert ((out.double() - ref).abs() <= bound).all(), (seed, bits, dtype, group_size, rows, cols, tokens)
