// Plain-C interface of the BitMoD LUT GEMV kernels. As in the SparAMX kernels (effllm_lib/sparse/kernels),
// every instruction set lives in its own translation unit that includes no torch header and switches its
// target on with #pragma GCC target, so no AVX2/AVX-512 code can leak into functions that run on any CPU;
// bindings.cpp checks the arguments and calls a kernel only where the CPU and OS support it.
//
// Every kernel computes, for output rows [row_begin, row_end) and tokens [0, m) (m <= 8):
//   out[b, r] = bias[r] + sum_g sum_i lut_g[code(r, g, i)] * x[b, g * gp + i]
// with lut_g[c] = round_to_weight_dtype(table[type(r, g)][c] * scale(r, g)), i.e. the dequantized weight of
// the packed format (effllm_lib/bitmod/packed.py documents the layout) multiplied in FP32.
#pragma once
#include <cstdint>

struct GemvProblem {
  const float* x;         // fp32 [m, ldx]: the input laid out as [n_groups, gp] per token, padding zero
  int64_t m;              // tokens, 1..8
  int64_t ldx;            // >= n_groups * gp
  const uint8_t* codes;   // [n, n_groups * group_bytes]
  const void* scales;     // [n, n_groups], fp16 (uint16 bits) or fp32
  int scale_fp32;         // 1: scales are float, 0: fp16
  const uint8_t* types;   // [n, type_stride], 2 bits per group
  int64_t type_stride;    // ceil(n_groups / 4)
  int64_t n_groups;
  int64_t gp;             // codes per (padded) group, a multiple of 8 (of 64 for the SIMD kernels)
  int bits;               // 3 or 4
  const float* table;     // [4, 16] value of each code per type (3 bits: the first 8 used)
  int round_mode;         // the weight dtype the dequantized value is rounded to: 0 fp32, 1 bf16, 2 fp16
  const float* bias;      // fp32 [n] or null
  float* out;             // fp32 [m, ldo]
  int64_t ldo;
};

extern "C" {
void bitmod_gemv_portable(const GemvProblem& p, int64_t row_begin, int64_t row_end);
void bitmod_gemv_avx2(const GemvProblem& p, int64_t row_begin, int64_t row_end);
void bitmod_gemv_avx512(const GemvProblem& p, int64_t row_begin, int64_t row_end);
}

static inline int64_t bitmod_group_bytes(const GemvProblem& p) { return p.gp * p.bits / 8; }

static inline int bitmod_type(const GemvProblem& p, int64_t row, int64_t g) {
  return (p.types[row * p.type_stride + (g >> 2)] >> (2 * (g & 3))) & 3;
}

// fp16 bits -> float without vector instructions (normals, subnormals, zero; scales are finite and >= 0)
static inline float bitmod_half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

static inline float bitmod_scale(const GemvProblem& p, int64_t row, int64_t g) {
  const int64_t i = row * p.n_groups + g;
  if (p.scale_fp32) return static_cast<const float*>(p.scales)[i];
  return bitmod_half_to_float(static_cast<const uint16_t*>(p.scales)[i]);
}
