// The portable kernel: plain C++ (compiled with the extension's generic flags), any group size that is a
// multiple of 8. Also the reference the SIMD kernels are fuzzed against in the tests (besides torch).
#include <cmath>
#include <cstring>

#include "bitmod_kernels.h"

namespace {
float round_weight(float v, int mode) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (mode == 1) {  // bf16, round to nearest even (values are finite)
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
  } else if (mode == 2) {  // fp16: |v| <= 16 * 65504 never overflows what the weight held; RNE at 11 bits
    const float a = std::fabs(v);
    if (a < 6.103515625e-05f) {  // subnormal range: quantum 2^-24
      const float q = std::nearbyint(a * 16777216.0f) / 16777216.0f;
      return std::copysign(q, v);
    }
    u += 0xfffu + ((u >> 13) & 1u);
    u &= 0xffffe000u;
  }
  std::memcpy(&v, &u, 4);
  return v;
}
}  // namespace

extern "C" void bitmod_gemv_portable(const GemvProblem& p, int64_t row_begin, int64_t row_end) {
  const int64_t gbytes = bitmod_group_bytes(p), half = p.gp / 2, q = p.gp / 4;
  float lut[16];
  for (int64_t r = row_begin; r < row_end; ++r) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t g = 0; g < p.n_groups; ++g) {
      const float* values = p.table + 16 * bitmod_type(p, r, g);
      const float s = bitmod_scale(p, r, g);
      for (int c = 0; c < 16; ++c) lut[c] = round_weight(values[c] * s, p.round_mode);
      const uint8_t* c = p.codes + r * p.n_groups * gbytes + g * gbytes;
      const float* xg = p.x + g * p.gp;
      for (int64_t i = 0; i < p.gp; ++i) {
        int code;
        if (p.bits == 4) {
          code = i < half ? (c[i] & 15) : (c[i - half] >> 4);
        } else {
          code = ((c[i % q] >> (2 * (i / q))) & 3) | (((c[q + i / 8] >> (i % 8)) & 1) << 2);
        }
        const float w = lut[code];
        for (int64_t b = 0; b < p.m; ++b) acc[b] += w * xg[b * p.ldx + i];
      }
    }
    for (int64_t b = 0; b < p.m; ++b) p.out[b * p.ldo + r] = acc[b] + (p.bias ? p.bias[r] : 0.0f);
  }
}
